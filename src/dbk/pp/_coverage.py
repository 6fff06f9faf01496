"""How much of a slide's expression the tiles hold: counts off the image or outside every tile never vanish silently.

:func:`dbk.pp.pseudobulk` records the share of counts (transcripts, cell counts, spot counts) on the image and inside
a tile and warns when it is suspiciously low. What the tissue filter of :func:`dbk.pp.make_tiles`
(``min_tissue_fraction``) dropped is measured where it costs no extra read: by ``make_tiles`` on the cells / spots
(shapes, in memory), and by ``pseudobulk`` on the transcripts, exactly, in the pass that reads every point anyway; when
the filter dropped no tile, nothing is measured (nothing was lost).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from spatialdata import SpatialData

from .._constants import CELLS_KEY, SPOTS_KEY
from .._image import affine_to_image_pixels
from .._logging import logger
from ._binning import TileLookup

# Thresholds (documented in dbk.pp.pseudobulk / dbk.pp.make_tiles):
OFF_IMAGE_WARN = 0.05  # counts off the image: always suspicious; warn above 5% of the counts
OUTSIDE_TILES_WARN = 0.5  # counts on the image outside every tile: expected in part (tiles cover tissue); warn > 50%
TISSUE_LOSS_WARN = 0.25  # cells / spots / transcripts in grid tiles the tissue filter dropped: warn above 25%

_CAUSE_LIST = ("x and y swapped, a wrong pixel size (the scale between the points and the image), or the points in "
               "another coordinate system than the image (check their transformations)")
_CAUSES = f"Likely causes: {_CAUSE_LIST}."


@dataclass
class Coverage:
    """Counts seen, on the image and inside a tile, and the extent of the points in image pixels."""

    n_total: float = 0.0
    n_in_image: float = 0.0
    n_in_tiles: float = 0.0
    n_in_dropped: float = 0.0  # in a grid tile the tissue filter dropped and in no kept tile (transcripts only)
    xmin: float = np.inf
    xmax: float = -np.inf
    ymin: float = np.inf
    ymax: float = -np.inf

    def add(self, x: np.ndarray, y: np.ndarray, in_tiles: float, shape: tuple[int, int] | None,
            weights: np.ndarray | None = None) -> tuple[float, float, float, float] | None:
        """Add points at image pixels ``x, y`` (all finite), ``in_tiles`` of them (weighted) inside a tile.

        Returns their extent ``(xmin, xmax, ymin, ymax)`` (NaN where a coordinate is NaN), ``None`` for no point.
        """
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.n_total += float(len(x)) if w is None else float(w.sum())
        self.n_in_tiles += float(in_tiles)
        if not len(x):
            return None
        xmin, xmax, ymin, ymax = float(x.min()), float(x.max()), float(y.min()), float(y.max())
        if shape is not None:
            if xmin >= 0 and xmax < shape[1] and ymin >= 0 and ymax < shape[0]:  # all on the image: no per-point test
                self.n_in_image += float(len(x)) if w is None else float(w.sum())
            else:
                inside = (x >= 0) & (x < shape[1]) & (y >= 0) & (y < shape[0])
                self.n_in_image += float(np.count_nonzero(inside)) if w is None else float(w[inside].sum())
        self.xmin, self.xmax = min(self.xmin, xmin), max(self.xmax, xmax)
        self.ymin, self.ymax = min(self.ymin, ymin), max(self.ymax, ymax)
        return xmin, xmax, ymin, ymax

    def merge(self, other: Coverage) -> None:
        self.n_total += other.n_total
        self.n_in_image += other.n_in_image
        self.n_in_tiles += other.n_in_tiles
        self.n_in_dropped += other.n_in_dropped
        self.xmin, self.xmax = min(self.xmin, other.xmin), max(self.xmax, other.xmax)
        self.ymin, self.ymax = min(self.ymin, other.ymin), max(self.ymax, other.ymax)


def report_pseudobulk(cov: Coverage, what: str, image_key: str | None, shape: tuple[int, int] | None,
                      tiles_key: str, n_tiles: int) -> dict:
    """Log (and warn about) the counts off the image / outside every tile; return the record for ``uns``."""
    rec: dict = {"n_counts_source": int(round(cov.n_total))}
    if cov.n_total <= 0:
        rec["fraction_in_image"] = rec["fraction_in_tiles"] = "None"
        return rec
    f_tiles = cov.n_in_tiles / cov.n_total
    rec["fraction_in_tiles"] = float(f_tiles)
    if shape is None or not np.isfinite(cov.n_in_image):
        rec["fraction_in_image"] = "None"
        logger.info(f"pseudobulk: {f_tiles:.1%} of the {cov.n_total:,.0f} {what} lie inside a tile.")
        return rec
    f_image = cov.n_in_image / cov.n_total
    rec["fraction_in_image"] = float(f_image)
    h, w = shape
    logger.info(f"pseudobulk: of the {cov.n_total:,.0f} {what}, {f_image:.1%} lie on image {image_key!r} and "
                f"{f_tiles:.1%} inside a tile of {tiles_key!r}.")
    extent = (f"they span x {cov.xmin:,.0f} to {cov.xmax:,.0f} and y {cov.ymin:,.0f} to {cov.ymax:,.0f} in the "
              f"image's pixels, the image is {w:,} px wide (x) and {h:,} px high (y)")
    if 1 - f_image > OFF_IMAGE_WARN:
        swapped = (cov.xmin >= -0.05 * h and cov.xmax <= 1.05 * h and cov.ymin >= -0.05 * w and cov.ymax <= 1.05 * w)
        logger.warning(
            f"pseudobulk: {1 - f_image:.1%} of the {cov.n_total:,.0f} {what} ({cov.n_total - cov.n_in_image:,.0f}) "
            f"lie off image {image_key!r} and were not counted; {extent}"
            + (" (their extent fits the image with x and y swapped)" if swapped else "") + f". {_CAUSES}"
        )
    outside = 1 - cov.n_in_tiles / cov.n_in_image if cov.n_in_image > 0 else 0.0
    if outside > OUTSIDE_TILES_WARN:
        logger.warning(
            f"pseudobulk: {outside:.1%} of the {cov.n_in_image:,.0f} {what} on image {image_key!r} lie outside every "
            f"one of the {n_tiles:,} tiles of {tiles_key!r} and were not counted. Some is expected (tiles cover the "
            "tissue only), this much suggests the tiles miss the tissue the counts are on: points and image not "
            f"aligned ({_CAUSE_LIST}), or a tissue mask that misses tissue (lower "
            "make_tiles(min_tissue_fraction=) or check the tissue mask)."
        )
    return rec


def n_points_in_tiles(lookup: TileLookup, p: np.ndarray, weights: np.ndarray | None = None) -> float:
    """How many of the points with pairs ``p`` (from :meth:`TileLookup.assign`) lie in at least one tile."""
    if lookup.table.shape[2] > 1:  # a point may be in several (overlapping) tiles: count it once
        p = np.unique(p)
    return float(len(p)) if weights is None else float(np.asarray(weights, dtype=np.float64)[p].sum())


# -- make_tiles: what the tissue filter drops ------------------------------------------------------------------------


def tissue_filter_loss(
    sdata: SpatialData, image_key: str, x0: np.ndarray, y0: np.ndarray, size: int, keep: np.ndarray,
    min_tissue_fraction: float, spots_key: str | None,
) -> dict | None:
    """Share of the cells (else spots) of the grid that the tissue filter dropped, from the shapes in memory.

    Logs it and warns above :data:`TISSUE_LOSS_WARN`; returns the record for the tiles' attrs (``None`` when the
    slide has neither: transcripts are measured by :func:`dbk.pp.pseudobulk`, which reads them anyway). Reads no
    points.
    """
    found = _positions(sdata, image_key, spots_key)
    if found is None:
        return None
    what, x, y = found
    bounds = np.column_stack([x0, y0, x0 + size, y0 + size]).astype(np.int64)
    lookup = TileLookup.build(bounds)
    p, t = lookup.assign(x, y)
    n_grid = n_points_in_tiles(lookup, p)
    kept = keep[t]
    n_kept = n_points_in_tiles(lookup, p[kept])
    rec = {"objects": what, "n_in_grid": int(n_grid), "n_dropped": int(n_grid - n_kept),
           "fraction_dropped": float((n_grid - n_kept) / n_grid) if n_grid else 0.0}
    if n_grid:
        say_tissue_loss("make_tiles", what, min_tissue_fraction, rec["n_in_grid"], rec["n_dropped"])
    return rec


def say_tissue_loss(who: str, what: str, min_tissue_fraction: float, n_grid: int, n_dropped: int,
                    tail: str = "") -> None:
    """Log what the tissue filter dropped (``n_dropped`` of the ``n_grid`` ``what`` in the grid); warn above 25%."""
    frac = n_dropped / n_grid if n_grid else 0.0
    msg = (f"{who}: dropping the tiles with tissue fraction < {min_tissue_fraction:g} drops {frac:.1%} of the "
           f"{what} in the grid ({n_dropped:,} of {n_grid:,}){tail}")
    if frac > TISSUE_LOSS_WARN:
        logger.warning(f"{msg}. The tissue mask may miss tissue (faint staining, fat, ...): check it (sdata.labels), "
                       "lower min_tissue_fraction, or check that the points are aligned with the image.")
    else:
        logger.info(f"{msg}.")


def dropped_grid_tiles(meta: dict, bounds: np.ndarray, tiles_key: str) -> np.ndarray | None:
    """``(n, 4)`` bounds of the grid tiles :func:`dbk.pp.make_tiles` dropped for their tissue fraction, from its record.

    ``None`` when there are none (spot tiles, a grid without dropped tiles, or tiles made otherwise) or when the tiles
    are no longer the ones ``make_tiles`` kept (their number or positions changed since): then the points in the
    dropped tiles could not be told apart from the points in tiles removed by hand.
    """
    grid, filt = meta.get("grid"), meta.get("tissue_filter")
    if meta.get("mode") != "grid" or not isinstance(grid, dict) or not isinstance(filt, dict):
        return None
    n_dropped = int(filt.get("n_tiles_dropped", 0) or 0)
    if n_dropped <= 0:
        return None
    try:
        stride, size = int(grid["stride_px"]), int(meta["tile_size_px"])
        n_rows, n_cols = int(grid["n_rows"]), int(grid["n_cols"])
    except (KeyError, TypeError, ValueError):
        return None
    b = np.asarray(bounds, dtype=np.int64)
    col, row = b[:, 0] // stride, b[:, 1] // stride
    on_grid = ((b[:, 0] % stride == 0) & (b[:, 1] % stride == 0) & (b[:, 2] - b[:, 0] == size)
               & (b[:, 3] - b[:, 1] == size) & (col >= 0) & (col < n_cols) & (row >= 0) & (row < n_rows))
    present = np.zeros((n_rows, n_cols), dtype=bool)
    if on_grid.all():
        present[row, col] = True
    if not on_grid.all() or len(b) != n_rows * n_cols - n_dropped or int(present.sum()) != len(b):
        logger.info(f"pseudobulk: the tiles of {tiles_key!r} are not the {n_rows * n_cols - n_dropped:,} grid tiles "
                    f"make_tiles kept ({len(b):,} tiles now), so the transcripts in the {n_dropped:,} tiles its tissue "
                    "filter dropped are not counted.")
        return None
    r, c = np.nonzero(~present)
    x0, y0 = c.astype(np.int64) * stride, r.astype(np.int64) * stride
    return np.column_stack([x0, y0, x0 + size, y0 + size])


def report_tissue_filter(cov: Coverage, what: str, meta: dict) -> dict:
    """Log (and warn about) the transcripts in the tiles the tissue filter dropped; return the record for ``uns``.

    ``cov.n_in_dropped`` holds the points (passing the filters) in a dropped grid tile and in no kept one, so those in
    the grid are ``cov.n_in_tiles + cov.n_in_dropped``.
    """
    filt = meta["tissue_filter"]
    t = float(filt["min_tissue_fraction"])
    n_dropped = int(round(cov.n_in_dropped))
    n_grid = int(round(cov.n_in_tiles)) + n_dropped
    rec = {"min_tissue_fraction": t, "n_tiles_dropped": int(filt["n_tiles_dropped"]), "objects": what,
           "n_in_grid": n_grid, "n_dropped": n_dropped,
           "fraction_dropped": float(n_dropped / n_grid) if n_grid else 0.0}
    if n_grid:
        say_tissue_loss("pseudobulk", what, t, n_grid, n_dropped, tail=", which were not counted")
    return rec


def _positions(sdata: SpatialData, image_key: str, spots_key: str | None):
    """``(what, x, y)``: cell centroids, else spot centres, in image pixels; ``None`` without either."""
    for key, what in ((CELLS_KEY, "cell centroids"), (spots_key or SPOTS_KEY, "spots")):
        if key in sdata.shapes and len(sdata.shapes[key]):
            c = sdata.shapes[key].geometry.centroid
            x, y = _to_image(sdata, key, image_key, c.x.to_numpy(), c.y.to_numpy())
            if x is not None:
                return what, x, y
    return None


def _to_image(sdata, key, image_key, x, y):
    try:
        m = affine_to_image_pixels(sdata, key, image_key)
    except ValueError:  # no shared coordinate system: nothing to say here (pseudobulk raises on it)
        return None, None
    xi, yi = m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]
    ok = np.isfinite(xi) & np.isfinite(yi)
    return xi[ok], yi[ok]
