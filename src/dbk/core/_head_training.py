"""Training of the stage-2 torch heads on arrays (torch core): masked MSE, early stopping on a held-out split, seeded.

The AnnData-facing regressors (:class:`dbk.tl.MLPBaseline`, :class:`dbk.tl.FusionRegressor`) standardise the
features and targets and call :func:`train_network` / :func:`predict_network` here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ._device import end_process_group_at_exit

PREDICT_BATCH = 4096  # tiles per forward pass when predicting or scoring the validation tiles


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the stage-2 heads train and predict under it there); a no-op elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the entries where ``mask`` is 1 (genes measured on the tile).

    Masked entries contribute nothing, whatever they hold (NaN included), to the loss or its gradient; the mean is
    over the unmasked entries (0 when there are none). ``mask=None`` is the plain MSE.

    Parameters
    ----------
    pred
        Predictions, e.g. (tiles, genes).
    target
        Targets, the same shape.
    mask
        The same shape, 1 where the target was measured and 0 where not; ``None``: every entry counts.

    Returns
    -------
    torch.Tensor
        The scalar loss.
    """
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


@dataclass
class TrainedNetwork:
    """What :func:`train_network` returns: the network at its best epoch (in eval mode) and the loss curves."""

    net: nn.Module
    best_loss: float
    best_epoch: int  # index of the restored epoch (-1: no epoch improved on the start)
    history: dict[str, list[float]] = field(default_factory=dict)  # {"train_loss": [...], "val_loss": [...]}


def train_network(
    build: Callable[[], nn.Module],
    inputs: Sequence[torch.Tensor],
    y: torch.Tensor,
    mask: torch.Tensor,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    device: torch.device,
    seed: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    max_epochs: int = 200,
    patience: int = 15,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> TrainedNetwork:
    """Train ``build()`` on ``inputs`` (one tensor per feature set, tiles first) to predict ``y`` where ``mask``.

    AdamW on the masked MSE over shuffled batches of ``train_idx``; after each epoch the masked MSE on ``val_idx``;
    stops after ``patience`` epochs without a better validation loss and restores the best epoch. Initialisation,
    shuffling and dropout draw from torch's RNG seeded with ``seed`` (the caller's RNG state is restored). On CUDA
    it runs under bf16 autocast. ``on_epoch(epoch, train_loss, val_loss)`` is called after each epoch (progress).

    Started by ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1), it trains data-parallel with torch's DDP:
    every process holds all tiles, draws the same permutation, and computes its slice of each global batch of
    ``batch_size`` x processes tiles; the loss of a slice is its share of the global batch's masked MSE, so without
    dropout N processes train like one process with an N times larger batch (up to the all-reduce's summation order).
    """
    world, rank = _process_group(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        net = build().to(device)
        model = net
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(net, device_ids=cuda or None)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        tr_t, va_t = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
        best, best_state, best_epoch, wait = np.inf, None, -1, 0
        history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
        for epoch in range(max_epochs):
            net.train()
            perm = tr_t[torch.randperm(len(tr_t))]
            total, seen = 0.0, 0
            for s in range(0, len(perm), batch_size * world):
                b = perm[s : s + batch_size * world]
                if world == 1:
                    with autocast(device):
                        out = model(*[t[b].to(device) for t in inputs])
                    loss = masked_mse(out.float(), y[b].to(device), mask[b].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, seen = total + loss.item() * len(b), seen + len(b)
                    continue
                mine = torch.tensor_split(b, world)[rank]  # this process's slice of the global batch
                count = mask[b].sum().clamp_min(1.0).to(device)  # measured entries of the whole global batch
                with autocast(device):
                    out = model(*[t[mine].to(device) for t in inputs])
                m = mask[mine].to(device)
                err = torch.where(m > 0, out.float() - y[mine].to(device), torch.zeros_like(out, dtype=torch.float32))
                sse = (err * err * m).sum()
                opt.zero_grad(set_to_none=True)
                (sse * world / count).backward()  # DDP averages over processes: the sum is the global masked MSE
                opt.step()
                glob = sse.detach().clone()
                torch.distributed.all_reduce(glob)
                total, seen = total + float(glob / count) * len(b), seen + len(b)
            val = validation_loss(net, inputs, y, mask, va_t, device)
            history["train_loss"].append(total / max(seen, 1))
            history["val_loss"].append(val)
            if on_epoch is not None:
                on_epoch(epoch, history["train_loss"][-1], val)
            if val < best - 1e-6:
                best, best_epoch, wait = val, epoch, 0
                best_state = copy.deepcopy(net.state_dict())
            else:
                wait += 1
                if wait >= patience:
                    break
    if best_state is not None:
        net.load_state_dict(best_state)
    return TrainedNetwork(net.eval(), float(best), best_epoch, history)


def _process_group(device: torch.device) -> tuple[int, int]:
    """``(world size, rank)``: (1, 0) in one process; under a launcher, the process group (set up by Accelerate)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")  # initialises torch.distributed from the launcher's environment
    end_process_group_at_exit()
    return int(state.num_processes), int(state.process_index)


@torch.inference_mode()
def validation_loss(net: nn.Module, inputs: Sequence[torch.Tensor], y: torch.Tensor, mask: torch.Tensor,
                    idx: torch.Tensor, device: torch.device) -> float:
    """The masked MSE of ``net`` on the tiles ``idx`` (weighted by their measured entries)."""
    net.eval()
    total, weight = 0.0, 0.0
    for s in range(0, len(idx), PREDICT_BATCH):
        b = idx[s : s + PREDICT_BATCH]
        mb = mask[b].to(device)
        with autocast(device):
            out = net(*[t[b].to(device) for t in inputs])
        total += float(masked_mse(out.float(), y[b].to(device), mb)) * float(mb.sum().clamp_min(1.0))
        weight += float(mb.sum().clamp_min(1.0))
    return total / max(weight, 1.0)


@torch.inference_mode()
def predict_network(net: nn.Module, inputs: Sequence[torch.Tensor], n_out: int) -> np.ndarray:
    """``net`` on ``inputs`` (one tensor per feature set) on the network's device, as a float32 array (tiles x out)."""
    device = next(net.parameters()).device
    net.eval()
    with autocast(device):
        outs = [net(*[t[s : s + PREDICT_BATCH].to(device) for t in inputs]).float().cpu().numpy()
                for s in range(0, len(inputs[0]), PREDICT_BATCH)]
    return np.concatenate(outs) if outs else np.zeros((0, n_out), np.float32)
