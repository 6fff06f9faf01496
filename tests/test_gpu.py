"""GPU correctness (marker ``gpu``): both stages under bf16 autocast, loaders, GPU -> CPU round trips, determinism.

Skipped without CUDA. ``benchmarks/device_check.py`` runs them on the GPU machine; its ``--dry-run`` runs them on the
CPU (``DBK_GPU_TESTS_ON_CPU=1``) so that the code cannot rot where no GPU is. They use the torch core only
(:class:`dbk.tl.TileArrays`, array inputs), so they also run on a GPU node without the SpatialData stack.

Tolerances are relative errors ``||a - b|| / ||b||`` and are stated per test: float32 on GPU vs CPU differs by
TF32 convolutions and summation order (~1e-3); bf16 autocast vs float32 by bf16 rounding (~1e-2).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("DBK_GPU_TESTS_ON_CPU") == "1":
        return "cpu"
    pytest.skip("needs CUDA (set DBK_GPU_TESTS_ON_CPU=1 to run these tests on the CPU)")


def _arrays(n: int = 48, size: int = 32, n_genes: int = 12, seed: int = 0, labeled: bool = True):
    """Tiles whose colour follows two of the genes (so conditioning has something to learn)."""
    from dbk.tl import TileArrays

    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 1.0, size=(n, n_genes)).astype(np.float32)
    base = np.stack([x[:, 0], x[:, 1], 0.5 * (x[:, 0] + x[:, 1])], axis=1)
    base = 255 * (base - base.min()) / (np.ptp(base) + 1e-9)
    img = base[:, None, None, :] + rng.normal(0, 20, size=(n, size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    genes = [f"G{i}" for i in range(n_genes)]
    if not labeled:
        return TileArrays(img, name=f"dense{seed}", tile_size_um=112.0)
    return TileArrays(img, X=np.log1p(x), genes=genes, name=f"slide{seed}", tile_size_um=112.0)


def _fit(device: str, *, steps: int = 12, seed: int = 0, **kw):
    from dbk.tl import DiffusionPretrainer

    data = [_arrays(seed=1), _arrays(seed=2, labeled=False)]
    # a small U-Net: the tests check the device code paths, not the model
    model = DiffusionPretrainer(data[0].genes, preset="tiny", random_state=seed, log_every=1,
                                block_out_channels=(16, 32), gene_dim=32)
    model.fit(data, max_steps=steps, accelerator="cuda" if device == "cuda" else "cpu", **kw)
    return model


def test_stage1_training_steps_bf16(device):
    """Stage 1 trains on the device under bf16 autocast (Accelerate's mixed precision on CUDA); loss finite."""
    from dbk.core._device import _accelerator

    model = _fit(device, steps=12, labeled_fraction=0.5)
    assert model.step == 12
    losses = [h["loss"] for h in model.history]
    assert len(losses) == 12 and np.isfinite(losses).all()
    assert model.device.type == device
    acc = _accelerator("cuda" if device == "cuda" else "cpu", "auto")
    assert acc.mixed_precision == ("bf16" if device == "cuda" else "no")
    if device == "cuda":  # the forward really runs in bf16 there
        seen = []
        h = model.net.unet.conv_in.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
        with acc.autocast():
            model.net(torch.zeros(2, 3, 32, 32, device=device), torch.ones(2, device=device))
        h.remove()
        assert seen == [torch.bfloat16]


def test_loader_workers_and_pinned_memory(device):
    """DataLoader workers (and pinned memory on CUDA) give the same batches, hence the same losses, as workers=0."""
    a = _fit(device, steps=6, num_workers=0)
    b = _fit(device, steps=6, num_workers=2)
    la, lb = [h["loss"] for h in a.history], [h["loss"] for h in b.history]
    assert _rel(lb, la) < 1e-3, (la, lb)


def test_same_seed_same_loss_curve(device):
    """Two runs with one seed: the same loss curve. On CUDA the convolution / GroupNorm backward kernels may sum in
    another order (cuDNN picks algorithms per run), so the curves agree to a tolerance: relative 1e-2 over 12 steps;
    on CPU exactly."""
    a, b = _fit(device, steps=12), _fit(device, steps=12)
    la, lb = [h["loss"] for h in a.history], [h["loss"] for h in b.history]
    if device == "cpu":
        assert la == lb
    else:
        assert _rel(lb, la) < 1e-2, (la, lb)


def test_gpu_model_saved_loads_on_cpu_with_same_outputs(device, tmp_path):
    """A model trained on the device, saved and loaded on the CPU gives the same features and losses (float32 on
    both sides: relative error < 1e-2, the TF32 convolutions of CUDA; exact on CPU)."""
    from dbk.tl import DiffusionPretrainer, diffusion_features

    model = _fit(device, steps=8)
    tiles = _arrays(n=16, seed=3)
    f_dev = diffusion_features(tiles.images, model, autocast=False)
    l_dev = model.denoising_loss(tiles.images, sigma=0.5)
    model.save(tmp_path / "m")
    cpu = DiffusionPretrainer.load(tmp_path / "m", device="cpu")
    assert cpu.device.type == "cpu"
    f_cpu = diffusion_features(tiles.images, cpu)
    l_cpu = cpu.denoising_loss(tiles.images, sigma=0.5)
    assert f_cpu.shape == f_dev.shape and np.isfinite(f_cpu).all()
    tol = 0.0 if device == "cpu" else 1e-2
    assert _rel(f_dev, f_cpu) <= tol
    assert _rel(l_dev, l_cpu) <= tol


def test_diffusion_features_under_autocast(device):
    """bf16 autocast features (the default on CUDA) stay within 5e-2 of float32 ones; deterministic per tile."""
    from dbk.tl import diffusion_features

    model = _fit(device, steps=4)
    tiles = _arrays(n=20, seed=4).images
    f32 = diffusion_features(tiles, model, autocast=False)
    f16 = diffusion_features(tiles, model, autocast=True)
    again = diffusion_features(tiles[::-1].copy(), model, autocast=True, tile_ids=np.arange(20)[::-1], batch_size=7)
    assert np.isfinite(f16).all()
    assert _rel(f16, f32) < 5e-2
    np.testing.assert_allclose(again[::-1], f16, rtol=0, atol=1e-2 * float(np.abs(f16).max()))


def test_embed_images_under_autocast(device):
    """Foundation-model embeddings on the device under bf16 autocast are within 5e-2 of float32 CPU ones."""
    import timm

    from dbk.tl._embed import encode_images

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    cfg = timm.data.resolve_model_data_config(net)
    imgs = torch.from_numpy(_arrays(n=8, size=64, seed=5).images).permute(0, 3, 1, 2)
    batches = [{"image": imgs[:4]}, {"image": imgs[4:]}]
    ref = encode_images(net.to("cpu"), cfg, batches, 8, device=torch.device("cpu"))
    got = encode_images(net.to(device), cfg, batches, 8, device=torch.device(device))
    assert got.shape == ref.shape == (8, net.num_features)
    assert _rel(got, ref) < (5e-2 if device == "cuda" else 1e-5)


def test_stage2_heads_train_and_predict_on_device(device):
    """The neural fusion head trains under bf16 autocast on the device and beats the mean on held-out tiles; the
    ridge head predicts the same on any device (float64 numpy)."""
    ad = pytest.importorskip("anndata")
    from dbk.tl import FusionRegressor

    rng = np.random.default_rng(0)
    n, d_fm, d_diff, g = 400, 24, 16, 6
    z_fm, z_diff = rng.normal(size=(n, d_fm)), rng.normal(size=(n, d_diff))
    w1, w2 = rng.normal(size=(d_fm, g)), rng.normal(size=(d_diff, g))
    y = z_fm @ w1 * 0.3 + z_diff @ w2 * 0.3 + rng.normal(0, 0.3, size=(n, g))
    adata = ad.AnnData(X=y.astype(np.float32))
    adata.obsm["X_fm"], adata.obsm["X_dbk_diff"] = z_fm.astype(np.float32), z_diff.astype(np.float32)
    adata.obs["sample"] = np.repeat(["a", "b", "c", "d"], n // 4)
    train, test = adata[:300].copy(), adata[300:].copy()
    head = FusionRegressor(fusion="gated", accelerator=device, max_epochs=60, random_state=0)
    head.fit(train, use_rep="X_fm")
    assert next(head.module_.parameters()).device.type == device
    pred = head.predict(test).to_numpy()
    mse = float(((pred - test.X) ** 2).mean())
    mse_mean = float(((train.X.mean(0) - test.X) ** 2).mean())
    assert mse < 0.7 * mse_mean, (mse, mse_mean)


def test_fit_diffbulk_and_predict_on_device(device, tmp_path):
    """The whole scverse path on the device: fit_diffbulk (stage 1 + FM + diffusion features + ridge head) and
    DiffBulk.predict on an H&E-only slide; the model saved there predicts the same on the CPU (relative 2e-2: bf16
    autocast features on the device, float32 on the CPU)."""
    pytest.importorskip("spatialdata")
    import timm
    from spatialdata import SpatialData

    import dbk
    from dbk.tl import DiffBulk, fit_diffbulk

    torch.manual_seed(0)
    fm = timm.create_model("resnet18", pretrained=False, num_classes=0)  # no weights needed offline
    train = dbk.datasets.synthetic(shape=(2048, 2048), random_state=0)
    model = fit_diffbulk(train, preset="tiny", pretrain_steps=10, tile_size_um=56.0, fm=fm, fm_size_px=64,
                         fusion="ridge", accelerator=device, random_state=0,
                         pretrain_kwargs={"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32,
                                          "batch_size": 8})
    assert model.pretrainer.device.type == device
    full = dbk.datasets.synthetic(shape=(2048, 2048), random_state=1)
    new = SpatialData(images={"he": full.images["he"]}, attrs={"sample": "new"})
    model.predict(new)
    pred = new.tables["dbk_table"].obsm["dbk_pred"]
    assert np.isfinite(pred.to_numpy()).all() and pred.shape[1] == len(model.genes)
    model.save(tmp_path / "m")
    cpu = DiffBulk.load(tmp_path / "m", device="cpu")
    again = SpatialData(images={"he": full.images["he"]}, attrs={"sample": "new"})
    cpu.predict(again)
    tol = 1e-6 if device == "cpu" else 2e-2
    assert _rel(again.tables["dbk_table"].obsm["dbk_pred"].to_numpy(), pred.to_numpy()) < tol
