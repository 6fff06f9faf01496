"""Where stage 1 runs: the device, HF Accelerate (bf16 autocast on CUDA) and a batch that fits the card."""

from __future__ import annotations

import os

import torch

from .._logging import logger
from .._settings import settings
from ._presets import PretrainerPreset, batch_for_memory


def _resolve_device(device: str | torch.device | None) -> torch.device:
    device = settings.device if device in (None, "auto") else device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _accelerator(accelerator: str, devices):
    """An HF Accelerate ``Accelerator``: bf16 autocast on CUDA, full precision elsewhere."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu', 'cuda' or 'mps', got {accelerator!r}.")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"accelerator={accelerator!r} but CUDA is not available.")
    cpu = accelerator == "cpu" or (accelerator == "auto" and settings.device == "cpu")
    use_cuda = not cpu and torch.cuda.is_available()
    kwargs = {"mixed_precision": "bf16" if use_cuda else "no", "cpu": cpu}
    try:
        acc = Accelerator(**kwargs)
    except ValueError:
        # the process-wide AcceleratorState was set up differently by an earlier call; start it afresh when
        # nothing distributed depends on it
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(**kwargs)
    n_dev = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, (list, tuple)) else None)
    if n_dev is not None and n_dev > 1 and acc.num_processes == 1:
        logger.warning(f"devices={devices!r}: several devices need a launch with `accelerate launch "
                       f"--num_processes {n_dev} your_script.py`; training on one device ({acc.device}).")
    return acc



def _batch_for_device(p: PretrainerPreset, batch_size: int | None, device: torch.device) -> int:
    """The per-device batch: ``batch_size`` or the preset's, the latter lowered to what the CUDA card's memory fits."""
    bsz = int(batch_size or p.batch_size)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        fits = batch_for_memory(p, bsz, total)
        if fits < bsz and batch_size is None:
            logger.warning(f"fit: batch {bsz} of preset {p.name!r} needs more than this card's {total:.0f} GiB "
                           f"(measured memory per tile); batch lowered to {fits}. Pass batch_size= to override.")
            bsz = fits
        elif fits < bsz:
            logger.warning(f"fit: batch_size={bsz} may not fit this card's {total:.0f} GiB (about {fits} would, "
                           "from the measured memory per tile).")
    return bsz
