"""The named steps of fit_diffbulk, one test each (the whole pipeline is in test_diffbulk.py and test_golden.py)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import dbk
from dbk.pp._prepare import as_slides, prepare_slides, record_pixel_size, tile_size_um
from dbk.tl._context import neighbor_mean
from dbk.tl._fit_steps import (
    add_diffusion_features,
    choose_genes,
    fit_fusion_head,
    load_fm,
    model_tile_size,
    train_stage1,
    training_table,
    write_back,
)

TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
        "log_every": 5}


@pytest.fixture(scope="module")
def slides():
    a = dbk.datasets.synthetic(shape=(768, 768), random_state=0)
    b = dbk.datasets.synthetic(shape=(768, 640), random_state=1)
    return prepare_slides({"A": a, "B": b}, tile_size_um=56.0)


@pytest.fixture(scope="module")
def pretrainer(slides):
    s, _ = slides
    return dbk.tl.fit_pretrainer(s, preset="tiny", max_steps=3, random_state=0, **TINY)


def test_prepare_slides_names_copies_and_checks():
    sd = dbk.datasets.synthetic(shape=(512, 512), random_state=0)
    before = (set(sd.shapes), set(sd.tables))
    out, names = prepare_slides([sd, sd], tile_size_um=56.0, copy=True)
    assert (set(sd.shapes), set(sd.tables)) == before  # copy=True: the input is untouched
    assert names == ["slide0", "slide1"] and all("dbk_table" in s.tables for s in out)
    assert out[0] is not out[1] and out[0] is not sd
    assert tile_size_um(out[0]) == pytest.approx(56.0)
    assert as_slides({"x": sd})[1] == ["x"]
    with pytest.raises(TypeError, match="SpatialData"):
        as_slides([sd, "not a slide"])
    bad = out[0]
    bad.tables["dbk_table"].X = bad.tables["dbk_table"].X.astype(np.float32)
    bad.tables["dbk_table"].X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        prepare_slides(bad, tile_size_um=56.0)


def test_choose_genes_union_explicit_and_top():
    t1 = ad.AnnData(np.array([[0.0, 1, 5], [1, 1, 0]]), var=pd.DataFrame(index=["A", "B", "C"]))
    t2 = ad.AnnData(np.array([[2.0, 0], [0, 0]]), var=pd.DataFrame(index=["D", "A"]))
    assert choose_genes([t1, t2]) == ["A", "B", "C", "D"]
    assert choose_genes([t1, t2], ["D", "B"]) == ["D", "B"]
    with pytest.raises(KeyError, match="in no slide"):
        choose_genes([t1], ["Z"])
    with pytest.raises(ValueError, match="duplicates"):
        choose_genes([t1], ["A", "A"])
    assert choose_genes([t1], n_top_genes=1) == ["C"]  # the most variable


def test_load_fm_names_a_given_module():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    net.dbk_model = "my_net"
    fm = load_fm(net, size_px=32, device=torch.device("cpu"))
    assert fm.id == "my_net" and fm.key == "X_my_net" and fm.size_px == 32 and fm.net is net


def test_train_stage1_takes_a_given_model_without_training(pretrainer, slides):
    s, _ = slides
    step = pretrainer.step
    assert train_stage1(s, ["ERBB2"], pretrainer=pretrainer, tiles_key="dbk_tiles", table_key="dbk_table") \
        is pretrainer
    assert pretrainer.step == step


def test_zero_steps_gives_the_untrained_network_fit_pretrainer_starts_from(slides):
    s, _ = slides
    genes = list(s[0].tables["dbk_table"].var_names[:8])
    untrained = train_stage1(s, genes, preset="tiny", steps=0, random_state=3, tiles_key="dbk_tiles",
                             table_key="dbk_table", accelerator="cpu", pretrain_kwargs=TINY)
    assert untrained.step == 0 and not untrained.history and untrained.tile_size_um == pytest.approx(56.0, rel=0.02)
    assert list(untrained.vocab.genes) == genes
    # one step of training from the same seed starts from exactly these weights: compare the initial state that
    # fit_pretrainer builds (a 1-step fit's network before its first update is not observable, so rebuild it)
    again = train_stage1(s, genes, preset="tiny", steps=0, random_state=3, tiles_key="dbk_tiles",
                         table_key="dbk_table", accelerator="cpu", pretrain_kwargs={**TINY, "lr": 1e-3})
    for (k, a), (_, b) in zip(untrained.net.state_dict().items(), again.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    trained = dbk.tl.fit_pretrainer(s, genes=genes, preset="tiny", max_steps=1, random_state=3, **TINY)
    # the gene encoder's value statistics are set from the data when training starts (unused by the unconditioned
    # diffusion features); every weight is one small step from the untrained model's
    state = {k: v for k, v in trained.net.state_dict().items() if v.is_floating_point() and ".value_" not in k}
    assert any(not torch.equal(v, untrained.net.state_dict()[k]) for k, v in state.items())
    diff = [float((v - untrained.net.state_dict()[k]).abs().max()) for k, v in state.items()]
    assert max(diff) < 0.05  # one small step away: the same initialisation


def test_model_tile_size_is_the_median_and_warns_on_a_mismatch(pretrainer, slides, caplog):
    s, _ = slides
    assert model_tile_size(s, pretrainer, tiles_key="dbk_tiles", default_um=1.0) == pytest.approx(56.0)
    old = pretrainer.tile_size_um
    pretrainer.tile_size_um = 112.0
    try:
        with caplog.at_level(logging.WARNING, logger="dbk"):
            model_tile_size(s, pretrainer, tiles_key="dbk_tiles", default_um=1.0)
    finally:
        pretrainer.tile_size_um = old
    assert "112 µm tiles" in caplog.text


def test_diffusion_features_are_kept_when_they_match_and_recomputed_otherwise(pretrainer, slides, caplog):
    s, _ = slides
    kw = {"sigma": 0.01, "levels": None, "pool": "mean", "random_state": 0, "tiles_key": "dbk_tiles",
          "table_key": "dbk_table", "batch_size": 16, "key": "X_step_diff"}
    rec = add_diffusion_features(s, pretrainer, **kw)
    first = s[0].tables["dbk_table"].obsm["X_step_diff"]
    assert rec["dim"] == first.shape[1] and rec["precision"] == "float32"
    with caplog.at_level(logging.INFO, logger="dbk"):
        add_diffusion_features(s, pretrainer, **kw)
    assert "keeping obsm['X_step_diff']" in caplog.text
    assert s[0].tables["dbk_table"].obsm["X_step_diff"] is first  # kept, not recomputed
    add_diffusion_features(s, pretrainer, **(kw | {"random_state": 1}))
    again = s[0].tables["dbk_table"].obsm["X_step_diff"]
    assert again is not first and not np.allclose(again, first)
    dbk.tl.diffusion_features(s[0], pretrainer, random_state=1, key_added="X_step_diff", overwrite=True)
    np.testing.assert_allclose(s[0].tables["dbk_table"].obsm["X_step_diff"], again, rtol=1e-4, atol=1e-6)


def test_training_table_context_equals_the_per_slide_computation(slides):
    s, names = slides
    rng = np.random.default_rng(0)
    for sd in s:
        sd.tables["dbk_table"].obsm["X_f"] = rng.normal(size=(sd.tables["dbk_table"].n_obs, 3)).astype(np.float32)
    genes = list(s[0].tables["dbk_table"].var_names[:4])
    plain = training_table(s, names, genes, ["X_f"], tiles_key="dbk_tiles", table_key="dbk_table")
    ctx = training_table(s, names, genes, ["X_f"], tiles_key="dbk_tiles", table_key="dbk_table", context_um=120.0)
    assert plain.n_obs == sum(sd.tables["dbk_table"].n_obs for sd in s) and plain.obsm["X_f"].shape[1] == 3
    assert ctx.obsm["X_f"].shape[1] == 6
    start = 0
    for sd in s:  # the context of a slide's tiles is its own neighbourhood mean, never its neighbour slide's
        a = sd.tables["dbk_table"]
        px = record_pixel_size(sd)
        mine = neighbor_mean(np.asarray(a.obsm["spatial"]) * px, a.obsm["X_f"], 120.0)
        np.testing.assert_allclose(ctx.obsm["X_f"][start : start + a.n_obs, 3:], mine, rtol=1e-6)
        np.testing.assert_array_equal(ctx.obsm["X_f"][start : start + a.n_obs, :3], a.obsm["X_f"])
        start += a.n_obs


def test_fit_fusion_head_ridge_validates_on_a_refit_and_scales_on_all_tiles(slides):
    s, names = slides
    rng = np.random.default_rng(1)
    for sd in s:
        n = sd.tables["dbk_table"].n_obs
        sd.tables["dbk_table"].obsm["X_a"] = rng.normal(size=(n, 4)).astype(np.float32)
        sd.tables["dbk_table"].obsm["X_b"] = rng.normal(size=(n, 2)).astype(np.float32)
    genes = list(s[0].tables["dbk_table"].var_names[:5])
    train = training_table(s, names, genes, ["X_a", "X_b"], tiles_key="dbk_tiles", table_key="dbk_table")
    fitted = fit_fusion_head(train, genes, ["X_a", "X_b"], fusion="ridge", val_fraction=None, random_state=0,
                             accelerator="cpu", head_kwargs={})
    tr, va, how = fitted.split
    assert how == "held-out slides ['B']" and len(va) > 0 and len(np.intersect1d(tr, va)) == 0
    assert fitted.pred_val is not None and len(fitted.pred_val) == len(va)
    assert list(fitted.pred.columns) == genes and len(fitted.pred) == train.n_obs
    np.testing.assert_allclose(fitted.scalers[0].mean, np.asarray(train.obsm["X_a"], np.float64).mean(0), rtol=1e-6)


def test_write_back_keeps_a_first_fit_under_its_own_key(slides):
    s, names = slides
    genes = ["g1", "g2"]
    for key, value in (("pred_a", 1.0), ("pred_b", 2.0)):
        rows = [f"{n}:{o}" for n, sd in zip(names, s, strict=True) for o in sd.tables["dbk_table"].obs_names]
        pred = pd.DataFrame(value, index=rows, columns=genes)
        write_back(s, names, pred, table_key="dbk_table", key_added=key, results={"params": {"k": key}})
    a = s[1].tables["dbk_table"]
    assert (a.obsm["pred_a"].to_numpy() == 1).all() and (a.obsm["pred_b"].to_numpy() == 2).all()
    assert list(a.obsm["pred_a"].index) == list(a.obs_names)
    assert a.uns["pred_a"]["params"]["k"] == "pred_a" and a.uns["pred_b"]["params"]["k"] == "pred_b"


def test_one_slide_split_into_blocks_trains_on_train_tiles_and_predicts_all(pretrainer):
    sd = dbk.datasets.synthetic(shape=(1536, 1536), random_state=5)
    dbk.pp.prepare_slide(sd, tile_size_um=56.0)
    dbk.pp.spatial_blocks(sd, n_blocks=4, test_fraction=0.25, random_state=0)
    table = sd.tables["dbk_table"]
    split = table.obs["dbk_split"].astype(str)
    n_train, n_test = int((split == "train").sum()), int((split == "test").sum())
    assert n_train > 10 and n_test > 3
    model = dbk.tl.fit_diffbulk(sd, pretrainer=pretrainer, fm_size_px=32, tile_size_um=56.0, fusion="ridge",
                                split_key="dbk_split", random_state=0)
    assert model.config["train"]["n_tiles"] == n_train  # the head saw the training tiles only
    pred = table.obsm["dbk_pred"]
    assert pred.shape == (table.n_obs, len(model.genes)) and np.isfinite(pred.to_numpy()).all()  # every tile
    assert table.uns["dbk_pred"]["split_key"] == "dbk_split"
    res = dbk.tl.evaluate(table, split_key="dbk_split", key_added=None)
    assert res.attrs["summary"]["n_tiles"] == n_test and res.attrs["summary"]["hvg_source"] == "train_adata"
    base = dbk.tl.fit_baseline(table, "mean", use_rep="X_efficientnet_lite0", split_key="dbk_split")
    train_mean = np.asarray(table[(split == "train").to_numpy()].X.mean(axis=0)).ravel()
    cols = [list(table.var_names).index(g) for g in base.predict(table).columns]
    np.testing.assert_allclose(base.predict(table).iloc[0].to_numpy(), train_mean[cols], rtol=1e-5)
    with pytest.raises(KeyError, match="spatial_blocks"):
        dbk.tl.evaluate(table, split_key="no_such_column", key_added=None)


def test_fit_fusion_head_neural_inputs_are_scaled_once(slides):
    s, names = slides
    rng = np.random.default_rng(2)
    for sd in s:
        n = sd.tables["dbk_table"].n_obs
        sd.tables["dbk_table"].obsm["X_a"] = (50 + 10 * rng.normal(size=(n, 4))).astype(np.float32)
        sd.tables["dbk_table"].obsm["X_b"] = rng.normal(size=(n, 2)).astype(np.float32)
    genes = list(s[0].tables["dbk_table"].var_names[:5])
    train = training_table(s, names, genes, ["X_a", "X_b"], tiles_key="dbk_tiles", table_key="dbk_table")
    fitted = fit_fusion_head(train, genes, ["X_a", "X_b"], fusion="gated", val_fraction=None, random_state=0,
                             accelerator="cpu", head_kwargs={"max_epochs": 2})
    head = fitted.head
    assert head.scale_inputs is False  # DiffBulk's InputScaler is the one scaling
    assert all((m == 0).all() for m in head.x_mean_) and all((sd == 1).all() for sd in head.x_std_)
    tr = fitted.split[0]
    z = fitted.scalers[0].transform(np.asarray(train.obsm["X_a"])[tr])
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-6)  # fitted on the head's own training split


def test_cpu_default_does_not_train_stage1_and_says_so(slides, caplog):
    from dbk.tl._fit_steps import CPU_DEFAULT_NOTE, cpu_default_untrained

    s, _ = slides
    genes = list(s[0].tables["dbk_table"].var_names[:8])
    assert cpu_default_untrained("auto", None, "cpu")
    assert not cpu_default_untrained("auto", 50, "cpu") and not cpu_default_untrained("cpu-small", None, "cpu")
    with caplog.at_level(logging.INFO, logger="dbk"):
        model = train_stage1(s, genes, preset="auto", steps=None, random_state=0, tiles_key="dbk_tiles",
                             table_key="dbk_table", accelerator="cpu")
    assert model.step == 0 and not model.history and model.preset.name == "cpu-small"  # not one step trained
    assert "does not train stage 1" in caplog.text and "did not beat that untrained U-Net" in caplog.text
    # the cpu-small U-Net at its seeded initialisation: the same weights the benchmark's untrained control uses
    control = train_stage1(s, genes, preset="auto", steps=0, random_state=0, tiles_key="dbk_tiles",
                           table_key="dbk_table", accelerator="cpu")
    for (k, a), (_, b) in zip(model.net.state_dict().items(), control.net.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # asking for steps trains them, also on a CPU
    trained = train_stage1(s, genes, preset="auto", steps=2, random_state=0, tiles_key="dbk_tiles",
                           table_key="dbk_table", accelerator="cpu")
    assert trained.step == 2
    assert "200 and 500 CPU steps" in CPU_DEFAULT_NOTE
