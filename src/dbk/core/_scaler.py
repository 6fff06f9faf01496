"""Standardisation of feature blocks before a stage-2 head (torch core: numpy and torch only)."""

from __future__ import annotations

import numpy as np
import torch

INPUT_CLIP = 5.0


class InputScaler:
    """Standardise features on the head's training tiles, clip to ``±clip``, zero the features constant there.

    Two failure modes of plain standardisation on foundation-model embeddings, both seen on the synthetic demo (the
    head's held-out loss was 5 rather than 0.6, and ~1e28 once the features had been re-centred):

    - a channel that barely fires on the training tiles (ReLU6 units of an ImageNet CNN on H&E) has a tiny standard
      deviation; on a new slide where it fires, its z-score reaches hundreds or thousands and the head extrapolates;
    - a channel constant on the training tiles, whose float standard deviation is a rounding residue (1e-17) rather
      than 0, turns any other value into ~1e17.

    So features are z-scored, clipped to ``±clip`` (a feature's training tiles too, so a rare channel keeps a bounded
    spread), and those constant on the training tiles (std <= 1e-6 x the median std) are set to exactly 0. The
    head's own standardisation then stays bounded.
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray, keep: np.ndarray, clip: float = INPUT_CLIP) -> None:
        self.mean = np.asarray(mean, np.float64)
        self.scale = np.asarray(scale, np.float64)
        self.keep = np.asarray(keep, bool)
        self.clip = float(clip)

    @classmethod
    def fit(cls, x: np.ndarray, clip: float = INPUT_CLIP) -> InputScaler:
        x = np.asarray(x, np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0)
        ref = float(np.median(std)) if std.size else 0.0
        keep = std > 1e-6 * max(ref, 1e-12)
        return cls(mean, np.where(keep, std, 1.0), keep, clip)

    def transform(self, x: np.ndarray, *, return_clipped: bool = False):
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        clipped = int(((np.abs(z) > self.clip) & self.keep).sum())
        z = np.where(self.keep, np.clip(z, -self.clip, self.clip), 0.0).astype(np.float32)
        return (z, clipped) if return_clipped else z  # clipped: the number of values clipped

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}mean": torch.as_tensor(self.mean), f"{prefix}scale": torch.as_tensor(self.scale),
                f"{prefix}keep": torch.as_tensor(self.keep.astype(np.uint8))}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str, clip: float) -> InputScaler:
        return cls(t[f"{prefix}mean"].numpy(), t[f"{prefix}scale"].numpy(), t[f"{prefix}keep"].numpy() > 0, clip)
