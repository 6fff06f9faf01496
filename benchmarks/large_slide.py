"""A full-size synthetic slide through the whole preprocessing pipeline, with wall time and peak RSS per stage.

    python benchmarks/large_slide.py                       # 40,000 x 40,000 px at 0.5 µm/px (~55 M transcripts)
    python benchmarks/large_slide.py --size 8000 --embed 64

Stages: build (lazy), tissue mask, tiles (112 µm), pseudo-bulk from transcripts (streamed), tile loading
(a random sample through dbk.pp.TileDataset) and foundation-model embedding of a sample of tiles
(dbk.tl.embed_tiles with the offline EfficientNet-Lite0, when available). Peak RSS is the process high-water mark
after each stage (it only grows); the target is < 4 GB for the whole run.
"""

from __future__ import annotations

import argparse
import resource
import time


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40_000)
    ap.add_argument("--load", type=int, default=1000, help="tiles read through TileDataset")
    ap.add_argument("--embed", type=int, default=256, help="tiles embedded (0 to skip)")
    args = ap.parse_args()

    import numpy as np

    import dbk

    dbk.settings.progress = False
    dbk.settings.verbosity = 1
    rows = []

    def stage(name, fn):
        t = time.perf_counter()
        out = fn()
        rows.append((name, time.perf_counter() - t, rss_mb(), out))
        print(f"{name:<22} {rows[-1][1]:8.1f} s  {rows[-1][2]:7.0f} MB  {out}", flush=True)

    holder = {}

    def build():
        holder["s"] = dbk.datasets.synthetic(shape=(args.size, args.size), random_state=0)
        return f"{args.size} x {args.size} px"

    stage("build (lazy)", build)
    sdata = holder["s"]
    def tissue():
        dbk.pp.tissue_mask(sdata)
        return f"{float(np.asarray(sdata.labels['dbk_tissue']).mean()):.1%} tissue"

    def tiles():
        dbk.pp.make_tiles(sdata, tile_size_um=112.0)
        return f"{len(sdata.shapes['dbk_tiles']):,} tiles"

    stage("tissue mask", tissue)
    stage("tiles (112 µm)", tiles)

    def pb():
        dbk.pp.pseudobulk(sdata)
        t = sdata.tables["dbk_table"]
        return f"{t.n_obs:,} x {t.n_vars} genes, {int(t.layers['counts'].sum()):,} transcripts in tiles"

    stage("pseudo-bulk", pb)

    def load():
        ds = dbk.pp.TileDataset(sdata, size_px=224)
        # a run of neighbouring tiles in grid order from the middle of the slide, as embedding all tiles reads them;
        # the synthetic image is rendered chunk by chunk on demand (~0.5 s per 1024 px chunk), so random access
        # would time the renderer, not the loader (benchmarks/tile_loader.py times random access on a real TIFF)
        start = max(0, len(ds) // 2 - args.load // 2)
        idx = np.arange(start, min(len(ds), start + args.load))
        t = time.perf_counter()
        for i in idx:
            ds[int(i)]
        return f"{len(idx)} neighbouring tiles, {len(idx) / (time.perf_counter() - t):.1f} tiles/s (0 workers)"

    stage("tile loading", load)
    if args.embed:
        def embed():
            import anndata as ad  # noqa: F401

            if not hasattr(dbk.tl, "embed_tiles"):
                return "skipped (dbk.tl.embed_tiles not available)"
            from spatialdata.models import ShapesModel, TableModel
            from spatialdata.transformations import get_transformation

            tiles = sdata.shapes["dbk_tiles"]
            n = min(args.embed, len(tiles))
            start = max(0, len(tiles) // 2 - n // 2)
            sub = tiles.iloc[start : start + n].copy()
            sub.attrs.pop("transform", None)  # copied from the tiles; given again below
            sdata.shapes["sample_tiles"] = ShapesModel.parse(
                sub, transformations=dict(get_transformation(tiles, get_all=True)))
            table = sdata.tables["dbk_table"]
            rows_ = table[table.obs["instance_id"].isin(sub.index).to_numpy()].copy()
            rows_.obs["region"] = "sample_tiles"
            rows_.uns.pop("spatialdata_attrs", None)
            sdata.tables["sample_table"] = TableModel.parse(rows_, region="sample_tiles", region_key="region",
                                                            instance_key="instance_id")
            t = time.perf_counter()
            dbk.tl.embed_tiles(sdata, tiles_key="sample_tiles", table_key="sample_table", batch_size=64)
            return f"{n} tiles, {n / (time.perf_counter() - t):.1f} tiles/s"

        stage("embedding (sample)", embed)
    print("\nstage                  seconds  peak RSS MB  result")
    for name, dt, rss, out in rows:
        print(f"{name:<22} {dt:8.1f}  {rss:11.0f}  {out}")
    print(f"total {sum(r[1] for r in rows):.0f} s, peak RSS {max(r[2] for r in rows):.0f} MB")


if __name__ == "__main__":
    main()
