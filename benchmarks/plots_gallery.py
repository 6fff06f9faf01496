"""A PNG of every ``dbk.pl`` plot, on synthetic slides and her2st (when there), to look at.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/plots_gallery.py [--out benchmarks/results/gallery] [--quick]

A training slide and a held-out slide (``dbk.datasets.synthetic``, seeds 0 and 1) are tiled and pseudo-bulked;
DiffBulk is fitted on the first with the ``tiny`` stage-1 preset and predicts the second, once with its transcripts
(measured vs predicted) and once as an H&E-only slide (predictions only). The her2st section C3 (from
``../shared/data/her2st`` or ``$DBK_HER2ST``, when there) gives the tiles and measured maps of a real slide. The
benchmark figure reads ``benchmarks/results/her2st_folds.csv`` (written by ``benchmarks/her2st.py``) when it exists.
Prints the path and wall time of each PNG.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

HERE = Path(__file__).resolve().parent
GENES = ["ERBB2", "VIM", "CD163"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gallery")
    ap.add_argument("--quick", action="store_true", help="smaller slides and fewer stage-1 steps")
    args = ap.parse_args()
    import matplotlib.pyplot as plt
    import pandas as pd
    import torch

    import dbk

    torch.set_num_threads(1)
    dbk.settings.progress = False
    args.out.mkdir(parents=True, exist_ok=True)
    shape = (2048, 2048) if args.quick else (3072, 3072)
    steps = 30 if args.quick else 300

    t0 = time.perf_counter()

    def slide(seed):
        sdata = dbk.datasets.synthetic(shape=shape, random_state=seed)
        dbk.pp.tissue_mask(sdata)
        dbk.pp.make_tiles(sdata, tile_size_um=56)
        return sdata

    train, test = slide(0), slide(1)
    dbk.pp.pseudobulk(train)
    dbk.pp.pseudobulk(test)
    he_only = slide(1)
    del he_only.points["transcripts"]
    for k in list(he_only.shapes):
        if k != "dbk_tiles":
            del he_only.shapes[k]
    for k in list(he_only.tables):
        del he_only.tables[k]
    print(f"slides ready: {time.perf_counter() - t0:.0f} s", flush=True)
    model = dbk.tl.fit_diffbulk(train, fm_size_px=112, preset="tiny", pretrain_steps=steps, tile_size_um=56)
    model.predict(test)
    model.predict(he_only)
    print(f"DiffBulk fitted and predicted: {time.perf_counter() - t0:.0f} s", flush=True)

    def save(name, fig):
        path = args.out / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        print(f"{path}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    save("tiles_outline", dbk.pl.tiles(train, return_fig=True))
    save("tiles_gene", dbk.pl.tiles(train, "ERBB2", return_fig=True))
    train.tables["dbk_table"].obs["n_cells_range"] = pd.cut(train.tables["dbk_table"].obs["n_cells"], 4,
                                                             precision=0)
    save("tiles_category", dbk.pl.tiles(train, "n_cells_range", return_fig=True))
    save("spatial", dbk.pl.spatial(test, GENES, return_fig=True))
    save("spatial_predictions_only", dbk.pl.spatial(he_only, GENES[:2], return_fig=True))
    save("scatter", dbk.pl.scatter(test, GENES[0], return_fig=True))
    per_gene = dbk.tl.evaluate(test, train_adata=train.tables["dbk_table"])
    save("gene_metrics", dbk.pl.gene_metrics(per_gene, top_k=30, return_fig=True))
    save("gene_metrics_mse", dbk.pl.gene_metrics(per_gene, metric="mse", top_k=10, return_fig=True))
    save("training_history", dbk.pl.training_history(model.pretrainer, smooth=3, return_fig=True))
    rows = test.tables["dbk_table"]
    pick = rows.obs["n_cells"].sort_values().index[[0, len(rows) // 3, 2 * len(rows) // 3, -1]]
    save("generated", dbk.pl.generated(model.pretrainer, rows[pick], test, n_samples=3, guidance=2.0,
                                       return_fig=True))
    folds = HERE / "results" / "her2st_folds.csv"
    if folds.exists():
        res = pd.read_csv(folds)
        if "split" in res.columns:
            res = res[res["split"] == res["split"].iloc[0]]
        save("benchmark", dbk.pl.benchmark(res, return_fig=True))
        save("benchmark_top50", dbk.pl.benchmark(res, metric="pearson_mean_top50_hvg", return_fig=True))
    her2st = Path(os.environ.get("DBK_HER2ST", HERE.parents[1] / "shared" / "data" / "her2st")) / "C3"
    if her2st.is_dir():  # a real section, where the tissue fills a small part of the scan: no model, measured only
        c3 = dbk.io.read_st_folder(her2st)
        dbk.pp.tissue_mask(c3)
        dbk.pp.make_tiles(c3, tile_size_um=112, mode="spots")
        dbk.pp.pseudobulk(c3, source="spots", sample="C3")
        save("her2st_tiles", dbk.pl.tiles(c3, "ERBB2", alpha=0.8, return_fig=True))
        save("her2st_spatial_measured", dbk.pl.spatial(c3, ["ERBB2", "KRT5"], return_fig=True))
    print(f"done: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
