"""benchmarks/her2st_combine.py: per-fold runs combined; paired differences with a t interval over folds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "her2st_combine.py"


def _tidy(path: Path, fold: str, values: dict[str, float]) -> Path:
    rows = [{"split": "loso", "fold": fold, "method": m, "metric": metric, "seconds": 1.0,
             "value": v + (0.5 if metric != "pearson_mean_all" else 0.0)}
            for m, v in values.items() for metric in ("pearson_mean_all", "spearman_mean_all")]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_combine_prints_paired_differences_with_a_t_interval(tmp_path):
    a = {"B4": 0.14, "C2": 0.13, "C3": 0.15}
    b = {"B4": 0.12, "C2": 0.125, "C3": 0.12}
    files = [_tidy(tmp_path / f"r_{f}.csv", f, {"diffbulk": a[f], "ridge_cv": b[f]}) for f in a]
    out = tmp_path / "diffs.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, files), "--csv", str(out)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = np.array([a[f] - b[f] for f in a])
    half = t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("diffbulk - ridge_cv"))
    assert f"{d.mean():+.4f} ± {d.std(ddof=1):.4f}" in line
    assert f"95% [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]" in line and "higher on 3/3" in line
    got = pd.read_csv(out)
    np.testing.assert_allclose(got.sort_values("fold")["difference"], d)


def test_combine_refuses_a_fold_given_twice(tmp_path):
    one = _tidy(tmp_path / "a.csv", "B4", {"diffbulk": 0.1})
    two = _tidy(tmp_path / "b.csv", "B4", {"diffbulk": 0.2})
    proc = subprocess.run([sys.executable, str(SCRIPT), str(one), str(two)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode != 0 and "more than one table" in proc.stderr


@pytest.mark.parametrize("content", ["a,b\n1,2\n"])
def test_combine_names_a_table_of_another_kind(tmp_path, content):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(bad)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode != 0 and "bad.csv is not a tidy her2st_results table" in proc.stderr
