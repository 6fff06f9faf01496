"""The stage-2 heads on foundation-model features ``z_fm`` and diffusion features ``z_diff``, and :func:`fit_head`.

:class:`FusionRegressor` trains a :class:`~dbk.core._heads.FusionHead` (neural fusions), :class:`RidgeFusionRegressor`
is the linear head (``fusion="ridge"``). Both save and rebuild with ``get_state()`` / ``from_state(...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
from torch import nn

from .._constants import DIFF_FEATURES_KEY, SPATIAL_KEY
from .._logging import inner_fits, logger
from .._utils import renamed_kwargs
from ..core._heads import FUSIONS, FusionHead
from ._head_base import resolve_use_rep
from ._head_state import none
from ._ridge import RidgeBaseline, cv_folds, cv_history
from ._torch_head import TorchRegressor

DIFFBULK_FUSIONS = (*FUSIONS, "ridge")  # what fit_head / fit_diffbulk accept: the neural ones and the linear head
# options of RidgeFusionRegressor
RIDGE_OPTIONS = ("alphas", "alpha_per_gene", "n_splits", "random_state", "rank", "ranks", "blend")
BLENDS = ("early", "late")
BLEND_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))  # the FM block's weights late fusion tries


class FusionRegressor(TorchRegressor):
    """A :class:`FusionHead` trained on ``obsm`` features like :class:`dbk.tl.MLPBaseline`.

    Same options (``hidden``, ``dropout``, ``lr``, ..., ``val_fraction``, ``random_state``, ``accelerator``,
    ``input_clip``) plus ``fusion``: standardised inputs and targets, AdamW, masked MSE, early stopping on held-out
    training slides.

    Parameters
    ----------
    fusion
        How the two feature sets meet: ``"gated"``, ``"concat"``, ``"add"`` or ``"film"`` (see
        :class:`~dbk.tl.FusionHead`).
    **kwargs
        The options of :class:`~dbk.tl.MLPBaseline` (``hidden``, ``dropout``, ``lr``, ``weight_decay``,
        ``batch_size``, ``max_epochs``, ``patience``, ``val_fraction``, ``random_state``, ``accelerator``,
        ``input_clip``, ``scale_inputs``).
    """

    name = "fusion_head"

    def __init__(self, *, fusion: str = "gated", **kwargs) -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {fusion!r}; options: {', '.join(map(repr, FUSIONS))}.")
        super().__init__(**kwargs)
        self.fusion = fusion

    @renamed_kwargs(obsm_key="use_rep")
    def fit(
        self,
        adata: ad.AnnData,
        *,
        use_rep: str | None = None,
        diff_key: str = DIFF_FEATURES_KEY,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        groups: str | Sequence | None = None,
    ) -> FusionRegressor:
        """Fit on FM features ``obsm[use_rep]`` and diffusion features ``obsm[diff_key]`` of training tiles.

        Early stopping on held-out training slides (``groups``), as :meth:`dbk.tl.MLPBaseline.fit`.

        Parameters
        ----------
        adata
            Training tiles: FM features in ``obsm[use_rep]``, diffusion features in ``obsm[diff_key]``, targets in
            ``X`` (or ``layer``), optional ``layers["measured"]``.
        use_rep
            The FM features' ``obsm`` key (e.g. ``"X_efficientnet_lite0"``); default the only embedding in ``obsm``
            besides ``diff_key``.
        diff_key
            The diffusion features' ``obsm`` key (:func:`dbk.tl.diffusion_features`).
        genes
            Genes to predict; default all of the table.
        layer
            Layer with the targets (``X``: log1p-normalised, when ``None``).
        groups
            Slide of each tile (``obs`` column name or array), for inner validation splits; default
            ``obs["sample"]`` when it has several slides.

        Returns
        -------
        self
        """
        if diff_key not in adata.obsm:
            raise KeyError(f"No diffusion features adata.obsm[{diff_key!r}] (obsm keys: {list(adata.obsm)}).")
        use_rep = resolve_use_rep(adata, use_rep, exclude=(diff_key,))
        return self._fit_keys(adata, [use_rep, diff_key], genes, layer, groups)

    def _build(self, dims: list[int], n_genes: int) -> nn.Module:
        if len(dims) != 2:
            raise ValueError(f"a fusion head takes two feature sets, got widths {dims}")
        return FusionHead(dims[0], dims[1], n_genes, fusion=self.fusion, hidden=self.hidden, dropout=self.dropout)

    @classmethod
    def _state_options(cls, config) -> dict:
        return super()._state_options(config) | {"fusion": config["fusion"]}

    def _state_config(self) -> dict:
        return {"fusion": self.fusion, **super()._state_config()}


class RidgeFusionRegressor(RidgeBaseline):
    """The linear fused head (``fusion="ridge"``): ridge regression on ``[z_fm; z_diff]``, alpha by inner CV.

    The two feature blocks are concatenated and fitted exactly as :class:`dbk.tl.RidgeBaseline` ``flavor="cv"``
    (``fit_baseline(..., "ridge_cv")``) fits one block: standardised features, an intercept, ``alpha`` chosen from
    ``alphas`` (default ``logspace(-2, 8, 21)``) by inner cross-validation on the training tiles, folds by slide
    (``groups`` / ``obs["sample"]``; spatial stripes with one slide), one alpha for all genes unless
    ``alpha_per_gene``; genes measured on only some training tiles are fitted on those tiles. On small data (a few
    hundred to a few thousand tiles) it is a stronger head than the MLP fusions, which overfit.

    After fitting, the model is kept as plain arrays (:attr:`x_mean_`, :attr:`x_scale_`, :attr:`coef_`,
    :attr:`intercept_`) and predicts ``((x - x_mean_) / x_scale_) @ coef_.T + intercept_`` in float64, so a saved and
    reloaded head (:meth:`dbk.tl.DiffBulk.save`, :meth:`get_state` / :meth:`from_state`) gives the same numbers.

    Parameters
    ----------
    alphas
        The alpha grid (default ``numpy.logspace(-2, 8, 21)``).
    alpha_per_gene
        Choose one alpha per gene instead of one for all.
    n_splits
        Number of inner folds (at most the number of slides).
    random_state
        Seed (of random folds, used only with one slide and no ``obsm["spatial"]``).
    rank, ranks
        Reduced-rank ridge (see :class:`dbk.tl.RidgeBaseline`): ``None`` (plain ridge), a target rank, or ``"auto"``
        (chosen from ``ranks`` jointly with alpha by the inner CV).
    blend
        ``"early"`` (default): one ridge on the concatenated blocks, one alpha (and rank) for all features.
        ``"late"``: one ridge per block, each with its own alpha and rank by inner CV, and the prediction
        ``w * pred_fm + (1 - w) * pred_diff`` with the FM weight ``w`` (0, 0.1, ..., 1) chosen by the same inner folds
        (fixed alphas and ranks, lowest mean validation MSE / training variance). With one shared penalty the larger
        FM block sets alpha and shrinks the diffusion block away; late fusion keeps each block's own penalty (on
        her2st B4 with GPU-trained stage-1 features: 0.154 mean Pearson against 0.134 early, ``docs/benchmarks.md``).
        The blend is itself linear, so the fitted model is the same kind of arrays and saves exactly.

    Attributes
    ----------
    x_mean_, x_scale_
        Standardisation of the concatenated features (training mean and standard deviation; 1 where constant).
    coef_
        Coefficients, genes x (FM + diffusion features), on the standardised features.
    intercept_
        Intercept per gene.
    alpha_
        The chosen alpha (array per gene with ``alpha_per_gene``).
    rank_
        The target rank used (``None``: full rank).
    cv_results_
        DataFrame (index alpha, or (rank, alpha) with ``rank``; rank 0 is full rank) with ``score``: the mean over
        genes of the validation MSE / training variance.
    cv_scheme_
        The inner folds, e.g. ``"5-fold by slide"``.
    history_
        ``{"alpha": [...], "rank": [...], "cv_score": [...]}`` (the inner-CV curve; rank 0 is full rank; for
        ``blend="late"`` the FM block's).
    blend_weight_, block_alpha_, block_rank_, blend_cv_
        ``blend="late"`` only: the FM block's weight, each block's alpha and rank (``None``: full), and the inner-CV
        score of each weight of :data:`BLEND_WEIGHTS`.
    """

    name = "fusion_ridge"
    fusion = "ridge"
    OPTIONS = RIDGE_OPTIONS

    def __init__(
        self,
        *,
        alphas: Sequence[float] | None = None,
        alpha_per_gene: bool = False,
        n_splits: int = 5,
        random_state: int | None = None,
        rank: int | str | None = None,
        ranks: Sequence[int | None] | None = None,
        blend: str = "early",
    ) -> None:
        super().__init__("cv", alphas=alphas, alpha_per_gene=alpha_per_gene, n_splits=n_splits,
                         random_state=random_state, rank=rank, ranks=ranks)
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}.")
        if blend == "late" and alpha_per_gene:
            raise ValueError("blend='late' fits one alpha per feature block; alpha_per_gene=True is not supported.")
        self.blend = blend
        self.name = "fusion_ridge"

    @renamed_kwargs(obsm_key="use_rep")
    def fit(
        self,
        adata: ad.AnnData,
        *,
        use_rep: str | None = None,
        diff_key: str = DIFF_FEATURES_KEY,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        groups: str | Sequence | None = None,
    ) -> RidgeFusionRegressor:
        """Fit on FM features ``obsm[use_rep]`` and diffusion features ``obsm[diff_key]`` of training tiles.

        Alpha (and rank, and blend weight) by inner cross-validation grouped by ``groups``, as
        :meth:`dbk.tl.RidgeBaseline.fit`.

        Parameters
        ----------
        adata
            Training tiles: FM features in ``obsm[use_rep]``, diffusion features in ``obsm[diff_key]``, targets in
            ``X`` (or ``layer``), optional ``layers["measured"]``.
        use_rep
            The FM features' ``obsm`` key (e.g. ``"X_efficientnet_lite0"``); default the only embedding in ``obsm``
            besides ``diff_key``.
        diff_key
            The diffusion features' ``obsm`` key (:func:`dbk.tl.diffusion_features`).
        genes
            Genes to predict; default all of the table.
        layer
            Layer with the targets (``X``: log1p-normalised, when ``None``).
        groups
            Slide of each tile (``obs`` column name or array), for inner validation splits; default
            ``obs["sample"]`` when it has several slides.

        Returns
        -------
        self
        """
        if diff_key not in adata.obsm:
            raise KeyError(f"No diffusion features adata.obsm[{diff_key!r}] (obsm keys: {list(adata.obsm)}).")
        use_rep = resolve_use_rep(adata, use_rep, exclude=(diff_key,))
        return self._fit_keys(adata, [use_rep, diff_key], genes, layer, groups)

    def _fit(self, xs, y, m, groups, adata) -> None:
        if self.blend == "late":
            self._fit_late(xs, y, m, groups, adata)
            return
        super()._fit([np.hstack(xs)], y, m, groups, adata)  # one linear map on the concatenated blocks
        self.validation_ = f"alpha by inner CV ({self.cv_scheme_})"
        self.best_epoch_ = -1
        self.history_ = cv_history(self.cv_results_)
        dims = self.n_features_in_
        w = np.abs(self.coef_)
        logger.info(f"{self.name}: mean |coefficient| {w[:, : dims[0]].mean():.3g} on the {dims[0]} FM features, "
                    f"{w[:, dims[0]:].mean():.3g} on the {dims[1]} diffusion features.")

    def _block(self, **kw) -> RidgeBaseline:
        return RidgeBaseline("cv", alphas=kw.get("alphas", self.alphas), n_splits=self.n_splits,
                             random_state=self.random_state, rank=kw.get("rank", self.rank),
                             ranks=None if "rank" in kw else self.ranks)

    def _fit_late(self, xs, y, m, groups, adata) -> None:
        """One ridge per block (own alpha and rank), blended with an FM weight chosen by the inner folds."""
        blocks = []
        for x in xs:
            b = self._block()
            b._fit([x], y, m, groups, adata)
            blocks.append(b)
        spatial = np.asarray(adata.obsm[SPATIAL_KEY], np.float64) if SPATIAL_KEY in adata.obsm else None
        folds, how = cv_folds(groups, spatial, len(y), self.n_splits, self._seed())
        weights = np.asarray(BLEND_WEIGHTS)
        sse, cnt = np.zeros((len(weights), y.shape[1])), np.zeros(y.shape[1])
        for tr, va in folds:
            preds = []
            for x, b in zip(xs, blocks, strict=True):
                fixed = self._block(alphas=[float(b.alpha_)], rank=b.rank_)
                with inner_fits():  # the fold refits' lines are details (DEBUG)
                    fixed._fit([x[tr]], y[tr], m[tr], None if groups is None else groups[tr], adata[tr])
                preds.append(fixed._predict([x[va]]))
            mv = m[va]
            for i, w in enumerate(weights):
                err = (y[va] - (w * preds[0] + (1 - w) * preds[1])) ** 2
                sse[i] += np.where(mv, err, 0.0).sum(axis=0)
            cnt += mv.sum(axis=0)
        var = np.array([np.var(y[m[:, j], j]) for j in range(y.shape[1])])
        ok = cnt > 0
        score = (sse[:, ok] / cnt[ok] / np.where(var[ok] > 0, var[ok], 1.0)).mean(axis=1)
        w = float(weights[int(np.argmin(score))])
        self.x_mean_ = np.concatenate([b.x_mean_ for b in blocks])
        self.x_scale_ = np.concatenate([b.x_scale_ for b in blocks])
        self.coef_ = np.hstack([w * blocks[0].coef_, (1 - w) * blocks[1].coef_])
        self.intercept_ = w * blocks[0].intercept_ + (1 - w) * blocks[1].intercept_
        self.n_components_ = None
        self.blend_weight_ = w
        self.block_alpha_ = [float(b.alpha_) for b in blocks]
        self.block_rank_ = [b.rank_ for b in blocks]
        self.blend_cv_ = [float(v) for v in score]
        # the FM block's inner-CV curve stands for the head's (alpha_, rank_, cv_results_ as for blend="early")
        self.alpha_, self.rank_, self.cv_results_, self.cv_scheme_ = (blocks[0].alpha_, blocks[0].rank_,
                                                                      blocks[0].cv_results_, how)
        self.validation_ = f"alphas, ranks and blend weight by inner CV ({how})"
        self.best_epoch_ = -1
        self.history_ = cv_history(self.cv_results_)
        logger.info(f"{self.name}: late fusion, FM weight {w:g} (inner-CV scores {np.round(score, 4).tolist()}); "
                    f"alphas {self.block_alpha_}, ranks {self.block_rank_}.")

    # ---- state ----------------------------------------------------------------------------------------------------

    @classmethod
    def _state_options(cls, config) -> dict:
        return cls._ridge_options(config) | {"blend": config.get("blend", "early")}

    def _state_config(self) -> dict:
        late = {"blend_weight": self.blend_weight_, "block_alpha": self.block_alpha_,
                "block_rank": [0 if r is None else int(r) for r in self.block_rank_],  # 0: full rank
                "blend_cv": self.blend_cv_} if self.blend == "late" else {}
        return {"fusion": "ridge", **super()._state_config(), "best_epoch": -1, "validation": self.validation_,
                **late}

    def _restore(self, config, tensors, *, device, history, config_file, tensor_file) -> None:
        super()._restore(config, tensors, device=device, history=history, config_file=config_file,
                         tensor_file=tensor_file)
        self.validation_ = config.get("validation")
        self.best_epoch_ = -1
        self.history_ = cv_history(self.cv_results_) if history is None else dict(history)
        if self.blend == "late":
            try:
                self.blend_weight_ = float(config["blend_weight"])
                self.block_alpha_ = [float(a) for a in config["block_alpha"]]
                self.block_rank_ = [None if none(r) in (None, 0) else int(r) for r in config["block_rank"]]
                self.blend_cv_ = [float(v) for v in config["blend_cv"]]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{config_file}: invalid late-fusion settings ({err}).") from None


@renamed_kwargs(adata_train="adata", obsm_key="use_rep")
def fit_head(
    adata: ad.AnnData,
    *,
    use_rep: str | None = None,
    diff_key: str = DIFF_FEATURES_KEY,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    groups: str | Sequence | None = None,
    fusion: str = "gated",
    **kwargs,
) -> FusionRegressor | RidgeFusionRegressor:
    """Train the stage-2 fusion head on FM and diffusion features of training tiles.

    Returns the fitted :class:`FusionRegressor`, or :class:`RidgeFusionRegressor` for ``fusion="ridge"``
    (``.predict(adata)`` -> tiles x genes DataFrame).

    Parameters
    ----------
    adata
        Training tiles with ``obsm[use_rep]`` (FM) and ``obsm[diff_key]`` (diffusion features).
    use_rep
        The FM features' ``obsm`` key; default the only other embedding in ``obsm``.
    diff_key
        Diffusion features.
    genes, layer, groups
        See :meth:`dbk.tl.MLPBaseline.fit`.
    fusion
        ``"gated"``, ``"concat"``, ``"add"`` or ``"film"`` (a :class:`FusionHead` trained by gradient descent), or
        ``"ridge"`` (:class:`RidgeFusionRegressor`: ridge on the concatenated features, alpha by inner CV).
    **kwargs
        Training options of :class:`dbk.tl.MLPBaseline` (``hidden``, ``dropout``, ``lr``, ``max_epochs``,
        ``patience``, ``val_fraction``, ``random_state``, ``accelerator`` ...); for ``"ridge"`` those of
        :class:`RidgeFusionRegressor` (``alphas``, ``alpha_per_gene``, ``n_splits``, ``random_state``, ``rank``,
        ``ranks``).

    Returns
    -------
    The fitted head.
    """
    if fusion == "ridge":
        return RidgeFusionRegressor(**kwargs).fit(adata, use_rep=use_rep, diff_key=diff_key, genes=genes,
                                                  layer=layer, groups=groups)
    return FusionRegressor(fusion=fusion, **kwargs).fit(adata, use_rep=use_rep, diff_key=diff_key, genes=genes,
                                                       layer=layer, groups=groups)
