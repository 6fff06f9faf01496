"""Lazy reading of (pyramidal) TIFF files: one dask array per pyramid level, nothing loaded into memory."""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import tifffile
import zarr

logger = logging.getLogger("dbk")

_CHANNEL_AXES = ("S", "C")  # tifffile names: S = samples per pixel (RGB), C = channels (OME)


def read_tiff_levels(path: str | Path) -> list[da.Array]:
    """Open a TIFF (plain, tiled, pyramidal, OME-TIFF, SVS, ...) as lazy ``(c, y, x)`` dask arrays, finest first.

    Each level is the file's own pyramid level (``tifffile`` series 0), read tile by tile through
    ``TiffPageSeries.aszarr``; nothing is decoded until a chunk is computed. A single-level TIFF gives one array.
    The file stays open as long as the arrays are referenced.

    Parameters
    ----------
    path
        The TIFF file.

    Returns
    -------
    One dask array per level with dims ``(c, y, x)`` in the file's dtype; a grayscale image has ``c == 1``.

    Raises
    ------
    ValueError
        If the image has more dimensions than channels, y and x (e.g. several z planes or time points).
    """
    tif = tifffile.TiffFile(path)
    series = tif.series[0]
    levels = []
    for i, level in enumerate(series.levels):
        arr = da.from_zarr(zarr.open(series.aszarr(level=i), mode="r"))
        levels.append(_to_cyx(arr, level.axes, path))
    logger.debug(f"{path}: {len(levels)} pyramid level(s), shapes {[lvl.shape for lvl in levels]}")
    return levels


def _to_cyx(arr: da.Array, axes: str, path: str | Path) -> da.Array:
    """Reorder a tifffile array with axes such as ``"YXS"``, ``"SYX"``, ``"CYX"``, ``"YX"`` to ``(c, y, x)``."""
    axes = axes.upper()
    if len(axes) != arr.ndim or "Y" not in axes or "X" not in axes:
        raise ValueError(f"Cannot interpret TIFF axes {axes!r} with shape {arr.shape} in {path}.")
    # drop singleton axes other than y and x
    keep = [i for i, ax in enumerate(axes) if ax in "YX" or arr.shape[i] != 1]
    arr = arr[tuple(slice(None) if i in keep else 0 for i in range(arr.ndim))]
    axes = "".join(axes[i] for i in keep)
    channel = [ax for ax in axes if ax in _CHANNEL_AXES]
    extra = [ax for ax in axes if ax not in "YX" and ax not in _CHANNEL_AXES]
    if extra or len(channel) > 1:
        raise ValueError(
            f"TIFF image {path} has axes {axes!r} (shape {arr.shape}); dbk reads a 2-D image with at most one channel "
            "axis (an RGB H&E). Extract the plane you need first."
        )
    if not channel:
        return arr.transpose(axes.index("Y"), axes.index("X"))[None]
    return arr.transpose(axes.index(channel[0]), axes.index("Y"), axes.index("X"))
