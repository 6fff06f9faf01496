"""Baselines on foundation-model features (``docs/method.md``): mean predictor, HEST-Benchmark ridge, CV ridge, MLP.

All share one interface: ``fit(adata_train, *, obsm_key, genes, layer, groups)`` on features in ``obsm`` and
targets in ``X`` (or a layer), honouring ``layers["measured"]`` (a gene not measured on a training tile does not
count in its fit), and ``predict(adata) -> DataFrame`` (tiles x genes).
"""

from __future__ import annotations

import copy as _copy
import numbers
from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from .._constants import PRED_KEY, SAMPLE_COL, SPATIAL_KEY, UNS_KEY
from .._logging import logger
from .._settings import settings
from ..pp._concat import measured_mask

DEFAULT_ALPHAS = np.logspace(-2, 8, 21)  # half-decade grid for flavor="cv"
DEFAULT_RANKS = (1, 2, 3, 5, 10, 20, 50, None)  # rank="auto": target ranks tried by the inner CV (None: full rank)
HEST_N_COMPONENTS = 256


# ---- data access shared by every baseline ---------------------------------------------------------------------------


def resolve_obsm_key(adata: ad.AnnData, obsm_key: str | None, *, exclude: Sequence[str] = ()) -> str:
    """The features' ``obsm`` key: ``obsm_key``, else the only embedding (not counting ``exclude``)."""
    if obsm_key is not None:
        if obsm_key not in adata.obsm:
            raise KeyError(f"No features adata.obsm[{obsm_key!r}] (obsm keys: {list(adata.obsm)}); run "
                           "dbk.tl.embed_tiles first.")
        return obsm_key
    skip = {SPATIAL_KEY, PRED_KEY, *exclude}
    recorded = [k for k in adata.uns.get(UNS_KEY, {}).get("embeddings", {}) if k in adata.obsm and k not in skip]
    cands = recorded or [k for k in adata.obsm if k not in skip and not isinstance(adata.obsm[k], pd.DataFrame)]
    if len(cands) != 1:
        raise ValueError(f"Pass obsm_key= to say which features to use (candidates: {cands or list(adata.obsm)}).")
    return cands[0]


def obsm_features(adata: ad.AnnData, key: str, n_features: int | None = None) -> np.ndarray:
    """``adata.obsm[key]`` as float64 (tiles x features), checked finite and of the expected width."""
    x = adata.obsm[key]
    x = x.to_numpy() if isinstance(x, pd.DataFrame) else x
    x = np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"obsm[{key!r}] must be 2-D (tiles x features), got shape {x.shape}.")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"obsm[{key!r}] has {x.shape[1]} features; the model was fitted on {n_features}.")
    if not np.isfinite(x).all():
        raise ValueError(f"obsm[{key!r}] has non-finite values in {int((~np.isfinite(x)).any(axis=1).sum())} tiles.")
    return x


def targets(adata: ad.AnnData, genes: Sequence[str], layer: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(values float64, measured bool), tiles x genes; unmeasured or non-finite entries are 0 and False."""
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"Genes not in the table: {missing[:10]}.")
    sub = adata[:, list(genes)]
    y = sub.layers[layer] if layer is not None else sub.X
    y = np.asarray(y.toarray() if sp.issparse(y) else y, dtype=np.float64)
    m = measured_mask(sub) & np.isfinite(y)
    return np.where(m, y, 0.0), m


def resolve_groups(adata: ad.AnnData, groups) -> np.ndarray | None:
    """Slide labels of the tiles from an ``obs`` column name, an array, or ``None`` (``obs["sample"]`` if >= 2)."""
    if groups is None:
        if SAMPLE_COL in adata.obs and adata.obs[SAMPLE_COL].nunique() >= 2:
            return adata.obs[SAMPLE_COL].astype(str).to_numpy()
        return None
    if isinstance(groups, str):
        if groups not in adata.obs:
            raise KeyError(f"groups={groups!r} is not an obs column ({list(adata.obs.columns)}).")
        return adata.obs[groups].astype(str).to_numpy()
    g = np.asarray(groups)
    if len(g) != adata.n_obs:
        raise ValueError(f"groups has {len(g)} labels for {adata.n_obs} tiles.")
    return g.astype(str)


def _mask_patterns(m: np.ndarray) -> list[np.ndarray]:
    """Gene index sets that share one pattern of measured training tiles (one per panel combination)."""
    _, inverse = np.unique(m.T, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    return [np.nonzero(inverse == p)[0] for p in range(inverse.max() + 1)] if m.shape[1] else []


class Baseline:
    """Common interface of the baselines: ``fit`` on a tile table, ``predict`` a DataFrame (tiles x genes)."""

    name = "baseline"

    def fit(
        self,
        adata: ad.AnnData,
        *,
        obsm_key: str | None = None,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        groups: str | Sequence | None = None,
    ):
        """Fit on training tiles.

        Parameters
        ----------
        adata
            Training tiles: features in ``obsm[obsm_key]``, targets in ``X`` (or ``layer``), optional
            ``layers["measured"]``.
        obsm_key
            Features (e.g. ``"X_efficientnet_lite0"``); default the only embedding in ``obsm``.
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
        return self._fit_keys(adata, [resolve_obsm_key(adata, obsm_key)], genes, layer, groups)

    def _fit_keys(self, adata, keys, genes, layer, groups):
        if not isinstance(adata, ad.AnnData):
            raise TypeError(f"fit expects the training tile table (AnnData), got {type(adata).__name__}.")
        genes = list(adata.var_names) if genes is None else [str(g) for g in genes]
        if not genes:
            raise ValueError("No genes to fit.")
        xs = [obsm_features(adata, k) for k in keys]
        y, m = targets(adata, genes, layer)
        never = [g for g, c in zip(genes, m.sum(axis=0), strict=True) if c == 0]
        if never:
            raise ValueError(f"{len(never)} genes are measured on no training tile: {never[:10]}; drop them.")
        self.obsm_keys_ = list(keys)
        self.n_features_in_ = [x.shape[1] for x in xs]
        self.genes_ = genes
        self.layer_ = layer
        self._fit(xs, y, m, resolve_groups(adata, groups), adata)
        return self

    @property
    def obsm_key_(self) -> str:
        return self.obsm_keys_[0]

    def predict(self, adata: ad.AnnData, *, key_added: str | None = None) -> pd.DataFrame:
        """Predict the fitted genes on ``adata``'s tiles from the same features.

        Returns
        -------
        DataFrame (index ``adata.obs_names``, columns the genes, float32); also stored in ``adata.obsm[key_added]``
        when given (e.g. ``"dbk_pred"``, where :func:`dbk.tl.evaluate` looks).
        """
        if not hasattr(self, "genes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit first.")
        xs = [obsm_features(adata, k, d) for k, d in zip(self.obsm_keys_, self.n_features_in_, strict=True)]
        p = np.asarray(self._predict(xs), dtype=np.float32)
        df = pd.DataFrame(p, index=adata.obs_names.copy(), columns=pd.Index(self.genes_))
        if key_added is not None:
            adata.obsm[key_added] = df
        return df

    def _fit(self, xs, y, m, groups, adata) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict(self, xs) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        state = f"{len(self.genes_)} genes on {self.obsm_keys_}" if hasattr(self, "genes_") else "unfitted"
        return f"{type(self).__name__}({state})"


# ---- mean predictor -------------------------------------------------------------------------------------------------


class MeanPredictor(Baseline):
    """The floor: each gene's mean over the training tiles where it was measured, for every tile."""

    name = "mean"

    def _fit(self, xs, y, m, groups, adata) -> None:
        self.means_ = (y * m).sum(axis=0) / m.sum(axis=0)

    def _predict(self, xs) -> np.ndarray:
        return np.broadcast_to(self.means_, (xs[0].shape[0], len(self.means_))).copy()


# ---- ridge ----------------------------------------------------------------------------------------------------------


def _prep(n_components: int | None, n_samples: int, n_features: int, random_state: int):
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [("scaler", StandardScaler())]
    k = None
    if n_components is not None:
        k = int(min(n_components, n_samples, n_features))
        steps.append(("pca", PCA(n_components=k, random_state=random_state)))
    return Pipeline(steps), k


def cv_folds(groups: np.ndarray | None, spatial: np.ndarray | None, n: int, n_splits: int,
             random_state: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Inner CV folds: by slide when there are >= 2 slides, else by spatial stripes, else by random tiles."""
    from sklearn.model_selection import GroupKFold, KFold

    idx = np.arange(n)
    if groups is not None and len(np.unique(groups)) >= 2:
        k = min(n_splits, len(np.unique(groups)))
        return list(GroupKFold(n_splits=k).split(idx, groups=groups)), f"{k}-fold by slide"
    if spatial is not None and np.isfinite(spatial).all():
        axis = int(np.argmax(np.ptp(spatial, axis=0)))
        ranks = np.argsort(np.argsort(spatial[:, axis], kind="stable"), kind="stable")
        stripes = (ranks * n_splits) // n
        logger.info("ridge CV: one slide only; folds are spatial stripes of it (neighbouring tiles are correlated, "
                    "random folds would favour small alphas).")
        return list(GroupKFold(n_splits=n_splits).split(idx, groups=stripes)), f"{n_splits}-fold by spatial stripe"
    logger.warning("ridge CV: one slide and no obsm['spatial']; folds are random tiles (optimistic).")
    return list(KFold(n_splits, shuffle=True, random_state=random_state).split(idx)), f"{n_splits}-fold random"


def _check_rank(rank, ranks, flavor: str, alpha_per_gene: bool) -> tuple:
    """Validated ``(rank, ranks)`` of :class:`RidgeBaseline`."""
    if rank is None:
        return None, tuple(DEFAULT_RANKS if ranks is None else ranks)
    if flavor != "cv":
        raise ValueError("rank (reduced-rank ridge) needs flavor='cv'; the HEST probe is fixed.")
    if alpha_per_gene:
        raise ValueError("rank and alpha_per_gene=True do not go together: a reduced-rank fit couples the genes.")
    if not (rank == "auto" or (isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and rank > 0)):
        raise ValueError(f"rank must be None, a positive integer or 'auto', got {rank!r}.")
    grid = tuple(DEFAULT_RANKS if ranks is None else ranks)
    if not grid or any(k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0)
                       for k in grid):
        raise ValueError(f"ranks must be a non-empty list of positive integers (or None for full rank), got {ranks!r}.")
    return rank, grid


def _target_components(yc: np.ndarray) -> np.ndarray:
    """Principal axes (rows, by decreasing variance) of centred targets ``yc`` (tiles x genes), signs fixed."""
    _, s, vt = np.linalg.svd(yc, full_matrices=False)
    vt = vt[s > s[0] * 1e-10] if len(s) and s[0] > 0 else vt[:0]
    signs = np.sign(vt[np.arange(len(vt)), np.argmax(np.abs(vt), axis=1)])
    return vt * signs[:, None]


class _LowRankRidge:
    """Ridge on the first ``rank`` principal-component scores of the targets, mapped back to the genes.

    Exposes ``coef_`` (genes x features) and ``intercept_`` of the composed linear map, like sklearn's ``Ridge``.
    """

    def __init__(self, alpha: float, rank: int) -> None:
        self.alpha, self.rank = float(alpha), int(rank)

    def fit(self, z: np.ndarray, y: np.ndarray) -> _LowRankRidge:
        from sklearn.linear_model import Ridge

        my = y.mean(axis=0)
        comps = _target_components(y - my)[: self.rank]  # (k, genes)
        self.rank_ = comps.shape[0]
        if self.rank_ == 0:  # constant targets
            self.coef_, self.intercept_ = np.zeros((y.shape[1], z.shape[1])), my
            return self
        r = Ridge(alpha=self.alpha, fit_intercept=True).fit(z, (y - my) @ comps.T)
        self.coef_ = comps.T @ np.asarray(r.coef_).reshape(self.rank_, -1)
        self.intercept_ = my + comps.T @ np.asarray(r.intercept_).reshape(self.rank_)
        return self

    def predict(self, z: np.ndarray) -> np.ndarray:
        return z @ self.coef_.T + self.intercept_


class RidgeBaseline(Baseline):
    """Ridge regression on standardised features.

    ``flavor="hest"`` reproduces the HEST-Benchmark linear probe (``hest/bench/benchmark.py`` and ``trainer.py``,
    Jaume et al. 2024): ``StandardScaler`` then ``PCA(n_components=256)`` fitted on the training tiles, then
    ``Ridge(solver="lsqr", alpha=100 / (n_features * n_genes), fit_intercept=False, max_iter=1000)``, where
    ``n_features`` is the PCA width (256, or fewer when there are fewer tiles or features) and ``n_genes`` the
    number of genes fitted together. HEST fits **no intercept**: its PCA scores are centred but the log1p targets are
    not, so the predictions sit near 0. Their correlations (what HEST reports) are unaffected, their MSE / MAE are
    not comparable with other methods; pass ``fit_intercept=True`` for an intercept.

    ``flavor="cv"`` chooses ``alpha`` from ``alphas`` (default ``1e-2 .. 1e8``, 21 log-spaced values) by inner
    cross-validation on the training tiles only, with folds by slide (``groups``, or ``obs["sample"]``); with one
    slide the folds are spatial stripes of it (``obsm["spatial"]``). The score is the validation MSE of each gene
    divided by its training variance, averaged over genes (so every gene counts equally); the standardisation
    (and PCA, if any) is refitted inside every fold. An intercept is fitted.

    ``rank`` (``"cv"`` only) makes it *reduced-rank* ridge: the centred training targets are projected on their first
    ``rank`` principal components (genes x tiles PCA), ridge predicts those scores, and the prediction is mapped back
    to all genes. Expression varies along a few programmes (tumour, stroma, immune ...); per-gene ridge spends its
    noise on the rest. With ``rank="auto"`` the rank is chosen from ``ranks`` jointly with ``alpha`` by the same
    inner CV (same score). The fitted model is still one linear map (genes x features), so it predicts, saves and
    loads like plain ridge.

    Genes measured on only some training slides are fitted on those slides' tiles (one fit per panel pattern; with
    ``rank``, one target PCA per pattern).

    Parameters
    ----------
    flavor
        ``"hest"`` or ``"cv"``.
    n_components
        PCA width; default 256 for ``"hest"``, none (no PCA) for ``"cv"``.
    alphas
        The ``"cv"`` grid.
    alpha_per_gene
        ``"cv"``: choose one alpha per gene instead of one for all.
    n_splits
        ``"cv"``: number of folds (at most the number of slides).
    fit_intercept
        Default ``False`` for ``"hest"`` (as HEST), ``True`` for ``"cv"``.
    random_state
        Seed of the PCA (HEST uses the run seed).
    rank
        ``"cv"`` only: ``None`` (default; plain ridge, every gene on its own), a positive integer (reduced-rank
        ridge of that rank), or ``"auto"`` (rank from ``ranks`` by inner CV).
    ranks
        The ranks ``rank="auto"`` tries (``None`` in it: full rank); default ``(1, 2, 3, 5, 10, 20, 50, None)``.

    Attributes
    ----------
    alpha_
        The alpha used (array per gene with ``alpha_per_gene``).
    rank_
        The target rank used (``None``: full rank, plain ridge).
    n_components_
        PCA width used (``None`` without PCA).
    cv_results_
        ``"cv"``: DataFrame (index alpha; with ``rank="auto"`` a (rank, alpha) MultiIndex, rank 0 meaning full)
        with ``score`` (mean normalised validation MSE).
    """

    name = "ridge"

    def __init__(
        self,
        flavor: Literal["hest", "cv"] = "hest",
        *,
        n_components: int | None = None,
        alphas: Sequence[float] | None = None,
        alpha_per_gene: bool = False,
        n_splits: int = 5,
        fit_intercept: bool | None = None,
        random_state: int | None = None,
        rank: int | Literal["auto"] | None = None,
        ranks: Sequence[int | None] | None = None,
    ) -> None:
        if flavor not in ("hest", "cv"):
            raise ValueError(f"flavor must be 'hest' or 'cv', got {flavor!r}.")
        self.rank, self.ranks = _check_rank(rank, ranks, flavor, alpha_per_gene)
        self.flavor = flavor
        self.n_components = HEST_N_COMPONENTS if (flavor == "hest" and n_components is None) else n_components
        self.alphas = np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=np.float64)
        if self.alphas.ndim != 1 or not len(self.alphas) or (self.alphas <= 0).any():
            raise ValueError("alphas must be a non-empty list of positive numbers.")
        self.alpha_per_gene = bool(alpha_per_gene)
        if n_splits < 2:
            raise ValueError(f"n_splits must be >= 2, got {n_splits!r}.")
        self.n_splits = int(n_splits)
        self.fit_intercept = (flavor == "cv") if fit_intercept is None else bool(fit_intercept)
        self.random_state = random_state
        self.name = f"ridge_{flavor}"

    def _seed(self) -> int:
        return settings.seed if self.random_state is None else int(self.random_state)

    def _fit(self, xs, y, m, groups, adata) -> None:
        x = xs[0]
        n_genes = y.shape[1]
        self._patterns = _mask_patterns(m)
        if self.flavor == "hest":
            self._pipe, self.n_components_ = _prep(self.n_components, x.shape[0], x.shape[1], self._seed())
            z = self._pipe.fit_transform(x)
            self.alpha_ = 100.0 / (z.shape[1] * n_genes)
            self.rank_ = None
            self.cv_results_ = None
        else:
            spatial = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64) if SPATIAL_KEY in adata.obsm else None
            self.alpha_, self.rank_ = self._cv_alpha(x, y, m, groups, spatial)
            self._pipe, self.n_components_ = _prep(self.n_components, x.shape[0], x.shape[1], self._seed())
            z = self._pipe.fit_transform(x)
        self._models = []
        for genes_j in self._patterns:
            rows = m[:, genes_j[0]]
            alpha = self.alpha_[genes_j] if np.ndim(self.alpha_) else self.alpha_
            if self.rank_ is None:
                model = self._ridge(alpha).fit(z[rows], y[rows][:, genes_j])
            else:
                model = _LowRankRidge(alpha, self.rank_).fit(z[rows], y[rows][:, genes_j])
            self._models.append((genes_j, model))
        logger.info(f"{self.name}: {n_genes} genes on {x.shape[1]} features"
                    f"{f' (PCA {self.n_components_})' if self.n_components_ else ''}, alpha "
                    f"{'per gene' if np.ndim(self.alpha_) else f'{self.alpha_:.3g}'}"
                    f"{'' if self.rank_ is None else f', target rank {self.rank_}'}.")

    def _ridge(self, alpha):
        from sklearn.linear_model import Ridge

        if self.flavor == "hest":
            return Ridge(alpha=alpha, solver="lsqr", fit_intercept=self.fit_intercept, max_iter=1000,
                         random_state=self._seed())
        return Ridge(alpha=alpha, fit_intercept=self.fit_intercept)

    def _cv_alpha(self, x, y, m, groups, spatial):
        """(alpha, rank) with the lowest mean normalised validation MSE over the inner folds."""
        folds, how = cv_folds(groups, spatial, x.shape[0], self.n_splits, self._seed())
        a = self.alphas
        ranks = self._rank_grid()
        sse = np.zeros((len(ranks), len(a), y.shape[1]))
        cnt = np.zeros(y.shape[1])
        for tr, va in folds:
            pipe, _ = _prep(self.n_components, len(tr), x.shape[1], self._seed())
            pipe.fit(x[tr])
            z = pipe.transform(x)
            for genes_j in self._patterns:
                col = m[:, genes_j[0]]
                rt, rv = tr[col[tr]], va[col[va]]
                if len(rt) < 2 or len(rv) == 0:
                    continue
                zt, yt = z[rt], y[rt][:, genes_j]
                mz = zt.mean(axis=0) if self.fit_intercept else np.zeros(zt.shape[1])
                my = yt.mean(axis=0) if self.fit_intercept else np.zeros(yt.shape[1])
                u, s, vt = np.linalg.svd(zt - mz, full_matrices=False)
                zv = (z[rv] - mz) @ vt.T
                yv = y[rv][:, genes_j]
                if ranks == [None]:
                    uty = u.T @ (yt - my)
                    for i, alpha in enumerate(a):  # closed-form ridge for every alpha from one SVD
                        pred = zv @ ((s / (s * s + alpha))[:, None] * uty) + my
                        sse[0, i, genes_j] += ((yv - pred) ** 2).sum(axis=0)
                else:
                    comps = _target_components(yt - my)  # (r, genes): the fold's target PCA
                    uts = u.T @ ((yt - my) @ comps.T)
                    for i, alpha in enumerate(a):
                        scores = zv @ ((s / (s * s + alpha))[:, None] * uts)  # predicted PC scores
                        for q, k in enumerate(ranks):
                            kk = comps.shape[0] if k is None else min(k, comps.shape[0])
                            pred = scores[:, :kk] @ comps[:kk] + my
                            sse[q, i, genes_j] += ((yv - pred) ** 2).sum(axis=0)
                cnt[genes_j] += len(rv)
        if not (cnt > 0).any():
            raise ValueError("ridge CV: no fold has validation tiles for any gene.")
        var = np.array([np.var(y[m[:, j], j]) for j in range(y.shape[1])])
        score = sse / np.maximum(cnt, 1) / np.where(var > 0, var, 1.0)
        ok = cnt > 0
        mean_score = score[:, :, ok].mean(axis=2)  # (ranks, alphas)
        q, i = np.unravel_index(int(np.argmin(mean_score)), mean_score.shape)
        if ranks == [None]:
            self.cv_results_ = pd.DataFrame({"score": mean_score[0]}, index=pd.Index(a, name="alpha"))
        else:
            idx = pd.MultiIndex.from_product([[0 if k is None else int(k) for k in ranks], a], names=["rank", "alpha"])
            self.cv_results_ = pd.DataFrame({"score": mean_score.reshape(-1)}, index=idx)
        self.cv_scheme_ = how
        best = float(a[i])
        if best in (a.min(), a.max()):
            logger.info(f"ridge CV: the best alpha {best:g} is at the edge of the grid.")
        if not self.alpha_per_gene:
            return best, ranks[q]
        per_gene = a[np.argmin(score[0], axis=0)]
        return np.where(ok, per_gene, best), None

    def _rank_grid(self) -> list[int | None]:
        if self.rank is None:
            return [None]
        if self.rank == "auto":
            return list(self.ranks)
        return [int(self.rank)]

    def _predict(self, xs) -> np.ndarray:
        z = self._pipe.transform(xs[0])
        out = np.zeros((z.shape[0], len(self.genes_)))
        for genes_j, model in self._models:
            out[:, genes_j] = model.predict(z).reshape(z.shape[0], -1)
        return out


# ---- torch regressors (MLP baseline; the fusion head subclasses this) ------------------------------------------------


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (the stage-2 heads train and predict under it there); a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.mean((pred - target) ** 2)
    mask = mask.to(pred.dtype)
    err = torch.where(mask > 0, pred - target, torch.zeros_like(pred))
    return (err * err * mask).sum() / mask.sum().clamp_min(1.0)


def holdout_split(n: int, groups: np.ndarray | None, val_fraction: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, validation) tile indices for early stopping: whole slides when there are >= 2, else random tiles."""
    idx = np.arange(n)
    if groups is not None and len(np.unique(groups)) >= 2:
        names = np.unique(groups)
        k = int(np.clip(round(val_fraction * len(names)), 1, len(names) - 1))
        val_names = rng.choice(names, size=k, replace=False)
        va = np.isin(groups, val_names)
        return idx[~va], idx[va], f"held-out slides {sorted(val_names.tolist())}"
    k = int(np.clip(round(val_fraction * n), 1, n - 1))
    perm = rng.permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k]), f"{k} random held-out tiles"


class TorchRegressor(Baseline):
    """Shared training of torch heads on ``obsm`` features.

    Standardised inputs and targets, AdamW, masked MSE, early stopping on held-out training slides (tiles when
    there is one slide), seeded.
    """

    def __init__(
        self,
        *,
        hidden: int | None = 256,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        max_epochs: int = 200,
        patience: int = 15,
        val_fraction: float = 0.2,
        random_state: int | None = None,
        accelerator: str = "auto",
        input_clip: float | None = 5.0,
    ) -> None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
        if input_clip is not None and not input_clip > 0:
            raise ValueError(f"input_clip must be positive or None, got {input_clip!r}.")
        self.hidden = hidden
        self.dropout = float(dropout)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.max_epochs = int(max_epochs)
        self.patience = int(patience)
        self.val_fraction = float(val_fraction)
        self.random_state = random_state
        self.accelerator = accelerator
        self.input_clip = None if input_clip is None else float(input_clip)

    def _scale_inputs(self, xs) -> list[torch.Tensor]:
        """Standardised inputs: z-scores clipped to ``±input_clip``; features constant on the training part -> 0."""
        keeps = getattr(self, "x_keep_", None) or [None] * len(xs)
        out = []
        for x, mu, s, keep in zip(xs, self.x_mean_, self.x_std_, keeps, strict=True):
            z = (np.asarray(x, np.float64) - mu) / s
            if self.input_clip is not None:
                z = np.clip(z, -self.input_clip, self.input_clip)
            if keep is not None:
                z = np.where(keep, z, 0.0)
            out.append(torch.as_tensor(z, dtype=torch.float32))
        return out

    def _build(self, dims: list[int], n_genes: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fit(self, xs, y, m, groups, adata) -> None:
        from ._embed import resolve_device

        seed = settings.seed if self.random_state is None else int(self.random_state)
        rng = np.random.default_rng(seed)
        tr, va, how = holdout_split(len(y), groups, self.val_fraction, rng)
        # A feature that barely varies on the training tiles (a ReLU unit that rarely fires on H&E, or a constant one
        # whose float std is a rounding residue) would get a huge z-score on a new slide: such features are zeroed,
        # and z-scores are clipped to +-input_clip, so the network never sees values far outside its training range.
        self.x_mean_, self.x_std_, self.x_keep_ = [], [], []
        for x in xs:
            std = np.asarray(x[tr], np.float64).std(axis=0)
            if self.input_clip is None:  # plain standardisation
                keep = std > 0
            else:
                keep = std > 1e-6 * max(float(np.median(std)) if std.size else 0.0, 1e-12)
            self.x_mean_.append(np.asarray(x[tr], np.float64).mean(axis=0))
            self.x_std_.append(np.where(keep, std, 1.0))
            self.x_keep_.append(keep)
        mt = m[tr]
        cnt = np.maximum(mt.sum(axis=0), 1)
        mu = (y[tr] * mt).sum(axis=0) / cnt
        sd = np.sqrt((((y[tr] - mu) ** 2) * mt).sum(axis=0) / cnt)
        self.y_mean_ = np.where(mt.any(axis=0), mu, (y * m).sum(axis=0) / m.sum(axis=0))
        self.y_std_ = np.where(sd > 0, sd, 1.0)
        device = resolve_device(self.accelerator)
        t_in = self._scale_inputs(xs)
        t_y = torch.as_tensor((y - self.y_mean_) / self.y_std_, dtype=torch.float32)
        t_m = torch.as_tensor(m, dtype=torch.float32)
        # initialisation, shuffling and dropout all draw from torch's RNG seeded here; the caller's state is restored
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            net = self._build([x.shape[1] for x in xs], y.shape[1]).to(device)
            best, best_state, best_epoch, history = self._train(net, t_in, t_y, t_m, tr, va, device)
        if best_state is not None:
            net.load_state_dict(best_state)
        self.module_ = net.eval()
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.validation_ = how
        logger.info(f"{self.name}: best validation loss {best:.4f} at epoch {best_epoch + 1} "
                    f"of {len(history['val_loss'])} ({how}).")

    def _train(self, net, t_in, t_y, t_m, tr, va, device):
        from tqdm.auto import tqdm

        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
        best, best_state, best_epoch, wait = np.inf, None, -1, 0
        history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
        bar = tqdm(range(self.max_epochs), desc=self.name, unit="epoch", disable=not settings.progress)
        for epoch in bar:
            net.train()
            perm = tr_t[torch.randperm(len(tr_t))]
            total, seen = 0.0, 0
            for s in range(0, len(perm), self.batch_size):
                b = perm[s : s + self.batch_size]
                with _autocast(device):
                    out = net(*[t[b].to(device) for t in t_in])
                loss = _masked_mse(out.float(), t_y[b].to(device), t_m[b].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + loss.item() * len(b), seen + len(b)
            val = self._loss(net, t_in, t_y, t_m, va_t, device)
            history["train_loss"].append(total / max(seen, 1))
            history["val_loss"].append(val)
            bar.set_postfix(train=f"{history['train_loss'][-1]:.3f}", val=f"{val:.3f}")
            if val < best - 1e-6:
                best, best_epoch, wait = val, epoch, 0
                best_state = _copy.deepcopy(net.state_dict())
            else:
                wait += 1
                if wait >= self.patience:
                    break
        bar.close()
        return best, best_state, best_epoch, history

    @torch.inference_mode()
    def _loss(self, net, t_in, t_y, t_m, idx, device) -> float:
        net.eval()
        total, weight = 0.0, 0.0
        for s in range(0, len(idx), 4096):
            b = idx[s : s + 4096]
            mb = t_m[b].to(device)
            with _autocast(device):
                out = net(*[t[b].to(device) for t in t_in])
            total += float(_masked_mse(out.float(), t_y[b].to(device), mb)) * float(
                mb.sum().clamp_min(1.0))
            weight += float(mb.sum().clamp_min(1.0))
        return total / max(weight, 1.0)

    @torch.inference_mode()
    def _predict(self, xs) -> np.ndarray:
        net = self.module_
        device = next(net.parameters()).device
        net.eval()
        t_in = self._scale_inputs(xs)
        with _autocast(device):
            outs = [net(*[t[s : s + 4096].to(device) for t in t_in]).float().cpu().numpy()
                    for s in range(0, len(t_in[0]), 4096)]
        out = np.concatenate(outs) if outs else np.zeros((0, len(self.genes_)))
        return out * self.y_std_ + self.y_mean_


def gene_decoder(dim: int, n_genes: int, hidden: int | None, dropout: float) -> nn.Module:
    """Linear (``hidden`` falsy) or one-hidden-layer MLP (Linear, GELU, Dropout, Linear) from features to genes."""
    if not hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_genes))
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_genes))


class MLPBaseline(TorchRegressor):
    """An MLP on foundation-model features trained with MSE: DiffBulk without its diffusion branch.

    Inputs and targets are standardised on the training part; AdamW; early stopping on held-out training slides
    (``groups`` / ``obs["sample"]``; random tiles when there is one slide) restores the best epoch. Seeded by
    ``random_state`` (or ``dbk.settings.seed``): the same seed gives the same model on CPU.

    Parameters
    ----------
    hidden
        Width of the hidden layer (``None`` or 0: a linear model).
    dropout
        Dropout after the hidden layer.
    lr, weight_decay
        AdamW settings.
    batch_size
        Tiles per step.
    max_epochs, patience
        Training length and early-stopping patience (epochs without a better validation loss).
    val_fraction
        Fraction of training slides (or tiles) held out for early stopping.
    random_state
        Seed.
    accelerator
        ``"auto"``, ``"cpu"``, ``"cuda"`` ...
    input_clip
        Standardised inputs are clipped to ``±input_clip``, and features constant on the training part (standard
        deviation below 1e-6 of the median one) are set to 0, so a feature that barely varies in training cannot
        explode on a new slide. ``None``: plain standardisation (only exactly constant features are zeroed).

    Attributes
    ----------
    module_
        The trained torch module (on standardised inputs and targets).
    history_
        ``{"train_loss": [...], "val_loss": [...]}`` per epoch (standardised units).
    best_epoch_
        Index of the restored epoch.
    """

    name = "mlp"

    def _build(self, dims: list[int], n_genes: int) -> nn.Module:
        return _Single(gene_decoder(dims[0], n_genes, self.hidden, self.dropout))


class _Single(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---- one entry point ------------------------------------------------------------------------------------------------

BASELINES = ("mean", "ridge_hest", "ridge_cv", "mlp")


def fit_baseline(
    adata_train: ad.AnnData,
    method: Literal["ridge_cv", "ridge_hest", "mean", "mlp"] = "ridge_cv",
    *,
    obsm_key: str | None = None,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    groups: str | Sequence | None = None,
    **kwargs,
) -> Baseline:
    """Fit a baseline on training tiles and return it (``.predict(adata)`` gives a tiles x genes DataFrame).

    Parameters
    ----------
    adata_train
        Training tiles (training slides only) with features in ``obsm``.
    method
        ``"mean"`` (:class:`MeanPredictor`), ``"ridge_hest"`` (:class:`RidgeBaseline` ``flavor="hest"``),
        ``"ridge_cv"`` (``flavor="cv"``) or ``"mlp"`` (:class:`MLPBaseline`).
    obsm_key, genes, layer, groups
        See :meth:`Baseline.fit`.
    **kwargs
        Options of the baseline's constructor (e.g. ``alphas``, ``rank="auto"`` for reduced-rank ridge, ``hidden``,
        ``random_state``).

    Returns
    -------
    The fitted baseline.

    Examples
    --------
    >>> model = dbk.tl.fit_baseline(train, "ridge_cv", obsm_key="X_efficientnet_lite0")  # doctest: +SKIP
    >>> model.predict(test, key_added="dbk_pred")  # doctest: +SKIP
    >>> dbk.tl.evaluate(test, train_adata=train)  # doctest: +SKIP
    """
    if method == "mean":
        model: Baseline = MeanPredictor(**kwargs)
    elif method == "ridge_hest":
        model = RidgeBaseline("hest", **kwargs)
    elif method == "ridge_cv":
        model = RidgeBaseline("cv", **kwargs)
    elif method == "mlp":
        model = MLPBaseline(**kwargs)
    else:
        raise ValueError(f"method must be one of {list(BASELINES)}, got {method!r}.")
    return model.fit(adata_train, obsm_key=obsm_key, genes=genes, layer=layer, groups=groups)
