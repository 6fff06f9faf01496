"""Print the her2st tables from one or more per-fold CSVs of ``her2st.py`` (e.g. runs of other methods, same folds).

    cd benchmarks/results && python ../her2st_table.py her2st_folds_s150.csv her2st_folds_s150_ridge_*.csv

Rows of a method and fold that appear in several files: the last file wins. The patient split is the LOSO fold
"test B4" (as in ``her2st.py``): a method run on only one of them is shown in both. The same columns as
``her2st.py``'s own tables (mean ± std over folds, ddof=1), plus each method's difference to ``--reference``
(paired per fold: the mean and std over folds of method - reference), which is what "above the best baseline by
more than twice its fold spread" asks about.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _her2st_features import SUMMARY_COLS, fmt, print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--reference", default="ridge_cv", help="method the paired differences are taken to")
    ap.add_argument("--top-k", type=int, default=50)
    args = ap.parse_args()
    df = pd.concat([pd.read_csv(p) for p in args.csv], ignore_index=True)
    df = df.drop_duplicates(["split", "fold", "method"], keep="last")
    # the patient split is the LOSO fold "test B4" (her2st.py reuses it): fill either from the other where missing
    for src, dst in (("patient", "loso"), ("loso", "patient")):
        if dst not in set(df["split"]):
            continue
        have = set(df.loc[(df["split"] == dst) & (df["fold"] == "B4"), "method"])
        add = df[(df["split"] == src) & (df["fold"] == "B4") & ~df["method"].isin(have)].assign(split=dst)
        df = pd.concat([df, add], ignore_index=True)
    cols = [c.format(k=args.top_k) for c in SUMMARY_COLS]
    methods = list(dict.fromkeys(df["method"]))
    for split in dict.fromkeys(df["split"]):
        print_table(df, split, cols, methods)
        sub = df[df["split"] == split]
        ref = sub[sub["method"] == args.reference].set_index("fold")
        if ref.empty or sub["fold"].nunique() < 2:
            continue
        print(f"\n  paired difference to {args.reference} (pearson_mean_all; mean ± std over folds; "
              "folds where higher)")
        for m in methods:
            r = sub[sub["method"] == m].set_index("fold")
            common = r.index.intersection(ref.index)
            if m == args.reference or not len(common):
                continue
            d = (r.loc[common, "pearson_mean_all"] - ref.loc[common, "pearson_mean_all"]).to_numpy(float)
            if not np.isfinite(d).any():
                continue
            print(f"  {m:26s} {fmt(list(d), 3):>16s}   {int((d > 0).sum())}/{len(d)}")


if __name__ == "__main__":
    main()
