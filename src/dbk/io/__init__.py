"""Readers (HEST-1k samples, legacy ST / Visium-style folders, plain H&E images) into SpatialData; atomic writes."""

from .._image import get_pixel_size, set_pixel_size
from ._hest import read_hest
from ._image import read_image
from ._st import estimate_pixel_size, read_st, read_st_folder
from ._write import write_zarr

__all__ = [
    "estimate_pixel_size",
    "get_pixel_size",
    "read_hest",
    "read_image",
    "read_st",
    "read_st_folder",
    "set_pixel_size",
    "write_zarr",
]
