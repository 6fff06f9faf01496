"""Where stage 1 runs: the device, HF Accelerate (bf16 autocast on CUDA) and a batch that fits the card."""

from __future__ import annotations

import atexit
import logging
import os

import torch

from .._logging import logger
from .._settings import DEVICE_CHOICES, DEVICE_NAMES, settings
from ._presets import PretrainerPreset, batch_for_memory


def resolve_device(accelerator: str | torch.device | None = "auto", *, what: str = "accelerator") -> torch.device:
    """The torch device of an ``accelerator`` setting: the one resolver of every ``accelerator=`` / ``device=``.

    ``"auto"`` or ``None`` (``dbk.settings.device``; its ``"auto"``: CUDA if available, else CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:<i>"`` (``"gpu"`` is ``"cuda"``), ``"mps"`` or a :class:`torch.device` (taken as is).
    ``what`` names the argument in the errors.

    Raises
    ------
    ValueError
        For another name.
    RuntimeError
        When it names CUDA and torch sees no CUDA device (or fewer than ``"cuda:<i>"`` needs).
    """
    if isinstance(accelerator, torch.device):
        return accelerator
    acc = "auto" if accelerator is None else accelerator
    if isinstance(acc, str) and acc == "auto":
        acc = settings.device
    if not isinstance(acc, str) or not DEVICE_NAMES.fullmatch(acc):
        raise ValueError(f"{what} must be {DEVICE_CHOICES} or a torch.device, got {accelerator!r}.")
    if acc == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if acc == "gpu":
        acc = "cuda"
    if acc.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{what}={accelerator!r} asks for CUDA, but torch sees no CUDA device.")
        index = int(acc.split(":")[1]) if ":" in acc else None
        if index is not None and index >= torch.cuda.device_count():
            raise RuntimeError(f"{what}={accelerator!r} asks for CUDA device {index}, but torch sees "
                               f"{torch.cuda.device_count()} (cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    return torch.device(acc)


def _named_device(accelerator) -> torch.device | None:
    """The device ``accelerator`` (or ``dbk.settings.device``) names; ``None`` when both are ``"auto"``."""
    device = resolve_device(accelerator)  # checks the name (and CUDA) in every case
    auto = accelerator is None or (isinstance(accelerator, str) and accelerator == "auto")
    return None if auto and settings.device == "auto" else device


def train_device(acc, accelerator) -> torch.device:
    """Where stage 1 trains: the device ``accelerator`` names (``"cuda:1"`` ...), or Accelerate's.

    Under ``accelerate launch`` (several processes) each process trains on the device the launcher gave it.
    """
    named = _named_device(accelerator)
    return named if named is not None and acc.num_processes == 1 else acc.device


_END_REGISTERED = False  # whether end_process_group_at_exit registered its atexit handler in this process


def end_process_group_at_exit() -> None:
    """Has the process group that a launcher's environment made dbk (Accelerate) set up torn down at exit.

    Left to the interpreter's finalisation, Gloo's worker threads outlive Python and the process can abort
    (``terminate called without an active exception``, SIGABRT) after the work is done, failing the launch. The handler
    runs while the interpreter is alive and does nothing when the user's code ended the group first.
    """
    global _END_REGISTERED
    if _END_REGISTERED or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    atexit.register(_end_process_group)
    _END_REGISTERED = True


def _end_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _accelerator(accelerator: str, devices):
    """An HF Accelerate ``Accelerator``: bf16 autocast on CUDA, full precision elsewhere."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    named = _named_device(accelerator)  # None: "auto" everywhere, Accelerate picks
    cpu = named is not None and named.type == "cpu"
    use_cuda = torch.cuda.is_available() if named is None else named.type == "cuda"
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
    end_process_group_at_exit()
    if not acc.is_main_process and not any(isinstance(f, _MainProcessOnly) for f in logger.filters):
        logger.addFilter(_MainProcessOnly())  # one process speaks: the others keep their warnings and errors only
    if named is not None and acc.num_processes == 1 and named != acc.device:
        acc.device_placement = False  # e.g. "cuda:1": fit puts the model there itself (train_device), prepare leaves it
    elif named is not None and named.index is not None and acc.num_processes > 1:
        logger.warning(f"accelerator={accelerator!r}: under `accelerate launch` each process trains on the device the "
                       f"launcher gives it ({acc.device} here).")
    n_dev = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, (list, tuple)) else None)
    if n_dev is not None and n_dev > 1 and acc.num_processes == 1:
        logger.warning(f"devices={devices!r}: several devices need a launch with `accelerate launch "
                       f"--num_processes {n_dev} your_script.py`; training on one device ({acc.device}).")
    return acc


class _MainProcessOnly(logging.Filter):
    """Drops the information lines of a process other than the main one of a distributed run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


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
