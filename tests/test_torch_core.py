"""The torch core without SpatialData: TileArrays, balanced batches, wall budgets, preset="auto", memory-sized batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dbk.core._data import _BalancedStepSampler, _build_sources, _resample
from dbk.core._presets import AUTO_CPU_STEPS, THROUGHPUT, auto_preset, batch_for_memory, expected_seconds
from dbk.core._vocab import GeneVocab
from dbk.tl import DiffusionPretrainer, TileArrays, get_preset

REPO = Path(__file__).resolve().parents[1]
SMALL = {"block_out_channels": (16, 32), "gene_dim": 32, "log_every": 1}


def _tiles(n=24, size=32, genes=("A", "B", "C"), seed=0, labeled=True, name="s"):
    rng = np.random.default_rng(seed)
    x = rng.random((n, len(genes))).astype(np.float32)
    colour = 60 + 150 * np.stack([x[:, 0], x[:, -1], 0.5 * (x[:, 0] + x[:, -1])], axis=1)  # the genes show
    img = np.clip(colour[:, None, None, :] + rng.normal(0, 15, (n, size, size, 3)), 0, 255).astype(np.uint8)
    if not labeled:
        return TileArrays(img, name=name, tile_size_um=112.0)
    return TileArrays(img, X=x, genes=list(genes), name=name, tile_size_um=112.0)


def test_tile_arrays_validate_input():
    img = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        TileArrays(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(n, S, S, 3\)"):
        TileArrays(np.zeros((4, 8, 6, 3), np.uint8))
    with pytest.raises(ValueError, match="needs genes"):
        TileArrays(img, X=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        TileArrays(img, X=np.zeros((3, 2)), genes=["a", "b"])
    with pytest.raises(ValueError, match="not unique"):
        TileArrays(img, X=np.zeros((4, 2)), genes=["a", "a"])
    with pytest.raises(ValueError, match="measured"):
        TileArrays(img, X=np.zeros((4, 2)), genes=["a", "b"], measured=np.ones((4, 3), bool))


def test_sources_from_arrays_keep_values_and_resample():
    a = _tiles(n=5, size=40, genes=("A", "B", "C"))
    vocab = GeneVocab(["C", "A", "B"])
    (src,) = _build_sources([a], vocab=vocab, image_size=20, genes=["B", "C"], table_key="t", tiles_key="k",
                            unlabeled_tiles_key=None)
    assert src.images.shape == (5, 20, 20, 3) and src.images.dtype == np.uint8
    np.testing.assert_array_equal(src.ids, vocab.ids(["B", "C"]))
    np.testing.assert_array_equal(src.x, a.X[:, [1, 2]])
    # a flat image stays flat through the antialiased resampling
    flat = np.full((2, 40, 40, 3), 77, np.uint8)
    assert (_resample(flat, 20) == 77).all()


def test_balanced_sampler_fills_each_batch_and_resumes_exactly():
    lab, unl = np.arange(0, 10), np.arange(10, 200)
    s = _BalancedStepSampler(lab, unl, batch_size=8, n_labeled=4, start=0, stop=30, seed=3)
    batches = list(s)
    assert len(batches) == 30
    for b in batches:
        assert len(b) == 8 and np.isin(b[:4], lab).all() and np.isin(b[4:], unl).all()
    # every labelled tile comes round once per labelled epoch (10 tiles, 4 per step: 2 full steps per epoch)
    first_epoch = np.concatenate([b[:4] for b in batches[:2]])
    assert len(set(first_epoch.tolist())) == 8
    resumed = list(_BalancedStepSampler(lab, unl, 8, 4, start=17, stop=30, seed=3))
    for a, b in zip(batches[17:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # two processes split each global batch without overlap
    r0 = list(_BalancedStepSampler(lab, unl, 4, 2, 0, 5, 3, rank=0, world=2))
    r1 = list(_BalancedStepSampler(lab, unl, 4, 2, 0, 5, 3, rank=1, world=2))
    for a, b in zip(r0, r1, strict=True):
        assert not set(a.tolist()) & set(b.tolist())


def test_fit_on_arrays_with_labeled_fraction_and_max_time(dbk_log):
    data = [_tiles(n=12, seed=1), _tiles(n=120, seed=2, labeled=False, name="dense")]
    model = DiffusionPretrainer(["A", "B", "C"], preset="tiny", random_state=0, **SMALL)
    with dbk_log.at_level("INFO", logger="dbk"):
        model.fit(data, max_steps=10**6, max_time=2.0, labeled_fraction=0.5)
    assert model.stopped_by == "max_time"
    assert 0 < model.step < 10**6
    half = model.preset.batch_size // 2
    assert f"{half} of each batch with profiles" in dbk_log.text
    assert "stopped by max_time" in dbk_log.text
    with pytest.raises(ValueError, match="labeled_fraction"):
        model.fit(data, max_steps=1, labeled_fraction=1.0)
    with pytest.raises(ValueError, match="max_time"):
        model.fit(data, max_steps=1, max_time=0)


def test_fit_on_arrays_learns_and_is_deterministic():
    """Stage 1 from arrays: the loss falls, and the same seed gives the same weights."""
    data = [_tiles(n=32, seed=1)]
    a = DiffusionPretrainer(["A", "B", "C"], preset="tiny", random_state=0, **SMALL).fit(data, max_steps=40)
    b = DiffusionPretrainer(["A", "B", "C"], preset="tiny", random_state=0, **SMALL).fit(data, max_steps=40)
    losses = [h["loss"] for h in a.history]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    for (k, v), (_, w) in zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_evaluate_on_arrays():
    model = DiffusionPretrainer(["A", "B", "C"], preset="tiny", random_state=0, **SMALL)
    model.fit([_tiles(n=16, seed=1)], max_steps=3)
    ev = model.evaluate(_tiles(n=10, seed=5), sigmas=(0.5,), max_tiles=None)
    assert list(ev["sigma"]) == [0.5] and int(ev["n_tiles"].iloc[0]) == 10
    assert np.isfinite(ev[["loss_cond", "loss_uncond", "loss_shuffled"]].to_numpy()).all()


def test_preset_auto_by_device(monkeypatch):
    import dbk

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_preset() == "cpu-small"
    p = get_preset("auto")
    assert p.name == "cpu-small" and p.max_steps == AUTO_CPU_STEPS
    secs, where = expected_seconds(p, p.max_steps, p.batch_size, torch.device("cpu"))
    assert 120 < secs < 600 and "CPU" in where  # "a few minutes" on the measured 2 cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_preset() == "gpu" and get_preset("auto").name == "gpu"
    assert auto_preset("cpu") == "cpu-small"
    monkeypatch.setattr(dbk.settings, "device", "cpu")
    assert auto_preset() == "cpu-small"
    g = get_preset("gpu")
    secs, _ = expected_seconds(g, g.max_steps, g.batch_size, torch.device("cuda"))
    assert 45 * 60 < secs < 75 * 60  # "about an hour" on the measured H200
    assert g.compile and not g.channels_last


def test_batch_for_memory():
    g = get_preset("gpu")
    rec = THROUGHPUT[("gpu", "cuda")]
    assert batch_for_memory(g, 128, 141.0) == 128  # the H200 it was measured on
    small = batch_for_memory(g, 128, 16.0)  # a 16 GiB card
    assert small < 128 and small & (small - 1) == 0
    assert small * rec["peak_gib"] / rec["batch"] <= 0.85 * 16.0
    eager = get_preset("gpu", compile=False)
    assert batch_for_memory(eager, 128, 24.0) < batch_for_memory(g, 128, 24.0)  # eager needs more memory
    assert batch_for_memory(get_preset("tiny"), 16, 1.0) == 16  # nothing measured: unchanged


def test_torch_core_imports_without_spatialdata(tmp_path):
    """With spatialdata, anndata, scanpy, squidpy, dask, geopandas and xarray blocked at import, the torch core trains
    stage 1 from arrays and computes diffusion features (what a bare GPU node needs)."""
    code = textwrap.dedent(
        """
        import sys
        BLOCKED = ("spatialdata", "anndata", "scanpy", "squidpy", "dask", "geopandas", "xarray")
        for name in BLOCKED:  # "import name" now raises ImportError, and find_spec(name) answers None
            sys.modules[name] = None
        import numpy as np, dbk
        from dbk.core import DiffusionPretrainer, TileArrays
        rng = np.random.default_rng(0)
        t = TileArrays(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), X=rng.random((12, 2)), genes=["a", "b"])
        m = DiffusionPretrainer(["a", "b"], preset="tiny", block_out_channels=(16, 32), gene_dim=32).fit(t, max_steps=2)
        ev = m.evaluate(t, sigmas=(0.5,), max_tiles=None)
        assert int(ev["n_tiles"].iloc[0]) == 12
        assert "dbk.pp._tile_sources" not in sys.modules  # the SpatialData half of the sources stays unloaded
        from dbk.tl import diffusion_features
        f = diffusion_features(t.images, m)
        assert f.shape[0] == 12 and np.isfinite(f).all()
        heavy = sorted({k.split(".")[0] for k, v in sys.modules.items() if v is not None} & set(BLOCKED))
        assert not heavy, heavy
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_exported_tiles_train_the_core_without_the_spatialdata_stack(tmp_path, suffix):
    import dbk

    sd = dbk.datasets.synthetic(shape=(768, 768), random_state=0)
    dbk.pp.make_tiles(sd, tile_size_um=56.0)
    dbk.pp.pseudobulk(sd)
    path = dbk.pp.export_tiles(sd, tmp_path / f"tiles{suffix}", size_px=32)
    code = textwrap.dedent(f"""
        import sys
        for name in ("spatialdata", "anndata", "scanpy", "squidpy", "dask", "geopandas", "xarray"):
            sys.modules[name] = None  # importing any of them now fails
        import numpy as np
        from dbk.core import DiffusionPretrainer, TileArrays
        t = TileArrays.read({str(path)!r})
        assert t.images.shape[1:] == (32, 32, 3) and t.X.shape == (len(t), 60) and t.tile_size_um == 56.0
        m = DiffusionPretrainer(t.genes, preset="tiny", image_size=16, block_out_channels=(16, 32), gene_dim=32)
        m.fit(t, max_steps=2, batch_size=4, accelerator="cpu")
        assert m.step == 2 and m.tile_size_um == 56.0
        print("ok", len(t))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")
