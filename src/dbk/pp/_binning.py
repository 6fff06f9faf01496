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
        """Return ``(point_index, tile_index)`` pairs for every tile containing a point.

        Coordinates of any real dtype are compared in float64 (exact for float32 and integers below 2**53).
        """
        x = np.asarray(x)
        y = np.asarray(y)
        if x.dtype.kind not in "fiu" or y.dtype.kind not in "fiu":
            x, y = x.astype(np.float64), y.astype(np.float64)
        nby, nbx, k = self.table.shape
        # true division, not multiplication by 1/size: a point exactly on an edge must land in the next tile
        bx = _bucket(x, self.ox, self.size)
        by = _bucket(y, self.oy, self.size)
        valid = bx >= 0  # the four tests also drop NaN
        valid &= bx < nbx
        valid &= by >= 0
        valid &= by < nby
        if self.aligned:
            idx = np.flatnonzero(valid)
            cell = by[idx]  # by * nbx + bx is exact in float64 (far below 2**53), one integer cast instead of two
            cell *= nbx
            cell += bx[idx]
            t = self.table.reshape(-1).take(cell.astype(np.intp))
            has = t >= 0
            if has.all():
                return idx, t.astype(np.int64)
            return idx[has], t[has].astype(np.int64)
        idx = np.nonzero(valid)[0]
        bxi, byi = bx[idx].astype(np.int64), by[idx].astype(np.int64)
        xs, ys = x[idx].astype(np.float64), y[idx].astype(np.float64)
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


def _bucket(v: np.ndarray, origin: int, size: int) -> np.ndarray:
    """``floor((v - origin) / size)`` computed in float64 (whatever ``v``'s dtype), in one new array."""
    if origin:
        out = np.subtract(v, origin, dtype=np.float64)
        np.divide(out, size, out=out)
    else:
        out = np.divide(v, size, dtype=np.float64)
    return np.floor(out, out=out)


def apply_affine(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(m[0, 0] x + m[0, 1] y + m[0, 2], m[1, 0] x + m[1, 1] y + m[1, 2])`` in float64, skipping zero / unit terms.

    Skipping a ``0 * v`` term, a ``1 *`` factor or a ``+ 0`` changes no finite result (the sign of a zero aside, which
    no tile test sees); callers drop points with a non-finite coordinate, the only ones where it could matter. The
    identity returns ``x`` and ``y`` unchanged (any real dtype: :meth:`TileLookup.assign` compares in float64).
    """
    if m[0, 0] == 1 and m[1, 1] == 1 and not (m[0, 1] or m[0, 2] or m[1, 0] or m[1, 2]):
        return np.asarray(x), np.asarray(y)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)

    def axis(a: float, b: float, c: float) -> np.ndarray:  # (a x + b y) + c, in that order; may return x or y
        out = None
        for coef, v in ((a, x), (b, y)):
            if coef != 0:
                term = v if coef == 1 else coef * v
                out = term if out is None else out + term
        if out is None:
            out = np.zeros_like(x)
        return out + c if c != 0 else out

    return axis(m[0, 0], m[0, 1], m[0, 2]), axis(m[1, 0], m[1, 1], m[1, 2])
