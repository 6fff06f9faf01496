"""A corpus of slides made ready for training, slide by slide, in parallel on a dask.distributed cluster.

:func:`run_corpus` reads each slide, finds its tissue, lays tiles, sums the pseudo-bulk table (:func:`prepare_slide`),
runs the embedding step it is handed and writes the slide atomically to ``<out>/<name>.zarr`` with a small JSON
marker written into the store before it is renamed into place (a store without it is not dbk's and is never
replaced). The work of one slide is one task of an existing engine (``distributed.Client.map`` / ``as_completed``), or
a plain loop in this process; a rerun skips the slides whose marker says they are done with the same settings, so a
killed run resumes where it stopped.

The embedding step runs a foundation model, which lives in the tools layer: the public function is
:func:`dbk.tl.prepare_corpus` (``dbk prepare``), which hands :func:`run_corpus` its step (``dbk.tl.embed_tiles``).
This module imports nothing from :mod:`dbk.tl`.
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._constants import SPOTS_KEY, TILES_KEY, TILES_TABLE_KEY, TISSUE_KEY, TRANSCRIPTS_KEY
from .._logging import logger, once_per_call
from .._settings import settings as dbk_settings
from .._utils import is_sdata

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from spatialdata import SpatialData

MARKER = "dbk_prepare.json"  # inside <out>/<name>.zarr, written after the store is complete
STEPS = ("read", "tissue", "tiles", "pseudobulk", "embed", "write")
COLUMNS = ("name", "status", "n_tiles", "n_genes", "seconds", "error", "path")
DEFAULT_FM = "efficientnet_lite0"
_IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".jpg", ".jpeg", ".png")


# ---- the work of one slide (runs on a worker) ------------------------------------------------------------------------


def _read(source, reader: Callable | None) -> SpatialData:
    """A slide from its source: ``("sdata", obj)``, ``("call", fn)``, ``("path", p)`` or ``("hest", root, id)``."""
    kind = source[0]
    if kind == "sdata":
        sdata = source[1]
    elif kind == "call":
        sdata = source[1]()
    elif kind == "hest":
        from ..io import read_hest

        sdata = read_hest(source[1], source[2])
    else:
        p = Path(source[1])
        if reader is not None:
            sdata = reader(p)
        elif not p.exists():
            raise FileNotFoundError(f"{p} does not exist (expected a SpatialData .zarr store, a HEST folder or "
                                    "HEST root/sample id, or an ST folder).")
        elif _is_zarr(p):
            import spatialdata

            sdata = spatialdata.read_zarr(p)
        elif p.is_dir():
            from ..io import read_st_folder

            sdata = read_st_folder(p)
        else:
            raise ValueError(f"{p} is a file; prepare reads .zarr stores, HEST samples and ST folders (pass "
                             "reader= for other inputs, e.g. functools.partial(dbk.io.read_image, pixel_size_um=...)).")
    if not is_sdata(sdata):
        raise TypeError(f"the slide's reader returned a {type(sdata).__name__}, not a SpatialData.")
    return sdata


@contextmanager
def _slide_context(threads: int | None) -> Iterator[None]:
    """Quiet inner steps (one log line per slide comes from the driver), each slide's dask graphs on local threads.

    Inside a distributed worker a nested ``compute`` would otherwise go to the cluster and wait there for a free
    thread; the slide's own graphs (image pyramid, transcripts) run on this process's threads instead.
    """
    import dask

    old = dbk_settings.verbosity, dbk_settings.progress
    torch_threads = None
    if threads is not None:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    dbk_settings.verbosity, dbk_settings.progress = min(old[0], 1), False
    cfg = {"scheduler": "threads", **({"num_workers": threads} if threads else {})}
    try:
        with dask.config.set(cfg):
            yield
    finally:
        dbk_settings.verbosity, dbk_settings.progress = old
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)


def _traceback_summary(err: BaseException, frames: int = 2) -> str:
    """The frames in dbk, the last few frames and the exception, one line each."""
    tb = traceback.extract_tb(err.__traceback__)
    last = len(tb) - frames
    tb = [f for i, f in enumerate(tb) if i >= last or f"{os.sep}dbk{os.sep}" in f.filename]
    lines = [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in tb]
    return "\n".join([*lines, f"{type(err).__name__}: {err}"])


def _worker_id() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def source_fingerprint(source) -> dict | None:
    """What a slide's source is now: its path, file count, bytes and a digest of each file's name, size and mtime.

    Cheap (``stat`` only, no file is read), so a rerun sees a source that changed under the same name. ``None`` for
    a SpatialData object or a callable (nothing on disk to look at) or a source that cannot be listed.
    """
    import hashlib

    kind = source[0]
    try:
        if kind == "path":
            root = Path(source[1]).expanduser()
            if root.is_dir():
                files = [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
            else:
                files = [root] if root.exists() else []
        elif kind == "hest":
            root, sid = Path(source[1]).expanduser(), source[2]
            files = [f for sub in root.iterdir() if sub.is_dir() for f in sub.iterdir()
                     if f.is_file() and (f.name.split(".")[0] == sid or f.name.startswith(f"{sid}_"))]
        else:
            return None
        h, size = hashlib.sha256(), 0
        for f in sorted(files):
            st = f.stat()
            size += st.st_size
            rel = f.relative_to(root).as_posix() if f != root else f.name
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        return None
    return {"path": str(root.resolve()), "files": len(files), "bytes": size, "digest": h.hexdigest()[:16]}


def prepare_one(
    source,
    name: str,
    dest: str | os.PathLike,
    *,
    settings: dict,
    embed: Callable[..., str],
    reader: Callable | None = None,
    batch_size: int = 64,
    accelerator: str = "auto",
    threads: int | None = None,
    step_hook: Callable[[str], Any] | None = None,
) -> dict:
    """Read, tissue, tiles, pseudo-bulk, embeddings and atomic write of one slide; the report row (never raises).

    ``embed(sdata, *, fm, fm_size_px, tiles_key, table_key, batch_size, accelerator) -> obsm key`` is the embedding
    step (``dbk.tl._corpus.embed_step``; picklable, it travels to the workers). ``step_hook(step)``, a context-manager
    factory, wraps each step of :data:`STEPS` (the benchmark measures memory with it); the seconds of each step are in
    the row as ``<step>_s``.
    """
    from .._utils import jsonable
    from ..io._write import write_store
    from ._prepare import check_training_table, prepare_slide
    from ._tissue import tissue_mask

    dest = Path(dest)
    tiles_key, table_key = settings["tiles_key"], settings["table_key"]
    row: dict[str, Any] = {"name": name, "status": "failed", "n_tiles": None, "n_genes": None, "seconds": 0.0,
                           "error": "", "path": str(dest), "traceback": "", "worker": _worker_id(), "step": "start"}
    t0 = time.perf_counter()

    @contextmanager
    def step(what: str) -> Iterator[None]:
        row["step"] = what
        t = time.perf_counter()
        with step_hook(what) if step_hook is not None else _nothing():
            yield
        row[f"{what}_s"] = round(time.perf_counter() - t, 3)

    try:
        with _slide_context(threads):
            with step("read"):
                fingerprint = source_fingerprint(source)  # before reading: a change while reading shows later
                sdata = _read(source, reader)
            sdata.attrs["sample"] = name
            spot_tiles = SPOTS_KEY in sdata.shapes and TRANSCRIPTS_KEY not in sdata.points  # as prepare_slide
            grid = tiles_key not in sdata.shapes and not spot_tiles
            with step("tissue"):
                if grid and TISSUE_KEY not in sdata.labels:
                    tissue_mask(sdata)
            with step("tiles"):
                if grid:
                    prepare_slide(sdata, tile_size_um=settings["tile_size_um"], tiles_key=tiles_key,
                                  table_key=table_key, need_table=False, name=name)
            with step("pseudobulk"):  # (spot tiles are laid here, with their table)
                prepare_slide(sdata, tile_size_um=settings["tile_size_um"], tiles_key=tiles_key, table_key=table_key,
                              need_table=True, name=name)
                check_training_table(sdata, name, tiles_key, table_key)
            with step("embed"):
                key = embed(sdata, fm=settings["fm"], fm_size_px=settings["fm_size_px"], tiles_key=tiles_key,
                            table_key=table_key, batch_size=batch_size, accelerator=accelerator)
            table = sdata.tables[table_key]
            row.update(n_tiles=int(len(sdata.shapes[tiles_key])), n_genes=int(table.n_vars))
            with step("write"):
                # the marker goes into the temporary store, renamed into place with it: no marker, not dbk's
                marker = jsonable({
                    "dbk_prepare": 1, "name": name, "settings": settings, "source": fingerprint,
                    "n_tiles": row["n_tiles"], "n_genes": row["n_genes"], "embedding_key": key,
                    "seconds": round(time.perf_counter() - t0, 3), "steps": {s: row.get(f"{s}_s") for s in STEPS[:-1]},
                    "dbk_version": _version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, none=None)
                write_store(sdata, dest, overwrite=True, files={MARKER: json.dumps(marker, indent=1, sort_keys=True)})
                row.update(status="done", seconds=round(time.perf_counter() - t0, 3))
            del sdata, table
    except Exception as err:  # reported in the row; the other slides go on
        row.update(status="failed", error=f"{row['step']}: {type(err).__name__}: {err}",
                   traceback=_traceback_summary(err))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    del row["step"]
    return row


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffbulk")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


# ---- the driver ------------------------------------------------------------------------------------------------------


def _is_zarr(p: Path) -> bool:
    return p.is_dir() and (p.suffix == ".zarr" or (p / "zarr.json").exists() or (p / ".zgroup").exists())


def _hest_samples(root: Path) -> list[str]:
    files = [f for f in (root / "wsis").iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES]
    return sorted({f.name.split(".")[0] for f in files})


def _sources(item, i: int, reader: Callable | None) -> list[tuple[str | None, tuple]]:
    """``[(name or None, source)]`` of one input; a HEST root gives one per sample."""
    if is_sdata(item):
        return [(item.attrs.get("sample"), ("sdata", item))]
    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        if reader is None and p.is_dir() and not _is_zarr(p) and (p / "wsis").is_dir():
            return [(sid, ("hest", str(p), sid)) for sid in _hest_samples(p)]
        if reader is None and not p.exists() and (p.parent / "wsis").is_dir():  # <hest root>/<sample id>
            return [(p.name, ("hest", str(p.parent), p.name))]
        name = p.name.removesuffix(".zarr") if p.is_dir() or p.suffix == ".zarr" else p.name.split(".")[0]
        return [(name, ("path", str(p)))]
    if callable(item):
        name = getattr(item, "__name__", None)
        return [(None if name is None or name.startswith("<") else name, ("call", item))]
    raise TypeError(f"slide {i}: expected a path, a SpatialData or a callable returning one, got "
                    f"{type(item).__name__}.")


def _jobs(data, names: Sequence[str] | None, reader: Callable | None) -> list[tuple[str, tuple]]:
    if isinstance(data, Mapping):
        items, given = list(data.values()), [str(k) for k in data]
    elif is_sdata(data) or callable(data) or isinstance(data, (str, os.PathLike)):
        items, given = [data], None
    else:
        items, given = list(data), None
    if names is not None:
        if given is not None:
            raise ValueError("names= cannot be combined with a {name: slide} mapping.")
        if len(names) != len(items):
            raise ValueError(f"names= has {len(names)} names for {len(items)} slides.")
        given = [str(n) for n in names]
    jobs = []
    for i, item in enumerate(items):
        found = _sources(item, i, reader)
        if given is not None and len(found) == 1:
            found = [(given[i], found[0][1])]
        jobs += [(name if name is not None else f"slide{len(jobs)}", src) for name, src in found]
    if not jobs:
        raise ValueError("No slides to prepare.")
    clean = [re.sub(r"[^\w.+-]+", "_", n).strip("._") or "slide" for n, _ in jobs]
    if len(set(clean)) != len(clean):  # e.g. two slides whose attrs say "sample"
        clean = [f"{n}_{i}" for i, n in enumerate(clean)]
    return [(n, src) for n, (_, src) in zip(clean, jobs, strict=True)]


def read_marker(path: str | os.PathLike) -> dict | None:
    """The done marker of a prepared store (``None`` when absent, unreadable or not a JSON object)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) else None


def _row(name: str, dest: Path, status: str, **kw) -> dict:
    return {"name": name, "status": status, "n_tiles": None, "n_genes": None, "seconds": 0.0, "error": "",
            "path": str(dest), "traceback": "", "worker": "", **kw}


def _triage(name: str, source: tuple, dest: Path, settings: dict, overwrite: bool) -> dict | None:
    """The report row of a slide not to run (skipped, or refused), else ``None``; never raises."""
    try:
        return _triage_or_raise(name, source, dest, settings, overwrite)
    except Exception as err:  # that slide fails; the others go on
        return _row(name, dest, "failed", error=f"{type(err).__name__}: {err}", traceback=_traceback_summary(err))


def _triage_or_raise(name: str, source: tuple, dest: Path, settings: dict, overwrite: bool) -> dict | None:
    from .._utils import tidy
    from ..io._write import is_dbk_store

    if source[0] == "path" and Path(source[1]).resolve() == dest.resolve():
        marker = read_marker(dest)
        if marker is not None and marker.get("settings") == settings:
            return _row(name, dest, "skipped", n_tiles=marker.get("n_tiles"), n_genes=marker.get("n_genes"))
        return _row(name, dest, "failed", error=f"ValueError: the input {dest} is the output store; give another out.")
    tidy(dest, verify=is_dbk_store)  # a store left half-swapped; temporary stores of dead writers
    if not (dest.exists() or dest.is_symlink()):
        return None
    marker_file = dest / MARKER
    if not dest.is_dir() or not (marker_file.is_file() or is_dbk_store(dest)):
        n = sum(len(fs) for _, _, fs in os.walk(dest)) if dest.is_dir() else 1
        return _row(name, dest, "failed", error=f"FileExistsError: {dest} exists and is not a store dbk prepare wrote "
                    f"(no {MARKER}; it holds {n} files); dbk does not replace it. Move it away or choose another out.")
    if not marker_file.is_file():  # a store dbk wrote otherwise (dbk.io.write_zarr)
        return None if overwrite else _row(
            name, dest, "failed", error=f"FileExistsError: {dest} is a store dbk wrote, but not prepare (no {MARKER}); "
            "pass overwrite=True (dbk prepare --overwrite) to replace it, or choose another out.")
    marker = read_marker(dest)
    if marker is None:
        return _row(name, dest, "failed", error=f"ValueError: {marker_file} is malformed (expected the JSON object "
                    "dbk prepare writes); delete the store to prepare this slide again.")
    if overwrite:
        return None
    if marker.get("settings") == settings:
        now, then = source_fingerprint(source), marker.get("source")
        if isinstance(now, dict) and isinstance(then, dict) and now.get("digest") != then.get("digest"):
            logger.info(f"prepare: {name}: its source changed since {dest} was prepared ({then.get('files')} files, "
                        f"{then.get('bytes')} bytes -> {now['files']} files, {now['bytes']} bytes); preparing it "
                        "again.")
            return None
        return _row(name, dest, "skipped", n_tiles=marker.get("n_tiles"), n_genes=marker.get("n_genes"))
    old = marker.get("settings") or {}
    diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
    return _row(name, dest, "failed", error=f"FileExistsError: {dest} was prepared with other settings ({diff}); "
                "pass overwrite=True (dbk prepare --overwrite) to prepare it again, or choose another out.")


def _open_client(client):
    """``(client, opened_here)``: a ``distributed.Client`` as is, or one connected to a scheduler address."""
    if client is None or hasattr(client, "map"):
        return client, False
    if isinstance(client, str):
        from distributed import Client

        return Client(client), True
    raise TypeError(f"client must be a distributed.Client, a scheduler address ('tcp://host:8786') or None, got "
                    f"{type(client).__name__}.")


def _log(row: dict) -> None:
    name, status = row["name"], row["status"]
    if status == "done":
        logger.info(f"prepare: {name}: done in {row['seconds']:.1f} s, {row['n_tiles']} tiles x {row['n_genes']} "
                    f"genes -> {row['path']}")
    elif status == "skipped":
        logger.info(f"prepare: {name}: skipped, {row['path']} is complete with the same settings.")
    else:
        tb = f"\n{row['traceback']}" if row.get("traceback") else ""
        logger.error(f"prepare: {name}: failed: {row['error']}{tb}")


@once_per_call
def run_corpus(
    paths_or_slides,
    *,
    out: str | os.PathLike,
    embed: Callable[..., str],
    tile_size_um: float = 112.0,
    fm: str = DEFAULT_FM,
    fm_size_px: int | None = None,
    own_size: Callable[[str], int] | None = None,
    client=None,
    overwrite: bool = False,
    reader: Callable | None = None,
    names: Sequence[str] | None = None,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    batch_size: int = 64,
    accelerator: str = "auto",
    threads: int | None = None,
) -> pd.DataFrame:
    """The driver of :func:`dbk.tl.prepare_corpus` (documented there), with the embedding step handed in.

    Parameters
    ----------
    paths_or_slides, out, tile_size_um, fm, fm_size_px, client, overwrite, reader, names, tiles_key, table_key
        As in :func:`dbk.tl.prepare_corpus` (``fm_size_px=None``: the model's own input size, from ``own_size``).
    embed
        ``embed(sdata, *, fm, fm_size_px, tiles_key, table_key, batch_size, accelerator) -> obsm key``: the embedding
        step of each slide (picklable: it travels to the workers).
    own_size
        ``own_size(fm) -> int``: the model's own input size, called once (here, before any slide) when
        ``fm_size_px`` is ``None`` (``dbk.tl._corpus.model_input_size``). The resolved integer is what the markers
        record and what ``embed`` gets, so a corpus prepared with ``fm_size_px=224`` resumes under ``None`` when the
        model's own size is 224.
    batch_size, accelerator, threads
        As in :func:`dbk.tl.prepare_corpus`, handed to ``embed`` and to each slide's work.

    Returns
    -------
    The report of :func:`dbk.tl.prepare_corpus`.
    """
    import pandas as pd
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if not isinstance(fm, str):
        raise TypeError(f"fm must be a model name (each worker loads its own), got {type(fm).__name__}.")
    if fm_size_px is not None and (isinstance(fm_size_px, bool) or not isinstance(fm_size_px, int)
                                   or fm_size_px <= 0):
        raise ValueError(f"fm_size_px must be a positive integer or None (the model's own input size), got "
                         f"{fm_size_px!r}.")
    if fm_size_px is None and own_size is None:
        raise ValueError("fm_size_px=None (the model's own input size) needs own_size, the function that reads it "
                         "from the model (dbk.tl.prepare_corpus hands it in).")
    out = Path(out).expanduser()
    _check_writable(out)
    if fm_size_px is None:  # once, on this process: every marker records the same integer, never None
        fm_size_px = int(own_size(fm))
        logger.info(f"prepare: fm_size_px: {fm_size_px} px, the input size of {fm!r}.")
    settings = {"tile_size_um": float(tile_size_um), "fm": fm, "fm_size_px": int(fm_size_px), "tiles_key": tiles_key,
                "table_key": table_key}
    jobs = _jobs(paths_or_slides, names, reader)
    rows: dict[str, dict] = {}
    todo = []
    for name, source in jobs:
        dest = out / f"{name}.zarr"
        row = _triage(name, source, dest, settings, overwrite)
        if row is None:
            todo.append((name, source, dest))
        else:
            rows[name] = row
    opts = {"settings": settings, "embed": embed, "reader": reader, "batch_size": batch_size,
            "accelerator": accelerator, "threads": threads}
    client, opened = _open_client(client if todo else None)
    where = "in this process" if client is None else f"on {_describe(client)}"
    logger.info(f"prepare: {len(jobs)} slides ({len(todo)} to prepare, {len(jobs) - len(todo)} already decided) "
                f"{where} -> {out}")
    bar = tqdm(total=len(jobs), desc="dbk prepare", unit="slide", disable=not dbk_settings.progress)
    with logging_redirect_tqdm(loggers=[logger]):
        for row in rows.values():
            _log(row)
            bar.update(1)
        try:
            for row in _run(todo, client, opts):
                rows[row["name"]] = row
                _log(row)
                bar.update(1)
                bar.set_postfix_str(f"{sum(r['status'] == 'failed' for r in rows.values())} failed")
        finally:
            bar.close()
            if opened:
                client.close()
    report = pd.DataFrame([rows[name] for name, _ in jobs])
    steps = [f"{s}_s" for s in STEPS]
    report = report.reindex(columns=[*COLUMNS, *steps, "traceback", "worker"])
    for c in ("n_tiles", "n_genes"):
        report[c] = report[c].astype("Int64")
    report[steps] = report[steps].astype(float)
    report.attrs["settings"] = settings
    counts = report["status"].value_counts()
    logger.info(f"prepare: {counts.get('done', 0)} done, {counts.get('skipped', 0)} skipped, "
                f"{counts.get('failed', 0)} failed -> {out}")
    return report


def _check_writable(out: Path) -> None:
    """Make ``out`` and check that a file can be created in it, before any slide is read."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dbk-write-check-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"prepare: cannot write into {out} ({type(err).__name__}: {err}); no slide was read. "
                              "Choose a folder you can write to.") from None


def _describe(client) -> str:
    try:
        n = len(client.scheduler_info().get("workers", {}))
        return f"a dask cluster of {n} workers ({client.scheduler.address})"
    except Exception:  # a description only
        return "a dask cluster"


def _run(todo: list, client, opts: dict) -> Iterator[dict]:
    """The rows of the slides to prepare, as they finish: a plain loop, or one ``client.map`` task per slide."""
    if not todo:
        return
    if client is None:
        for name, source, dest in todo:
            yield prepare_one(source, name, str(dest), **opts)
        return
    from distributed import as_completed

    token = uuid.uuid4().hex[:8]
    futures = client.map(prepare_one, [s for _, s, _ in todo], [n for n, _, _ in todo], [str(d) for *_, d in todo],
                         key=[f"dbk-prepare-{n}-{token}" for n, _, _ in todo], pure=False, retries=0, **opts)
    by_key = {f.key: (name, dest) for f, (name, _, dest) in zip(futures, todo, strict=True)}
    try:
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except Exception as err:  # e.g. a worker killed (out of memory): reported, others go on
                name, dest = by_key[fut.key]
                yield _row(name, dest, "failed", error=f"{type(err).__name__}: {err}",
                           traceback=_traceback_summary(err))
    finally:
        client.cancel([f for f in futures if not f.done()])
