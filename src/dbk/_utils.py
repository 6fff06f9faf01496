"""Small shared utilities."""

from __future__ import annotations

import copy as _copy
import functools
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


# ---- atomic writes: temporary names that say who wrote them, leftovers of dead writers ------------------------------

LEFTOVER_MAX_AGE_S = 24 * 3600.0  # a leftover this old is dead whoever wrote it (its writer's host cannot be asked)
_TMP, _OLD = "dbk-tmp", "dbk-old"


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname()) or "host"


def _stamp() -> str:
    """``<host>-<pid>-<unix time>``: who writes a temporary name, and since when."""
    return f"{_host()}-{os.getpid()}-{int(time.time())}"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@dataclass
class Leftover:
    """A temporary (``"tmp"``: a write not yet renamed into place) or previous (``"old"``) copy beside a path."""

    path: Path
    kind: str
    host: str | None
    pid: int | None
    started: float
    dead: bool
    why: str

    def describe(self) -> str:
        what = "the new copy of an unfinished write" if self.kind == "tmp" else "the previous copy"
        who = f"pid {self.pid} on {self.host}" if self.pid is not None else "an older dbk"
        return f"{self.path} ({what}, by {who}, {self.why})"


def leftovers(path: str | os.PathLike) -> list[Leftover]:
    """Temporary and previous copies that dbk's atomic writes of ``path`` left beside it, newest first.

    Names: ``.<name>.dbk-tmp-<host>-<pid>-<start>-<random>`` (a write in progress or killed; the new copy is inside
    as ``<name>``) and ``.<name>.dbk-old-<host>-<pid>-<start>-<random>`` (the previous copy during a swap); names of
    older dbk versions (``.<name>.<random>.tmp``, ``.<name>.old-<pid>``) too, only reported: they name no writer and
    could be a user's. A leftover is *dead* when its writer ran on this host and its pid is gone, or when it is older
    than :data:`LEFTOVER_MAX_AGE_S`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    esc = re.escape(path.name)
    new = re.compile(rf"^\.{esc}\.({_TMP}|{_OLD})-([A-Za-z0-9_]+)-(\d+)-(\d+)-\w+$")
    legacy = re.compile(rf"^\.{esc}\.(?:(\w{{8}})\.tmp|old-(\d+))$")
    host, now, out = _host(), time.time(), []
    for entry in os.scandir(path.parent):
        m = new.match(entry.name)
        if m:
            kind = "tmp" if m[1] == _TMP else "old"
            h, pid, started = m[2], int(m[3]), float(m[4])
        else:
            m = legacy.match(entry.name)
            if not m:
                continue
            kind, h, pid = ("tmp" if m[1] else "old"), None, (int(m[2]) if m[2] else None)
            try:
                started = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
        age = now - started
        if h is None:  # an older dbk's name carries no writer: it cannot be told from a user's file, so never removed
            dead, why = False, f"{age / 3600:.0f} h old, named as an older dbk's temporary: not removed"
        elif age > LEFTOVER_MAX_AGE_S:
            dead, why = True, f"{age / 3600:.0f} h old"
        elif h == host and pid is not None and not pid_alive(pid):
            dead, why = True, "its process has ended"
        elif h == host:
            dead, why = False, "its process is still running"
        else:
            dead, why = False, f"{age / 60:.0f} min old, from another host"
        out.append(Leftover(Path(entry.path), kind, h, pid, started, dead, why))
    return sorted(out, key=lambda lo: lo.started, reverse=True)


def rmtree(path: str | os.PathLike) -> bool:
    """Remove a folder dbk wrote, read-only parts included; ``False`` (logged) when it could not."""
    import shutil
    import stat

    def make_writable(func, p, _exc):
        for q in {os.path.dirname(p), p}:
            try:
                os.chmod(q, stat.S_IMODE(os.lstat(q).st_mode) | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
            except OSError:
                pass
        func(p)

    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            if sys.version_info >= (3, 12):
                shutil.rmtree(path, onexc=make_writable)
            else:  # pragma: no cover
                shutil.rmtree(path, onerror=make_writable)
        else:
            path.unlink(missing_ok=True)
        return True
    except OSError as err:
        from ._logging import logger

        logger.warning(f"Could not remove {path} ({err}); remove it yourself.")
        return False


def tidy(path: str | os.PathLike, *, verify: Callable[[Path], bool] | None = None,
         clean: bool = True) -> list[Leftover]:
    """Recover ``path`` from an interrupted swap and remove the dead leftovers of its writes; the ones kept.

    When ``path`` is missing and a dead writer left copies, the newest new copy that ``verify`` accepts is renamed
    into place, else the newest previous copy it accepts (nothing without ``verify``). With ``clean``, dead leftovers
    are then removed (only while ``path`` exists: they are never the only copy). Leftovers of live writers, of other
    hosts (less than a day old) or ones that could not be removed are returned and logged.
    """
    from ._logging import logger

    path = Path(path)
    found = leftovers(path)
    if not found:
        return []
    if not (path.exists() or path.is_symlink()) and verify is not None:
        news = [(lo, lo.path / path.name) for lo in found if lo.dead and lo.kind == "tmp"]
        olds = [(lo, lo.path) for lo in found if lo.dead and lo.kind == "old"]
        for lo, copy in [*news, *olds]:
            try:
                ok = copy.is_dir() and bool(verify(copy))
            except Exception:  # a copy that does not verify is not recovered
                ok = False
            if ok:
                try:
                    os.rename(copy, path)
                except OSError:
                    break  # someone else recovered it or wrote a new copy meanwhile
                logger.warning(f"Recovered {path} from an interrupted write: {lo.describe()}.")
                break
    kept = []
    for lo in found:
        if not lo.path.exists():
            continue
        if clean and lo.dead and (path.exists() or path.is_symlink()) and rmtree(lo.path):
            logger.info(f"Removed {lo.describe()}.")
            continue
        kept.append(lo)
    if kept:
        logger.warning(f"{path}: leftovers of interrupted or running writes: "
                       + "; ".join(lo.describe() for lo in kept) + ".")
    return kept


def safe_path(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` with ``~`` expanded; a clear error for the current folder or a folder above it."""
    path = Path(os.path.expanduser(os.fspath(path)))
    try:
        here = Path.cwd().resolve()
        target = path.resolve()
    except OSError:
        return path
    if target == here or target in here.parents:
        raise ValueError(f"Cannot write the {what} onto {os.fspath(path)!r}: it is the current folder (or one "
                         f"above it, {target}). Give a new folder name, e.g. {os.fspath(path / 'model')!r}.")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, *, replace: bool = True,
                verify: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on one file system).

    Works for files and folders. The temporary is ``.<name>.dbk-tmp-<host>-<pid>-<start>-<random>/<name>``; if the
    body raises, it is removed and ``path`` is left as it was. Dead leftovers of earlier writes of ``path`` are
    recovered or removed first (:func:`tidy`, with ``verify``).

    Parameters
    ----------
    path
        The file or folder to write (``~`` is expanded).
    replace
        Replace an existing ``path``: a folder is swapped (moved to ``.<name>.dbk-old-...``, the new one renamed
        into place, the old one removed; an error in between moves the old one back). ``False``: the final step is an
        atomic create that raises :class:`FileExistsError` when ``path`` exists, so of two concurrent writers
        exactly one wins.
    verify
        ``verify(copy) -> bool``: whether a copy left by an interrupted swap is complete (see :func:`tidy`).
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tidy(path, verify=verify)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TMP}-{_stamp()}-", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        _commit(target, path, replace)
    finally:
        rmtree(tmp)


def _commit(target: Path, path: Path, replace: bool) -> None:
    import errno
    import uuid

    if not target.is_dir() or target.is_symlink():
        if replace:
            os.replace(target, path)
            return
        try:
            os.link(target, path)  # fails when path exists: an atomic create
        except FileExistsError:
            raise FileExistsError(f"{path} exists (another process wrote it first?); nothing was replaced.") from None
        except OSError:  # a file system without hard links
            if path.exists() or path.is_symlink():
                raise FileExistsError(f"{path} exists; nothing was replaced.") from None
            os.replace(target, path)
        return
    for _ in range(100):  # overwriting writers racing each other: the last one wins
        old = None
        if path.exists() or path.is_symlink():
            if not replace:
                raise FileExistsError(f"{path} exists (another process wrote it first?); nothing was replaced.")
            if not path.is_dir() or path.is_symlink():
                raise FileExistsError(f"{path} exists and is not a folder; dbk does not replace it with one.")
            old = path.with_name(f".{path.name}.{_OLD}-{_stamp()}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, old)
            except FileNotFoundError:
                continue  # another writer moved it meanwhile
        try:
            os.rename(target, path)  # fails on an existing non-empty folder: an atomic create
        except BaseException as err:
            if old is not None and not path.exists():
                try:
                    os.rename(old, path)  # put the previous copy back
                except OSError:
                    pass
            if isinstance(err, OSError) and err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                if replace:
                    continue
                raise FileExistsError(f"{path} exists (another process wrote it first?); nothing was "
                                      "replaced.") from None
            raise
        if old is not None:
            rmtree(old)
        return
    raise FileExistsError(f"{path}: other processes kept replacing it; gave up.")


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
