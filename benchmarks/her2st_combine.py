"""Combine her2st benchmark runs made one fold per call into one table, with paired differences over the folds.

    python benchmarks/her2st_combine.py benchmarks/results_committed/her2st_loso_s500_2026-12-07/her2st_results_*.csv
    python benchmarks/her2st_combine.py RUN_A/her2st_results_*.csv RUN_B/her2st_results_*.csv   # extra methods

``benchmarks/her2st.py --folds F --tag ...`` writes one tidy table per call (``her2st_results<tag>.csv``). This script
reads any number of them (one method of one fold may appear once: a repeated (split, fold, method) is an error, not a
silent choice), prints the mean Pearson over genes of every method per fold, the mean ± std over folds
(``dbk.tl.benchmark_summary``) and, for the comparisons of ``benchmarks/her2st.py`` (``VERDICT``), the paired per-fold
differences with

- their mean, std (ddof 1) and the folds where the first method is higher, and
- a t 95 % interval of the mean difference over folds (``mean ± t_{0.975, n-1} * std / sqrt(n)``): the folds are the
  replicates (held-out sections); this is the interval issue 22 asks to be above 0 for a default to "earn its
  place". The per-gene bootstrap of ``dbk.tl.paired_differences`` needs the per-gene tables and says how sure a
  difference is on these sections only, so it is not repeated here.

``--csv`` writes the combined per-fold differences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from her2st import VERDICT  # noqa: E402

METRIC = "pearson_mean_all"


def read_results(paths: list[Path]) -> pd.DataFrame:
    """The tidy tables concatenated; a (split, fold, method) given twice raises."""
    if not paths:
        raise SystemExit("No tables given (her2st_results*.csv files of benchmarks/her2st.py).")
    frames = []
    for p in paths:
        df = pd.read_csv(p)
        missing = {"split", "fold", "method", "metric", "value"} - set(df.columns)
        if missing:
            raise SystemExit(f"{p} is not a tidy her2st_results table (missing columns {sorted(missing)}).")
        frames.append(df.assign(source=str(p)))
    res = pd.concat(frames, ignore_index=True)
    cells = res[res["metric"] == METRIC].groupby(["split", "fold", "method"])["source"].nunique()
    twice = cells[cells > 1]
    if len(twice):
        raise SystemExit(f"These (split, fold, method) appear in more than one table: {list(twice.index)}; "
                         "pass each once.")
    return res


def fold_table(res: pd.DataFrame) -> pd.DataFrame:
    """Folds x methods of the metric."""
    sub = res[res["metric"] == METRIC]
    return sub.pivot_table(index="fold", columns="method", values="value", aggfunc="first")


def paired(table: pd.DataFrame, a: str, b: str) -> dict:
    """Per-fold ``a - b`` and the t 95 % interval of its mean over the folds where both ran."""
    from scipy.stats import t

    d = (table[a] - table[b]).dropna()
    n = len(d)
    mean = float(d.mean()) if n else np.nan
    sd = float(d.std(ddof=1)) if n > 1 else np.nan
    half = float(t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else np.nan
    return {"a": a, "b": b, "n_folds": n, "mean": mean, "std": sd, "ci_low": mean - half, "ci_high": mean + half,
            "n_higher": int((d > 0).sum()), "per_fold": d}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tables", nargs="+", type=Path, help="her2st_results*.csv files")
    ap.add_argument("--csv", type=Path, default=None, help="write the per-fold differences here")
    args = ap.parse_args(argv)
    res = read_results(args.tables)
    table = fold_table(res)
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 200):
        print(f"Mean Pearson over genes ({METRIC}), per held-out section:")
        print(table.to_string())
        print("\nmean ± std over folds:")
        for m in table.columns:
            col = table[m].dropna()
            print(f"  {m:<22} {col.mean():.4f} ± {col.std(ddof=1):.4f}  ({len(col)} folds)")
    rows = []
    print("\nPaired differences (per fold; t 95 % interval of the mean over folds):")
    for a, b, what in VERDICT:
        if a in table.columns and b in table.columns:
            p = paired(table, a, b)
            folds = ", ".join(f"{f} {v:+.4f}" for f, v in p["per_fold"].items())
            print(f"  {a} - {b}: {p['mean']:+.4f} ± {p['std']:.4f}, 95% [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}], "
                  f"higher on {p['n_higher']}/{p['n_folds']}  ({folds})\n      ({what})")
            rows += [{"a": a, "b": b, "fold": f, "difference": v} for f, v in p["per_fold"].items()]
    if args.csv is not None and rows:
        pd.DataFrame(rows).to_csv(args.csv, index=False)
        print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
