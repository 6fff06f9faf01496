"""Pull measured and predicted values per tile out of a SpatialData or AnnData."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import PRED_KEY, TILES_TABLE_KEY, UNS_KEY


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


def in_sample(adata: ad.AnnData, pred_key: str = PRED_KEY) -> np.ndarray | None:
    """Which tiles' predictions ``obsm[pred_key]`` are in-sample (the tile trained the model that predicted it).

    From the records dbk writes: :func:`dbk.tl.fit_diffbulk` leaves its record in ``uns[pred_key]`` (``params``,
    with the fit's ``fit_id``) on every training table, with the training predictions in ``obsm[pred_key]``;
    :meth:`dbk.tl.DiffBulk.predict` leaves ``uns["dbk"]["predict"]`` (with the model's ``fit_id``), and a later fit
    drops that record. So the predictions are in-sample when the table holds a fit's record and no later predict
    record, or one by the same fit (the model predicting its own training slide); with a fit's ``split_key``
    (:func:`dbk.pp.spatial_blocks`), only on the ``"train"`` tiles. ``None`` when no record says so (a slide the
    model never trained on, predictions of another model or tool): nothing is marked.
    """
    fit = adata.uns.get(pred_key)
    if pred_key not in adata.obsm or not isinstance(fit, dict) or not isinstance(fit.get("params"), dict):
        return None
    fit_id = fit["params"].get("fit_id")
    rec = adata.uns.get(UNS_KEY, {})
    rec = rec.get("predict") if isinstance(rec, dict) else None
    if isinstance(rec, dict) and rec.get("pred_key") == pred_key:  # predicted after the fit: by the same model?
        if fit_id in (None, "None") or str(rec.get("fit_id")) != str(fit_id):
            return None
    split_key = fit.get("split_key")
    if split_key not in (None, "None"):
        if split_key not in adata.obs:
            return None
        return (adata.obs[split_key].astype(str) == "train").to_numpy()
    return np.ones(adata.n_obs, dtype=bool)


def r_text(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None) -> str:
    """The Pearson r of measured ``x`` and predicted ``y``, saying which part is in-sample (``mask``).

    ``"r = 0.76"`` (no record of training); ``"r = 0.76, in-sample"`` (every tile trained the model: its CV score is
    the honest estimate); ``"held-out r = 0.55 on 40 tiles, in-sample r = 0.76"`` when only some did.
    """
    if mask is None or not mask.any():
        return f"r = {pearson(x, y):.2f}"
    if mask.all():
        return f"r = {pearson(x, y):.2f}, in-sample"
    n_out = int((~mask & np.isfinite(x) & np.isfinite(y)).sum())
    r_out, r_in = pearson(x[~mask], y[~mask]), pearson(x[mask], y[mask])
    return f"held-out r = {r_out:.2f} on {n_out} tiles, in-sample r = {r_in:.2f}"
