"""``benchmark``: methods side by side on held-out slides (or spatial blocks), one tidy table of metrics per fold.

The protocol of ``benchmarks/her2st.py`` as a function: the slides are prepared once (tiles, pseudo-bulk, FM
embeddings, as :func:`dbk.tl.fit_diffbulk` does), the folds are drawn (leave one slide out, by patient, given test
sets, or spatial blocks), and each registered method (:func:`dbk.tl.register_method`) is fitted on a fold's training
tiles and evaluated with :func:`dbk.tl.evaluate` on its test tiles. DiffBulk methods share one stage-1 model per fold.
"""

from __future__ import annotations

import copy as _copy
import numbers
import os
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import SAMPLE_COL, SPATIAL_KEY, TILES_KEY, TILES_TABLE_KEY, UM_PER_PX_KEY, UNS_KEY
from .._logging import logger, once_per_call
from ._benchmark_folds import (
    _block_folds,
    _pixel_size,
    _plan_folds,
    _positive_int,
    _positive_number,
)
from ._benchmark_methods import SPATIAL_UM_KEY, BenchmarkFold, get_method

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from spatialdata import SpatialData

    from ..datasets._hest_bench import HestBenchTask

DEFAULT_METHODS = ("mean", "ridge_cv", "ridge_rr_ctx", "diffbulk", "diffbulk_untrained")
COLUMNS = ["split", "fold", "method", "metric", "value", "seconds"]
# evaluate's per-gene metrics kept in attrs["gene_scores"] (their means over genes are the *_mean_all metrics)
GENE_SCORES = ("pearson", "spearman", "mse", "mae")
# evaluate's summary entries that describe the data, not the predictions (kept in attrs["folds"] instead)
_NOT_METRICS = {"top_k", "n_tiles", "n_genes"}
# the metrics benchmark_summary shows by default, in this order ({k}: the top-k of the run)
_PRED_TMP = "_dbk_benchmark_pred"


@once_per_call
def benchmark(
    data: SpatialData | Sequence[SpatialData] | Mapping[str, SpatialData] | HestBenchTask,
    *,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    split: str | Mapping[str, Sequence[str] | Mapping[str, Sequence[str]]] | Sequence[Sequence[str]] | None = None,
    genes: Sequence[str] | None = None,
    n_top_genes: int | None = None,
    top_k: int = 50,
    tile_size_um: float = 112.0,
    fm: str | torch.nn.Module | tuple = "efficientnet_lite0",
    fm_size_px: int | None = None,
    context_um: float | None = None,
    pretrain_steps: int | None = None,
    preset: str = "auto",
    pretrain_kwargs: dict | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    accelerator: str = "auto",
    random_state: int | None = None,
    key_added: str = "dbk_bench",
    method_kwargs: Mapping[str, dict] | None = None,
    patients: Mapping[str, str] | None = None,
    split_kwargs: dict | None = None,
    errors: str = "raise",
    batch_size: int = 32,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
) -> pd.DataFrame:
    """Benchmark methods on held-out slides: one row per (fold, method, metric) of :func:`dbk.tl.evaluate`.

    The slides are prepared once, as :func:`dbk.tl.fit_diffbulk` does (tiles and the pseudo-bulk table where missing,
    :func:`dbk.pp.prepare_slides`; foundation-model embeddings with :func:`dbk.tl.embed_tiles`, which keeps those
    already made by the same model and input size). Then, for each fold, every method is fitted on the fold's
    training tiles only and predicts its test tiles, which :func:`dbk.tl.evaluate` scores (the top-k most variable
    genes chosen on the training tiles). Nothing about the test slides (their values, variance or spacing) is used to
    choose genes, hyper-parameters, context radii or stage-1 models. DiffBulk methods (family ``"diffbulk"``) share
    one stage-1 model per fold (:meth:`BenchmarkFold.stage1`), trained on the fold's training slides only.

    Parameters
    ----------
    data
        A list or ``{name: sdata}`` dict of slides with H&E and expression (names from ``sdata.attrs["sample"]``
        for a list, as :func:`dbk.pp.prepare_slides` names them), or one slide for ``split="blocks"``. Or a
        HEST-Benchmark task (:func:`dbk.datasets.hest_bench`): HEST's protocol, see below.
    methods
        Registered method names (:func:`dbk.tl.benchmark_methods`; add one with :func:`dbk.tl.register_method`).
        Unknown names fail before any work. Default: ``mean``, ``ridge_cv``, ``ridge_rr_ctx``, ``diffbulk`` and the
        control ``diffbulk_untrained`` (DiffBulk's head on the features of an untrained U-Net of the fold's
        architecture, genes and seed: no stage-1 training, only its own head fit; ``diffbulk -
        diffbulk_untrained`` says whether training stage 1 helps at all). ``diffbulk_no_genes`` (a second stage-1
        training per fold, without genes) is the control of the gene conditioning; add it when that is the question.
        For a HEST-Benchmark task the default also runs ``ridge_hest`` (HEST's own probe), after ``mean``.
    split
        ``None`` (default): ``"loso"`` for slides, ``"hest"`` for a HEST-Benchmark task (its split files; the only
        split a task takes). ``"loso"``: leave one slide out (each slide is the test once, the others train).
        ``"patient"``: each patient's slides are the test once, the other patients' slides train (the patient of a
        slide from ``patients`` or ``sdata.attrs["patient"]``). ``"blocks"``: spatial blocks within each slide
        (:func:`dbk.pp.spatial_blocks`): the blocks are dealt into ``n_folds`` folds, each fold's blocks are the
        test tiles and the other tiles of the same slides train (for a single slide). Or the folds themselves: a
        dict ``{"fold name": [test slides]}`` (the other slides train; or ``{"train": [...], "test": [...]}`` as the
        value), or a list of test-slide lists. A fold's training slides never include its test slides, and no slide
        is tested in two folds.
    genes
        Genes to predict; each must be measured on every slide. Default: the genes measured on every slide.
    n_top_genes
        Keep the ``n`` most variable of those genes, chosen per fold on its *training* tiles
        (:func:`dbk.pp.select_genes`), so folds may predict different genes. ``None``: the same genes in every fold.
    top_k
        ``k`` of the top-k HVG summaries (at most the number of genes).
    tile_size_um
        Side of the tiles made on slides without tiles.
    fm
        Foundation model for the features of every method (an id of :func:`dbk.tl.load_foundation_model`, a
        module it returned, or a loaded module with its transform: ``(module, transform)`` or
        :func:`dbk.tl.wrap_fm`, as :func:`dbk.tl.fit_diffbulk` takes it, recorded as user-supplied); loaded once.
    fm_size_px
        Input side of the foundation model in pixels. ``None`` (default): the model's own input size (224 for the
        default EfficientNet-Lite0), read from the model when it is loaded; the size used is in
        ``attrs["settings"]["fm_size_px"]``.
    context_um
        Spatial-context radius (µm) of the methods that use context (``ridge_rr_ctx``, ``diffbulk_ridge``);
        ``None``: 1.5 x the median distance between neighbouring tile centres of each fold's training slides (the
        value used is in ``attrs["info"]``).
    pretrain_steps, preset, pretrain_kwargs
        Stage-1 training of the DiffBulk methods (:func:`dbk.tl.fit_pretrainer`: ``max_steps``, ``preset`` and
        its other arguments or preset overrides, e.g. ``{"image_size": 32}``). The benchmark trains stage 1 also on a
        CPU (``preset="auto"``: ``cpu-small`` x 200 steps), where ``fit_diffbulk``'s default does not: there
        ``diffbulk_untrained`` is what ``fit_diffbulk`` gives with its defaults, and ``diffbulk`` shows what training
        adds.
    checkpoint_dir
        Stage-1 checkpoints of each fold under ``checkpoint_dir/<fold>`` (resumed when present; use a new folder
        when the slides, genes or stage-1 settings change).
    accelerator
        Where methods train and run: ``"auto"``, ``"cpu"``, ``"cuda"`` ... (checked before any work).
    random_state
        Seed of every method, the stage-1 models and the block draw (``None``: ``dbk.settings.seed``).
    key_added
        Prefix of the predictions written to the test slides: ``obsm[f"{key_added}_{method}"]``.
    method_kwargs
        ``{method: {option: value}}``: options passed to a method (``fold.options``), e.g.
        ``{"ridge_cv": {"alphas": [1, 10]}, "diffbulk_gated": {"max_epochs": 50}}`` (for the built-ins: options of
        :func:`dbk.tl.fit_baseline` or :func:`dbk.tl.fit_diffbulk`).
    patients
        ``{slide: patient}`` for ``split="patient"`` (else ``sdata.attrs["patient"]``); the DiffBulk methods' trust
        scores also hold out whole training patients by it (:func:`dbk.tl.fit_diffbulk`'s ``patients``).
    split_kwargs
        For ``split="blocks"``: ``n_folds`` (5), ``n_blocks`` (16, the grid of :func:`dbk.pp.spatial_blocks` per
        slide) and ``buffer_um`` (0: training tiles whose centre lies within this distance of a test tile of the
        fold are left out of its training set).
    errors
        ``"raise"`` (default): a method that fails stops the benchmark. ``"warn"``: its error is logged with a
        traceback summary, a warning names it, it is recorded in ``attrs["failed"]``, and the other methods go on.
    batch_size
        Tiles per forward pass of the feature extractors.
    tiles_key, table_key
        The tiles and their table.

    Returns
    -------
    A tidy DataFrame with columns ``split``, ``fold``, ``method``, ``metric``, ``value`` and ``seconds`` (wall time
    of the method's fit + predict on the fold, without the evaluation and without training the fold's shared
    stage-1 model, whose time is in ``attrs["stage1"]``): one row per metric of :func:`dbk.tl.evaluate`'s summary
    (``pearson_mean_all``, ``pearson_mean_top{k}_hvg``, ``spearman_mean_all``, ``mse_mean_all``, ``mae_mean_all``,
    ``pearson_mean_top{k}_best``, ``spearman_per_tile_mean``, ``pearson_flattened``, ``n_genes_nan_pearson`` ...).
    ``attrs`` holds ``settings``; ``genes`` (the candidate genes); ``folds`` (``{fold: {"train", "test",
    "n_train_tiles", "n_test_tiles", "genes", "hvg"}}``, ``hvg``: the top-k most variable genes of the fold's
    training tiles, those of the ``*_top{k}_hvg`` metrics); ``methods`` (family, description, options); ``info``
    (``{fold: {method: what it chose}}``); ``stage1`` (``{fold: {kind: {"seconds", "steps"}}}``); ``failed`` (one
    record per failure with ``errors="warn"``), ``pred_keys`` (``{method: obsm key}``) and ``cv_pearson``
    (``{fold: {method: {gene: score}}}``, the per-gene CV scores of methods that give them, DiffBulk's among them, made
    on the fold's training slides only; ``pd.Series(...)`` of one gives a Series). For those methods the table also
    has the metric ``cv_score_spearman``: the Spearman correlation over genes between the CV score and the test
    Pearson, i.e. how well the model's own estimate ranks the genes it predicts well on the held-out slide.
    ``gene_scores`` (``{fold: {method: {"pearson" | "spearman" | "mse" | "mae": {gene: value}}}}``) holds the
    per-gene test metrics of :func:`dbk.tl.evaluate` of every method on every fold (NaN where a correlation is
    undefined, e.g. for the ``mean`` predictor): their means over genes are the ``*_mean_all`` rows, and over the
    fold's ``hvg`` genes the ``*_top{k}_hvg`` rows; :func:`dbk.tl.paired_differences` resamples them for an interval
    that one fold alone can give.
    Summarise it with :func:`dbk.tl.benchmark_summary` and :func:`dbk.tl.paired_differences`, plot it with
    :func:`dbk.pl.benchmark`.

    HEST-Benchmark (``data`` a :class:`dbk.datasets.HestBenchTask`): the task's samples become slides
    (:meth:`~dbk.datasets.HestBenchTask.slides`: the patches are the tiles, ``X`` is HEST's target, log1p of the
    raw counts of the task's 50 genes aligned by barcode), the folds are its split files (``"split{i}"`` from
    ``splits/train_{i}.csv`` / ``test_{i}.csv``), the genes its ``var_50genes.json``. Every method then runs as
    above (the foundation model ``fm`` embeds the patches at ``fm_size_px``, by default its own input size;
    DiffBulk's stage 1 trains on them),
    and each (fold, method) gets one more metric, ``pearson_mean_hest``: HEST's per-fold number, ``np.mean`` over
    the genes of each gene's Pearson on the fold's test patches (NaN when a gene's correlation is undefined, as in
    HEST). :func:`dbk.tl.hest_summary` averages it over folds as HEST does (mean, ``np.std`` with ddof 0) beside the
    published numbers; the log ends with that table. ``pearson_flattened`` is the DiffBulk reference code's metric
    (one Pearson over all test tiles and genes). Spatial context uses the patches' positions on their slides, which
    need each sample's source pixel size (:class:`dbk.datasets.HestBenchTask`); without it the run uses no context
    (the context methods leave the default list, with a warning). ``attrs["hest"]`` records the task, its folds,
    genes and the pixel sizes used; ``attrs["split"]`` is ``"hest"``.
    Every ``attrs`` entry is plain Python (dicts, lists, numbers, strings), so the table merges and concatenates like
    any other DataFrame.

    Writes, on the slides given, what :func:`dbk.tl.fit_diffbulk` would prepare (tiles, the tile table and the
    embeddings, where missing) and, on each test slide's tile table, ``obsm[f"{key_added}_{method}"]``: a DataFrame
    (tiles x genes, float32) of the method's held-out predictions, NaN for tiles that were in no fold's test set
    (e.g. buffer tiles in ``"blocks"`` splits). Nothing else of the slides changes: the methods work on copies of the
    tile tables.

    Examples
    --------
    >>> slides = [dbk.datasets.synthetic(random_state=i) for i in range(3)]  # doctest: +SKIP
    >>> res = dbk.tl.benchmark(slides, methods=["mean", "ridge_cv", "diffbulk"], split="loso")  # doctest: +SKIP
    >>> dbk.tl.benchmark_summary(res)  # doctest: +SKIP
    >>> dbk.tl.paired_differences(res, "diffbulk", "ridge_cv")  # doctest: +SKIP
    >>> dbk.pl.benchmark(res, metric="pearson_mean_all")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .._settings import settings
    from .._utils import resolve_seed
    from ..pp._prepare import as_slides, prepare_slides

    settings.apply_threads()  # dbk.settings.n_jobs

    # ---- every argument checked before any work -------------------------------------------------------------------
    from ._benchmark_hest import hest_arguments, hest_task

    task = hest_task(data)
    if task is not None:
        methods = hest_arguments(task, methods=_check_methods(methods), default_methods=methods is DEFAULT_METHODS,
                                 split=split, genes=genes, n_top_genes=n_top_genes, patients=patients,
                                 split_kwargs=split_kwargs, context_um=context_um)
        split, genes = task.folds(), list(task.genes)
    elif split is None:
        split = "loso"
    elif isinstance(split, str) and split == "hest":
        raise ValueError("split='hest' runs a HEST-Benchmark task's split files: pass the task "
                         "(dbk.datasets.hest_bench(...)) as data.")
    names_m = _check_methods(methods)
    specs = [get_method(n) for n in names_m]
    method_kwargs = _check_method_kwargs(method_kwargs, names_m)
    _check_options(errors=errors, top_k=top_k, n_top_genes=n_top_genes, tile_size_um=tile_size_um,
                   context_um=context_um, pretrain_steps=pretrain_steps, batch_size=batch_size, key_added=key_added,
                   preset=preset if any(s.family == "diffbulk" for s in specs) else None, accelerator=accelerator,
                   pretrain_kwargs=pretrain_kwargs, fm_size_px=fm_size_px)
    fm_holder = _FoundationModel(fm, accelerator, size_px=fm_size_px)  # a bad fm fails here; loaded when embedding
    seed = resolve_seed(random_state)
    if task is not None:
        data = task.slides()  # the patches as tiles, HEST's targets in the tables (made once per task)
    raw_slides, names = as_slides(data)
    from .._keys import check_named_keys_of_slides

    check_named_keys_of_slides(raw_slides, names, tiles_key=tiles_key, table_key=table_key, where="benchmark")
    split_name, fold_plan = _plan_folds(split, names, raw_slides, patients=patients, split_kwargs=split_kwargs)
    if task is not None:
        split_name = "hest"

    # the FM's input size: the one given, else the model's own (loads the model, once), checked against the model
    # before the slides are touched; the resolved size is the one embedded at and recorded
    fm_size_px = fm_holder.size_px()

    # ---- the slides, prepared once --------------------------------------------------------------------------------
    slides, names = prepare_slides(data, tile_size_um=tile_size_um, tiles_key=tiles_key, table_key=table_key)
    by_name = dict(zip(names, slides, strict=True))
    for sd, name in zip(slides, names, strict=True):
        fm_holder.embed(sd, name, fm_size_px=fm_size_px, tiles_key=tiles_key, table_key=table_key,
                        batch_size=batch_size)
    cand_genes = _candidate_genes([sd.tables[table_key] for sd in slides], names, genes)
    if split_name == "blocks":
        fold_plan = _block_folds(by_name, table_key, seed=seed, **fold_plan)
    n_tasks = len(fold_plan) * len(specs)
    logger.info(f"benchmark: {len(slides)} slide(s) {names}, split {split_name!r} ({len(fold_plan)} folds), "
                f"{len(cand_genes)} candidate genes, methods {names_m}.")

    rows: list[dict] = []
    attrs: dict = {
        "split": split_name,
        "settings": {"methods": list(names_m), "n_top_genes": n_top_genes, "top_k": int(top_k),
                     "tile_size_um": float(tile_size_um), "fm": fm_holder.id, "fm_key": fm_holder.key,
                     "fm_user_supplied": fm_holder.user_supplied, "fm_size_px": int(fm_size_px),
                     "context_um": context_um, "preset": preset,
                     "pretrain_steps": pretrain_steps, "pretrain_kwargs": dict(pretrain_kwargs or {}),
                     "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
                     "accelerator": accelerator, "random_state": seed, "errors": errors,
                     "split_kwargs": dict(split_kwargs or {}), "key_added": key_added},
        "genes": list(cand_genes),
        "folds": {},
        "methods": {s.name: {"family": s.family, "description": s.description,
                             "options": dict(method_kwargs.get(s.name, {}))} for s in specs},
        "info": {},
        "stage1": {},
        "failed": [],
        "cv_pearson": {},
        "gene_scores": {},
        "pred_keys": {n: f"{key_added}_{n}" for n in names_m},
    }
    if task is not None:
        from ._benchmark_hest import hest_record

        attrs["hest"] = hest_record(task)
    store: dict[tuple[str, str], list[pd.DataFrame]] = {}
    bar = tqdm(total=n_tasks, desc="benchmark", unit="fit", disable=not settings.progress)
    try:
        for i, (fold_name, train_plan, test_plan) in enumerate(fold_plan):
            fold = _make_fold(split_name, fold_name, train_plan, test_plan, by_name, cand_genes,
                              n_top_genes=n_top_genes, seed=seed, accelerator=accelerator, context_um=context_um,
                              fm_holder=fm_holder, fm_size_px=fm_size_px, tile_size_um=tile_size_um,
                              tiles_key=tiles_key, table_key=table_key, batch_size=batch_size, key_added=key_added,
                              stage1_settings={"preset": preset, "max_steps": pretrain_steps,
                                               "pretrain_kwargs": dict(pretrain_kwargs or {}),
                                               "checkpoint_dir": checkpoint_dir}, patients=patients)
            attrs["folds"][fold_name] = {"train": list(fold.train_slides), "test": list(fold.test_slides),
                                         "n_train_tiles": int(fold.train.n_obs), "n_test_tiles": int(fold.test.n_obs),
                                         "genes": list(fold.genes)}
            logger.info(f"benchmark: fold {i + 1}/{len(fold_plan)} {fold_name!r}: train {list(fold.train_slides)} "
                        f"({fold.train.n_obs} tiles), test {list(fold.test_slides)} ({fold.test.n_obs} tiles), "
                        f"{len(fold.genes)} genes.")
            k = min(int(top_k), len(fold.genes))
            truth = _truth(fold.test)
            for spec in specs:
                bar.set_postfix_str(f"{fold_name}: {spec.name}")
                fold.options = dict(method_kwargs.get(spec.name, {}))
                stage1_before = sum(fold.stage1_seconds.values())
                t0 = time.perf_counter()
                try:
                    out = spec.fn(fold)
                    seconds = time.perf_counter() - t0 - (sum(fold.stage1_seconds.values()) - stage1_before)
                    pred, info = _check_output(out, fold, spec.name)
                    truth.obsm[_PRED_TMP] = pred
                    cv = info.pop("cv_pearson", None)
                    summary, per_gene = _evaluate(truth, fold, k, cv=cv)
                    if task is not None:  # HEST's per-fold number first
                        from ._benchmark_hest import HEST_METRIC, pearson_mean_hest

                        summary = {HEST_METRIC: pearson_mean_hest(per_gene["pearson"]), **summary}
                    if cv is not None:
                        attrs["cv_pearson"].setdefault(fold_name, {})[spec.name] = pd.Series(cv, dtype=np.float64)
                except Exception as err:
                    if errors == "raise":
                        raise
                    _record_failure(attrs["failed"], err, split_name, fold_name, spec.name)
                    bar.update(1)
                    continue
                rows += [{"split": split_name, "fold": fold_name, "method": spec.name, "metric": m, "value": v,
                          "seconds": seconds} for m, v in summary.items()]
                attrs["info"].setdefault(fold_name, {})[spec.name] = dict(info)
                attrs["gene_scores"].setdefault(fold_name, {})[spec.name] = {c: per_gene[c] for c in GENE_SCORES}
                attrs["folds"][fold_name].setdefault("hvg", list(per_gene.index[per_gene["hvg"].to_numpy(bool)]))
                for slide in fold.test_slides:
                    part = pred.loc[fold.test.obs[SAMPLE_COL].astype(str).to_numpy() == slide]
                    part = part.set_axis([o[len(slide) + 1:] for o in part.index], axis=0)
                    store.setdefault((slide, spec.name), []).append(part)
                logger.info(f"benchmark: [{fold_name}] {spec.name}: pearson_mean_all "
                            f"{summary.get('pearson_mean_all', float('nan')):.3f}, mse_mean_all "
                            f"{summary.get('mse_mean_all', float('nan')):.4f} ({seconds:.1f} s).")
                bar.update(1)
            attrs["stage1"][fold_name] = {kind: {"seconds": sec, "steps": _steps(fold, kind)}
                                          for kind, sec in fold.stage1_seconds.items()}
            del fold  # the fold's stage-1 models and working copies
    finally:
        bar.close()
    _write_predictions(store, by_name, table_key, key_added)
    out = pd.DataFrame(rows, columns=COLUMNS)
    out.attrs.update(_plain(attrs))  # plain Python: pandas compares attrs in merge / concat (a Series there raises)
    if attrs["failed"]:
        logger.warning(f"benchmark: {len(attrs['failed'])} failed method run(s): "
                       f"{sorted({(f['fold'], f['method']) for f in attrs['failed']})}; see results.attrs['failed'].")
    if task is not None and len(out):
        from ._benchmark_hest import hest_summary

        with pd.option_context("display.width", 250, "display.max_columns", 40):
            table = hest_summary(out).to_string(float_format=lambda v: f"{v:.4f}")
        logger.info(f"benchmark: HEST-Benchmark task {task.name!r} (dbk.tl.hest_summary: mean and np.std over "
                    f"folds of pearson_mean_hest):\n{table}")
    return out


# ---- checks ---------------------------------------------------------------------------------------------------------


def _check_methods(methods) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    names = list(methods)
    if not names:
        raise ValueError("methods is empty; name at least one registered method (dbk.tl.benchmark_methods()).")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"methods must be names of registered methods, got {bad}.")
    if len(set(names)) != len(names):
        raise ValueError(f"methods has duplicates: {names}.")
    for n in names:
        get_method(n)  # ValueError naming the registered ones
    return names


def _check_method_kwargs(method_kwargs, names: list[str]) -> dict[str, dict]:
    if method_kwargs is None:
        return {}
    if not isinstance(method_kwargs, Mapping):
        raise TypeError("method_kwargs must be a dict {method: {option: value}}, got "
                        f"{type(method_kwargs).__name__}.")
    unknown = [m for m in method_kwargs if m not in names]
    if unknown:
        raise ValueError(f"method_kwargs names methods that are not run: {unknown} (methods: {names}).")
    for m, kw in method_kwargs.items():
        if not isinstance(kw, Mapping):
            raise TypeError(f"method_kwargs[{m!r}] must be a dict of options, got {type(kw).__name__}.")
    return {m: dict(kw) for m, kw in method_kwargs.items()}


def _check_options(*, errors, top_k, n_top_genes, tile_size_um, context_um, pretrain_steps, batch_size, key_added,
                   preset, accelerator, pretrain_kwargs=None, fm_size_px=None) -> None:
    from ._embed import resolve_device

    if errors not in ("raise", "warn"):
        raise ValueError(f"errors must be 'raise' or 'warn', got {errors!r}.")
    if not _positive_int(top_k):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if n_top_genes is not None and not _positive_int(n_top_genes):
        raise ValueError(f"n_top_genes must be a positive integer or None, got {n_top_genes!r}.")
    if pretrain_steps is not None and not _positive_int(pretrain_steps):
        raise ValueError(f"pretrain_steps must be a positive integer or None, got {pretrain_steps!r}.")
    if fm_size_px is not None and not _positive_int(fm_size_px):
        raise ValueError(f"fm_size_px must be a positive integer or None (the model's own input size), got "
                         f"{fm_size_px!r}.")
    if not _positive_int(batch_size):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not _positive_number(tile_size_um):
        raise ValueError(f"tile_size_um must be a positive number, got {tile_size_um!r}.")
    if context_um is not None and not _positive_number(context_um):
        raise ValueError(f"context_um must be a positive number of µm or None, got {context_um!r}.")
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    if pretrain_kwargs is not None and not isinstance(pretrain_kwargs, Mapping):
        raise TypeError(f"pretrain_kwargs must be a dict, got {type(pretrain_kwargs).__name__}.")
    if preset is not None:  # an unknown preset, preset field or fit_pretrainer argument fails before any work
        import inspect

        from ..core import fit_pretrainer, get_preset

        fit_args = set(inspect.signature(fit_pretrainer).parameters) - {"data", "preset_overrides"}
        reserved = {"genes", "preset", "max_steps", "random_state", "checkpoint_dir", "accelerator", "tiles_key",
                    "table_key"} & set(pretrain_kwargs or {})
        if reserved:
            raise ValueError(f"pretrain_kwargs sets {sorted(reserved)}, which dbk.tl.benchmark sets itself (use its "
                             "own arguments: preset, pretrain_steps, random_state, checkpoint_dir ...).")
        get_preset(preset, **{k: v for k, v in (pretrain_kwargs or {}).items() if k not in fit_args})
    resolve_device(accelerator)


# ---- data of a fold -------------------------------------------------------------------------------------------------


class _FoundationModel:
    """The run's foundation model: its id and ``obsm`` key now, the module loaded once when first needed.

    ``fm`` is what :func:`dbk.tl.fit_diffbulk` takes: an id, a module, or a module with its transform
    (``(module, transform)`` / :func:`dbk.tl.wrap_fm`, user-supplied). :meth:`size_px` is the input size of the
    run: the one given, else the loaded module's own (as :func:`dbk.tl._fit_steps.load_fm` resolves it).
    """

    def __init__(self, fm, accelerator: str, size_px: int | None = None) -> None:
        import torch

        from ._embed import model_key
        from ._fm_zoo import as_user_fm

        self.accelerator = accelerator
        self._size_given = size_px
        self._size: int | None = None
        user = as_user_fm(fm)
        if user is not None:
            fm = user
        if isinstance(fm, torch.nn.Module):
            self._net = fm
            self.id = str(getattr(fm, "dbk_model", None) or getattr(fm, "pretrained_cfg", {}).get("architecture")
                          or type(fm).__name__)
        elif isinstance(fm, str):
            self._net, self.id = None, fm
        else:
            raise TypeError(f"fm must be a model id, a torch module, or a module with its transform ((module, "
                            f"transform) or dbk.tl.wrap_fm(module, transform)), got {type(fm).__name__}.")
        self.user_supplied = getattr(fm, "dbk_source", None) == "user-supplied"
        self.key = model_key(self.id)

    def __call__(self):
        if self._net is None:
            from ._embed import load_foundation_model, resolve_device

            self._net, _ = load_foundation_model(self.id, device=resolve_device(self.accelerator))
        return self._net

    def size_px(self) -> int:
        """The input side of the run: the ``fm_size_px`` given, else the model's own (the model is loaded for it)."""
        if self._size is None:
            from ._embed import fm_input_plan, module_data_config

            net = self()
            fm_id = str(getattr(net, "dbk_model", None) or self.id)
            self._size = int(fm_input_plan(module_data_config(net), self._size_given, fm_id)[0])
        return self._size

    def embed(self, sd, name: str, *, fm_size_px: int, tiles_key: str, table_key: str, batch_size: int) -> None:
        """FM embeddings of the slide into ``obsm[key]``.

        :func:`dbk.tl.embed_tiles` keeps embeddings of the same weights (a fingerprint, not the model's name),
        preprocessing and tiles.
        """
        from ._embed import embed_tiles

        embed_tiles(sd, fm=self(), tiles_key=tiles_key, table_key=table_key, fm_size_px=fm_size_px,
                    batch_size=batch_size, accelerator=self.accelerator, key_added=self.key)


def _candidate_genes(tables: list[ad.AnnData], names: list[str], genes) -> list[str]:
    """The given genes (each measured on every slide), or the genes every slide measured (first slide's order)."""
    common = set(tables[0].var_names).intersection(*[set(t.var_names) for t in tables[1:]])
    if genes is None:
        out = [str(g) for g in tables[0].var_names if g in common]
        if not out:
            raise ValueError(f"The slides {names} share no gene; pass genes= measured on every slide.")
        return out
    if isinstance(genes, str):
        genes = [genes]
    out = [str(g) for g in genes]
    if not out:
        raise ValueError("genes is empty.")
    if len(set(out)) != len(out):
        raise ValueError("genes has duplicates.")
    for t, n in zip(tables, names, strict=True):
        missing = [g for g in out if g not in t.var_names]
        if missing:
            raise KeyError(f"{len(missing)} genes are not measured on slide {n!r}: {missing[:10]}; a benchmark needs "
                           "every gene on every slide (the truth of each test slide).")
    return out


def _view(sd, rows: np.ndarray | None, *, tiles_key: str, table_key: str, drop_prefix: str):
    """A working copy of a slide for one fold: its images (shared), the tiles and table rows ``rows`` (copies)."""
    from spatialdata import SpatialData

    from ..pp._tiles import table_rows_to_tiles

    table = sd.tables[table_key]
    sub = (table if rows is None else table[rows]).copy()
    for key in [k for k in sub.obsm if str(k).startswith(drop_prefix)]:
        del sub.obsm[key]
    tiles = sd.shapes[tiles_key]
    pos = table_rows_to_tiles(sd, table_key, tiles_key, np.asarray(tiles.index))
    sub_tiles = tiles.iloc[pos if rows is None else pos[rows]].copy()
    sub_tiles.attrs = _copy.deepcopy(tiles.attrs)  # transformations and dbk's tile geometry
    return SpatialData(images=dict(sd.images), shapes={tiles_key: sub_tiles}, tables={table_key: sub},
                       attrs=dict(sd.attrs))


def _stack(views: dict, genes: list[str], table_key: str) -> ad.AnnData:
    """:func:`dbk.pp.concat` of the views' tables with the tile centres in µm in ``obsm["spatial_um"]``."""
    from ..pp import concat
    from ._context import tile_coords_um

    out = concat(views, genes=genes, table_key=table_key)
    parts = []
    for sd in views.values():
        table = sd.tables[table_key]
        px = _pixel_size(sd, table_key)
        try:  # the table's own positions in µm where it has them (HEST-Benchmark patches), else pixels x size
            xy = (tile_coords_um(table, px) if SPATIAL_UM_KEY in table.obsm
                  or (px is not None and SPATIAL_KEY in table.obsm) else None)
        except ValueError:  # positions unknown (NaN): no spatial context for these tiles
            xy = None
        parts.append(np.full((table.n_obs, 2), np.nan) if xy is None else xy)
        if px is not None:
            table.uns.setdefault(UNS_KEY, {})[UM_PER_PX_KEY] = px  # on the working copy: context needs it
    out.obsm[SPATIAL_UM_KEY] = np.vstack(parts)
    return out


def _make_fold(split_name, fold_name, train_plan, test_plan, by_name, cand_genes, *, n_top_genes, seed, accelerator,
               context_um, fm_holder, fm_size_px, tile_size_um, tiles_key, table_key, batch_size, key_added,
               stage1_settings, patients=None) -> BenchmarkFold:
    from ..pp import select_genes

    def views(plan) -> dict:
        items = plan.items() if isinstance(plan, dict) else ((s, None) for s in plan)
        out = {s: _view(by_name[s], rows, tiles_key=tiles_key, table_key=table_key, drop_prefix=f"{key_added}_")
               for s, rows in items}
        for s, v in out.items():  # the patients given win over attrs: the fits' trust scores hold them out
            if patients and s in patients:
                v.attrs["patient"] = str(patients[s])
        return out

    train_views, test_views = views(train_plan), views(test_plan)
    genes = list(cand_genes)
    if n_top_genes is not None:  # chosen on the training tiles of the fold only
        genes = select_genes([v.tables[table_key][:, genes] for v in train_views.values()], n_top_genes=n_top_genes)
    train = _stack(train_views, genes, table_key)
    test = _stack(test_views, genes, table_key)
    return BenchmarkFold(split=split_name, name=fold_name, train=train, test=test, train_slides=train_views,
                         test_slides=test_views, genes=genes, groups=train.obs[SAMPLE_COL].astype(str).to_numpy(),
                         fm_key=fm_holder.key, seed=seed, accelerator=accelerator, context_um=context_um,
                         fm_size_px=int(fm_size_px), tile_size_um=float(tile_size_um), tiles_key=tiles_key,
                         table_key=table_key, batch_size=int(batch_size), stage1_settings=stage1_settings,
                         _fm_loader=fm_holder)


# ---- one method on one fold -----------------------------------------------------------------------------------------


def _check_output(out, fold: BenchmarkFold, method: str) -> tuple[pd.DataFrame, dict]:
    """The method's predictions as a float DataFrame (test tiles x genes, in order) and its info dict."""
    info: dict = {}
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(f"Method {method!r} returned a tuple that is not (DataFrame, info dict).")
        out, info = out
    if not isinstance(out, pd.DataFrame):
        raise TypeError(f"Method {method!r} must return a DataFrame (test tiles x genes), got {type(out).__name__}.")
    if out.index.has_duplicates or out.columns.has_duplicates:
        raise ValueError(f"Method {method!r} returned predictions with duplicated tiles or genes.")
    cols = pd.Index([str(c) for c in out.columns])
    missing_g = [g for g in fold.genes if g not in cols]
    if missing_g:
        raise ValueError(f"Method {method!r} predicted no column for {len(missing_g)} of the fold's genes: "
                         f"{missing_g[:10]}.")
    missing_t = fold.test.obs_names.difference(out.index)
    if len(missing_t):
        raise ValueError(f"Method {method!r} predicted no row for {len(missing_t)} of the {fold.test.n_obs} test "
                         f"tiles (e.g. {list(missing_t[:3])}); index the predictions by fold.test.obs_names.")
    pred = out.set_axis(cols, axis=1).loc[fold.test.obs_names, list(fold.genes)].astype(np.float32)
    return pred, dict(info)


def _truth(test: ad.AnnData) -> ad.AnnData:
    """The evaluation's table: the test tiles' truth (``X``, ``measured``), nothing else."""
    layers = {k: test.layers[k] for k in test.layers if k == "measured"}
    return ad.AnnData(X=test.X, obs=pd.DataFrame(index=test.obs_names.copy()), var=test.var.copy(), layers=layers)


def _evaluate(truth: ad.AnnData, fold: BenchmarkFold, k: int, cv=None) -> tuple[dict[str, float], pd.DataFrame]:
    """The metrics of :func:`evaluate`'s summary, and ``cv_score_spearman`` for a method with CV scores.

    ``cv``: the method's per-gene CV scores (``info["cv_pearson"]``, made on the training slides); their Spearman
    over genes with the genes' test Pearson. Also returns :func:`evaluate`'s per-gene table (index: the fold's genes).
    """
    from scipy.stats import spearmanr

    from ._evaluate import evaluate

    ev = evaluate(truth, pred_key=_PRED_TMP, genes=fold.genes, top_k=k, train_adata=fold.train, key_added=None)
    out = {m: float(v) for m, v in ev.attrs["summary"].items()
           if m not in _NOT_METRICS and isinstance(v, numbers.Real) and not isinstance(v, bool)}
    if cv is not None:
        both = pd.concat([pd.Series(cv, dtype=np.float64).rename("cv"), ev["pearson"].rename("test")],
                         axis=1, join="inner").dropna()
        out["cv_score_spearman"] = float(spearmanr(both["cv"], both["test"]).statistic) if len(both) > 2 else np.nan
    return out, ev


def _plain(obj):
    """``obj`` with its Series, arrays, tuples and NumPy scalars made lists, dicts and Python numbers (recursively)."""
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, pd.Series):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (np.ndarray, pd.Index)):
        return [_plain(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _record_failure(failed: list, err: Exception, split: str, fold: str, method: str) -> None:
    frames = traceback.extract_tb(err.__traceback__)
    where = "".join(traceback.format_list(frames[-3:])).rstrip()
    message = f"{type(err).__name__}: {err}"
    failed.append({"split": split, "fold": fold, "method": method, "error": message,
                   "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))})
    logger.warning(f"benchmark: method {method!r} failed on fold {fold!r}: {message}\n{where}")
    warnings.warn(f"benchmark: method {method!r} failed on fold {fold!r} ({message}); recorded in "
                  "results.attrs['failed'].", RuntimeWarning, stacklevel=3)


def _steps(fold: BenchmarkFold, kind: str) -> int | None:
    model = fold._stage1_cache.get(kind)
    return None if model is None or isinstance(model, BaseException) else int(model.step)


def _write_predictions(store: dict, by_name: dict, table_key: str, key_added: str) -> None:
    """Each test slide's held-out predictions per method into ``obsm[f"{key_added}_{method}"]``."""
    for (slide, method), frames in store.items():
        table = by_name[slide].tables[table_key]
        cols = list(dict.fromkeys(c for f in frames for c in f.columns))
        df = pd.concat(frames).reindex(index=table.obs_names, columns=cols).astype(np.float32)
        table.obsm[f"{key_added}_{method}"] = df
