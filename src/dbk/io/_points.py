"""Streaming the transcripts of a points element in batches: straight from parquet when it is a plain read, else dask.

:func:`stream_points` is the entry point :func:`dbk.pp.pseudobulk` reads its points through. Both paths hand the
same batches (coordinates, quality, gene codes into a tuple of gene names) to a callback, from several threads; the
points are never loaded whole.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .._logging import logger
from .._settings import settings
from ._parquet import Consume, ParquetPlan, n_threads, read_parquet_plan, release_arrow_memory


def stream_points(
    points, cols: list[str], consume: Consume, *, plan: ParquetPlan | None = None, desc: str = "points"
) -> Literal["parquet", "dask"]:
    """Read the columns ``cols`` of ``points`` batch by batch and hand each batch to ``consume``.

    Parameters
    ----------
    points
        The points element (a dask DataFrame).
    cols
        ``[x, y, gene]`` or ``[x, y, gene, quality]``: the columns to read, in this order.
    consume
        ``consume(x, y, qv, codes, names)``, called from several threads at once: coordinates and quality as numpy
        arrays (``qv`` empty when ``cols`` has no quality column), the gene column as integer ``codes`` (``-1``:
        missing) into the tuple of gene ``names``.
    plan
        A plan of :func:`dbk.io._parquet.plan_parquet_read` for ``points`` and ``cols``: its row groups are read
        straight from the files with pyarrow. ``None``: the points are read partition by partition through dask.
    desc
        Label of the progress bar.

    Returns
    -------
    Which reader was used: ``"parquet"`` or ``"dask"``.
    """
    if plan is not None:
        logger.debug(f"{desc}: reading {len(plan.tasks)} row group(s) of {len(plan.files)} parquet file(s) directly "
                     "with pyarrow.")
        read_parquet_plan(plan, consume, desc=desc)
        return "parquet"
    _stream_dask(points[cols], consume, cols, desc)
    return "dask"


def known_categories(points, gene_key: str) -> tuple | None:
    """The categories of the gene column when it is a categorical with known categories, else ``None``."""
    try:
        col = points[gene_key]
        if isinstance(col.dtype, pd.CategoricalDtype) and col.cat.known:
            return tuple(str(c) for c in col.dtype.categories)
    except (AttributeError, NotImplementedError, TypeError):  # pragma: no cover
        pass
    return None


def _stream_dask(points, consume: Consume, cols: list[str], desc: str) -> None:
    """Read the points partition by partition, computing each (with dask) in the thread that consumes it."""
    no_qv = np.zeros(0, np.float32)
    x_key, y_key, gene_key = cols[:3]
    qv_key = cols[3] if len(cols) > 3 else None

    def run(part) -> None:  # read one partition (in this thread) and hand it over at once: nothing read ahead
        df = part.compute(scheduler="sync")
        codes, cats = _gene_codes(df[gene_key])
        consume(df[x_key].to_numpy(), df[y_key].to_numpy(), df[qv_key].to_numpy() if qv_key else no_qv, codes,
                tuple(str(c) for c in cats))
        release_arrow_memory()

    parts = points.to_delayed()
    n_workers = n_threads()
    # a sliding window of one partition per thread (+1) in flight: bounded memory, no barrier between batches
    with tqdm(total=len(parts), desc=desc, unit="part", disable=not settings.progress) as bar, \
            ThreadPoolExecutor(max_workers=n_workers) as pool:
        pending: set = set()
        for part in parts:
            pending.add(pool.submit(run, part))
            if len(pending) > n_workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
                    bar.update(1)
        for f in pending:
            f.result()
            bar.update(1)


def _gene_codes(g: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes (-1 for missing) and the category names of a gene column, without a Python loop."""
    if isinstance(g.dtype, pd.CategoricalDtype):
        return g.cat.codes.to_numpy().astype(np.int64), np.asarray(g.cat.categories.astype(str))
    if isinstance(g.dtype, pd.ArrowDtype) or str(g.dtype).startswith("string"):
        try:  # arrow-backed strings: dictionary-encode in C++ (several times faster than pandas' factorize)
            import pyarrow as pa
            import pyarrow.compute as pc

            arr = g.array._pa_array if hasattr(g.array, "_pa_array") else pa.array(g)
            enc = pc.dictionary_encode(arr).combine_chunks() if isinstance(arr, pa.ChunkedArray) else (
                pc.dictionary_encode(arr))
            codes = enc.indices.to_numpy(zero_copy_only=False)
            codes = np.where(np.isnan(codes), -1, codes).astype(np.int64) if codes.dtype.kind == "f" else codes
            names = enc.dictionary.to_numpy(zero_copy_only=False)
            return codes.astype(np.int64), np.asarray([n.decode() if isinstance(n, bytes) else str(n) for n in names])
        except (ImportError, AttributeError, TypeError):
            pass
    codes, uniques = pd.factorize(g)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in uniques]
    return codes.astype(np.int64), np.asarray(names, dtype=object)
