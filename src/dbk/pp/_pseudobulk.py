"""Pseudo-bulk: sum expression per tile, exactly, streaming over the points."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from spatialdata import SpatialData

from .._constants import (
    CELLS_KEY,
    CONTROL_PREFIXES,
    COUNTS_LAYER,
    GENE_COL,
    N_CELLS_COL,
    N_TRANSCRIPTS_COL,
    QV_COL,
    SAMPLE_COL,
    SPOTS_KEY,
    TILES_KEY,
    TILES_TABLE_KEY,
    TISSUE_FRACTION_COL,
    TRANSCRIPTS_KEY,
    UM_PER_PX_KEY,
    UNS_KEY,
)
from .._genes import check_gene_names, warn_if_ensembl
from .._image import affine_to_image_pixels, get_pixel_size, image_shape, resolve_image_key
from .._logging import logger
from .._utils import copy_sdata
from ..io._parquet import n_threads, plan_parquet_read
from ..io._points import known_categories, stream_points
from ._binning import TileLookup, apply_affine
from ._coverage import Coverage, dropped_grid_tiles, n_points_in_tiles, report_pseudobulk, report_tissue_filter
from ._tile_table import tile_table, write_tile_table
from ._tiles import tile_bounds

_KERNEL_BYTES = 4 << 30  # the largest int32 tiles x genes table

try:  # scipy's in-place row scaling of CSR values (private, stable since scipy 1.8); np.repeat otherwise
    from scipy.sparse._sparsetools import csr_scale_rows as _csr_scale_rows
except ImportError:  # pragma: no cover
    _csr_scale_rows = None


def is_control_probe(name: str) -> bool:
    """Whether a feature name is a Xenium control / blank / unassigned probe rather than a gene.

    Parameters
    ----------
    name
        A feature (gene) name; converted with ``str``.

    Returns
    -------
    bool
        ``True`` when the name starts with one of Xenium's control prefixes (``NegControlProbe_``,
        ``NegControlCodeword_``, ``BLANK_``, ``UnassignedCodeword_`` ...: ``dbk._constants.CONTROL_PREFIXES``),
        which :func:`pseudobulk` leaves out of the table.
    """
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
    reader: Literal["auto", "dask"] = "auto",
    key_added: str = TILES_TABLE_KEY,
    copy: bool = False,
) -> SpatialData | None:
    """Sum the expression inside each tile into a tiles x genes table.

    From transcripts, each point is binned into the tile whose half-open pixel bounds ``[x0, x1) x [y0, y1)``
    contain it, so on non-overlapping tiles no transcript is counted twice; the points are streamed and never loaded
    whole. Points that are a plain ``dask.dataframe.read_parquet`` of local files (as :func:`dbk.io.read_hest` and
    ``spatialdata.read_zarr`` give them; column selection, renaming and casts allowed) are read row group by row
    group straight from the files with pyarrow, the gene column dictionary-encoded, one row group per thread in
    flight (:attr:`dbk.settings.n_jobs` threads); any other points (in memory, computed columns, parquet filters,
    ...) partition by partition through dask. Both give the same table (``uns["dbk"]["pseudobulk"]["reader"]`` says
    which was used; ``reader="dask"`` forces the general path). From cells, each cell counts in the tile containing
    its centroid. From spots, a spot tile (``make_tiles(mode="spots")``) takes its
    spot's counts.

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
        Genes to keep, in this order; all genes of the panel (minus control probes) when ``None``. An empty list
        raises ``ValueError``.
    gene_key
        Column of the transcripts holding the gene name.
    qv_key
        Column of the transcripts holding the Phred quality value.
    min_qv
        Drop transcripts with quality below this (Xenium's default is 20); ``None`` keeps all.
    keep_controls
        Keep negative-control, blank and unassigned probes as features.
    sample
        Sample name written to ``obs["sample"]``. When ``None``: ``sdata.attrs["sample"]``, else the one sample name
        the reader wrote into the ``obs["sample"]`` of the other tables (:func:`dbk.io.read_hest`,
        :func:`dbk.io.read_st`, ...), else the ``id`` / ``sample_id`` of ``sdata.attrs["hest_metadata"]``, else
        ``"sample"``.
    target_sum
        Library size for :func:`dbk.pp.normalize` of ``X``; ``None`` for log1p of raw counts.
    reader
        How transcripts are read: ``"auto"`` reads plain parquet points straight from their files and any other
        points through dask; ``"dask"`` reads all points partition by partition through dask (the general path,
        e.g. to compare speed; the counts are the same).
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
    - ``uns["dbk"]["pseudobulk"]``: the parameters (and, from transcripts, the ``reader``), and how much of the
      expression the tiles hold: ``n_counts_source`` (the transcripts passing the filters, or the cells' / spots'
      counts of the genes kept), ``fraction_in_image`` (the share of them on the image) and ``fraction_in_tiles``
      (the share inside a tile; ``"None"`` where unknown); from transcripts on grid tiles whose tissue filter
      dropped tiles (:func:`dbk.pp.make_tiles`, which reads no points), also ``tissue_filter``: what it dropped,
      counted exactly in this pass: ``min_tissue_fraction``, ``n_tiles_dropped``, ``objects``, ``n_in_grid`` (the
      transcripts passing the filters in a tile of the full grid), ``n_dropped`` (those in no kept tile) and
      ``fraction_dropped``; absent when the tiles are no longer the ones ``make_tiles`` kept,
    - ``uns["dbk"]["um_per_px"]``: the image's pixel size, when it has one (so :func:`dbk.tl.spatial_context` can
      put the tile centres in µm).

    Raises
    ------
    ValueError
        If the filters leave no gene (every feature a control probe with ``keep_controls=False``): the table would
        have 0 genes; the message names the filter. Also for tiles with NaN, inverted or off-image bounds
        (:func:`dbk.pp.tile_bounds`).

    Warns
    -----
    Through the ``"dbk"`` logger, naming the numbers, the extent of the points and the likely causes (x and y
    swapped, a wrong pixel size, another coordinate system): when more than 5% of the counts lie off the image
    (off the image is always suspicious), and when more than half of the counts on the image lie outside every tile
    (some is expected: grid tiles cover the tissue only), and when the tiles the tissue filter of
    :func:`dbk.pp.make_tiles` dropped held more than 25% of the transcripts in the grid (logged below that). Also when
    the genes look like Ensembl ids (dbk matches genes by symbol; see :func:`dbk.pp.map_gene_names`), and when no
    transcript passing the filters lies in a tile (an all-zero table). Tiles partly outside the image are said by
    :func:`dbk.pp.tile_bounds`.
    """
    if source not in ("transcripts", "cells", "spots"):
        raise ValueError(f"source must be 'transcripts', 'cells' or 'spots', got {source!r}.")
    if reader not in ("auto", "dask"):
        raise ValueError(f"reader must be 'auto' or 'dask', got {reader!r}.")
    if genes is not None and len(genes) == 0:
        raise ValueError(
            "genes=[] selects no gene, so the table would have 0 genes; pass genes=None for all genes of the panel, "
            "or the genes to keep."
        )
    if copy:
        sdata = copy_sdata(sdata)
    bounds = tile_bounds(sdata, tiles_key)
    tiles = sdata.shapes[tiles_key]
    meta = tiles.attrs.get("dbk", {})
    if image_key is None:
        image_key = meta.get("image_key")

    shape = _image_extent(sdata, image_key)  # (h, w) of level 0; None when there is no one image to measure
    used = None  # the reader used for transcripts
    dropped = None  # bounds of the grid tiles make_tiles' tissue filter dropped: their transcripts are counted too
    if source == "transcripts":
        if image_key is not None and image_key == meta.get("image_key"):
            dropped = dropped_grid_tiles(meta, bounds, tiles_key)
        counts, gene_names, used, cov = _from_transcripts(
            sdata, bounds, points_key, image_key, genes, gene_key, qv_key, min_qv, keep_controls, reader == "auto",
            shape, dropped,
        )
        what = f"transcripts of {points_key!r}" + (" passing the quality filter" if min_qv is not None else "")
    elif source == "cells":
        counts, gene_names, cov = _from_cells(sdata, bounds, cells_key, table_key, image_key, genes, keep_controls,
                                              shape)
        what = f"counts of the cells of {cells_key!r}"
    else:
        counts, gene_names, cov, spots_key = _from_spots(sdata, tiles, table_key, image_key, genes, keep_controls,
                                                         shape)
        what = f"counts of the spots of {spots_key!r}"

    _check_counts(counts, f"expression summed into tiles {tiles_key!r}")
    warn_if_ensembl(gene_names, f"table made by pseudobulk from {source}", how_to_map=(
        "map them to symbols before pseudobulk with dbk.pp.map_gene_names(sdata, mapping) (a dict id -> symbol, or "
        "the name of a var column holding the symbols), or read the data with gene_symbols="))
    coverage = report_pseudobulk(cov, what, resolve_image_key(sdata, image_key) if shape else None, shape,
                                 tiles_key, len(tiles))
    if dropped is not None:  # what make_tiles' tissue filter dropped, counted in this pass (make_tiles reads no points)
        coverage["tissue_filter"] = report_tissue_filter(cov, what, meta)
    obs = {  # obs columns, in this order (then region and instance_id)
        SAMPLE_COL: pd.Categorical([sample if sample is not None else _sample_name(sdata, key_added)] * len(tiles)),
        N_TRANSCRIPTS_COL: np.asarray(counts.sum(axis=1)).ravel().astype(np.int64),
        N_CELLS_COL: _count_cells(sdata, bounds, cells_key, image_key),
        TISSUE_FRACTION_COL: tiles[TISSUE_FRACTION_COL].to_numpy() if TISSUE_FRACTION_COL in tiles.columns else np.nan,
    }
    var = pd.DataFrame(index=pd.Index(gene_names, dtype=str))
    adata = tile_table(sdata, tiles_key, _log1p_normalized(counts, target_sum), obs=obs, var=var, bounds=bounds)
    adata.layers[COUNTS_LAYER] = counts
    adata.uns[UNS_KEY] = {
        "pseudobulk": {
            "source": source,
            "tiles_key": tiles_key,
            "min_qv": "None" if min_qv is None else float(min_qv),
            "keep_controls": bool(keep_controls),
            "target_sum": "None" if target_sum is None else float(target_sum),
            **coverage,
        }
    }
    um_per_px = _pixel_size(sdata, image_key)
    if um_per_px is not None:  # so that dbk.tl.spatial_context (and others) can put the tiles in µm
        adata.uns[UNS_KEY][UM_PER_PX_KEY] = um_per_px
    if used is not None:  # how the points were read: "parquet" (straight from the files) or "dask"
        adata.uns[UNS_KEY]["pseudobulk"]["reader"] = used
    write_tile_table(sdata, adata, tiles_key, key_added)
    logger.info(
        f"pseudobulk: {adata.n_obs} tiles x {adata.n_vars} genes, {int(adata.obs[N_TRANSCRIPTS_COL].sum()):,} counts "
        f"from {source} -> sdata.tables[{key_added!r}]."
    )
    return sdata if copy else None


def _log1p_normalized(counts: sp.csr_matrix, target_sum: float | None) -> sp.csr_matrix:
    """``X`` exactly as :func:`dbk.pp.normalize` (``log1p=True``) computes it from integer CSR counts.

    The same float64 operations in the same order (row totals, ``target_sum / total``, one product per count,
    ``log1p``, then float32), but on the stored values only, a block of rows at a time: no float64 copy of the
    whole matrix.
    """
    if target_sum is not None and target_sum <= 0:
        raise ValueError(f"target_sum must be positive, got {target_sum!r}.")
    counts = sp.csr_matrix(counts)
    indptr = counts.indptr
    scale = None
    if target_sum is not None:
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out = np.empty(counts.nnz, dtype=np.float32)
    indices = np.empty_like(counts.indices)  # X's own copy (in-place changes of one matrix never reach the other)
    # row blocks of about _NORM_VALUES stored values (a row longer than that is a block of its own)
    cuts = np.searchsorted(indptr, np.arange(0, counts.nnz, _NORM_VALUES), side="right") - 1
    rows = np.unique(np.r_[0, cuts, counts.shape[0]]).tolist()
    local = threading.local()  # a float64 buffer per thread, reused block after block (no fresh pages each time)

    def norm(r0: int, r1: int) -> None:  # rows r0:r1 of out: blocks write apart, in threads
        lo, hi = int(indptr[r0]), int(indptr[r1])
        if hi == lo:
            return
        indices[lo:hi] = counts.indices[lo:hi]
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < hi - lo:
            buf = local.buf = np.empty(max(hi - lo, min(counts.nnz, 2 * _NORM_VALUES)), dtype=np.float64)
        data = buf[: hi - lo]
        np.copyto(data, counts.data[lo:hi], casting="unsafe")
        if scale is not None:
            _scale_rows(indptr[r0 : r1 + 1] - lo, counts.indices[lo:hi], data, scale[r0:r1], counts.shape[1])
        np.log1p(data, out=data)
        out[lo:hi] = data

    _in_threads(lambda r: norm(*r), itertools.pairwise(rows))
    return sp.csr_matrix((out, indices, indptr.copy()), shape=counts.shape)


def _in_threads(fn, items) -> None:
    """``fn(item)`` for every item, in up to :func:`dbk.io._parquet.n_threads` threads (numpy lets go of the GIL)."""
    items = list(items)
    n = min(n_threads(), len(items))
    if n <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=n) as pool:
        for f in [pool.submit(fn, item) for item in items]:
            f.result()


_NORM_VALUES = 1 << 18  # stored values normalised at a time (a float64 block that stays in cache)


def _scale_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, scale: np.ndarray, n_cols: int) -> None:
    """``data *= scale[row]`` for the stored values ``data`` of CSR rows ``indptr`` (one product each), in place.

    scipy's C++ row scaling where it has one (several times faster than expanding ``scale`` with ``np.repeat``).
    """
    if _csr_scale_rows is not None and indptr.dtype == indices.dtype:
        try:
            _csr_scale_rows(len(indptr) - 1, n_cols, indptr, indices, data, scale)
            return
        except (TypeError, ValueError):  # pragma: no cover - another scipy signature: the numpy way below
            pass
    data *= np.repeat(scale, np.diff(indptr))


def _sample_name(sdata: SpatialData, key_added: str) -> str:
    """The sample name the SpatialData carries (see :func:`pseudobulk`'s ``sample``), ``"sample"`` if none."""
    name = sdata.attrs.get("sample")
    if name is not None:
        return str(name)
    found: set[str] = set()
    for key, table in sdata.tables.items():
        if key != key_added and SAMPLE_COL in table.obs.columns:
            found |= {str(v) for v in pd.unique(table.obs[SAMPLE_COL].dropna())}
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        logger.info(f"pseudobulk: the tables name several samples ({sorted(found)[:5]}); pass sample=.")
    meta = sdata.attrs.get("hest_metadata")
    if isinstance(meta, dict):
        for k in ("id", "sample_id"):
            if isinstance(meta.get(k), str) and meta[k]:
                return meta[k]
    return "sample"


def _check_counts(counts: sp.spmatrix, what: str) -> None:
    data = counts.data if sp.issparse(counts) else np.asarray(counts)
    if data.size and data.dtype.kind not in "iub" and not np.isfinite(data).all():  # integers are always finite
        raise ValueError(f"NaN or infinite counts in {what}; counts must be finite.")
    if data.size and data.dtype.kind != "b" and data.min() < 0:  # one reduction, no temporary mask
        raise ValueError(f"Negative counts in {what}; counts must be >= 0.")


def _gene_filter(names, genes: list[str] | None, keep_controls: bool) -> list[str]:
    names = [str(n) for n in names]
    if genes is not None:
        return list(genes)
    return [n for n in names if keep_controls or not is_control_probe(n)]


def _no_gene_left(what: str, controls: list[str], keep_controls: bool) -> None:
    """Raise: the genes were all filtered out (the table would have 0 genes), naming the filter."""
    if controls and not keep_controls:
        raise ValueError(f"pseudobulk: every feature of {what} is a control probe ({len(controls)} features, e.g. "
                         f"{controls[:5]}: names starting with {CONTROL_PREFIXES[:4]}...), and keep_controls=False "
                         "drops them all, so the table would have 0 genes. Pass keep_controls=True to keep them as "
                         "features, or give the expression of the genes.")
    raise ValueError(f"pseudobulk: {what} name no gene, so the table would have 0 genes; check that the expression "
                     "has gene names (gene_key= for transcripts).")


def _from_transcripts(sdata, bounds, points_key, image_key, genes, gene_key, qv_key, min_qv, keep_controls, direct,
                      shape, dropped=None):
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
    if genes is not None and len(set(genes)) != len(genes):
        raise ValueError("genes contains duplicates.")

    counter = _Counter(bounds, m[:2].copy(), genes, keep_controls, float(min_qv) if use_qv else 0.0, shape, dropped)
    plan = plan_parquet_read(points, cols) if direct else None  # None: not a plain parquet read, use dask
    if plan is not None:
        counter.allowed = plan.allowed
    known = known_categories(points, gene_key)
    if known is not None:  # every partition of a known categorical brings all its categories: so does every path
        counter.lut(known)
    reader = stream_points(points, cols, counter.count, plan=plan, desc="pseudobulk")
    counter.finish()
    n_bad = counter.n_bad
    if n_bad:
        logger.warning(f"pseudobulk: {n_bad:,} transcripts of {points_key!r} have NaN/infinite coordinates; "
                       "they lie in no tile and were not counted.")
    names = list(genes) if genes is not None else sorted(counter.index)
    if not names:
        _no_gene_left(f"the points {points_key!r} (column {gene_key!r})", sorted(counter.controls), keep_controls)
    counts = counter.result(names)
    if counts.nnz == 0 and counter.n_counted == 0:
        qv = f" passing min_qv={min_qv:g} (column {qv_key!r})" if use_qv else ""
        logger.warning(f"pseudobulk: no transcript of {points_key!r}{qv} lies in a tile: the table of {len(names)} "
                       f"genes x {len(bounds)} tiles is all zeros. Check the quality filter (min_qv=None keeps all) "
                       "and that the points are in the image's coordinates.")
    if genes is not None:
        unseen = [g for g in genes if g not in counter.index] if not counter.fixed else [
            g for g, total in zip(names, np.asarray(counts.sum(axis=0)).ravel(), strict=True) if total == 0]
        if unseen:
            logger.warning(f"pseudobulk: {len(unseen)} of the {len(names)} requested genes have no transcript in any "
                           f"tile of {points_key!r} (not in the panel, misspelt, or only outside the tiles), e.g. "
                           f"{unseen[:10]}; their columns are zero.")
    return counts, names, reader, counter.cov


# -- counting -----------------------------------------------------------------------------------------------------

_CHUNK = 1 << 16  # rows binned at a time (temporaries stay in cache)
_BATCH = 1 << 21  # binned points a thread gathers, sorts and adds to the table at once
_SORT_ABOVE = 16 << 20  # sort a batch when the table is larger than this (bytes): smaller ones stay in cache anyway
_MERGE_CELLS = 1 << 18  # table cells turned into sparse rows at a time (small temporaries, reused, not paged in)
_FAST_GRID = True  # bin with int32 arithmetic on aligned square tiles (tests switch it off to compare)


class _Counter:
    """One pass of counting, shared by the reading threads.

    Holds the gene index, the per-dictionary lookup tables and one tiles x genes table of ``int32`` counts. The
    threads bin their points (vectorised, without the lock), each gathering the table cells of its points in a
    batch of its own; a full batch is added to the table under a lock, sorted first when the table is larger than
    the caches (the table is then walked in order, not hit at random: fewer cache misses); :meth:`finish` adds what
    the batches still hold. Before the table has taken ``2**31 - 1`` increments it is flushed into an ``int64``
    table, so no count can ever wrap.

    Tiles of a square grid (each tile exactly one bucket of its :class:`TileLookup`, as :func:`dbk.pp.make_tiles`
    lays them) are binned by :class:`_Grid` in ``int32``; any other tiles by :meth:`TileLookup.assign`. Both give
    the same tiles (half-open bounds; :class:`_Grid` says the one float64 corner where only it is exact) and the
    same coverage.
    """

    _FLUSH_AT = 2**31 - 1

    def __init__(self, bounds: np.ndarray, affine: np.ndarray, genes, keep_controls: bool, min_qv: float,
                 shape: tuple[int, int] | None = None, dropped: np.ndarray | None = None) -> None:
        self.lookup, self.affine, self.min_qv = TileLookup.build(bounds), affine, np.float64(min_qv)
        self.identity = bool(affine[0, 0] == 1 and affine[1, 1] == 1
                             and not (affine[0, 1] or affine[0, 2] or affine[1, 0] or affine[1, 2]))
        self.shape = shape  # (h, w) of the image, to count the points on it
        # the grid tiles the tissue filter dropped: the points in them (and in no kept tile) are counted (cov)
        self.dropped = None if dropped is None else TileLookup.build(dropped)
        self.grid = _Grid.build(self.lookup, dropped) if _FAST_GRID else None
        self.cov = Coverage()
        self.n_tiles = len(self.lookup.bounds)
        self.fixed = genes is not None
        self.keep_controls = keep_controls
        self.index: dict[str, int] = {g: i for i, g in enumerate(genes)} if genes is not None else {}
        self.allowed: frozenset | None = None  # gene names a categorical cast of the points keeps (others are NaN)
        self.controls: set[str] = set()  # control probes left out (keep_controls=False): named if no gene is left
        self.counts = np.zeros((self.n_tiles, _round_up(max(len(self.index), 1))), dtype=np.int32)
        self.flushed: np.ndarray | None = None  # int64, only once the table has taken > _FLUSH_AT increments
        self.seen = 0
        self.n_counted = 0
        self.n_bad = 0
        self._luts: dict[tuple, np.ndarray] = {}
        self._qv_min: dict[np.dtype, np.generic] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # each thread's batch
        self._batches: list[_Batch] = []  # every thread's batch (a thread's local data goes with the thread)

    def lut(self, names: tuple) -> np.ndarray:
        """Column of each name of a gene dictionary (``int32``), cached per distinct dictionary.

        One entry more than ``names``: ``lut[-1] == -1``, so a missing gene (code ``-1``) is not counted either.
        """
        lut = self._luts.get(names)
        if lut is not None:
            return lut
        with self._lock:
            lut = np.full(len(names) + 1, -1, dtype=np.int32)
            for j, name in enumerate(names):
                if name is None or (self.allowed is not None and name not in self.allowed):
                    continue
                g = self.index.get(name)
                if g is None:
                    if self.fixed:
                        continue
                    if not self.keep_controls and is_control_probe(name):
                        if len(self.controls) < 1000:
                            self.controls.add(str(name))
                        continue
                    g = self.index[name] = len(self.index)
                lut[j] = g
            if len(self.index) > self.counts.shape[1]:
                self._grow(len(self.index))
            self._luts[names] = lut
        return lut

    def _grow(self, n_genes: int) -> None:
        need = self.n_tiles * n_genes * 4
        if need > _KERNEL_BYTES:
            raise MemoryError(
                f"pseudobulk: {self.n_tiles:,} tiles x {n_genes:,} genes needs {need / 2**30:.1f} GiB; pass genes= "
                "(e.g. a panel or the top variable genes) or use fewer tiles."
            )
        # a dictionary brings all its genes at once: grow to what is needed (rounded), not by doubling
        grown = np.zeros((self.n_tiles, _round_up(n_genes)), np.int32)
        if self.n_counted:
            grown[:, : self.counts.shape[1]] = self.counts
        self.counts = grown
        if self.flushed is not None:
            wide = np.zeros(grown.shape, np.int64)
            wide[:, : self.flushed.shape[1]] = self.flushed
            self.flushed = wide

    def count(self, x: np.ndarray, y: np.ndarray, qv: np.ndarray, codes: np.ndarray, names: tuple) -> None:
        """Count one batch of points (gene ``codes`` index ``names``, ``-1``: none); :meth:`finish` when all are in."""
        lut = self.lut(names)
        batch = getattr(self._local, "batch", None)
        if batch is None:
            batch = self._local.batch = _Batch()
            with self._lock:
                self._batches.append(batch)
        for s in range(0, len(x), _CHUNK):
            e = min(s + _CHUNK, len(x))
            self._count_chunk(x[s:e], y[s:e], qv[s:e] if len(qv) else qv, codes[s:e], lut, batch)

    def finish(self) -> None:
        """Add the points the threads' batches still hold to the table (after the last :meth:`count`)."""
        for batch in self._batches:
            self._add(batch)

    def _qv_ok(self, qv: np.ndarray) -> np.ndarray:
        """``qv >= min_qv`` as compared in float64 (NaN fails), in float32 where that is the same."""
        thr = self._qv_min.get(qv.dtype)
        if thr is None:
            thr = self.min_qv  # a float64 scalar: compared in float64 whatever qv's dtype
            if qv.dtype == np.float32 and np.isfinite(thr) and abs(thr) < 1e38:
                # the least float32 >= min_qv: for every float32 q, q >= it exactly when float64(q) >= min_qv
                t32 = np.float32(thr)
                thr = np.nextafter(t32, np.float32(np.inf)) if float(t32) < thr else t32
            self._qv_min[qv.dtype] = thr
        return qv >= thr

    def _count_chunk(self, x, y, qv, codes, lut, batch: _Batch) -> None:
        g = lut.take(codes)
        keep = g >= 0
        if len(qv):
            keep &= self._qv_ok(qv)
        n_bad = 0
        # a sum is finite only if every term is (a float overflow just sends us to the exact count below)
        if (x.dtype.kind == "f" or y.dtype.kind == "f") and not np.isfinite(x.sum() + y.sum()):
            finite = np.isfinite(x) & np.isfinite(y)
            n_bad = len(x) - int(np.count_nonzero(finite))
            keep &= finite
        at = np.flatnonzero(keep)  # then takes: faster than compresses by a (random) mask
        g = g.take(at)
        if self.identity:
            xf, yf = x.take(at), y.take(at)
        else:
            xf, yf = apply_affine(x.take(at), y.take(at), self.affine)
        cov = Coverage()
        extent = cov.add(xf, yf, 0.0, self.shape)
        if self.grid is not None and self.grid.takes(xf, yf):
            t, g, cov.n_in_tiles, cov.n_in_dropped = self.grid.assign(xf, yf, g, extent)
        else:
            p, t = self.lookup.assign(xf, yf)  # half-open bounds; a point in several (overlapping) tiles counts in each
            g = g[p]
            cov.n_in_tiles = n_points_in_tiles(self.lookup, p)
            if self.dropped is not None:
                cov.n_in_dropped = self._n_in_dropped(xf, yf, p)
        with self._lock:
            self.cov.merge(cov)
            self.n_bad += n_bad
        # the table's width now (its lut's genes are in it); _add re-checks it under the lock: a dictionary read by
        # another thread may widen the table before these cells are added
        n_cols = self.counts.shape[1]
        dtype = _flat_dtype(self.n_tiles, n_cols)
        if batch.flat is None or batch.flat.dtype != dtype or batch.n + len(t) > len(batch.flat):
            self._add(batch)
            if batch.flat is None or batch.flat.dtype != dtype or len(t) > len(batch.flat):
                # one buffer per thread, reused; small where the batches are not sorted (they only spare the lock)
                size = _BATCH if self.counts.nbytes > _SORT_ABOVE else _BATCH // 8
                batch.flat = np.empty(max(size, len(t)), dtype=dtype)
        cells = batch.flat[batch.n : batch.n + len(t)]
        np.multiply(t, n_cols, out=cells, dtype=dtype, casting="unsafe")  # t < n_tiles: no cell overflows dtype
        cells += g
        if not batch.widths or batch.widths[-1][1] != n_cols:
            batch.widths.append((batch.n, n_cols))
        batch.n += len(t)

    def _add(self, batch: _Batch) -> None:
        """Sort the cells of the points in ``batch`` and add them to the table; empty the batch."""
        if not batch.n:
            return
        n_cols = self.counts.shape[1]
        flat = batch.flat[: batch.n]
        if any(c != n_cols for _, c in batch.widths):  # cells of a narrower table: a new array of the cells now
            ends = [start for start, _ in batch.widths[1:]] + [batch.n]
            flat = np.concatenate([_rebase(flat[start:end], c, n_cols, self.n_tiles)
                                   for (start, c), end in zip(batch.widths, ends, strict=True)])
        batch.n, batch.widths = 0, []
        if self.counts.nbytes > _SORT_ABOVE:
            flat.sort()  # in table order: neighbouring increments share cache lines and pages
        with self._lock:
            if self.counts.shape[1] != n_cols:  # widened meanwhile (the order stays sorted: a gene < n_cols)
                flat = _rebase(flat, n_cols, self.counts.shape[1], self.n_tiles)
            if self.seen + len(flat) > self._FLUSH_AT:
                self._flush()
            self.seen += len(flat)
            self.n_counted += len(flat)
            np.add.at(self.counts.reshape(-1), flat, np.int32(1))

    def _n_in_dropped(self, xf: np.ndarray, yf: np.ndarray, p: np.ndarray) -> float:
        """How many of the points in no kept tile (``p``: those in one) lie in a tile the tissue filter dropped."""
        out = np.ones(len(xf), dtype=bool)
        out[p] = False
        if not out.any():
            return 0.0
        q, _ = self.dropped.assign(xf[out], yf[out])
        return n_points_in_tiles(self.dropped, q)

    def _flush(self) -> None:
        if self.flushed is None:
            self.flushed = np.zeros(self.counts.shape, dtype=np.int64)
        self.flushed += self.counts
        self.counts[:] = 0
        self.seen = 0

    def result(self, names: list[str]) -> sp.csr_matrix:
        """The tiles x ``names`` int64 counts as CSR, built block by block (no dense int64 copy of the table)."""
        cols = np.asarray([self.index[n] for n in names], dtype=np.intp)
        n_genes = len(cols)
        step = max(1, _MERGE_CELLS // max(n_genes, 1))

        def block(r0: int) -> np.ndarray:
            b = self.counts[r0 : r0 + step].take(cols, axis=1)  # take: several times faster than [:, cols]
            return b if self.flushed is None else b + self.flushed[r0 : r0 + step].take(cols, axis=1)

        if self.flushed is None:  # every column of the table is a gene of names, or zero padding
            per_row = np.count_nonzero(self.counts, axis=1)
        else:
            per_row = np.concatenate([np.count_nonzero(block(r0), axis=1) for r0 in range(0, self.n_tiles, step)])
        nnz = int(per_row.sum())
        idx_dtype = np.int32 if max(nnz, n_genes) < 2**31 else np.int64
        indptr = np.zeros(self.n_tiles + 1, dtype=idx_dtype)
        np.cumsum(per_row, out=indptr[1:])
        data = np.empty(nnz, dtype=np.int64)
        indices = np.empty(nnz, dtype=idx_dtype)
        col_of = np.tile(np.arange(n_genes, dtype=idx_dtype), min(step, self.n_tiles))  # one block's column indices

        def fill(r0: int) -> None:  # rows r0 ... of data and indices: blocks write apart, in threads
            b = block(r0).reshape(-1)
            at = np.flatnonzero(b)  # then two takes: faster than two compresses by a (random) mask
            lo, hi = int(indptr[r0]), int(indptr[min(r0 + step, self.n_tiles)])
            data[lo:hi] = b.take(at)
            col_of.take(at, out=indices[lo:hi])

        _in_threads(fill, range(0, self.n_tiles, step))
        counts = sp.csr_matrix((data, indices, indptr), shape=(self.n_tiles, n_genes))
        if int(data.sum()) != self.n_counted:  # every increment is one transcript in one tile
            raise RuntimeError(f"pseudobulk: internal count mismatch ({int(data.sum())} vs {self.n_counted}).")
        return counts


class _Batch:
    """The table cells (``tile * n_cols + gene``) of one thread's binned points, not yet added to the table.

    ``flat[:n]`` holds them; ``widths`` the ``(start, n_cols)`` from which on they were computed with a table of
    ``n_cols`` columns (a dictionary read meanwhile may have widened the table).
    """

    def __init__(self) -> None:
        self.flat: np.ndarray | None = None
        self.n = 0
        self.widths: list[tuple[int, int]] = []


def _flat_dtype(n_tiles: int, n_cols: int) -> type:
    return np.int32 if n_tiles * n_cols < 2**31 else np.int64


def _rebase(flat: np.ndarray, old: int, new: int, n_tiles: int) -> np.ndarray:
    """Table cells ``tile * old + gene`` as ``tile * new + gene``."""
    if old == new:
        return flat
    t, g = np.divmod(flat, old)
    t = t.astype(_flat_dtype(n_tiles, new), copy=False)
    t *= new
    t += g
    return t


class _Grid:
    """Binning on square tiles of one size laid on a grid, each tile exactly one bucket, with ``int32`` arithmetic.

    A point is first compared with the grid's edges (exactly, in the coordinates' dtype), then its tile is
    ``table[(int(y) - oy) // size, (int(x) - ox) // size]`` (``int`` truncates: the floor, as ``x >= ox >= 0``):
    exactly the tile whose half-open bounds hold it. :meth:`TileLookup.assign` (float64 division) gives the same
    tiles, but for float64 coordinates in ``(-size * 2**-1074, 0)``, whose quotient underflows to ``-0.0`` (it puts
    them in the tile at 0). Also holds the tiles the tissue filter dropped (indices from ``n_kept`` on), so one
    look-up tells kept, dropped and no tile apart.
    """

    def __init__(self, lookup: TileLookup, n_kept: int) -> None:
        nby, nbx, _ = lookup.table.shape
        self.table = lookup.table.reshape(-1)  # int32 tile per bucket, -1: none
        self.n_kept, self.has_dropped = n_kept, len(lookup.bounds) > n_kept
        self.ox, self.oy, self.size, self.nbx = lookup.ox, lookup.oy, lookup.size, nbx
        self.lo = (self.ox, self.oy)
        self.hi = (self.ox + nbx * self.size, self.oy + nby * self.size)  # the grid's far (excluded) edges
        # the grid's edges as scalars of the coordinates' dtype: compared exactly (float32 only where representable)
        self._limits = {np.dtype(np.float64): tuple(np.float64(v) for v in (*self.lo, *self.hi))}
        if all(float(np.float32(v)) == v for v in (*self.lo, *self.hi)):
            self._limits[np.dtype(np.float32)] = tuple(np.float32(v) for v in (*self.lo, *self.hi))

    @classmethod
    def build(cls, kept: TileLookup, dropped: np.ndarray | None) -> _Grid | None:
        """The grid of the ``kept`` tiles and the ``dropped`` ones, or ``None`` when the tiles are not such a grid."""
        n_kept = len(kept.bounds)
        lookup = kept if dropped is None else TileLookup.build(np.concatenate([kept.bounds, np.asarray(dropped)]))
        nby, nbx, _ = lookup.table.shape
        if (not lookup.aligned or lookup.ox < 0 or lookup.oy < 0 or nby * nbx >= 2**31
                or max(lookup.ox + nbx * lookup.size, lookup.oy + nby * lookup.size) >= 2**31):
            return None
        return cls(lookup, n_kept)

    def takes(self, x: np.ndarray, y: np.ndarray) -> bool:
        """Whether coordinates of these dtypes are binned here (float32 / float64)."""
        return x.dtype == y.dtype and x.dtype in self._limits

    def assign(self, x: np.ndarray, y: np.ndarray, g: np.ndarray, extent: tuple[float, float, float, float] | None):
        """``(tile, gene, n_in_kept, n_in_dropped)`` of the points in a kept tile.

        ``extent``: ``(xmin, xmax, ymin, ymax)`` of the points (NaN if one is NaN; ``None``: no point), as
        :meth:`Coverage.add` returns it: when the grid holds it, no point is tested against the grid's edges.
        """
        (ox, oy), (ex, ey) = self.lo, self.hi
        xmin, xmax, ymin, ymax = (0.0, -1.0, 0.0, -1.0) if extent is None else extent
        if not (xmin >= ox and xmax < ex and ymin >= oy and ymax < ey):  # a NaN extent fails too
            x0, y0, x1, y1 = self._limits[x.dtype]
            inside = np.flatnonzero((x >= x0) & (x < x1) & (y >= y0) & (y < y1))  # NaN fails
            x, y, g = x.take(inside), y.take(inside), g.take(inside)
        # x >= ox >= 0 and x < 2**31: the int32 cast truncates, i.e. takes the floor
        bx = x.astype(np.int32)
        if self.ox:
            bx -= self.ox
        bx //= self.size
        cell = y.astype(np.int32)
        if self.oy:
            cell -= self.oy
        cell //= self.size
        cell *= self.nbx
        cell += bx
        t = self.table.take(cell)
        kept = t.view(np.uint32) < self.n_kept  # -1 (no tile) is the largest uint32
        n_kept = int(np.count_nonzero(kept))
        n_dropped = float(np.count_nonzero(t >= 0) - n_kept) if self.has_dropped else 0.0
        if n_kept < len(t):
            at = np.flatnonzero(kept)
            t, g = t.take(at), g.take(at)
        return t, g, float(n_kept), n_dropped


def _round_up(n: int, step: int = 16) -> int:
    return -(-n // step) * step


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
    check_gene_names(table.var_names, f"table annotating {element_key!r}")
    names = _gene_filter(table.var_names, genes, keep_controls)
    if not names:
        _no_gene_left(f"the table annotating {element_key!r}",
                      [str(g) for g in table.var_names if is_control_probe(g)], keep_controls)
    missing = [g for g in names if g not in table.var_names]
    if missing:
        raise KeyError(f"Genes not in the table annotating {element_key!r}: {missing[:10]}.")
    if table.var_names.has_duplicates:
        raise ValueError(f"The table annotating {element_key!r} has duplicate gene names; make them unique first.")
    cols = table.var_names.get_indexer(names)
    instance = table.obs[attrs["instance_key"]].to_numpy() if "instance_key" in attrs else table.obs_names
    return X[:, cols], names, np.asarray(instance)


def _from_cells(sdata, bounds, cells_key, table_key, image_key, genes, keep_controls, shape):
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
    lookup = TileLookup.build(bounds)
    p, t = lookup.assign(cx[pos], cy[pos])
    assign = sp.csr_matrix((np.ones(len(p), dtype=np.int64), (t, p)), shape=(len(bounds), X.shape[0]))
    weights = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()  # each cell's counts of the genes kept
    cov = Coverage()
    ok = np.isfinite(cx[pos]) & np.isfinite(cy[pos])
    cov.add(cx[pos][ok], cy[pos][ok], n_points_in_tiles(lookup, p, weights), shape, weights[ok])
    cov.n_total = float(weights.sum())  # cells without a finite centroid count as off the image
    return (assign @ X.astype(np.int64)).tocsr(), names, cov


def _from_spots(sdata, tiles, table_key, image_key, genes, keep_controls, shape):
    if "spot_id" not in tiles.columns:
        raise ValueError("source='spots' needs tiles made with dbk.pp.make_tiles(mode='spots') (no 'spot_id').")
    spots_key = tiles.attrs.get("dbk", {}).get("spots_key", SPOTS_KEY)
    table = _annotating_table(sdata, spots_key, table_key)
    X, names, instance = _table_counts(table, spots_key, genes, keep_controls)
    row = pd.Index(instance).get_indexer(tiles["spot_id"].to_numpy())
    if (row < 0).any():
        raise ValueError(f"{int((row < 0).sum())} spot tiles have no row in the table annotating {spots_key!r}.")
    weights = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()  # each spot's counts of the genes kept
    cov = Coverage(n_total=float(weights.sum()), n_in_tiles=float(weights[np.unique(row)].sum()))
    if spots_key in sdata.shapes and shape is not None:
        spots = sdata.shapes[spots_key]
        at = spots.index.get_indexer(instance)
        sx, sy = _centroids_in_image(sdata, spots_key, image_key)
        has = at >= 0
        sx, sy, w = sx[at[has]], sy[at[has]], weights[has]
        ok = np.isfinite(sx) & np.isfinite(sy)
        on = Coverage()
        on.add(sx[ok], sy[ok], 0.0, shape, w[ok])
        cov.n_in_image, cov.xmin, cov.xmax, cov.ymin, cov.ymax = on.n_in_image, on.xmin, on.xmax, on.ymin, on.ymax
    else:
        cov.n_in_image = np.nan  # unknown: no spot shapes or no image extent
    return X[row].astype(np.int64).tocsr(), names, cov, spots_key


def _image_extent(sdata: SpatialData, image_key: str | None) -> tuple[int, int] | None:
    """``(h, w)`` of the image's level 0, ``None`` when there is no one image (the fractions on it are unknown)."""
    try:
        _, h, w = image_shape(sdata, image_key)
    except (KeyError, ValueError, TypeError):
        return None
    return h, w


def _pixel_size(sdata: SpatialData, image_key: str | None) -> float | None:
    try:
        return float(get_pixel_size(sdata, image_key))
    except (KeyError, ValueError, TypeError):
        return None


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
