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
from dbk.tl._fit_steps import scaled_table, training_table
from dbk.tl._head_cv import AUTO_CONTEXT_STEPS, head_candidates, neighbour_spacing_um

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


def test_auto_is_the_default_and_picks_the_best_cv_candidate(slides, auto_model):
    rec = slides[0].tables["dbk_table"].uns["dbk_pred"]
    sel = rec["head_selection"]
    cands = pd.DataFrame({k: list(v) for k, v in sel["candidates"].items()})
    names = list(cands["name"])
    spacing = neighbour_spacing_um(slides, "dbk_table")
    assert spacing == pytest.approx(56.0, rel=0.02)  # adjacent 56 µm tiles
    # ridge (early and late fusion) without context and with each context radius, the gated head
    assert len(names) == 2 * (1 + len(AUTO_CONTEXT_STEPS)) + 1
    assert sorted(cands["options"].str.contains("late")) == [False] * 4 + [True] * 3
    assert set(cands["fusion"]) == {"ridge", "gated"}
    radii = sorted(cands["context_um"].dropna())
    assert radii == pytest.approx(sorted(2 * [s * spacing for s in AUTO_CONTEXT_STEPS]), rel=1e-3)
    means = list(cands["cv_pearson_mean"])
    best = int(np.argmax(means))
    assert sel["chosen"] == names[best]
    chosen = cands.iloc[best]
    assert auto_model.fusion == chosen["fusion"]
    assert auto_model.context_um == (None if np.isnan(chosen["context_um"]) else chosen["context_um"])
    assert rec["params"]["fusion_requested"] == "auto" and rec["params"]["fusion"] == chosen["fusion"]
    samples = list(rec["params"]["samples"])
    assert sel["scheme"] == "2-fold by slide" and sorted(sel["held_out"]) == sorted(samples)
    assert auto_model.config["head_selection"]["chosen"] == sel["chosen"]
    # the chosen candidate's mean CV score is the mean of the model's per-gene scores
    assert float(np.nanmean(auto_model.cv_pearson)) == pytest.approx(chosen["cv_pearson_mean"], rel=1e-9)


def test_cv_score_is_the_held_out_slide_pearson_computed_by_hand(slides, pretrainer):
    model = dbk.tl.fit_diffbulk(slides, pretrainer=pretrainer, fusion="ridge", head_cv=2, key_added="dbk_ridge",
                                **_common())
    genes, keys = model.genes, [model.fm_key, model.diff_key]
    names = ["A", "B"]
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
    expected = np.nanmean(np.vstack(per_fold), axis=0)
    np.testing.assert_allclose(model.cv_pearson.to_numpy(), expected, rtol=1e-6, atol=1e-9)


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
        ("ridge", 300.0, {"rank": "auto"}), ("ridge", 300.0, {"rank": "auto", "blend": "late"}), ("gated", 300.0, {})]
    nospace = head_candidates("auto", context_um=None, head_kwargs={}, spacing_um=None)
    assert [(c.fusion, c.context_um) for c in nospace] == [("ridge", None), ("ridge", None), ("gated", None)]
