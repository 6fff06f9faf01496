"""Metrics of predicted expression against measured expression, each under one exact name (``docs/method.md``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from .._constants import PRED_KEY, TILES_TABLE_KEY, UNS_KEY
from .._logging import logger
from .._utils import is_sdata
from ..pp._concat import measured_mask

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

PER_GENE_COLUMNS = ("pearson", "spearman", "mse", "mae", "n_tiles", "hvg")


def _as_adata(data, table_key: str) -> ad.AnnData:
    if is_sdata(data):
        if table_key not in data.tables:
            raise KeyError(f"No table {table_key!r} in sdata.tables (available: {list(data.tables)}).")
        return data.tables[table_key]
    if isinstance(data, ad.AnnData):
        return data
    raise TypeError(f"Expected AnnData or SpatialData, got {type(data).__name__}.")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def nan_pearson(a: np.ndarray, b: np.ndarray, axis: int = 0) -> np.ndarray:
    """Pearson correlation along ``axis`` over the positions where both ``a`` and ``b`` are finite.

    NaN where fewer than 2 positions are left or either side is constant there (a correlation is undefined, not 0).

    Parameters
    ----------
    a, b
        Arrays of the same shape (e.g. tiles x genes: measured and predicted); NaN or infinite entries are left out
        pairwise.
    axis
        The axis correlated along (``0``: one r per column, e.g. per gene over tiles).

    Returns
    -------
    numpy.ndarray
        Pearson r per position of the other axes, float64 in [-1, 1], NaN where undefined.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a = np.where(ok, a, np.nan)
    b = np.where(ok, b, np.nan)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        n = ok.sum(axis=axis)
        da = a - np.nanmean(a, axis=axis, keepdims=True)
        db = b - np.nanmean(b, axis=axis, keepdims=True)
        num = np.nansum(da * db, axis=axis)
        den = np.sqrt(np.nansum(da * da, axis=axis) * np.nansum(db * db, axis=axis))
        r = num / den
        const = (np.nanmax(a, axis=axis) == np.nanmin(a, axis=axis)) | (
            np.nanmax(b, axis=axis) == np.nanmin(b, axis=axis))
    r = np.where((n < 2) | const | ~np.isfinite(r), np.nan, r)
    return np.clip(r, -1.0, 1.0)


def nan_spearman(a: np.ndarray, b: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman correlation along ``axis`` over the positions where both are finite.

    Pearson of average ranks, as :func:`scipy.stats.spearmanr`; NaN where undefined (see :func:`nan_pearson`).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    ra = rankdata(np.where(ok, a, np.nan), axis=axis, nan_policy="omit")
    rb = rankdata(np.where(ok, b, np.nan), axis=axis, nan_policy="omit")
    return nan_pearson(ra, rb, axis=axis)


def _predictions(adata: ad.AnnData, pred_key: str) -> pd.DataFrame:
    if pred_key not in adata.obsm:
        raise KeyError(f"No predictions adata.obsm[{pred_key!r}] (obsm keys: {list(adata.obsm)}).")
    pred = adata.obsm[pred_key]
    if not isinstance(pred, pd.DataFrame):
        raise TypeError(f"adata.obsm[{pred_key!r}] must be a DataFrame (tiles x genes) whose columns are gene names, "
                        f"got {type(pred).__name__}.")
    return pred


def _variance(adata: ad.AnnData, genes: list[str], layer: str | None) -> np.ndarray:
    """Variance over tiles of each gene on the tiles where it is measured (NaN if never measured)."""
    sub = adata[:, genes]
    x = _dense(sub.layers[layer] if layer is not None else sub.X)
    x = np.where(measured_mask(sub) & np.isfinite(x), x, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanvar(x, axis=0)


def _top_by(score: np.ndarray, genes: list[str], k: int) -> list[str]:
    """``k`` genes with the highest finite score, ties broken by name."""
    cand = [j for j in range(len(genes)) if np.isfinite(score[j])]
    cand.sort(key=lambda j: (-score[j], genes[j]))
    return [genes[j] for j in cand[:k]]


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def evaluate(
    data: ad.AnnData | SpatialData,
    *,
    pred_key: str = PRED_KEY,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    top_k: int = 50,
    hvg_genes: Sequence[str] | None = None,
    train_adata: ad.AnnData | None = None,
    table_key: str = TILES_TABLE_KEY,
    split_key: str | None = None,
    key_added: str | None = UNS_KEY,
) -> pd.DataFrame:
    """Compare predicted with measured expression: metrics per gene over tiles, and their named summaries.

    Every metric of a gene uses only the tiles where the gene was measured (``layers["measured"]``) and where truth
    and prediction are finite. A gene constant over those tiles in truth or in prediction gets a NaN Pearson /
    Spearman (undefined, not 0): it is counted in ``n_genes_nan_pearson`` and left out of the means.

    Parameters
    ----------
    data
        Tile table (or SpatialData holding it) with the truth in ``X`` (or ``layer``) and the predictions in
        ``obsm[pred_key]``.
    pred_key
        ``obsm`` key of the predictions: a DataFrame (tiles x genes) whose columns are gene names.
    genes
        Genes to evaluate; default all predicted genes that are in the table.
    layer
        Layer with the truth (``X`` when ``None``); log1p-normalised values as the model was trained on.
    top_k
        ``k`` of the top-k summaries (HEST-Benchmark uses the 50 most variable genes).
    hvg_genes
        The highly variable genes, most variable first (the first ``top_k`` are used). Ignored when ``train_adata``
        is given.
    train_adata
        Training tiles: the top-k most variable genes are chosen on them (variance over their measured tiles).
        Without it or ``hvg_genes`` they are chosen on the evaluated data itself, with a warning: that choice sees
        the test truth.
    table_key
        Table to take from SpatialData input.
    split_key
        One slide split into training and test tiles (:func:`dbk.pp.spatial_blocks`): only the tiles whose
        ``obs[split_key]`` is ``"test"`` are evaluated, and unless ``train_adata`` or ``hvg_genes`` is given the top-k
        genes are chosen on its ``"train"`` tiles.
    key_added
        ``uns`` key to write the metrics to (``None``: write nothing).

    Returns
    -------
    Per-gene DataFrame (index: genes) with columns ``pearson``, ``spearman``, ``mse``, ``mae``, ``n_tiles`` (tiles
    measured) and ``hvg`` (in the top-k most variable set); ``.attrs["summary"]`` holds the summary dict:

    - ``pearson_mean_all``, ``spearman_mean_all``, ``mse_mean_all``, ``mae_mean_all``: means over genes;
    - ``pearson_mean_top{k}_hvg``, ``spearman_mean_top{k}_hvg``: means over the k most variable genes;
    - ``pearson_mean_top{k}_best``, ``spearman_mean_top{k}_best``: means over the k best-predicted genes (by the
      metric itself);
    - ``spearman_per_tile_mean``: Spearman across the measured genes within each tile, averaged over tiles (the
      CrunchDAO challenge's metric);
    - ``pearson_flattened``: one Pearson over all measured (tile, gene) pairs, as the DiffBulk code reports (it
      mostly rewards getting each gene's mean level right);
    - ``n_tiles``, ``n_genes``, ``n_genes_nan_pearson``, ``n_genes_nan_spearman``, ``top_k``, ``hvg_source``.

    ``k`` in the names is the number of genes actually used: ``min(top_k, genes available)`` (a warning says when it
    is below ``top_k``). With ``key_added``, ``uns[key_added]["metrics"]`` gets ``{"summary": {...}, "per_gene":
    {"gene": [...], "pearson": [...], ...}, "params": {...}}`` as plain lists and numbers (writable to h5ad / zarr).
    """
    adata = _as_adata(data, table_key)
    target = adata  # where the metrics are written
    if split_key is not None:
        from .._utils import split_mask

        test = split_mask(adata, split_key, "test")
        if train_adata is None and hvg_genes is None:
            train_adata = adata[split_mask(adata, split_key, "train")]
        adata = adata[test]
    pred = _predictions(adata, pred_key)
    if len(pred) != adata.n_obs:
        raise ValueError(f"obsm[{pred_key!r}] has {len(pred)} rows for {adata.n_obs} tiles.")
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k!r}.")
    cols = [str(c) for c in pred.columns]
    if genes is None:
        genes = [g for g in cols if g in adata.var_names]
        if not genes:
            raise ValueError(f"No predicted gene of obsm[{pred_key!r}] is in the table (columns {cols[:5]} ...).")
    else:
        genes = list(genes)
        missing = [g for g in genes if g not in adata.var_names or g not in cols]
        if missing:
            raise KeyError(f"Genes neither measured in the table nor predicted in obsm[{pred_key!r}]: {missing[:10]}.")
    if len(set(genes)) != len(genes):
        raise ValueError("genes has duplicates.")
    sub = adata[:, genes]
    truth = _dense(sub.layers[layer] if layer is not None else sub.X)
    p = pred.copy()
    p.columns = cols
    p = np.asarray(p[genes].to_numpy(), dtype=np.float64)
    valid = measured_mask(sub) & np.isfinite(truth) & np.isfinite(p)
    t = np.where(valid, truth, np.nan)
    q = np.where(valid, p, np.nan)

    n_tiles = valid.sum(axis=0)
    pearson = nan_pearson(t, q, axis=0)
    spearman = nan_spearman(t, q, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mse = np.nanmean((t - q) ** 2, axis=0)
        mae = np.nanmean(np.abs(t - q), axis=0)
    per_tile = nan_spearman(t, q, axis=1)
    flat = nan_pearson(t[valid], q[valid], axis=0)

    # the top-k most variable genes: on the training tiles, a given list, or (warned) the evaluated tiles
    if train_adata is not None:
        known = [g for g in genes if g in train_adata.var_names]
        if len(known) < len(genes):
            logger.warning(f"evaluate: {len(genes) - len(known)} evaluated genes are not in train_adata; they cannot "
                           "be among the most variable genes.")
        hvg = _top_by(_variance(train_adata, known, layer), known, top_k) if known else []
        hvg_source = "train_adata"
    elif hvg_genes is not None:
        hvg = [g for g in hvg_genes if g in genes][:top_k]
        if len(hvg) < min(top_k, len(list(hvg_genes))):
            logger.warning("evaluate: some of hvg_genes are not evaluated genes and were skipped.")
        hvg_source = "hvg_genes"
    else:
        logger.warning(f"evaluate: the top-{top_k} most variable genes are chosen on the evaluated data itself (pass "
                       "train_adata= or hvg_genes= to choose them on the training slides, as a benchmark should).")
        hvg = _top_by(_variance(adata, genes, layer), genes, top_k)
        hvg_source = "evaluated data"
    k = min(top_k, len(genes))
    if k < top_k:
        logger.warning(f"evaluate: only {len(genes)} genes, so the top-{top_k} summaries use {k} genes and are named "
                       f"top{k}.")
    is_hvg = np.isin(genes, hvg)
    best_p = _top_by(pearson, genes, k)
    best_s = _top_by(spearman, genes, k)
    pos = {g: j for j, g in enumerate(genes)}

    summary: dict[str, float | int | str] = {
        "pearson_mean_all": _nanmean(pearson),
        f"pearson_mean_top{k}_hvg": _nanmean(pearson[is_hvg]),
        f"pearson_mean_top{k}_best": _nanmean([pearson[pos[g]] for g in best_p]),
        "spearman_mean_all": _nanmean(spearman),
        f"spearman_mean_top{k}_hvg": _nanmean(spearman[is_hvg]),
        f"spearman_mean_top{k}_best": _nanmean([spearman[pos[g]] for g in best_s]),
        "mse_mean_all": _nanmean(mse),
        "mae_mean_all": _nanmean(mae),
        "spearman_per_tile_mean": _nanmean(per_tile),
        "pearson_flattened": float(flat),
        "n_tiles": int(adata.n_obs),
        "n_genes": len(genes),
        "n_genes_nan_pearson": int(np.isnan(pearson).sum()),
        "n_genes_nan_spearman": int(np.isnan(spearman).sum()),
        "top_k": int(k),
        "hvg_source": hvg_source,
    }
    constant_prediction = bool(np.all(np.nanmax(q, axis=0) == np.nanmin(q, axis=0))) if q.size else False
    if summary["n_genes_nan_pearson"] and not constant_prediction:  # a constant predictor has none: nothing to say
        logger.info(f"evaluate: {summary['n_genes_nan_pearson']} genes have an undefined Pearson (constant truth or "
                    "prediction, or < 2 measured tiles); they are left out of the means.")
    df = pd.DataFrame(
        {"pearson": pearson, "spearman": spearman, "mse": mse, "mae": mae, "n_tiles": n_tiles.astype(np.int64),
         "hvg": is_hvg},
        index=pd.Index(genes, name="gene"),
    )
    df.attrs["summary"] = summary
    if key_added is not None:
        store = target.uns.setdefault(key_added, {})
        store["metrics"] = {
            "summary": {kk: (v if isinstance(v, str) else float(v) if isinstance(v, float) else int(v))
                        for kk, v in summary.items()},
            "per_gene": {"gene": list(genes), **{c: df[c].tolist() for c in PER_GENE_COLUMNS}},
            "params": {"pred_key": pred_key, "layer": "X" if layer is None else layer, "top_k": int(top_k),
                       "hvg_genes": list(hvg)},
        }
    return df
