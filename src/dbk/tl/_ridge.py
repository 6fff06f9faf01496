"""Ridge regression on foundation-model features: the HEST-Benchmark probe, CV ridge and reduced-rank ridge."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from .._constants import SPATIAL_KEY
from .._logging import logger
from .._utils import resolve_seed
from ._head_base import Baseline, mask_patterns
from ._head_state import arrays, none, tensor

DEFAULT_ALPHAS = np.logspace(-2, 8, 21)  # half-decade grid for flavor="cv"
DEFAULT_RANKS = (1, 2, 3, 5, 10, 20, 50, None)  # rank="auto": target ranks tried by the inner CV (None: full rank)
HEST_N_COMPONENTS = 256
RIDGE_TENSORS = ("x_mean", "x_scale", "coef", "intercept", "alpha", "cv_alphas", "cv_score")  # ridge.<name>


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


def grid_edge(best: float, alphas: np.ndarray) -> str | None:
    """``"lower"`` / ``"upper"`` when ``best`` is the smallest / largest of a grid of two or more alphas, else ``None``.

    A grid of one alpha (a fixed alpha, as the late blend refits its blocks with) has no edge.
    """
    grid = np.unique(np.asarray(alphas, np.float64))
    if len(grid) < 2:
        return None
    return "lower" if best <= grid[0] else "upper" if best >= grid[-1] else None


def _log_grid_edge(best: float, alphas: np.ndarray) -> None:
    edge = grid_edge(best, alphas)
    if edge is None:
        return
    grid = np.unique(np.asarray(alphas, np.float64))
    what = ("a smaller alpha (a weaker penalty) might score better" if edge == "lower" else
            "a larger alpha (a stronger penalty) might score better")
    logger.info(f"ridge CV: the best alpha {best:g} is the {edge} edge of the grid ({len(grid)} alphas, "
                f"{grid[0]:g} .. {grid[-1]:g}); {what} (alphas= widens the grid).")


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

    After fitting, every flavour is kept as one linear map on the features, plain arrays (:attr:`x_mean_`,
    :attr:`x_scale_`, :attr:`coef_`, :attr:`intercept_`; the PCA, if any, folded into :attr:`coef_`), and predicts
    ``((x - x_mean_) / x_scale_) @ coef_.T + intercept_`` in float64, so a head rebuilt by :meth:`from_state` gives
    the same numbers.

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
        Seed of the PCA (HEST uses the run seed) and of random inner-CV folds (one slide without
        ``obsm["spatial"]``); ``None``: ``dbk.settings.seed``.
    rank
        ``"cv"`` only: ``None`` (default; plain ridge, every gene on its own), a positive integer (reduced-rank
        ridge of that rank), or ``"auto"`` (rank from ``ranks`` by inner CV).
    ranks
        The ranks ``rank="auto"`` tries (``None`` in it: full rank); default ``(1, 2, 3, 5, 10, 20, 50, None)``.

    Attributes
    ----------
    x_mean_, x_scale_
        Standardisation of the features (training mean and standard deviation; 1 where constant).
    coef_
        Coefficients, genes x features, on the standardised features.
    intercept_
        Intercept per gene.
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
    OPTIONS = ("flavor", "n_components", "alphas", "alpha_per_gene", "n_splits", "fit_intercept", "random_state",
               "rank", "ranks")
    _STATE_WHAT = "ridge head"

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
        return resolve_seed(self.random_state)

    def _fit(self, xs, y, m, groups, adata) -> None:
        x = xs[0]
        n_genes = y.shape[1]
        patterns = mask_patterns(m)
        if self.flavor == "hest":
            pipe, self.n_components_ = _prep(self.n_components, x.shape[0], x.shape[1], self._seed())
            z = pipe.fit_transform(x)
            self.alpha_ = 100.0 / (z.shape[1] * n_genes)
            self.rank_ = None
            self.cv_results_ = None
        else:
            spatial = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64) if SPATIAL_KEY in adata.obsm else None
            self.alpha_, self.rank_ = self._cv_alpha(x, y, m, groups, spatial, patterns)
            pipe, self.n_components_ = _prep(self.n_components, x.shape[0], x.shape[1], self._seed())
            z = pipe.fit_transform(x)
        models = []
        for genes_j in patterns:
            rows = m[:, genes_j[0]]
            alpha = self.alpha_[genes_j] if np.ndim(self.alpha_) else self.alpha_
            if self.rank_ is None:
                model = self._ridge(alpha).fit(z[rows], y[rows][:, genes_j])
            else:
                model = _LowRankRidge(alpha, self.rank_).fit(z[rows], y[rows][:, genes_j])
            models.append((genes_j, model))
        self.x_mean_, self.x_scale_, self.coef_, self.intercept_ = _linear_map(pipe, models, n_genes)
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

    def _cv_alpha(self, x, y, m, groups, spatial, patterns):
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
            for genes_j in patterns:
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
        _log_grid_edge(best, a)
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
        return ((np.hstack(xs) - self.x_mean_) / self.x_scale_) @ self.coef_.T + self.intercept_

    # ---- state ----------------------------------------------------------------------------------------------------

    @classmethod
    def _state_options(cls, config) -> dict:
        opts = cls._ridge_options(config)
        n = none(config.get("n_components"))
        return opts | {"flavor": config["flavor"], "n_components": None if n is None else int(n),
                       "fit_intercept": bool(config["fit_intercept"])}

    @staticmethod
    def _ridge_options(config) -> dict:
        """The options every ridge head has (``rank`` / ``ranks`` absent from states saved before they existed)."""
        seed, rank = none(config.get("random_state")), none(config.get("rank"))
        return {"alphas": [float(a) for a in config["alphas"]], "alpha_per_gene": bool(config["alpha_per_gene"]),
                "n_splits": int(config["n_splits"]), "random_state": None if seed is None else int(seed),
                "rank": rank if rank in (None, "auto") else int(rank), "ranks": config.get("ranks")}

    def _state_config(self) -> dict:
        cv = self.cv_results_
        out = {"alpha": "per gene" if np.ndim(self.alpha_) else float(self.alpha_), "rank_chosen": self.rank_,
               "cv_scheme": getattr(self, "cv_scheme_", None),
               "cv_score": None if cv is None else float(cv["score"].min())}
        if self.n_components_ is not None:
            out["n_components_chosen"] = int(self.n_components_)
        return out

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        alpha = np.broadcast_to(np.asarray(self.alpha_, np.float64), (len(self.genes_),))
        cv = _cv_curve(self.cv_results_)
        arrays = {"x_mean": self.x_mean_, "x_scale": self.x_scale_, "coef": self.coef_, "intercept": self.intercept_,
                  "alpha": alpha, "cv_alphas": cv["alpha"], "cv_ranks": cv["rank"], "cv_score": cv["cv_score"]}
        return {f"ridge.{k}": tensor(v) for k, v in arrays.items()}

    def _restore(self, config, tensors, *, device, history, config_file, tensor_file) -> None:
        dims = self.n_features_in_
        names = [*RIDGE_TENSORS, *(["cv_ranks"] if "ridge.cv_ranks" in tensors else [])]  # none: all full rank
        got = arrays(tensors, [f"ridge.{k}" for k in names], tensor_file, "a ridge head")
        got = {k.removeprefix("ridge."): v for k, v in got.items()}
        if got["coef"].shape != (len(self.genes_), sum(dims)):
            raise ValueError(f"{tensor_file} does not fit {len(self.genes_)} genes and features {dims} of the config: "
                             f"ridge coefficients of shape {tuple(got['coef'].shape)}.")
        try:
            rank = none(config.get("rank_chosen"))
            n_components = none(config.get("n_components_chosen"))
            self.n_components_ = None if n_components is None else int(n_components)
            self.cv_scheme_ = none(config.get("cv_scheme"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_file}: invalid ridge head settings ({err}).") from None
        try:
            self._set_arrays(**got, rank=rank)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{tensor_file}: corrupt ridge head: {err}") from None

    def _set_arrays(self, *, x_mean, x_scale, coef, intercept, alpha, cv_alphas, cv_score, cv_ranks=None,
                    rank=None) -> None:
        """Set the fitted arrays, checking shapes and values (the inner-CV curve is empty for ``flavor="hest"``)."""
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
        a = arrs["alpha"].reshape(-1)
        if self.alpha_per_gene:
            alpha_ = np.broadcast_to(a, (c.shape[0],)).copy()
        elif (a != a[0]).any():
            raise ValueError("several alphas for a head fitted with one alpha for all genes (alpha_per_gene=False).")
        else:
            alpha_ = float(a[0])
        ranks = np.zeros_like(arrs["cv_alphas"]) if cv_ranks is None else np.asarray(cv_ranks, np.float64)
        if ranks.shape != arrs["cv_alphas"].shape or (ranks < 0).any() or (ranks != np.round(ranks)).any():
            raise ValueError(f"ridge head cv_ranks must be {arrs['cv_alphas'].shape[0]} integers >= 0.")
        if rank is not None and (int(rank) != rank or rank <= 0):
            raise ValueError(f"ridge head rank must be a positive integer or None, got {rank!r}.")
        if self.flavor == "cv" and not len(arrs["cv_alphas"]):
            raise ValueError("ridge head without its inner-CV curve (cv_alphas, cv_score are empty).")
        self.x_mean_, self.x_scale_, self.coef_, self.intercept_ = (arrs["x_mean"], arrs["x_scale"], c,
                                                                    arrs["intercept"])
        self.alpha_ = alpha_
        self.rank_ = None if rank is None else int(rank)
        if self.flavor == "hest":
            self.cv_results_ = None
        elif self.rank is None and not ranks.any():
            index = pd.Index(arrs["cv_alphas"], name="alpha")
            self.cv_results_ = pd.DataFrame({"score": arrs["cv_score"]}, index=index)
        else:
            index = pd.MultiIndex.from_arrays([ranks.astype(int), arrs["cv_alphas"]], names=["rank", "alpha"])
            self.cv_results_ = pd.DataFrame({"score": arrs["cv_score"]}, index=index)


def _linear_map(pipe, models, n_genes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_mean, x_scale, coef, intercept) of the fitted scaler [+ PCA] and ridge models, as one linear map.

    The models (one per pattern of measured genes) are linear in the scaler's (or the PCA's) output ``z``; a PCA,
    ``z = (s - pca.mean_) @ components_.T`` on the standardised features ``s``, is folded into ``coef`` and
    ``intercept``.
    """
    scaler = pipe.named_steps["scaler"]
    pca = dict(pipe.steps).get("pca")
    width = scaler.mean_.shape[0] if pca is None else pca.components_.shape[0]
    coef, intercept = np.zeros((n_genes, width)), np.zeros(n_genes)
    for genes_j, fitted in models:
        coef[genes_j] = np.asarray(fitted.coef_, np.float64).reshape(len(genes_j), -1)
        intercept[genes_j] = np.broadcast_to(np.asarray(fitted.intercept_, np.float64), (len(genes_j),))
    if pca is not None:
        components = np.asarray(pca.components_, np.float64)
        intercept = intercept - coef @ (components @ np.asarray(pca.mean_, np.float64))
        coef = coef @ components
    return np.asarray(scaler.mean_, np.float64), np.asarray(scaler.scale_, np.float64), coef, intercept


def _cv_curve(cv: pd.DataFrame | None) -> dict[str, np.ndarray]:
    """The inner-CV curve as arrays: ``alpha``, ``rank`` (0: full rank) and ``cv_score`` (empty without CV)."""
    if cv is None:
        return {"alpha": np.zeros(0), "rank": np.zeros(0), "cv_score": np.zeros(0)}
    if isinstance(cv.index, pd.MultiIndex):
        ranks, alphas = cv.index.get_level_values("rank"), cv.index.get_level_values("alpha")
    else:
        alphas, ranks = cv.index, np.zeros(len(cv), int)
    return {"alpha": np.asarray(alphas, np.float64), "rank": np.asarray(ranks, np.float64),
            "cv_score": np.asarray(cv["score"], np.float64)}


def cv_history(cv: pd.DataFrame) -> dict[str, list]:
    """The inner-CV curve as lists: ``alpha``, ``rank`` (0: full rank) and ``cv_score``."""
    curve = _cv_curve(cv)
    return {"alpha": [float(a) for a in curve["alpha"]], "rank": [int(r) for r in curve["rank"]],
            "cv_score": [float(v) for v in curve["cv_score"]]}
