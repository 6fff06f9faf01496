"""Pseudo-bulk: sum expression per tile, exactly, streaming over the points."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from spatialdata import SpatialData
from spatialdata.models import TableModel
from tqdm.auto import tqdm

from .._constants import (
    CELLS_KEY,
    CONTROL_PREFIXES,
    COUNTS_LAYER,
    GENE_COL,
    INSTANCE_COL,
    N_CELLS_COL,
    N_TRANSCRIPTS_COL,
    QV_COL,
    REGION_COL,
    SAMPLE_COL,
    SPATIAL_KEY,
    SPOTS_KEY,
    TILES_KEY,
    TILES_TABLE_KEY,
    TISSUE_FRACTION_COL,
    TRANSCRIPTS_KEY,
    UNS_KEY,
)
from .._image import affine_to_image_pixels
from .._logging import logger
from .._settings import settings
from .._utils import copy_sdata
from ._binning import TileLookup, count_kernel
from ._normalize import normalize
from ._tiles import tile_bounds

_KERNEL_BYTES = 4 << 30


def is_control_probe(name: str) -> bool:
    """Whether a feature name is a Xenium control / blank / unassigned probe rather than a gene."""
    return str(name).startswith(CONTROL_PREFIXES)


def pseudobulk(
    sdata: SpatialData,
    *,
    tiles_key: str = TILES_KEY,
    source: Literal["transcripts", "cells", "spots"] = "transcripts",
    points_key: str = TRANSCRIPTS_KEY,
    cells_key: str = CELLS_KEY,
    table_key: str | None = None,
    image_key: str | None = None,
    genes: list[str] | None = None,
    gene_key: str = GENE_COL,
    qv_key: str = QV_COL,
    min_qv: float | None = 20.0,
    keep_controls: bool = False,
    sample: str | None = None,
    target_sum: float | None = 1e4,
    key_added: str = TILES_TABLE_KEY,
    copy: bool = False,
) -> SpatialData | None:
    """Sum the expression inside each tile into a tiles x genes table.

    From transcripts, each point is binned into the tile whose half-open pixel bounds ``[x0, x1) x [y0, y1)``
    contain it, so on non-overlapping tiles no transcript is counted twice; the points are streamed partition by
    partition and never loaded whole. From cells, each cell counts in the tile containing its centroid. From spots,
    a spot tile (``make_tiles(mode="spots")``) takes its spot's counts.

    Parameters
    ----------
    sdata
        SpatialData with tiles (:func:`dbk.pp.make_tiles`) and expression.
    tiles_key
        Shapes element with the tiles.
    source
        Where the expression comes from: ``"transcripts"`` (points), ``"cells"`` (a cells x genes table annotating
        cell shapes) or ``"spots"`` (a spots x genes table; tiles from ``mode="spots"``).
    points_key
        Points element with the transcripts (``source="transcripts"``).
    cells_key
        Shapes element with the cells (``source="cells"``); also used to count ``n_cells`` when present.
    table_key
        Table with cell or spot counts (``source="cells"``/``"spots"``); the table annotating the cells / spots
        when ``None``.
    image_key
        The H&E image the tiles were laid on; the only image when ``None``.
    genes
        Genes to keep, in this order; all genes of the panel (minus control probes) when ``None``.
    gene_key
        Column of the transcripts holding the gene name.
    qv_key
        Column of the transcripts holding the Phred quality value.
    min_qv
        Drop transcripts with quality below this (Xenium's default is 20); ``None`` keeps all.
    keep_controls
        Keep negative-control, blank and unassigned probes as features.
    sample
        Sample name written to ``obs["sample"]``; ``sdata.attrs["sample"]`` or ``"sample"`` when ``None``.
    target_sum
        Library size for :func:`dbk.pp.normalize` of ``X``; ``None`` for log1p of raw counts.
    key_added
        Name of the table written.
    copy
        Return a modified copy instead of changing ``sdata`` in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``sdata.tables[key_added]``: tiles x genes AnnData annotating
    ``sdata.shapes[tiles_key]`` (``obs["region"]``, ``obs["instance_id"]``), with

    - ``layers["counts"]``: raw counts (CSR, int64),
    - ``X``: log1p of normalised counts (see :func:`dbk.pp.normalize`),
    - ``obs``: ``sample``, ``n_transcripts``, ``n_cells`` (NaN where unknown), ``tissue_fraction``,
    - ``obsm["spatial"]``: tile centres in level-0 pixels,
    - ``uns["dbk"]["pseudobulk"]``: the parameters.
    """
    if source not in ("transcripts", "cells", "spots"):
        raise ValueError(f"source must be 'transcripts', 'cells' or 'spots', got {source!r}.")
    if copy:
        sdata = copy_sdata(sdata)
    bounds = tile_bounds(sdata, tiles_key)
    tiles = sdata.shapes[tiles_key]
    if image_key is None:
        image_key = tiles.attrs.get("dbk", {}).get("image_key")

    if source == "transcripts":
        counts, gene_names = _from_transcripts(
            sdata, bounds, points_key, image_key, genes, gene_key, qv_key, min_qv, keep_controls
        )
    elif source == "cells":
        counts, gene_names = _from_cells(sdata, bounds, cells_key, table_key, image_key, genes, keep_controls)
    else:
        counts, gene_names = _from_spots(sdata, tiles, table_key, genes, keep_controls)

    _check_counts(counts, f"expression summed into tiles {tiles_key!r}")
    obs = pd.DataFrame(index=pd.Index([str(i) for i in tiles.index], name=None))
    obs[SAMPLE_COL] = pd.Categorical([sample or sdata.attrs.get("sample", "sample")] * len(obs))
    obs[N_TRANSCRIPTS_COL] = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)
    obs[N_CELLS_COL] = _count_cells(sdata, bounds, cells_key, image_key)
    obs[TISSUE_FRACTION_COL] = (
        tiles[TISSUE_FRACTION_COL].to_numpy() if TISSUE_FRACTION_COL in tiles.columns else np.nan
    )
    obs[REGION_COL] = pd.Categorical([tiles_key] * len(obs))
    obs[INSTANCE_COL] = np.asarray(tiles.index)
    var = pd.DataFrame(index=pd.Index(gene_names, dtype=str))
    adata = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=var)
    adata.layers[COUNTS_LAYER] = counts
    adata.obsm[SPATIAL_KEY] = np.column_stack(
        [(bounds[:, 0] + bounds[:, 2]) / 2.0, (bounds[:, 1] + bounds[:, 3]) / 2.0]
    )
    normalize(adata, target_sum=target_sum, log1p=True)
    adata.uns[UNS_KEY] = {
        "pseudobulk": {
            "source": source,
            "tiles_key": tiles_key,
            "min_qv": "None" if min_qv is None else float(min_qv),
            "keep_controls": bool(keep_controls),
            "target_sum": "None" if target_sum is None else float(target_sum),
        }
    }
    if key_added in sdata.tables:
        del sdata.tables[key_added]
    sdata.tables[key_added] = TableModel.parse(
        adata, region=tiles_key, region_key=REGION_COL, instance_key=INSTANCE_COL
    )
    logger.info(
        f"pseudobulk: {adata.n_obs} tiles x {adata.n_vars} genes, {int(obs[N_TRANSCRIPTS_COL].sum()):,} counts "
        f"from {source} -> sdata.tables[{key_added!r}]."
    )
    return sdata if copy else None


def _check_counts(counts: sp.spmatrix, what: str) -> None:
    data = counts.data if sp.issparse(counts) else np.asarray(counts)
    if data.size and not np.isfinite(data).all():
        raise ValueError(f"NaN or infinite counts in {what}; counts must be finite.")
    if data.size and (data < 0).any():
        raise ValueError(f"Negative counts in {what}; counts must be >= 0.")


def _gene_filter(names, genes: list[str] | None, keep_controls: bool) -> list[str]:
    names = [str(n) for n in names]
    if genes is not None:
        return list(genes)
    return [n for n in names if keep_controls or not is_control_probe(n)]


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


def _from_transcripts(sdata, bounds, points_key, image_key, genes, gene_key, qv_key, min_qv, keep_controls):
    if points_key not in sdata.points:
        raise KeyError(f"No points {points_key!r} in sdata.points; available: {list(sdata.points)}.")
    points = sdata.points[points_key]
    for col in ("x", "y", gene_key):
        if col not in points.columns:
            raise KeyError(f"Points {points_key!r} have no column {col!r}; columns: {list(points.columns)}.")
    use_qv = min_qv is not None and qv_key in points.columns
    if min_qv is not None and not use_qv:
        logger.info(f"pseudobulk: points {points_key!r} have no {qv_key!r} column; no quality filter applied.")
    cols = ["x", "y", gene_key] + ([qv_key] if use_qv else [])
    m = affine_to_image_pixels(sdata, points_key, image_key)
    lookup = TileLookup.build(bounds)
    n_tiles = len(bounds)

    gene_index: dict[str, int] = {}
    if genes is not None:
        if len(set(genes)) != len(genes):
            raise ValueError("genes contains duplicates.")
        gene_index = {g: i for i, g in enumerate(genes)}

    affine = m[:2].copy()
    local = threading.local()
    accs: list[_ThreadCounts] = []
    lock = threading.Lock()

    def bin_partition(df: pd.DataFrame) -> int:
        acc = getattr(local, "acc", None)
        if acc is None:
            acc = local.acc = _ThreadCounts(n_tiles, dict(gene_index), fixed=genes is not None)
            with lock:
                accs.append(acc)
        codes, cats = _gene_codes(df[gene_key])
        lut = acc.lut(cats, keep_controls)
        acc.reserve(len(df))
        x = df["x"].to_numpy()
        y = df["y"].to_numpy()
        qv = df[qv_key].to_numpy() if use_qv else np.zeros(0, np.float32)
        if np.issubdtype(x.dtype, np.floating):
            acc.n_bad += int(np.count_nonzero(~np.isfinite(x) | ~np.isfinite(y)))
        return count_kernel(x, y, qv, codes, lut, float(min_qv) if use_qv else 0.0, affine, lookup.ox,
                            lookup.oy, lookup.size, lookup.table, lookup.bounds, lookup.aligned, acc.counts)

    parts = points[cols].to_delayed()
    n_threads = _n_threads()

    def run(part) -> int:  # read one partition (in this thread) and bin it at once: nothing read ahead
        n = bin_partition(part.compute(scheduler="sync"))
        _release_arrow_memory()
        return n

    # a sliding window of one partition per thread (+1) in flight: bounded memory, no barrier between batches
    n_counted = 0
    with tqdm(total=len(parts), desc="pseudobulk", unit="part", disable=not settings.progress) as bar, \
            ThreadPoolExecutor(max_workers=n_threads) as pool:
        pending: set = set()
        it = iter(parts)
        for part in it:
            pending.add(pool.submit(run, part))
            if len(pending) > n_threads:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    n_counted += f.result()
                    bar.update(1)
        for f in pending:
            n_counted += f.result()
            bar.update(1)
    n_bad = sum(a.n_bad for a in accs)
    if n_bad:
        logger.warning(f"pseudobulk: {n_bad:,} transcripts of {points_key!r} have NaN/infinite coordinates; "
                       "they lie in no tile and were not counted.")
    # merge the per-thread tables by gene name
    names: list[str] = list(gene_index) if genes is not None else sorted({g for a in accs for g in a.index})
    col = {g: i for i, g in enumerate(names)}
    total = np.zeros((n_tiles, len(names)), dtype=np.int64)
    for a in accs:
        src = [(j, col[g]) for g, j in a.index.items() if g in col]
        if src:
            js, cs = map(np.asarray, zip(*src, strict=True))
            total[:, cs] += a.table()[:, js]
    counts = sp.csr_matrix(total)
    if int(counts.sum()) != n_counted:  # every increment is one transcript in one tile
        raise RuntimeError(f"pseudobulk: internal count mismatch ({int(counts.sum())} vs {n_counted}).")
    return counts, names


class _ThreadCounts:
    """One worker thread's tiles x genes counts, with its own growing gene index (no locks in the hot loop).

    Counts accumulate in int32 (half the memory and cache footprint of int64) and are flushed into an int64 table
    before the thread has seen 2**31 - 1 transcripts, so no count can ever wrap.
    """

    _FLUSH_AT = 2**31 - 1

    def __init__(self, n_tiles: int, index: dict[str, int], *, fixed: bool) -> None:
        self.index, self.fixed = index, fixed
        self.n_bad = 0
        self.seen = 0
        self.counts = np.zeros((n_tiles, _round_up(max(len(index), 1))), dtype=np.int32)
        self.flushed: np.ndarray | None = None  # int64, only if a thread ever sees > 2**31 - 1 transcripts

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more transcripts without any int32 count overflowing."""
        if self.seen + n > self._FLUSH_AT:
            self._flush()
        if n > self._FLUSH_AT:
            raise ValueError(f"A points partition of {n:,} rows is too large; repartition the points.")
        self.seen += n

    def _flush(self) -> None:
        if self.flushed is None:
            self.flushed = np.zeros(self.counts.shape, dtype=np.int64)
        elif self.flushed.shape[1] < self.counts.shape[1]:
            grown = np.zeros(self.counts.shape, dtype=np.int64)
            grown[:, : self.flushed.shape[1]] = self.flushed
            self.flushed = grown
        self.flushed[:, : self.counts.shape[1]] += self.counts
        self.counts[:] = 0
        self.seen = 0

    def table(self) -> np.ndarray:
        """The thread's counts as int64."""
        out = self.counts.astype(np.int64)
        if self.flushed is not None:
            out[:, : self.flushed.shape[1]] += self.flushed
        return out

    def lut(self, cats, keep_controls: bool) -> np.ndarray:
        lut = np.full(len(cats), -1, dtype=np.int64)
        for j, name in enumerate(cats):
            g = self.index.get(name)
            if g is None:
                if self.fixed or (not keep_controls and is_control_probe(name)):
                    continue
                g = self.index[name] = len(self.index)
            lut[j] = g
        if len(self.index) > self.counts.shape[1]:
            need = self.counts.shape[0] * len(self.index) * 4
            if need > _KERNEL_BYTES:
                raise MemoryError(
                    f"pseudobulk: {self.counts.shape[0]:,} tiles x {len(self.index):,} genes needs {need / 2**30:.1f} "
                    "GiB per thread; pass genes= (e.g. a panel or the top variable genes) or use fewer tiles."
                )
            # a partition brings all its genes at once: grow to what is needed (rounded), not by doubling
            grown = np.zeros((self.counts.shape[0], _round_up(len(self.index))), np.int32)
            grown[:, : self.counts.shape[1]] = self.counts
            self.counts = grown
        return lut


def _release_arrow_memory() -> None:
    """Hand pyarrow's freed buffers back to the OS (its allocator keeps them otherwise, inflating RSS)."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):  # pragma: no cover
        pass


def _round_up(n: int, step: int = 16) -> int:
    return -(-n // step) * step


def _n_threads() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _annotating_table(sdata: SpatialData, element_key: str, table_key: str | None) -> ad.AnnData:
    if table_key is not None:
        if table_key not in sdata.tables:
            raise KeyError(f"No table {table_key!r} in sdata.tables; available: {list(sdata.tables)}.")
        return sdata.tables[table_key]
    for table in sdata.tables.values():
        region = table.uns.get("spatialdata_attrs", {}).get("region")
        regions = [region] if isinstance(region, str) else list(region or [])
        if element_key in regions:
            return table
    raise KeyError(f"No table in sdata.tables annotates {element_key!r}; pass table_key=.")


def _table_counts(table: ad.AnnData, element_key: str, genes, keep_controls):
    attrs = table.uns.get("spatialdata_attrs", {})
    X = table.layers[COUNTS_LAYER] if COUNTS_LAYER in table.layers else table.X
    X = sp.csr_matrix(X)
    names = _gene_filter(table.var_names, genes, keep_controls)
    missing = [g for g in names if g not in table.var_names]
    if missing:
        raise KeyError(f"Genes not in the table annotating {element_key!r}: {missing[:10]}.")
    if table.var_names.has_duplicates:
        raise ValueError(f"The table annotating {element_key!r} has duplicate gene names; make them unique first.")
    cols = table.var_names.get_indexer(names)
    instance = table.obs[attrs["instance_key"]].to_numpy() if "instance_key" in attrs else table.obs_names
    return X[:, cols], names, np.asarray(instance)


def _from_cells(sdata, bounds, cells_key, table_key, image_key, genes, keep_controls):
    if cells_key not in sdata.shapes:
        raise KeyError(f"No shapes {cells_key!r} with cells in sdata.shapes; available: {list(sdata.shapes)}.")
    table = _annotating_table(sdata, cells_key, table_key)
    X, names, instance = _table_counts(table, cells_key, genes, keep_controls)
    _check_counts(X, f"table of {cells_key!r}")
    cells = sdata.shapes[cells_key]
    pos = cells.index.get_indexer(instance)
    if (pos < 0).any():
        raise ValueError(f"{int((pos < 0).sum())} rows of the cell table have no shape in {cells_key!r}.")
    cx, cy = _centroids_in_image(sdata, cells_key, image_key)
    p, t = TileLookup.build(bounds).assign(cx[pos], cy[pos])
    assign = sp.csr_matrix((np.ones(len(p), dtype=np.int64), (t, p)), shape=(len(bounds), X.shape[0]))
    return (assign @ X.astype(np.int64)).tocsr(), names


def _from_spots(sdata, tiles, table_key, genes, keep_controls):
    if "spot_id" not in tiles.columns:
        raise ValueError("source='spots' needs tiles made with dbk.pp.make_tiles(mode='spots') (no 'spot_id').")
    spots_key = tiles.attrs.get("dbk", {}).get("spots_key", SPOTS_KEY)
    table = _annotating_table(sdata, spots_key, table_key)
    X, names, instance = _table_counts(table, spots_key, genes, keep_controls)
    row = pd.Index(instance).get_indexer(tiles["spot_id"].to_numpy())
    if (row < 0).any():
        raise ValueError(f"{int((row < 0).sum())} spot tiles have no row in the table annotating {spots_key!r}.")
    return X[row].astype(np.int64).tocsr(), names


def _centroids_in_image(sdata, key, image_key):
    c = sdata.shapes[key].geometry.centroid
    m = affine_to_image_pixels(sdata, key, image_key)
    x, y = c.x.to_numpy(), c.y.to_numpy()
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def _count_cells(sdata, bounds, cells_key, image_key) -> np.ndarray:
    if cells_key not in sdata.shapes:
        return np.full(len(bounds), np.nan)
    cx, cy = _centroids_in_image(sdata, cells_key, image_key)
    _, t = TileLookup.build(bounds).assign(cx, cy)
    return np.bincount(t, minlength=len(bounds)).astype(np.float64)
