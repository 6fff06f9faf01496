"""The common AnnData interface of the heads: features from ``obsm``, targets, slides, and the base class.

All heads share one interface: ``fit(adata, *, use_rep, genes, layer, groups)`` on features in ``obsm`` and
targets in ``X`` (or a layer), honouring ``layers["measured"]`` (a gene not measured on a training tile does not
count in its fit), ``predict(adata) -> DataFrame`` (tiles x genes), and ``get_state()`` / ``from_state(...)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._constants import PRED_KEY, SAMPLE_COL, SPATIAL_KEY, UNS_KEY
from .._utils import renamed_kwargs
from ..pp._concat import measured_mask
from ._head_state import check_class, check_genes, none, plain, read_layout

# ---- data access shared by every head ------------------------------------------------------------------------------


def resolve_use_rep(adata: ad.AnnData, use_rep: str | None, *, exclude: Sequence[str] = ()) -> str:
    """The features' ``obsm`` key: ``use_rep``, else the only embedding (not counting ``exclude``)."""
    if use_rep is not None:
        if use_rep not in adata.obsm:
            raise KeyError(f"No features adata.obsm[{use_rep!r}] (obsm keys: {list(adata.obsm)}); run "
                           "dbk.tl.embed_tiles first.")
        return use_rep
    skip = {SPATIAL_KEY, PRED_KEY, *exclude}
    recorded = [k for k in adata.uns.get(UNS_KEY, {}).get("embeddings", {}) if k in adata.obsm and k not in skip]
    cands = recorded or [k for k in adata.obsm if k not in skip and not isinstance(adata.obsm[k], pd.DataFrame)]
    if len(cands) != 1:
        raise ValueError(f"Pass use_rep= to say which features to use (candidates: {cands or list(adata.obsm)}).")
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


def mask_patterns(m: np.ndarray) -> list[np.ndarray]:
    """Gene index sets that share one pattern of measured training tiles (one per panel combination)."""
    _, inverse = np.unique(m.T, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    return [np.nonzero(inverse == p)[0] for p in range(inverse.max() + 1)] if m.shape[1] else []


class Baseline:
    """Common interface of the heads: ``fit`` on a tile table, ``predict`` a DataFrame (tiles x genes).

    ``get_state`` / ``from_state`` (:mod:`dbk.tl._head_state`) save and rebuild a fitted head.
    """

    name = "baseline"
    OPTIONS: tuple[str, ...] = ()  # the constructor options the state records (``config[option]``)
    _STATE_WHAT = "head"  # what the state is, in error messages

    @renamed_kwargs(obsm_key="use_rep")
    def fit(
        self,
        adata: ad.AnnData,
        *,
        use_rep: str | None = None,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        groups: str | Sequence | None = None,
    ):
        """Fit on training tiles.

        Parameters
        ----------
        adata
            Training tiles: features in ``obsm[use_rep]``, targets in ``X`` (or ``layer``), optional
            ``layers["measured"]``.
        use_rep
            The features' ``obsm`` key (e.g. ``"X_efficientnet_lite0"``); default the only embedding in ``obsm``.
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
        return self._fit_keys(adata, [resolve_use_rep(adata, use_rep)], genes, layer, groups)

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

    # ---- state ----------------------------------------------------------------------------------------------------

    def get_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The fitted head as ``(config, tensors)``: JSON-ready settings and CPU tensors (safetensors-ready).

        ``config`` holds ``"class"``, the constructor options (:attr:`OPTIONS`), the feature layout (``dims``,
        ``obsm_keys``, ``layer``) and what fitting chose; ``tensors`` the fitted arrays. :meth:`from_state` (or
        :func:`dbk.tl._head_state.head_from_state`) rebuilds a head that predicts the same. The genes are not part of
        the state: pass :attr:`genes_` to :meth:`from_state`.
        """
        if not hasattr(self, "genes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit first.")
        config = {"class": type(self).__name__, **{k: plain(getattr(self, k)) for k in self.OPTIONS},
                  "dims": [int(d) for d in self.n_features_in_], "obsm_keys": list(self.obsm_keys_),
                  "layer": self.layer_}
        config.update(plain(self._state_config()))
        return config, self._state_tensors()

    @classmethod
    def from_state(
        cls,
        config: Mapping,
        tensors: Mapping[str, torch.Tensor],
        *,
        genes: Sequence[str],
        device: str | torch.device | None = None,
        history: dict | None = None,
        config_file: str | os.PathLike = "the head config",
        tensor_file: str | os.PathLike = "the head tensors",
    ):
        """The fitted head described by ``get_state()``'s ``(config, tensors)``; predicts as the original.

        Parameters
        ----------
        config, tensors
            What :meth:`get_state` returned (or read back from JSON and safetensors).
        genes
            The fitted genes (:attr:`genes_`), in output order.
        device
            Where a torch head's network goes (``None``: ``"auto"``, CUDA if available); ignored by numpy heads.
        history
            The head's ``history_`` (training curves are not part of the state).
        config_file, tensor_file
            Where ``config`` and ``tensors`` come from, named in error messages.

        Raises
        ------
        ValueError
            If the state is of another class, incomplete, corrupt, or does not fit ``genes``.
        """
        check_class(cls, config, config_file)
        genes = check_genes(genes, config_file)
        try:
            head = cls(**cls._state_options(config))
            layout = read_layout(config)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{config_file}: invalid {cls._STATE_WHAT} settings ({err}).") from None
        head.genes_ = genes
        head.n_features_in_, head.obsm_keys_, head.layer_ = layout
        head._restore(config, tensors, device=device, history=history, config_file=config_file,
                      tensor_file=tensor_file)
        return head

    @classmethod
    def _state_options(cls, config: Mapping) -> dict:
        """Constructor keyword arguments from a state's config (KeyError / TypeError / ValueError when invalid)."""
        return {k: none(config[k]) for k in cls.OPTIONS}

    def _state_config(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state_tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _restore(self, config, tensors, *, device, history, config_file, tensor_file) -> None:  # pragma: no cover
        raise NotImplementedError
