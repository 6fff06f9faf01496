"""benchmarks/device_check.py --dry-run: the GPU machine's script runs on the CPU at toy size, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads((out / "device_check.json").read_text())
    sec = res["sections"]
    assert res["meta"]["dry_run"] is True
    for name in ("env", "tests", "trial", "throughput", "stage2"):
        assert name in sec and "error" not in sec[name], (name, sec.get(name))
    tests = sec["tests"]
    assert tests["returncode"] == 0 and len(tests["tests"]) >= 8
    assert all(t["outcome"] == "passed" for t in tests["tests"]), tests["tests"]
    trial = sec["trial"]
    assert set(trial["models"]) == {"cond", "nocond", "untrained"}
    assert trial["models"]["cond"]["steps"] > 0 and trial["models"]["nocond"]["cond_drop"] == 1.0
    assert {r["sigma"] for r in trial["conditioning"]} == {0.2, 0.5, 1.0}
    rows = {r["features"]: r for r in sec["stage2"]["rows"]}
    assert "FM (EfficientNet-Lite0)" in rows and "FM + diffusion (cond)" in rows
    # the toy tiles' colours follow the genes: any of the heads is far above chance
    assert rows["FM (EfficientNet-Lite0)"]["pearson_mean_all"] > 0.3
    assert len(sec["stage2"]["paired"]) >= 4
    thr = sec["throughput"]["rows"]
    assert [r["compile"] for r in thr] == [False, False, True]
    assert all(r["images_per_s"] > 0 for r in thr)
    md = (out / "device_check.md").read_text()
    assert "## Fair trial" in md and "## Stage-1 training throughput" in md and "Paired differences" in md
    assert (out / "trial_features.npz").is_file()
