"""Reading a :func:`dbk.tl.benchmark` table: ``benchmark_summary`` and ``paired_differences`` (per-fold A - B)."""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

SUMMARY_METRICS = ("pearson_mean_all", "pearson_mean_top{k}_hvg", "spearman_mean_all", "mse_mean_all", "mae_mean_all")
# metrics that are means over a fixed set of genes of a per-gene metric of attrs["gene_scores"]
_MEAN_ALL = re.compile(r"(pearson|spearman|mse|mae)_mean_all")
_MEAN_HVG = re.compile(r"(pearson|spearman)_mean_top(\d+)_hvg")
# bootstrap draws x genes per chunk (bounds the memory of the draw)
_CHUNK = 1_000_000

# ---- summaries ------------------------------------------------------------------------------------------------------


def _lower_is_better(metric: str) -> bool:
    """Errors (MSE, MAE, RMSE, loss) are better when lower; correlations when higher (as :func:`dbk.pl.benchmark`)."""
    return any(tok in metric.lower() for tok in ("mse", "mae", "rmse", "loss", "error"))


def _one_split(results: pd.DataFrame, split: str | None) -> pd.DataFrame:
    missing = [c for c in ("split", "fold", "method", "metric", "value") if c not in results.columns]
    if missing:
        raise KeyError(f"Not a dbk.tl.benchmark table: no columns {missing} (columns: {list(results.columns)}).")
    # the same columns without attrs: pandas deep-copies attrs (the per-gene scores among them) on every operation
    results = pd.DataFrame(results)
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
    n_boot: int = 2000,
    random_state: int | None = None,
) -> pd.DataFrame:
    """Per-fold differences ``a - b`` of one metric, and their mean ± std over folds (is ``a`` reliably better).

    Folds are paired: both methods are scored on the same test tiles and genes, so the spread of the difference is
    far smaller than the spread of either method over folds.

    With the per-gene test scores of :func:`dbk.tl.benchmark` (``results.attrs["gene_scores"]``) and a metric that is
    a mean over genes of a per-gene metric (``pearson_mean_all``, ``spearman_mean_all``, ``mse_mean_all``,
    ``mae_mean_all``, ``pearson_mean_top{k}_hvg``, ``spearman_mean_top{k}_hvg``), a 95% interval is also given by
    resampling genes, so one fold alone has one: the genes of a fold are drawn with replacement ``n_boot`` times, the
    same draw for ``a`` and ``b`` (paired), and the metric's difference is recomputed on each draw; the interval is
    the 2.5 and 97.5 percentiles of the draws. For the mean over folds, each draw resamples the genes within every
    fold, with the same gene draw in all folds when they share their genes (independent draws otherwise), and
    averages the folds' differences. The interval says how sure the difference is *on these test slides*: the genes
    of one slide are not independent replicates of new slides or patients, which only the spread over folds shows.

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
    n_boot
        Draws of the gene bootstrap.
    random_state
        Seed of the gene bootstrap (``None``: ``dbk.settings.seed``, so the same call gives the same interval).

    Returns
    -------
    DataFrame with one row per fold where both methods have a value: ``split``, ``fold``, ``a``'s and ``b``'s values
    (columns named by the methods), ``difference`` (``a - b``), ``ci_low`` and ``ci_high`` (the fold's 95% gene
    bootstrap interval of the difference), ``n_genes`` (genes with a score of both methods) and ``n_genes_higher``
    (genes where ``a``'s per-gene score is higher: worse for MSE / MAE); these four are NaN without per-gene scores
    or for a metric that is no mean over genes.
    ``attrs["summary"]``: ``a``, ``b``, ``metric``, ``mean`` and ``std`` (ddof=1; NaN with one fold) of the
    differences, ``n_folds``, ``n_higher`` (folds where ``a`` is higher), ``n_better`` (where ``a`` is better: lower
    for errors such as MSE), ``ci_low`` and ``ci_high`` (the gene bootstrap 95% interval of ``mean``; NaN when it
    cannot be made), ``ci_method`` (how it was made, e.g. ``"gene bootstrap, 2000 draws, ..."``, or ``"none: "`` and
    why), and ``text``, a one-line verdict, as ``benchmarks/her2st.py`` prints it, ending with the interval or why
    there is none.

    Examples
    --------
    >>> d = dbk.tl.paired_differences(res, "ridge_cv", "mean", metric="mse_mean_all")  # doctest: +SKIP
    >>> d.attrs["summary"]["text"]  # doctest: +SKIP
    'ridge_cv - mean (mse_mean_all): -0.0123 ± 0.0040 over 3 folds, higher on 0/3, better on 3/3; 95% CI [-0.0151,
    -0.0098] by resampling genes'
    """
    df = _one_split(results, split)
    if split is None and df["split"].nunique() > 1:
        raise ValueError(f"The results hold several splits {list(pd.unique(df['split']))}; pass split=.")
    for m in (a, b):
        if m not in set(df["method"]):
            raise KeyError(f"No method {m!r} in the results (methods: {list(pd.unique(df['method']))}).")
    if a == b:
        raise ValueError("a and b are the same method.")
    if not isinstance(n_boot, numbers.Integral) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
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
    per_fold, (ci_low, ci_high), ci_method = _gene_bootstrap(results, out, a, b, metric, n_boot=int(n_boot),
                                                             random_state=random_state)
    for col in ("ci_low", "ci_high", "n_genes", "n_genes_higher"):
        out[col] = per_fold[col]
    if np.isfinite(ci_low) and np.isfinite(ci_high):
        text += f"; 95% CI [{ci_low:+.{digits}f}, {ci_high:+.{digits}f}] by resampling genes"
    else:
        text += f"; no gene interval: {ci_method.removeprefix('none: ')}"
    out.attrs["summary"] = {"a": a, "b": b, "metric": metric, "mean": mean, "std": std, "n_folds": n,
                            "n_higher": n_higher, "n_better": n_better, "lower_is_better": lower,
                            "ci_low": ci_low, "ci_high": ci_high, "ci_method": ci_method, "text": text}
    return out


def _gene_bootstrap(results: pd.DataFrame, out: pd.DataFrame, a: str, b: str, metric: str, *, n_boot: int,
                    random_state) -> tuple[dict, tuple[float, float], str]:
    """The gene bootstrap of :func:`paired_differences`: per-fold columns, the interval of the mean, how it was made.

    ``out``: the per-fold rows (``split``, ``fold``, ``a``, ``b``, ``difference``). Without usable per-gene scores
    the columns and the interval are NaN and the method string starts with ``"none: "`` and says why.
    """
    n = len(out)
    nan_cols = {"ci_low": np.full(n, np.nan), "ci_high": np.full(n, np.nan), "n_genes": np.full(n, np.nan),
                "n_genes_higher": np.full(n, np.nan)}
    prepared = _gene_arrays(results, out, a, b, metric)
    if isinstance(prepared, str):
        return nan_cols, (np.nan, np.nan), f"none: {prepared}"
    genes, scores_a, scores_b = prepared
    both = [np.isfinite(x) & np.isfinite(y) for x, y in zip(scores_a, scores_b, strict=True)]
    cols = {"n_genes": np.array([int(m.sum()) for m in both]),
            "n_genes_higher": np.array([int((x[m] > y[m]).sum()) for x, y, m in zip(scores_a, scores_b, both,
                                                                                     strict=True)])}
    shared = all(set(g) == set(genes[0]) for g in genes[1:])
    if shared:  # the genes in the first fold's order, so one draw of gene indices resamples the same genes everywhere
        scores_a = [pd.Series(x, index=g).reindex(genes[0]).to_numpy() for x, g in zip(scores_a, genes, strict=True)]
        scores_b = [pd.Series(y, index=g).reindex(genes[0]).to_numpy() for y, g in zip(scores_b, genes, strict=True)]
    from .._utils import resolve_seed

    rng = np.random.default_rng(resolve_seed(random_state))
    draws = np.empty((n_boot, n))
    sizes = [len(x) for x in scores_a]
    chunk = max(1, _CHUNK // max(sizes))
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        idx = rng.integers(0, sizes[0], size=(c, sizes[0])) if shared else None
        for j, (x, y) in enumerate(zip(scores_a, scores_b, strict=True)):
            k = idx if shared else rng.integers(0, sizes[j], size=(c, sizes[j]))
            draws[start:start + c, j] = _mean_finite(x, k) - _mean_finite(y, k)
    with np.errstate(invalid="ignore"):
        fold_ci = [_percentiles(draws[:, j]) for j in range(n)]
        overall = _percentiles(draws.mean(axis=1))  # a draw where some fold is undefined is left out
    cols["ci_low"] = np.array([lo for lo, _ in fold_ci])
    cols["ci_high"] = np.array([hi for _, hi in fold_ci])
    how = f"gene bootstrap, {n_boot} draws, percentile interval"
    if n > 1:
        how += (f"; the same gene draw in all {n} folds" if shared else "; genes drawn independently in each fold "
                "(the folds' genes differ)")
    return cols, overall, how


def _gene_arrays(results: pd.DataFrame, out: pd.DataFrame, a: str, b: str, metric: str):
    """Per fold of ``out``: its genes and the per-gene scores of ``a`` and ``b`` behind ``metric``, or why not."""
    m_all, m_hvg = _MEAN_ALL.fullmatch(metric), _MEAN_HVG.fullmatch(metric)
    if m_all is None and m_hvg is None:
        return f"{metric} is not a mean over a fixed set of genes of a per-gene metric"
    if out.empty:
        return "no fold where both methods have a value"
    column = (m_all or m_hvg).group(1)
    attrs = results.attrs
    scores = attrs.get("gene_scores")
    if not isinstance(scores, Mapping) or not scores:
        return ("the results hold no per-gene test scores (attrs['gene_scores']: a table of an older dbk, or one "
                "whose attrs were dropped, e.g. by concatenating different runs)")
    splits = set(out["split"])
    if attrs.get("split") is not None and splits != {attrs["split"]}:
        return f"the per-gene scores in attrs are of split {attrs['split']!r}, not of {sorted(map(str, splits))}"
    genes, scores_a, scores_b = [], [], []
    for fold, va, vb in zip(out["fold"], out[a], out[b], strict=True):
        per_method = scores.get(fold) or {}
        sa = (per_method.get(a) or {}).get(column)
        sb = (per_method.get(b) or {}).get(column)
        if not isinstance(sa, Mapping) or not isinstance(sb, Mapping):
            return f"no per-gene {column} of both methods in fold {fold!r}"
        g = list(sa)
        if m_hvg is not None:
            hvg = ((attrs.get("folds") or {}).get(fold) or {}).get("hvg")
            if hvg is None:  # the genes' mean is checked below: these must be the metric's genes
                return f"the top-{m_hvg.group(2)} most variable genes of fold {fold!r} are not in attrs['folds']"
            hvg = set(hvg)
            g = [x for x in g if x in hvg]
        if set(g) - set(sb):
            return f"the two methods were scored on different genes in fold {fold!r}"
        x = np.array([sa[i] for i in g], dtype=np.float64)
        y = np.array([sb[i] for i in g], dtype=np.float64)
        for method, v, value in ((a, x, va), (b, y, vb)):  # the scores must be those behind this table's values
            mean = np.nanmean(v) if np.isfinite(v).any() else np.nan
            if not np.isclose(mean, value, rtol=1e-6, atol=1e-9):
                return (f"the per-gene {column} of {method!r} in fold {fold!r} do not average to its {metric} "
                        f"({mean:.6g} vs {value:.6g}): attrs of another run?")
        genes.append(g)
        scores_a.append(x)
        scores_b.append(y)
    return genes, scores_a, scores_b


def _mean_finite(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Per row of ``idx``: the mean of the finite ``x[idx]`` (NaN where none is finite), as evaluate averages genes."""
    ok = np.isfinite(x)
    total = np.where(ok, x, 0.0)[idx].sum(axis=1)
    count = ok[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the finite values (NaN when there are none)."""
    values = values[np.isfinite(values)]
    if not values.size:
        return np.nan, np.nan
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


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
