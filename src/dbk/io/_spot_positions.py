"""Where the spots of a spot table are on the H&E: ``obsm["spatial"]`` or the ``obs`` columns other tools write.

HEST writes spot centres to ``obsm["spatial"]``; tables that went through other tools carry them as ``obs`` columns
(Space Ranger's ``pxl_col_in_fullres`` / ``pxl_row_in_fullres``, stLearn's ``imagecol`` / ``imagerow``, SpaGCN's
``x_pixel`` / ``y_pixel``, the ST Spot Detector's ``pixel_x`` / ``pixel_y``), and not always in (x, y) order:
SpaGCN's ``x_pixel`` is the image row. :func:`spot_positions` finds them and checks the axis order against the image.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import xarray as xr

from .._constants import SPATIAL_KEY
from .._logging import logger

# (x column, y column) pairs of spot centres in full-resolution image pixels, in the order they are looked for
OBS_XY_COLUMNS = (
    ("pxl_col_in_fullres", "pxl_row_in_fullres"),  # Space Ranger tissue_positions (column = x, row = y)
    ("imagecol", "imagerow"),  # stLearn
    ("x_pixel", "y_pixel"),  # SpaGCN (whose x_pixel is the image row: the axis check below finds that)
    ("pixel_x", "pixel_y"),  # ST Spot Detector
    ("he_x", "he_y"),  # HEST's transcripts naming
)
ARRAY_COLUMNS = ("array_row", "array_col", "x_array", "y_array", "array_x", "array_y", "row", "col")
FIT = 0.95  # an axis order fits when at least this share of the spots lies on the image
TISSUE_MARGIN = 0.2  # both orders fit: swap when the swapped order puts this much more of the spots on tissue
TISSUE_SATURATION = 0.1  # a pixel is tissue when its saturation (max - min) / max of RGB exceeds this
_TISSUE_SIDE = 2048  # the tissue check reads the coarsest level, strided down to at most this side


def spot_positions(adata: ad.AnnData, image: xr.DataArray | xr.DataTree, path: Path) -> np.ndarray:
    """The spots' ``(x, y)`` centres in level-0 pixels of ``image``, checked against it; see the module docstring.

    From ``obsm["spatial"]`` when present (the image's extent then only decides whether x and y are swapped), else
    from the first pair of :data:`OBS_XY_COLUMNS` in ``obs``: both axis orders are tried, against the image's
    extent and, when both fit it, against the tissue (saturation of the coarsest pyramid level). The order that
    fits clearly better is used, with a warning when it is the swapped one; when neither fits the image, a
    ``ValueError`` names the file, the columns and the image's extent.
    """
    h, w = image_extent(image)
    if SPATIAL_KEY in adata.obsm:
        xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
        return _check_order(xy, h, w, image, path, f"obsm[{SPATIAL_KEY!r}]", use_tissue=False)
    cols = next((pair for pair in OBS_XY_COLUMNS if all(c in adata.obs.columns for c in pair)), None)
    if cols is None:
        arrays = [c for c in ARRAY_COLUMNS if c in adata.obs.columns]
        hint = (f" It has {arrays}: array indices, not pixels; dbk needs each spot's centre in the image's pixels."
                if arrays else "")
        raise ValueError(
            f"{path} gives no spot centres: no obsm[{SPATIAL_KEY!r}] and none of the obs column pairs "
            f"{[list(p) for p in OBS_XY_COLUMNS]} (obs columns: {list(adata.obs.columns)[:20]}).{hint} Put the "
            f"centres (x, y) in full-resolution image pixels into obsm[{SPATIAL_KEY!r}]."
        )
    xy = adata.obs[list(cols)].to_numpy(dtype=np.float64)
    return _check_order(xy, h, w, image, path, f"obs columns {list(cols)}", use_tissue=True)


def image_extent(image: xr.DataArray | xr.DataTree) -> tuple[int, int]:
    """``(h, w)`` of an image element's level 0."""
    level0 = image if isinstance(image, xr.DataArray) else next(iter(image["scale0"].values()))
    return int(level0.sizes["y"]), int(level0.sizes["x"])


def _check_order(xy, h, w, image, path: Path, source: str, *, use_tissue: bool) -> np.ndarray:
    ok = np.isfinite(xy).all(axis=1)
    if not ok.any():
        raise ValueError(f"{path}: the spot centres in {source} are all NaN or infinite.")
    given, swapped = _on_image(xy[ok], h, w), _on_image(xy[ok, ::-1], h, w)
    extent = (f"the image is {w:,} px wide (x) and {h:,} px high (y); the values span {np.nanmin(xy[:, 0]):,.0f} "
              f"to {np.nanmax(xy[:, 0]):,.0f} (first) and {np.nanmin(xy[:, 1]):,.0f} to {np.nanmax(xy[:, 1]):,.0f} "
              "(second)")
    swap = False
    if given >= FIT and swapped >= FIT:
        if use_tissue:
            mask = tissue_map(image)
            t_given, t_swapped = _on_tissue(xy[ok], mask, h, w), _on_tissue(xy[ok, ::-1], mask, h, w)
            swap = t_swapped >= t_given + TISSUE_MARGIN and t_swapped >= 0.5
            why = (f"{t_swapped:.0%} of the spots lie over tissue with the columns swapped, {t_given:.0%} as given "
                   f"(both orders fit the image: {extent})")
    elif swapped >= FIT and swapped > given:
        swap = True
        why = f"{swapped:.0%} of the spots lie on the image with the columns swapped, {given:.0%} as given ({extent})"
    elif given < FIT:
        raise ValueError(
            f"{path}: the spot centres in {source} do not fit the H&E image in either axis order: {given:.0%} of the "
            f"spots lie on it as given, {swapped:.0%} swapped; {extent}. Are they full-resolution pixels of this "
            "image (not µm, not a downscaled image's pixels, not array indices)?"
        )
    if swap:
        logger.warning(f"{path}: reading the spot centres in {source} as (y, x), not (x, y): {why}.")
        return np.ascontiguousarray(xy[:, ::-1])
    return xy


def _on_image(xy: np.ndarray, h: int, w: int) -> float:
    return float(np.mean((xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)))


def tissue_map(image: xr.DataArray | xr.DataTree) -> np.ndarray:
    """A boolean tissue map from the saturation of the image's coarsest level (at most ~2048 px a side)."""
    if isinstance(image, xr.DataArray):
        level = image
    else:
        names = sorted(image.children, key=lambda n: int("".join(ch for ch in n if ch.isdigit()) or 0))
        level = next(iter(image[names[-1]].values()))
    step = max(1, int(np.ceil(max(level.sizes["y"], level.sizes["x"]) / _TISSUE_SIDE)))
    rgb = np.asarray(level.data[:3, ::step, ::step]).astype(np.float32)
    top = rgb.max(axis=0)
    sat = (top - rgb.min(axis=0)) / np.maximum(top, 1.0)
    return sat > TISSUE_SATURATION


def _on_tissue(xy: np.ndarray, mask: np.ndarray, h: int, w: int) -> float:
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    ix = np.clip((xy[inside, 0] * mask.shape[1] / w).astype(np.int64), 0, mask.shape[1] - 1)
    iy = np.clip((xy[inside, 1] * mask.shape[0] / h).astype(np.int64), 0, mask.shape[0] - 1)
    return float(mask[iy, ix].sum() / len(xy))
