"""The README quick start, run as written, then a held-out synthetic slide: how many patterns do its predictions carry?

Prints the head the fit chose (and the selection rule's verdict), the effective rank of the held-out predictions and of
the held-out measured table, any warning dbk gave, the spread of squidpy's Moran's I over the predicted genes (one
value for every gene means the maps are one pattern), and the trusted genes.

    .venv/bin/python benchmarks/quickstart_rank.py [--heldout-seed 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heldout-seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()

    import squidpy as sq
    import torch

    import dbk

    torch.set_num_threads(args.threads)
    warn = _Collect()
    logging.getLogger("dbk").addHandler(warn)
    t0 = time.perf_counter()
    # the README quick start, as written
    sdata = dbk.datasets.synthetic()
    dbk.pp.make_tiles(sdata, tile_size_um=112)
    dbk.pp.pseudobulk(sdata)
    model = dbk.tl.fit_diffbulk(sdata, preset=args.preset)
    fit_s = time.perf_counter() - t0
    sel = model.config["head_selection"]
    cands = pd.DataFrame({k: list(v) for k, v in sel["candidates"].items()})
    print(f"fit: {fit_s:.0f} s; {model!r}")
    print(f"folds: {sel['scheme']}; chosen: {sel['chosen']}")
    print(cands[["name", "cv_pearson_mean", "difference", "se", "eligible"]].to_string(index=False))
    fit_warnings = list(warn.messages)

    held = dbk.datasets.synthetic(random_state=args.heldout_seed)
    dbk.pp.make_tiles(held, tile_size_um=112)
    dbk.pp.pseudobulk(held)
    warn.messages.clear()
    model.predict(held)
    pred = dbk.tl.predictions_to_adata(held)
    predict_warnings = list(warn.messages)
    table = held.tables["dbk_table"]
    measured = table[:, model.genes].X
    measured = measured.toarray() if hasattr(measured, "toarray") else np.asarray(measured)
    rank_pred = dbk.tl.effective_rank(pred.X)
    rank_meas = dbk.tl.effective_rank(measured)
    sq.gr.spatial_neighbors(pred, coord_type="grid", n_neighs=8)
    sq.gr.spatial_autocorr(pred, mode="moran", n_perms=None)
    moran = pred.uns["moranI"]["I"]
    r = dbk.tl.nan_pearson(measured, pred.X.astype(np.float64), axis=0)
    print(f"\nheld-out slide (random_state={args.heldout_seed}): {pred.n_obs} tiles x {pred.n_vars} genes")
    print(f"effective rank: predictions {rank_pred}, measured {rank_meas}, training targets "
          f"{model.effective_rank['targets']} (recorded: {table.uns['dbk']['predict']['effective_rank']})")
    print(f"Moran's I over genes: min {moran.min():.4f}, median {moran.median():.4f}, max {moran.max():.4f}, "
          f"std {moran.std():.4f} (measured: std {_moran_std(table, model.genes):.4f})")
    corr = np.corrcoef(pred.X.T)
    off = np.abs(corr[np.triu_indices_from(corr, 1)])
    print(f"|r| between predicted genes: median {np.median(off):.3f}, share >= 0.99: {(off >= 0.99).mean():.3f}")
    print(f"test mean Pearson {np.nanmean(r):.3f}; trusted genes {int(model.cv_trusted.sum())}/{len(model.genes)}, "
          f"their test mean Pearson {np.nanmean(r[model.cv_trusted.to_numpy()]):.3f}, the others "
          f"{np.nanmean(r[~model.cv_trusted.to_numpy()]):.3f}")
    print("\nwarnings (fit):")
    for m in fit_warnings:
        print("  -", m)
    print("warnings (predict, predictions_to_adata):")
    for m in predict_warnings:
        print("  -", m)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def _moran_std(table, genes) -> float:
    import anndata as ad
    import squidpy as sq

    x = table[:, genes].X
    a = ad.AnnData(np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float32))
    a.obsm["spatial"] = np.asarray(table.obsm["spatial"])
    sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=8)
    sq.gr.spatial_autocorr(a, mode="moran", n_perms=None)
    return float(a.uns["moranI"]["I"].std())


if __name__ == "__main__":
    main()
