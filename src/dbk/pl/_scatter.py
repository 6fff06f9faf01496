"""Measured vs predicted for one gene."""

from __future__ import annotations

import anndata as ad
import numpy as np
from spatialdata import SpatialData

from .._constants import PRED_KEY, TILES_TABLE_KEY
from ._data import get_table, in_sample, measured, predicted, r_text
from ._utils import finish, new_axes, plot_docs


@plot_docs
def scatter(
    data: SpatialData | ad.AnnData,
    gene: str,
    *,
    table_key: str = TILES_TABLE_KEY,
    pred_key: str = PRED_KEY,
    layer: str | None = None,
    color: str | None = None,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | None = None,
):
    """Measured (x) vs predicted (y) expression of one gene over tiles, with the identity line and Pearson r.

    The title gives the r and, where the predictions carry it, the gene's CV score (:func:`dbk.tl.cv_pearson`). On
    tiles the model was trained on, the r is in-sample and the title says so (``r = 0.76, in-sample``; with a
    :func:`dbk.pp.spatial_blocks` split, the held-out and in-sample tiles' r apart): the CV score is then the
    honest estimate.

    Parameters
    ----------
    data
        The tile AnnData or a SpatialData holding it.
    gene
        The gene.
    table_key
        Tile table in ``sdata.tables``.
    pred_key
        Predictions in ``adata.obsm``.
    layer
        Layer with measured values (``X`` when ``None``).
    color
        An ``obs`` column to colour the points by (e.g. ``"sample"``).
    {plot_params}

    {plot_returns}
    """
    adata = get_table(data, table_key)
    x, y = measured(adata, gene, layer), predicted(adata, gene, pred_key)
    fig, (axis,) = new_axes(ax, 1, size=4.5)
    # smaller, fainter points where many tiles overlap
    style = {"s": 10, "alpha": 0.7} if len(x) <= 2000 else {"s": 4, "alpha": 0.3, "linewidths": 0}
    if color is not None:
        cats = adata.obs[color].astype("category")
        for c in cats.cat.categories:
            sel = (cats == c).to_numpy()
            axis.scatter(x[sel], y[sel], label=str(c), **style)
        axis.legend(frameon=False, fontsize="small")
    else:
        axis.scatter(x, y, **style)
    ok = np.isfinite(x) & np.isfinite(y)
    lo = float(min(x[ok].min(), y[ok].min())) if ok.any() else 0.0
    hi = float(max(x[ok].max(), y[ok].max())) if ok.any() else 1.0
    axis.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="_identity")
    axis.set_aspect("equal", adjustable="datalim")  # the identity line at 45°
    unit = layer or "log1p"
    axis.set_xlabel(f"measured {gene} ({unit})")
    axis.set_ylabel(f"predicted {gene}")
    title = f"{gene}: {r_text(x, y, in_sample(adata, pred_key))} (n = {int(ok.sum())} tiles)"
    from ..tl import cv_pearson

    cv = cv_pearson(adata, pred_key=pred_key)
    if cv is not None:
        score = float(cv.get(gene, np.nan))
        title += f"\nCV r = {score:.2f}" if np.isfinite(score) else "\nno CV score"
    axis.set_title(title)
    return finish(fig, [axis], name="scatter", ax=ax, show=show, return_fig=return_fig, save=save)
