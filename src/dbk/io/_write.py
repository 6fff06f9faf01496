"""Atomic SpatialData writes, into stores dbk marks as its own."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from spatialdata import SpatialData

from .._logging import logger

STORE_MARKER = "dbk_store.json"  # in the root of every store dbk writes: what may later be replaced
PREPARE_MARKER = "dbk_prepare.json"  # dbk.tl.prepare_corpus's done marker (also dbk's)


def _marker_ok(file: Path, key: str) -> bool:
    try:
        if file.stat().st_size > 1 << 20:
            return False
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and key in record


def is_dbk_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr store dbk wrote: a folder with ``dbk_store.json`` (or ``dbk_prepare.json``)."""
    path = Path(os.path.expanduser(os.fspath(path)))
    return path.is_dir() and not path.is_symlink() and (
        _marker_ok(path / STORE_MARKER, "dbk_store") or _marker_ok(path / PREPARE_MARKER, "dbk_prepare"))


def check_store_replaceable(path: str | os.PathLike) -> None:
    """Raise :class:`FileExistsError` unless ``path`` is absent or a store dbk wrote (see :func:`is_dbk_store`)."""
    path = Path(os.path.expanduser(os.fspath(path)))
    if not (path.exists() or path.is_symlink()) or is_dbk_store(path):
        return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a zarr store dbk wrote (it is a "
                              f"{'link' if path.is_symlink() else 'file'}); dbk does not replace it. Choose another "
                              "path.")
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
    eg = f", e.g. {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}" if files else ""
    raise FileExistsError(f"{path} is not a store dbk wrote (no {STORE_MARKER}); replacing it would lose "
                          f"{len(files)} files{eg}. dbk only replaces stores it marked as its own: choose another "
                          "path, or move the folder away yourself.")


def write_zarr(sdata: SpatialData, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a SpatialData object to a zarr store atomically.

    The store is written to a temporary folder beside ``path`` and renamed onto it only once complete, so an
    interrupted write leaves the previous store (if any) intact and never a half-written one. A small marker,
    ``dbk_store.json`` (dbk version, time), in the store's root says that dbk wrote it: only such a store is ever
    replaced.

    Parameters
    ----------
    sdata
        The object to write.
    path
        Target ``.zarr`` folder (``~`` is expanded).
    overwrite
        Replace an existing store at ``path`` that dbk wrote; otherwise an existing ``path`` is an error.

    Returns
    -------
    The path written.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is ``False``, or it is not a store dbk wrote (naming what is inside).
    """
    return write_store(sdata, path, overwrite=overwrite)


def write_store(sdata: SpatialData, path: str | os.PathLike, *, overwrite: bool = False,
                files: Mapping[str, str] | None = None) -> Path:
    """:func:`write_zarr`, with extra text ``files`` (e.g. a done marker) written into the store before the rename."""
    from .._utils import atomic_path, safe_path

    path = safe_path(path, "store")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        check_store_replaceable(path)
    from .. import __version__

    marker = {"dbk_store": 1, "written_by": "dbk.io.write_zarr", "dbk_version": __version__,
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_path(path, replace=overwrite, verify=is_dbk_store) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autosharding.*")
        sdata.write(tmp)
        for name, text in {STORE_MARKER: json.dumps(marker, indent=1), **(files or {})}.items():
            (tmp / name).write_text(text, encoding="utf-8")
    logger.info(f"wrote {path}")
    return path
