"""Which diffusion features? Noise level and pooling of ``dbk.tl.diffusion_features``, chosen by inner CV.

    python benchmarks/her2st_diffusion_sweep.py                      # patient split (train C2-C6, test B4), 300 steps
    python benchmarks/her2st_diffusion_sweep.py --sigmas 0.01,0.2,0.5 --pools mean,mean+std

For each setting: diffusion features of every section's tiles from the fold's stage-1 model (the same checkpoint
``her2st.py --stage1-steps N`` trains), concatenated with the FM features, then ridge with alpha by inner CV grouped
by training section (``ridge_cv``). The table gives the inner-CV score of the chosen alpha (relative MSE, lower is
better; training sections only) and, beside it, the test section's mean Pearson over the 785 genes. A setting is
*chosen* by the inner-CV column only; the test column is there to see whether that choice was right.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--cache", type=Path, default=HERE / "_data" / "her2st")
    ap.add_argument("--test", default="B4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sigmas", default="0.01,0.2,0.5")
    ap.add_argument("--pools", default="mean,mean+std")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from _her2st_diffbulk import DiffBulkContext
    from _her2st_features import SECTIONS, FeatureSettings, section_table, stack

    import dbk

    dbk.settings.progress = False
    settings = FeatureSettings()
    tables = {s: section_table(args.data / s, settings, args.cache)[0] for s in SECTIONS}
    genes = [g.strip() for g in (args.data / "genes_785.txt").read_text().splitlines() if g.strip()]
    train_s = tuple(s for s in SECTIONS if s != args.test)
    sub = {s: t[:, genes].copy() for s, t in tables.items()}
    key = settings.obsm_key
    train, test = stack(sub, list(train_s), genes, key), stack(sub, [args.test], genes, key)
    groups = train.obs["sample"].astype(str).to_numpy()
    ctx = DiffBulkContext(tables=tables, folders={s: str(args.data / s) for s in SECTIONS}, obsm_key=key,
                          cache=args.cache, settings=settings, seed=0, steps=args.steps, preset="cpu-small",
                          dense=False, stage1_batch=None, sigma=0.01)
    model = ctx.pretrainer("trained", train_s, genes)

    def score(tr, te, obsm_key):
        m = dbk.tl.fit_baseline(tr, "ridge_cv", use_rep=obsm_key, genes=genes, groups=groups, random_state=0)
        te.obsm["p"] = m.predict(te)
        s = dbk.tl.evaluate(te, pred_key="p", genes=genes, train_adata=tr, key_added=None).attrs["summary"]
        return float(m.cv_results_["score"].min()), float(np.median(np.atleast_1d(m.alpha_))), s["pearson_mean_all"]

    rows = [("FM only", "", *score(train, test, key), 0.0)]
    for pool in args.pools.split(","):
        for sigma in [float(v) for v in args.sigmas.split(",")]:
            t0 = time.perf_counter()
            feats = {}
            for s in SECTIONS:
                sd = ctx.sdata(s)
                dbk.tl.diffusion_features(sd, model, sigma=sigma, pool=pool, random_state=0, key_added="sweep")
                feats[s] = np.asarray(sd.tables["dbk_table"].obsm["sweep"])
            tr, te = train.copy(), test.copy()
            for a in (tr, te):
                sec = a.obs["sample"].astype(str).to_numpy()
                names = np.array([n.split(":", 1)[1] for n in a.obs_names])
                f = np.zeros((a.n_obs, feats[SECTIONS[0]].shape[1]), np.float32)
                for s in np.unique(sec):
                    idx = ctx.sdata(s).tables["dbk_table"].obs_names.get_indexer(names[sec == s])
                    f[sec == s] = feats[s][idx]
                a.obsm["fm_diff"] = np.hstack([np.asarray(a.obsm[key]), f])
            rows.append((f"FM + diffusion, pool {pool}", f"{sigma:g}", *score(tr, te, "fm_diff"),
                         time.perf_counter() - t0))
            print(f"  {rows[-1]}", flush=True)
    best = min(range(len(rows)), key=lambda i: rows[i][2])
    print(f"\nPatient-style split: train {'+'.join(train_s)}, test {args.test}; stage 1 cpu-small {model.step} steps")
    print(f"{'features':32s} {'sigma':>6s} {'inner-CV rel. MSE':>18s} {'alpha':>10s} {'test pearson':>13s} {'s':>6s}")
    for i, (name, sig, cv, alpha, r, sec) in enumerate(rows):
        mark = "  <- chosen by inner CV" if i == best else ""
        print(f"{name:32s} {sig:>6s} {cv:18.5f} {alpha:10.3g} {r:13.3f} {sec:6.0f}{mark}")


if __name__ == "__main__":
    main()
