"""Stage 2 end to end: diffusion features, fit_diffbulk, DiffBulk.predict on an H&E-only slide, save / load."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from spatialdata import SpatialData

import dbk
from dbk.tl import DiffBulk, fit_diffbulk
from dbk.tl._diffusion_features import diffusion_features, feature_levels, tile_noise, tile_seed

# a stage-1 model small enough to train in seconds on a CPU: 16 px images, two U-Net levels of 16 / 32 channels
TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
        "log_every": 5}
# the gated head explicitly: these tests are about the neural head's path (fusion="auto" is in test_head_cv.py)
FIT = {"preset": "tiny", "pretrain_steps": 20, "pretrain_kwargs": TINY, "tile_size_um": 56.0, "fm_size_px": 96,
       "random_state": 0, "fusion": "gated"}
SHAPE = (2048, 2048)  # ~200 tiles of 56 µm


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for the module


def he_only(sdata: SpatialData, sample: str = "new") -> SpatialData:
    """The slide as a user with only an H&E scan has it: the image, nothing else."""
    return SpatialData(images={"he": sdata.images["he"]}, attrs={"sample": sample})


@pytest.fixture(scope="module")
def fitted():
    dbk.settings.progress = False
    train = dbk.datasets.synthetic(shape=SHAPE, random_state=0)
    model = fit_diffbulk(train, **FIT)
    return model, train


@pytest.fixture(scope="module")
def heldout(fitted):
    """A second synthetic slide (another seed): predicted from its H&E alone, truth from its transcripts."""
    model, _ = fitted
    full = dbk.datasets.synthetic(shape=SHAPE, random_state=1)
    new = he_only(full)
    model.predict(new)
    full.shapes["dbk_tiles"] = new.shapes["dbk_tiles"]
    dbk.pp.pseudobulk(full)
    truth = full.tables["dbk_table"]
    assert list(truth.obs_names) == list(new.tables["dbk_table"].obs_names)
    for key, value in new.tables["dbk_table"].obsm.items():
        truth.obsm[key] = value
    return new, truth


# ---- diffusion features ----------------------------------------------------------------------------------------------


def test_diffusion_features_deterministic_batch_independent_and_rng_untouched(fitted):
    model, train = fitted
    pt = model.pretrainer
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()  # noqa: NPY002
    diffusion_features(train, pt, batch_size=7, key_added="f7")
    diffusion_features(train, pt, batch_size=7, key_added="f7b")
    diffusion_features(train, pt, batch_size=64, key_added="f64")
    diffusion_features(train, pt, batch_size=64, random_state=1, key_added="seed1")
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state

    a = train.tables["dbk_table"]
    f7, f64 = a.obsm["f7"], a.obsm["f64"]
    assert f7.dtype == np.float32 and f7.shape[0] == a.n_obs and np.isfinite(f7).all()
    np.testing.assert_array_equal(f7, a.obsm["f7b"])  # same call, same numbers
    np.testing.assert_allclose(f7, f64, rtol=1e-5, atol=1e-6)  # batch composition changes round-off at most
    assert not np.array_equal(f7, a.obsm["seed1"])  # the noise is seeded: another seed, other features
    # the features of fit_diffbulk are these (same defaults)
    np.testing.assert_allclose(a.obsm["X_dbk_diff"], f64, rtol=1e-5, atol=1e-6)

    rec = a.uns["dbk"]["diffusion_features"]["f7"]
    unet = pt.ema_net.unet
    assert list(rec["levels"]) == feature_levels(unet) == ["mid", "up0", "up1"]
    # pooled widths: the mid block and each decoder block's output channels
    assert list(rec["dims"]) == [unet.mid_block.resnets[-1].out_channels,
                                 *[b.resnets[-1].out_channels for b in unet.up_blocks]]
    assert sum(rec["dims"]) == rec["dim"] == f7.shape[1]
    assert list(rec["offsets"]) == [0, *np.cumsum(rec["dims"])[:-1].tolist()]
    sides = [s[1] for s in rec["shapes"]]
    assert sides == sorted(sides) and sides[0] < sides[-1]  # several resolutions, coarsest first
    assert rec["sigma"] == 0.01 and rec["image_size"] == pt.image_size
    assert rec["um_per_px"] == pytest.approx(56.0 / 16)


def test_diffusion_features_levels_pool_and_noise(fitted):
    model, train = fitted
    pt = model.pretrainer
    sub = SpatialData(images={"he": train.images["he"]}, shapes={"dbk_tiles": train.shapes["dbk_tiles"].iloc[:12]})
    diffusion_features(sub, pt, levels=["up1"], pool="mean+std", key_added="x")
    a = sub.tables["dbk_table"]  # H&E only: a table with no genes was made
    assert a.n_vars == 0 and a.obsm["x"].shape == (12, 2 * pt.ema_net.unet.up_blocks[1].resnets[-1].out_channels)
    std_part = a.obsm["x"][:, a.obsm["x"].shape[1] // 2 :]
    assert (std_part >= 0).all()
    # a tile's noise depends on (seed, tile id) only, also for string ids
    n = tile_noise((3, 4, 4), 5, [10, "a", 11])
    torch.testing.assert_close(n[1], tile_noise((3, 4, 4), 5, ["a"])[0], rtol=0, atol=0)
    assert tile_seed(5, 10) != tile_seed(6, 10) and tile_seed(5, 10) != tile_seed(5, 11)
    with pytest.raises(ValueError, match="levels"):
        diffusion_features(sub, pt, levels=["down0"])
    with pytest.raises(ValueError, match="sigma"):
        diffusion_features(sub, pt, sigma=0)


# ---- fit and predict -------------------------------------------------------------------------------------------------


def test_fit_writes_training_predictions_and_plain_uns(fitted, tmp_path):
    model, train = fitted
    a = train.tables["dbk_table"]
    pred = a.obsm["dbk_pred"]
    assert isinstance(pred, pd.DataFrame) and pred.shape == (a.n_obs, 60)
    assert list(pred.columns) == model.genes == list(a.var_names) and (pred.index == a.obs_names).all()
    assert np.isfinite(pred.to_numpy()).all()
    assert "params" not in a.uns["dbk"]  # a fit's record is under its key_added, beside other fits'
    uns = a.uns["dbk_pred"]
    assert uns["params"]["fusion"] == "gated" and uns["params"]["pretrain_steps"] == 20
    assert len(uns["history"]["stage1"]["loss"]) == 4  # every 5 of 20 steps
    assert len(uns["history"]["head"]["val_loss"]) >= 1
    val = uns["training_metrics"]["validation"]
    assert "held-out tiles" in val["split"] and val["n_tiles"] > 10  # one slide: held-out tiles
    assert model.tile_size_um == pytest.approx(56.0) and model.fm_id == "efficientnet_lite0"
    assert model.pretrainer.step == 20 and model.history["stage1"] and model.history["head"]["val_loss"]
    a.write_h5ad(tmp_path / "t.h5ad")  # uns is plain lists / numbers / strings
    a.write_zarr(tmp_path / "t.zarr")


def test_predict_on_he_only_slide(fitted, heldout):
    model, _ = fitted
    new, _ = heldout
    a = new.tables["dbk_table"]
    assert a.n_vars == 0  # no expression on this slide
    assert len(new.shapes["dbk_tiles"]) == a.n_obs > 100  # tiles of the model's size were laid over the tissue
    side = (new.shapes["dbk_tiles"]["x1"] - new.shapes["dbk_tiles"]["x0"]).unique()
    assert list(side) == [112]  # 56 µm at 0.5 µm/px
    pred = a.obsm["dbk_pred"]
    assert pred.shape == (a.n_obs, len(model.genes)) and list(pred.columns) == model.genes
    assert np.isfinite(pred.to_numpy()).all()
    assert a.obsm["X_dbk_diff"].shape[1] == model.config["diffusion"]["dim"]
    assert a.uns["dbk"]["predict"]["pred_key"] == "dbk_pred"
    # on the tile table with the features, the head alone gives the same
    df = model.predict(a.copy())
    np.testing.assert_allclose(df.to_numpy(), pred.to_numpy(), rtol=1e-6)
    bare = a.copy()
    del bare.obsm["X_dbk_diff"]
    with pytest.raises(KeyError, match="X_dbk_diff"):
        model.predict(bare)


def test_prediction_beats_the_mean_predictor_on_a_new_slide(fitted, heldout):
    model, train = fitted
    _, truth = heldout
    truth = truth.copy()
    ours = dbk.tl.evaluate(truth, train_adata=train.tables["dbk_table"], key_added=None).attrs["summary"]
    mean = dbk.tl.fit_baseline(train.tables["dbk_table"], "mean", use_rep=model.fm_key)
    truth.obsm["mean"] = mean.predict(truth)
    floor = dbk.tl.evaluate(truth, pred_key="mean", train_adata=train.tables["dbk_table"],
                            key_added=None).attrs["summary"]
    # measured on 2 cores: MSE 1.99 vs 2.36, mean Pearson 0.43 (the mean predictor has none)
    assert ours["mse_mean_all"] < 0.92 * floor["mse_mean_all"]
    assert ours["pearson_mean_all"] > 0.2
    assert ours["spearman_per_tile_mean"] > floor["spearman_per_tile_mean"] + 0.05


def test_shared_pretrainer_and_copy(fitted):
    model, _ = fitted
    slide = dbk.datasets.synthetic(shape=(1024, 1024), random_state=3)
    before = {k: v.clone() for k, v in model.pretrainer.ema_net.state_dict().items()}
    m2 = fit_diffbulk(slide, pretrainer=model.pretrainer, genes=["ERBB2", "KRT5", "PTPRC"], tile_size_um=56.0,
                           fm=model.fm, fm_size_px=96, fusion="concat", max_epochs=5, copy=True)
    out = m2.training_data
    assert not slide.tables.keys() - {"table"} and "dbk_tiles" not in slide.shapes  # input untouched
    assert m2.pretrainer is model.pretrainer and m2.genes == ["ERBB2", "KRT5", "PTPRC"] and m2.fusion == "concat"
    for k, v in model.pretrainer.ema_net.state_dict().items():
        assert torch.equal(v, before[k]), k  # stage 1 stays frozen
    assert out.tables["dbk_table"].obsm["dbk_pred"].shape[1] == 3


def test_fit_rejects_bad_options():
    slide = dbk.datasets.synthetic(shape=(512, 512), random_state=0)
    with pytest.raises(ValueError, match="fusion"):
        fit_diffbulk(slide, fusion="sum")
    with pytest.raises(ValueError, match="val_fraction"):
        fit_diffbulk(slide, val_fraction=1.5)
    with pytest.raises(TypeError, match="SpatialData"):
        fit_diffbulk([1, 2])
    with pytest.raises(ValueError, match="max_epochs"):  # a neural-head option for the ridge head
        fit_diffbulk(slide, fusion="ridge", max_epochs=5)


# ---- the linear (ridge) fused head -----------------------------------------------------------------------------------


def _planted_fm_table(n, seed, w_seed=7, n_fm=24, n_diff=16, n_genes=6):
    """y = 1 + z_fm W + noise (W from w_seed), z_diff pure noise; four slides."""
    import anndata as ad

    w = np.random.default_rng(w_seed).normal(size=(n_fm, n_genes)) * 3 / np.sqrt(n_fm)
    r = np.random.default_rng(seed)
    z_fm, z_diff = r.normal(size=(n, n_fm)), r.normal(size=(n, n_diff))
    y = 1.0 + z_fm @ w + 0.5 * r.normal(size=(n, n_genes))
    a = ad.AnnData(X=y.astype(np.float32), var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
                   obs=pd.DataFrame({"sample": np.repeat([f"s{seed}_{k}" for k in range(4)], n // 4)},
                                    index=[f"t{seed}_{i}" for i in range(n)]))
    a.obsm["X_fm"], a.obsm["X_dbk_diff"] = z_fm, z_diff
    return a


def test_ridge_head_recovers_a_planted_linear_signal():
    import scipy.sparse as sp

    from dbk.tl._baselines import fit_baseline
    from dbk.tl._fusion import DIFFBULK_FUSIONS, RidgeFusionRegressor, fit_head

    assert "ridge" in DIFFBULK_FUSIONS
    tr, te = _planted_fm_table(320, 0), _planted_fm_table(200, 1)
    measured = np.ones(tr.shape, dtype=np.uint8)
    measured[:80, 2] = 0  # gene g2 not measured on the first slide: garbage there must not count
    tr.X[:80, 2] = 1e3
    tr.layers["measured"] = sp.csr_matrix(measured)
    head = fit_head(tr, fusion="ridge")
    assert isinstance(head, RidgeFusionRegressor) and head.obsm_keys_ == ["X_fm", "X_dbk_diff"]
    assert head.cv_scheme_ == "4-fold by slide" and head.coef_.shape == (6, 40)
    assert list(head.cv_results_.index) == pytest.approx(list(np.logspace(-2, 8, 21)))
    pred = head.predict(te).to_numpy()
    r = [np.corrcoef(pred[:, j], te.X[:, j])[0, 1] for j in range(te.n_vars)]
    assert min(r) > 0.8, r  # signal variance ~9, noise 0.25: the best possible is ~0.98
    w = np.abs(head.coef_)
    assert w[:, 24:].mean() < 0.1 * w[:, :24].mean()  # the noise block gets (almost) nothing
    # exactly the ridge_cv baseline on the concatenated features
    tr.obsm["cat"] = np.hstack([tr.obsm["X_fm"], tr.obsm["X_dbk_diff"]])
    te.obsm["cat"] = np.hstack([te.obsm["X_fm"], te.obsm["X_dbk_diff"]])
    base = fit_baseline(tr, "ridge_cv", use_rep="cat")
    assert head.alpha_ == base.alpha_
    np.testing.assert_allclose(pred, base.predict(te).to_numpy(), rtol=1e-5, atol=1e-5)
    per_gene = fit_head(tr, use_rep="X_fm", fusion="ridge", alpha_per_gene=True, n_splits=2)
    assert per_gene.alpha_.shape == (6,) and per_gene.cv_scheme_ == "2-fold by slide"


def test_late_fusion_ridge_weights_the_informative_block_and_is_one_linear_map():
    from dbk.tl._fusion import BLEND_WEIGHTS, RidgeFusionRegressor, fit_head

    tr, te = _planted_fm_table(320, 0), _planted_fm_table(200, 1)
    head = fit_head(tr, fusion="ridge", rank="auto", blend="late")
    assert isinstance(head, RidgeFusionRegressor) and head.blend == "late"
    assert len(head.blend_cv_) == len(BLEND_WEIGHTS) and head.blend_weight_ >= 0.8  # the diffusion block is noise
    assert head.cv_scheme_ == "4-fold by slide" and head.coef_.shape == (6, 40)
    # the head is w * (FM ridge) + (1 - w) * (diffusion ridge), each block's ridge fitted alone with its own CV
    w = head.blend_weight_
    parts = []
    for key, alpha, rank in zip(["X_fm", "X_dbk_diff"], head.block_alpha_, head.block_rank_, strict=True):
        alone = dbk.tl.RidgeBaseline("cv", rank="auto").fit(tr, use_rep=key)
        assert alone.alpha_ == alpha and alone.rank_ == rank
        parts.append(alone.predict(te).to_numpy(np.float64))
    np.testing.assert_allclose(head.predict(te).to_numpy(), w * parts[0] + (1 - w) * parts[1], rtol=1e-5, atol=1e-5)
    # swap the roles: now the first block is noise and the weight goes to the second
    sw_tr, sw_te = tr.copy(), te.copy()
    for a in (sw_tr, sw_te):
        a.obsm["X_fm"], a.obsm["X_dbk_diff"] = a.obsm["X_dbk_diff"], a.obsm["X_fm"]
    swapped = fit_head(sw_tr, fusion="ridge", rank="auto", blend="late")
    assert swapped.blend_weight_ <= 0.2
    r = [np.corrcoef(swapped.predict(sw_te).to_numpy()[:, j], sw_te.X[:, j])[0, 1] for j in range(te.n_vars)]
    assert min(r) > 0.8, r
    with pytest.raises(ValueError, match="blend must be one of"):
        fit_head(tr, fusion="ridge", blend="middle")
    with pytest.raises(ValueError, match="alpha_per_gene"):
        fit_head(tr, fusion="ridge", blend="late", alpha_per_gene=True)


@pytest.fixture(scope="module")
def ridge_fitted(fitted):
    """fusion="ridge" on the training slide, with the fixture's stage-1 model and FM (no stage-1 training)."""
    model, train = fitted
    ridge = fit_diffbulk(train, pretrainer=model.pretrainer, fm=model.fm, fm_size_px=96, tile_size_um=56.0,
                         fusion="ridge", random_state=0, copy=True)
    return ridge, ridge.training_data


def test_ridge_fusion_fits_and_beats_the_mean_predictor_on_a_new_slide(fitted, ridge_fitted, heldout, tmp_path):
    model, train = fitted
    ridge, out = ridge_fitted
    assert ridge.fusion == "ridge" and ridge.genes == model.genes and "fusion 'ridge'" in repr(ridge)
    a = out.tables["dbk_table"]
    assert a.obsm["dbk_pred"].shape == (a.n_obs, 60) and np.isfinite(a.obsm["dbk_pred"].to_numpy()).all()
    uns = a.uns["dbk_pred"]
    assert uns["params"]["fusion"] == "ridge" and set(uns["params"]["head"]) == {
        "alphas", "alpha_per_gene", "n_splits", "random_state", "rank", "ranks", "blend"}
    assert uns["params"]["head"]["rank"] == "None" and uns["params"]["context_um"] == "None"
    assert uns["params"]["head"]["blend"] == "early"
    assert list(uns["history"]["head"]) == ["alpha", "rank", "cv_score"] and len(uns["history"]["head"]["alpha"]) == 21
    assert set(uns["history"]["head"]["rank"]) == {0}  # plain ridge: full rank
    tm = uns["training_metrics"]
    assert "held-out tiles" in tm["validation"]["split"] and "refitted" in tm["validation"]["note"]
    assert tm["validation"]["diffbulk"]["mse_mean_all"] < tm["validation"]["mean"]["mse_mean_all"]
    assert tm["head_inner_cv"]["scheme"] == "5-fold by spatial stripe"  # one slide: stripes of it
    a.write_h5ad(tmp_path / "t.h5ad")  # uns stays plain

    _, truth = heldout
    truth = truth.copy()
    ridge.predict(truth)  # the tile table holds the FM and diffusion features (same stage-1 model, sigma, seed)
    ours = dbk.tl.evaluate(truth, train_adata=train.tables["dbk_table"], key_added=None).attrs["summary"]
    mean = dbk.tl.fit_baseline(train.tables["dbk_table"], "mean", use_rep=model.fm_key)
    truth.obsm["mean"] = mean.predict(truth)
    floor = dbk.tl.evaluate(truth, pred_key="mean", train_adata=train.tables["dbk_table"],
                            key_added=None).attrs["summary"]
    assert ours["mse_mean_all"] < 0.92 * floor["mse_mean_all"]
    assert ours["pearson_mean_all"] > 0.2
    assert ours["spearman_per_tile_mean"] > floor["spearman_per_tile_mean"] + 0.05


def test_late_fusion_head_in_fit_diffbulk_saves_and_loads_exactly(fitted, heldout, tmp_path):
    model, train = fitted
    late = fit_diffbulk(train, pretrainer=model.pretrainer, fm=model.fm, fm_size_px=96, tile_size_um=56.0,
                             fusion="ridge", rank="auto", blend="late", context_um=120.0, random_state=0, copy=True)
    out = late.training_data
    assert late.head.blend == "late" and 0.0 <= late.head.blend_weight_ <= 1.0
    inner = out.tables["dbk_table"].uns["dbk_pred"]["training_metrics"]["head_inner_cv"]
    assert inner["blend"] == "late" and inner["fm_weight"] == late.head.blend_weight_
    new, _ = heldout
    new = SpatialData(images={"he": new.images["he"]}, attrs={"sample": "late"})
    late.predict(new)
    loaded = DiffBulk.load(late.save(tmp_path / "late"), device="cpu")
    assert loaded.head.blend == "late" and loaded.head.blend_weight_ == late.head.blend_weight_
    assert loaded.head.block_rank_ == late.head.block_rank_ and loaded.head.block_alpha_ == late.head.block_alpha_
    again = SpatialData(images={"he": new.images["he"]}, attrs={"sample": "late"})
    loaded.predict(again)
    np.testing.assert_array_equal(again.tables["dbk_table"].obsm["dbk_pred"].to_numpy(),
                                  new.tables["dbk_table"].obsm["dbk_pred"].to_numpy())


def test_reduced_rank_ridge_with_spatial_context_round_trips_and_predicts(fitted, ridge_fitted, heldout, tmp_path):
    model, train = fitted
    rr = fit_diffbulk(train, pretrainer=model.pretrainer, fm=model.fm, fm_size_px=96, tile_size_um=56.0,
                           fusion="ridge", rank="auto", context_um=120.0, random_state=0, copy=True)
    out = rr.training_data
    plain = ridge_fitted[0]
    assert rr.context_um == 120.0 and rr.head.rank_ in (1, 2, 3, 5, 10, 20, 50, None)
    fm_dim, diff_dim = plain.head.n_features_in_
    assert rr.head.n_features_in_ == [2 * fm_dim, 2 * diff_dim]  # [features, their neighbourhood mean]
    uns = out.tables["dbk_table"].uns["dbk_pred"]
    assert uns["params"]["context_um"] == 120.0 and uns["params"]["head"]["rank"] == "auto"
    px = dbk.pp._prepare.record_pixel_size(out, "dbk_tiles", "dbk_table")
    assert out.tables["dbk_table"].uns["dbk"]["um_per_px"] == pytest.approx(px)
    cv = rr.head.cv_results_
    assert cv.index.names == ["rank", "alpha"] and len(cv) == 8 * 21
    # H&E only: tiles, features, pixel size and the context all come from the image
    new, truth = heldout
    new = SpatialData(images={"he": new.images["he"]}, attrs={"sample": "again"})
    rr.predict(new)
    pred = new.tables["dbk_table"].obsm["dbk_pred"]
    from dbk._image import get_pixel_size

    assert new.tables["dbk_table"].uns["dbk"]["um_per_px"] == pytest.approx(get_pixel_size(new, "he"))
    # the same tiles as a table: the context needs the pixel size, named in the error when it is missing
    table = truth.copy()
    table.uns.get("dbk", {}).pop("um_per_px", None)  # dbk.pp.pseudobulk records it now; a table without it
    with pytest.raises(ValueError, match="um_per_px"):
        rr.predict(table)
    table.uns.setdefault("dbk", {})["um_per_px"] = new.tables["dbk_table"].uns["dbk"]["um_per_px"]
    np.testing.assert_allclose(rr.predict(table).to_numpy(), pred.to_numpy(), rtol=1e-5, atol=1e-5)
    # save / load: identical predictions
    loaded = DiffBulk.load(rr.save(tmp_path / "rr"), device="cpu")
    assert loaded.context_um == 120.0 and loaded.head.rank_ == rr.head.rank_
    pd.testing.assert_frame_equal(loaded.head.cv_results_, cv)
    np.testing.assert_array_equal(loaded.predict(table.copy()).to_numpy(), rr.predict(table.copy()).to_numpy())
    # it predicts the held-out slide better than the training mean
    truth = truth.copy()
    rr.predict(table, key_added="dbk_pred")
    truth.obsm["dbk_pred"] = table.obsm["dbk_pred"]
    ours = dbk.tl.evaluate(truth, train_adata=train.tables["dbk_table"], key_added=None).attrs["summary"]
    assert ours["pearson_mean_all"] > 0.2
    with pytest.raises(ValueError, match="context_um"):
        fit_diffbulk(train, pretrainer=model.pretrainer, fm=model.fm, fusion="ridge", context_um=-1.0, copy=True)


def test_refit_reuses_diffusion_features_only_when_they_match(fitted, dbk_log):
    import logging

    model, _ = fitted
    slide = dbk.datasets.synthetic(shape=(1024, 1024), random_state=3)
    kw = {"pretrainer": model.pretrainer, "fm": model.fm, "fm_size_px": 96, "tile_size_um": 56.0, "fusion": "ridge",
          "random_state": 0}
    fit_diffbulk(slide, **kw)
    first = np.asarray(slide.tables["dbk_table"].obsm["X_dbk_diff"]).copy()
    dbk_log.set_level(logging.INFO, logger="dbk")
    dbk_log.clear()
    fit_diffbulk(slide, rank="auto", **kw)  # another head, same features: reused
    assert "keeping obsm['X_dbk_diff']" in dbk_log.text
    np.testing.assert_array_equal(slide.tables["dbk_table"].obsm["X_dbk_diff"], first)
    dbk_log.clear()
    fit_diffbulk(slide, sigma=0.05, **kw)  # other noise level: recomputed, and different
    assert "keeping obsm['X_dbk_diff']" not in dbk_log.text
    assert not np.array_equal(slide.tables["dbk_table"].obsm["X_dbk_diff"], first)


@pytest.fixture(scope="module")
def saved_ridge(ridge_fitted, tmp_path_factory):
    return ridge_fitted[0].save(tmp_path_factory.mktemp("ridge") / "m")


def test_ridge_save_load_round_trips_exactly_and_refuses_corrupt_heads(ridge_fitted, saved_ridge, heldout, tmp_path):
    from safetensors.torch import load_file, save_file

    from dbk.core._folder import sha256_file as _sha256

    ridge = ridge_fitted[0]
    assert sorted(p.name for p in saved_ridge.iterdir()) == ["config.json", "head.safetensors", "history.json",
                                                              "pretrainer"]
    cfg = json.loads((saved_ridge / "config.json").read_text())
    assert cfg["fusion"] == cfg["head"]["fusion"] == "ridge" and cfg["head"]["alpha"] == ridge.head.alpha_
    loaded = DiffBulk.load(saved_ridge, device="cpu")
    h0, h1 = ridge.head, loaded.head
    for k in ("x_mean_", "x_scale_", "coef_", "intercept_"):
        np.testing.assert_array_equal(getattr(h1, k), getattr(h0, k))
    assert h1.alpha_ == h0.alpha_ and h1.cv_scheme_ == h0.cv_scheme_ and loaded.history["head"] == ridge.history["head"]
    pd.testing.assert_frame_equal(h1.cv_results_, h0.cv_results_)
    for s0, s1 in zip(ridge.scalers, loaded.scalers, strict=True):
        np.testing.assert_array_equal(s1.mean, s0.mean)
        np.testing.assert_array_equal(s1.scale, s0.scale)
    _, truth = heldout
    np.testing.assert_array_equal(loaded.predict(truth.copy()).to_numpy(), ridge.predict(truth.copy()).to_numpy())
    assert repr(loaded) == repr(ridge)

    def variant(name, tensors=None, config=None):
        d = tmp_path / name
        shutil.copytree(saved_ridge, d)
        c = json.loads((d / "config.json").read_text())
        if tensors is not None:
            t = load_file(d / "head.safetensors")
            tensors(t)
            save_file(t, d / "head.safetensors", metadata={"format": "dbk.DiffBulk"})
            c["sha256"]["head.safetensors"] = _sha256(d / "head.safetensors")
        if config is not None:
            config(c)
        (d / "config.json").write_text(json.dumps(c))
        return d

    d = variant("flipped")
    raw = bytearray((d / "head.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (d / "head.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        DiffBulk.load(d)
    with pytest.raises(ValueError, match="does not fit 59 genes"):
        DiffBulk.load(variant("genes", config=lambda c: c.update(genes=c["genes"][:-1])))
    with pytest.raises(ValueError, match="lacks the tensors"):
        DiffBulk.load(variant("no_coef", tensors=lambda t: t.pop("ridge.coef")))
    with pytest.raises(ValueError, match="does not fit"):
        DiffBulk.load(variant("narrow", tensors=lambda t: t.update({"ridge.coef": t["ridge.coef"][:, 1:].clone()})))
    with pytest.raises(ValueError, match="corrupt ridge head"):
        DiffBulk.load(variant("nan", tensors=lambda t: t["ridge.intercept"].__setitem__(0, float("nan"))))
    with pytest.raises(ValueError, match="corrupt ridge head"):
        DiffBulk.load(variant("shape", tensors=lambda t: t.update({"ridge.x_mean": t["ridge.x_mean"][1:].clone()})))
    with pytest.raises(ValueError, match="does not fit the model's fusion"):
        DiffBulk.load(variant("fusion", config=lambda c: c.update(fusion="gated")))
    with pytest.raises(ValueError, match="ridge head settings"):
        DiffBulk.load(variant("settings", config=lambda c: c["head"].pop("alphas")))


# ---- save / load -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(fitted, tmp_path_factory):
    model, _ = fitted
    return model.save(tmp_path_factory.mktemp("model") / "m")


def test_save_load_in_a_fresh_process_gives_identical_predictions(fitted, saved, ridge_fitted, saved_ridge,
                                                                  tmp_path):
    model, _ = fitted
    slide = dbk.datasets.synthetic(shape=(1024, 1024), random_state=2)
    new = he_only(slide)
    model.predict(new)
    ours = new.tables["dbk_table"].obsm["dbk_pred"]
    ours_ridge = ridge_fitted[0].predict(new.tables["dbk_table"].copy())  # same stage-1 model: same features
    files = sorted(p.name for p in saved.iterdir())
    assert files == ["config.json", "head.safetensors", "history.json", "pretrainer"]
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["format"] == "dbk.DiffBulk" and cfg["dbk_version"] == dbk.__version__
    assert cfg["genes"] == model.genes and cfg["fm"]["id"] == "efficientnet_lite0" and cfg["fusion"] == "gated"
    assert cfg["tile_size_um"] == pytest.approx(56.0)

    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        torch.set_num_threads(1)
        import dbk
        from spatialdata import SpatialData
        from dbk.tl import DiffBulk
        dbk.settings.progress = False
        model = DiffBulk.load({str(saved)!r}, device="cpu")
        slide = dbk.datasets.synthetic(shape=(1024, 1024), random_state=2)
        new = SpatialData(images={{"he": slide.images["he"]}})
        model.predict(new)
        p = new.tables["dbk_table"].obsm["dbk_pred"]
        np.save({str(tmp_path / "p.npy")!r}, p.to_numpy())
        ridge = DiffBulk.load({str(saved_ridge)!r}, device="cpu")
        np.save({str(tmp_path / "r.npy")!r}, ridge.predict(new.tables["dbk_table"]).to_numpy())
        print(",".join(p.columns))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1].split(",") == model.genes
    theirs = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(theirs, ours.to_numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), ours_ridge.to_numpy(), rtol=1e-6, atol=1e-6)


def test_load_fails_clearly_on_corrupt_or_mismatched_folders(fitted, saved, tmp_path):
    def variant(name):
        d = tmp_path / name
        shutil.copytree(saved, d)
        return d

    with pytest.raises(FileNotFoundError, match="not a folder"):
        DiffBulk.load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DiffBulk.load(empty)

    d = variant("corrupt_head")
    raw = bytearray((d / "head.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (d / "head.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        DiffBulk.load(d)

    d = variant("missing")
    (d / "history.json").unlink()
    with pytest.raises(ValueError, match="missing"):
        DiffBulk.load(d)

    d = variant("bad_json")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        DiffBulk.load(d)

    def edit(name, fn):
        d = variant(name)
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(ValueError, match="newer dbk"):
        DiffBulk.load(edit("newer", lambda c: c.update(format_version=99)))
    with pytest.raises(ValueError, match="not a dbk.DiffBulk"):
        DiffBulk.load(edit("other", lambda c: c.update(format="dbk.DiffusionPretrainer")))
    with pytest.raises(ValueError, match="does not fit 59 genes"):
        DiffBulk.load(edit("genes", lambda c: c.update(genes=c["genes"][:-1])))

    # another stage-1 model in place of the one the head was trained on
    d = variant("swapped")
    shutil.rmtree(d / "pretrainer")
    other = dbk.tl.DiffusionPretrainer(fitted[0].pretrainer.genes, preset="tiny", random_state=7, **TINY)
    other.save(d / "pretrainer")
    with pytest.raises(ValueError, match="corrupt or was changed"):
        DiffBulk.load(d)
    d = edit("swapped_resummed", lambda c: None)
    shutil.rmtree(d / "pretrainer")
    other.save(d / "pretrainer")
    from dbk.core._folder import sha256_file as _sha256

    cfg = json.loads((d / "config.json").read_text())
    cfg["sha256"] = {f: _sha256(d / f) for f in cfg["sha256"]}  # every file re-summed: the weights alone differ
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="another stage-1 model"):
        DiffBulk.load(d)

    loaded = DiffBulk.load(saved)  # the original still loads
    assert loaded.genes == fitted[0].genes and repr(loaded) == repr(fitted[0])


def test_saved_model_files_follow_the_umask_like_any_other_file(saved):
    import os

    old = os.umask(0)
    os.umask(old)
    for f in saved.rglob("*"):  # weights as well as config.json: colleagues on a shared folder can load the model
        want = (0o777 if f.is_dir() else 0o666) & ~old
        assert f.stat().st_mode & 0o777 == want, f
