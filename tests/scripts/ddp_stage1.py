"""Stage 1 on tiny seeded arrays, for tests/test_scale.py: run alone, or by `torchrun --nproc_per_node N`.

    python ddp_stage1.py OUT_DIR BATCH STEPS [RESUME_FROM]

Writes OUT_DIR/weights-rank<r>.pt (the raw and EMA state of every process, and the names of the files it wrote through
dbk's atomic writer) and checkpoints in OUT_DIR/ckpt; with
RESUME_FROM, copies that checkpoint folder first and resumes from it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

import dbk._utils  # noqa: E402
from dbk.core import DiffusionPretrainer, TileArrays  # noqa: E402

_atomic_path = dbk._utils.atomic_path
WRITES: list[str] = []


def _recording_atomic_path(path):  # every file this process writes through dbk's atomic writer, for the test
    WRITES.append(Path(path).name)
    return _atomic_path(path)


dbk._utils.atomic_path = _recording_atomic_path


def tiles() -> TileArrays:
    rng = np.random.default_rng(0)
    n, size = 32, 16
    x = rng.random((n, 3)).astype(np.float32)
    img = np.clip(60 + 150 * x[:, None, None, :1] + rng.normal(0, 15, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return TileArrays(img, X=x, genes=["A", "B", "C"], name="s", tile_size_um=56.0)


def main(out: Path, batch: int, steps: int, resume_from: str | None) -> None:
    ckpt = out / "ckpt"
    if resume_from and int(os.environ.get("RANK", "0")) == 0:
        shutil.copytree(resume_from, ckpt, dirs_exist_ok=True)
    model = DiffusionPretrainer(["A", "B", "C"], preset="tiny", random_state=0, image_size=16,
                                block_out_channels=(16, 32), gene_dim=32, warmup_steps=2, log_every=1,
                                checkpoint_every=2)
    model.fit(tiles(), max_steps=steps, batch_size=batch, accelerator="cpu", checkpoint_dir=ckpt, num_workers=0)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"net": model.net.state_dict(), "ema": model.ema_net.state_dict(), "step": model.step,
                "history": model.history, "writes": WRITES}, out / f"weights-rank{rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    main(out, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
