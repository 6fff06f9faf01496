"""Torch heads on ``obsm`` features: standardisation, training by the core loop, prediction and saved state.

:class:`TorchRegressor` is the AnnData side of :class:`dbk.tl.MLPBaseline` and :class:`dbk.tl.FusionRegressor`; the
networks are in :mod:`dbk.core._heads`, the training loop in :mod:`dbk.core._head_training`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .._logging import logger
from .._settings import settings
from .._utils import resolve_seed
from ..core._head_training import holdout_split, predict_network, train_network
from ._head_base import Baseline
from ._head_state import arrays, tensor

TORCH_OPTIONS = ("hidden", "dropout", "lr", "weight_decay", "batch_size", "max_epochs", "patience", "val_fraction",
                 "random_state")  # the options a torch head's state records (its input_clip as head_input_clip)


class TorchRegressor(Baseline):
    """Shared training of torch heads on ``obsm`` features.

    Standardised inputs and targets, AdamW, masked MSE, early stopping on held-out training slides (tiles when
    there is one slide), seeded.
    """

    OPTIONS = TORCH_OPTIONS

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
        scale_inputs: bool = True,
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
        # False: the inputs come already standardised (DiffBulk's InputScaler, fitted on the same training split),
        # so the head keeps them as they are (one scaling, not two)
        self.scale_inputs = bool(scale_inputs)

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

        seed = resolve_seed(self.random_state)
        rng = np.random.default_rng(seed)
        tr, va, how = holdout_split(len(y), groups, self.val_fraction, rng)
        # A feature that barely varies on the training tiles (a ReLU unit that rarely fires on H&E, or a constant one
        # whose float std is a rounding residue) would get a huge z-score on a new slide: such features are zeroed,
        # and z-scores are clipped to +-input_clip, so the network never sees values far outside its training range.
        self.x_mean_, self.x_std_, self.x_keep_ = [], [], []
        for x in xs if not self.scale_inputs else []:  # identity: already standardised upstream
            d = np.asarray(x).shape[1]
            self.x_mean_.append(np.zeros(d))
            self.x_std_.append(np.ones(d))
            self.x_keep_.append(np.ones(d, bool))
        for x in xs if self.scale_inputs else []:
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
        from tqdm.auto import tqdm

        bar = tqdm(total=self.max_epochs, desc=self.name, unit="epoch", disable=not settings.progress)

        def progress(epoch: int, train_loss: float, val_loss: float) -> None:
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")

        try:
            fitted = train_network(lambda: self._build([x.shape[1] for x in xs], y.shape[1]), t_in, t_y, t_m, tr, va,
                                   device=device, seed=seed, lr=self.lr, weight_decay=self.weight_decay,
                                   batch_size=self.batch_size, max_epochs=self.max_epochs, patience=self.patience,
                                   on_epoch=progress)
        finally:
            bar.close()
        self.module_ = fitted.net
        self.history_ = fitted.history
        self.best_epoch_ = fitted.best_epoch
        self.validation_ = how
        logger.info(f"{self.name}: best validation loss {fitted.best_loss:.4f} at epoch {fitted.best_epoch + 1} "
                    f"of {len(fitted.history['val_loss'])} ({how}).")

    def _predict(self, xs) -> np.ndarray:
        out = predict_network(self.module_, self._scale_inputs(xs), len(self.genes_))
        return out * self.y_std_ + self.y_mean_

    # ---- state ----------------------------------------------------------------------------------------------------

    @classmethod
    def _state_options(cls, config) -> dict:
        # states saved before dbk clipped the head's inputs have no head_input_clip: plain standardisation, as trained
        return super()._state_options(config) | {"input_clip": config.get("head_input_clip"),
                                                   "scale_inputs": bool(config.get("scale_inputs", True))}

    def _state_config(self) -> dict:
        return {"best_epoch": int(self.best_epoch_), "validation": self.validation_, "head_input_clip": self.input_clip,
                "scale_inputs": self.scale_inputs}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"module.{k}": v.detach().cpu().contiguous().clone() for k, v in self.module_.state_dict().items()}
        for i, (mu, s) in enumerate(zip(self.x_mean_, self.x_std_, strict=True)):
            out[f"x_mean.{i}"], out[f"x_std.{i}"] = tensor(mu), tensor(s)
        for i, keep in enumerate(getattr(self, "x_keep_", None) or []):
            out[f"x_keep.{i}"] = tensor(keep, np.uint8)
        out["y_mean"], out["y_std"] = tensor(self.y_mean_), tensor(self.y_std_)
        return out

    def _restore(self, config, tensors, *, device, history, config_file, tensor_file) -> None:
        from ._embed import resolve_device

        dims, genes = self.n_features_in_, self.genes_
        try:
            with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG be
                module = self._build(dims, len(genes))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_file}: invalid head settings ({err}).") from None
        if not isinstance(tensors, Mapping):
            raise ValueError(f"{tensor_file}: the head tensors must be a mapping of names to tensors.")
        state = {k.removeprefix("module."): v for k, v in tensors.items() if k.startswith("module.")}
        try:
            module.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError) as err:
            first = str(err).splitlines()[0:3]
            raise ValueError(f"{tensor_file} does not fit {len(genes)} genes and features {dims} of the config: "
                             f"{' '.join(first)}") from None
        n = len(dims)
        names = [f"{p}.{i}" for p in ("x_mean", "x_std") for i in range(n)] + ["y_mean", "y_std"]
        # the features the standardisation zeroes; not saved before dbk clipped the head's inputs (none zeroed then)
        with_keep = self.input_clip is not None or "x_keep.0" in tensors
        if with_keep:
            names += [f"x_keep.{i}" for i in range(n)]
        missing = [k for k in names if k not in tensors]
        if missing:
            raise ValueError(f"{tensor_file} lacks the standardisation tensor {missing[0]!r}.")
        t = arrays(tensors, names, tensor_file, "a torch head")
        x_mean, x_std = [t[f"x_mean.{i}"] for i in range(n)], [t[f"x_std.{i}"] for i in range(n)]
        x_keep = [t[f"x_keep.{i}"] > 0 for i in range(n)] if with_keep else None
        sizes_ok = all(a.shape == (d,) for arrs in (x_mean, x_std, x_keep or x_mean) for a, d in
                       zip(arrs, dims, strict=True)) and t["y_mean"].shape == t["y_std"].shape == (len(genes),)
        if not sizes_ok:
            raise ValueError(f"{tensor_file}: standardisation sizes do not fit the config.")
        scales = [*x_std, t["y_std"]]
        finite = all(np.isfinite(a).all() for a in [*x_mean, t["y_mean"], *scales])
        if not finite or any((s <= 0).any() for s in scales):
            raise ValueError(f"{tensor_file}: corrupt head: non-finite or non-positive standardisation values.")
        self.x_mean_, self.x_std_, self.x_keep_ = x_mean, x_std, x_keep
        self.y_mean_, self.y_std_ = t["y_mean"], t["y_std"]
        try:
            self.best_epoch_ = int(config.get("best_epoch", -1))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_file}: invalid head settings ({err}).") from None
        self.validation_ = config.get("validation")
        self.history_ = dict(history or {})
        self.module_ = module.to(resolve_device("auto" if device is None else device, what="device")).eval()
