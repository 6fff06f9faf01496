"""Provenance (issue 23): features and weights are reused only when they are what they claim.

- FM embeddings are kept on a fingerprint of the weights and the preprocessing, not on the model's name;
- ``predict`` on a tile table refuses features recorded as made otherwise than the model's (no images to redo them);
- a stage-1 ``checkpoint_dir`` holding a run on other data is refused unless ``resume="force"``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dbk
from dbk.tl._embed import embed_tiles, fm_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for the module

ARCH = "mobilenetv3_small_050"  # random weights (pretrained=False, offline): a cheap stand-in for any encoder
TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
        "log_every": 5}
FIT = {"fm_size_px": 32, "preset": "tiny", "pretrain_steps": 0, "pretrain_kwargs": TINY, "tile_size_um": 32.0,
       "fusion": "ridge", "head_cv": 0, "random_state": 0}


def encoder(seed: int) -> torch.nn.Module:
    """A timm encoder with seeded random weights; every seed gives a model with the same name and other weights."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(ARCH, pretrained=False, num_classes=0).eval()


def tiled(seed: int = 0, sample: str = "s"):
    sd = dbk.datasets.synthetic(shape=(512, 512), n_genes=8, include_cells=False, random_state=seed)
    sd.attrs["sample"] = sample
    dbk.pp.make_tiles(sd, tile_size_um=32.0)
    dbk.pp.pseudobulk(sd)
    return sd


@pytest.fixture(scope="module")
def fitted():
    """A DiffBulk fitted in seconds (untrained stage 1, ridge head) on a random-weight encoder, and its slide."""
    dbk.settings.progress = False
    train = tiled(0, "train")
    return dbk.tl.fit_diffbulk(train, fm=encoder(0), **FIT), train


# ---- 8. embeddings are reused on a fingerprint of the weights and the preprocessing, not on the name -------------


def test_fm_fingerprint_names_the_weights_not_the_model_name():
    a, b = encoder(0), encoder(1)
    fa = fm_fingerprint(a)
    assert fa == fm_fingerprint(encoder(0))  # the same weights, rebuilt
    assert fa != fm_fingerprint(b)  # same name, other weights
    same = encoder(1)
    same.load_state_dict(a.state_dict())
    assert fm_fingerprint(same) == fa
    same.to(memory_format=torch.channels_last)  # layout (as encode_images sets it) does not change it
    assert fm_fingerprint(same) == fa
    with torch.no_grad():  # nor does it miss a tensor: changing one layer's values changes the fingerprint
        next(iter(same.parameters())).mul_(1.01)
    assert fm_fingerprint(same) != fa


def test_embeddings_of_another_model_with_the_same_name_are_recomputed(dbk_log):
    sd = tiled(2)
    a, b = encoder(0), encoder(1)
    embed_tiles(sd, fm=a, fm_size_px=32, key_added="X_fm")
    t = sd.tables["dbk_table"]
    emb_a = t.obsm["X_fm"].copy()
    ref = tiled(2)
    embed_tiles(ref, fm=b, fm_size_px=32, key_added="X_fm")
    emb_b = ref.tables["dbk_table"].obsm["X_fm"]
    assert np.abs(emb_a - emb_b).max() > 0.5 * np.abs(emb_b).max()  # other weights, other features (the case)

    dbk_log.clear()
    embed_tiles(sd, fm=b, fm_size_px=32, key_added="X_fm")  # same name, same size and tiles: was kept before
    np.testing.assert_allclose(t.obsm["X_fm"], emb_b, rtol=1e-5, atol=1e-8)
    rec = t.uns["dbk"]["embeddings"]["X_fm"]
    assert rec["model"] == ARCH and rec["weights_fingerprint"] == fm_fingerprint(b) and rec["tile_size_um"] == 32.0
    warned = [r.getMessage() for r in dbk_log.records if r.levelname == "WARNING"]
    assert any("obsm['X_fm'] holds embeddings of other weights" in m and fm_fingerprint(a) in m
               and fm_fingerprint(b) in m for m in warned), warned
    dbk_log.clear()
    embed_tiles(sd, fm=b, fm_size_px=32, key_added="X_fm")  # now the same weights: kept, and said so
    assert "keeping obsm['X_fm']" in dbk_log.text and fm_fingerprint(b) in dbk_log.text


def test_other_preprocessing_or_an_unfingerprinted_record_is_embedded_again(dbk_log):
    sd = tiled(2)
    net = encoder(0)
    embed_tiles(sd, fm=net, fm_size_px=32, key_added="X_fm")
    t = sd.tables["dbk_table"]
    plain = t.obsm["X_fm"].copy()
    # another normalisation (mean / std) is other features: recomputed, not kept by name and size
    dbk_log.clear()
    embed_tiles(sd, fm=net, fm_size_px=32, key_added="X_fm", data_config={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert "normalisation mean" in dbk_log.text
    assert t.uns["dbk"]["embeddings"]["X_fm"]["mean"] == [0.5, 0.5, 0.5]
    assert np.abs(t.obsm["X_fm"] - plain).max() > 0.1 * np.abs(plain).max()
    # a record without a weights fingerprint (an older dbk) cannot vouch for its weights: embedded again, said so
    embed_tiles(sd, fm=net, fm_size_px=32, key_added="X_fm", overwrite=True)
    del t.uns["dbk"]["embeddings"]["X_fm"]["weights_fingerprint"]
    t.obsm["X_fm"] = np.zeros_like(plain)
    dbk_log.clear()
    embed_tiles(sd, fm=net, fm_size_px=32, key_added="X_fm")
    assert "no weights fingerprint is recorded" in dbk_log.text
    np.testing.assert_allclose(t.obsm["X_fm"], plain, rtol=1e-5, atol=1e-8)
    # features from another tool under the key (no record): replaced, and said so
    t.obsm["X_fm"] = np.zeros_like(plain)
    del t.uns["dbk"]["embeddings"]["X_fm"]
    dbk_log.clear()
    embed_tiles(sd, fm=net, fm_size_px=32, key_added="X_fm")
    assert "has no record" in dbk_log.text
    np.testing.assert_allclose(t.obsm["X_fm"], plain, rtol=1e-5, atol=1e-8)


def test_the_model_records_its_features_and_predict_recomputes_another_models(fitted):
    model, _ = fitted
    clean = tiled(1, "new")
    model.predict(clean)
    want = clean.tables["dbk_table"].obsm["dbk_pred"].to_numpy()
    # the slide holds another encoder's embeddings under the model's key, same name and size: recomputed
    slide = tiled(1, "new")
    embed_tiles(slide, fm=encoder(1), fm_size_px=32, key_added=model.fm_key)
    model.predict(slide)
    got = slide.tables["dbk_table"].obsm["dbk_pred"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # a saved model says which features it expects; predict says which ones it used
    f = model.config["fm"]
    assert f["fingerprint"] == fm_fingerprint(model.fm)
    assert f["mean"] == [0.485, 0.456, 0.406] and f["std"] == [0.229, 0.224, 0.225] and f["size_px"] == 32
    assert slide.tables["dbk_table"].uns["dbk"]["predict"]["features"][model.fm_key] == {
        "source": "dbk", "weights_fingerprint": f["fingerprint"]}


# ---- 9. predict on a tile table refuses features made otherwise than the model's ----------------------------------


def test_predict_on_a_table_refuses_features_made_at_another_size_or_by_other_weights(fitted):
    model, _ = fitted
    slide = tiled(1, "new")
    model.features(slide)
    table = slide.tables["dbk_table"]
    good = model.predict(table.copy())  # the model's own features: fine, and recorded as dbk-made
    assert np.isfinite(good.to_numpy()).all()

    at224 = tiled(1, "new")
    model.features(at224)
    embed_tiles(at224, fm=model.fm, fm_size_px=224, key_added=model.fm_key)  # 224 px embeddings, same weights
    with pytest.raises(ValueError) as err:
        model.predict(at224.tables["dbk_table"])
    msg = str(err.value)
    assert f"obsm[{model.fm_key!r}]" in msg and "input size (px) 224 (expected 32)" in msg
    assert "pass the SpatialData" in msg
    assert "dbk_pred" not in at224.tables["dbk_table"].obsm  # nothing written

    other = table.copy()
    other.uns["dbk"]["embeddings"][model.fm_key]["weights_fingerprint"] = fm_fingerprint(encoder(1))
    with pytest.raises(ValueError, match=r"weights fingerprint '[0-9a-f]{16}' \(expected '[0-9a-f]{16}'\)"):
        model.predict(other)
    noisier = table.copy()
    noisier.uns["dbk"]["diffusion_features"][model.diff_key]["sigma"] = 0.5
    with pytest.raises(ValueError, match=r"obsm\['X_dbk_diff'\].*noise level sigma 0.5 \(expected 0.01\)"):
        model.predict(noisier)


def test_user_supplied_features_are_taken_as_given_and_recorded_so(fitted, dbk_log):
    model, _ = fitted
    slide = tiled(1, "new")
    model.features(slide)
    table = slide.tables["dbk_table"].copy()
    want = model.predict(table.copy())
    del table.uns["dbk"]["embeddings"]  # features from another tool: no dbk record
    dbk_log.clear()
    got = model.predict(table)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy())
    assert table.uns["dbk"]["predict"]["features"][model.fm_key] == {"source": "user-supplied"}
    assert table.uns["dbk"]["predict"]["features"][model.diff_key]["source"] == "dbk"
    assert "user-supplied foundation-model embeddings, taken as given" in dbk_log.text


# ---- 11. a stage-1 checkpoint of other data is refused unless asked for -----------------------------------------


def _arrays(name: str, seed: int, n: int = 24):
    rng = np.random.default_rng(seed)
    return dbk.tl.TileArrays(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8),
                             X=np.log1p(rng.poisson(2.0, (n, 4))).astype(np.float32), genes=["A", "B", "C", "D"],
                             name=name, tile_size_um=32.0)


def test_a_checkpoint_of_other_data_is_refused_unless_forced(tmp_path, dbk_log):
    kw = {"preset": "tiny", "random_state": 0, **TINY}
    ck = tmp_path / "ck"
    first = _arrays("slideA", 0)
    dbk.tl.fit_pretrainer(first, max_steps=2, checkpoint_dir=ck, **kw)
    ckpt = dbk.tl.latest_checkpoint(ck)
    # the same data in a new call resumes silently (what a long benchmark relies on)
    dbk_log.clear()
    same = dbk.tl.fit_pretrainer(_arrays("slideA", 0), max_steps=3, checkpoint_dir=ck, **kw)
    assert same.step == 3 and "resumed from" in dbk_log.text
    assert not [r for r in dbk_log.records if r.levelname == "WARNING"]
    ckpt = dbk.tl.latest_checkpoint(ck)
    # another dataset (other slide names): refused, naming the file and the ways on
    with pytest.raises(ValueError) as err:
        dbk.tl.fit_pretrainer(_arrays("slideB", 1), max_steps=4, checkpoint_dir=ck, **kw)
    msg = str(err.value)
    assert str(ckpt) in msg and "run on other data" in msg and "another checkpoint_dir" in msg
    assert "resume='force'" in msg
    # same names, tile counts and genes, other expression values: refused too
    with pytest.raises(ValueError, match="other expression values"):
        dbk.tl.fit_pretrainer(_arrays("slideA", 1), max_steps=4, checkpoint_dir=ck, **kw)
    # resume=False ignores the checkpoint; resume="force" continues that run on this data, with a warning
    fresh = dbk.tl.fit_pretrainer(_arrays("slideB", 1), max_steps=1, checkpoint_dir=tmp_path / "new", resume=False,
                                  **kw)
    assert fresh.step == 1
    # resume=False into a folder holding an earlier run is refused: its newer checkpoints would outlive the new run's
    kept = sorted(p.name for p in ck.iterdir())
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run .*needs an empty folder"):
        dbk.tl.fit_pretrainer(_arrays("slideB", 1), max_steps=1, checkpoint_dir=ck, resume=False, **kw)
    assert sorted(p.name for p in ck.iterdir()) == kept  # nothing deleted
    dbk_log.clear()
    forced = dbk.tl.fit_pretrainer(_arrays("slideB", 1), max_steps=4, checkpoint_dir=ck, resume="force", **kw)
    assert forced.step == 4 and "on other data than it was trained on" in dbk_log.text
    with pytest.raises(ValueError, match="resume must be True, False or 'force'"):
        dbk.tl.fit_pretrainer(first, max_steps=5, checkpoint_dir=ck, resume="yes", **kw)


def test_load_refuses_a_foundation_model_with_other_weights_than_recorded(fitted, tmp_path):
    import json

    model, _ = fitted
    folder = model.save(tmp_path / "m")
    assert dbk.tl.DiffBulk.load(folder).config["fm"]["fingerprint"] == model.config["fm"]["fingerprint"]
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["fm"]["fingerprint"] = "0123456789abcdef"  # as if fitted on another checkpoint of the same name
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has other weights than the one the model was fitted on \(weights "
                                         r"fingerprint [0-9a-f]+, recorded 0123456789abcdef\)"):
        dbk.tl.DiffBulk.load(folder)
