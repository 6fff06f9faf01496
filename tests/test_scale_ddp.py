"""Several processes, one training: stage 1 data-parallel under torchrun / accelerate launch (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_stage1.py"
TOL = 1e-4  # the gradient all-reduce sums in another order than one process does: float32 rounding, ~1e-5 here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, batch: int, steps: int, *, procs: int = 1, resume: Path | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [str(SCRIPT), str(out), str(batch), str(steps)] + ([str(resume)] if resume else [])
    cmd = [sys.executable, *args] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_doubled_batch_and_resume_in_one(tmp_path):
    log2 = _run(tmp_path / "two", batch=4, steps=4, procs=2)
    _run(tmp_path / "one", batch=8, steps=4)
    one = torch.load(tmp_path / "one" / "weights-rank0.pt")
    r0 = torch.load(tmp_path / "two" / "weights-rank0.pt")
    r1 = torch.load(tmp_path / "two" / "weights-rank1.pt")
    assert r0["step"] == r1["step"] == one["step"] == 4
    for k in ("net", "ema"):
        assert _max_diff(r0[k], r1[k]) == 0.0  # the processes hold one model
        assert _max_diff(r0[k], one[k]) < TOL, k
    assert [h["loss"] for h in r0["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-4)
    # nothing written twice: one process writes the checkpoints, one process logs
    assert r0["writes"] == ["checkpoint-000000002.pt", "checkpoint-000000004.pt"] and r1["writes"] == []
    assert log2.count("INFO dbk: fit: 32 tiles") == 1
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt").iterdir()) == ["checkpoint-000000002.pt",
                                                                            "checkpoint-000000004.pt"]
    # the 2-process checkpoint resumes in one process and ends where an uninterrupted one-process run ends
    log = _run(tmp_path / "resumed", batch=8, steps=6, resume=tmp_path / "two" / "ckpt")
    assert "resumed from" in log and "at step 4" in log
    _run(tmp_path / "straight", batch=8, steps=6)
    a = torch.load(tmp_path / "resumed" / "weights-rank0.pt")
    b = torch.load(tmp_path / "straight" / "weights-rank0.pt")
    for k in ("net", "ema"):
        assert _max_diff(a[k], b[k]) < TOL, k
