"""Predictions as an AnnData of their own, ready for scanpy and squidpy."""

from __future__ import annotations

import copy as _copy
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import (
    CV_PEARSON_KEY,
    CV_TRUSTED_KEY,
    MEASURED_LAYER,
    PRED_KEY,
    SPATIAL_KEY,
    TILES_KEY,
    TILES_TABLE_KEY,
    UNS_KEY,
)
from .._logging import logger


def predictions_to_adata(
    data: SpatialData | ad.AnnData,
    *,
    pred_key: str = PRED_KEY,
    table_key: str = TILES_TABLE_KEY,
    genes: Sequence[str] | None = None,
    measured_layer: str | None = None,
    tiles_key: str = TILES_KEY,
    library_id: str | None = None,
    hires_max_side: int = 2000,
    min_cv_pearson: float | str | None = None,
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
    tiles_key
        The tiles the table annotates (their side sets squidpy's spot size).
    library_id
        Key of the slide in ``uns["spatial"]`` (default: the slide's ``attrs["sample"]``, else ``"slide"``).
    hires_max_side
        Longest side in pixels of the H&E picture put into ``uns["spatial"]`` (read from the finest pyramid level
        that small; the whole slide is never loaded).
    min_cv_pearson
        Keep only the genes whose CV score (:func:`dbk.tl.cv_pearson`: the Pearson r of the fit's inner
        cross-validation on its training slides) is at least this; genes without a score are dropped too. ``"auto"``:
        keep the genes the model calls trusted (:func:`dbk.tl.cv_trusted`: the score's lower bound, mean minus one
        standard error over held-out groups, above chance, and positive in every group). The number kept and dropped
        is logged. ``None`` (default): keep all.
    measured_layer
        Also store the *measured* values of the same genes (the table's ``X``) in ``layers[measured_layer]``, so
        one call runs on predictions (``X``) or measurements (``layer=measured_layer``) over the same tiles and
        graph. Every kept gene must then be in the table; tiles where a gene was not measured (the table's
        ``measured`` layer) hold NaN.

    Returns
    -------
    A new AnnData (the input is not modified): ``X`` the predictions, ``var_names`` the genes, ``obs`` a copy of the
    table's ``obs`` (same ``obs_names``), ``obsm`` a copy of every table ``obsm`` entry but the predictions
    (``"spatial"`` included), ``uns["spatial"]``, ``uns["dbk"]["predictions"]`` (``pred_key``, the table it came
    from and ``effective_rank``: how many independent patterns the kept predictions carry, beside the training
    targets', :func:`dbk.tl.effective_rank`; a warning says when they are far fewer), ``var["dbk_cv_pearson"]`` and
    ``var["dbk_cv_trusted"]`` where the predictions carry them and, with ``measured_layer``,
    ``layers[measured_layer]``.

    From a SpatialData, ``uns["spatial"][library_id]`` holds the H&E (``images["hires"]``, uint8) with its
    ``scalefactors`` (``tissue_hires_scalef``, ``spot_diameter_fullres`` = the tile side), scanpy's and squidpy's
    convention, so ``sq.pl.spatial_scatter(out, color=gene)`` draws the predictions over the H&E; and the table's
    link to the tiles (``uns["spatialdata_attrs"]``, ``obs`` region / instance columns) is kept, so
    ``sdata.tables["pred"] = out`` annotates ``sdata.shapes[tiles_key]`` and spatialdata-plot colours the tiles
    by a predicted gene (``sdata.pl.render_shapes(tiles_key, color=gene, table_name="pred")``). From an AnnData,
    ``uns["spatial"]`` is copied when the table has one.

    Examples
    --------
    >>> out = dbk.tl.predictions_to_adata(sdata)  # doctest: +SKIP
    >>> sq.pl.spatial_scatter(out, color="ERBB2")  # doctest: +SKIP
    >>> sdata.tables["pred"] = out  # doctest: +SKIP
    >>> sdata.pl.render_images("he").pl.render_shapes("dbk_tiles", color="ERBB2", table_name="pred").pl.show(
    ...     coordinate_systems="global")  # doctest: +SKIP
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
    cv = cv_pearson(adata, pred_key=pred_key)
    trusted = cv_trusted(adata, pred_key=pred_key)
    if min_cv_pearson is not None:
        if cv is None:
            raise ValueError(f"min_cv_pearson needs the genes' CV scores, and adata.obsm[{pred_key!r}] has none (the "
                             "model was fitted with head_cv=0, or the predictions do not come from DiffBulk.predict "
                             "/ fit_diffbulk).")
        score = cv.reindex(pred.columns.astype(str)).to_numpy()
        if isinstance(min_cv_pearson, str):
            if min_cv_pearson != "auto":
                raise ValueError(f"min_cv_pearson must be a number, 'auto' or None, got {min_cv_pearson!r}.")
            if trusted is None:
                raise ValueError(f"min_cv_pearson='auto' needs the trust flags of a model fitted by this dbk, and "
                                 f"adata.obsm[{pred_key!r}] has none; pass a number instead.")
            keep = trusted.reindex(pred.columns.astype(str), fill_value=False).to_numpy(bool)
            what = "are trusted (CV score's lower bound above chance, positive in every held-out group)"
        else:
            keep = np.isfinite(score) & (score >= float(min_cv_pearson))
            what = f"have a CV score >= {min_cv_pearson:g}"
        logger.info(f"predictions_to_adata: {int(keep.sum())} of {len(keep)} genes {what} and are kept "
                    f"({int((~keep).sum())} dropped).")
        if not keep.any():
            raise ValueError(f"No gene {what.replace('are ', 'is ').replace('have ', 'has ')} (best CV score: "
                             f"{np.nanmax(score) if np.isfinite(score).any() else float('nan'):.3f}).")
        pred = pred.loc[:, keep]
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
    if "spatialdata_attrs" in adata.uns:  # the link to the tiles, for spatialdata(-plot)
        out.uns["spatialdata_attrs"] = _copy.deepcopy(adata.uns["spatialdata_attrs"])
    if isinstance(data, SpatialData) and tiles_key in data.shapes:
        lib = library_id or str(data.attrs.get("sample", "slide"))
        out.uns[SPATIAL_KEY] = {lib: _scanpy_image(data, tiles_key, hires_max_side)}
    out.uns[UNS_KEY] = {"predictions": {"pred_key": pred_key, "table_key": table_key}}
    if out.n_obs >= 2 and out.n_vars:
        from ._effective_rank import rank_record

        rec = adata.uns.get(UNS_KEY, {}).get("predict")
        fit = adata.uns.get(pred_key)
        rank = (rec or {}).get("effective_rank") if isinstance(rec, dict) else None
        rank = rank or ((fit or {}).get("effective_rank") if isinstance(fit, dict) else None)
        target = rank.get("targets") if isinstance(rank, dict) else None
        target = None if target is None or not np.isfinite(float(target)) else int(target)
        out.uns[UNS_KEY]["predictions"]["effective_rank"] = rank_record(out.X, target, what="predictions_to_adata")
    if cv is not None:
        out.var[CV_PEARSON_KEY] = cv.reindex(out.var_names).to_numpy(np.float64)
        if trusted is not None:
            out.var[CV_TRUSTED_KEY] = trusted.reindex(out.var_names, fill_value=False).to_numpy(bool)
        if min_cv_pearson is not None:
            out.uns[UNS_KEY]["predictions"]["min_cv_pearson"] = (min_cv_pearson if isinstance(min_cv_pearson, str)
                                                                 else float(min_cv_pearson))
    if measured_layer is not None:
        out.layers[measured_layer] = _measured(adata, list(out.var_names))
    return out


def cv_pearson(data: SpatialData | ad.AnnData, *, pred_key: str = PRED_KEY,
               table_key: str = TILES_TABLE_KEY) -> pd.Series | None:
    """The CV score of each predicted gene of ``obsm[pred_key]``, or ``None`` when the predictions carry none.

    The score is the Pearson r of the model's inner cross-validation on its training slides
    (:attr:`DiffBulk.cv_pearson`); :meth:`DiffBulk.predict` writes it beside the predictions
    (``uns["dbk"]["predict"]``) and :func:`fit_diffbulk` beside the training predictions
    (``uns[key_added]["head_selection"]``). A predicted table from :func:`predictions_to_adata` has it in
    ``var["dbk_cv_pearson"]``.

    Parameters
    ----------
    data
        The tile table (or a predicted table), or a SpatialData holding it.
    pred_key
        The predictions' key.
    table_key
        Tile table in ``sdata.tables``.

    Returns
    -------
    A Series gene -> score (NaN where undefined), or ``None``.
    """
    return _gene_record(data, pred_key, table_key, "cv_pearson", CV_PEARSON_KEY, np.float64)


def cv_trusted(data: SpatialData | ad.AnnData, *, pred_key: str = PRED_KEY,
               table_key: str = TILES_TABLE_KEY) -> pd.Series | None:
    """Which predicted genes of ``obsm[pred_key]`` the model trusts (:attr:`DiffBulk.cv_trusted`), or ``None``.

    Read from where :func:`cv_pearson` reads the scores (``var["dbk_cv_trusted"]`` of a predicted table). ``None``
    for predictions of models fitted without the trust rule (``head_cv=0``, or saved by an older dbk).

    Parameters
    ----------
    data
        The tile table (or a predicted table), or a SpatialData holding it.
    pred_key
        The predictions' key.
    table_key
        Tile table in ``sdata.tables``.

    Returns
    -------
    pandas.Series | None
        Gene -> bool (the score's lower bound above chance and positive in every held-out group), or ``None``.
    """
    return _gene_record(data, pred_key, table_key, "cv_trusted", CV_TRUSTED_KEY, bool)


def _gene_record(data, pred_key: str, table_key: str, name: str, var_key: str, dtype) -> pd.Series | None:
    """A per-gene value of the fit's trust record (``name``), or ``None``.

    From ``var[var_key]`` of a predicted table, else ``uns["dbk"]["predict"]`` (when it is of ``pred_key``), else the
    fit's ``uns[pred_key]["head_selection"]``.
    """
    adata = data.tables[table_key] if isinstance(data, SpatialData) else data
    if pred_key not in adata.obsm and var_key in adata.var:  # a table from predictions_to_adata
        return adata.var[var_key].astype(dtype).rename(name)
    rec = adata.uns.get(UNS_KEY, {}).get("predict")
    if not (isinstance(rec, dict) and rec.get("pred_key") == pred_key and "cv_pearson" in rec):
        fit = adata.uns.get(pred_key)
        rec = fit.get("head_selection") if isinstance(fit, dict) else None
    if not isinstance(rec, dict) or name not in rec or "genes" not in rec:
        return None
    return pd.Series(np.asarray(rec[name], dtype=dtype), index=pd.Index([str(g) for g in rec["genes"]]), name=name)


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


def _scanpy_image(sdata: SpatialData, tiles_key: str, max_side: int) -> dict:
    """Scanpy's image entry of a slide: its H&E at most ``max_side`` px wide, and the scale factors to level 0."""
    from .._image import thumbnail
    from ..pp._tiles import tile_bounds

    image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key")
    img, downsample = thumbnail(sdata, image_key, max_side=max_side)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    b = tile_bounds(sdata, tiles_key)
    side = float(np.median(b[:, 2] - b[:, 0])) if len(b) else 1.0
    return {"images": {"hires": np.ascontiguousarray(img)},
            "scalefactors": {"tissue_hires_scalef": 1.0 / downsample, "spot_diameter_fullres": side},
            "metadata": {"source": "dbk.tl.predictions_to_adata"}}
