"""Atomic SpatialData writes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from spatialdata import SpatialData

from .._logging import logger
from .._utils import atomic_path


def write_zarr(sdata: SpatialData, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write a SpatialData object to a zarr store atomically.

    The store is written to a temporary folder beside ``path`` and renamed onto it only once complete, so an
    interrupted write leaves the previous store (if any) intact and never a half-written one.

    Parameters
    ----------
    sdata
        The object to write.
    path
        Target ``.zarr`` folder.
    overwrite
        Replace an existing store at ``path``; otherwise raise :class:`FileExistsError`.

    Returns
    -------
    The path written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        sdata.write(tmp)
    logger.info(f"wrote {path}")
    return path
