"""A tiny HEST-Benchmark task folder in the layout and with the file names of ``MahmoodLab/hest-bench``.

``<root>/<TASK>/var_50genes.json`` and ``mean_50genes.json`` (``{"genes": [...]}``), ``splits/train_{i}.csv`` and
``test_{i}.csv`` (``sample_id,patches_path,expr_path``, paths relative to the task folder),
``patches/<sample>.h5`` (``img`` (n, S, S, 3) uint8, ``barcode`` (n, 1) bytes, ``coords`` (n, 2) int: what hestcore's
patcher writes, ``pixel_size`` and ``patch_size_target`` attributes on ``img`` where asked) and
``adata/<sample>.h5ad`` (raw counts, rows = barcodes). Patches are small (``size`` px, default 32; HEST's are 224):
nothing in HEST's reading code depends on the side.

What makes it a test of alignment: the ``.h5ad`` rows are in another order than the patches' barcodes and hold
spots with no patch; its columns hold genes outside the task's 50, in another order. Expression follows the patches'
red channel (a planted signal), so a probe on image features predicts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

SAMPLES = ("SAMPA", "SAMPB", "SAMPC", "SAMPD")
# fold 0 tests A and B, fold 1 tests C and D (each sample tested once, as in HEST's k-fold split files)
FOLDS = ((("SAMPC", "SAMPD"), ("SAMPA", "SAMPB")), (("SAMPA", "SAMPB"), ("SAMPC", "SAMPD")))
GENES = [f"GENE{i:02d}" for i in range(50)]
EXTRA = ["MT-CO1", "ACTB", "XIST", "GAPDH", "NOTAGENE"]
PITCH_UM = 100.0  # Visium spot pitch: patch centres 100 µm apart


def write_task(root: Path, task: str = "IDC", *, samples=SAMPLES, folds=FOLDS, n_patches=(18, 20, 22, 24),
               size: int = 32, pixel_size_um: dict | None = None, seed: int = 0) -> dict:
    """Write the task folder; return ``{sample: {"barcode", "coords", "img", "counts" (DataFrame, h5ad order)}}``.

    ``pixel_size_um``: ``{sample: µm per source pixel}`` written as ``img.attrs["pixel_size"]`` (samples not named get
    no such attribute); default 0.25 for every sample.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / task
    (folder / "splits").mkdir(parents=True, exist_ok=True)
    (folder / "patches").mkdir(exist_ok=True)
    (folder / "adata").mkdir(exist_ok=True)
    for name in ("var_50genes.json", "mean_50genes.json"):
        (folder / name).write_text(json.dumps({"genes": GENES}))
    pixel_size_um = {s: 0.25 for s in samples} if pixel_size_um is None else pixel_size_um
    weights = rng.normal(0.0, 1.0, len(GENES))  # each gene's link to the red channel
    out = {}
    for k, sid in enumerate(samples):
        n = n_patches[k % len(n_patches)]
        z = rng.uniform(0, 1, n)  # the planted latent: redness of the patch
        img = rng.integers(0, 40, (n, size, size, 3)).astype(np.uint8)
        img[..., 0] += (60 + 150 * z).astype(np.uint8)[:, None, None]
        img[..., 1] += 80
        img[..., 2] += 120
        px = pixel_size_um.get(sid, 0.25)
        grid = np.ceil(np.sqrt(n)).astype(int)
        centres_um = np.column_stack([np.arange(n) % grid, np.arange(n) // grid]) * PITCH_UM + 1000.0
        coords = np.floor(centres_um / px - 112.0 / px / 2).astype(np.int64)  # top-left corner, source pixels
        barcode = np.array([f"{sid}-{i:04d}-1" for i in range(n)])
        with h5py.File(folder / "patches" / f"{sid}.h5", "w") as f:
            d = f.create_dataset("img", data=img, chunks=(1, size, size, 3))
            d.attrs["patch_size_target"] = size
            if sid in pixel_size_um:
                d.attrs["pixel_size"] = float(px)
                d.attrs["downsample"] = 0.5 / float(px)
            f.create_dataset("barcode", data=barcode.astype("S").reshape(-1, 1))
            f.create_dataset("coords", data=coords)
        # expression: Poisson counts of the task's genes from the latent, plus genes and spots outside the task
        lam = np.exp(1.0 + np.outer(z, weights))
        counts = rng.poisson(lam).astype(np.float32)
        extra_spots = [f"{sid}-X{i}-1" for i in range(3)]
        all_counts = np.vstack([counts, rng.poisson(3.0, (3, len(GENES))).astype(np.float32)])
        others = rng.poisson(20.0, (n + 3, len(EXTRA))).astype(np.float32)
        frame = pd.DataFrame(np.hstack([all_counts, others]), index=[*barcode, *extra_spots], columns=GENES + EXTRA)
        frame = frame.sample(frac=1.0, random_state=seed + k)  # rows: not the patches' order
        frame = frame[list(rng.permutation(frame.columns))]  # columns: not the task's order
        adata = ad.AnnData(X=sp.csr_matrix(frame.to_numpy()), obs=pd.DataFrame(index=frame.index),
                           var=pd.DataFrame(index=frame.columns))
        adata.write_h5ad(folder / "adata" / f"{sid}.h5ad")
        out[sid] = {"barcode": barcode, "coords": coords, "img": img, "counts": frame}
    for i, (train, test) in enumerate(folds):
        for kind, ids in (("train", train), ("test", test)):
            pd.DataFrame({"sample_id": list(ids), "patches_path": [f"patches/{s}.h5" for s in ids],
                          "expr_path": [f"adata/{s}.h5ad" for s in ids]}).to_csv(
                folder / "splits" / f"{kind}_{i}.csv", index=False)
    return out
