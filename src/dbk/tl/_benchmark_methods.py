"""The methods of :func:`dbk.tl.benchmark`: their registry, the fold they see (:class:`BenchmarkFold`), the built-ins.

A method is a function ``fn(fold) -> DataFrame`` (test tiles x genes) or ``(DataFrame, info dict)``; register one
with :func:`register_method`. The built-ins are the baselines of ``benchmarks/her2st.py`` on the fold's FM features
(``mean``, ``ridge_hest``, ``ridge_cv``, ``ridge_rr``, ``ridge_rr_ctx``, ``mlp``), DiffBulk with the fold's shared
stage-1 model (``diffbulk``, ``diffbulk_gated``, ``diffbulk_ridge``) and the controls (``shuffled``,
``diffbulk_untrained``, ``diffbulk_no_genes``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import SAMPLE_COL, TILES_KEY, TILES_TABLE_KEY
from .._logging import logger
from ._context import SPATIAL_UM_KEY as _SPATIAL_UM_KEY
from ._head_cv import AUTO_CONTEXT_STEPS

FAMILIES = ("baseline", "diffbulk")
STAGE1_KINDS = ("trained", "untrained", "no_genes")
#: ``obsm`` key of the tile centres in µm in :attr:`BenchmarkFold.train` / :attr:`BenchmarkFold.test` (the key a tile
#: table's own centres in µm have, :func:`dbk.tl._context.tile_coords_um`)
SPATIAL_UM_KEY = _SPATIAL_UM_KEY
#: spatial context radius when ``context_um`` is ``None``: this many times the median nearest-neighbour distance
#: (the smaller radius ``fit_diffbulk(fusion="auto")`` tries: the 8 nearest tiles of a square grid)
CONTEXT_SPACING_FACTOR = AUTO_CONTEXT_STEPS[0]


# ---- the fold a method sees -----------------------------------------------------------------------------------------


@dataclass(eq=False)
class BenchmarkFold:
    """One fold of :func:`dbk.tl.benchmark`, as a method sees it: training and test tiles, slides, settings.

    A method is called as ``fn(fold)`` and returns the predictions of the test tiles (a DataFrame indexed like
    ``fold.test.obs_names``, columns ``fold.genes``), optionally with a dict of what it chose (``(df, info)``).

    Attributes
    ----------
    split
        The kind of split (``"loso"``, ``"patient"``, ``"blocks"`` or ``"custom"``).
    name
        The fold's name (the test slide for ``"loso"``, the patient for ``"patient"``, ``"fold<i>"`` ...).
    train, test
        Tile tables of the training and the test tiles (:func:`dbk.pp.concat` of the slides, ``obs_names``
        ``"<slide>:<tile>"``): targets in ``X`` (``fold.genes``, log1p-normalised), ``layers["measured"]``, the FM
        features in ``obsm[fm_key]``, tile centres in ``obsm["spatial"]`` (pixels) and ``obsm["spatial_um"]`` (µm),
        ``obs["sample"]``. ``test.X`` holds the truth, for the evaluation only: a method must use the test tiles'
        features, never their targets. Treat both as read-only (copy before changing them); they are shared by the
        methods of the fold.
    train_slides, test_slides
        ``{name: SpatialData}``: working copies of the slides of the fold (the images shared, the tiles and the tile
        table copied; in ``"blocks"`` splits only the fold's training / test tiles), ready for
        :func:`dbk.tl.fit_diffbulk` and :meth:`dbk.tl.DiffBulk.predict`. Methods may write to their tables (the
        input slides are not touched); they are shared by the methods of the fold.
    genes
        The genes to predict (chosen without the test slides).
    groups
        Training slide of each training tile (for grouped inner cross-validation).
    fm_key
        ``obsm`` key of the foundation-model features.
    seed
        The random seed of the run.
    accelerator
        Where to train (``"auto"``, ``"cpu"``, ``"cuda"`` ...).
    context_um
        The spatial-context radius given to :func:`dbk.tl.benchmark` (``None``: each method that uses context takes
        :meth:`context_radius`, 1.5 x the median distance between neighbouring training tiles).
    options
        The calling method's ``method_kwargs`` entry (set before each call).
    fm_size_px, tile_size_um, tiles_key, table_key, batch_size
        Settings of the run, for :func:`dbk.tl.fit_diffbulk` (``fm_size_px``: the foundation model's input size,
        which :func:`dbk.tl.benchmark` resolves once, the model's own unless given; ``None``: the model's own).
    stage1_settings
        How :meth:`stage1` makes the fold's stage-1 models: ``preset``, ``max_steps``, ``pretrain_kwargs`` and
        ``checkpoint_dir`` of the :func:`dbk.tl.benchmark` call.
    stage1_seconds
        ``{kind: seconds}`` spent making each stage-1 model of the fold (filled by :meth:`stage1`; not counted in
        the methods' times).

    Examples
    --------
    A method reads the training tiles and returns the test tiles' predictions (here each gene's training median):

    >>> def train_median(fold):
    ...     median = np.median(np.asarray(fold.train[:, fold.genes].X), axis=0)
    ...     pred = np.tile(median, (fold.test.n_obs, 1))
    ...     return pd.DataFrame(pred, index=fold.test.obs_names, columns=fold.genes), {"statistic": "median"}
    """

    split: str
    name: str
    train: ad.AnnData
    test: ad.AnnData
    train_slides: dict
    test_slides: dict
    genes: list[str]
    groups: np.ndarray
    fm_key: str
    seed: int
    accelerator: str = "auto"
    context_um: float | None = None
    options: dict = field(default_factory=dict)
    fm_size_px: int | None = None
    tile_size_um: float = 112.0
    tiles_key: str = TILES_KEY
    table_key: str = TILES_TABLE_KEY
    batch_size: int = 32
    stage1_settings: dict = field(default_factory=dict, repr=False)
    stage1_seconds: dict = field(default_factory=dict, repr=False)
    _fm_loader: Callable | None = field(default=None, repr=False)
    _stage1_cache: dict = field(default_factory=dict, repr=False)
    _auto_context: float | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"BenchmarkFold(split={self.split!r}, name={self.name!r}, train={list(self.train_slides)} "
                f"({self.train.n_obs} tiles), test={list(self.test_slides)} ({self.test.n_obs} tiles), "
                f"{len(self.genes)} genes)")

    # ---- the shared models ------------------------------------------------------------------------------------

    def foundation_model(self):
        """The foundation model (a torch module, loaded once per benchmark run) for :func:`dbk.tl.fit_diffbulk`."""
        if self._fm_loader is None:
            raise RuntimeError("This fold has no foundation model attached.")
        return self._fm_loader()

    def stage1(self, kind: str = "trained"):
        """The fold's stage-1 model, made on first use and shared by every method of the fold.

        Parameters
        ----------
        kind
            ``"trained"``: :func:`dbk.tl.fit_pretrainer` on the fold's training slides only (checkpoints in
            ``checkpoint_dir/<fold>`` when :func:`dbk.tl.benchmark` has a ``checkpoint_dir``); ``"untrained"``: the
            same architecture, genes and seed, not trained (the control of what stage-1 training adds);
            ``"no_genes"``: trained on the same tiles without genes (``cond_drop=1.0``: every condition dropped;
            checkpoints in ``checkpoint_dir/<fold>_no_genes``).

        Returns
        -------
        A :class:`~dbk.tl.DiffusionPretrainer` (its EMA network in eval mode). The seconds spent making it are in
        :attr:`stage1_seconds` and are not counted in the calling method's time.
        """
        if kind not in STAGE1_KINDS:
            raise ValueError(f"Unknown stage-1 kind {kind!r}; choose one of {list(STAGE1_KINDS)}.")
        if kind in self._stage1_cache:
            cached = self._stage1_cache[kind]
            if isinstance(cached, BaseException):
                raise RuntimeError(f"The {kind!r} stage-1 model of fold {self.name!r} failed earlier "
                                   f"({type(cached).__name__}: {cached}).") from cached
            return cached
        t0 = time.perf_counter()
        try:
            model = self._make_stage1(kind)
        except Exception as err:
            self._stage1_cache[kind] = err
            raise
        self.stage1_seconds[kind] = time.perf_counter() - t0
        self._stage1_cache[kind] = model
        logger.info(f"benchmark: fold {self.name!r}: stage 1 ({kind}) ready, step {int(model.step)} "
                    f"({self.stage1_seconds[kind]:.1f} s); shared by the DiffBulk methods of the fold.")
        return model

    def _make_stage1(self, kind: str):
        from ..core import fit_pretrainer

        s = self.stage1_settings
        preset = s.get("preset", "auto")
        kwargs = dict(s.get("pretrain_kwargs") or {})
        slides = list(self.train_slides.values())
        if kind == "untrained":
            from ._fit_steps import untrained_pretrainer

            model = untrained_pretrainer(slides, self.genes, preset=preset, random_state=self.seed,
                                         tiles_key=self.tiles_key, table_key=self.table_key,
                                         accelerator=self.accelerator, pretrain_kwargs=kwargs,
                                         tile_size_um=None)
            if model.tile_size_um is None:
                model.tile_size_um = float(self.tile_size_um)
        else:
            if kind == "no_genes":
                kwargs["cond_drop"] = 1.0
            folder = s.get("checkpoint_dir")
            if folder is not None:
                folder = Path(folder) / (_safe_name(self.name) + ("_no_genes" if kind == "no_genes" else ""))
            model = fit_pretrainer(slides, genes=self.genes, preset=preset, max_steps=s.get("max_steps"),
                                   random_state=self.seed, checkpoint_dir=folder, accelerator=self.accelerator,
                                   tiles_key=self.tiles_key, table_key=self.table_key, **kwargs)
        model.ema_net.eval()
        return model

    # ---- helpers for methods ----------------------------------------------------------------------------------

    def context_radius(self) -> float:
        """The spatial-context radius in µm: :attr:`context_um`, or 1.5 x the median nearest-neighbour distance.

        The distance is between tile centres of the same training slide (never the test slides).

        Returns
        -------
        float
            The radius in µm (computed once per fold).

        Raises
        ------
        ValueError
            If ``context_um`` is ``None`` and the training tiles have no spacing in µm (pixel sizes unknown, or one
            tile per slide).
        """
        if self.context_um is not None:
            return float(self.context_um)
        if self._auto_context is None:
            from ._context import tile_spacing_um

            spacing = tile_spacing_um(self.train.obsm[SPATIAL_UM_KEY], self.groups)
            if spacing is None:
                raise ValueError(f"Fold {self.name!r}: no spacing between training tiles in µm (pixel sizes unknown, "
                                 "or one tile per slide); pass context_um= to dbk.tl.benchmark.")
            self._auto_context = CONTEXT_SPACING_FACTOR * spacing
        return self._auto_context

    def with_context(self, adata: ad.AnnData, context_um: float, key: str | None = None) -> tuple[ad.AnnData, str]:
        """A copy of ``train`` / ``test`` with ``[FM features, their mean within context_um]`` per slide.

        The computation of :func:`dbk.tl.spatial_context` and ``fit_diffbulk(..., context_um=)``; the mean is over
        the tiles of the same slide (``obs["sample"]``) whose centres (``obsm["spatial_um"]``) lie within
        ``context_um``.

        Parameters
        ----------
        adata
            :attr:`train` or :attr:`test` (not changed).
        context_um
            Radius of the neighbourhood in µm (e.g. :meth:`context_radius`).
        key
            ``obsm`` key of the new features (``None``: ``f"{fm_key}_ctx"``).

        Returns
        -------
        tuple[anndata.AnnData, str]
            The copy and the ``obsm`` key of its new features (tiles x 2 x FM features, float32).
        """
        from ._context import context_features

        key = key or f"{self.fm_key}_ctx"
        out = adata.copy()
        out.obsm[key] = context_features(np.asarray(adata.obsm[SPATIAL_UM_KEY], np.float64),
                                         np.asarray(adata.obsm[self.fm_key]), context_um,
                                         adata.obs[SAMPLE_COL].astype(str).to_numpy()).astype(np.float32)
        return out, key

    def predict_test(self, model, *, key_added: str = "dbk_pred") -> pd.DataFrame:
        """``model.predict`` on each test slide; the predictions indexed like :attr:`test` (``"<slide>:<tile>"``).

        Parameters
        ----------
        model
            A fitted model with DiffBulk's ``predict(sdata, *, tiles_key, table_key, key_added, batch_size)``, e.g.
            the :class:`~dbk.tl.DiffBulk` of :func:`dbk.tl.fit_diffbulk` on :attr:`train_slides`.
        key_added
            ``obsm`` key the predictions are written to in each test slide's tile table.

        Returns
        -------
        pandas.DataFrame
            Test tiles x the model's genes, index ``"<slide>:<tile>"`` as :attr:`test`'s ``obs_names``.
        """
        frames = []
        for name, sd in self.test_slides.items():
            model.predict(sd, tiles_key=self.tiles_key, table_key=self.table_key, key_added=key_added,
                          batch_size=self.batch_size)
            df = sd.tables[self.table_key].obsm[key_added].copy()
            df.index = pd.Index([f"{name}:{o}" for o in df.index])
            frames.append(df)
        return pd.concat(frames)


def _safe_name(name: str) -> str:
    """A fold name usable as a folder name."""
    return re.sub(r"[^0-9A-Za-z._+-]+", "_", str(name)).strip("._") or "fold"


# ---- the registry ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkMethod:
    """A registered method: its function, family (``"baseline"`` or ``"diffbulk"``) and description."""

    name: str
    fn: Callable[[BenchmarkFold], Any]
    family: str
    description: str
    builtin: bool = False


_METHODS: dict[str, BenchmarkMethod] = {}


def register_method(
    name: str,
    fn: Callable[[BenchmarkFold], Any],
    *,
    description: str,
    family: str = "baseline",
    overwrite: bool = False,
) -> None:
    """Add a method to :func:`dbk.tl.benchmark`'s registry.

    Parameters
    ----------
    name
        The method's name (``methods=[..., name]``; the predictions go to ``obsm[f"{key_added}_{name}"]``).
    fn
        ``fn(fold: BenchmarkFold)`` returning the predictions of the test tiles: a DataFrame (index
        ``fold.test.obs_names``, columns ``fold.genes``), or ``(DataFrame, info)`` with a dict of what the method
        chose (kept in ``results.attrs["info"]``). Fit on ``fold.train`` (or ``fold.train_slides``) only. An
        ``info["cv_pearson"]`` (a Series gene -> score from the training slides, as :attr:`DiffBulk.cv_pearson`) is
        compared with the test Pearson (metric ``cv_score_spearman``) and kept in ``results.attrs["cv_pearson"]``.
    description
        One line on what the method is (shown by :func:`dbk.tl.benchmark_methods`).
    family
        ``"baseline"`` or ``"diffbulk"`` (a method that uses the fold's stage-1 model, ``fold.stage1()``: trained
        once per fold and shared by every such method).
    overwrite
        Replace a method already registered under ``name`` (else that is an error).

    Examples
    --------
    >>> def ridge_pca64(fold):
    ...     model = dbk.tl.fit_baseline(fold.train, "ridge_cv", use_rep=fold.fm_key, genes=fold.genes,
    ...                                 groups=fold.groups, n_components=64)
    ...     return model.predict(fold.test)
    >>> dbk.tl.register_method("ridge_pca64", ridge_pca64, description="ridge_cv on 64 PCs")  # doctest: +SKIP
    >>> dbk.tl.benchmark(slides, methods=["mean", "ridge_cv", "ridge_pca64"])  # doctest: +SKIP
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ValueError(f"A method name must be a non-empty string of letters, digits and _.+-, got {name!r}.")
    if not callable(fn):
        raise TypeError(f"fn must be callable (fn(fold) -> DataFrame), got {type(fn).__name__}.")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}.")
    if not isinstance(description, str) or not description.strip():
        raise ValueError("description must be a non-empty string.")
    if name in _METHODS and not overwrite:
        raise ValueError(f"A method {name!r} is already registered ({_METHODS[name].description}); pass "
                         "overwrite=True to replace it.")
    _METHODS[name] = BenchmarkMethod(name, fn, family, description.strip(), builtin=False)


def benchmark_methods() -> pd.DataFrame:
    """The methods :func:`dbk.tl.benchmark` can run.

    Returns
    -------
    DataFrame with one row per registered method (built-ins first, in registration order) and the columns
    ``name``, ``family`` (``"baseline"`` or ``"diffbulk"``: uses the fold's shared stage-1 model) and
    ``description``.

    Examples
    --------
    >>> dbk.tl.benchmark_methods()  # doctest: +SKIP
    """
    return pd.DataFrame([{"name": m.name, "family": m.family, "description": m.description}
                         for m in _METHODS.values()], columns=["name", "family", "description"])


def get_method(name: str) -> BenchmarkMethod:
    if name not in _METHODS:
        raise ValueError(f"Unknown benchmark method {name!r}; registered: {', '.join(_METHODS)}.")
    return _METHODS[name]


def _builtin(name: str, fn: Callable, description: str, family: str = "baseline") -> None:
    _METHODS[name] = BenchmarkMethod(name, fn, family, description, builtin=True)


# ---- the built-in methods -------------------------------------------------------------------------------------------


def _model_info(model) -> dict:
    """What a fitted baseline or head chose (alpha, rank, PCA components, best epoch)."""
    info: dict = {}
    alpha = getattr(model, "alpha_", None)
    if alpha is not None:
        info["alpha"] = float(alpha) if np.ndim(alpha) == 0 else float(np.median(alpha))
    if getattr(model, "rank_", None) is not None:
        info["rank"] = int(model.rank_)
    if getattr(model, "n_components_", None):
        info["pca"] = int(model.n_components_)
    if getattr(model, "best_epoch_", None) is not None and int(model.best_epoch_) >= 0:
        info["best_epoch"] = int(model.best_epoch_) + 1
    return info


def _fit_predict(fold: BenchmarkFold, method: str, train: ad.AnnData, test: ad.AnnData, use_rep: str,
                 kwargs: dict) -> tuple[pd.DataFrame, dict]:
    from ._baselines import fit_baseline

    kwargs = dict(kwargs)
    if method != "mean":
        kwargs.setdefault("random_state", fold.seed)
    if method == "mlp":
        kwargs.setdefault("accelerator", fold.accelerator)
    model = fit_baseline(train, method, use_rep=use_rep, genes=fold.genes, groups=fold.groups, **kwargs)
    return model.predict(test), _model_info(model)


def _baseline(method: str, **defaults) -> Callable[[BenchmarkFold], tuple[pd.DataFrame, dict]]:
    def fn(fold: BenchmarkFold):
        return _fit_predict(fold, method, fold.train, fold.test, fold.fm_key, {**defaults, **fold.options})

    fn.__name__ = f"benchmark_{method}"
    return fn


def _ridge_rr_ctx(fold: BenchmarkFold):
    """ridge_cv (reduced rank) on FM features and their mean within the context radius (per slide)."""
    options = dict(fold.options)
    radius = options.pop("context_um", None) or fold.context_radius()  # method_kwargs may set this method's radius
    train, key = fold.with_context(fold.train, radius)
    test, _ = fold.with_context(fold.test, radius, key)
    pred, info = _fit_predict(fold, "ridge_cv", train, test, key, {"rank": "auto", **options})
    return pred, {"context_um": radius, **info}


def _shuffled(fold: BenchmarkFold):
    """ridge_cv on training targets permuted across all training tiles (the noise floor)."""
    rng = np.random.default_rng([fold.seed, *map(ord, fold.name)])  # the same fold -> the same permutation
    perm = rng.permutation(fold.train.n_obs)
    train = fold.train.copy()
    train.X = fold.train.X[perm]
    for layer in [k for k in train.layers if k is not None]:
        train.layers[layer] = fold.train.layers[layer][perm]
    return _fit_predict(fold, "ridge_cv", train, fold.test, fold.fm_key, dict(fold.options))


def _diffbulk(kind: str = "trained", *, context: bool = False, **head) -> Callable:
    """DiffBulk (``fit_diffbulk`` + ``predict``) on the fold's slides with the fold's stage-1 model of ``kind``."""

    def fn(fold: BenchmarkFold):
        from ._fit import fit_diffbulk

        pre = fold.stage1(kind)
        kwargs = dict(head)
        info: dict = {}
        if context and "context_um" not in fold.options:
            kwargs["context_um"] = info["context_um"] = fold.context_radius()
        kwargs.update(fold.options)
        model = fit_diffbulk(fold.train_slides, genes=fold.genes, fm=fold.foundation_model(),
                             fm_size_px=fold.fm_size_px, pretrainer=pre, tile_size_um=fold.tile_size_um,
                             tiles_key=fold.tiles_key, table_key=fold.table_key, batch_size=fold.batch_size,
                             accelerator=fold.accelerator, random_state=fold.seed, **kwargs)
        pred = fold.predict_test(model)
        cfg = model.config
        info.update(stage1=kind, stage1_steps=int(pre.step), fusion=cfg.get("fusion"))
        if cfg.get("context_um") is not None:
            info["context_um"] = float(cfg["context_um"])
        info.update(_model_info(model.head))
        if model.cv_pearson is not None:  # the per-gene CV scores: benchmark compares them with the test Pearson
            info["cv_pearson"] = model.cv_pearson
        if model.cv_trusted is not None:
            info["trusted_genes"] = [g for g, t in model.cv_trusted.items() if t]
        sel = cfg.get("head_selection")
        if sel:
            info["head"] = sel["chosen"]
            if sel.get("trust"):
                info["trust_scheme"] = sel["trust"]["scheme"]
        if model.effective_rank:
            info["train_effective_rank"] = int(model.effective_rank["predictions"])
        return pred, info

    fn.__name__ = f"benchmark_diffbulk_{kind}"
    return fn


_builtin("mean", _baseline("mean"), "training mean of each gene (the floor; its correlations are undefined)")
_builtin("ridge_hest", _baseline("ridge_hest"),
         "HEST-Benchmark ridge: StandardScaler, PCA 256, alpha = 100 / (256 * n_genes), no intercept (its MSE/MAE "
         "are not comparable)")
_builtin("ridge_cv", _baseline("ridge_cv"),
         "StandardScaler + ridge on FM features, alpha from logspace(-2, 8, 21) by inner CV grouped by training slide")
_builtin("ridge_rr", _baseline("ridge_cv", rank="auto"),
         "ridge_cv with reduced-rank targets (target PCA rank and alpha by the same inner CV)")
_builtin("ridge_rr_ctx", _ridge_rr_ctx,
         "ridge_rr on FM features and their mean within context_um (default 1.5 x the median distance between "
         "neighbouring training tiles): the DiffBulk ridge head without diffusion features")
_builtin("mlp", _baseline("mlp"),
         "MLP on FM features (256 hidden, GELU, dropout 0.1, AdamW, early stopping on held-out training slides)")
_builtin("shuffled", _shuffled,
         "control: ridge_cv on training targets permuted across all training tiles (the noise floor)")
_builtin("diffbulk", _diffbulk("trained"),
         "DiffBulk (fit_diffbulk with its default head) on the fold's stage-1 model", family="diffbulk")
_builtin("diffbulk_gated", _diffbulk("trained", fusion="gated"),
         "DiffBulk, gated residual fusion of FM and diffusion features", family="diffbulk")
_builtin("diffbulk_ridge", _diffbulk("trained", context=True, fusion="ridge", rank="auto"),
         "DiffBulk, reduced-rank ridge head on FM + diffusion features and their mean within context_um",
         family="diffbulk")
_builtin("diffbulk_untrained", _diffbulk("untrained"),
         "control: DiffBulk's default head on the features of an untrained U-Net (same architecture and seed)",
         family="diffbulk")
_builtin("diffbulk_no_genes", _diffbulk("no_genes"),
         "control: DiffBulk's default head on a stage-1 model trained without genes (cond_drop=1.0)",
         family="diffbulk")
