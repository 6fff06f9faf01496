"""her2st: spot tiles (112 µm) + pseudo-bulk from spots on all six sections, concatenated across sections.

    python benchmarks/her2st_pseudobulk.py [--data ../shared/data/her2st] [--out benchmarks/results]

Prints per section: spots, tiles kept, genes, counts in tiles vs in the spot table (must be equal), and the shape
of the concatenated table (union and intersection of genes); saves tiles over the H&E of one section.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parents[1] / "shared" / "data" / "her2st"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--picture", default="C3")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import dbk

    dbk.settings.progress = False
    dbk.settings.verbosity = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables, rows = {}, []
    for section in ["B4", "C2", "C3", "C4", "C5", "C6"]:
        t = time.perf_counter()
        sdata = dbk.io.read_st_folder(Path(args.data) / section)
        dbk.pp.make_tiles(sdata, tile_size_um=112.0, mode="spots")
        dbk.pp.tissue_mask(sdata)
        dbk.pp.make_tiles(sdata, tile_size_um=112.0, mode="spots")  # again, now with tissue fractions
        dbk.pp.pseudobulk(sdata, source="spots")
        table = sdata.tables["dbk_table"]
        spots = sdata.tables["table"]
        kept = sdata.shapes["dbk_tiles"]["spot_id"].to_numpy()
        spot_total = int(spots[spots.obs[spots.uns["spatialdata_attrs"]["instance_key"]].isin(kept).to_numpy()]
                         .layers["counts"].sum())
        tile_total = int(table.layers["counts"].sum())
        rows.append((section, spots.n_obs, table.n_obs, table.n_vars, tile_total, spot_total,
                     "yes" if tile_total == spot_total else "NO", f"{np.median(table.obs['tissue_fraction']):.2f}",
                     f"{time.perf_counter() - t:.1f}"))
        tables[section] = table
        if section == args.picture:
            fig = dbk.pl.tiles(sdata, "n_transcripts", return_fig=True)
            fig.savefig(out / f"her2st_{section}_tiles.png", dpi=120, bbox_inches="tight")
    header = ("section", "spots", "tiles", "genes", "counts in tiles", "counts in spots", "equal", "median tissue",
              "s")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(f"{v!s:>{w}}" for v, w in zip(r, widths, strict=True)))
    union = dbk.pp.concat(tables)
    inter = dbk.pp.concat(tables, genes="intersection")
    m = dbk.pp.measured_mask(union)
    print(f"\nconcat union: {union.n_obs} tiles x {union.n_vars} genes, measured fraction {m.mean():.3f}")
    print(f"concat intersection: {inter.n_obs} tiles x {inter.n_vars} genes")
    print(f"picture: {out / f'her2st_{args.picture}_tiles.png'}")


if __name__ == "__main__":
    main()
