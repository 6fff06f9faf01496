"""Reading a :func:`dbk.tl.benchmark` table: ``benchmark_summary`` and ``paired_differences`` (per-fold A - B)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

SUMMARY_METRICS = ("pearson_mean_all", "pearson_mean_top{k}_hvg", "spearman_mean_all", "mse_mean_all", "mae_mean_all")

# ---- summaries ------------------------------------------------------------------------------------------------------


def _lower_is_better(metric: str) -> bool:
    """Errors (MSE, MAE, RMSE, loss) are better when lower; correlations when higher (as :func:`dbk.pl.benchmark`)."""
    return any(tok in metric.lower() for tok in ("mse", "mae", "rmse", "loss", "error"))


def _one_split(results: pd.DataFrame, split: str | None) -> pd.DataFrame:
    missing = [c for c in ("split", "fold", "method", "metric", "value") if c not in results.columns]
    if missing:
        raise KeyError(f"Not a dbk.tl.benchmark table: no columns {missing} (columns: {list(results.columns)}).")
    if split is not None:
        if split not in set(results["split"]):
            raise KeyError(f"No split {split!r} in the results (splits: {list(pd.unique(results['split']))}).")
        return results[results["split"] == split]
    return results


def paired_differences(
    results: pd.DataFrame,
    a: str,
    b: str,
    *,
    metric: str = "pearson_mean_all",
    split: str | None = None,
) -> pd.DataFrame:
    """Per-fold differences ``a - b`` of one metric, and their mean ± std over folds (is ``a`` reliably better).

    Folds are paired: both methods are scored on the same test tiles and genes, so the spread of the difference is
    far smaller than the spread of either method over folds.

    Parameters
    ----------
    results
        The table of :func:`dbk.tl.benchmark` (possibly several concatenated).
    a, b
        Method names.
    metric
        The metric compared.
    split
        Only the folds of this split (needed when ``results`` holds several splits).

    Returns
    -------
    DataFrame with one row per fold where both methods have a value: ``split``, ``fold``, ``a``'s and ``b``'s values
    (columns named by the methods) and ``difference`` (``a - b``). ``attrs["summary"]``: ``a``, ``b``, ``metric``,
    ``mean`` and ``std`` (ddof=1; NaN with one fold) of the differences, ``n_folds``, ``n_higher`` (folds where
    ``a`` is higher), ``n_better`` (where ``a`` is better: lower for errors such as MSE), and ``text``, a one-line
    verdict, as ``benchmarks/her2st.py`` prints it.

    Examples
    --------
    >>> d = dbk.tl.paired_differences(res, "ridge_cv", "mean", metric="mse_mean_all")  # doctest: +SKIP
    >>> d.attrs["summary"]["text"]  # doctest: +SKIP
    'ridge_cv - mean (mse_mean_all): -0.0123 ± 0.0040 over 3 folds, higher on 0/3, better on 3/3'
    """
    df = _one_split(results, split)
    if split is None and df["split"].nunique() > 1:
        raise ValueError(f"The results hold several splits {list(pd.unique(df['split']))}; pass split=.")
    for m in (a, b):
        if m not in set(df["method"]):
            raise KeyError(f"No method {m!r} in the results (methods: {list(pd.unique(df['method']))}).")
    if a == b:
        raise ValueError("a and b are the same method.")
    sub = df[(df["metric"] == metric) & df["method"].isin([a, b])]
    if sub.empty:
        raise KeyError(f"No metric {metric!r} in the results (metrics: {list(pd.unique(df['metric']))}).")
    if sub.duplicated(["split", "fold", "method"]).any():
        raise ValueError("The results have several rows per (split, fold, method, metric); concatenate distinct runs.")
    wide = sub.set_index(["split", "fold", "method"])["value"].unstack("method")
    order = list(dict.fromkeys(zip(sub["split"], sub["fold"], strict=True)))
    wide = wide.reindex(pd.MultiIndex.from_tuples(order, names=["split", "fold"]))
    out = pd.DataFrame({"split": [s for s, _ in order], "fold": [f for _, f in order],
                        a: wide.get(a, pd.Series(np.nan, index=wide.index)).to_numpy(dtype=float),
                        b: wide.get(b, pd.Series(np.nan, index=wide.index)).to_numpy(dtype=float)})
    out["difference"] = out[a] - out[b]
    out = out[np.isfinite(out["difference"])].reset_index(drop=True)
    d = out["difference"].to_numpy(dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    std = float(d.std(ddof=1)) if n >= 2 else float("nan")
    lower = _lower_is_better(metric)
    n_higher = int((d > 0).sum())
    n_better = int((d < 0).sum()) if lower else n_higher
    digits = 4 if lower else 3
    spread = f" ± {std:.{digits}f}" if n >= 2 else ""
    text = (f"{a} - {b} ({metric}): {mean:+.{digits}f}{spread} over {n} fold{'s' if n != 1 else ''}, higher on "
            f"{n_higher}/{n}, better on {n_better}/{n}")
    out.attrs["summary"] = {"a": a, "b": b, "metric": metric, "mean": mean, "std": std, "n_folds": n,
                            "n_higher": n_higher, "n_better": n_better, "lower_is_better": lower, "text": text}
    return out


def benchmark_summary(
    results: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    split: str | None = None,
) -> pd.DataFrame:
    """Methods x metrics: the mean and std over folds of each metric, and the seconds per fold.

    Parameters
    ----------
    results
        The table of :func:`dbk.tl.benchmark`.
    metrics
        Metrics to show; default those of ``benchmarks/her2st.py`` that are present: ``pearson_mean_all``,
        ``pearson_mean_top{k}_hvg``, ``spearman_mean_all``, ``mse_mean_all``, ``mae_mean_all``.
    split
        Only this split's folds; without it a table with several splits is indexed by ``(split, method)``.

    Returns
    -------
    DataFrame indexed by method (in the order they ran; ``(split, method)`` with several splits), columns a
    ``(metric, statistic)`` MultiIndex: ``mean`` and ``std`` (ddof=1, NaN with one fold) over the folds of each
    metric, then ``("seconds", "mean")`` (fit + predict per fold), ``("n_folds", "")`` (folds with results) and
    ``("n_failed", "")`` (failed runs recorded in ``results.attrs["failed"]``).

    Examples
    --------
    >>> dbk.tl.benchmark_summary(res).round(3)  # doctest: +SKIP
    """
    df = _one_split(results, split)
    present = list(pd.unique(df["metric"]))
    if metrics is None:
        k = (results.attrs.get("settings") or {}).get("top_k")
        metrics = []
        for m in SUMMARY_METRICS:
            if "{k}" not in m:
                metrics += [m] if m in present else []
            elif k is not None and m.format(k=k) in present:
                metrics.append(m.format(k=k))
            else:  # k of the run unknown (attrs lost) or smaller (fewer genes): every top-k variant present
                metrics += [p for p in present if re.fullmatch(m.replace("{k}", r"\d+"), p)]
    else:
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        unknown = [m for m in metrics if m not in present]
        if unknown:
            raise KeyError(f"No metrics {unknown} in the results (metrics: {present}).")
    failed = pd.DataFrame(results.attrs.get("failed") or [], columns=["split", "fold", "method"])
    if split is not None:
        failed = failed[failed["split"] == split]
    several = pd.concat([df["split"], failed["split"]]).nunique() > 1
    keys = ["split", "method"] if several else ["method"]
    # methods in the order they ran, those that failed on every fold included
    order = list(dict.fromkeys([*map(tuple, df[keys].to_numpy().tolist()),
                                *map(tuple, failed[keys].to_numpy().tolist())]))
    index = (pd.MultiIndex.from_tuples(order, names=keys) if several
             else pd.Index([o[0] for o in order], name="method"))
    stats = df[df["metric"].isin(metrics)].groupby([*keys, "metric"], sort=False)["value"].agg(["mean", "std"])
    columns: dict = {}
    for m in metrics:
        s = stats.xs(m, level="metric")
        columns[(m, "mean")] = s["mean"].reindex(index)
        columns[(m, "std")] = s["std"].reindex(index)
    per_fold = df.groupby([*keys, "fold"] if several else ["method", "split", "fold"], sort=False)["seconds"].first()
    levels = list(range(len(keys)))
    columns[("seconds", "mean")] = per_fold.groupby(level=levels, sort=False).mean().reindex(index)
    columns[("n_folds", "")] = per_fold.groupby(level=levels, sort=False).size().reindex(index).fillna(0).astype(int)
    n_failed = failed.groupby(keys).size() if len(failed) else pd.Series(dtype=int)
    columns[("n_failed", "")] = pd.Series([int(n_failed.get(i, 0)) for i in index], index=index)
    out = pd.DataFrame(columns, index=index)
    out.columns = pd.MultiIndex.from_tuples(list(columns), names=["metric", "statistic"])
    return out
