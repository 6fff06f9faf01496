"""The stage-2 head: fusion of foundation-model features ``z_fm`` with diffusion features ``z_diff``, gene decoder."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn

from .._constants import DIFF_FEATURES_KEY
from .._logging import logger
from ._baselines import RidgeBaseline, TorchRegressor, _masked_mse, gene_decoder, resolve_obsm_key

FUSIONS = ("gated", "concat", "add", "film")  # the fusions of the neural head (:class:`FusionHead`)
DIFFBULK_FUSIONS = (*FUSIONS, "ridge")  # what fit_head / fit_diffbulk accept: the neural ones and the linear head
# options of RidgeFusionRegressor
RIDGE_OPTIONS = ("alphas", "alpha_per_gene", "n_splits", "random_state", "rank", "ranks")


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
        ``{"alpha": [...], "rank": [...], "cv_score": [...]}`` (the inner-CV curve; rank 0 is full rank).
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
    ) -> None:
        super().__init__("cv", alphas=alphas, alpha_per_gene=alpha_per_gene, n_splits=n_splits,
                         random_state=random_state, rank=rank, ranks=ranks)
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
        super()._fit([np.hstack(xs)], y, m, groups, adata)
        scaler = self._pipe.named_steps["scaler"]
        coef = np.zeros((y.shape[1], scaler.mean_.shape[0]))
        intercept = np.zeros(y.shape[1])
        for genes_j, model in self._models:
            coef[genes_j] = np.asarray(model.coef_, np.float64).reshape(len(genes_j), -1)
            intercept[genes_j] = np.asarray(model.intercept_, np.float64).reshape(len(genes_j))
        self.x_mean_ = np.asarray(scaler.mean_, np.float64)
        self.x_scale_ = np.asarray(scaler.scale_, np.float64)
        self.coef_, self.intercept_ = coef, intercept
        del self._pipe, self._models  # the arrays above are the model (what save writes, load reads)
        self.validation_ = f"alpha by inner CV ({self.cv_scheme_})"
        self.best_epoch_ = -1
        self.history_ = _cv_history(self.cv_results_)
        dims = self.n_features_in_
        w = np.abs(coef)
        logger.info(f"{self.name}: mean |coefficient| {w[:, : dims[0]].mean():.3g} on the {dims[0]} FM features, "
                    f"{w[:, dims[0]:].mean():.3g} on the {dims[1]} diffusion features.")

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
