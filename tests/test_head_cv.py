"""The head's inner cross-validation: fusion="auto" and the per-gene CV score (trust) carried to the predictions."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from spatialdata import SpatialData

import dbk
from dbk.core import InputScaler
from dbk.pp._prepare import prepare_slides
from dbk.tl._context import tile_spacing_um
from dbk.tl._fit_steps import scaled_table, training_table
from dbk.tl._head_cv import (
    AUTO_CONTEXT_STEPS,
    REFERENCE,
    _coords_um,
    block_folds,
    choose_head,
    head_candidates,
    selection_folds,
)

TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
        "log_every": 5}
FIT = {"preset": "tiny", "pretrain_steps": 3, "pretrain_kwargs": TINY, "fm_size_px": 64, "tile_size_um": 56.0,
       "random_state": 0, "accelerator": "cpu"}
NOISE_GENE_INDEX = 3


@pytest.fixture(scope="module")
def slides():
    """Two synthetic slides; one gene's values are permuted across tiles within each slide (pure noise)."""
    a = dbk.datasets.synthetic(shape=(1024, 1024), random_state=0)
    b = dbk.datasets.synthetic(shape=(1024, 896), random_state=1)
    out, _ = prepare_slides({"A": a, "B": b}, tile_size_um=56.0)
    rng = np.random.default_rng(0)
    for sd in out:
        t = sd.tables["dbk_table"]
        x = t.X.toarray() if sp.issparse(t.X) else np.array(t.X)
        x[:, NOISE_GENE_INDEX] = x[rng.permutation(t.n_obs), NOISE_GENE_INDEX]
        t.X = sp.csr_matrix(x) if sp.issparse(t.X) else x
    return out


@pytest.fixture(scope="module")
def pretrainer(slides):
    return dbk.tl.fit_pretrainer(slides, preset="tiny", max_steps=3, random_state=0, **TINY)


@pytest.fixture(scope="module")
def auto_model(slides, pretrainer):
    return dbk.tl.fit_diffbulk(slides, pretrainer=pretrainer, **{k: v for k, v in FIT.items()
                                                                   if not k.startswith("pretrain")})


def _common():
    return {k: v for k, v in FIT.items() if not k.startswith("pretrain")}


def test_auto_is_the_default_and_follows_the_selection_rule(slides, auto_model):
    rec = slides[0].tables["dbk_table"].uns["dbk_pred"]
    sel = rec["head_selection"]
    cands = pd.DataFrame({k: list(v) for k, v in sel["candidates"].items()})
    names = list(cands["name"])
    spacing = tile_spacing_um(*_coords_um(slides, "dbk_table"))
    assert spacing == pytest.approx(56.0, rel=0.02)  # adjacent 56 µm tiles
    # the reference first; full-rank ridge with each radius; ridge (early and late, rank="auto") without and with
    # each radius; the gated head
    assert names[0] == REFERENCE.name == sel["reference"] == "ridge"
    assert len(names) == 1 + len(AUTO_CONTEXT_STEPS) + 2 * (1 + len(AUTO_CONTEXT_STEPS)) + 1
    assert sorted(cands["options"].str.contains("late")) == [False] * 7 + [True] * 3
    assert set(cands["fusion"]) == {"ridge", "gated"}
    radii = sorted(cands["context_um"].dropna())
    assert radii == pytest.approx(sorted(3 * [s * spacing for s in AUTO_CONTEXT_STEPS]), rel=1e-3)
    # two slides: spatial blocks with a buffer, every fold scored per candidate
    assert "spatial block" in sel["scheme"] and "buffer" in sel["scheme"]
    folds = np.array([list(f) for f in cands["fold_scores"]], dtype=float)
    assert folds.shape == (len(names), 3) and np.isfinite(folds).all()
    # the rule, recomputed from the stored per-fold scores
    d = folds - folds[0]
    se = d.std(axis=1, ddof=1) / np.sqrt(d.shape[1])
    np.testing.assert_allclose(cands["difference"], d.mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(cands["se"][1:], se[1:], rtol=1e-9)
    eligible = d.mean(axis=1) > se
    eligible[0] = False
    assert list(cands["eligible"]) == list(eligible)
    best = int(np.argmax(np.where(eligible, folds.mean(axis=1), -np.inf))) if eligible.any() else 0
    assert sel["chosen"] == names[best]
    chosen = cands.iloc[best]
    assert auto_model.fusion == chosen["fusion"]
    assert auto_model.context_um == (None if np.isnan(chosen["context_um"]) else chosen["context_um"])
    assert rec["params"]["fusion_requested"] == "auto" and rec["params"]["fusion"] == chosen["fusion"]
    assert auto_model.config["head_selection"]["chosen"] == sel["chosen"]
    assert "standard error" in sel["rule"]
    # no patients given: the trust scores come from the same folds, and the record says what they cannot see
    assert sel["trust"]["scheme"] == sel["scheme"] and "no shift between slides" in sel["trust"]["can_see"]
    np.testing.assert_allclose(np.nanmean(auto_model.cv_pearson), chosen["cv_pearson_mean"], rtol=1e-9)


def test_the_rule_keeps_the_reference_unless_a_departure_wins_by_one_standard_error():
    ref = np.array([0.30, 0.20, 0.25, 0.35])
    noisy = ref + np.array([0.10, -0.08, 0.09, -0.06])  # higher mean (+0.0125), but within its spread
    steady = ref + np.array([0.02, 0.03, 0.02, 0.025])  # smaller gain, every fold
    worse = ref - 0.05
    out = choose_head(np.vstack([ref, noisy, worse]))
    assert out["chosen"] == 0 and not out["eligible"].any()
    assert out["difference"][1] == pytest.approx(0.0125) and out["se"][1] > 0.0125
    out = choose_head(np.vstack([ref, noisy, steady, worse]))
    assert out["chosen"] == 2 and list(out["eligible"]) == [False, False, True, False]
    # among those that beat the reference, the highest mean wins
    big = ref + np.array([0.05, 0.06, 0.05, 0.055])
    assert choose_head(np.vstack([ref, steady, big]))["chosen"] == 2
    # a stricter margin keeps the reference
    assert choose_head(np.vstack([ref, steady]), margin=100.0)["chosen"] == 0


def test_spatial_block_folds_hold_out_every_slide_and_keep_a_buffer():
    rng = np.random.default_rng(0)
    xy = np.vstack([np.stack(np.meshgrid(np.arange(12), np.arange(10)), -1).reshape(-1, 2) * 100.0] * 2)
    slides_of = np.repeat(["A", "B"], len(xy) // 2)
    folds = block_folds(slides_of, xy, None, 3, 100.0, random_state=int(rng.integers(100)))
    assert len(folds) == 3 and "buffer 150 µm" in folds.scheme
    held = np.concatenate([va for _, va in folds.folds])
    assert sorted(held) == list(range(len(xy)))  # each tile held out exactly once
    for tr, va in folds.folds:
        assert set(slides_of[va]) == {"A", "B"}
        assert not set(tr) & set(va)
        for s in "AB":
            a, b = xy[tr[slides_of[tr] == s]], xy[va[slides_of[va] == s]]
            dist = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(axis=1)
            assert dist.min() > 150.0  # no training tile within the buffer of a held-out tile
        assert len(tr) > 0.3 * len(xy)
    # three slides or more: whole slides held out
    three = np.repeat(["A", "B", "C"], 10)
    f3 = selection_folds(three, None, None, 3, None, 0)
    assert f3.scheme == "3-fold by slide" and sorted(f3.held_out) == ["A", "B", "C"]


def test_trust_scores_hold_out_patients_computed_by_hand(slides, pretrainer, caplog):
    model = dbk.tl.fit_diffbulk(slides, pretrainer=pretrainer, fusion="ridge", head_cv=2, key_added="dbk_ridge",
                                patients={"sample_0": "P1", "sample_1": "P2"}, **_common())
    genes, keys = model.genes, [model.fm_key, model.diff_key]
    names = list(model.config["train"]["samples"])
    assert names == ["sample_0", "sample_1"]
    train = training_table(slides, names, genes, keys, tiles_key="dbk_tiles", table_key="dbk_table")
    groups = train.obs["sample"].astype(str).to_numpy()
    per_fold = []
    for held in names:
        tr, va = train[groups != held], train[groups == held]
        scalers = [InputScaler.fit(np.asarray(tr.obsm[k])) for k in keys]
        head = dbk.tl.fit_head(scaled_table(tr, keys, scalers), use_rep=keys[0], diff_key=keys[1], genes=genes,
                               fusion="ridge", random_state=0)
        pred = head.predict(scaled_table(va, keys, scalers))[genes].to_numpy()
        y = va[:, genes].X
        y = y.toarray() if sp.issparse(y) else np.asarray(y)
        per_fold.append(dbk.tl.nan_pearson(y, pred, axis=0))
    stack = np.vstack(per_fold)
    np.testing.assert_allclose(model.cv_pearson.to_numpy(), np.nanmean(stack, axis=0), rtol=1e-6, atol=1e-9)
    trust = slides[0].tables["dbk_table"].uns["dbk_ridge"]["head_selection"]["trust"]
    assert trust["scheme"] == "2-fold by patient" and trust["can_see"] == "shifts between patients"
    # trusted: mean minus one standard error above chance, positive on both patients
    se = stack.std(axis=0, ddof=1) / np.sqrt(2)
    chance = 1 / np.sqrt(np.median([int((groups == n).sum()) for n in names]))
    assert trust["chance"] == pytest.approx(chance)
    want = (stack.mean(axis=0) - se > chance) & (stack.min(axis=0) > 0)
    np.testing.assert_array_equal(model.cv_trusted.to_numpy(), want)
    assert 0 < want.sum() < len(genes)
    # two patients: no warning that patient shifts go unseen
    assert not any("cannot see a shift between patients" in r.getMessage() for r in caplog.records)


def test_one_patient_warns_that_patient_shift_is_unseen(slides, pretrainer, caplog):
    for sd in slides:
        sd.attrs["patient"] = "P1"
    try:
        with caplog.at_level("WARNING", logger="dbk"):
            dbk.tl.fit_diffbulk(slides, pretrainer=pretrainer, fusion="ridge", key_added="dbk_one", **_common())
    finally:
        for sd in slides:
            sd.attrs.pop("patient")
    msg = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("one patient's slides" in m and "cannot see a shift between patients" in m for m in msg)


def test_a_noise_gene_gets_a_low_cv_score(slides, auto_model):
    cv = auto_model.cv_pearson
    noise = slides[0].tables["dbk_table"].var_names[NOISE_GENE_INDEX]
    others = cv.drop(noise).dropna()
    assert abs(cv[noise]) < 0.3
    assert cv[noise] < others.median()
    assert others.median() > 0.1  # the synthetic genes follow the tissue: the model predicts them


def test_predict_carries_the_scores_and_predictions_to_adata_filters(slides, auto_model, tmp_path):
    held = dbk.datasets.synthetic(shape=(768, 768), random_state=2)
    he_only = SpatialData(images={"he": held.images["he"]}, attrs={"sample": "heldout"})
    auto_model.predict(he_only)
    cv = dbk.tl.cv_pearson(he_only)
    pd.testing.assert_series_equal(cv, auto_model.cv_pearson, check_names=False)
    out = dbk.tl.predictions_to_adata(he_only)
    np.testing.assert_allclose(out.var["dbk_cv_pearson"].to_numpy(), auto_model.cv_pearson[out.var_names].to_numpy())
    thr = float(auto_model.cv_pearson.median())
    kept = dbk.tl.predictions_to_adata(he_only, min_cv_pearson=thr)
    want = [g for g in auto_model.genes if np.isfinite(cv[g]) and cv[g] >= thr]
    assert list(kept.var_names) == want and 0 < len(want) < len(auto_model.genes)
    np.testing.assert_array_equal(kept.X, out[:, want].X)
    # the score survives the predicted table's round trip and a saved model
    kept.write_h5ad(tmp_path / "pred.h5ad")
    back = dbk.tl.cv_pearson(__import__("anndata").read_h5ad(tmp_path / "pred.h5ad"))
    np.testing.assert_allclose(back.to_numpy(), cv[want].to_numpy())
    auto_model.save(tmp_path / "model")
    loaded = dbk.tl.DiffBulk.load(tmp_path / "model", device="cpu")
    pd.testing.assert_series_equal(loaded.cv_pearson, auto_model.cv_pearson)
    # the training slides carry them too (fit's record)
    pd.testing.assert_series_equal(dbk.tl.cv_pearson(slides[0]), auto_model.cv_pearson, check_names=False)


def test_plot_marks_untrusted_genes(slides, auto_model):
    cv = auto_model.cv_pearson.dropna().sort_values()
    low, high = cv.index[0], cv.index[-1]
    thr = (cv.iloc[0] + cv.iloc[-1]) / 2
    fig = dbk.pl.spatial(slides[0], [low, high], min_cv_pearson=thr, image=False, show=False, return_fig=True)
    titles = {ax.get_title(): ax.title.get_color() for ax in fig.axes if ax.get_title()}
    low_pred = next(t for t in titles if t.startswith(f"{low} predicted"))
    high_pred = next(t for t in titles if t.startswith(f"{high} predicted"))
    assert "untrusted" in low_pred and titles[low_pred] == "tab:red"
    assert "untrusted" not in high_pred and f"CV r = {cv[high]:.2f}" in high_pred


def test_head_cv_options_are_checked(slides):
    with pytest.raises(ValueError, match="head_cv"):
        dbk.tl.fit_diffbulk(slides, head_cv=0, **FIT)
    with pytest.raises(ValueError, match="head_cv"):
        dbk.tl.fit_diffbulk(slides, head_cv=1, fusion="ridge", **FIT)
    with pytest.raises(ValueError, match="need one fusion"):
        dbk.tl.fit_diffbulk(slides, rank="auto", **FIT)


def test_no_cv_scores_with_head_cv_0(slides, pretrainer):
    model = dbk.tl.fit_diffbulk(slides, pretrainer=pretrainer, fusion="ridge", head_cv=0, key_added="dbk_nocv",
                                **_common())
    assert model.cv_pearson is None
    assert "head_selection" not in slides[0].tables["dbk_table"].uns["dbk_nocv"]
    assert dbk.tl.cv_pearson(slides[0], pred_key="dbk_nocv") is None
    with pytest.raises(ValueError, match="has none"):
        dbk.tl.predictions_to_adata(slides[0], pred_key="dbk_nocv", min_cv_pearson=0.1)


def test_candidates_follow_the_options():
    one = head_candidates("gated", context_um=None, head_kwargs={"max_epochs": 5}, spacing_um=100.0)
    assert [(c.fusion, c.context_um, c.head_kwargs) for c in one] == [("gated", None, {"max_epochs": 5})]
    given = head_candidates("auto", context_um=300.0, head_kwargs={}, spacing_um=200.0)
    assert [(c.fusion, c.context_um, c.head_kwargs) for c in given] == [
        ("ridge", 300.0, {}), ("ridge", 300.0, {"rank": "auto"}), ("ridge", 300.0, {"rank": "auto", "blend": "late"}),
        ("gated", 300.0, {})]
    nospace = head_candidates("auto", context_um=None, head_kwargs={}, spacing_um=None)
    assert [(c.fusion, c.context_um, c.head_kwargs) for c in nospace] == [
        ("ridge", None, {}), ("ridge", None, {"rank": "auto"}), ("ridge", None, {"rank": "auto", "blend": "late"}),
        ("gated", None, {})]


def test_trust_flags_travel_to_predictions_plots_and_saved_models(slides, auto_model, tmp_path):
    trusted = auto_model.cv_trusted
    assert trusted is not None and 0 < trusted.sum() < len(trusted)
    held = dbk.datasets.synthetic(shape=(768, 768), random_state=2)
    he_only = SpatialData(images={"he": held.images["he"]}, attrs={"sample": "heldout"})
    auto_model.predict(he_only)
    pd.testing.assert_series_equal(dbk.tl.cv_trusted(he_only), trusted, check_names=False)
    kept = dbk.tl.predictions_to_adata(he_only, min_cv_pearson="auto")
    assert list(kept.var_names) == [g for g in auto_model.genes if trusted[g]]
    assert kept.var["dbk_cv_trusted"].all() and kept.uns["dbk"]["predictions"]["min_cv_pearson"] == "auto"
    # the effective rank of the new slide's predictions and of the training targets are recorded
    rank = he_only.tables["dbk_table"].uns["dbk"]["predict"]["effective_rank"]
    assert rank["targets"] == auto_model.effective_rank["targets"] > 0 and rank["predictions"] >= 1
    assert "prediction rank" in repr(auto_model) and f"{int(trusted.sum())}/{len(trusted)} genes trusted" in repr(
        auto_model)
    auto_model.save(tmp_path / "model")
    loaded = dbk.tl.DiffBulk.load(tmp_path / "model", device="cpu")
    pd.testing.assert_series_equal(loaded.cv_trusted, trusted)
    assert loaded.effective_rank == auto_model.effective_rank
    # the plot marks exactly the untrusted genes by default
    low = next(g for g in auto_model.genes if not trusted[g])
    high = next(g for g in auto_model.genes if trusted[g])
    fig = dbk.pl.spatial(slides[0], [low, high], image=False, show=False, return_fig=True)
    titles = {ax.get_title(): ax.title.get_color() for ax in fig.axes if ax.get_title()}
    assert titles[next(t for t in titles if t.startswith(f"{low} predicted"))] == "tab:red"
    assert "untrusted" not in next(t for t in titles if t.startswith(f"{high} predicted"))
