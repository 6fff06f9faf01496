"""Stage-1 training checkpoints: periodic single-file snapshots for an exact resume.

A checkpoint (``checkpoint-<step>.pt`` in the run's ``checkpoint_dir``, written atomically, the last
:data:`_KEEP_CHECKPOINTS` kept) holds the weights, the EMA, the optimizer, the step, the history, the unlogged loss
window, the training time and the torch RNG. Batches, noise and dropout are seeded by the step number, so a resumed
run reaches the weights of an uninterrupted one. The architecture is fingerprinted: a checkpoint of another model
is refused.

These are our own files rather than Accelerate's ``save_state`` / ``load_state`` folders: one atomic file per step,
the architecture check and the keep-N limit, readable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .._logging import logger
from ._folder import cpu_tensors
from ._presets import PretrainerPreset

CHECKPOINT_FORMAT = "dbk.DiffusionPretrainer.checkpoint"
_CKPT_PREFIX = "checkpoint-"
_KEEP_CHECKPOINTS = 2


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return cpu_tensors(module.state_dict())


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``checkpoint_dir`` (``None`` when there is none)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = sorted(d.glob(f"{_CKPT_PREFIX}*.pt"))
    return found[-1] if found else None


def _read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types on truncated or foreign files
        raise ValueError(f"Checkpoint {path} is unreadable or corrupt ({err}); delete it to resume from the "
                         "previous one, or use resume=False.") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dbk pretrainer checkpoint.")
    return state


class _CheckpointMixin:
    """Checkpoint methods of the pretrainer (uses its ``config()``, networks, step, history and loss window)."""

    def _architecture(self) -> dict:
        """What must match for a checkpoint to resume into this model (shapes and meaning of the weights)."""
        c = self.config()
        return {k: c[k] for k in ("image_size", "vocab", "encoder", "edm")} | {
            "preset": {k: c["preset"][k] for k in PretrainerPreset.ARCHITECTURE}
        }

    def _save_checkpoint(self, ckpt_dir: Path, optimizer, *, seed: int, fingerprint: str, acc) -> Path | None:
        from .._utils import atomic_path

        path = ckpt_dir / f"{_CKPT_PREFIX}{self.step:09d}.pt"
        if acc.is_main_process:
            state = {
                "format": CHECKPOINT_FORMAT,
                "config": json.dumps(self.config()),
                "architecture": json.dumps(self._architecture()),
                "step": self.step,
                "seed": seed,
                "fingerprint": fingerprint,
                "net": _cpu_state(self.net),
                "ema": _cpu_state(self.ema_net),
                "optimizer": optimizer.state_dict(),
                "history": json.dumps(self.history),
                "window": torch.tensor([float(v) for v in self._window], dtype=torch.float64),
                "train_time": self.train_time,
                "torch_rng": torch.get_rng_state(),
            }
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            for old in sorted(ckpt_dir.glob(f"{_CKPT_PREFIX}*.pt"))[:-_KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)
        acc.wait_for_everyone()
        return path

    def _load_checkpoint(self, path: Path, optimizer, *, seed: int, fingerprint: str) -> None:
        state = _read_checkpoint(path)
        arch = json.loads(state["architecture"])
        mine = self._architecture()
        if arch != mine:
            diff = sorted(k for k in mine if arch.get(k) != mine[k])
            raise ValueError(f"Checkpoint {path} was written by a different model (differs in {diff}); use another "
                             "checkpoint_dir or resume=False.")
        if state["seed"] != seed:
            logger.warning(f"Resuming {path} written with random_state={state['seed']} using {seed}.")
        if state["fingerprint"] != fingerprint:
            logger.warning(f"Resuming {path} on different data than it was trained on.")
        self.net.load_state_dict(state["net"])
        self.ema_net.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self._window = [float(v) for v in state["window"]]
        self.train_time = float(state["train_time"])
        self.tile_size_um = json.loads(state["config"]).get("tile_size_um", self.tile_size_um)
        torch.set_rng_state(state["torch_rng"])
        logger.info(f"fit: resumed from {path} at step {self.step}.")
