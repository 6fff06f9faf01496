"""Several slides with different gene panels in one AnnData, and gene selection on training slides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import COUNTS_LAYER, MEASURED_LAYER, PATIENT_COL, SAMPLE_COL, SPATIAL_KEY, TILES_TABLE_KEY
from .._logging import logger
from .._utils import is_sdata, renamed_kwargs

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData


def _as_table(obj, table_key: str) -> ad.AnnData:
    if is_sdata(obj):
        if table_key not in obj.tables:
            raise KeyError(f"No table {table_key!r} in sdata.tables (available: {list(obj.tables)}); run "
                           "dbk.pp.pseudobulk first.")
        return obj.tables[table_key]
    if isinstance(obj, ad.AnnData):
        return obj
    raise TypeError(f"Expected AnnData or SpatialData, got {type(obj).__name__}.")


@renamed_kwargs(tables="data")
def concat(
    data: Sequence[ad.AnnData | SpatialData] | dict[str, ad.AnnData | SpatialData],
    *,
    genes: Literal["union", "intersection"] | list[str] = "union",
    table_key: str = TILES_TABLE_KEY,
) -> ad.AnnData:
    """Concatenate tile tables of several slides whose gene panels may differ.

    A gene absent from a slide's panel is *not measured* there, not zero: ``layers["measured"]`` is 1 where the
    tile's slide measured the gene and 0 where it did not (counts and ``X`` hold 0 there, to be ignored through the
    mask). Genes measured on a slide keep their counts, zeros included.

    Parameters
    ----------
    data
        Tile tables (AnnData) or SpatialData objects holding them; a dict names the samples by its keys.
    genes
        ``"union"`` of all panels, ``"intersection"`` (genes measured on every slide), or an explicit list.
    table_key
        Table to take from SpatialData inputs.

    Returns
    -------
    AnnData with ``X``, ``layers["counts"]`` (when every input has it) and ``layers["measured"]`` (CSR uint8),
    ``obs`` of the inputs with ``sample`` set (from the dict keys, the inputs' ``obs["sample"]`` or ``slide{i}``),
    ``obs["patient"]`` from SpatialData inputs' ``attrs["patient"]`` when any has one (NaN where unknown; an input's
    own ``obs["patient"]`` is kept), ``obs_names`` made unique as ``{sample}:{tile}``, and ``obsm``: ``"spatial"``
    (NaN rows for an input without it) and every other ``obsm`` entry present in all inputs, stacked in the order of
    the rows. Arrays (dense or sparse, e.g. embeddings ``X_<model>``) need the same number of columns in every
    input, else the entry is left out with a warning. DataFrames (e.g. predictions ``obsm["dbk_pred"]``, tiles x
    genes) are stacked on the union of their columns, in order of first appearance, with NaN where an input lacks a
    column (a gene that model did not predict), and re-indexed to the new ``obs_names``. The inputs are not
    modified.
    """
    if isinstance(data, dict):
        names, objs = list(data.keys()), list(data.values())
    else:
        objs, names = list(data), None
    if not objs:
        raise ValueError("concat needs at least one table.")
    adatas = [_as_table(o, table_key) for o in objs]
    # the patient of a SpatialData input (sdata.attrs["patient"], as read_hest and her2st set it) becomes obs["patient"]
    patients = [None if isinstance(o, ad.AnnData) else o.attrs.get("patient") for o in objs]
    if names is None:
        names = []
        for i, a in enumerate(adatas):
            s = a.obs[SAMPLE_COL].astype(str).unique() if SAMPLE_COL in a.obs else []
            names.append(str(s[0]) if len(s) == 1 else f"slide{i}")
    if len(set(names)) != len(names):
        raise ValueError(f"Sample names must be unique, got {names}; pass a dict {{name: table}}.")
    for n, a in zip(names, adatas, strict=True):
        if a.var_names.has_duplicates:
            dup = a.var_names[a.var_names.duplicated()].unique().tolist()[:5]
            raise ValueError(f"Table of sample {n!r} has duplicate gene names {dup}.")
    if isinstance(genes, str):
        if genes == "union":
            out_genes: list[str] = []
            seen: set[str] = set()
            for a in adatas:
                for g in a.var_names:
                    if g not in seen:
                        seen.add(g)
                        out_genes.append(g)
        elif genes == "intersection":
            common = set(adatas[0].var_names).intersection(*[set(a.var_names) for a in adatas[1:]])
            out_genes = [g for g in adatas[0].var_names if g in common]
        else:
            raise ValueError(f"genes must be 'union', 'intersection' or a list, got {genes!r}.")
    else:
        out_genes = list(genes)
    index = pd.Index(out_genes)
    has_counts = all(COUNTS_LAYER in a.layers for a in adatas)
    Xs, Cs, Ms, obs, spatial = [], [], [], [], []
    for n, a, patient in zip(names, adatas, patients, strict=True):
        pos = index.get_indexer(a.var_names)  # column of each input gene in the output (-1: dropped)
        src = np.nonzero(pos >= 0)[0]
        sel = sp.csr_matrix((np.ones(len(src)), (src, pos[src])), shape=(a.n_vars, len(index)))
        Xs.append(sp.csr_matrix(a.X) @ sel)
        if has_counts:
            Cs.append((sp.csr_matrix(a.layers[COUNTS_LAYER]) @ sel.astype(np.int64)).astype(np.int64))
        measured = np.zeros(len(index), dtype=np.uint8)
        measured[pos[src]] = 1
        Ms.append(sp.csr_matrix(np.broadcast_to(measured, (a.n_obs, len(index)))))
        o = a.obs.copy()
        o[SAMPLE_COL] = n
        if patient is not None and PATIENT_COL not in o:
            o[PATIENT_COL] = str(patient)
        o.index = [f"{n}:{i}" for i in a.obs_names]
        obs.append(o)
        spatial.append(a.obsm[SPATIAL_KEY] if SPATIAL_KEY in a.obsm else np.full((a.n_obs, 2), np.nan))
    obs_df = pd.concat(obs)
    obs_df[SAMPLE_COL] = pd.Categorical(obs_df[SAMPLE_COL], categories=names)
    for col in obs_df.columns:
        if col == PATIENT_COL and any(p is not None for p in patients):
            obs_df[col] = pd.Categorical(obs_df[col])  # an input without a patient stays NaN (unknown), not "nan"
        elif obs_df[col].dtype == object:
            obs_df[col] = obs_df[col].astype(str)
    out = ad.AnnData(X=sp.vstack(Xs).tocsr().astype(np.float32), obs=obs_df, var=pd.DataFrame(index=index))
    if has_counts:
        out.layers[COUNTS_LAYER] = sp.vstack(Cs).tocsr()
    out.layers[MEASURED_LAYER] = sp.vstack(Ms).tocsr().astype(np.uint8)
    out.obsm[SPATIAL_KEY] = np.vstack(spatial)
    for key, value in _stack_obsm(adatas, out.obs_names).items():
        out.obsm[key] = value
    out.uns["dbk"] = {"concat": {"samples": names, "genes": genes if isinstance(genes, str) else "list"}}
    return out


def _stack_obsm(adatas: list[ad.AnnData], obs_names: pd.Index) -> dict:
    """The ``obsm`` entries (but ``spatial``) present in every table, stacked over the tables."""
    keys = [k for k in adatas[0].obsm if k != SPATIAL_KEY and all(k in a.obsm for a in adatas[1:])]
    out = {}
    for key in keys:
        parts = [a.obsm[key] for a in adatas]
        if all(isinstance(p, pd.DataFrame) for p in parts):
            columns = list(dict.fromkeys(c for p in parts for c in p.columns))
            frame = pd.concat([p.reindex(columns=columns) for p in parts], axis=0)
            frame.index = obs_names
            out[key] = frame
            continue
        if any(isinstance(p, pd.DataFrame) for p in parts):
            logger.warning(f"concat: obsm[{key!r}] is a DataFrame in some tables and an array in others; left out.")
            continue
        widths = {p.shape[1:] for p in parts}
        if len(widths) != 1:
            logger.warning(f"concat: obsm[{key!r}] has different shapes across tables {sorted(widths)}; left out.")
            continue
        if any(sp.issparse(p) for p in parts):
            out[key] = sp.vstack([sp.csr_matrix(p) for p in parts]).tocsr()
        else:
            out[key] = np.concatenate([np.asarray(p) for p in parts], axis=0)
    return out


def measured_mask(adata: ad.AnnData) -> np.ndarray:
    """Dense boolean tiles x genes mask of measured genes (all True when there is no ``measured`` layer).

    Parameters
    ----------
    adata
        A tile table; its ``layers["measured"]`` (written by :func:`concat` for slides with other panels), dense or
        sparse, says which genes each tile's slide measured.

    Returns
    -------
    numpy.ndarray
        Boolean, ``adata.shape``: ``True`` where the gene was measured (the layer's value > 0).
    """
    if MEASURED_LAYER not in adata.layers:
        return np.ones(adata.shape, dtype=bool)
    m = adata.layers[MEASURED_LAYER]
    return (m.toarray() if sp.issparse(m) else np.asarray(m)) > 0


@renamed_kwargs(adatas="data", n_top="n_top_genes")
def select_genes(
    data: ad.AnnData | SpatialData | Sequence[ad.AnnData | SpatialData],
    *,
    n_top_genes: int = 50,
    flavor: Literal["variance", "mean"] = "variance",
    layer: str | None = None,
    table_key: str = TILES_TABLE_KEY,
) -> list[str]:
    """Pick the ``n_top_genes`` genes with the highest variance (or mean) over tiles of the *training* slides.

    Only genes measured on every given slide are candidates; values are taken from ``X`` (log1p-normalised) or
    ``layers[layer]``, pooled over all tiles. Pass training slides only, so the test slides never shape the choice.

    Parameters
    ----------
    data
        One or several tile tables (or SpatialData holding them).
    n_top_genes
        Number of genes.
    flavor
        ``"variance"`` or ``"mean"`` of the values over tiles.
    layer
        Layer to use instead of ``X``.
    table_key
        Table to take from SpatialData inputs.

    Returns
    -------
    Gene names, best first (ties broken by name).
    """
    if isinstance(data, ad.AnnData) or is_sdata(data):
        data = [data]
    tables = [_as_table(a, table_key) for a in data]
    if n_top_genes <= 0:
        raise ValueError(f"n_top_genes must be positive, got {n_top_genes!r}.")
    if flavor not in ("variance", "mean"):
        raise ValueError(f"flavor must be 'variance' or 'mean', got {flavor!r}.")
    common = [g for g in tables[0].var_names if all(g in t.var_names for t in tables[1:])]
    if not common:
        raise ValueError("The tables share no gene.")
    mats = []
    for t in tables:
        sub = t[:, common]
        x = sub.layers[layer] if layer is not None else sub.X
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        if MEASURED_LAYER in t.layers:
            m = measured_mask(sub)
            x = np.where(m, x, np.nan)
        mats.append(np.asarray(x, dtype=np.float64))
    x = np.vstack(mats)
    score = np.nanvar(x, axis=0) if flavor == "variance" else np.nanmean(x, axis=0)
    score = np.nan_to_num(score, nan=-np.inf)
    order = sorted(range(len(common)), key=lambda j: (-score[j], common[j]))
    return [common[j] for j in order[:n_top_genes]]
