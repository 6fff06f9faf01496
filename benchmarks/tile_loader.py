"""Tile loader throughput: 224-px tiles from a full-slide pyramidal TIFF through ``dbk.pp.TileDataset``.

Writes (once, cached in benchmarks/_data) a JPEG-compressed, 256-px-tiled pyramidal TIFF of --size x --size px
with an H&E-like texture, reads it with ``dbk.io.read_image``, lays 112 µm tiles (224 px at 0.5 µm/px) and times
a torch DataLoader over a random sample of tiles with 0 and 2 workers; also a second epoch through the zarr cache.

    python benchmarks/tile_loader.py                 # 40,000 x 40,000 px
    python benchmarks/tile_loader.py --size 8000 --n 500
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_slide(path: Path, size: int, tile: int = 256) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    base = np.empty((tile, tile, 3), np.uint8)
    yy, xx = np.mgrid[0:tile, 0:tile]

    def tiles(level_size: int):
        n = -(-level_size // tile)
        for ty in range(n):
            for tx in range(n):
                phase = rng.uniform(0, 6.28)
                wave = (np.sin((xx + tx * tile) / 7.0 + phase) * np.cos((yy + ty * tile) / 5.0)) * 40
                base[..., 0] = np.clip(200 + wave, 0, 255)
                base[..., 1] = np.clip(120 + wave, 0, 255)
                base[..., 2] = np.clip(180 - wave, 0, 255)
                yield base

    levels = [size]
    while levels[-1] > 2048:
        levels.append(levels[-1] // 2)
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, s in enumerate(levels):
            kw = {"subfiletype": 1} if i else {"subifds": len(levels) - 1}
            tw.write(tiles(s), shape=(s, s, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     photometric="rgb", **kw)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=40_000)
    ap.add_argument("--n", type=int, default=2000, help="tiles timed per setting")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    import torch

    import dbk

    dbk.settings.progress = False
    torch.set_num_threads(1)
    path = HERE / "_data" / f"slide_{args.size}.tif"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        t = time.perf_counter()
        write_slide(path, args.size)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s")
    sdata = dbk.io.read_image(path, pixel_size_um=0.5)
    dbk.pp.make_tiles(sdata, tile_size_um=112.0, min_tissue_fraction=0.0)
    n_tiles = len(sdata.shapes["dbk_tiles"])
    rng = np.random.default_rng(0)
    sample = rng.choice(n_tiles, size=min(args.n, n_tiles), replace=False)
    rows = []
    for workers in (0, 2):
        ds = dbk.pp.TileDataset(sdata, size_px=224)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, sample.tolist()), batch_size=args.batch_size,
                                             num_workers=workers, shuffle=False)
        t = time.perf_counter()
        n = sum(len(b["image"]) for b in loader)
        dt = time.perf_counter() - t
        rows.append((f"slide, {workers} workers", n, dt, n / dt))
    cache = HERE / "_data" / f"cache_{args.size}.zarr"
    sub = dbk.pp.TileDataset(sdata, size_px=224)
    sub.bounds, sub.boxes, sub.tile_ids = sub.bounds[sample], sub.boxes[sample], sub.tile_ids[sample]
    t = time.perf_counter()
    sub._cache = sub._open_or_build_cache(cache)
    rows.append(("build zarr cache", len(sub), time.perf_counter() - t, len(sub) / (time.perf_counter() - t)))
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(sub, batch_size=args.batch_size, num_workers=workers)
        t = time.perf_counter()
        n = sum(len(b["image"]) for b in loader)
        dt = time.perf_counter() - t
        rows.append((f"zarr cache, {workers} workers", n, dt, n / dt))
    print(f"\nslide {args.size} x {args.size} px, {n_tiles:,} tiles of 224 px; random sample of {len(sample)}")
    print(f"{'setting':<24} {'tiles':>6} {'seconds':>8} {'tiles/s':>8}")
    for name, n, dt, rate in rows:
        print(f"{name:<24} {n:>6} {dt:>8.2f} {rate:>8.0f}")
    print(f"peak RSS of the main process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
