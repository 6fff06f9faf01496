"""Stage 1: EDM pieces, the diffusion pretrainer's training, resume, save / load, and that genes inform the image."""

from __future__ import annotations

import json
import math
import os
import signal

import anndata as ad
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import get_transformation

import dbk
from dbk._image import set_pixel_size
from dbk.core._data import _build_sources, _TileBatches
from dbk.tl import EDM, DiffusionPretrainer, fit_pretrainer, get_preset, heun_sample, latest_checkpoint

# a model small enough for many short CPU trainings: 16 px images, two U-Net levels of 16 / 32 channels
SMALL = {"preset": "tiny", "image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8,
         "warmup_steps": 5, "log_every": 1}

# ---- a tiny slide whose hidden cell-type mix sets both the colour / nuclei of a tile and its expression -----------

_COLOURS = np.array([[225, 130, 175], [150, 95, 185], [235, 190, 200]], float)  # tumour, immune, stroma


def type_slide(n_side=12, tile_px=16, *, seed=0, genes=None, sample="s", measured=None, table=True) -> SpatialData:
    """``n_side`` x ``n_side`` tiles of ``tile_px`` px (7 µm/px); per tile a Dirichlet mix of 3 cell types."""
    rng = np.random.default_rng(seed)
    genes = list(genes or [f"G{i}" for i in range(8)])
    n = n_side * n_side
    mix = rng.dirichlet([0.5] * 3, size=n)
    img = np.zeros((n_side * tile_px, n_side * tile_px, 3))
    yy, xx = np.mgrid[0:tile_px, 0:tile_px]
    for t in range(n):
        r, c = divmod(t, n_side)
        tile = np.broadcast_to(mix[t] @ _COLOURS, (tile_px, tile_px, 3)).copy()
        for _ in range(rng.poisson(1 + 6 * mix[t, 1])):  # dark nuclei, denser where immune cells are
            cy, cx = rng.uniform(0, tile_px, 2)
            tile[(yy - cy) ** 2 + (xx - cx) ** 2 < 2.0] = [90, 60, 140]
        img[r * tile_px : (r + 1) * tile_px, c * tile_px : (c + 1) * tile_px] = tile + rng.normal(0, 3, tile.shape)
    img = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    image = Image2DModel.parse(da.from_array(img, chunks=(3, 256, 256)), dims=("c", "y", "x"), c_coords=list("rgb"))
    sdata = SpatialData(images={"he": image})
    set_pixel_size(sdata, "he", pixel_size_um=7.0)
    x0 = (np.arange(n) % n_side) * tile_px
    y0 = (np.arange(n) // n_side) * tile_px
    gdf = gpd.GeoDataFrame({"x0": x0, "y0": y0, "x1": x0 + tile_px, "y1": y0 + tile_px},
                           geometry=shapely.box(x0, y0, x0 + tile_px, y0 + tile_px), index=pd.RangeIndex(n))
    tf = dict(get_transformation(sdata.images["he"], get_all=True))
    sdata.shapes["dbk_tiles"] = ShapesModel.parse(gdf, transformations=tf)
    sdata.shapes["dbk_tiles"].attrs["dbk"] = {"image_key": "he", "tile_size_px": tile_px, "mode": "grid"}
    sdata.attrs["sample"] = sample
    if not table:
        return sdata
    # the biology is fixed (seed 12345): gene g of type k has the same rate on every slide and in every panel
    rates = {g: np.exp(np.random.default_rng([12345, int(g[1:])]).normal(0, 1.0, 3)) for g in genes}
    counts = rng.poisson(mix @ np.stack([rates[g] for g in genes], axis=1) * 50)
    x = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    obs = pd.DataFrame({"region": pd.Categorical(["dbk_tiles"] * n), "instance_id": np.arange(n), "sample": sample},
                       index=[str(i) for i in range(n)])
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
    adata.layers["counts"] = counts
    if measured is not None:
        adata.layers["measured"] = np.asarray(measured, dtype=np.uint8)
    sdata.tables["dbk_table"] = TableModel.parse(adata, region="dbk_tiles", region_key="region",
                                                 instance_key="instance_id")
    return sdata


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()} | {
        f"ema.{k}": v.detach().clone() for k, v in model.ema_net.state_dict().items()}


def _assert_same_weights(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


@pytest.fixture(scope="module")
def slide():
    return type_slide(seed=0, sample="train")


# ---- EDM -----------------------------------------------------------------------------------------------------------


def test_edm_preconditioning_matches_karras():
    edm = EDM()
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.scalings(sigma)
    sd = 0.5
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / torch.sqrt(sigma**2 + sd**2))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sigma**2 + sd**2))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    # the loss weight makes the effective target of F unit-weighted: lambda * c_out^2 = 1
    torch.testing.assert_close(edm.loss_weight(sigma) * c_out**2, torch.ones(4, dtype=torch.float64))
    # training sigmas are log-normal(P_mean, P_std)
    s = edm.sample_sigma(200_000, torch.Generator().manual_seed(0))
    assert abs(s.log().mean().item() + 1.2) < 0.02 and abs(s.log().std().item() - 1.2) < 0.02
    sched = edm.schedule(18)
    assert len(sched) == 19 and sched[-1] == 0
    assert math.isclose(sched[0].item(), 80.0, rel_tol=1e-5) and math.isclose(sched[-2].item(), 0.002, rel_tol=1e-4)
    assert (sched[:-1] > sched[1:]).all()


def test_heun_sampler_with_the_exact_denoiser_samples_the_data_distribution():
    # data ~ N(mu, s^2) per pixel: the ideal denoiser is mu + (x - mu) s^2 / (s^2 + sigma^2)
    mu, s = 0.3, 0.5
    edm = EDM()

    def denoise(x, sigma):
        sig = sigma.view(-1, 1, 1, 1)
        return mu + (x - mu) * s**2 / (s**2 + sig**2)

    noise = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = heun_sample(denoise, noise, edm.schedule(32))
    assert abs(x.mean().item() - mu) < 0.02
    assert abs(x.std().item() - s) < 0.02
    # stochastic churn keeps the distribution
    x2 = heun_sample(denoise, noise, edm.schedule(32), s_churn=20.0)
    assert abs(x2.std().item() - s) < 0.03 and not torch.allclose(x, x2)


def test_presets():
    assert get_preset("cpu-small").image_size == 64 and get_preset("paper").image_size == 224
    p = get_preset("cpu-small", image_size=32, lr=None)
    assert p.image_size == 32 and p.name == "cpu-small+custom" and p.lr == get_preset("cpu-small").lr
    assert get_preset("cpu-small", batch_size=4).name == "cpu-small"  # training fields keep the name
    with pytest.raises(ValueError, match="Unknown preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="Unknown preset fields"):
        get_preset("tiny", channels=(1, 2))
    with pytest.raises(ValueError, match="attention_head_dim"):
        DiffusionPretrainer(["A"], preset="tiny", block_out_channels=(16, 16))  # 0 attention heads otherwise


# ---- data: panels, measured masks, tiles without profiles ----------------------------------------------------------


def test_panels_masks_and_unlabeled_tiles_in_one_run():
    a = type_slide(6, seed=1, genes=["G0", "G1", "G2", "G3"], sample="a")
    measured = np.ones((36, 3), np.uint8)
    measured[:5, 0] = 0  # G2 not measured on the first five tiles of slide b
    b = type_slide(6, seed=2, genes=["G2", "G4", "G5"], sample="b", measured=measured)
    c = type_slide(6, seed=3, sample="c", table=False)  # H&E only
    dbk.pp.make_tiles(a, tile_size_um=None, tile_size_px=16, stride_um=56.0, key_added="dense", min_tissue_fraction=0.0)
    model = fit_pretrainer([a, b, c], max_steps=3, random_state=0, unlabeled_tiles_key="dense", **SMALL)
    assert model.genes == ["G0", "G1", "G2", "G3", "G4", "G5"]
    assert model.step == 3 and len(model.history) == 3 and model.tile_size_um == pytest.approx(112.0)
    sources = _build_sources([a, b, c], vocab=model.vocab, image_size=16, genes=None, table_key="dbk_table",
                             tiles_key="dbk_tiles", unlabeled_tiles_key="dense")
    assert [s.name for s in sources] == ["a", "a:dense", "b", "c"]
    ds = _TileBatches(sources)
    n_dense = sources[1].n
    assert n_dense > 36 and ds.n == 36 * 3 + n_dense and ds.n_labeled == 72
    batch = ds[[0, 36 + n_dense, 36 + n_dense + 10, ds.n - 1, 36]]
    vocab = model.vocab
    assert batch["mask"].sum(1).tolist() == [4, 2, 3, 0, 0]  # slide a; b without G2; b; c (H&E only); dense tile
    assert sorted(batch["ids"][1][batch["mask"][1]].tolist()) == sorted(vocab.ids(["G4", "G5"]).tolist())
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.uint8


# ---- determinism, resume, interruption -----------------------------------------------------------------------------


def test_same_seed_same_weights(slide):
    a = fit_pretrainer(slide, max_steps=4, random_state=3, **SMALL)
    b = fit_pretrainer(slide, max_steps=4, random_state=3, **SMALL)
    _assert_same_weights(a, b)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    c = fit_pretrainer(slide, max_steps=4, random_state=4, **SMALL)
    assert not torch.equal(a.net.unet.conv_in.weight, c.net.unet.conv_in.weight)


def test_resume_reaches_the_same_weights(slide, tmp_path):
    kw = dict(random_state=0, **SMALL, checkpoint_every=4)
    full = fit_pretrainer(slide, max_steps=12, **kw)
    # 1. stop at max_steps=5, then continue to 12 from the checkpoint
    ck1 = tmp_path / "split"
    part = fit_pretrainer(slide, max_steps=5, checkpoint_dir=ck1, **kw)
    assert part.step == 5 and latest_checkpoint(ck1).name == "checkpoint-000000005.pt"
    resumed = fit_pretrainer(slide, max_steps=12, checkpoint_dir=ck1, **kw)
    assert resumed.step == 12
    _assert_same_weights(resumed, full)
    assert [(h["step"], h["loss"]) for h in resumed.history] == [(h["step"], h["loss"]) for h in full.history]
    # 2. Ctrl-C from a callback after step 7: a checkpoint is written, KeyboardInterrupt re-raised
    ck2 = tmp_path / "interrupted"

    def stop_at_7(model, rec):
        if rec["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_pretrainer(slide, max_steps=12, checkpoint_dir=ck2, callbacks=[stop_at_7], **kw)
    assert latest_checkpoint(ck2).name == "checkpoint-000000007.pt"
    resumed = fit_pretrainer(slide, max_steps=12, checkpoint_dir=ck2, **kw)
    _assert_same_weights(resumed, full)
    # 3. interrupted inside a step (before its update): the checkpoint holds the last completed step
    ck3 = tmp_path / "mid-step"
    real_step = DiffusionPretrainer._train_step

    def flaky(self, *a, **k):
        if self.step == 9:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    DiffusionPretrainer._train_step = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_pretrainer(slide, max_steps=12, checkpoint_dir=ck3, **kw)
    finally:
        DiffusionPretrainer._train_step = real_step
    assert latest_checkpoint(ck3).name == "checkpoint-000000009.pt"
    assert len(list(ck3.glob("checkpoint-*.pt"))) == 2  # the last two are kept
    resumed = fit_pretrainer(slide, max_steps=12, checkpoint_dir=ck3, **kw)
    _assert_same_weights(resumed, full)
    # a finished run resumed with the same max_steps does nothing; a different architecture is refused
    again = fit_pretrainer(slide, max_steps=12, checkpoint_dir=ck3, **kw)
    _assert_same_weights(again, full)
    with pytest.raises(ValueError, match="different model"):
        fit_pretrainer(slide, max_steps=14, checkpoint_dir=ck3, **(kw | {"block_out_channels": (16, 64)}))


def test_sigterm_saves_a_checkpoint_then_calls_the_previous_handler(slide, tmp_path):
    class Terminated(Exception):
        pass

    def previous(signum, frame):
        raise Terminated

    def send_sigterm(model, rec):
        if rec["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Terminated):
            fit_pretrainer(slide, max_steps=6, checkpoint_dir=tmp_path, callbacks=[send_sigterm], random_state=0,
                           **SMALL)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert latest_checkpoint(tmp_path).name == "checkpoint-000000002.pt"


# ---- save / load, generate ------------------------------------------------------------------------------------------


def test_save_load_roundtrip(slide, tmp_path):
    model = fit_pretrainer(slide, max_steps=3, random_state=0, **SMALL)
    profiles = slide.tables["dbk_table"][:5]
    images = model.generate(profiles, n_steps=4, guidance=2.0, random_state=1)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    real = np.stack([_TileBatches(_build_sources([slide], vocab=model.vocab, image_size=16, genes=None,
                                                 table_key="dbk_table", tiles_key="dbk_tiles",
                                                 unlabeled_tiles_key=None))[i]["image"][0].permute(1, 2, 0).numpy()
                     for i in range(5)])
    loss = model.denoising_loss(real, profiles, sigma=0.8, random_state=2)
    path = model.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "ema.safetensors", "history.json",
                                                      "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vocab"]["genes"] == model.genes and cfg["tile_size_um"] == pytest.approx(112.0)
    assert cfg["dbk_version"] == dbk.__version__ and cfg["image_size"] == 16 and cfg["preset"]["gene_dim"] == 32
    loaded = DiffusionPretrainer.load(path, device="cpu")
    _assert_same_weights(loaded, model)
    np.testing.assert_array_equal(loaded.generate(profiles, n_steps=4, guidance=2.0, random_state=1), images)
    np.testing.assert_array_equal(loaded.denoising_loss(real, profiles, sigma=0.8, random_state=2), loss)
    assert loaded.history == model.history and loaded.step == 3 and loaded.vocab == model.vocab
    torch.testing.assert_close(loaded.encoder.value_mean, model.encoder.value_mean)  # z-score statistics
    with pytest.raises(FileExistsError):
        model.save(path)
    # corrupt weights: checksum
    bad = tmp_path / "bad"
    model.save(bad)
    data = bytearray((bad / "ema.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (bad / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        DiffusionPretrainer.load(bad)
    # a config that does not fit the weights
    (bad / "ema.safetensors").write_bytes((path / "ema.safetensors").read_bytes())
    cfg_bad = json.loads((bad / "config.json").read_text())
    cfg_bad["vocab"]["genes"] = cfg_bad["vocab"]["genes"][:-1]
    (bad / "config.json").write_text(json.dumps(cfg_bad))
    with pytest.raises(ValueError, match="does not fit"):
        DiffusionPretrainer.load(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        DiffusionPretrainer.load(bad)
    with pytest.raises(FileNotFoundError):
        DiffusionPretrainer.load(tmp_path / "nothing")


def test_generate_inputs_seeds_and_guidance(slide, dbk_log):
    model = fit_pretrainer(slide, max_steps=3, random_state=0, **SMALL)
    table = slide.tables["dbk_table"]
    a = model.generate(table[:4], n_steps=3, random_state=5)
    # the seed of sample i does not depend on batching; the same seed gives the same tiles. Another batch shape may
    # take other CPU kernels (summation order), so a pixel may round to the neighbouring grey level
    b = model.generate(table[:4], n_steps=3, random_state=5, batch_size=3)
    diff = np.abs(b.astype(int) - a.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert not np.array_equal(model.generate(table[:4], n_steps=3, random_state=6), a)
    # a DataFrame / list of dicts with an unknown gene (dropped, with a warning naming it) gives the same tiles
    df = table[:4].to_df().assign(NOTAGENE=1.0)
    with dbk_log.at_level("WARNING", logger="dbk"):
        np.testing.assert_array_equal(model.generate(df, n_steps=3, random_state=5), a)
    assert "NOTAGENE" in dbk_log.text
    # unconditional samples: an int, None entries, or guidance=0
    u = model.generate(2, n_steps=3, random_state=5)
    np.testing.assert_array_equal(model.generate([None, None], n_steps=3, random_state=5), u)
    np.testing.assert_array_equal(model.generate(table[:2], n_steps=3, random_state=5, guidance=0.0), u)
    assert not np.array_equal(model.generate(table[:2], n_steps=3, random_state=5, guidance=3.0), u)
    with pytest.raises(ValueError, match="no gene of the model's vocabulary"):
        model.generate({"FOO": 1.0})
    with pytest.raises(ValueError, match="px"):
        model.denoising_loss(np.zeros((2, 32, 32, 3), np.uint8), None, sigma=1.0)



def test_a_new_panel_grows_the_vocabulary_of_a_trained_model(slide, tmp_path):
    model = fit_pretrainer(slide, max_steps=2, random_state=0, **SMALL)
    model = DiffusionPretrainer.load(model.save(tmp_path / "m"), device="cpu")
    old_rows = model.encoder.embedding.weight.detach().clone()
    old_stats = model.encoder.value_mean.clone()
    other = type_slide(6, seed=5, genes=["G6", "G9", "G10"], sample="other")
    grown = []
    model.fit(other, max_steps=4, callbacks=[lambda m, rec: grown.append(m.encoder.embedding.num_embeddings)])
    assert model.genes[:8] == [f"G{i}" for i in range(8)] and model.genes[8:] == ["G9", "G10"]
    assert model.step == 4 and grown == [10, 10]
    assert model.ema_net.encoder.embedding.num_embeddings == 10
    # statistics of the known genes are kept, the new genes get theirs
    torch.testing.assert_close(model.encoder.value_mean[:8], old_stats)
    assert (model.encoder.value_mean[8:] > 1).all()
    assert not torch.equal(model.encoder.embedding.weight[:8], old_rows)  # trained on: G6 moved
    assert model.generate({"G10": 3.0, "G1": 5.0}, n_steps=2).shape == (1, 16, 16, 3)


# ---- the point of stage 1: the genes inform the image ----------------------------------------------------------------

LEARN = {"preset": "tiny", "image_size": 16, "block_out_channels": (16, 32), "batch_size": 16, "warmup_steps": 20}


def _gap(model, held_out, sigma=1.0):
    res = model.evaluate(held_out, sigmas=(sigma,), random_state=0).iloc[0]
    print(f"\nsigma={sigma}: loss_cond={res.loss_cond:.5f} loss_uncond={res.loss_uncond:.5f} "
          f"loss_shuffled={res.loss_shuffled:.5f} gain={res.gain:.3f} "
          f"({res.n_tiles} held-out tiles)")
    return res


def test_genes_inform_the_image_on_held_out_tiles():
    # the hidden cell-type mix sets a tile's colour and nuclei and its expression; 300 steps of a 16 px model on
    # one slide, evaluated on another slide with the same noise for both losses. Seeds 0, 1, 2 gave gains of
    # 9.5 %, 16 % and 6.9 % at sigma = 1 (EMA weights); the test asks for 3 %.
    train, held_out = type_slide(seed=0, sample="train"), type_slide(8, seed=100, sample="held-out")
    model = fit_pretrainer(train, max_steps=300, random_state=0, **LEARN)
    res = _gap(model, held_out, 1.0)
    assert res.loss_cond < 0.97 * res.loss_uncond, res.to_dict()
    # the information is the tile's own: another tile's profile denoises worse than the tile's
    assert res.loss_cond < 0.97 * res.loss_shuffled, res.to_dict()


def test_genes_inform_the_image_on_a_synthetic_slide():
    # dbk.datasets.synthetic: cell types with their own morphology and expression; 56 µm tiles as 16 px images.
    # The link is weaker than above (mixed tiles, random cell positions): seeds 0, 1, 2 gave gains of 3.0 %, 1.5 %
    # and 2.2 % at sigma = 1 after 300 steps (3.0 % for seed 1 after 1000 steps); the test asks for 0.5 %.
    def slide(seed):
        sd = dbk.datasets.synthetic(shape=(2048, 2048), pixel_size_um=2.0, n_genes=20, random_state=seed)
        dbk.pp.make_tiles(sd, tile_size_um=56)
        dbk.pp.pseudobulk(sd)
        return sd

    model = fit_pretrainer(slide(0), max_steps=300, random_state=0, **LEARN)
    res = _gap(model, slide(1000), 1.0)
    assert res.loss_cond < 0.995 * res.loss_uncond, res.to_dict()
