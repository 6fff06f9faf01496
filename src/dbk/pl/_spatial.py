"""Measured and predicted expression over the H&E, side by side, on one colour scale."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
from spatialdata import SpatialData

from .._constants import PRED_KEY, TILES_KEY, TILES_TABLE_KEY
from .._image import thumbnail
from ._data import get_table, in_sample, measured, predicted, r_text
from ._utils import finish, new_axes, plot_docs, zoom_to_tiles


@plot_docs
def spatial(
    data: SpatialData | ad.AnnData,
    genes: str | Sequence[str],
    *,
    kinds: Sequence[str] | None = None,
    image: bool = True,
    table_key: str = TILES_TABLE_KEY,
    tiles_key: str = TILES_KEY,
    pred_key: str = PRED_KEY,
    layer: str | None = None,
    image_key: str | None = None,
    cmap: str = "viridis",
    vmax_quantile: float = 0.99,
    alpha: float = 0.8,
    min_cv_pearson: float | str | None = "auto",
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | None = None,
):
    """Per gene, measured and predicted expression maps side by side, with one shared colour scale.

    Each row is a gene and each column a kind; the predicted panel's title carries the gene's Pearson r between
    measured and predicted over the tiles and, where the predictions carry them, the gene's CV score
    (:func:`dbk.tl.cv_pearson`). On a slide the model was trained on, that r is in-sample and the title says so
    (``r = 0.76, in-sample``; with a :func:`dbk.pp.spatial_blocks` split, the held-out and in-sample tiles' r
    apart): there the CV score is the honest estimate. dbk knows a training slide by the record
    :func:`dbk.tl.fit_diffbulk` leaves in ``uns[pred_key]`` (with its ``fit_id``, which
    :meth:`dbk.tl.DiffBulk.predict` copies into ``uns["dbk"]["predict"]``); predictions without such a record
    (another tool's, or a model saved before dbk recorded it) are not marked.

    A gene the model does not trust (:func:`dbk.tl.cv_trusted`; or, with a number ``min_cv_pearson``, whose CV
    score is below it or undefined) is marked *untrusted* in red: the model did not
    predict it well on held-out training slides (or patients), so its map is not to be believed. When the
    predictions carry far fewer independent patterns than the training targets (:func:`dbk.tl.effective_rank`), a
    note under the figure says so.

    Parameters
    ----------
    data
        SpatialData (tiles drawn as squares over the H&E) or the tile AnnData (tile centres from
        ``obsm["spatial"]``, no image).
    genes
        One gene or several.
    kinds
        Panels per gene, from ``"measured"`` and ``"predicted"``. ``None``: both where the table has the genes and
        predictions, ``("predicted",)`` for a slide with predictions only (an H&E-only slide after a model's
        ``predict``, whose table has no genes), ``("measured",)`` for a table without predictions.
    image
        Draw the H&E underneath (SpatialData only).
    table_key
        Tile table in ``sdata.tables``.
    tiles_key
        Tile shapes in ``sdata.shapes``.
    pred_key
        Predictions in ``adata.obsm``.
    layer
        Layer with measured values (``X`` when ``None``).
    image_key
        The H&E image; the only image when ``None``.
    cmap
        Colour map.
    vmax_quantile
        Upper end of the shared colour scale, as a quantile of the measured and predicted values together.
    alpha
        Opacity of the tiles over the image.
    min_cv_pearson
        ``"auto"``: mark the genes the model does not trust (its stored rule; no marking for predictions without
        it); a number: the CV score under which a gene is marked; ``None``: no marking.
    {plot_params}

    {plot_returns}
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    adata = get_table(data, table_key)
    kinds = _kinds(adata, genes, kinds, pred_key)
    cv = _cv_scores(adata, pred_key)
    trusted = _trusted(adata, pred_key) if min_cv_pearson == "auto" else None
    trained = in_sample(adata, pred_key) if "predicted" in kinds else None
    pred_table = pred_key not in adata.obsm and cv is not None  # a predicted table: its X holds predictions
    # a row per gene with its kinds side by side; one kind only: the genes side by side
    ncols = len(kinds) if len(kinds) > 1 else min(len(genes), 3)
    fig, axes = new_axes(ax, len(genes) * len(kinds), ncols=ncols, size=4.2)
    is_sdata = isinstance(data, SpatialData)
    if is_sdata:
        from ..pp._tiles import table_rows_to_tiles, tile_bounds

        pos = table_rows_to_tiles(data, table_key, tiles_key, np.asarray(data.shapes[tiles_key].index))
        bounds = tile_bounds(data, tiles_key).astype(float)[pos]
        img, ds = thumbnail(data, image_key) if image else (None, 1.0)
    for gi, gene in enumerate(genes):
        values = {}
        if "measured" in kinds or gene in adata.var_names:  # measured values also give the r of the predictions
            values["measured"] = measured(adata, gene, layer)
        if "predicted" in kinds:
            values["predicted"] = predicted(adata, gene, pred_key)
        both = np.concatenate([values[k] for k in kinds])
        both = both[np.isfinite(both)]
        vmin = float(both.min()) if both.size else 0.0
        vmax = float(np.quantile(both, vmax_quantile)) if both.size else 1.0
        if vmax <= vmin:  # mostly one value (a gene detected on a few tiles): the quantile would collapse the scale
            vmax = float(both.max()) if both.size and both.max() > vmin else vmin + 1.0
        r = r_text(values["measured"], values["predicted"], trained) if len(values) == 2 else None
        row = axes[gi * len(kinds) : (gi + 1) * len(kinds)]
        for kind, axis in zip(kinds, row, strict=True):
            v = values[kind]
            if is_sdata:
                mappable = _draw_tiles(axis, bounds / ds, v, img, cmap, vmin, vmax, alpha)
            else:
                xy = np.asarray(adata.obsm["spatial"], dtype=float)
                mappable = axis.scatter(xy[:, 0], xy[:, 1], c=v, cmap=cmap, vmin=vmin, vmax=vmax, s=12, marker="s")
                axis.invert_yaxis()
                axis.set_aspect("equal")
            title = f"{gene} {kind}"
            if kind == "predicted" and r is not None:
                title += f" ({r})"
            color = None
            if cv is not None and (kind == "predicted" or pred_table):
                score = float(cv.get(gene, np.nan))
                title += f"\nCV r = {score:.2f}" if np.isfinite(score) else "\nno CV score"
                if min_cv_pearson == "auto":
                    if trusted is not None and not bool(trusted.get(gene, False)):
                        title += ": untrusted"
                        color = "tab:red"
                elif min_cv_pearson is not None and not (np.isfinite(score) and score >= min_cv_pearson):
                    title += f": untrusted (< {min_cv_pearson:g})"
                    color = "tab:red"
            axis.set_title(title, **({"color": color} if color else {}))
            axis.set_axis_off()
        # one colour bar for the gene's panels: they share the scale
        fig.colorbar(mappable, ax=row, shrink=0.7, label=f"{gene}, {layer or 'log1p expression'}")
    note = _rank_note(adata, pred_key) if "predicted" in kinds or pred_table else None
    if note:
        fig.text(0.5, 0.0, note, ha="center", va="top", fontsize=9, color="tab:red", wrap=True)
    return finish(fig, axes, name="spatial", ax=ax, show=show, return_fig=return_fig, save=save)


def _trusted(adata, pred_key: str):
    from ..tl import cv_trusted

    return cv_trusted(adata, pred_key=pred_key)


def _rank_note(adata, pred_key: str) -> str | None:
    """A line under the figure when the predictions carry far fewer patterns than the targets."""
    from ..tl._effective_rank import is_low

    uns = adata.uns.get("dbk", {})
    if pred_key not in adata.obsm:  # a table from predictions_to_adata
        rank = (uns.get("predictions") or {}).get("effective_rank")
    else:
        rec = uns.get("predict") or {}
        fit = adata.uns.get(pred_key)
        rank = rec.get("effective_rank") if rec.get("pred_key") == pred_key else None
        if rank is None and isinstance(fit, dict):
            rank = fit.get("effective_rank")
    if not isinstance(rank, dict):
        return None
    k, target, n = int(rank["predictions"]), rank.get("targets"), int(rank.get("n_genes", 0))
    target = None if target is None else int(target)
    if not is_low(k, target, n):
        return None
    return (f"These predictions span only {k} independent pattern{'s' if k != 1 else ''} (effective rank; training "
            f"targets: {target}): gene-gene structure and spatially variable genes are not meaningful beyond that.")


def _cv_scores(adata, pred_key: str):
    from ..tl import cv_pearson

    return cv_pearson(adata, pred_key=pred_key)


def _kinds(adata, genes: list[str], kinds: Sequence[str] | None, pred_key: str) -> list[str]:
    """The panels per gene: the given ones (checked), or those the table has data for."""
    has_pred = pred_key in adata.obsm
    unmeasured = [g for g in genes if g not in adata.var_names]
    if kinds is None:
        if not has_pred:
            return ["measured"]
        return ["predicted"] if unmeasured else ["measured", "predicted"]
    kinds = list(kinds)
    bad = [k for k in kinds if k not in ("measured", "predicted")]
    if bad or not kinds:
        raise ValueError(f"kinds must be from ('measured', 'predicted'), got {kinds}.")
    if "measured" in kinds and unmeasured:
        hint = " Use kinds=('predicted',) to map the predictions only." if has_pred else ""
        raise KeyError(f"Gene {unmeasured[0]!r} is not in the table (it has {adata.n_vars} genes), so it has no "
                       f"measured values.{hint}")
    return kinds


def _draw_tiles(axis, bounds, values, img, cmap, vmin, vmax, alpha):
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if img is not None:
        axis.imshow(img)
    rects = [Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in bounds]
    pc = PatchCollection(rects, cmap=cmap, edgecolor="none", alpha=alpha if img is not None else 1.0)
    pc.set_array(np.ma.masked_invalid(values))
    pc.set_clim(vmin, vmax)
    axis.add_collection(pc)
    zoom_to_tiles(axis, bounds, None if img is None else img.shape[:2])
    return pc
