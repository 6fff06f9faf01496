"""Shared helpers for the H&E image of a SpatialData object: which image, its pyramid levels, its pixel size.

Convention (``docs/data_contract.md``): an H&E image lives in the coordinate system ``"global"`` with an identity
transform (so ``"global"`` is H&E level-0 pixels) and carries a ``Scale`` transform to the coordinate system ``"um"``
(micrometres). The pixel size is read back from that transform. Data made elsewhere (``spatialdata_io``) can be
given a pixel size with :func:`dbk.io.set_pixel_size`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
from spatialdata import SpatialData
from spatialdata.transformations import (
    Identity,
    Scale,
    get_transformation,
    set_transformation,
)

from ._constants import PIXEL_CS, UM_CS


def resolve_image_key(sdata: SpatialData, image_key: str | None) -> str:
    """Return ``image_key`` if it names an image of ``sdata``, or the only image when ``image_key`` is ``None``."""
    if not isinstance(sdata, SpatialData):
        raise TypeError(f"Expected a SpatialData object, got {type(sdata).__name__}.")
    keys = list(sdata.images.keys())
    if image_key is not None:
        if image_key not in sdata.images:
            raise KeyError(f"No image {image_key!r} in sdata.images; available: {keys}.")
        return image_key
    if not keys:
        raise ValueError("sdata has no image; dbk needs the H&E image (sdata.images is empty).")
    if len(keys) > 1:
        raise ValueError(f"sdata has several images {keys}; pass image_key= to say which one is the H&E.")
    return keys[0]


@dataclass(frozen=True)
class ImageLevel:
    """One level of an image pyramid: the lazy ``(c, y, x)`` array and its downsampling from level 0.

    Attributes
    ----------
    data
        The level's lazy ``(c, y, x)`` image.
    downsample_y
        Level-0 height over this level's height (``1.0`` for level 0).
    downsample_x
        Level-0 width over this level's width.
    shape_yx
        ``(height, width)`` of the level in pixels.
    """

    data: xr.DataArray
    downsample_y: float
    downsample_x: float

    @property
    def shape_yx(self) -> tuple[int, int]:
        """``(height, width)`` of the level in pixels."""
        return int(self.data.sizes["y"]), int(self.data.sizes["x"])


def image_levels(sdata: SpatialData, image_key: str | None = None) -> list[ImageLevel]:
    """Pyramid levels of an image, finest first (a single-scale image gives one level).

    The levels are checked: dims ``(c, y, x)`` with 1, 3 or 4 channels, the same channels on every level, each
    level smaller than the one before and downsampled equally in y and x (up to rounding). A float image is read in
    0..1: one in 0..255 is divided by 255 (with a warning), see :func:`float_image_white`.

    Parameters
    ----------
    sdata
        SpatialData with the image.
    image_key
        The H&E image; the only image when ``None``.

    Returns
    -------
    One :class:`~dbk.io.ImageLevel` per level (lazy data, nothing is read), level 0 first.

    Raises
    ------
    ValueError
        If the image has no level dbk can read as described above (e.g. swapped axes), naming the level, or is a
        float image in neither 0..1 nor 0..255 (see :func:`float_image_white`).
    """
    key = resolve_image_key(sdata, image_key)
    element = sdata.images[key]
    if isinstance(element, xr.DataArray):
        names, arrays = ["the image"], [element]
    else:
        names = sorted(element.children, key=_scale_index)
        arrays = [next(iter(element[name].values())) for name in names]
    _check_levels(key, names, arrays)
    if np.issubdtype(arrays[0].dtype, np.floating):
        white = float_image_white(arrays[-1].data, f"Image {key!r}")
        if white != 1.0:  # read as 0..1 from here on, lazily (nothing is computed)
            arrays = [a.copy(data=a.data / np.float32(white)) for a in arrays]
    h0, w0 = int(arrays[0].sizes["y"]), int(arrays[0].sizes["x"])
    return [ImageLevel(a, h0 / int(a.sizes["y"]), w0 / int(a.sizes["x"])) for a in arrays]


# -- float images: 0..1 or 0..255 ---------------------------------------------------------------------------------

FLOAT_01_MAX = 1.5  # a float image whose largest value is at most this is in 0..1 (a little over 1: resampling)
FLOAT_255_MAX = 260.0  # ... at most this (and above FLOAT_01_MAX): in 0..255
FLOAT_NEGATIVE_TOLERANCE = 0.02  # negative values down to -2% of white are resampling ringing; below: refused
_FLOAT_SAMPLE_SIDE = 1024  # the range is measured on a strided sample of the coarsest level, at most this side
_FLOAT_WHITE: dict[str, float] = {}  # dask name of a measured array -> its white: measured (and warned) once


def float_image_white(data, what: str = "Image") -> float:
    """The value of white of a float ``(c, y, x)`` image: ``1.0`` (values in 0..1) or ``255.0`` (values in 0..255).

    H&E models read pixels in 0..1; a float image stored in 0..255 (e.g. ``img.astype(np.float32)`` of a uint8
    image) would otherwise be clipped to 1, nearly white everywhere. The range is measured on the finite values of
    a strided sample of ``data`` (dask arrays: once per array). A largest value of at most 1.5 is 0..1, of at most
    260 is 0..255, said at WARNING with the observed range.

    Parameters
    ----------
    data
        The image (a numpy or dask array, or a DataArray), e.g. the coarsest level of a pyramid.
    what
        The image's name for the messages, e.g. ``"Image 'he'"``.

    Returns
    -------
    ``1.0`` or ``255.0``: divide by it for values in 0..1.

    Raises
    ------
    ValueError
        If the image has no finite value, values above 260 (in neither range; 16-bit data belongs in a uint16
        image) or values below -2% of white, naming the observed range.
    """
    arr = data.data if isinstance(data, xr.DataArray) else data
    name = getattr(arr, "name", None) if hasattr(arr, "dask") else None
    if name is not None and name in _FLOAT_WHITE:
        return _FLOAT_WHITE[name]
    shape = arr.shape[-2:]
    step = max(1, -(-max(shape) // _FLOAT_SAMPLE_SIDE))
    sample = arr[..., ::step, ::step]
    sample = np.asarray(sample.compute() if hasattr(sample, "compute") else sample, dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        raise ValueError(f"{what} is a float image with no finite value (all NaN or infinite); dbk needs pixel values "
                         "in 0..1 or 0..255.")
    lo, hi = float(finite.min()), float(finite.max())
    seen = f"values from {lo:.4g} to {hi:.4g}" + (f", sampled every {step} px" if step > 1 else "")
    if hi > FLOAT_255_MAX:
        raise ValueError(f"{what} is a float image with {seen}: in neither 0..1 nor 0..255, the two ranges dbk reads "
                         "float pixels in. Rescale it to 0..255 and store it as uint8 (16-bit scans: as uint16).")
    white = 1.0 if hi <= FLOAT_01_MAX else 255.0
    if lo < -FLOAT_NEGATIVE_TOLERANCE * white:
        raise ValueError(f"{what} is a float image with {seen}: negative pixel values (below "
                         f"{-FLOAT_NEGATIVE_TOLERANCE * white:g}) are not an RGB image in 0..{white:g}; was it "
                         "normalised (e.g. mean/std)? Pass the un-normalised image, as uint8 0..255.")
    if white == 255.0:
        from ._logging import logger

        logger.warning(f"{what} is a float image with {seen} (largest above {FLOAT_01_MAX:g}): read as 0..255, "
                       "divided by 255, not as 0..1. Store it as uint8 (or scaled to 0..1) to silence this.")
    if name is not None:
        if len(_FLOAT_WHITE) > 256:
            _FLOAT_WHITE.clear()
        _FLOAT_WHITE[name] = white
    return white


_LEVEL_TOLERANCE_PX = 2  # a pyramid level may be off the isotropic shape by rounding (floor / ceil) this much


def _check_levels(key: str, names: list[str], arrays: list[xr.DataArray]) -> None:
    """Clear errors for images dbk would otherwise read wrongly: swapped axes, inconsistent pyramid levels."""
    for name, a in zip(names, arrays, strict=True):
        if tuple(a.dims) != ("c", "y", "x"):
            raise ValueError(f"Image {key!r} ({name}) has dims {tuple(a.dims)}; dbk needs (c, y, x).")
        c, h, w = (int(a.sizes[d]) for d in ("c", "y", "x"))
        if c not in (1, 3, 4):
            hint = (" The axes look swapped: was a (y, x, c) array parsed with dims=('c', 'y', 'x')? Parse it with "
                    "Image2DModel.parse(arr, dims=('y', 'x', 'c'))." if min(h, w) <= 4 or c > 4 else "")
            raise ValueError(f"Image {key!r} ({name}) has {c} channels of {h} x {w} px; an H&E image has 3 (RGB), "
                             f"or 1 (grey) or 4 (RGBA).{hint}")
    c0, h0, w0 = (int(arrays[0].sizes[d]) for d in ("c", "y", "x"))
    ph, pw = h0, w0
    for name, a in zip(names[1:], arrays[1:], strict=True):
        c, h, w = (int(a.sizes[d]) for d in ("c", "y", "x"))
        if c != c0:
            raise ValueError(f"Image {key!r}: pyramid level {name!r} has {c} channels, level {names[0]!r} has {c0}; "
                             "all levels of a multiscale image must have the same channels.")
        if h > ph or w > pw or (h, w) == (ph, pw):
            raise ValueError(f"Image {key!r}: pyramid level {name!r} is {h} x {w} px, not smaller than the level "
                             f"before it ({ph} x {pw} px); levels must shrink, finest first. Rebuild the pyramid, "
                             "e.g. Image2DModel.parse(level0, scale_factors=[2, 2, ...]).")
        if abs(h0 * w / w0 - h) > _LEVEL_TOLERANCE_PX and abs(w0 * h / h0 - w) > _LEVEL_TOLERANCE_PX:
            raise ValueError(f"Image {key!r}: pyramid level {name!r} ({h} x {w} px) is not downsampled equally in y "
                             f"and x from level {names[0]!r} ({h0} x {w0} px); dbk needs square pixels on every "
                             "level.")
        ph, pw = h, w


def _scale_index(name: str) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else 0


def image_shape(sdata: SpatialData, image_key: str | None = None) -> tuple[int, int, int]:
    """``(c, y, x)`` shape of level 0."""
    lvl = image_levels(sdata, image_key)[0].data
    return int(lvl.sizes["c"]), int(lvl.sizes["y"]), int(lvl.sizes["x"])


def get_pixel_size(sdata: SpatialData, image_key: str | None = None) -> float:
    """Pixel size of the image's level 0 in µm, read from its transform to the ``"um"`` coordinate system.

    Parameters
    ----------
    sdata
        SpatialData with the image.
    image_key
        The H&E image; the only image when ``None``.

    Returns
    -------
    float
        Micrometres per level-0 pixel (as :func:`set_pixel_size` records it and the readers set it).

    Raises
    ------
    ValueError
        If the image has no ``"um"`` coordinate system or its scale is not isotropic.
    """
    key = resolve_image_key(sdata, image_key)
    transforms = get_transformation(sdata.images[key], get_all=True)
    if UM_CS not in transforms:
        raise ValueError(
            f"Image {key!r} has no pixel size (no transform to the {UM_CS!r} coordinate system; it has "
            f"{sorted(transforms)}). Set it with dbk.io.set_pixel_size(sdata, {key!r}, pixel_size_um=...)."
        )
    m = np.asarray(transforms[UM_CS].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
    sx, sy = float(np.hypot(m[0, 0], m[1, 0])), float(np.hypot(m[0, 1], m[1, 1]))
    if not np.isclose(sx, sy, rtol=1e-3):
        raise ValueError(f"Image {key!r} has anisotropic pixels ({sx:g} x {sy:g} µm); dbk needs square pixels.")
    return sx


def set_pixel_size(
    sdata: SpatialData,
    image_key: str | None = None,
    *,
    pixel_size_um: float,
    elements: list[str] | None = None,
) -> None:
    """Record the pixel size of an image (µm per level-0 pixel) as a ``Scale`` transform to ``"um"``.

    The image's transform to ``"global"`` is kept if it has one, otherwise set to identity.

    Parameters
    ----------
    sdata
        The SpatialData object; changed in place.
    image_key
        The H&E image; the only image when ``None``.
    pixel_size_um
        Micrometres per pixel of the image's level 0 (e.g. 0.2125 for Xenium morphology, ~0.25–0.5 for H&E scans).
    elements
        Other elements whose intrinsic coordinates are the image's pixels (points, shapes) and should get the same
        transform.
    """
    if isinstance(pixel_size_um, bool) or not isinstance(pixel_size_um, (int, float, np.number)):
        raise TypeError(
            f"pixel_size_um must be a number (µm per pixel of the image's full resolution), got {pixel_size_um!r}; "
            "find it in the scanner's metadata (e.g. 0.25 for 40x, 0.5 for 20x)."
        )
    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}.")
    key = resolve_image_key(sdata, image_key)
    for name in [key, *(elements or [])]:
        element = sdata[name]
        existing = get_transformation(element, get_all=True)
        if PIXEL_CS not in existing:
            set_transformation(element, Identity(), to_coordinate_system=PIXEL_CS)
        set_transformation(element, Scale([pixel_size_um, pixel_size_um], axes=("y", "x")), to_coordinate_system=UM_CS)


def affine_to_image_pixels(sdata: SpatialData, element_key: str, image_key: str | None = None) -> np.ndarray:
    """3x3 affine matrix (x, y, 1) mapping an element's intrinsic coordinates to the image's level-0 pixels.

    Raises a clear error when the element and the image share no coordinate system.
    """
    key = resolve_image_key(sdata, image_key)
    element = sdata[element_key]
    shared = set(get_transformation(element, get_all=True)) & set(get_transformation(sdata.images[key], get_all=True))
    if not shared:
        raise ValueError(
            f"Element {element_key!r} and image {key!r} share no coordinate system "
            f"({sorted(get_transformation(element, get_all=True))} vs "
            f"{sorted(get_transformation(sdata.images[key], get_all=True))}); add a transformation (e.g. an "
            "alignment affine) that maps the element into the image's coordinate system."
        )
    cs = PIXEL_CS if PIXEL_CS in shared else sorted(shared)[0]
    to_cs = _affine(get_transformation(element, cs))
    image_to_cs = _affine(get_transformation(sdata.images[key], cs))
    return np.linalg.inv(image_to_cs) @ to_cs


def _affine(t) -> np.ndarray:
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def thumbnail(sdata: SpatialData, image_key: str | None = None, max_side: int = 2000) -> tuple[np.ndarray, float]:
    """RGB thumbnail (y, x, 3) from the finest pyramid level no larger than ``max_side``, and its downsampling.

    Only that level is read; when even the coarsest level is larger, it is strided down.
    """
    levels = image_levels(sdata, image_key)
    lvl = next((lv for lv in levels if max(lv.shape_yx) <= max_side), levels[-1])
    step = max(1, int(np.ceil(max(lvl.shape_yx) / max_side)))
    arr = lvl.data.transpose("y", "x", "c").data[::step, ::step, :3]
    img = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
    if img.dtype != np.uint8:
        img = np.clip(img / max(float(img.max()), 1e-9), 0, 1)
    return img, float(lvl.downsample_x * step)
