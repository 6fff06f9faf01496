"""benchmarks/device_check.py --dry-run and benchmarks/device_cells.py: the GPU machine's script runs on the CPU at
toy size, and its cells are scored here, so neither can rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, **kw)


@pytest.mark.slow
def test_device_check_cell_dry_run_and_its_stage2(tmp_path):
    out = tmp_path / "out"
    proc = _run([REPO / "benchmarks" / "device_check.py", "--dry-run", "--out", out, "--cell", "C2:1"], timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((out / "device_check.json").read_text())
    sec = res["sections"]
    assert res["meta"]["dry_run"] is True
    for name in ("env", "cell"):
        assert name in sec and "error" not in sec[name], (name, sec.get(name))
    cell = sec["cell"]
    assert cell["fold"] == "C2" and cell["seed"] == 1 and "C2" not in cell["train"] and len(cell["train"]) == 5
    # the same fixed number of steps for both trained models; the untrained one has none
    assert cell["models"]["cond"]["steps"] == cell["models"]["nocond"]["steps"] == 6
    assert cell["models"]["nocond"]["cond_drop"] == 1.0 and cell["models"]["untrained"]["steps"] == 0
    assert {r["sigma"] for r in cell["conditioning"]} == {0.2, 0.5, 1.0}
    md = (out / "device_check.md").read_text()
    assert "## Stage-1 trial cell: test C2, seed 1" in md
    with np.load(out / "cell_C2_s1.npz") as z:
        meta = json.loads(str(z["meta"]))
        assert meta["fold"] == "C2" and meta["seed"] == 1 and meta["steps"] == 6 and meta["commit"]
        n = len(z["spot_id"])
        for m in ("cond", "nocond", "untrained"):
            assert z[f"feat_{m}"].dtype == np.float16 and z[f"feat_{m}"].shape[0] == n
        assert z["loss_cond"].shape[1] == 2 and z["loss_cond"][-1, 0] == 6  # (step, loss) rows up to the last step
        # same seed, same initial weights: the two trained models moved away from the untrained one
        assert not np.array_equal(z["feat_cond"], z["feat_untrained"])
    assert not list(out.glob(".*.tmp*"))  # written atomically

    # a second cell of another fold, then stage 2 of both here, into a marked block of a markdown file
    out2 = tmp_path / "out2"
    proc = _run([REPO / "benchmarks" / "device_check.py", "--dry-run", "--out", out2, "--cell", "B4:0",
                 "--work", out / "work", "--sections", "cell"], timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    cells = tmp_path / "cells"
    cells.mkdir()
    for p in (out / "cell_C2_s1.npz", out2 / "cell_B4_s0.npz"):
        (cells / p.name).write_bytes(p.read_bytes())
    doc = tmp_path / "doc.md"
    doc.write_text("# x\n\nbefore\n<!-- device-cells:begin -->\nOLD-BLOCK\n<!-- device-cells:end -->\nafter\n")
    csv = tmp_path / "rows.csv"
    proc = _run([REPO / "benchmarks" / "device_cells.py", "--data", out / "work" / "data", cells, "--heads",
                 "early,late", "--docs", doc, "--csv", csv], timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    text = doc.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- device-cells:begin -->") and text.endswith(
        "<!-- device-cells:end -->\nafter\n")
    assert "OLD-BLOCK" not in text and "| B4/s0 |" in text and "| C2/s1 |" in text
    assert text.index("| B4/s0 |") < text.index("| C2/s1 |")  # the trial's order: B4 first
    assert "late:cond - late:nocond" in text and "2/2" not in text.split("late:cond - late:nocond")[0]
    import pandas as pd

    rows = pd.read_csv(csv)
    assert set(rows["fold"]) == {"B4/s0", "C2/s1"}
    assert {"FM", "early:cond", "late:untrained"} <= set(rows["method"])
    # the toy tiles' colours follow the genes: every head is far above chance on both folds
    assert (rows["value"] > 0.3).all()
    # a cell given twice is refused, not silently scored twice
    (cells / "dup").mkdir()
    (cells / "dup" / "cell_B4_s0.npz").write_bytes((cells / "cell_B4_s0.npz").read_bytes())
    proc = _run([REPO / "benchmarks" / "device_cells.py", "--data", out / "work" / "data", cells, cells / "dup",
                 "--heads", "early"], timeout=600)
    assert proc.returncode != 0 and "appears twice" in proc.stderr


def test_device_check_refuses_a_bad_cell(tmp_path):
    proc = _run([REPO / "benchmarks" / "device_check.py", "--dry-run", "--out", tmp_path, "--cell", "Z9:0",
                 "--sections", "env"], timeout=300)
    assert proc.returncode != 0 and "--cell must be FOLD:SEED" in proc.stderr
