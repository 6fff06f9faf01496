"""A stage-2 head network trained by the core loop, for tests/test_scale.py: alone or under `torchrun`.

    python ddp_head.py OUT_DIR BATCH

Writes OUT_DIR/head-rank<r>.pt (the trained weights, best epoch and loss curves of every process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from dbk.core._head_training import train_network  # noqa: E402


def main(out: Path, batch: int) -> None:
    rng = np.random.default_rng(0)
    n, d, g = 96, 8, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, :g] * 0.5 + rng.normal(scale=0.3, size=(n, g))).astype(np.float32)
    mask = (rng.random((n, g)) > 0.2).astype(np.float32)  # genes not measured on some tiles
    idx = rng.permutation(n)
    res = train_network(lambda: torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.GELU(), torch.nn.Linear(16, g)),
                        [torch.as_tensor(x)], torch.as_tensor(y), torch.as_tensor(mask), np.sort(idx[20:]),
                        np.sort(idx[:20]), device=torch.device("cpu"), seed=0, batch_size=batch, max_epochs=6,
                        patience=10)
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"net": res.net.state_dict(), "best_epoch": res.best_epoch, "history": res.history},
               out / f"head-rank{rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    main(out, int(sys.argv[2]))
