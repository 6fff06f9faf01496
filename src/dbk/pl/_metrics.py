"""Per-gene metrics ranked, a benchmark figure (methods x metric with fold spread), training curves."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import PRED_KEY, TILES_TABLE_KEY
from .._utils import renamed_kwargs
from ..tl._benchmark_results import _lower_is_better
from ._utils import finish, new_axes, plot_docs


@renamed_kwargs(top="top_k")
@plot_docs
def gene_metrics(
    data: pd.DataFrame | ad.AnnData | SpatialData,
    *,
    metric: str = "pearson",
    top_k: int = 30,
    pred_key: str = PRED_KEY,
    table_key: str = TILES_TABLE_KEY,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | None = None,
):
    """Per-gene metric, ranked: the ``top_k`` best genes as horizontal bars, with the mean over all genes marked.

    Parameters
    ----------
    data
        The per-gene table of :func:`dbk.tl.evaluate`, or an AnnData / SpatialData with predictions (evaluated
        here with :func:`dbk.tl.evaluate`).
    metric
        Column to rank by: ``"pearson"``, ``"spearman"``, ``"mse"`` or ``"mae"`` (errors are ranked lowest first).
    top_k
        Number of genes shown.
    pred_key
        Predictions in ``adata.obsm`` (when evaluating here).
    table_key
        Tile table in ``sdata.tables``.
    {plot_params}

    {plot_returns}
    """
    if isinstance(data, pd.DataFrame):
        df = data
    else:
        from ..tl import evaluate

        df = evaluate(data, pred_key=pred_key, table_key=table_key)
    if metric not in df.columns:
        raise KeyError(f"No metric {metric!r} in the table; columns: {list(df.columns)}.")
    values = df[metric].astype(float).dropna()
    lower_better = _lower_is_better(metric)
    ranked = values.sort_values(ascending=lower_better)
    shown = ranked.iloc[:top_k]
    fig, (axis,) = new_axes(ax, 1, figsize=(5.5, max(3.0, 0.24 * len(shown) + 1.2)))
    axis.barh(np.arange(len(shown))[::-1], shown.to_numpy(), color="#4c72b0")
    axis.set_ylim(-0.6, len(shown) - 0.4)
    axis.set_yticks(np.arange(len(shown))[::-1], labels=list(shown.index))
    mean = float(values.mean()) if len(values) else float("nan")
    axis.axvline(mean, color="black", linestyle="--", linewidth=1,
                 label=f"mean over {len(values)} genes = {mean:.3f}")
    axis.set_xlabel(metric)
    which = "lowest" if lower_better else "best"
    # the mean goes in the title: a legend inside the axes would sit on the bars
    axis.set_title(f"{metric}: {which} {len(shown)} of {len(values)} genes\n(dashed: mean over all {len(values)} "
                   f"genes = {mean:.3f})", fontsize="medium")
    return finish(fig, [axis], name="gene_metrics", ax=ax, show=show, return_fig=return_fig, save=save)


@plot_docs
def benchmark(
    results: pd.DataFrame,
    *,
    metric: str = "pearson_mean_all",
    method_col: str = "method",
    fold_col: str = "fold",
    order: Sequence[str] | None = None,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | None = None,
):
    """Methods x one metric: the mean over folds as a bar, each fold as a dot, the spread as an error bar (± std).

    A method whose metric is undefined on every fold (the Pearson r of the constant mean predictor) is shown first,
    marked "undefined", rather than left out.

    Parameters
    ----------
    results
        The tidy table of :func:`dbk.tl.benchmark` (columns ``method``, ``fold``, ``metric``, ``value``; one split),
        or a wide table with one row per (method, fold) and a column per metric (as ``benchmarks/her2st.py``
        writes).
    metric
        Metric to show: a value of the tidy table's ``metric`` column, or a column of the wide table.
    method_col
        Column naming the method.
    fold_col
        Column naming the fold.
    order
        Order of the methods (default: by mean, best last; for errors such as MSE and MAE the lowest is best).
    {plot_params}

    {plot_returns}

    Examples
    --------
    >>> res = dbk.tl.benchmark(slides, methods=["mean", "ridge_cv"])  # doctest: +SKIP
    >>> dbk.pl.benchmark(res, metric="pearson_mean_all")  # doctest: +SKIP
    """
    results = pd.DataFrame(results)  # without attrs: pandas deep-copies them (the per-gene scores) on every operation
    if {"metric", "value"} <= set(results.columns) and metric not in results.columns:  # dbk.tl.benchmark's tidy table
        if metric not in set(results["metric"]):
            raise KeyError(f"No metric {metric!r} in the results; metrics: {list(pd.unique(results['metric']))}.")
        if "split" in results.columns and results["split"].nunique() > 1:
            raise ValueError(f"The results hold several splits {list(pd.unique(results['split']))}; plot one, e.g. "
                             "results[results['split'] == 'loso'].")
        results = results.loc[results["metric"] == metric].rename(columns={"value": metric})
    for col in (method_col, fold_col, metric):
        if col not in results.columns:
            raise KeyError(f"No column {col!r} in the results; columns: {list(results.columns)}.")
    stats = results.groupby(method_col, observed=True)[metric].agg(["mean", "std", "count"])
    lower_better = _lower_is_better(metric)
    if order is None:  # by mean, best last; methods without a value (e.g. Pearson of a constant) first
        order = list(stats.sort_values("mean", ascending=not lower_better, na_position="first").index)
    missing = [m for m in order if m not in stats.index]
    if missing:
        raise KeyError(f"Methods {missing} are not in the results.")
    fig, (axis,) = new_axes(ax, 1, figsize=(max(4.0, 0.8 * len(order) + 1.5), 4.5))
    x = np.arange(len(order))
    means = stats.loc[order, "mean"].to_numpy(dtype=float)
    stds = stats.loc[order, "std"].fillna(0).to_numpy(dtype=float)
    axis.bar(x, np.nan_to_num(means), yerr=np.where(np.isfinite(means), stds, np.nan), color="#8da0cb", capsize=4,
             label="mean ± std over folds")
    rng = np.random.default_rng(0)
    for i, m in enumerate(order):
        v = results.loc[results[method_col] == m, metric].to_numpy(dtype=float)
        axis.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, color="black", s=12, zorder=3)
        if not np.isfinite(means[i]):
            axis.annotate("undefined", (i, 0), xytext=(0, 4), textcoords="offset points", ha="center",
                          va="bottom", fontsize="small", color="grey", rotation=90)
    axis.set_xticks(x, labels=list(order), rotation=30, ha="right")
    axis.set_ylabel(metric)
    n_folds = int(stats["count"].max())
    better = "lower is better; " if lower_better else ""
    axis.set_title(f"{metric} ({better}{n_folds} folds; dots = folds)")
    axis.axhline(0, color="grey", linewidth=0.8)
    return finish(fig, [axis], name="benchmark", ax=ax, show=show, return_fig=return_fig, save=save)


@plot_docs
def training_history(
    model,
    *,
    keys: Sequence[str] = ("loss",),
    smooth: int = 1,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | None = None,
):
    """Training curves from a model's ``history`` (a list of ``{"step": ..., "loss": ..., ...}`` records).

    Parameters
    ----------
    model
        Any object with a ``history`` list (e.g. :class:`~dbk.tl.DiffusionPretrainer`), or the list itself.
    keys
        Record fields to plot against ``step``.
    smooth
        Window of a centred moving average (in records); above 1 the raw records are drawn faintly under it.
    {plot_params}

    {plot_returns}
    """
    history = model if isinstance(model, list) else getattr(model, "history", None)
    if not history:
        raise ValueError("The model has no training history (train it first).")
    df = pd.DataFrame(history)
    fig, (axis,) = new_axes(ax, 1, figsize=(5.5, 3.8))
    for key in keys:
        if key not in df.columns:
            raise KeyError(f"No {key!r} in the history; fields: {list(df.columns)}.")
        y = df[key].astype(float)
        if smooth > 1:  # the raw records faint, the moving average on top
            (raw,) = axis.plot(df["step"], y, alpha=0.3, linewidth=1, label="_raw")
            axis.plot(df["step"], y.rolling(smooth, min_periods=1, center=True).mean(), color=raw.get_color(),
                      label=f"{key} (moving mean of {smooth})")
        else:
            axis.plot(df["step"], y, label=key)
    axis.set_xlabel("step")
    axis.set_ylabel(", ".join(keys))
    axis.set_title(f"training history ({int(df['step'].max())} steps)")
    axis.legend(frameon=False)
    return finish(fig, [axis], name="training_history", ax=ax, show=show, return_fig=return_fig, save=save)
