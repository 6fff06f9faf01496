"""A LazySlide round trip, measured: a slide opened and tiled by LazySlide, DiffBulk's predictions back as its table.

A synthetic slide (H&E and transcripts, ``dbk.datasets.synthetic``) is written as a tiled TIFF (one level);
LazySlide opens it (``wsidata.open_wsi``), finds the tissue and lays 112 µm tiles
(``zs.pp.tile_tissues(wsi, 224, mpp=0.5)``). A
DiffBulk model fitted with dbk's CPU defaults on a *second* synthetic slide (another seed: held out) predicts every
LazySlide tile through the WSIData's reader; the same tiles are then predicted from the same TIFF read by dbk itself
(``dbk.io.read_image``), and the table gives both times, the largest difference between the two answers and the
held-out Pearson r of the predictions against the tiles' true pseudo-bulk. The figure is LazySlide's
``zs.pl.tiles`` of one gene, measured and predicted.

    python benchmarks/lazyslide_roundtrip.py --figure docs/_static/lazyslide_roundtrip.png
    python benchmarks/lazyslide_roundtrip.py --size 2048 --steps 0     # smaller; the CPU default (no stage-1 steps)

Needs the ``lazyslide`` extra (``pip install "diffbulk[lazyslide]"``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _tiff(sd, path: Path) -> None:
    import tifffile

    img = sd.images[next(iter(sd.images))]
    arr = img["scale0"]["image"].values if hasattr(img, "children") else img.values
    level0 = np.ascontiguousarray(np.moveaxis(np.asarray(arr), 0, -1))
    # one level: OpenSlide reads no SubIFD pyramid of a generic TIFF, so with one both readers make the same 2x
    # levels from level 0 and the comparison below isolates the reading path
    tifffile.imwrite(path, level0, photometric="rgb", tile=(512, 512), compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", metadata=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=3072, help="side of the synthetic slides in px (0.5 µm/px)")
    parser.add_argument("--steps", type=int, default=None,
                        help="stage-1 steps of the model (default: dbk's CPU default, i.e. none)")
    parser.add_argument("--figure", type=Path, default=None, help="write LazySlide's figure here (png)")
    args = parser.parse_args()

    import lazyslide as zs
    import pandas as pd
    import wsidata

    import dbk

    dbk.settings.progress = False
    kw = {"shape": (args.size, args.size), "pixel_size_um": 0.5, "n_genes": 40}
    train = dbk.datasets.synthetic(random_state=11, **kw)
    test = dbk.datasets.synthetic(random_state=12, **kw)
    t0 = time.perf_counter()
    model = dbk.tl.fit_diffbulk(train, pretrain_steps=args.steps, random_state=0)
    fit_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "held_out.tif"
        _tiff(test, path)
        t0 = time.perf_counter()
        wsi = wsidata.open_wsi(path, store=None)
        zs.pp.find_tissues(wsi)
        zs.pp.tile_tissues(wsi, 224, mpp=0.5)
        tile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = model.predict(wsi)
        wsi_s = time.perf_counter() - t0

        # the same tiles, the same file, read by dbk itself
        own = dbk.io.read_image(path, pixel_size_um=0.5)
        view = dbk.pp.from_wsidata(wsi)
        tiles = view.shapes["dbk_tiles"].copy()
        tiles.attrs = {**view.shapes["dbk_tiles"].attrs,
                       "dbk": {**view.shapes["dbk_tiles"].attrs["dbk"], "image_key": next(iter(own.images))}}
        own.shapes["dbk_tiles"] = tiles  # predict makes their (gene-less) table
        t0 = time.perf_counter()
        ref = model.predict(own)
        own_s = time.perf_counter() - t0

        # the truth of these tiles: the held-out slide's transcripts summed into LazySlide's tiles
        truth_sd = test  # not used again
        tiles_t = tiles.copy()
        tiles_t.attrs = {**tiles.attrs, "dbk": {**tiles.attrs["dbk"], "image_key": next(iter(test.images))}}
        truth_sd.shapes["dbk_tiles"] = tiles_t
        dbk.pp.pseudobulk(truth_sd)
        truth = truth_sd.tables["dbk_table"].to_df()[model.genes].to_numpy()
        p = pred.to_numpy()
        r = [np.corrcoef(p[:, j], truth[:, j])[0, 1] for j in range(p.shape[1]) if np.ptp(truth[:, j]) > 0]

        n = len(pred)
        print(f"| step | tiles | seconds | tiles/s |\n|---|---:|---:|---:|\n"
              f"| fit_diffbulk (dbk's CPU defaults, training slide) | {len(train.tables['dbk_table'])} | "
              f"{fit_s:.1f} | |\n"
              f"| LazySlide: open_wsi + find_tissues + tile_tissues(224, mpp=0.5) | {n} | {tile_s:.1f} | |\n"
              f"| model.predict(wsi) (pixels through the WSIData's reader) | {n} | {wsi_s:.1f} | {n / wsi_s:.1f} |\n"
              f"| model.predict(dbk.io.read_image(same file), same tiles) | {n} | {own_s:.1f} | {n / own_s:.1f} |")
        print(f"\nlargest |difference| between the two predictions: {np.abs(p - ref.to_numpy()).max():.2e}")
        print(f"held-out mean Pearson r over {len(r)} genes (LazySlide tiles vs their true pseudo-bulk): "
              f"{np.mean(r):.3f}")
        print(f"WSIData table: {list(wsi.tables)}; {wsi.tables['dbk_pred_tiles']}")
        if args.figure is not None:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from wsidata.io import add_features

            gene = "ERBB2" if "ERBB2" in model.genes else model.genes[0]
            add_features(wsi, key="measured_tiles", tile_key="tiles", features=truth.astype(np.float32),
                         var=pd.DataFrame(index=model.genes))
            fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
            zs.pl.tiles(wsi, feature_key="measured", color=gene, ax=axes[0], title=f"{gene}, measured (log1p)")
            zs.pl.tiles(wsi, feature_key="dbk_pred", color=gene, ax=axes[1], title=f"{gene}, DiffBulk (held out)")
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(args.figure, dpi=80, bbox_inches="tight")
            print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
