"""Pack the her2st inputs of ``device_check.py`` into one small folder that travels to a GPU machine.

    python benchmarks/device_data.py --out .devcarry/her2st        # ~30 MB: six JPEGs + tables.npz

A GPU node in a cluster (or the lent device) often has torch but not the SpatialData stack, and dense 128-224 px
tiles over six sections would be gigabytes. So this script does the SpatialData part here, with the same dbk
pipeline as ``her2st.py`` (``read_st_folder`` -> one 112 µm tile per spot -> pseudo-bulk -> EfficientNet-Lite0
embeddings, cached by ``_her2st_features``; ``tissue_mask`` -> dense tiles of 112 µm every 56 µm), and writes only
the section JPEGs (copied unchanged) and small tables; ``device_check.py`` cuts the tiles from the JPEGs there.

``tables.npz``:

- ``sections`` (6,), ``um_per_px`` (6,): section names and the pixel size dbk estimated for each;
- ``spot_section`` (n,), ``spot_box`` (n, 4) int ``x0, y0, x1, y1`` (half-open JPEG pixels), ``spot_id`` (n,);
- ``genes`` (785,), ``Y`` (n, 785) float32: log1p of counts per 10k (over the whole library), the targets;
- ``fm`` (n, 1280) float32: EfficientNet-Lite0 embeddings of the spot tiles at 224 px (``X_efficientnet_lite0``);
- ``dense_section`` (m,), ``dense_box`` (m, 4): the dense tiles over each section's tissue.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "her2st"
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="her2st folder (B4, C2..C6, genes_785.txt)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=HERE / "_data" / "her2st", help="per-section table cache")
    ap.add_argument("--tile-um", type=float, default=112.0)
    ap.add_argument("--dense-stride-um", type=float, default=56.0)
    args = ap.parse_args()

    from _her2st_features import SECTIONS, FeatureSettings, section_table

    import dbk

    if not args.data.is_dir():
        sys.exit(f"No her2st data at {args.data}.")
    genes = [g.strip() for g in (args.data / "genes_785.txt").read_text().split() if g.strip()]
    settings = FeatureSettings(tile_size_um=args.tile_um)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    spot_sec, spot_box, spot_id, ys, fms, um = [], [], [], [], [], []
    dense_sec, dense_box = [], []
    for s in SECTIONS:
        folder = args.data / s
        table, cached, secs = section_table(folder, settings, args.cache)
        print(f"{s}: {table.n_obs} spot tiles ({'cache' if cached else f'built in {secs:.0f} s'})", flush=True)
        x = table[:, genes].X
        ys.append(np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float32))
        fms.append(np.asarray(table.obsm[settings.obsm_key], np.float32))
        spot_box.append(table.obs[["x0", "y0", "x1", "y1"]].to_numpy(np.int64))
        spot_id.append(table.obs_names.to_numpy().astype(str))
        spot_sec += [s] * table.n_obs
        sd = dbk.io.read_st_folder(folder)
        um.append(float(dbk.io.get_pixel_size(sd)))
        dbk.pp.tissue_mask(sd)
        dbk.pp.make_tiles(sd, tile_size_um=args.tile_um, stride_um=args.dense_stride_um, mode="grid",
                          key_added="dense_tiles")
        b = dbk.pp.tile_bounds(sd, "dense_tiles")
        dense_box.append(b)
        dense_sec += [s] * len(b)
        print(f"{s}: {len(b)} dense tiles, {um[-1]:.4f} µm/px", flush=True)
        jpgs = sorted(folder.glob("*.jpg"))
        if len(jpgs) != 1:
            sys.exit(f"{folder}: expected one .jpg, found {[j.name for j in jpgs]}.")
        shutil.copyfile(jpgs[0], out / f"{s}.jpg")
    tmp = out / "tables.tmp.npz"
    np.savez_compressed(
        tmp, sections=np.array(SECTIONS), um_per_px=np.array(um), spot_section=np.array(spot_sec),
        spot_box=np.concatenate(spot_box), spot_id=np.concatenate(spot_id), genes=np.array(genes),
        Y=np.concatenate(ys), fm=np.concatenate(fms), dense_section=np.array(dense_sec),
        dense_box=np.concatenate(dense_box))
    tmp.replace(out / "tables.npz")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({total / 2**20:.1f} MiB): {len(spot_sec)} spot tiles, {len(dense_sec)} dense tiles, "
          f"{len(genes)} genes")


if __name__ == "__main__":
    main()
