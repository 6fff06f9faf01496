"""Reading points straight from their parquet files: plan the row-group reads of a plain ``read_parquet``, then read.

A points element that is a plain ``dask.dataframe.read_parquet`` of local files (as :func:`dbk.io.read_hest` and
``spatialdata.read_zarr`` give them; column selection, renaming and casts allowed) is traced back through the dask
expression to its files (:func:`plan_parquet_read`), and its row groups are read with pyarrow, the gene column
dictionary-encoded, one row group per thread in flight (:func:`read_parquet_plan`; :attr:`dbk.settings.n_jobs`
threads). Anything else is left to dask (:func:`dbk.io._points.stream_points`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .._logging import logger
from .._settings import settings

_BATCH_ROWS = 1 << 20  # rows per batch where a row group is larger than _BIG_ROW_GROUP
_BIG_ROW_GROUP = 1 << 22  # row groups above this many rows are read in batches (bounded memory)

# consume(x, y, qv, codes, names): one batch of points (qv empty when not read; codes index names, -1: none)
Consume = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple], None]


class _Unsupported(Exception):
    """The points are not a plain read of parquet files: use the dask path."""


@dataclass
class ParquetPlan:
    """Which row groups of which files to read, and how to turn the file columns into the points' columns."""

    files: list[str]
    tasks: list[tuple[int, int, int]]  # (file, row group, rows)
    src: dict[str, str]  # points column -> file column
    casts: dict[str, list]  # points column -> numpy dtypes to cast to, in order
    allowed: frozenset | None  # gene names kept by a categorical cast (None: all)


def plan_parquet_read(points, cols: list[str]) -> ParquetPlan | None:
    """How to read ``cols`` of ``points`` straight from parquet, or ``None`` when they are not a plain read.

    Plain means: a single ``dask.dataframe.read_parquet`` of local files (no filters, no partition selection), followed
    only by column selection, renaming, re-assignment of columns and casts that do not change which rows are counted
    (to float for coordinates and quality; to string or categorical for the gene). Transformations are in the
    element's attrs and are applied in the same way on both paths.
    """
    try:
        return _plan(points, cols)
    except _Unsupported as e:
        logger.debug(f"points read through dask ({e}).")
    except Exception as e:  # dask internals changed: never fail, use the general path
        logger.debug(f"points read through dask (plan failed: {type(e).__name__}: {e}).")
    return None


def _plan(points, cols: list[str]) -> ParquetPlan:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from dask.dataframe.dask_expr.io.parquet import ReadParquetFSSpec
        from pyarrow.fs import LocalFileSystem
    except ImportError as e:
        raise _Unsupported(str(e)) from None
    expr = getattr(points, "expr", None)
    if expr is None:
        raise _Unsupported("not a dask-expr collection")
    leaves: dict = {}
    lineage = _lineage(expr, leaves, ReadParquetFSSpec)
    leaves.pop(None, None)
    if not isinstance(lineage, dict) or len(leaves) != 1:
        raise _Unsupported("not one parquet read")
    leaf = next(iter(leaves.values()))
    info = leaf._dataset_info
    ds = info["ds"]
    if not isinstance(ds.filesystem, LocalFileSystem):
        raise _Unsupported(f"filesystem {type(ds.filesystem).__name__}")
    files = list(ds.files)
    if not files or not all(os.path.isfile(f) for f in files):
        raise _Unsupported("files not on the local disk")
    src = {c: lineage[c][0] for c in cols}
    casts = {c: list(lineage[c][1]) for c in cols}
    gene = cols[2]
    allowed = None
    for c in cols:
        for kind, arg in casts[c]:
            if c != gene and kind != "float":
                raise _Unsupported(f"cast of {c!r} to {kind}")
            if c == gene and kind == "float":
                raise _Unsupported("numeric cast of the gene column")
            if kind == "cat" and arg is not None:
                allowed = frozenset(arg) if allowed is None else allowed & frozenset(arg)
        casts[c] = [arg for kind, arg in casts[c] if kind == "float"]

    tasks = []
    for i, f in enumerate(files):
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        for c in cols:
            if src[c] not in schema.names:
                raise _Unsupported(f"column {src[c]!r} not in {f}")
            typ = schema.field(src[c]).type
            if c == gene:
                val = typ.value_type if pa.types.is_dictionary(typ) else typ
                is_str = pa.types.is_string(val) or pa.types.is_large_string(val)
                if not (is_str or pa.types.is_binary(val) or pa.types.is_large_binary(val)):
                    raise _Unsupported(f"gene column of type {typ}")
                if not is_str and lineage[c][1]:  # pandas casts compare bytes with str: leave those to dask
                    raise _Unsupported("cast of a binary gene column")
            elif not (pa.types.is_integer(typ) or pa.types.is_float32(typ) or pa.types.is_float64(typ)):
                raise _Unsupported(f"column {src[c]!r} of type {typ}")
        md = pf.metadata
        tasks += [(i, rg, md.row_group(rg).num_rows) for rg in range(md.num_row_groups)]
    return ParquetPlan(files, tasks, src, casts, allowed)


def _cast_of(dtype) -> tuple[str, object]:
    dtype = pd.api.types.pandas_dtype(dtype)
    if isinstance(dtype, pd.CategoricalDtype):
        cats = dtype.categories
        if cats is None:
            return "cat", None
        if not all(isinstance(c, str) for c in cats):
            raise _Unsupported("non-string categories")
        return "cat", tuple(cats)
    if isinstance(dtype, pd.StringDtype) or dtype == np.dtype(object):
        return "str", None
    if isinstance(dtype, np.dtype) and dtype.kind == "f" and dtype.itemsize >= 4:
        return "float", dtype
    raise _Unsupported(f"cast to {dtype}")


def _lineage(expr, leaves: dict, read_cls):
    """Trace each column of a dask-expr frame (dict) or series (tuple) back to ``(file column, casts)``.

    Raises ``_Unsupported`` for any operation that may change values or rows other than the whitelisted ones.
    """
    from dask.dataframe.dask_expr import _expr as dx

    memo = leaves.setdefault(None, {})  # traced sub-expressions by name (a points graph repeats them)
    if expr._name in memo:
        return memo[expr._name]
    is_frame = isinstance(expr._meta, pd.DataFrame)
    if isinstance(expr, read_cls):
        if expr.operand("filters") or expr.operand("_partitions") is not None:
            raise _Unsupported("filtered parquet read")
        if set(expr.operand("kwargs") or {}) - {"dtype_backend"}:
            raise _Unsupported(f"read_parquet options {sorted(expr.operand('kwargs'))}")
        leaves[expr._name] = expr
        out = {c: (c, ()) for c in expr._meta.columns} if is_frame else (expr._meta.name, ())
    elif type(expr) is dx.Projection:
        frame = _lineage(expr.frame, leaves, read_cls)
        if not isinstance(frame, dict):
            raise _Unsupported("projection of a series")
        want = list(expr._meta.columns) if is_frame else expr.operand("columns")
        try:
            out = {c: frame[c] for c in want} if is_frame else frame[want]
        except (KeyError, TypeError):
            raise _Unsupported("projection of unknown columns") from None
    elif type(expr) in (dx.RenameFrame, dx.ColumnsSetter):
        frame = _lineage(expr.frame, leaves, read_cls)
        if not isinstance(frame, dict) or not is_frame:
            raise _Unsupported("rename of a series")
        new = list(expr._meta.columns)
        if len(new) != len(frame):
            raise _Unsupported("rename changed the number of columns")
        out = dict(zip(new, frame.values(), strict=True))
        if type(expr) is dx.RenameFrame:  # a renamed frame keeps its column order: check it against the mapping
            mapping = expr.operand("columns")
            if not isinstance(mapping, dict) or any(mapping.get(o, o) != n for o, n in zip(frame, new, strict=True)):
                raise _Unsupported("rename by a function")
    elif type(expr) is dx.Assign:
        frame = _lineage(expr.frame, leaves, read_cls)
        if not isinstance(frame, dict):
            raise _Unsupported("assign to a series")
        out = dict(frame)
        for k, v in zip(expr.keys, expr.vals, strict=True):
            if not isinstance(v, dx.Expr):
                raise _Unsupported(f"column {k!r} assigned a constant")
            val = _lineage(v, leaves, read_cls)
            if isinstance(val, dict):
                raise _Unsupported("assigned a frame")
            out[k] = val
    elif type(expr) is dx.AsType:
        frame = _lineage(expr.frame, leaves, read_cls)
        dtypes = expr.operand("dtypes")
        if isinstance(frame, dict):
            per = dtypes if isinstance(dtypes, dict) else {c: dtypes for c in frame}
            out = {c: (s, (*casts, _cast_of(per[c])) if c in per else casts) for c, (s, casts) in frame.items()}
        else:
            if isinstance(dtypes, dict):
                raise _Unsupported("astype of a series with a dict")
            out = (frame[0], (*frame[1], _cast_of(dtypes)))
    else:
        raise _Unsupported(f"operation {type(expr).__name__}")
    if is_frame and list(out) != list(expr._meta.columns):
        raise _Unsupported(f"column order of {type(expr).__name__} not understood")
    memo[expr._name] = out
    return out


def read_parquet_plan(plan: ParquetPlan, consume: Consume, *, desc: str = "points") -> None:
    """Read the planned row groups with pyarrow, one per thread at a time, handing each to ``consume`` as it arrives.

    ``consume(x, y, qv, codes, names)`` gets the coordinates and quality (empty when not read) as numpy arrays, cast
    as the points cast them, and the gene column as dictionary codes (``-1``: missing) into the tuple ``names``.
    It is called from several threads at once.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    x_col, y_col, gene_col = (plan.src[c] for c in list(plan.src)[:3])
    qv_col = plan.src[list(plan.src)[3]] if len(plan.src) > 3 else None
    casts = [plan.casts[c] for c in plan.src]
    read_cols = list(dict.fromkeys(plan.src.values()))
    no_qv = np.zeros(0, np.float32)
    tasks = iter(plan.tasks)
    lock = threading.Lock()
    n_workers = max(1, min(n_threads(), len(plan.tasks)))
    bar = tqdm(total=len(plan.tasks), desc=desc, unit="row group", disable=not settings.progress)

    def numeric(col, cast) -> np.ndarray:
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        a = arr.to_numpy(zero_copy_only=False)
        for dt in cast:
            a = a.astype(dt, copy=False)
        return a

    def deliver(tb) -> None:
        if tb.num_rows == 0:
            return
        if any(c.num_chunks != 1 for c in tb.columns):
            tb = tb.unify_dictionaries().combine_chunks()
        g = tb.column(gene_col).chunk(0)
        if not pa.types.is_dictionary(g.type):
            g = g.dictionary_encode()
        idx = g.indices
        if idx.null_count:
            idx = pc.fill_null(idx, -1)
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in g.dictionary.to_pylist())
        consume(numeric(tb.column(x_col), casts[0]), numeric(tb.column(y_col), casts[1]),
                numeric(tb.column(qv_col), casts[3]) if qv_col else no_qv, idx.to_numpy(zero_copy_only=False), names)

    failed = threading.Event()

    def work() -> None:
        try:
            _work()
        except BaseException:
            failed.set()  # the other threads stop at their next row group
            raise

    def _work() -> None:
        handles: dict[int, pq.ParquetFile] = {}
        while not failed.is_set():
            with lock:
                task = next(tasks, None)
            if task is None:
                return
            i, rg, rows = task
            f = handles.get(i)
            if f is None:
                f = handles[i] = pq.ParquetFile(plan.files[i], read_dictionary=[gene_col], pre_buffer=False,
                                                buffer_size=1 << 22)
            if rows <= _BIG_ROW_GROUP:
                deliver(f.read_row_group(rg, columns=read_cols, use_threads=False))
            else:  # a huge row group: stream it in batches (bounded memory)
                for b in f.iter_batches(batch_size=_BATCH_ROWS, row_groups=[rg], columns=read_cols,
                                        use_threads=False):
                    deliver(pa.Table.from_batches([b]))
            bar.update(1)

    try:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for f in [pool.submit(work) for _ in range(n_workers)]:
                f.result()
    finally:
        bar.close()
        release_arrow_memory()


def release_arrow_memory() -> None:
    """Hand pyarrow's freed buffers back to the OS (its allocator keeps them otherwise, inflating RSS)."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):  # pragma: no cover
        pass


def n_threads() -> int:
    """Threads that read points: :attr:`dbk.settings.n_jobs` (unset: the cores this process may use)."""
    return max(1, int(settings.n_jobs))
