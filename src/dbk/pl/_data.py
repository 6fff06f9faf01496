"""Pull measured and predicted values per tile out of a SpatialData or AnnData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import PRED_KEY, TILES_TABLE_KEY


def get_table(data: SpatialData | ad.AnnData, table_key: str = TILES_TABLE_KEY) -> ad.AnnData:
    """The tile table of a SpatialData (``sdata.tables[table_key]``) or the AnnData itself."""
    if isinstance(data, ad.AnnData):
        return data
    if isinstance(data, SpatialData):
        if table_key not in data.tables:
            raise KeyError(f"No table {table_key!r} in sdata.tables; available: {list(data.tables)}.")
        return data.tables[table_key]
    raise TypeError(f"Expected SpatialData or AnnData, got {type(data).__name__}.")


def measured(adata: ad.AnnData, gene: str, layer: str | None = None) -> np.ndarray:
    """Measured values of one gene over tiles (NaN where the gene was not measured)."""
    if gene not in adata.var_names:
        raise KeyError(f"Gene {gene!r} is not in the table (it has {adata.n_vars} genes).")
    x = adata[:, gene].layers[layer] if layer else adata[:, gene].X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=float).ravel()
    if "measured" in adata.layers:
        m = adata[:, gene].layers["measured"]
        m = np.asarray(m.toarray() if hasattr(m, "toarray") else m).ravel() > 0
        x = np.where(m, x, np.nan)
    return x


def predicted(adata: ad.AnnData, gene: str, pred_key: str = PRED_KEY) -> np.ndarray:
    """Predicted values of one gene over tiles from ``adata.obsm[pred_key]`` (a tiles x genes DataFrame)."""
    if pred_key not in adata.obsm:
        raise KeyError(f"No predictions adata.obsm[{pred_key!r}]; run a model's predict first.")
    pred = adata.obsm[pred_key]
    if isinstance(pred, pd.DataFrame):
        if gene not in pred.columns:
            raise KeyError(f"Gene {gene!r} was not predicted (adata.obsm[{pred_key!r}] has {pred.shape[1]} genes).")
        return pred[gene].to_numpy(dtype=float)
    raise TypeError(f"adata.obsm[{pred_key!r}] must be a DataFrame with gene names as columns.")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the entries finite in both; NaN when either side is constant."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])
