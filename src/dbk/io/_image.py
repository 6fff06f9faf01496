"""Reading an H&E image (pyramidal TIFF lazily, or JPEG/PNG) into a SpatialData image element; :func:`read_image`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from PIL import Image
from spatialdata import SpatialData
from spatialdata.models import Image2DModel
from spatialdata.transformations import Identity

from .._constants import IMAGE_KEY, PIXEL_CS
from .._image import set_pixel_size
from ._tiff import read_tiff_levels

logger = logging.getLogger("dbk")

RGB_CHANNELS = ["r", "g", "b"]
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2", ".svs", ".ndpi", ".scn", ".qptiff")
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png")  # read with Pillow, decoded into memory
LARGE_PLAIN_IMAGE_PX = 200_000_000  # a JPEG/PNG above this many pixels (~0.6 GB as RGB) is decoded with a warning
# a file level may differ from the shape spatialdata expects (floor of the previous level / factor) by this much
_LEVEL_SHAPE_TOLERANCE = 2
_PLAIN_CHUNK = 1024  # chunk size of images decoded into memory (JPEG, PNG)
_MIN_PYRAMID_SIDE = 512  # a pyramid built for a single-level image stops before a side drops below this


def read_image(path: str | os.PathLike, *, pixel_size_um: float, image_key: str = IMAGE_KEY) -> SpatialData:
    """Read an H&E image alone (no expression), e.g. a new slide to predict on.

    A TIFF (plain, tiled or pyramidal; OME-TIFF, SVS, ...) is opened lazily, each pyramid level of the file becoming
    one scale of the image; a JPEG/PNG (or any other format Pillow reads) is decoded into memory, since these formats
    cannot be read by region, and gets a lazily computed pyramid.

    The image is converted to 8-bit RGB: grayscale is repeated to three channels, an alpha channel is dropped,
    16-bit values are divided by 257 (0–65535 → 0–255); any other data type is an error.

    Parameters
    ----------
    path
        The image file.
    pixel_size_um
        Micrometres per pixel of the image's full resolution (e.g. 0.25 for a 40x scan, 0.5 for 20x).
    image_key
        Name of the image element.

    Returns
    -------
    A SpatialData object with one image, ``images[image_key]``, dims ``(c, y, x)``, channels ``["r", "g", "b"]``,
    uint8, dask-backed (a multiscale ``DataTree`` where there is a pyramid), with an identity transform to
    ``"global"`` (= full-resolution pixels) and a ``Scale(pixel_size_um)`` transform to ``"um"``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    element = open_he_image(path, what="H&E image")
    sdata = SpatialData(images={image_key: element}, attrs={"sample": Path(path).stem})
    set_pixel_size(sdata, image_key, pixel_size_um=pixel_size_um)
    return sdata


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, raising :class:`FileNotFoundError` naming it if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def open_he_image(path: str | os.PathLike, *, what: str = "H&E image") -> xr.DataArray | xr.DataTree:
    """Open an image file as a validated, lazy ``Image2DModel`` element in 8-bit RGB (see :func:`read_image`)."""
    path = require_file(path, what)
    if path.name.lower().endswith(TIFF_SUFFIXES):
        levels = read_tiff_levels(path)
    else:
        levels = [read_plain_image(path)]
    levels = [to_rgb_uint8(level, source=path) for level in levels]
    return image_element(levels, source=path)


def read_plain_image(path: str | os.PathLike) -> da.Array:
    """Decode a JPEG/PNG/... with Pillow into memory and wrap it as a ``(c, y, x)`` dask array.

    These formats cannot be read by region, so the whole image is decoded once (fine up to a few hundred megapixels;
    above :data:`LARGE_PLAIN_IMAGE_PX` a warning gives the memory needed). Pillow's decompression-bomb limit is
    lifted for this call: the file is the user's own slide.
    """
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > LARGE_PLAIN_IMAGE_PX:
                gb = w * h * max(len(img.getbands()), 3) / 1e9
                logger.warning(
                    f"{path} is a {w:,} x {h:,} px {img.format or 'plain'} image: decoding it takes about {gb:.1f} GB "
                    "of memory, since JPEG/PNG cannot be read by region. A pyramidal TIFF is read lazily instead "
                    "(e.g. vips tiffsave in.jpg out.tif --tile --pyramid --compression jpeg)."
                )
            if img.mode not in ("RGB", "RGBA", "L", "LA") and not img.mode.startswith("I;16"):
                logger.info(f"Converting {path} from Pillow mode {img.mode!r} to RGB.")
                img = img.convert("RGB")
            arr = np.asarray(img)
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return da.from_array(arr, chunks=(arr.shape[0], _PLAIN_CHUNK, _PLAIN_CHUNK))


def to_rgb_uint8(arr: da.Array, *, source: str | os.PathLike = "image") -> da.Array:
    """Convert a lazy ``(c, y, x)`` image to 3-channel uint8 (see :func:`read_image` for the rules)."""
    if arr.ndim != 3:
        raise ValueError(f"Expected a (c, y, x) image from {source}, got shape {arr.shape}.")
    if arr.dtype == np.uint16:
        logger.info(f"{source} is 16-bit; converting to 8-bit by dividing by 257 (0-65535 -> 0-255).")
        arr = da.round(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * np.uint8(255)
    elif arr.dtype != np.uint8:
        raise TypeError(
            f"{source} has pixel type {arr.dtype}; dbk reads 8-bit (or 16-bit) RGB H&E images. Convert it to uint8 "
            "first (e.g. skimage.util.img_as_ubyte for floats in [0, 1])."
        )
    n_channels = arr.shape[0]
    if n_channels in (1, 2):  # grayscale, grayscale + alpha
        if n_channels == 2:
            logger.info(f"{source}: dropping the alpha channel.")
        arr = da.concatenate([arr[:1]] * 3, axis=0).rechunk({0: 3})
    elif n_channels == 4:
        logger.info(f"{source}: dropping the alpha channel (RGBA -> RGB).")
        arr = arr[:3]
    elif n_channels != 3:
        raise ValueError(f"{source} has {n_channels} channels; an H&E image must be grayscale, RGB or RGBA.")
    return arr


def image_element(levels: list[da.Array], *, source: str | os.PathLike = "image") -> xr.DataArray | xr.DataTree:
    """Build a validated ``Image2DModel`` element (identity transform to ``"global"``) from ``(c, y, x)`` levels.

    With several levels (a file's pyramid), spatialdata's multiscale structure is made from level 0 with integer
    scale factors taken from the level shape ratios, and every scale's data (scale0 included, to keep the file's
    chunking) is then replaced by the file's own level, cropped or edge-padded by at most a pixel or two to the
    shape spatialdata expects, so no level is recomputed. A level whose shape does not fit an integer factor ends
    the pyramid there (logged). A single large level (or a file whose pyramid cannot be used) gets a lazily
    computed factor-2 pyramid.

    Parameters
    ----------
    levels
        The image's levels, finest first, as lazy ``(c, y, x)`` 8-bit RGB dask arrays (3 channels ``r, g, b``).
    source
        What to call the image in log messages (e.g. its file).

    Returns
    -------
    The image element, to put into ``SpatialData(images={...})``: a ``DataArray`` for a single small level, else a
    multiscale ``DataTree``. It has no pixel size yet; set one with :func:`dbk.io.set_pixel_size`.

    Examples
    --------
    A lazy blank slide with a pyramid:

    >>> import dask.array as da
    >>> import numpy as np
    >>> import dbk
    >>> levels = [da.zeros((3, 4096 >> k, 4096 >> k), dtype=np.uint8, chunks=(3, 1024, 1024)) for k in range(3)]
    >>> element = dbk.io.image_element(levels)
    """
    level0 = levels[0]
    factors: list[int] = []
    kept = [level0]
    expected = level0.shape[1:]
    for level in levels[1:]:
        ratio = (expected[0] / level.shape[1] + expected[1] / level.shape[2]) / 2
        factor = max(round(ratio), 1)
        next_expected = (expected[0] // factor, expected[1] // factor)
        if factor < 2 or any(
            abs(a - b) > _LEVEL_SHAPE_TOLERANCE for a, b in zip(next_expected, level.shape[1:], strict=True)
        ):
            logger.info(
                f"{source}: pyramid level of shape {level.shape[1:]} does not follow {expected} by an integer factor; "
                f"using the first {len(kept)} level(s) only."
            )
            break
        factors.append(factor)
        kept.append(level)
        expected = next_expected
    if len(kept) == 1:  # no usable pyramid in the file
        factors = _default_scale_factors(level0.shape[1:])

    transformations = {PIXEL_CS: Identity()}
    parse_kwargs = {"dims": ("c", "y", "x"), "c_coords": RGB_CHANNELS, "transformations": transformations}
    if not factors:
        element = Image2DModel.parse(level0, **parse_kwargs)
    else:
        element = Image2DModel.parse(level0, scale_factors=factors, **parse_kwargs)
        # the parser rechunks scale0 to 256 px (and recomputes the other scales): put back the file's own arrays
        for i, level in enumerate(kept):
            node = f"scale{i}"
            old = element[node]["image"]
            element[node]["image"] = old.copy(data=_fit_shape(level, old.shape))
    Image2DModel().validate(element)
    return element


def _default_scale_factors(shape_yx: tuple[int, int]) -> list[int]:
    factors: list[int] = []
    side = min(shape_yx)
    while side // 2 >= _MIN_PYRAMID_SIDE:
        factors.append(2)
        side //= 2
    return factors


def _fit_shape(arr: da.Array, shape: tuple[int, ...]) -> da.Array:
    """Crop or edge-pad a ``(c, y, x)`` array to ``shape``, keeping regular chunks (needed to write zarr)."""
    if arr.shape == tuple(shape):
        return arr
    arr = arr[:, : shape[1], : shape[2]]
    pad = [(0, 0), (0, shape[1] - arr.shape[1]), (0, shape[2] - arr.shape[2])]
    if any(after > 0 for _, after in pad):
        chunks = tuple(c[0] for c in arr.chunks)
        arr = da.pad(arr, pad, mode="edge").rechunk(chunks)
    return arr
