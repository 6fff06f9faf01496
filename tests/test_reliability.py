"""Reliability of the model-level API (issue 7): bad tables, files and arguments give clear errors before any
training; ``copy=True`` never mutates the input and ``copy=False`` changes only the documented slots; a fit is
reproducible across processes; an interrupted model save leaves the previous folder intact."""

from __future__ import annotations

import copy as _copy
import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import get_transformation

import dbk
from dbk.tl import DiffBulk, fit_diffbulk

# a fit of a few seconds on one CPU core: a 512 px slide (47 tiles of 28 µm), 16 px stage 1, 32 px FM input
TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 2,
        "log_every": 5}
FIT = {"preset": "tiny", "pretrain_steps": 3, "pretrain_kwargs": TINY, "tile_size_um": 28.0, "fm_size_px": 32,
       "fusion": "gated", "max_epochs": 3, "random_state": 0}
SLIDE = {"shape": (512, 512), "n_genes": 8}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores; and the determinism test compares with a one-thread subprocess
    yield
    torch.set_num_threads(old)



def _slide(seed: int = 0) -> SpatialData:
    return dbk.datasets.synthetic(**SLIDE, random_state=seed)


def _he_only(sdata: SpatialData) -> SpatialData:
    return SpatialData(images={"he": sdata.images["he"]})


def _tiled(seed: int = 0) -> SpatialData:
    s = _slide(seed)
    dbk.pp.make_tiles(s, tile_size_um=28.0)
    dbk.pp.pseudobulk(s)
    return s


# ---- snapshots of a SpatialData / AnnData, to see what a call changed ------------------------------------------------


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.array(x, copy=True)


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flat(f"{prefix}/{k}", v, out)
    else:
        out[prefix] = _copy.deepcopy(value)


def _table_snapshot(prefix: str, a, out: dict) -> None:
    out[f"{prefix}/X"] = _dense(a.X)
    out[f"{prefix}/obs"] = a.obs.copy()
    out[f"{prefix}/var"] = a.var.copy()
    for k in a.obsm:
        v = a.obsm[k]
        out[f"{prefix}/obsm/{k}"] = v.copy() if isinstance(v, pd.DataFrame) else _dense(v)
    for k in a.layers:
        if k is not None:  # anndata >= 0.13 also lists X as layers[None]; X is snapshotted above
            out[f"{prefix}/layers/{k}"] = _dense(a.layers[k])
    _flat(f"{prefix}/uns", dict(a.uns), out)


def snapshot(data) -> dict:
    """Flat ``{path: copy}`` of everything dbk could write: tables (X, obs, var, obsm, layers, uns), shapes (and
    their attrs), labels, the keys, columns and transformations of images and points, ``attrs``."""
    out: dict = {}
    if not isinstance(data, SpatialData):
        _table_snapshot("table", data, out)
        return out
    for k, a in data.tables.items():
        _table_snapshot(f"tables/{k}", a, out)
    for k, g in data.shapes.items():
        out[f"shapes/{k}"] = g.copy()
        _flat(f"shapes/{k}/attrs", dict(g.attrs), out)
        out[f"shapes/{k}/transform"] = repr(get_transformation(g, get_all=True))
    for k, lab in data.labels.items():
        out[f"labels/{k}"] = np.asarray(lab.data)
        out[f"labels/{k}/transform"] = repr(get_transformation(lab, get_all=True))
    for k, p in data.points.items():
        out[f"points/{k}"] = (list(p.columns), p.npartitions, repr(get_transformation(p, get_all=True)))
    for k, im in data.images.items():
        out[f"images/{k}"] = repr(get_transformation(im, get_all=True))
    _flat("attrs", dict(data.attrs), out)
    return out


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, pd.DataFrame):  # GeoDataFrames too
        return a.shape == b.shape and list(a.columns) == list(b.columns) and a.index.equals(b.index) and a.equals(b)
    if isinstance(a, np.ndarray):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and np.isnan(a):
        return np.isnan(b)
    return bool(a == b)


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if k not in before or k not in after
            or not _same(before[k], after[k])}


def assert_only(before: dict, after: dict, allowed: tuple[str, ...]) -> None:
    diff = changed(before, after)
    assert diff, "nothing was written"
    extra = sorted(k for k in diff if not k.startswith(allowed))
    assert not extra, f"undocumented changes: {extra}"


# ---- a tiny fitted model (fit with copy=True: the input must stay as it was) ----------------------------------------


@pytest.fixture(scope="module")
def fitted():
    dbk.settings.progress = False
    train = _slide(0)
    before = snapshot(train)
    model = fit_diffbulk(train, copy=True, **FIT)
    out = model.training_data
    return model, train, before, out


# ---- copy=True never mutates, copy=False changes only the documented slots ------------------------------------------


def test_copy_true_never_mutates_the_input(fitted):
    model, train, before, out = fitted
    assert not changed(before, snapshot(train)), "fit_diffbulk(copy=True) changed its input"
    assert "dbk_table" in out.tables and "dbk_table" not in train.tables

    s = _slide(0)
    calls = [
        ("tissue_mask", s, lambda d: dbk.pp.tissue_mask(d, copy=True)),
        ("make_tiles", s, lambda d: dbk.pp.make_tiles(d, tile_size_um=28.0, copy=True)),
    ]
    tiled = dbk.pp.make_tiles(s, tile_size_um=28.0, copy=True)
    calls += [("pseudobulk", tiled, lambda d: dbk.pp.pseudobulk(d, copy=True))]
    table = dbk.pp.pseudobulk(tiled, copy=True)
    calls += [
        ("normalize", table.tables["dbk_table"], lambda a: dbk.pp.normalize(a, target_sum=100, copy=True)),
        ("embed_tiles", table, lambda d: dbk.tl.embed_tiles(d, fm_size_px=32, batch_size=16, copy=True)),
        ("diffusion_features", table, lambda d: dbk.tl.diffusion_features(d, model.pretrainer, copy=True)),
        ("predict", table, lambda d: model.predict(d, copy=True)),
        ("predict (he only)", _he_only(s), lambda d: model.predict(d, copy=True)),
        ("predict (table)", out.tables["dbk_table"], lambda a: model.predict(a, key_added="again", copy=True)),
    ]
    for name, data, call in calls:
        snap = snapshot(data)
        result = call(data)
        assert result is not None and result is not data, name
        assert not changed(snap, snapshot(data)), f"{name}(copy=True) changed its input: " \
                                                  f"{sorted(changed(snap, snapshot(data)))}"
        if not isinstance(result, pd.DataFrame):  # predict on a table returns the predictions
            assert changed(snap, snapshot(result)), f"{name}(copy=True) returned an unchanged copy"


def test_copy_false_changes_only_documented_slots(fitted):
    model, _, _, out = fitted
    s = _slide(0)
    b = snapshot(s)
    assert dbk.pp.tissue_mask(s) is None
    assert_only(b, snapshot(s), ("labels/dbk_tissue",))
    b = snapshot(s)
    dbk.pp.make_tiles(s, tile_size_um=28.0)
    assert_only(b, snapshot(s), ("shapes/dbk_tiles",))
    b = snapshot(s)
    dbk.pp.pseudobulk(s)
    assert_only(b, snapshot(s), ("tables/dbk_table",))
    a = s.tables["dbk_table"]
    b = snapshot(a)
    dbk.pp.normalize(a, target_sum=100)
    assert_only(b, snapshot(a), ("table/X", "table/uns/dbk/normalize"))
    b = snapshot(s)
    dbk.tl.embed_tiles(s, fm_size_px=32, batch_size=16)
    assert_only(b, snapshot(s), ("tables/dbk_table/obsm/X_efficientnet_lite0",
                                 "tables/dbk_table/uns/dbk/embeddings/X_efficientnet_lite0"))
    b = snapshot(s)
    dbk.tl.diffusion_features(s, model.pretrainer)
    assert_only(b, snapshot(s), ("tables/dbk_table/obsm/X_dbk_diff",
                                 "tables/dbk_table/uns/dbk/diffusion_features/X_dbk_diff"))
    b = snapshot(s)
    model.predict(s)
    assert_only(b, snapshot(s), ("tables/dbk_table/obsm/dbk_pred", "tables/dbk_table/obsm/X_efficientnet_lite0",
                                 "tables/dbk_table/obsm/X_dbk_diff", "tables/dbk_table/uns/dbk/"))
    a = out.tables["dbk_table"].copy()
    b = snapshot(a)
    model.predict(a, key_added="again")
    assert_only(b, snapshot(a), ("table/obsm/again", "table/uns/dbk/predict"))


# ---- determinism: same seed, same predictions, in another process ---------------------------------------------------


def test_same_seed_same_predictions_in_a_separate_process(fitted, tmp_path):
    model, _, _, out = fitted
    new = _he_only(_slide(1))
    model.predict(new)
    ours = new.tables["dbk_table"].obsm["dbk_pred"]
    script = textwrap.dedent(f"""
        import numpy as np, torch
        torch.set_num_threads(1)
        import dbk
        from spatialdata import SpatialData
        dbk.settings.progress = False
        train = dbk.datasets.synthetic(**{SLIDE!r}, random_state=0)
        model = dbk.tl.fit_diffbulk(train, **{FIT!r})
        new = SpatialData(images={{"he": dbk.datasets.synthetic(**{SLIDE!r}, random_state=1).images["he"]}})
        model.predict(new)
        np.save({str(tmp_path / "new.npy")!r}, new.tables["dbk_table"].obsm["dbk_pred"].to_numpy())
        np.save({str(tmp_path / "train.npy")!r}, train.tables["dbk_table"].obsm["dbk_pred"].to_numpy())
        print(",".join(model.genes))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1].split(",") == model.genes
    np.testing.assert_array_equal(np.load(tmp_path / "new.npy"), ours.to_numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "train.npy"), out.tables["dbk_table"].obsm["dbk_pred"].to_numpy())


# ---- an interrupted model save leaves the previous folder intact ----------------------------------------------------


def test_interrupted_model_save_keeps_the_previous_folder(fitted, tmp_path, monkeypatch):
    model = fitted[0]
    path = model.save(tmp_path / "model")
    files = {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

    def interrupted(target, *a, **k):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{half")
        raise KeyboardInterrupt

    monkeypatch.setattr(model.pretrainer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save(path, overwrite=True)
    monkeypatch.undo()
    assert {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} == files
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind
    assert DiffBulk.load(path, device="cpu").genes == model.genes


# ---- expression tables fit cannot use: clear errors before any embedding or training ---------------------------------


def _no_work(sdata: SpatialData) -> None:
    a = sdata.tables["dbk_table"]
    assert not any(k.startswith("X_") for k in a.obsm), "features were computed before the error"


def test_fit_refuses_bad_gene_names_and_targets():
    s = _tiled()
    a = s.tables["dbk_table"]
    names = list(a.var_names)
    a.var_names = [names[0], *names[:-1]]
    with pytest.raises(ValueError, match=rf"table 'dbk_table' of slide 'sample' has duplicate gene names "
                                         rf"\['{names[0]}'"):
        fit_diffbulk(s, **FIT)
    _no_work(s)
    a.var_names = pd.Index(range(a.n_vars))  # integer gene ids
    with pytest.raises(TypeError, match=r"has 8 gene name\(s\) that are not non-empty strings \(e.g. \[0, 1"):
        fit_diffbulk(s, **FIT)
    a.var_names = names
    x = a.X.toarray()
    x[3, 2] = np.inf
    a.X = x
    with pytest.raises(ValueError, match=r"Table 'dbk_table' of slide 'sample': X .* 1 NaN or infinite values"):
        fit_diffbulk(s, **FIT)
    x[3, 2] = np.nan
    a.X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_diffbulk(s, **FIT)
    _no_work(s)


def test_tile_table_not_linked_to_its_shapes():
    s = _tiled()
    a = s.tables["dbk_table"]
    good = a.obs.copy()
    a.obs["region"] = pd.Categorical(["cells"] * a.n_obs)
    with pytest.raises(ValueError, match=r"Table 'dbk_table' is not linked to the tiles 'dbk_tiles': it annotates "
                                         r"\['cells'\].*TableModel.parse"):
        fit_diffbulk(s, **FIT)
    a.obs = good.copy()
    a.obs["instance_id"] = a.obs["instance_id"] + 1000
    with pytest.raises(ValueError, match=r"47 of 47 rows of table 'dbk_table' match no tile of 'dbk_tiles' by "
                                         r"obs\['instance_id'\] \(e.g. \[1000"):
        dbk.tl.embed_tiles(s, fm_size_px=32)
    a.obs = good.copy()
    a.obs["instance_id"] = 0
    with pytest.raises(ValueError, match="46 rows of table 'dbk_table' point to a tile of 'dbk_tiles' that an earlier "
                                         "row already has"):
        fit_diffbulk(s, **FIT)
    # no spatialdata attributes at all: matched by obs_names, which here are not tile ids
    a.obs = good.drop(columns=["region", "instance_id"])
    del a.uns["spatialdata_attrs"]
    a.obs_names = [f"t{i}" for i in range(a.n_obs)]
    with pytest.raises(ValueError, match=r"by obs_names \(the table has no instance key\)"):
        fit_diffbulk(s, **FIT)
    _no_work(s)
    # obs_names that are the tile ids are enough
    a.obs_names = [str(i) for i in range(a.n_obs)]
    dbk.tl.embed_tiles(s, fm_size_px=32)
    assert a.obsm["X_efficientnet_lite0"].shape[0] == a.n_obs


def test_tile_dataset_with_duplicate_instance_ids_names_the_table():
    s = _tiled()
    s.tables["dbk_table"].obs["instance_id"] = 0
    with pytest.raises(ValueError, match="dbk_table"):
        dbk.pp.TileDataset(s, table_key="dbk_table")


def test_panel_with_no_gene_of_the_model(fitted, dbk_log):
    model, _, _, out = fitted
    a = out.tables["dbk_table"].copy()
    a.var_names = [f"OTHER{i}" for i in range(a.n_vars)]
    with dbk_log.at_level(logging.WARNING, logger="dbk"):
        df = model.predict(a, key_added="p")
    assert list(df.columns) == model.genes and df.shape[0] == a.n_obs  # predictions from the image, as always
    assert "include none of the model's 8 genes" in dbk_log.text
    with pytest.raises(ValueError, match=r"No predicted gene of obsm\['p'\] is in the table"):
        dbk.tl.evaluate(a, pred_key="p")
    # the gene encoder of stage 1 (profiles -> images) refuses such a panel outright
    with pytest.raises(ValueError, match="no gene of the model's vocabulary"):
        model.pretrainer.generate(pd.DataFrame(np.ones((2, 3)), columns=["X1", "X2", "X3"]), n_steps=2)
    with pytest.raises(ValueError, match=r"The profile has no gene of the model's vocabulary \(2 genes given"):
        dbk.tl.GeneVocab(["A", "B"]).lookup(["C", "D"])


# ---- API misuse: caught before any work ------------------------------------------------------------------------------


def test_api_misuse_is_caught_before_any_work(fitted):
    model = fitted[0]
    s = _slide(0)
    for kw, err, msg in [
        ({"preset": "huge"}, ValueError,
         r"Unknown preset 'huge'; choose one of \['cpu-small', 'gpu', 'paper', 'tiny'\] or 'auto'"),
        ({"fusion": "sum"}, ValueError,
         "Unknown fusion 'sum'; options: 'auto', 'gated', 'concat', 'add', 'film', 'ridge'"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer, got 0"),
        ({"batch_size": -3}, ValueError, "batch_size must be a positive integer, got -3"),
        ({"pretrain_kwargs": {"batch_size": 0}}, ValueError, r"pretrain_kwargs\['batch_size'\] must be a positive"),
        ({"tile_size_um": 0}, ValueError, "tile_size_um must be a positive number, got 0"),
        ({"tile_size_um": -112.0}, ValueError, "tile_size_um must be a positive number"),
    ]:
        with pytest.raises(err, match=msg):
            fit_diffbulk(s, **(FIT | kw))
        assert "dbk_tiles" not in s.shapes, kw  # nothing was made
    with pytest.raises(ValueError, match="Unknown model 'no_such_model'"):
        fit_diffbulk(s, **(FIT | {"fm": "no_such_model"}))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        model.predict(_he_only(s), batch_size=0)
    blank = _he_only(s)  # glass only: no tissue, so no tile to predict
    blank.images["he"] = Image2DModel.parse(np.full((3, 512, 512), 245, np.uint8), dims=("c", "y", "x"))
    dbk.io.set_pixel_size(blank, "he", pixel_size_um=0.5)
    with pytest.raises(ValueError, match=r"No tile of 56 px has tissue fraction >= 0.5 in image 'he' \(max 0.00\)"):
        model.predict(blank)
    t = _tiled()
    for call in (lambda: dbk.tl.embed_tiles(t, batch_size=0), lambda: dbk.tl.diffusion_features(t, model.pretrainer,
                                                                                                 batch_size=-1)):
        with pytest.raises(ValueError, match="batch_size must be positive"):
            call()
    for kw, msg in [({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
                    ({"image_size": -16}, "image_size must be a positive integer"),
                    ({"lr": 0.0}, "lr must be positive")]:
        with pytest.raises(ValueError, match=msg):
            dbk.tl.get_preset("tiny", **kw)
    with pytest.raises(ValueError, match="Unknown preset fields"):
        dbk.tl.get_preset("tiny", bach_size=8)


def test_fit_pretrainer_refuses_batch_size_le_0():
    s = _tiled()
    with pytest.raises(ValueError, match="batch_size"):
        dbk.tl.fit_pretrainer(s, preset="tiny", max_steps=1, batch_size=0, **{k: v for k, v in TINY.items()
                                                                              if k != "batch_size"})


def test_generate_refuses_batch_size_le_0(fitted):
    model = fitted[0]
    profiles = fitted[3].tables["dbk_table"][:2]
    with pytest.raises(ValueError, match="batch_size"):
        model.pretrainer.generate(profiles, n_steps=2, batch_size=0)


# ---- files: checkpoints from another version, with other genes, truncated -------------------------------------------


def test_stage1_checkpoints_and_saved_models_that_do_not_fit(tmp_path):
    s = _tiled()
    kw = {"preset": "tiny", "random_state": 0, **TINY}
    ck = tmp_path / "ck"
    dbk.tl.fit_pretrainer(s, max_steps=2, checkpoint_dir=ck, **kw)
    ckpt = dbk.tl.latest_checkpoint(ck)
    # resumed with another gene panel
    other = _tiled()
    a = other.tables["dbk_table"]
    other.tables["dbk_table"] = a[:, : a.n_vars // 2].copy()
    with pytest.raises(ValueError, match=r"checkpoint-000000002.pt was written by a different model \(differs in "
                                         r"\['vocab'\]\)"):
        dbk.tl.fit_pretrainer(other, max_steps=3, checkpoint_dir=ck, **kw)
    # truncated, then empty
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="checkpoint-000000002.pt is unreadable or corrupt"):
        dbk.tl.fit_pretrainer(s, max_steps=3, checkpoint_dir=ck, **kw)
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="unreadable or corrupt"):
        dbk.tl.fit_pretrainer(s, max_steps=3, checkpoint_dir=ck, **kw)

    # a saved stage-1 model from a newer dbk, or an older one with the same format
    model = dbk.tl.DiffusionPretrainer(["A", "B"], preset="tiny", **{k: v for k, v in TINY.items()})
    path = model.save(tmp_path / "stage1")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"format_version": 99, "dbk_version": "9.0"}))
    with pytest.raises(ValueError, match=r"was written by a newer dbk \(9.0"):
        dbk.tl.DiffusionPretrainer.load(path)
    (path / "config.json").write_text(json.dumps(cfg | {"dbk_version": "0.0.1"}))
    assert dbk.tl.DiffusionPretrainer.load(path, device="cpu").genes == ["A", "B"]
    (path / "config.json").write_text(json.dumps(cfg | {"vocab": {"genes": ["A", "B", "C"]}}))
    with pytest.raises(ValueError, match="does not fit"):
        dbk.tl.DiffusionPretrainer.load(path)
