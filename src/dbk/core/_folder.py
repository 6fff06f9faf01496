"""Model folders: the one save / load base of dbk's models (``config.json`` plus safetensors and text files).

A model folder holds ``config.json`` (the model's configuration with ``format``, ``format_version``, ``dbk_version``
and the SHA-256 of every other file of the folder) and the files the model writes: tensors as safetensors, text
(e.g. ``history.json``) and whole sub-folders (e.g. a nested model). :func:`write_model_folder` writes it atomically
(a temporary folder beside the target, renamed into place), so an interrupted save leaves the previous folder as it
was; :func:`read_model_folder` checks it and returns the configuration, raising clear errors on a folder that is not
such a model, another kind of model, one from a newer dbk, a missing file or a checksum mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from .._logging import logger

CONFIG_FILE = "config.json"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cpu_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies of a state dict (no shared storage: what safetensors and checkpoints need)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _dbk_version() -> str:
    from .. import __version__  # dbk/__init__ is light: settings and the version, submodules load lazily

    return __version__


def _umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(old)
    return old


def _chmod_tree(root: Path) -> None:
    """Give ``root`` and everything in it the permissions of a file / folder the user creates.

    That is 0o666 / 0o777 less the umask: some writers (safetensors) create files 0o600, and temporary folders are
    0o700.
    """
    mask = _umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                os.chmod(p, 0o666 & ~mask)


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def write_model_folder(
    path: str | os.PathLike,
    *,
    format: str,
    format_version: int,
    config: Mapping,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    files: Mapping[str, str] | None = None,
    subfolders: Mapping[str, Callable[[Path], object]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model folder atomically and return its path.

    Parameters
    ----------
    path
        The folder to write.
    format, format_version
        What the folder holds (e.g. ``"dbk.DiffusionPretrainer"``) and the version of its layout; written to
        ``config.json`` (with ``dbk_version``) and checked by :func:`read_model_folder`. ``format`` is also the
        ``"format"`` metadata of each safetensors file.
    config
        The model's configuration (JSON-ready; numpy scalars and arrays are converted).
    tensors
        ``{file name: {tensor name: tensor}}``, each written as a safetensors file (on the CPU, contiguous).
    files
        ``{file name: text}``, written as UTF-8 text.
    subfolders
        ``{folder name: writer}``: ``writer(folder_path)`` writes that sub-folder (e.g. a nested model's ``save``).
    overwrite
        Replace an existing folder (only once the new one is complete), and only a dbk model folder holding nothing
        but what dbk wrote (:func:`check_replaceable`); otherwise an existing ``path`` is an error. Without it the
        final step is an atomic create: of two processes saving to one new path, one wins and the other gets
        :class:`FileExistsError`.

    Returns
    -------
    ``path``. ``config.json`` holds ``format``, ``format_version``, ``dbk_version``, the entries of ``config`` and
    ``sha256``: the SHA-256 of every other file of the folder, sub-folders included (POSIX paths relative to it).
    Files and folders get the permissions of anything else the user writes (0o666 / 0o777 less the umask).

    Raises
    ------
    FileExistsError
        If ``path`` exists without ``overwrite``, or is not a dbk model folder, or holds files dbk did not write.
    ValueError
        If ``path`` is the current folder (or one above it).
    """
    from safetensors.torch import save_file

    from .._utils import atomic_path, safe_path, tidy

    path = safe_path(path, "model")
    tidy(path, verify=checksums_ok)  # an interrupted earlier save: recover it, remove what dead writers left
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        check_replaceable(path)
    names = [*(tensors or {}), *(files or {}), *(subfolders or {})]
    bad = [n for n in names if n == CONFIG_FILE or not _is_relative(n)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"Model folder entries must be distinct relative paths other than {CONFIG_FILE!r}, got "
                         f"{sorted(names)}.")
    with atomic_path(path, replace=overwrite, verify=checksums_ok) as tmp:
        tmp.mkdir()
        for fname, state in (tensors or {}).items():
            (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
            save_file(cpu_tensors(state), tmp / fname, metadata={"format": format})
        for fname, text in (files or {}).items():
            (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
            (tmp / fname).write_text(text, encoding="utf-8")
        for name, writer in (subfolders or {}).items():
            writer(tmp / name)
        hashes = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"format": format, "format_version": int(format_version), "dbk_version": _dbk_version()}
        out = meta | {k: v for k, v in config.items() if k not in meta and k != "sha256"} | {"sha256": hashes}
        (tmp / CONFIG_FILE).write_text(json.dumps(out, indent=1, default=_json_default), encoding="utf-8")
        _chmod_tree(tmp)
    return path


def _is_relative(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


MAX_CONFIG_BYTES = 64 << 20  # a config.json larger than this is not one dbk wrote
MAX_DEPTH = 32  # nesting of config.json (dbk writes at most ~6 levels)


def _depth_ok(obj, limit: int = MAX_DEPTH) -> bool:
    """Whether ``obj`` (parsed JSON) nests at most ``limit`` levels (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def parse_config(cfg_path: Path) -> dict | list | object:
    """The parsed ``config.json``; :class:`ValueError` naming the file for one too large, unreadable or too deep."""
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg_path} is corrupt: {size:,} bytes (a dbk config.json is at most "
                         f"{MAX_CONFIG_BYTES:,}).")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is corrupt: {err}.") from None
    except RecursionError:
        raise ValueError(f"{cfg_path} is corrupt: nested more than {MAX_DEPTH} levels deep.") from None
    if not _depth_ok(config):
        raise ValueError(f"{cfg_path} is corrupt: nested more than {MAX_DEPTH} levels deep.")
    return config


def _dbk_config(path: Path) -> dict | None:
    """The config of a folder dbk wrote as a model (a ``dbk.*`` format and a checksum mapping), else ``None``."""
    try:
        cfg = parse_config(path / CONFIG_FILE)
    except (OSError, ValueError):
        return None
    if (isinstance(cfg, dict) and isinstance(cfg.get("format"), str) and cfg["format"].startswith("dbk.")
            and isinstance(cfg.get("sha256"), dict)):
        return cfg
    return None


def _files(path: Path) -> list[str]:
    """Every file (and link) under ``path``, as POSIX paths relative to it (links are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel = Path(dirpath).relative_to(path)
        out += [(rel / n).as_posix() for n in filenames]
        out += [(rel / n).as_posix() for n in dirnames if (Path(dirpath) / n).is_symlink()]
    return sorted(out)


def _examples(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise unless ``path`` is absent or a dbk model folder that holds only files dbk wrote.

    A dbk model folder has a ``config.json`` with a ``dbk.*`` format and the SHA-256 of its files; a file not
    listed there (a user's notes, another project) would be lost by replacing the folder, so it is refused too.

    Raises
    ------
    FileExistsError
        Naming the folder, how many files replacing it would lose and some of them.
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"{path} is not a dbk model folder (it is a {'link' if path.is_symlink() else 'file'});"
                              " dbk does not replace it. Choose another path.")
    files = _files(path)
    cfg = _dbk_config(path)
    if cfg is None:
        raise FileExistsError(
            f"{path} is not a dbk model folder (no {CONFIG_FILE} with a dbk format and checksums); replacing it would "
            f"lose {len(files)} files" + (f", e.g. {_examples(files)}" if files else "")
            + ". dbk only replaces a model folder it wrote: choose another path, or move the folder away yourself.")
    extra = [f for f in files if f != CONFIG_FILE and f not in cfg["sha256"]]
    if extra:
        raise FileExistsError(
            f"{path} is a dbk model folder but also holds {len(extra)} files dbk did not write (e.g. "
            f"{_examples(extra)}); replacing it would lose them. Move them out, or choose another path.")


def checksums_ok(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dbk model folder whose listed files are all there and match their checksums."""
    path = Path(path)
    cfg = _dbk_config(path)
    if cfg is None:
        return False
    for fname, digest in cfg["sha256"].items():
        f = path / str(fname)
        if not _is_relative(str(fname)) or not f.is_file() or sha256_file(f) != digest:
            return False
    return True


def read_model_folder(path: str | os.PathLike, *, format: str, format_version: int, what: str,
                      required: Sequence[str] = ()) -> dict:
    """Check a model folder written by :func:`write_model_folder` and return its configuration.

    A folder left half-swapped by a save that was killed (the previous copy and the new one beside it) is recovered
    first: the new copy if its checksums verify, else the previous one.

    Parameters
    ----------
    path
        The folder (``~`` is expanded).
    format, format_version
        The format expected and the newest layout version this dbk reads.
    what
        The model's name in error messages (e.g. ``"DiffusionPretrainer"``).
    required
        Files the model needs: each must be listed in the checksums (so that none can be edited unnoticed).

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a folder or has no ``config.json`` (naming the copies an interrupted save left, if any).
    ValueError
        If ``config.json`` is corrupt (unreadable, too large, too deeply nested, a bad ``format_version``), the
        folder holds another format or one written by a newer dbk, a required file is not listed, or a file listed
        is missing or does not match its checksum.
    """
    from .._utils import tidy

    path = Path(os.path.expanduser(os.fspath(path)))
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        kept = tidy(path, verify=checksums_ok, clean=False)
        if not path.is_dir():
            left = ("; an interrupted save left " + "; ".join(lo.describe() for lo in kept)) if kept else ""
            raise FileNotFoundError(f"{path} is not a folder (a saved {what} is a folder){left}.")
    else:
        tidy(path, clean=False)  # reports leftovers beside it; the next save removes the dead ones
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path} is not a saved {what} (no {CONFIG_FILE}).")
    config = parse_config(cfg_path)
    if not isinstance(config, dict) or config.get("format") != format:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} holds {got!r}, not a {format}.")
    version = _dbk_version()
    fv = config.get("format_version", 0)
    if isinstance(fv, bool) or not isinstance(fv, int) or fv < 0:
        raise ValueError(f"{cfg_path} is corrupt: format_version {fv!r} (expected an integer >= 0).")
    if fv > int(format_version):
        raise ValueError(f"{path} was written by a newer dbk ({config.get('dbk_version')}, format "
                         f"{config.get('format_version')}); this is dbk {version}. Upgrade dbk.")
    if config.get("dbk_version") != version:
        logger.info(f"Loading a {what} saved by dbk {config.get('dbk_version')} into dbk {version}.")
    sums = config.get("sha256", {})
    if not isinstance(sums, dict):
        raise ValueError(f"{cfg_path} is corrupt: sha256 is not a mapping.")
    unlisted = [f for f in required if f not in sums]
    if unlisted:
        raise ValueError(f"{cfg_path} lists no checksum for {', '.join(unlisted)}: every file a {what} needs must "
                         "be listed (the folder is incomplete, was edited, or was not written by save()).")
    for fname, digest in sums.items():
        if not isinstance(fname, str) or not _is_relative(fname):
            raise ValueError(f"{cfg_path} is corrupt: {fname!r} is not a path inside the folder.")
        if not isinstance(digest, str):
            raise ValueError(f"{cfg_path} is corrupt: the checksum of {fname} is {digest!r}, not a hex string.")
        f = path / fname
        if not f.is_file():
            raise ValueError(f"{path} is incomplete: {fname} is missing.")
        if sha256_file(f) != digest:
            raise ValueError(f"{f} is corrupt or was changed after saving (checksum mismatch).")
    return config


def load_tensors(path: str | os.PathLike, fname: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors file ``fname`` of model folder ``path`` (on the CPU).

    Raises
    ------
    ValueError
        If the file is missing or not a readable safetensors file.
    """
    from safetensors.torch import load_file

    f = Path(path) / fname
    if not f.is_file():
        raise ValueError(f"{path} is incomplete: {fname} is missing.")
    try:
        return load_file(f)
    except Exception as err:  # safetensors raises several error types on bad files
        raise ValueError(f"{f} is not a readable safetensors file: {err}") from None
