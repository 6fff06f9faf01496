"""Baselines on foundation-model features (``docs/method.md``): mean predictor, HEST-Benchmark ridge, CV ridge, MLP.

All share one interface (:class:`~dbk.tl._head_base.Baseline`): ``fit(adata, *, use_rep, genes, layer,
groups)`` on features in ``obsm`` and targets in ``X`` (or a layer), honouring ``layers["measured"]`` (a gene not
measured on a training tile does not count in its fit), ``predict(adata) -> DataFrame`` (tiles x genes), and
``get_state()`` / ``from_state(...)`` to save and rebuild a fitted one. The ridge baselines are in
:mod:`dbk.tl._ridge`, the torch training shared with the fusion head in :mod:`dbk.tl._torch_head`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import anndata as ad
import numpy as np
import torch
from torch import nn

from .._utils import renamed_kwargs
from ..core._heads import MLPNet
from ._head_base import Baseline
from ._head_state import arrays, tensor
from ._ridge import RidgeBaseline
from ._torch_head import TorchRegressor

# ---- mean predictor -------------------------------------------------------------------------------------------------


class MeanPredictor(Baseline):
    """The floor: each gene's mean over the training tiles where it was measured, for every tile."""

    name = "mean"
    _STATE_WHAT = "mean predictor"

    def _fit(self, xs, y, m, groups, adata) -> None:
        self.means_ = (y * m).sum(axis=0) / m.sum(axis=0)

    def _predict(self, xs) -> np.ndarray:
        return np.broadcast_to(self.means_, (xs[0].shape[0], len(self.means_))).copy()

    def _state_config(self) -> dict:
        return {}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return {"means": tensor(self.means_)}

    def _restore(self, config, tensors, *, device, history, config_file, tensor_file) -> None:
        means = arrays(tensors, ["means"], tensor_file, "a mean predictor")["means"]
        if means.shape != (len(self.genes_),):
            raise ValueError(f"{tensor_file} does not fit {len(self.genes_)} genes: 'means' of shape {means.shape}.")
        if not np.isfinite(means).all():
            raise ValueError(f"{tensor_file}: corrupt mean predictor: non-finite 'means'.")
        self.means_ = means


# ---- MLP ------------------------------------------------------------------------------------------------------------


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
        Seed (``None``: ``dbk.settings.seed``).
    accelerator
        Where the network trains and predicts: ``"auto"`` (``dbk.settings.device``: CUDA if available), ``"cpu"``,
        ``"cuda"``, ``"cuda:1"`` ...
    input_clip
        Standardised inputs are clipped to ``±input_clip``, and features constant on the training part (standard
        deviation below 1e-6 of the median one) are set to 0, so a feature that barely varies in training cannot
        explode on a new slide. ``None``: plain standardisation (only exactly constant features are zeroed).
    scale_inputs
        Standardise the inputs on the training part (default). ``False``: take them as they are, already
        standardised upstream (DiffBulk's :class:`InputScaler` does it for its heads: one scaling, not two).

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
        return MLPNet(dims[0], n_genes, hidden=self.hidden, dropout=self.dropout)


# ---- one entry point ------------------------------------------------------------------------------------------------

BASELINES = ("mean", "ridge_hest", "ridge_cv", "mlp")


@renamed_kwargs(adata_train="adata", obsm_key="use_rep")
def fit_baseline(
    adata: ad.AnnData,
    method: Literal["ridge_cv", "ridge_hest", "mean", "mlp"] = "ridge_cv",
    *,
    use_rep: str | None = None,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    groups: str | Sequence | None = None,
    split_key: str | None = None,
    **kwargs,
) -> Baseline:
    """Fit a baseline on training tiles and return it (``.predict(adata)`` gives a tiles x genes DataFrame).

    Parameters
    ----------
    adata
        Training tiles (training slides only) with features in ``obsm``.
    method
        ``"mean"`` (:class:`MeanPredictor`), ``"ridge_hest"`` (:class:`RidgeBaseline` ``flavor="hest"``),
        ``"ridge_cv"`` (``flavor="cv"``) or ``"mlp"`` (:class:`MLPBaseline`).
    use_rep, genes, layer, groups
        See :meth:`Baseline.fit` (``use_rep``: the features' ``obsm`` key, as in scanpy).
    split_key
        One slide split into training and test tiles (:func:`dbk.pp.spatial_blocks`): fit on the tiles whose
        ``obs[split_key]`` is ``"train"`` only.
    **kwargs
        Options of the baseline's constructor (e.g. ``alphas``, ``rank="auto"`` for reduced-rank ridge, ``hidden``,
        ``random_state``, ``accelerator`` for ``"mlp"``).

    Returns
    -------
    The fitted baseline.

    Examples
    --------
    >>> model = dbk.tl.fit_baseline(train, "ridge_cv", use_rep="X_efficientnet_lite0")  # doctest: +SKIP
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
    if split_key is not None:
        from .._utils import split_mask

        adata = adata[split_mask(adata, split_key, "train")]
    return model.fit(adata, use_rep=use_rep, genes=genes, layer=layer, groups=groups)
