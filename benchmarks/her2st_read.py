"""Read the six her2st sections with dbk.io.read_st_folder; print a table and draw the spots over one section's H&E.

python benchmarks/her2st_read.py [--data ../shared/data/her2st] [--section C3]
                                 [--out benchmarks/results/her2st_spots.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.patches import Circle

import dbk
from dbk.io import image_levels

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "her2st")
    parser.add_argument("--section", default="C3", help="section drawn in the picture")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "her2st_spots.png")
    args = parser.parse_args()
    dbk.settings.verbosity = 1  # keep the table readable

    header = (
        f"{'section':<8}{'spots':>6}{'genes':>7}{'image h x w':>14}{'µm/px':>8}{'µm/px x':>9}{'µm/px y':>9}"
        f"{'fit rms px':>11}{'read s':>8}"
    )
    print(header)
    print("-" * len(header))
    total_spots, shown = 0, None
    for section in SECTIONS:
        t0 = time.perf_counter()
        sdata = dbk.io.read_st_folder(args.data / section)
        seconds = time.perf_counter() - t0
        table = sdata.tables["table"]
        _, h, w = sdata.images["he"]["scale0"]["image"].shape
        fit = sdata.attrs["dbk_pixel_size_fit"]
        total_spots += table.n_obs
        print(
            f"{section:<8}{table.n_obs:>6}{table.n_vars:>7}{f'{h} x {w}':>14}{dbk.io.get_pixel_size(sdata):>8.4f}"
            f"{fit['pixel_size_um_x']:>9.4f}{fit['pixel_size_um_y']:>9.4f}{fit['rms_residual_px']:>11.3f}"
            f"{seconds:>8.2f}"
        )
        if section == args.section:
            shown = sdata
    print(f"{'all':<8}{total_spots:>6}")
    if shown is not None:
        plot_spots(shown, args.section, args.out)
        print(f"picture: {args.out}")


def plot_spots(sdata, section: str, out: Path) -> None:
    """Whole section at a coarse pyramid level, and a full-resolution zoom around the spots' median."""
    levels = image_levels(sdata, "he")
    coarse = next((lvl for lvl in levels if max(lvl.shape_yx) <= 2600), levels[-1])
    spots = sdata.shapes["spots"]
    xy = np.c_[spots.geometry.x, spots.geometry.y]
    radius = float(spots["radius"].iloc[0])
    ps = dbk.io.get_pixel_size(sdata)

    fig, axes = plt.subplots(1, 2, figsize=(16, 8))
    h0, w0 = levels[0].shape_yx
    img = np.moveaxis(coarse.data.values, 0, -1)
    axes[0].imshow(img, extent=(0, w0, h0, 0))
    axes[0].set_title(f"her2st {section}: {len(spots)} spots over H&E ({ps:.3f} µm/px, 100 µm circles)")

    cx, cy = np.median(xy, axis=0)
    half = 900
    x0, y0 = int(max(cx - half, 0)), int(max(cy - half, 0))
    x1, y1 = int(min(x0 + 2 * half, w0)), int(min(y0 + 2 * half, h0))
    crop = np.moveaxis(levels[0].data[:, y0:y1, x0:x1].values, 0, -1)
    axes[1].imshow(crop, extent=(x0, x1, y1, y0))
    axes[1].set_title(f"full resolution, x {x0}:{x1}, y {y0}:{y1}")
    for ax in axes:
        circles = [Circle((x, y), radius) for x, y in xy]
        ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor="lime", linewidth=0.8))
    axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.2))
    axes[1].set_xlim(x0, x1)
    axes[1].set_ylim(y1, y0)
    for ax in axes:
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
