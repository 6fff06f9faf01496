"""Tissue detection on a low-resolution level of the H&E."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel
from spatialdata.transformations import Scale, Sequence, get_transformation

from .._constants import TISSUE_KEY
from .._image import image_levels, resolve_image_key
from .._logging import logger
from .._utils import copy_sdata

# Why not squidpy.experimental.im.detect_tissue: it upsamples the mask to the full image size (a 40k x 40k slide
# gives a 1.6 GB array); dbk keeps the mask at the low resolution it was computed at, with a Scale transform, so
# tissue fractions of tiles are read from a few MB.


def _low_res_rgb(sdata: SpatialData, image_key: str, max_pixels: int) -> tuple[np.ndarray, float, float]:
    """(y, x, c) array of at most ~max_pixels pixels and its downsampling (y, x) from level 0.

    Takes the finest pyramid level under the budget; when even the coarsest level is larger (e.g. an image without
    a pyramid), it is strided chunk by chunk through dask, so the full level is never held in memory.
    """
    levels = image_levels(sdata, image_key)
    lvl = next((lv for lv in levels if lv.shape_yx[0] * lv.shape_yx[1] <= max_pixels), levels[-1])
    h, w = lvl.shape_yx
    step = max(1, int(np.ceil(np.sqrt(h * w / max_pixels))))
    if step > 1:
        logger.info(f"tissue_mask: image {image_key!r} has no level under {max_pixels:,} px; striding by {step}.")
    arr = lvl.data.data[:, ::step, ::step]
    arr = np.asarray(arr.compute() if hasattr(arr, "compute") else arr).transpose(1, 2, 0)
    # the strided grid's pixel i sits at level pixel i * step: its footprint is step level pixels
    return arr, lvl.downsample_y * step, lvl.downsample_x * step


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between))])


def tissue_mask(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    max_pixels: int = 4_000_000,
    threshold: float | None = None,
    min_object_um2: float = 20_000.0,
    min_hole_um2: float = 20_000.0,
    key_added: str = TISSUE_KEY,
    copy: bool = False,
) -> SpatialData | None:
    """Detect tissue on a low-resolution level of the H&E image.

    Pixels are tissue where the HSV saturation exceeds an Otsu threshold (stained tissue is coloured, glass is
    white or grey); holes smaller than ``min_hole_um2`` are filled and objects smaller than ``min_object_um2``
    removed. The mask is computed and stored at the level it was computed at, never at full resolution.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image.
    image_key
        The H&E image; the only image when ``None``.
    max_pixels
        Use the finest pyramid level with at most this many pixels.
    threshold
        Saturation threshold in [0, 1]; Otsu's when ``None``.
    min_object_um2
        Remove tissue fragments smaller than this area (µm²).
    min_hole_um2
        Fill holes smaller than this area (µm²).
    key_added
        Name of the labels element.
    copy
        Return a modified copy instead of changing ``sdata`` in place.

    Returns
    -------
    ``None`` (or the copy when ``copy=True``); writes ``sdata.labels[key_added]``: uint8 (1 tissue, 0 background)
    at low resolution, with the image's transformations composed with a ``Scale`` to level-0 pixels. The
    threshold used is in ``sdata.labels[key_added].attrs`` is not persisted; it is logged.
    """
    from .._image import get_pixel_size

    key = resolve_image_key(sdata, image_key)
    if copy:
        sdata = copy_sdata(sdata)
    rgb, ds_y, ds_x = _low_res_rgb(sdata, key, max_pixels)
    if rgb.shape[-1] < 3:
        raise ValueError(f"Image {key!r} has {rgb.shape[-1]} channels; tissue detection needs RGB.")
    rgb = rgb[..., :3].astype(np.float32)
    if rgb.max() > 1.0:
        rgb /= 255.0 if rgb.max() <= 255.0 else float(rgb.max())
    cmax, cmin = rgb.max(-1), rgb.min(-1)
    sat = np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0)
    thr = _otsu(sat.ravel()) if threshold is None else float(threshold)
    mask = sat > thr
    px_um = get_pixel_size(sdata, key) * float(np.sqrt(ds_x * ds_y))
    min_px = max(1, int(round(min_object_um2 / px_um**2)))
    hole_px = max(1, int(round(min_hole_um2 / px_um**2)))
    mask = _remove_small(mask, min_px)
    mask = ~_remove_small(~mask, hole_px)
    frac = float(mask.mean())
    logger.info(f"tissue_mask: {frac:.1%} of image {key!r} is tissue (saturation threshold {thr:.3f}).")
    if not mask.any():
        logger.warning(f"tissue_mask: no tissue found in image {key!r} (threshold {thr:.3f}).")
    scale = Scale([ds_y, ds_x], axes=("y", "x"))
    transforms = {cs: Sequence([scale, t]) for cs, t in get_transformation(sdata.images[key], get_all=True).items()}
    sdata.labels[key_added] = Labels2DModel.parse(mask.astype(np.uint8), dims=("y", "x"), transformations=transforms)
    return sdata if copy else None


def _remove_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]
