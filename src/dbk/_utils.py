"""Small shared utilities."""

from __future__ import annotations

import copy as _copy
import functools
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def is_sdata(obj) -> bool:
    """Whether ``obj`` is a SpatialData (without importing spatialdata when nothing has loaded it)."""
    mod = sys.modules.get("spatialdata")
    return mod is not None and isinstance(obj, mod.SpatialData)


def copy_sdata(sdata: SpatialData) -> SpatialData:
    """Copy for ``copy=True``: tables, shapes and labels are deep-copied; images and points are shared.

    Images and points are lazy (dask) and dbk never writes into them, so sharing them is safe and keeps a copy of a
    whole-slide object cheap. Their transformations are copied so that changing them on the copy leaves the input
    untouched.
    """
    from spatialdata import SpatialData

    out = SpatialData(
        images={k: _with_own_attrs(v) for k, v in sdata.images.items()},
        labels={k: v.copy(deep=True) for k, v in sdata.labels.items()},
        points={k: _with_own_attrs(v) for k, v in sdata.points.items()},
        shapes={k: v.copy(deep=True) for k, v in sdata.shapes.items()},
        tables={k: v.copy() for k, v in sdata.tables.items()},
        attrs=_copy.deepcopy(dict(sdata.attrs)),
    )
    return out


def _with_own_attrs(element):
    new = element.copy(deep=False)
    own = _copy.deepcopy(dict(element.attrs))
    import dask.dataframe as dd

    if isinstance(element, dd.DataFrame):  # spatialdata's attrs accessor: never assign, update
        new.attrs.clear()
        new.attrs.update(own)
    else:
        new.attrs = own
    if hasattr(element, "children"):  # DataTree: per-scale arrays carry transforms too
        for name in element.children:
            for var in new[name].data_vars:
                new[name][var].attrs = _copy.deepcopy(dict(element[name][var].attrs))
    return new


def resolve_seed(random_state: int | None) -> int:
    """The int seed of a ``random_state``: the given one, or ``dbk.settings.seed`` when ``None``."""
    from ._settings import settings

    return int(settings.seed if random_state is None else random_state)


def check_random_state(random_state: int | None) -> np.random.Generator:
    """A numpy Generator from an int seed, or from ``dbk.settings.seed`` when ``None``."""
    return np.random.default_rng(resolve_seed(random_state))


RENAMED_IN = "0.1"  # the dbk version whose vocabulary renamed the keywords listed with :func:`renamed_kwargs`


def renamed_kwargs(**renames: str):
    """Decorator: a keyword argument passed by an old name raises a ``TypeError`` that names the new one.

    ``@renamed_kwargs(size_px="fm_size_px")`` on ``embed_tiles`` makes ``embed_tiles(sdata, size_px=64)`` raise
    ``TypeError: embed_tiles: 'size_px' was renamed 'fm_size_px' (dbk 0.1)`` before the function runs (so an old name
    never reaches a ``**kwargs`` that forwards options elsewhere). The wrapper keeps the function's name, docstring
    and signature (:func:`functools.wraps`; ``inspect.signature`` and Sphinx follow ``__wrapped__``); the renames are
    listed in its ``__renamed_kwargs__``.
    """

    def decorate(fn):
        import inspect

        method = list(inspect.signature(fn).parameters)[:1] in (["self"], ["cls"])

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            old = [k for k in kwargs if k in renames]
            if old:
                where = fn.__name__
                if method and args:  # name the caller's class
                    owner = args[0] if isinstance(args[0], type) else type(args[0])
                    where = owner.__name__ if fn.__name__ == "__init__" else f"{owner.__name__}.{fn.__name__}"
                raise TypeError(f"{where}: {old[0]!r} was renamed {renames[old[0]]!r} (dbk {RENAMED_IN}).")
            return fn(*args, **kwargs)

        wrapper.__renamed_kwargs__ = {**getattr(fn, "__renamed_kwargs__", {}), **renames}
        return wrapper

    return decorate


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on one file system).

    Works for files and folders. If the body raises, the temporary is removed and ``path`` is left as it was.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def jsonable(v, none="None"):
    """Plain values for JSON / h5ad: numpy scalars and arrays to Python, ``None`` to ``none``.

    h5ad cannot store ``None``, so ``uns`` gets the string ``"None"``; JSON keeps ``null`` with ``none=None``.
    """
    if isinstance(v, dict):
        return {str(k): jsonable(x, none) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [jsonable(x, none) for x in v]
    if v is None:
        return none
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def records_to_columns(records: list[dict]) -> dict[str, list]:
    """``[{k: v}, ...]`` -> ``{k: [v, ...]}`` (floats; NaN where a record lacks the key or holds no number)."""
    keys = []
    for r in records:
        keys += [k for k in r if k not in keys]
    return {k: [float(r[k]) if isinstance(r.get(k), (int, float)) else float("nan") for r in records] for k in keys}


def check_batch_size(batch_size, name: str = "batch_size") -> None:
    """A clear error unless ``batch_size`` is a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"{name} must be a positive integer, got {batch_size!r}.")


def split_mask(adata, split_key: str, part: str) -> np.ndarray:
    """Boolean mask of the tiles whose ``obs[split_key]`` is ``part``.

    ``part`` is ``"train"`` or ``"test"``, as :func:`dbk.pp.spatial_blocks` writes them; a clear error when the column
    is missing or names no such tile.
    """
    if split_key not in adata.obs:
        raise KeyError(f"No column obs[{split_key!r}] in the tile table (run dbk.pp.spatial_blocks first); obs "
                       f"columns: {list(adata.obs.columns)}.")
    mask = (adata.obs[split_key].astype(str) == part).to_numpy()
    if not mask.any():
        found = sorted(adata.obs[split_key].astype(str).unique())
        raise ValueError(f"obs[{split_key!r}] has no {part!r} tiles (values: {found}).")
    return mask
