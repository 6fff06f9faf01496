"""Exact, streaming assignment of points to axis-aligned square tiles with half-open bounds.

A point (x, y) belongs to tile t iff ``x0[t] <= x < x1[t]`` and ``y0[t] <= y < y1[t]``. Non-overlapping tiles get
each point at most once; overlapping tiles (dense grids) each count the points they contain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TileLookup:
    """Buckets of side ``size`` over the tiles' extent, each listing (up to ``k``) tiles that touch it."""

    bounds: np.ndarray  # (n, 4) x0, y0, x1, y1
    size: int
    ox: int
    oy: int
    table: np.ndarray  # (nby, nbx, k) int32, -1 padded
    aligned: bool = False  # every tile is exactly one bucket: the bucket of a point is its tile, no bounds test

    @classmethod
    def build(cls, bounds: np.ndarray) -> TileLookup:
        bounds = np.asarray(bounds, dtype=np.int64)
        if bounds.ndim != 2 or bounds.shape[1] != 4 or len(bounds) == 0:
            raise ValueError(f"Tile bounds must be a non-empty (n, 4) array, got shape {bounds.shape}.")
        sizes = np.maximum(bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1])
        if (bounds[:, 2] <= bounds[:, 0]).any() or (bounds[:, 3] <= bounds[:, 1]).any():
            raise ValueError("Tiles must have x1 > x0 and y1 > y0.")
        size = int(sizes.max())
        ox, oy = int(bounds[:, 0].min()), int(bounds[:, 1].min())
        bx0 = (bounds[:, 0] - ox) // size
        by0 = (bounds[:, 1] - oy) // size
        bx1 = -((ox - bounds[:, 2]) // size) - 1  # ceil((x1 - ox) / size) - 1
        by1 = -((oy - bounds[:, 3]) // size) - 1
        nbx, nby = int(bx1.max()) + 1, int(by1.max()) + 1
        pairs = []
        for dy in range(int((by1 - by0).max()) + 1):
            for dx in range(int((bx1 - bx0).max()) + 1):
                ok = (by0 + dy <= by1) & (bx0 + dx <= bx1)
                t = np.nonzero(ok)[0]
                pairs.append(((by0[t] + dy) * nbx + bx0[t] + dx, t))
        bucket = np.concatenate([p[0] for p in pairs])
        tile = np.concatenate([p[1] for p in pairs])
        order = np.argsort(bucket, kind="stable")
        bucket, tile = bucket[order], tile[order]
        counts = np.bincount(bucket, minlength=nbx * nby)
        k = int(counts.max())
        slot = np.arange(len(bucket)) - np.repeat(np.cumsum(counts) - counts, counts)
        table = np.full((nby * nbx, k), -1, dtype=np.int32)
        table[bucket, slot] = tile
        aligned = bool(
            k == 1
            and (bounds[:, 2] - bounds[:, 0] == size).all()
            and (bounds[:, 3] - bounds[:, 1] == size).all()
            and ((bounds[:, 0] - ox) % size == 0).all()
            and ((bounds[:, 1] - oy) % size == 0).all()
        )
        return cls(bounds, size, ox, oy, table.reshape(nby, nbx, k), aligned)

    def assign(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(point_index, tile_index)`` pairs for every tile containing a point."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        nby, nbx, k = self.table.shape
        # true division, not multiplication by 1/size: a point exactly on an edge must land in the next tile
        bx = np.floor((x - self.ox) / self.size)
        by = np.floor((y - self.oy) / self.size)
        valid = (bx >= 0) & (bx < nbx) & (by >= 0) & (by < nby)  # also drops NaN
        if self.aligned:
            idx = np.nonzero(valid)[0]
            flat = by[idx].astype(np.int64) * nbx + bx[idx].astype(np.int64)
            t = self.table.reshape(-1)[flat]
            has = t >= 0
            return idx[has], t[has].astype(np.int64)
        idx = np.nonzero(valid)[0]
        bxi, byi = bx[idx].astype(np.int64), by[idx].astype(np.int64)
        xs, ys = x[idx], y[idx]
        out_p, out_t = [], []
        for j in range(k):
            t = self.table[byi, bxi, j]
            has = t >= 0
            tt = np.where(has, t, 0)
            b = self.bounds[tt]
            inside = has & (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])
            out_p.append(idx[inside])
            out_t.append(t[inside].astype(np.int64))
        return np.concatenate(out_p), np.concatenate(out_t)


def _count_kernel_py(x, y, qv, codes, lut, min_qv, m, ox, oy, size, table, bounds, aligned, out):
    """Count points into ``out[tile, lut[code]]``: one pass, no temporaries (compiled with numba when present).

    ``m`` is the 2x3 affine to image pixels; a point counts in every tile whose half-open bounds contain it.
    Returns the number of points counted.
    """
    nby, nbx, k = table.shape
    n_counted = 0
    for i in range(x.shape[0]):
        if qv.shape[0] and not (qv[i] >= min_qv):
            continue
        c = codes[i]
        if c < 0:
            continue
        g = lut[c]
        if g < 0:
            continue
        xf = m[0, 0] * x[i] + m[0, 1] * y[i] + m[0, 2]
        yf = m[1, 0] * x[i] + m[1, 1] * y[i] + m[1, 2]
        bxf = np.floor((xf - ox) / size)
        byf = np.floor((yf - oy) / size)
        if not (bxf >= 0 and bxf < nbx and byf >= 0 and byf < nby):  # also rejects NaN
            continue
        bx, by = int(bxf), int(byf)
        for j in range(k):
            t = table[by, bx, j]
            if t < 0:
                break
            if aligned or (
                xf >= bounds[t, 0] and xf < bounds[t, 2] and yf >= bounds[t, 1] and yf < bounds[t, 3]
            ):
                out[t, g] += 1
                n_counted += 1
    return n_counted


try:  # numba ships with scanpy, a dependency; the pure-Python kernel is the (slow) reference
    import numba

    count_kernel = numba.njit(nogil=True, cache=True)(_count_kernel_py)
except ImportError:  # pragma: no cover
    count_kernel = _count_kernel_py
