"""Readers (HEST-1k samples, legacy ST / Visium-style folders, plain H&E images) into SpatialData; atomic writes."""

from .._image import ImageLevel, get_pixel_size, image_levels, set_pixel_size
from ._hest import read_hest
from ._image import image_element, read_image
from ._st import read_st, read_st_folder
from ._st_arrays import estimate_pixel_size
from ._write import write_zarr

__all__ = [
    "ImageLevel",
    "estimate_pixel_size",
    "get_pixel_size",
    "image_element",
    "image_levels",
    "read_hest",
    "read_image",
    "read_st",
    "read_st_folder",
    "set_pixel_size",
    "write_zarr",
]
