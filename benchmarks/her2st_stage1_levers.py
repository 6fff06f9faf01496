"""Stage-1 levers on her2st: does longer training, or fewer (more variable) gene tokens, make stage 1 learn more?

    python benchmarks/her2st_stage1_levers.py                          # patient split, 785-gene tokens, 300 steps
    python benchmarks/her2st_stage1_levers.py --steps 1000             # longer (resumes the 300-step checkpoint)
    python benchmarks/her2st_stage1_levers.py --token-genes 50         # top-50 HVG (training sections) as tokens

One fold (``--test``, default B4: train C2-C6). For the stage-1 model of the setting (checkpointed and resumed under
``benchmarks/_data/her2st/stage1/`` exactly as ``her2st.py`` does; a longer run continues a shorter one when its
folder is copied to the longer run's name) and an untrained U-Net of the same architecture, it reports:

- the stage-1 controls on the test section (``DiffusionPretrainer.evaluate``): denoising loss with the tile's own
  profile, with none, and with another tile's, at sigma 0.2 / 0.5 / 1 (``gain`` and ``gain_shuffled`` in %);
- stage 2 on the 785 genes: the test section's mean Pearson of reduced-rank ridge with spatial context (the
  ``ridge_cv_rr_ctx`` / ``diffbulk_ridge_rr_ctx`` head of ``her2st.py``) on FM features alone, on FM + trained
  diffusion features and on FM + untrained diffusion features, and of plain ``ridge_cv`` on the diffusion features
  alone.

With ``--generative N`` (the issue's "generative inference"): for N test tiles and C candidate profiles drawn from
the training tiles, the denoising loss of the tile conditioned on each candidate (same noise for all candidates,
sigma 0.5 and 1, two noise draws); the tile's predicted profile is the mean of its 3 best-denoising candidates. It
reports that prediction's mean Pearson over the 785 genes on the N tiles beside 3 random candidates (chance) and the
FM ridge head on the same tiles, and how often the tile's *own* profile denoises better than every candidate
(chance 1 / (C + 1)).

Appends one row per model to ``benchmarks/results/her2st_stage1_levers.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--cache", type=Path, default=HERE / "_data" / "her2st")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "her2st_stage1_levers.csv")
    ap.add_argument("--test", default="B4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--token-genes", type=int, default=None,
                    help="train stage 1 on the top-N genes by variance on the training sections (default: all 785)")
    ap.add_argument("--generative", type=int, default=0, metavar="N",
                    help="generative-inference probe on N test tiles (0: off)")
    ap.add_argument("--candidates", type=int, default=32, help="training profiles per tile for --generative")
    ap.add_argument("--dense", action="store_true",
                    help="stage 1 also on overlapping unlabeled grid tiles of the training sections (her2st.py "
                         "--stage1-dense)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    import dbk

    dbk.settings.progress = False
    dbk.settings.verbosity = 0
    sys.path.insert(0, str(HERE))
    from _her2st_diffbulk import DiffBulkContext
    from _her2st_features import CONTEXT_UM, SECTIONS, FeatureSettings, section_table, stack
    from _her2st_features import with_context as _with_context

    t_start = time.perf_counter()
    settings = FeatureSettings()
    genes = [g.strip() for g in (args.data / "genes_785.txt").read_text().splitlines() if g.strip()]
    full = {s: section_table(args.data / s, settings, args.cache)[0] for s in SECTIONS}
    train_s = tuple(s for s in SECTIONS if s != args.test)
    key = settings.obsm_key
    tables = {s: t[:, genes].copy() for s, t in full.items()}
    train, test = stack(tables, list(train_s), genes, key), stack(tables, [args.test], genes, key)
    groups = train.obs["sample"].astype(str).to_numpy()
    tokens = genes
    if args.token_genes:
        var = np.asarray(train.X.toarray() if hasattr(train.X, "toarray") else train.X).var(axis=0)
        tokens = [genes[j] for j in np.argsort(-var, kind="stable")[: args.token_genes]]
    folders = {s: str((args.data / s).resolve()) for s in SECTIONS}
    ctx = DiffBulkContext(tables=full, folders=folders, obsm_key=key, cache=args.cache, settings=settings, seed=0,
                          steps=args.steps, preset="cpu-small", dense=args.dense, stage1_batch=None, sigma=0.01)

    def predict(k, *, rank, context):
        tr, te = train.copy(), test.copy()
        if context:
            for a in (tr, te):
                a.obsm[k] = _with_context(a, SimpleNamespace(tables=full), k, CONTEXT_UM)
        model = dbk.tl.fit_baseline(tr, "ridge_cv", use_rep=k, genes=genes, groups=groups, rank=rank)
        return model.predict(te)

    def pearson(k, *, rank, context):
        te = test.copy()
        te.obsm["dbk_pred"] = predict(k, rank=rank, context=context)
        return float(dbk.tl.evaluate(te, genes=genes, key_added=None).attrs["summary"]["pearson_mean_all"])

    def mean_pearson(y, p):
        yc, pc = y - y.mean(0), p - p.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (yc * pc).sum(0) / np.sqrt((yc ** 2).sum(0) * (pc ** 2).sum(0))
        return float(np.nanmean(r))

    def generative(model) -> dict:
        """Generative inference on args.generative test tiles (see the module docstring)."""
        from dbk.core._data import _build_sources, _TileBatches

        def batches(sections):
            src = _build_sources([ctx.sdata(s) for s in sections], vocab=model.vocab, image_size=model.image_size,
                                 genes=tokens, table_key="dbk_table", tiles_key="dbk_tiles", unlabeled_tiles_key=None,
                                 labeled_only=True)
            names = [f"{s}:{o}" for s in sections for o in ctx.sdata(s).tables["dbk_table"].obs_names]
            return _TileBatches(src), names

        rng = np.random.default_rng(0)
        ds_te, names_te = batches([args.test])
        ds_tr, names_tr = batches(list(train_s))
        ti = np.sort(rng.choice(ds_te.n, min(args.generative, ds_te.n), replace=False))
        ci = rng.choice(ds_tr.n, args.candidates, replace=False)
        bt, bc = ds_te[ti], ds_tr[ci]
        toks = ("ids", "values", "mask")
        loss = np.zeros((len(ti), args.candidates + 1))  # column 0: the tile's own profile
        t0 = time.perf_counter()
        for sigma in (0.5, 1.0):
            for seed in (0, 1):
                loss[:, 0] += model._loss_tokens(bt["image"], {k: bt[k] for k in toks}, sigma, seed, True)
                for c in range(args.candidates):
                    tok = {k: bc[k][c:c + 1].expand(len(ti), -1).contiguous() for k in toks}
                    loss[:, c + 1] += model._loss_tokens(bt["image"], tok, sigma, seed, True)
        y_tr = pd.DataFrame(np.asarray(train.X.toarray() if hasattr(train.X, "toarray") else train.X),
                            index=train.obs_names, columns=genes)
        cand = y_tr.loc[[names_tr[i] for i in ci]].to_numpy()
        y_te = pd.DataFrame(np.asarray(test.X.toarray() if hasattr(test.X, "toarray") else test.X),
                            index=test.obs_names, columns=genes).loc[[names_te[i] for i in ti]].to_numpy()
        best = np.argsort(loss[:, 1:], axis=1)[:, :3]
        rand = np.stack([rng.choice(args.candidates, 3, replace=False) for _ in ti])
        fm = predict(key, rank="auto", context=True).loc[[names_te[i] for i in ti]].to_numpy()
        return {"gen_tiles": len(ti), "gen_candidates": args.candidates,
                "gen_pearson": round(mean_pearson(y_te, cand[best].mean(axis=1)), 4),
                "gen_pearson_random": round(mean_pearson(y_te, cand[rand].mean(axis=1)), 4),
                "gen_fm_rr_ctx_same_tiles": round(mean_pearson(y_te, fm), 4),
                "gen_own_best": round(float((loss[:, 0] < loss[:, 1:].min(axis=1)).mean()), 3),
                "gen_seconds": round(time.perf_counter() - t0, 1)}

    rows = []
    base = pearson(key, rank="auto", context=True)
    for kind in ("trained", "untrained"):
        t0 = time.perf_counter()
        model = ctx.pretrainer(kind, train_s, tokens)
        ev = model.evaluate([ctx.sdata(args.test)], sigmas=(0.2, 0.5, 1.0), random_state=0, max_tiles=512,
                            genes=tokens)
        for a in (train, test):
            feats = {s: ctx.features(kind, train_s, tokens, s) for s in pd.unique(a.obs["sample"].astype(str))}
            names = np.array([n.split(":", 1)[1] for n in a.obs_names])
            sec = a.obs["sample"].astype(str).to_numpy()
            d = np.zeros((a.n_obs, next(iter(feats.values())).shape[1]))
            for s, f in feats.items():
                d[sec == s] = f[pd.Index(ctx.sdata(s).tables["dbk_table"].obs_names).get_indexer(names[sec == s])]
            a.obsm["diff"] = d
            a.obsm["fm_diff"] = np.hstack([np.asarray(a.obsm[key]), d])
        row = {"test": args.test, "model": kind, "steps": int(model.step), "token_genes": len(tokens),
               "dense": bool(args.dense),
               **{f"{c}_s{r.sigma:g}": round(100 * float(r[c]), 2) for _, r in ev.iterrows()
                  for c in ("gain", "gain_shuffled")},
               "fm_rr_ctx": round(base, 4),
               "fm_diff_rr_ctx": round(pearson("fm_diff", rank="auto", context=True), 4),
               "diff_ridge_cv": round(pearson("diff", rank=None, context=False), 4),
               "seconds": round(time.perf_counter() - t0, 1)}
        if args.generative:
            row.update(generative(model))
        rows.append(row)
        print(row, flush=True)
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # earlier rows (their columns may differ: union)
        df = pd.concat([pd.read_csv(args.out), df], ignore_index=True)
    tmp = args.out.with_suffix(".tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(args.out)
    print(f"appended to {args.out}; {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
