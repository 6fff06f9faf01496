"""Stage-1 training checkpoints: periodic single-file snapshots for an exact resume.

A checkpoint (``checkpoint-<step>.pt`` in the run's ``checkpoint_dir``, written atomically, the last
:data:`_KEEP_CHECKPOINTS` kept) holds the weights, the EMA, the optimizer, the step, the history, the unlogged loss
window, the training time and the torch RNG. Batches, noise and dropout are seeded by the step number, so a resumed
run reaches the weights of an uninterrupted one. The architecture and the data are fingerprinted: a checkpoint of
another model is refused, and one of other data (slide names, tile counts, genes) unless ``resume="force"``.

These are our own files rather than Accelerate's ``save_state`` / ``load_state`` folders: one atomic file per step,
the architecture check and the keep-N limit, readable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp
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
    """The checkpoint with the highest step in ``checkpoint_dir`` (``None`` when there is none).

    Parameters
    ----------
    checkpoint_dir
        A stage-1 checkpoint folder (``fit_pretrainer(checkpoint_dir=...)``); it need not exist.

    Returns
    -------
    pathlib.Path | None
        The ``checkpoint-<step>.pt`` file of the highest step, or ``None`` when the folder is missing or holds none.
    """
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = sorted(d.glob(f"{_CKPT_PREFIX}*.pt"))
    return found[-1] if found else None


def data_values_fingerprint(dataset) -> str:
    """A hash of the training profiles' values (and measured masks), beside the dataset's names / counts / genes one.

    Two datasets with the same slide names, tile counts and genes (two seeds of a synthetic slide, a re-run
    pseudo-bulk with other settings) differ here; the same data gives the same hash in every process.
    """
    h = hashlib.sha256()
    for s in dataset.sources:
        if s.x is None:
            h.update(b"|none")
            continue
        if sp.issparse(s.x):
            m = s.x.tocsr()
            h.update(f"|csr{m.shape}".encode())
            for arr in (np.asarray(m.data, np.float32), np.asarray(m.indices, np.int64),
                        np.asarray(m.indptr, np.int64)):
                h.update(np.ascontiguousarray(arr).tobytes())
        else:
            x = np.ascontiguousarray(np.asarray(s.x, np.float32))
            h.update(f"|dense{x.shape}".encode())
            h.update(x.tobytes())
        if s.measured is not None:
            h.update(np.packbits(np.asarray(s.measured, bool)).tobytes())
    return h.hexdigest()[:16]


def _read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types on truncated or foreign files
        raise ValueError(f"Checkpoint {path} is unreadable or corrupt ({err}); delete it to resume from the "
                         "previous one, or train from scratch into another checkpoint_dir.") from None
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
                "values_fingerprint": str(getattr(self, "_values_fingerprint", None)),
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

    def _load_checkpoint(self, path: Path, optimizer, *, seed: int, fingerprint: str, other_data: bool = False
                         ) -> None:
        """Resume from ``path``; refused (ValueError) for another architecture, and for other data unless asked.

        Other data: another dataset fingerprint (slide names, tile counts, genes), or other profile values
        (:func:`data_values_fingerprint`, when the checkpoint records them); resumed with a warning when
        ``other_data`` (``resume="force"``).
        """
        state = _read_checkpoint(path)
        arch = json.loads(state["architecture"])
        mine = self._architecture()
        if arch != mine:
            diff = sorted(k for k in mine if arch.get(k) != mine[k])
            raise ValueError(f"Checkpoint {path} was written by a different model (differs in {diff}); use another "
                             "checkpoint_dir.")
        if state["seed"] != seed:
            logger.warning(f"Resuming {path} written with random_state={state['seed']} using {seed}.")
        values, mine = state.get("values_fingerprint", "None"), str(getattr(self, "_values_fingerprint", None))
        if state["fingerprint"] != fingerprint:
            why = (f"its data fingerprint {state['fingerprint']}, this data's {fingerprint}: other slides, tile counts "
                   "or genes")
        elif "None" not in (values, mine) and values != mine:  # checkpoints of older dbk versions lack the values
            why = f"same slides, tile counts and genes, but other expression values: hash {values}, this data's {mine}"
        else:
            why = None
        if why is not None:
            if not other_data:
                raise ValueError(
                    f"Checkpoint {path} is a run on other data ({why}), at step {int(state['step'])}; "
                    "resuming it would continue, or if finished simply return, that run's stage-1 model. To train "
                    "on this data from scratch use another checkpoint_dir (or empty this one); to continue that run "
                    "on this data pass resume='force' (fit_diffbulk: pretrain_kwargs={'resume': 'force'}).")
            logger.warning(f"Resuming {path} on other data than it was trained on ({why}), as resume='force' asks.")
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
