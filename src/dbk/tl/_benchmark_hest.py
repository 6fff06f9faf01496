"""HEST-Benchmark's protocol inside :func:`dbk.tl.benchmark`, and its summary next to the published numbers.

What HEST does (``mahmoodlab/HEST``, ``src/hest/bench/``), which a run on a :class:`dbk.datasets.HestBenchTask`
follows:

- folds: ``predict_folds`` (``benchmark.py``) runs fold ``i`` on ``splits/train_{i}.csv`` / ``test_{i}.csv``;
- genes and targets: the task's ``var_50genes.json``; ``log1p`` of the ``.h5ad``'s values at the patches' barcodes
  (``st_dataset.load_adata``; see :mod:`dbk.datasets._hest_bench`);
- per fold: ``train_test_reg`` (``trainer.py``) computes each gene's ``scipy.stats.pearsonr`` on the test patches and
  ``pearson_mean = np.mean`` over the genes (a gene with an undefined correlation makes it NaN);
- over folds: ``merge_fold_results`` (``benchmark.py``) gives ``np.mean`` and ``np.std`` (ddof 0) of the per-fold
  means; over tasks: ``benchmark_grid`` averages the per-task means (``np.mean``).

dbk's metric ``pearson_mean_hest`` is that per-fold mean; :func:`hest_summary` averages it as HEST does. The
DiffBulk reference code's metric, one Pearson over all test (tile, gene) pairs flattened, is
:func:`dbk.tl.evaluate`'s ``pearson_flattened``, reported under that name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .._logging import logger

HEST_SPLIT = "hest"
HEST_METRIC = "pearson_mean_hest"
FLAT_METRIC = "pearson_flattened"
#: methods that need the tiles' positions in µm (spatial context)
CONTEXT_METHODS = ("ridge_rr_ctx", "diffbulk_ridge")

#: Published HEST-Benchmark averages over its nine tasks (Pearson, mean over genes, folds, then tasks), with their
#: sources, as quoted in dbk issue 25. The HEST README numbers are its 2024 table (ridge on 256 PCA components at
#: HEST's fixed alpha); the PR #140 numbers tune alpha by inner CV (the second UNI2-h row is that PR's fixed-alpha
#: run, lower than the UNI README's 0.414).
HEST_PUBLISHED = (
    ("H-optimus-0", 0.4146, "HEST README, HEST-Benchmark table (2024)"),
    ("UNI v1.5", 0.4090, "HEST README, HEST-Benchmark table (2024)"),
    ("Virchow2", 0.3984, "HEST README, HEST-Benchmark table (2024)"),
    ("CONCH", 0.3709, "HEST README, HEST-Benchmark table (2024)"),
    ("ResNet50", 0.326, "HEST README, HEST-Benchmark table (2024)"),
    ("UNI2-h", 0.414, "UNI README (MahmoodLab/UNI)"),
    ("UNI2-h, alpha by CV", 0.434, "HEST pull request #140 (open)"),
    ("UNI2-h, fixed alpha", 0.408, "HEST pull request #140 (open)"),
)


def hest_task(data):
    """``data`` if it is a :class:`dbk.datasets.HestBenchTask`, else ``None`` (nothing is read)."""
    from ..datasets._hest_bench import HestBenchTask

    return data if isinstance(data, HestBenchTask) else None


def hest_arguments(task, *, methods: list[str], default_methods: bool, split, genes, n_top_genes, patients,
                   split_kwargs, context_um) -> list[str]:
    """Check :func:`dbk.tl.benchmark`'s arguments for a HEST task; return the methods to run (nothing is read).

    The task fixes the folds, the genes and the targets; ``ridge_hest`` joins the default methods. Without the
    source pixel size of every sample the tiles have no positions: the context methods leave the default list (a
    warning says so), and naming one is an error.
    """
    if split is not None and split != HEST_SPLIT:
        raise ValueError(f"A HEST-Benchmark task runs on its own split files (split='hest' or None), got split="
                         f"{split!r}; benchmark the task's slides (task.slides()) for other splits.")
    if genes is not None and [str(g) for g in ([genes] if isinstance(genes, str) else genes)] != list(task.genes):
        raise ValueError(f"A HEST-Benchmark task predicts its own {len(task.genes)} genes (var_50genes.json); leave "
                         "genes=None.")
    if n_top_genes is not None:
        raise ValueError("A HEST-Benchmark task predicts its own genes; leave n_top_genes=None.")
    if patients is not None or split_kwargs:
        raise ValueError("patients= and split_kwargs= do not apply to a HEST-Benchmark task (its folds are its split "
                         "files).")
    methods = list(methods)
    if default_methods and "ridge_hest" not in methods:
        methods.insert(1 if methods and methods[0] == "mean" else 0, "ridge_hest")
    unknown = sorted(s for s, px in task.pixel_size_um.items() if px is None)
    if unknown:
        asked = [m for m in methods if m in CONTEXT_METHODS]
        msg = (f"HEST-Benchmark task {task.name!r}: the source pixel size of samples {unknown} is unknown (not in "
               "their patches files' attributes, nor in HEST-1k metadata under hest_root, nor given as "
               "pixel_size_um=), so their patches have no positions in µm: this run uses no spatial context")
        if context_um is not None:
            raise ValueError(msg + "; context_um= cannot be used.")
        if asked and not default_methods:
            raise ValueError(msg + f"; methods {asked} need it. Pass dbk.datasets.hest_bench(..., pixel_size_um=...) "
                             "or leave them out.")
        methods = [m for m in methods if m not in CONTEXT_METHODS]
        logger.warning(msg + (f" ({', '.join(asked)} left out of the default methods" if asked else "")
                       + ("; DiffBulk's head choice considers no context heads)." if asked else
                          " (DiffBulk's head choice considers no context heads)."))
    return methods


def hest_record(task) -> dict:
    """What ``results.attrs["hest"]`` says about the task of a run."""
    return {"task": task.name, "path": str(task.path), "genes": list(task.genes),
            "folds": task.folds(), "source_pixel_size_um": task.pixel_size_um,
            "source_pixel_size_from": task.pixel_size_source,
            "context": all(v is not None for v in task.pixel_size_um.values())}


def pearson_mean_hest(per_gene_pearson) -> float:
    """HEST's per-fold metric: ``np.mean`` of the per-gene Pearson correlations (NaN if any is undefined)."""
    return float(np.mean(np.asarray(per_gene_pearson, dtype=np.float64)))


def _runs(results) -> list[pd.DataFrame]:
    if isinstance(results, pd.DataFrame):
        return [results]
    if isinstance(results, Mapping):
        return list(results.values())
    if isinstance(results, Sequence) and not isinstance(results, str):
        return list(results)
    raise TypeError(f"results must be a table of dbk.tl.benchmark or a list / dict of them, got "
                    f"{type(results).__name__}.")


def hest_summary(
    results: pd.DataFrame | Sequence[pd.DataFrame] | Mapping[str, pd.DataFrame],
    *,
    published: bool = True,
) -> pd.DataFrame:
    """HEST-Benchmark's numbers of benchmark runs on its tasks, averaged as HEST does, beside the published ones.

    For each task and method: the mean and the ``np.std`` (ddof 0) over folds of ``pearson_mean_hest`` (the
    per-fold mean over genes of each gene's Pearson; ``merge_fold_results`` in HEST's ``benchmark.py``), and the mean
    over folds of ``pearson_flattened`` (the DiffBulk reference code's one Pearson over all test tiles and genes,
    not HEST's metric). ``average`` is the mean over the tasks given of the per-task means (``benchmark_grid``'s
    average); it compares with the published averages only when the runs cover HEST's nine tasks with the same
    foundation model.

    Parameters
    ----------
    results
        Tables of :func:`dbk.tl.benchmark` on :class:`dbk.datasets.HestBenchTask` (one, or a list or dict of
        them, one per task).
    published
        Append the published averages (``HEST_PUBLISHED``: model, average, source) as rows below dbk's.

    Returns
    -------
    pandas.DataFrame
        One row per method run (index ``method``), then one per published model; columns ``(task, "pearson_mean")``,
        ``(task, "pearson_std")``, ``(task, "pearson_flattened")`` per task, ``("average", "pearson_mean")``,
        ``("n_tasks", "")``, ``("fm", "")`` (the foundation model of the run; the published model's name for the
        published rows) and ``("source", "")``. Numbers are NaN where a fold's mean is (HEST's ``np.mean``
        propagates an undefined correlation, e.g. of the constant ``mean`` predictor).

    Raises
    ------
    ValueError
        If a table is not of a HEST-Benchmark run (no ``attrs["hest"]``), or two tables are of one task.

    Examples
    --------
    >>> res = dbk.tl.benchmark(dbk.datasets.hest_bench("IDC"), fm="hf-hub:MahmoodLab/UNI")  # doctest: +SKIP
    >>> print(dbk.tl.hest_summary(res).to_string(float_format="{:.4f}".format))  # doctest: +SKIP
    """
    runs = _runs(results)
    if not runs:
        raise ValueError("hest_summary needs at least one table of dbk.tl.benchmark.")
    per_task: dict[str, dict] = {}
    fms: dict[str, set] = {}
    order: list[str] = []
    for res in runs:
        rec = res.attrs.get("hest")
        if not rec:
            raise ValueError("This table is not of a HEST-Benchmark run (no attrs['hest']): run dbk.tl.benchmark on "
                             "dbk.datasets.hest_bench(task).")
        task = rec["task"]
        if task in per_task:
            raise ValueError(f"Two tables of task {task!r}; give one per task.")
        folds = list(rec["folds"])
        fm = (res.attrs.get("settings") or {}).get("fm")
        stats = {}
        for method in pd.unique(res["method"]):
            rows = res[res["method"] == method]
            vals = rows[rows["metric"] == HEST_METRIC].set_index("fold")["value"].reindex(folds)
            flat = rows[rows["metric"] == FLAT_METRIC].set_index("fold")["value"].reindex(folds)
            v = vals.to_numpy(np.float64)
            stats[method] = {"pearson_mean": float(np.mean(v)), "pearson_std": float(np.std(v)),
                             "pearson_flattened": float(np.mean(flat.to_numpy(np.float64)))}
            if method not in order:
                order.append(method)
            fms.setdefault(method, set()).add(str(fm))
        per_task[task] = stats
    tasks = list(per_task)
    columns: dict = {}
    for t in tasks:
        for stat in ("pearson_mean", "pearson_std", "pearson_flattened"):
            columns[(t, stat)] = [per_task[t].get(m, {}).get(stat, np.nan) for m in order]
    columns[("average", "pearson_mean")] = [float(np.mean([per_task[t].get(m, {}).get("pearson_mean", np.nan)
                                                           for t in tasks])) for m in order]
    columns[("n_tasks", "")] = [sum(m in per_task[t] for t in tasks) for m in order]
    columns[("fm", "")] = [", ".join(sorted(fms[m])) for m in order]
    columns[("source", "")] = ["this dbk run"] * len(order)
    out = pd.DataFrame(columns, index=pd.Index(order, name="method"))
    if published:
        pub = pd.DataFrame({c: [np.nan] * len(HEST_PUBLISHED) for c in columns},
                           index=pd.Index([f"{m} (published)" for m, _, _ in HEST_PUBLISHED], name="method"))
        pub[("average", "pearson_mean")] = [v for _, v, _ in HEST_PUBLISHED]
        pub[("n_tasks", "")] = 9
        pub[("fm", "")] = [m.split(",")[0] for m, _, _ in HEST_PUBLISHED]
        pub[("source", "")] = [s for _, _, s in HEST_PUBLISHED]
        out = pd.concat([out, pub])
        if len(tasks) < 9:
            logger.info(f"hest_summary: the published numbers average HEST-Benchmark's nine tasks; these runs cover "
                        f"{tasks}, so their 'average' is not comparable with them (compare per task, or run all "
                        "nine).")
    out.columns = pd.MultiIndex.from_tuples(list(out.columns), names=["task", "statistic"])
    return out
