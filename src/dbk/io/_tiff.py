"""Lazy reading of (pyramidal) TIFF files: one dask array per pyramid level, nothing loaded into memory."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
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
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            meta = [(lvl.shape, lvl.dtype, lvl.axes, _chunks_of(series, i)) for i, lvl in enumerate(series.levels)]
            data_end, size = _data_end(series), int(tif.filehandle.size)
    except (tifffile.TiffFileError, IndexError, ValueError, OSError, KeyError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"Cannot read {path} as a TIFF image ({type(err).__name__}: {err}).") from err
    if data_end > size:  # pixels are read lazily: catch a cut-off file now, not deep inside a later computation
        raise ValueError(f"TIFF image {path} is truncated: its pixel data runs to byte {data_end:,}, the file has "
                         f"{size:,} bytes (an interrupted copy or download?).")
    levels = []
    resolved, mtime = str(Path(path).resolve()), Path(path).stat().st_mtime_ns  # once per file, not per level
    for i, (shape, dtype, axes, chunks) in enumerate(meta):
        name = f"tiff-{Path(path).name}-{i}-{abs(hash((resolved, i, mtime)))}"
        # the same file, level and modification time read again while its reader lives: one reader, one open file
        reader = _live_source(name, TiffLevel) or TiffLevel(str(path), i, shape, dtype)
        arr = da.from_array(reader, chunks=chunks, asarray=True, fancy=False, name=name)
        out = _to_cyx(arr, axes, path)
        register_direct(out.name, reader, partial(DirectRegion, axes=axes), source_name=name)
        levels.append(out)
    logger.debug(f"{path}: {len(levels)} pyramid level(s), shapes {[lvl.shape for lvl in levels]}")
    return levels


class TiffLevel:
    """One pyramid level of a TIFF as a sliceable array that is safe across processes and threads.

    The file is opened lazily, once per process (a forked DataLoader worker must not share the parent's file
    offset: interleaved seek/read from two processes returns garbage), and never pickled open.
    """

    def __init__(self, path: str, level: int, shape: tuple[int, ...], dtype) -> None:
        self.path, self.level, self.shape, self.dtype = path, level, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self._pid: int | None = None
        self._array = None
        self._tif = None

    def _open(self):
        pid = os.getpid()
        if self._array is None or self._pid != pid:
            self._tif = tifffile.TiffFile(self.path)
            self._array = zarr.open(self._tif.series[0].aszarr(level=self.level), mode="r")
            self._pid = pid
        return self._array

    def __getitem__(self, key):
        return self._open()[key]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = state["_tif"] = state["_pid"] = None
        return state

    def close(self) -> None:
        """Close the file if this process opened it (it is opened again on the next read)."""
        tif, pid = self._tif, self._pid
        self._array = self._tif = self._pid = None
        if tif is not None and pid == os.getpid():
            tif.close()

    def __del__(self) -> None:  # the arrays that read through this reader are gone: release the file now
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown: nothing left to release
            pass


class DirectRegion:
    """Read a ``(c, y, x)`` region of a TIFF level straight from the file, without a dask graph.

    For random tile access on a whole-slide image, slicing the dask array costs time proportional to its number of
    chunks (tens of thousands); this decodes only the file tiles the region touches.
    """

    def __init__(self, reader: TiffLevel, axes: str) -> None:
        self.reader, self.axes = reader, axes.upper()

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        key, kept = [], []
        for ax, n in zip(self.axes, self.reader.shape, strict=True):
            if ax == "Y":
                key.append(slice(y0, y1))
                kept.append(ax)
            elif ax == "X":
                key.append(slice(x0, x1))
                kept.append(ax)
            elif ax in _CHANNEL_AXES and n != 1:
                key.append(slice(None))
                kept.append("C")
            else:
                key.append(0)
        arr = np.asarray(self.reader[tuple(key)])
        if "C" not in kept:
            return arr.transpose(kept.index("Y"), kept.index("X"))[None]
        return arr.transpose(kept.index("C"), kept.index("Y"), kept.index("X"))


# dask array name -> (weak reference to the object the array reads through, which makes its direct region reader).
# Weak, so that the registry keeps no file open: the array's dask graph holds that object, and when the last array
# (and so the slide) is gone, the object is freed, its file closed and its entry removed. Looked up by
# dbk.pp.TileDataset for the arrays of read_tiff_levels and of WSIData readers (dbk.io._wsidata).
_DIRECT: dict[str, tuple[weakref.ref, Callable[[Any], Any]]] = {}
# the name of each source's own array (a level's array may be registered under its (c, y, x) view's name too)
_SOURCES: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register_direct(name: str, source: Any, make: Callable[[Any], Any], *, source_name: str | None = None) -> None:
    """Register ``make(source)`` as the direct region reader of the dask array ``name``, as long as ``source`` lives.

    ``source`` must be held by the array's graph (the object :func:`dask.array.from_array` wraps, or the reader its
    tasks call): the registry holds it weakly. ``source_name`` (default ``name``) lets :func:`_live_source` find it.
    """
    def _gone(ref, n=name) -> None:
        if _DIRECT.get(n, (None,))[0] is ref:  # not an entry registered again since, for a newer source
            del _DIRECT[n]

    _DIRECT[name] = (weakref.ref(source, _gone), make)
    _SOURCES[source_name or name] = source


def _live_source(name: str, kind: type):
    """The live source registered under ``name`` if it is a ``kind``, else ``None``."""
    source = _SOURCES.get(name)
    return source if isinstance(source, kind) else None


def direct_reader(arr):
    """The direct region reader behind a dask array of :func:`read_tiff_levels` or a WSIData, if it is one."""
    entry = _DIRECT.get(getattr(arr, "name", None))
    if entry is None:
        return None
    source = entry[0]()
    return None if source is None else entry[1](source)


def _data_end(series) -> int:
    """The largest byte offset any strip or tile of the series' pages reaches (from the TIFF headers only)."""
    end = 0
    for lvl in series.levels:
        for page in lvl.pages:
            offsets, counts = getattr(page, "dataoffsets", None), getattr(page, "databytecounts", None)
            if offsets and counts:
                end = max(end, max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False)))
    return end


def _chunks_of(series, level: int) -> tuple[int, ...]:
    """The file's own tile (or strip) shape for a level, as dask chunks; whole rows for untiled files."""
    page = series.levels[level].pages[0]
    shape = series.levels[level].shape
    axes = series.levels[level].axes
    if getattr(page, "is_tiled", False):
        th, tw = page.tilelength, page.tilewidth
    else:
        th, tw = max(1, getattr(page, "rowsperstrip", 0) or 256), shape[axes.index("X")]
    return tuple(th if ax == "Y" else tw if ax == "X" else n for ax, n in zip(axes, shape, strict=True))


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
