"""Pseudo-bulk: sum expression per tile, exactly, streaming over the points."""

from __future__ import annotations

import threading
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
from ..io._parquet import plan_parquet_read
from ..io._points import known_categories, stream_points
from ._binning import TileLookup, apply_affine
from ._coverage import Coverage, dropped_grid_tiles, n_points_in_tiles, report_pseudobulk, report_tissue_filter
from ._tile_table import tile_table, write_tile_table
from ._tiles import tile_bounds

_KERNEL_BYTES = 4 << 30  # the largest int32 tiles x genes table


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
    flight; any other points (in memory, computed columns, parquet filters, ...) partition by partition through dask.
    Both give the same table (``uns["dbk"]["pseudobulk"]["reader"]`` says which was used; ``reader="dask"`` forces the
    general path). From cells, each cell
    counts in the tile containing its centroid. From spots, a spot tile (``make_tiles(mode="spots")``) takes its
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
    ``log1p``, then float32), but on the stored values only: no float64 copies of the whole matrix.
    """
    if target_sum is not None and target_sum <= 0:
        raise ValueError(f"target_sum must be positive, got {target_sum!r}.")
    counts = sp.csr_matrix(counts)
    data = counts.data.astype(np.float64)
    if target_sum is not None:
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        data *= np.repeat(scale, np.diff(counts.indptr))
    np.log1p(data, out=data)
    return sp.csr_matrix((data.astype(np.float32), counts.indices.copy(), counts.indptr.copy()), shape=counts.shape)


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
    if data.size and not np.isfinite(data).all():
        raise ValueError(f"NaN or infinite counts in {what}; counts must be finite.")
    if data.size and (data < 0).any():
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

    counter = _Counter(TileLookup.build(bounds), m[:2].copy(), genes, keep_controls,
                       float(min_qv) if use_qv else 0.0, shape, None if dropped is None else TileLookup.build(dropped))
    plan = plan_parquet_read(points, cols) if direct else None  # None: not a plain parquet read, use dask
    if plan is not None:
        counter.allowed = plan.allowed
    known = known_categories(points, gene_key)
    if known is not None:  # every partition of a known categorical brings all its categories: so does every path
        counter.lut(known)
    reader = stream_points(points, cols, counter.count, plan=plan, desc="pseudobulk")
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
_MERGE_CELLS = 4 << 20  # table cells turned into sparse rows at a time


class _Counter:
    """One pass of counting, shared by the reading threads.

    Holds the gene index, the per-dictionary lookup tables and one tiles x genes table of ``int32`` counts. The
    threads bin their points (vectorised, without the lock) and add them to the table under a lock. Before the
    table has taken ``2**31 - 1`` increments it is flushed into an ``int64`` table, so no count can ever wrap.
    """

    _FLUSH_AT = 2**31 - 1

    def __init__(self, lookup: TileLookup, affine: np.ndarray, genes, keep_controls: bool, min_qv: float,
                 shape: tuple[int, int] | None = None, dropped: TileLookup | None = None) -> None:
        self.lookup, self.affine, self.min_qv = lookup, affine, np.float64(min_qv)
        self.shape = shape  # (h, w) of the image, to count the points on it
        self.dropped = dropped  # the grid tiles the tissue filter dropped: the points in them are counted (cov)
        self.cov = Coverage()
        self.n_tiles = len(lookup.bounds)
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
        self._lock = threading.Lock()

    def lut(self, names: tuple) -> np.ndarray:
        """Column of each name of a gene dictionary, cached per distinct dictionary.

        One entry more than ``names``: ``lut[-1] == -1``, so a missing gene (code ``-1``) is not counted either.
        """
        lut = self._luts.get(names)
        if lut is not None:
            return lut
        with self._lock:
            lut = np.full(len(names) + 1, -1, dtype=np.int64)
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
        """Count one batch of points (gene ``codes`` index ``names``, ``-1``: none)."""
        lut = self.lut(names)
        for s in range(0, len(x), _CHUNK):
            e = min(s + _CHUNK, len(x))
            self._count_chunk(x[s:e], y[s:e], qv[s:e] if len(qv) else qv, codes[s:e], lut)

    def _count_chunk(self, x, y, qv, codes, lut) -> None:
        g = lut[codes]
        keep = g >= 0
        if len(qv):
            keep &= qv >= self.min_qv  # a float64 scalar: compared in float64 whatever qv's dtype; NaN fails
        n_bad = 0
        # a sum is finite only if every term is (a float overflow just sends us to the exact count below)
        if (x.dtype.kind == "f" or y.dtype.kind == "f") and not np.isfinite(x.sum() + y.sum()):
            finite = np.isfinite(x) & np.isfinite(y)
            n_bad = len(x) - int(np.count_nonzero(finite))
            keep &= finite
        idx = np.flatnonzero(keep)
        xf, yf = apply_affine(x[idx], y[idx], self.affine)
        p, t = self.lookup.assign(xf, yf)  # half-open bounds; a point in several (overlapping) tiles counts in each
        g = g[idx][p]
        cov = Coverage()
        cov.add(xf, yf, n_points_in_tiles(self.lookup, p), self.shape)
        if self.dropped is not None:
            cov.n_in_dropped = self._n_in_dropped(xf, yf, p)
        with self._lock:
            self.cov.merge(cov)
            self.n_bad += n_bad
            if self.seen + len(t) > self._FLUSH_AT:
                self._flush()
            self.seen += len(t)
            self.n_counted += len(t)
            flat = t * self.counts.shape[1]
            flat += g
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
        cols = np.asarray([self.index[n] for n in names], dtype=np.int64)
        ar = np.arange(len(cols), dtype=np.int32)
        step = max(1, _MERGE_CELLS // max(len(cols), 1))

        def block(r0: int) -> np.ndarray:
            b = self.counts[r0 : r0 + step].take(cols, axis=1)  # take: several times faster than [:, cols]
            return b if self.flushed is None else b + self.flushed[r0 : r0 + step].take(cols, axis=1)

        indptr = np.zeros(self.n_tiles + 1, dtype=np.int64)
        for r0 in range(0, self.n_tiles, step):  # every column of the table is a gene of names (or zero padding)
            rows = self.counts[r0 : r0 + step] if self.flushed is None else block(r0)
            indptr[r0 + 1 : r0 + step + 1] = np.count_nonzero(rows, axis=1)
        np.cumsum(indptr, out=indptr)
        data = np.empty(int(indptr[-1]), dtype=np.int64)
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        for r0 in range(0, self.n_tiles, step):
            b = block(r0)
            nz = b != 0
            lo, hi = indptr[r0], indptr[min(r0 + step, self.n_tiles)]
            data[lo:hi] = np.compress(nz.ravel(), b.ravel())
            indices[lo:hi] = np.broadcast_to(ar, b.shape)[nz]
        counts = sp.csr_matrix((data, indices, indptr), shape=(self.n_tiles, len(cols)))
        if int(counts.sum()) != self.n_counted:  # every increment is one transcript in one tile
            raise RuntimeError(f"pseudobulk: internal count mismatch ({int(counts.sum())} vs {self.n_counted}).")
        return counts


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
