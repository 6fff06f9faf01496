"""The stage-2 head: fusion of foundation-model features ``z_fm`` with diffusion features ``z_diff``, gene decoder."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn

from .._constants import DIFF_FEATURES_KEY, SPATIAL_KEY
from .._logging import logger
from ._baselines import RidgeBaseline, TorchRegressor, _masked_mse, gene_decoder, resolve_obsm_key

FUSIONS = ("gated", "concat", "add", "film")  # the fusions of the neural head (:class:`FusionHead`)
DIFFBULK_FUSIONS = (*FUSIONS, "ridge")  # what fit_head / fit_diffbulk accept: the neural ones and the linear head
# options of RidgeFusionRegressor
RIDGE_OPTIONS = ("alphas", "alpha_per_gene", "n_splits", "random_state", "rank", "ranks", "blend")
BLENDS = ("early", "late")
BLEND_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))  # the FM block's weights late fusion tries


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the entries where ``mask`` is 1 (genes measured on the tile).

    Masked entries contribute nothing, whatever they hold (NaN included), to the loss or its gradient; the mean is
    over the unmasked entries (0 when there are none). ``mask=None`` is the plain MSE.
    """
    return _masked_mse(pred, target, mask)


class FusionHead(nn.Module):
    """Fuse ``z_fm`` (foundation model) and ``z_diff`` (frozen diffusion U-Net) and decode genes.

    Fusions (``z`` is then decoded by :func:`gene_decoder`):

    - ``"gated"`` (default, gated residual): ``z = z_fm + sigmoid(W_g [z_fm; z_diff]) * W_d z_diff``;
    - ``"concat"``: ``z = [z_fm; z_diff]``;
    - ``"add"``: ``z = z_fm + W_d z_diff``;
    - ``"film"``: ``z = z_fm * (1 + gamma(z_diff)) + beta(z_diff)``, ``gamma``/``beta`` linear in ``z_diff`` and
      initialised at 0 (the head starts as the FM path).

    ``W_d`` projects ``z_diff`` to ``dim_fm``. With ``W_d`` = 0 the gated and add fusions are exactly the FM path
    ``decoder(z_fm)`` (:meth:`forward_fm`), i.e. the MLP baseline.

    Parameters
    ----------
    dim_fm, dim_diff
        Widths of the two feature vectors.
    n_genes
        Outputs.
    fusion
        One of ``"gated"``, ``"concat"``, ``"add"``, ``"film"``.
    hidden
        Hidden width of the gene decoder (``None`` or 0: linear decoder).
    dropout
        Dropout in the decoder.
    """

    def __init__(
        self,
        dim_fm: int,
        dim_diff: int,
        n_genes: int,
        *,
        fusion: str = "gated",
        hidden: int | None = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {fusion!r}; options: {', '.join(map(repr, FUSIONS))}.")
        for name, v in (("dim_fm", dim_fm), ("dim_diff", dim_diff), ("n_genes", n_genes)):
            if int(v) != v or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        self.fusion = fusion
        self.dim_fm, self.dim_diff, self.n_genes = int(dim_fm), int(dim_diff), int(n_genes)
        if fusion in ("gated", "add"):
            self.proj = nn.Linear(dim_diff, dim_fm)
        if fusion == "gated":
            self.gate = nn.Linear(dim_fm + dim_diff, dim_fm)
        if fusion == "film":
            self.film = nn.Linear(dim_diff, 2 * dim_fm)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        dim = dim_fm + dim_diff if fusion == "concat" else dim_fm
        self.decoder = gene_decoder(dim, n_genes, hidden, dropout)

    def fuse(self, z_fm: torch.Tensor, z_diff: torch.Tensor) -> torch.Tensor:
        """The fused representation ``z`` (before the decoder)."""
        if z_fm.shape[-1] != self.dim_fm or z_diff.shape[-1] != self.dim_diff:
            raise ValueError(f"Expected z_fm (..., {self.dim_fm}) and z_diff (..., {self.dim_diff}), got "
                             f"{tuple(z_fm.shape)} and {tuple(z_diff.shape)}.")
        if self.fusion == "gated":
            g = torch.sigmoid(self.gate(torch.cat([z_fm, z_diff], dim=-1)))
            return z_fm + g * self.proj(z_diff)
        if self.fusion == "add":
            return z_fm + self.proj(z_diff)
        if self.fusion == "film":
            gamma, beta = self.film(z_diff).chunk(2, dim=-1)
            return z_fm * (1 + gamma) + beta
        return torch.cat([z_fm, z_diff], dim=-1)

    def forward(self, z_fm: torch.Tensor, z_diff: torch.Tensor) -> torch.Tensor:
        """Predicted genes, (batch, n_genes)."""
        return self.decoder(self.fuse(z_fm, z_diff))

    def forward_fm(self, z_fm: torch.Tensor) -> torch.Tensor:
        """The FM path alone, ``decoder(z_fm)`` (not defined for ``"concat"``)."""
        if self.fusion == "concat":
            raise ValueError("fusion='concat' has no FM-only path.")
        return self.decoder(z_fm)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion!r}, dim_fm={self.dim_fm}, dim_diff={self.dim_diff}, n_genes={self.n_genes}"


class FusionRegressor(TorchRegressor):
    """A :class:`FusionHead` trained on ``obsm`` features like :class:`dbk.tl.MLPBaseline`.

    Same options plus ``fusion``: standardised inputs and targets, AdamW, masked MSE, early stopping on held-out
    training slides.
    """

    name = "fusion_head"

    def __init__(self, *, fusion: str = "gated", **kwargs) -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {fusion!r}; options: {', '.join(map(repr, FUSIONS))}.")
        super().__init__(**kwargs)
        self.fusion = fusion

    def fit(
        self,
        adata: ad.AnnData,
        *,
        obsm_key: str | None = None,
        diff_key: str = DIFF_FEATURES_KEY,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        groups: str | Sequence | None = None,
    ) -> FusionRegressor:
        """Fit on FM features ``obsm[obsm_key]`` and diffusion features ``obsm[diff_key]`` of training tiles.

        Other parameters as :meth:`dbk.tl.MLPBaseline.fit`.
        """
        if diff_key not in adata.obsm:
            raise KeyError(f"No diffusion features adata.obsm[{diff_key!r}] (obsm keys: {list(adata.obsm)}).")
        obsm_key = resolve_obsm_key(adata, obsm_key, exclude=(diff_key,))
        return self._fit_keys(adata, [obsm_key, diff_key], genes, layer, groups)

    def _build(self, dims: list[int], n_genes: int) -> nn.Module:
        return FusionHead(dims[0], dims[1], n_genes, fusion=self.fusion, hidden=self.hidden, dropout=self.dropout)


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
    reloaded head (:meth:`dbk.tl.DiffBulk.save`) gives the same numbers.

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

    def fit(
        self,
        adata: ad.AnnData,
        *,
        obsm_key: str | None = None,
        diff_key: str = DIFF_FEATURES_KEY,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        groups: str | Sequence | None = None,
    ) -> RidgeFusionRegressor:
        """Fit on FM features ``obsm[obsm_key]`` and diffusion features ``obsm[diff_key]`` of training tiles.

        Other parameters as :meth:`dbk.tl.RidgeBaseline.fit`.

        Returns
        -------
        self
        """
        if diff_key not in adata.obsm:
            raise KeyError(f"No diffusion features adata.obsm[{diff_key!r}] (obsm keys: {list(adata.obsm)}).")
        obsm_key = resolve_obsm_key(adata, obsm_key, exclude=(diff_key,))
        return self._fit_keys(adata, [obsm_key, diff_key], genes, layer, groups)

    def _fit(self, xs, y, m, groups, adata) -> None:
        if self.blend == "late":
            self._fit_late(xs, y, m, groups, adata)
            return
        super()._fit([np.hstack(xs)], y, m, groups, adata)
        self.x_mean_, self.x_scale_, self.coef_, self.intercept_ = _linear_arrays(self, y.shape[1])
        del self._pipe, self._models  # the arrays above are the model (what save writes, load reads)
        self.validation_ = f"alpha by inner CV ({self.cv_scheme_})"
        self.best_epoch_ = -1
        self.history_ = _cv_history(self.cv_results_)
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
        from ._baselines import cv_folds

        blocks = []
        for x in xs:
            b = self._block()
            b.genes_ = self.genes_
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
                fixed.genes_ = self.genes_
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
        arrays = [_linear_arrays(b, y.shape[1]) for b in blocks]
        self.x_mean_ = np.concatenate([a[0] for a in arrays])
        self.x_scale_ = np.concatenate([a[1] for a in arrays])
        self.coef_ = np.hstack([w * arrays[0][2], (1 - w) * arrays[1][2]])
        self.intercept_ = w * arrays[0][3] + (1 - w) * arrays[1][3]
        self.blend_weight_ = w
        self.block_alpha_ = [float(b.alpha_) for b in blocks]
        self.block_rank_ = [b.rank_ for b in blocks]
        self.blend_cv_ = [float(v) for v in score]
        # the FM block's inner-CV curve stands for the head's (alpha_, rank_, cv_results_ as for blend="early")
        self.alpha_, self.rank_, self.cv_results_, self.cv_scheme_ = (blocks[0].alpha_, blocks[0].rank_,
                                                                      blocks[0].cv_results_, how)
        self.validation_ = f"alphas, ranks and blend weight by inner CV ({how})"
        self.best_epoch_ = -1
        self.history_ = _cv_history(self.cv_results_)
        logger.info(f"{self.name}: late fusion, FM weight {w:g} (inner-CV scores {np.round(score, 4).tolist()}); "
                    f"alphas {self.block_alpha_}, ranks {self.block_rank_}.")

    def _predict(self, xs) -> np.ndarray:
        return ((np.hstack(xs) - self.x_mean_) / self.x_scale_) @ self.coef_.T + self.intercept_

    def set_arrays(self, *, x_mean, x_scale, coef, intercept, alpha, cv_alphas, cv_score, cv_ranks=None,
                   rank=None) -> RidgeFusionRegressor:
        """Set the fitted arrays (used by :meth:`dbk.tl.DiffBulk.load`); checks shapes and finiteness.

        Parameters
        ----------
        x_mean, x_scale
            Standardisation, one value per feature.
        coef
            Genes x features.
        intercept
            One per gene.
        alpha
            The chosen alpha: one value, or one per gene (all equal unless :attr:`alpha_per_gene`).
        cv_alphas, cv_score
            The inner-CV curve.
        cv_ranks
            The rank of each point of the curve (0: full rank); default all 0 (plain ridge).
        rank
            The target rank used (``None``: full rank).

        Returns
        -------
        self
        """
        arrs = {k: np.asarray(v, np.float64) for k, v in (("x_mean", x_mean), ("x_scale", x_scale), ("coef", coef),
                                                           ("intercept", intercept), ("alpha", alpha),
                                                           ("cv_alphas", cv_alphas), ("cv_score", cv_score))}
        c = arrs["coef"]
        if c.ndim != 2 or arrs["x_mean"].shape != (c.shape[1],) or arrs["x_scale"].shape != (c.shape[1],) \
                or arrs["intercept"].shape != (c.shape[0],) or arrs["alpha"].shape not in ((), (1,), (c.shape[0],)) \
                or arrs["cv_alphas"].shape != arrs["cv_score"].shape or arrs["cv_alphas"].ndim != 1:
            raise ValueError(f"ridge head arrays of inconsistent shapes: "
                             f"{ {k: tuple(v.shape) for k, v in arrs.items()} }.")
        bad = [k for k in ("x_mean", "x_scale", "coef", "intercept", "alpha") if not np.isfinite(arrs[k]).all()]
        if bad or (arrs["x_scale"] <= 0).any() or (arrs["alpha"] <= 0).any():
            raise ValueError(f"ridge head arrays with non-finite or non-positive values: {bad or ['x_scale/alpha']}.")
        self.x_mean_, self.x_scale_, self.coef_, self.intercept_ = (arrs["x_mean"], arrs["x_scale"], c,
                                                                    arrs["intercept"])
        a = arrs["alpha"].reshape(-1)
        if self.alpha_per_gene:
            self.alpha_ = np.broadcast_to(a, (c.shape[0],)).copy()
        elif (a != a[0]).any():
            raise ValueError("several alphas for a head fitted with one alpha for all genes (alpha_per_gene=False).")
        else:
            self.alpha_ = float(a[0])
        ranks = np.zeros_like(arrs["cv_alphas"]) if cv_ranks is None else np.asarray(cv_ranks, np.float64)
        if ranks.shape != arrs["cv_alphas"].shape or (ranks < 0).any() or (ranks != np.round(ranks)).any():
            raise ValueError(f"ridge head cv_ranks must be {arrs['cv_alphas'].shape[0]} integers >= 0.")
        if rank is not None and (int(rank) != rank or rank <= 0):
            raise ValueError(f"ridge head rank must be a positive integer or None, got {rank!r}.")
        self.rank_ = None if rank is None else int(rank)
        if self.rank is None and not ranks.any():
            index = pd.Index(arrs["cv_alphas"], name="alpha")
        else:
            index = pd.MultiIndex.from_arrays([ranks.astype(int), arrs["cv_alphas"]], names=["rank", "alpha"])
        self.cv_results_ = pd.DataFrame({"score": arrs["cv_score"]}, index=index)
        self.history_ = _cv_history(self.cv_results_)
        self.best_epoch_ = -1
        self.n_components_ = None
        return self


def _linear_arrays(model: RidgeBaseline, n_genes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_mean, x_scale, coef, intercept) of a fitted ``RidgeBaseline("cv")`` without PCA, as one linear map."""
    scaler = model._pipe.named_steps["scaler"]
    coef = np.zeros((n_genes, scaler.mean_.shape[0]))
    intercept = np.zeros(n_genes)
    for genes_j, fitted in model._models:
        coef[genes_j] = np.asarray(fitted.coef_, np.float64).reshape(len(genes_j), -1)
        intercept[genes_j] = np.asarray(fitted.intercept_, np.float64).reshape(len(genes_j))
    return np.asarray(scaler.mean_, np.float64), np.asarray(scaler.scale_, np.float64), coef, intercept


def _cv_history(cv: pd.DataFrame) -> dict[str, list]:
    """The inner-CV curve as lists: ``alpha``, ``rank`` (0: full rank) and ``cv_score``."""
    if isinstance(cv.index, pd.MultiIndex):
        ranks, alphas = cv.index.get_level_values("rank"), cv.index.get_level_values("alpha")
    else:
        alphas, ranks = cv.index, np.zeros(len(cv), int)
    return {"alpha": [float(a) for a in alphas], "rank": [int(r) for r in ranks],
            "cv_score": [float(v) for v in cv["score"]]}


def fit_head(
    adata_train: ad.AnnData,
    *,
    obsm_key: str | None = None,
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
    adata_train
        Training tiles with ``obsm[obsm_key]`` (FM) and ``obsm[diff_key]`` (diffusion features).
    obsm_key
        FM features; default the only other embedding in ``obsm``.
    diff_key
        Diffusion features.
    genes, layer, groups
        See :meth:`dbk.tl.MLPBaseline.fit`.
    fusion
        ``"gated"``, ``"concat"``, ``"add"`` or ``"film"`` (a :class:`FusionHead` trained by gradient descent), or
        ``"ridge"`` (:class:`RidgeFusionRegressor`: ridge on the concatenated features, alpha by inner CV).
    **kwargs
        Training options of :class:`dbk.tl.MLPBaseline` (``hidden``, ``dropout``, ``lr``, ``max_epochs``,
        ``patience``, ``random_state`` ...); for ``"ridge"`` those of :class:`RidgeFusionRegressor` (``alphas``,
        ``alpha_per_gene``, ``n_splits``, ``random_state``, ``rank``, ``ranks``).

    Returns
    -------
    The fitted head.
    """
    if fusion == "ridge":
        return RidgeFusionRegressor(**kwargs).fit(adata_train, obsm_key=obsm_key, diff_key=diff_key, genes=genes,
                                                  layer=layer, groups=groups)
    return FusionRegressor(fusion=fusion, **kwargs).fit(adata_train, obsm_key=obsm_key, diff_key=diff_key,
                                                       genes=genes, layer=layer, groups=groups)
