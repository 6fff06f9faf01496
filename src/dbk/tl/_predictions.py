"""Predictions as an AnnData of their own, ready for scanpy and squidpy."""

from __future__ import annotations

import copy as _copy
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import MEASURED_LAYER, PRED_KEY, SPATIAL_KEY, TILES_TABLE_KEY, UNS_KEY


def predictions_to_adata(
    data: SpatialData | ad.AnnData,
    *,
    pred_key: str = PRED_KEY,
    table_key: str = TILES_TABLE_KEY,
    genes: Sequence[str] | None = None,
    measured_layer: str | None = None,
) -> ad.AnnData:
    """Turn the predictions of a tile table into an AnnData tiles x predicted genes, ready for scanpy and squidpy.

    scanpy and squidpy read genes from ``X`` or a layer, not from a DataFrame in ``obsm``. The result holds the
    predictions as ``X`` (dense float32) with everything those tools need about the tiles: their ``obs``, their
    centres in ``obsm["spatial"]`` (for ``sq.gr.spatial_neighbors_grid`` and friends) and scanpy's image container
    ``uns["spatial"]`` where the table has one. It works the same for an H&E-only slide (whose table has no genes)
    and for a sequenced one.

    Parameters
    ----------
    data
        The tile table, or a SpatialData holding it.
    pred_key
        Predictions in ``adata.obsm`` (a DataFrame tiles x genes, as written by a model's ``predict``).
    table_key
        Tile table in ``sdata.tables``.
    genes
        Predicted genes to keep, in this order (all predicted genes when ``None``).
    measured_layer
        Also store the *measured* values of the same genes (the table's ``X``) in ``layers[measured_layer]``, so
        one call runs on predictions (``X``) or measurements (``layer=measured_layer``) over the same tiles and
        graph. Every kept gene must then be in the table; tiles where a gene was not measured (the table's
        ``measured`` layer) hold NaN.

    Returns
    -------
    A new AnnData (the input is not modified): ``X`` the predictions, ``var_names`` the genes, ``obs`` a copy of the
    table's ``obs`` (same ``obs_names``), ``obsm`` a copy of every table ``obsm`` entry but the predictions
    (``"spatial"`` included), ``uns["spatial"]`` when the table has it, ``uns["dbk"]["predictions"]``
    (``pred_key`` and the table it came from) and, with ``measured_layer``, ``layers[measured_layer]``.
    """
    if isinstance(data, SpatialData):
        if table_key not in data.tables:
            raise KeyError(f"No table {table_key!r} in sdata.tables; available: {list(data.tables)}.")
        adata = data.tables[table_key]
    elif isinstance(data, ad.AnnData):
        adata = data
    else:
        raise TypeError(f"Expected SpatialData or AnnData, got {type(data).__name__}.")
    if pred_key not in adata.obsm:
        raise KeyError(f"No predictions adata.obsm[{pred_key!r}]; run a model's predict first.")
    pred = adata.obsm[pred_key]
    if not isinstance(pred, pd.DataFrame):
        raise TypeError(f"adata.obsm[{pred_key!r}] must be a DataFrame with gene names as columns, got "
                        f"{type(pred).__name__}.")
    pred = pred.loc[adata.obs_names] if not pred.index.equals(adata.obs_names) else pred
    if genes is not None:
        genes = list(genes)
        missing = [g for g in genes if g not in pred.columns]
        if missing:
            raise KeyError(f"Genes not predicted (not in adata.obsm[{pred_key!r}]): {missing[:10]}.")
        pred = pred[genes]
    out = ad.AnnData(
        X=pred.to_numpy(dtype=np.float32, copy=True),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=pd.Index(pred.columns.astype(str), name=None)),
    )
    for key, value in adata.obsm.items():
        if key != pred_key:
            out.obsm[key] = value.copy() if hasattr(value, "copy") else np.array(value)
    if SPATIAL_KEY in adata.uns:
        out.uns[SPATIAL_KEY] = _copy.deepcopy(adata.uns[SPATIAL_KEY])
    out.uns[UNS_KEY] = {"predictions": {"pred_key": pred_key, "table_key": table_key}}
    if measured_layer is not None:
        out.layers[measured_layer] = _measured(adata, list(out.var_names))
    return out


def _measured(adata: ad.AnnData, genes: list[str]) -> np.ndarray:
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"measured_layer: {len(missing)} predicted genes are not in the table ({missing[:5]}); pass "
                       "genes= with measured genes only, or measured_layer=None.")
    sub = adata[:, genes]
    x = sub.X.toarray() if hasattr(sub.X, "toarray") else np.asarray(sub.X)
    x = np.asarray(x, dtype=np.float32).copy()
    if MEASURED_LAYER in adata.layers:
        m = sub.layers[MEASURED_LAYER]
        m = (m.toarray() if hasattr(m, "toarray") else np.asarray(m)) > 0
        x[~m] = np.nan
    return x
