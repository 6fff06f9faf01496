"""her2st benchmark: methods side by side on held-out sections, a thin caller of ``dbk.tl.benchmark``.

    python benchmarks/her2st.py                       # LOSO (6 folds): baselines, controls and DiffBulk
    python benchmarks/her2st.py --quick               # smoke run: LOSO folds B4 and C3, 100 genes, short stage 1
    python benchmarks/her2st.py --methods mean,ridge_cv,ridge_rr_ctx,diffbulk --splits loso
    python benchmarks/her2st.py --list-methods

Data: the six public her2st sections (B4, C2-C6) from ``dbk.datasets.her2st`` (``--data``: a local copy, by default
``../shared/data/her2st`` beside the repository when present; otherwise they are downloaded) and the 785 genes of
``dbk.datasets.her2st_genes``.

Protocol (docs/method.md), all inside ``dbk.tl.benchmark``: one tile of 112 µm centred on each spot, resampled to
224 px and embedded with the offline ImageNet EfficientNet-Lite0 (the same features for every method); targets log1p
of counts per 10k; every model choice (ridge alpha and rank, the DiffBulk head by ``fusion="auto"``, MLP early
stopping) made on the training sections only, grouped by section; one stage-1 model per fold, shared by the DiffBulk
methods and checkpointed under ``--checkpoint-dir`` (a rerun with the same settings resumes or reuses it).

Prints per split the mean ± std over folds (``dbk.tl.benchmark_summary``), the paired per-fold differences that say
where a gain comes from (``dbk.tl.paired_differences``) and, for DiffBulk, how well its per-gene CV score (made on the
training sections) ranks the genes' test Pearson (``cv_score_spearman``). Writes the tidy table
``her2st_results{tag}.csv`` and the per-fold wide table ``her2st_folds{tag}.csv`` to ``--out``.

The patient split (train C2-C6, test B4) is the LOSO fold "B4"; ``--splits patient`` runs that fold alone.

Noise floor: ``shuffled`` permutes the training targets across all training tiles (~0 mean Pearson);
``shuffled_within`` (registered here) permutes them within each training section, which keeps every section's mean
profile: the five training sections differ in depth and composition and the features tell the sections apart, so it
still learns a section-level axis (+0.02-0.05). Read it as "what a model gets from between-section differences alone".
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data" / "her2st"
DEFAULT_OUT = HERE / "results"
DEFAULT_CHECKPOINTS = HERE / "_data" / "her2st_stage1"
QUICK_LOSO = ("B4", "C3")
QUICK_GENES = 100
DEFAULT_METHODS = ("mean", "ridge_hest", "ridge_cv", "ridge_rr", "ridge_rr_ctx", "shuffled", "shuffled_within",
                   "diffbulk", "diffbulk_untrained", "diffbulk_no_genes")
CONTEXT_UM = 300.0  # the tile and its 8 nearest spots on her2st's 200 µm pitch
# the comparisons that say where a gain comes from: (method, reference, what the difference measures)
VERDICT = (
    ("diffbulk", "ridge_cv", "DiffBulk (default head) vs ridge on the FM features"),
    ("ridge_rr_ctx", "ridge_cv", "the head alone (reduced rank + context), FM features only"),
    ("diffbulk", "ridge_rr_ctx", "what DiffBulk adds to that head (diffusion features, head choice)"),
    ("diffbulk", "diffbulk_untrained", "what stage-1 *training* adds (vs an untrained U-Net)"),
    ("diffbulk", "diffbulk_no_genes", "what the genes add to stage 1 (vs stage 1 trained without them)"),
)


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else None,
                    help="folder with the sections B4, C2..C6 (and genes_785.txt); default: ../shared/data/her2st "
                         "when present, else downloaded by dbk.datasets.her2st")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the CSV tables")
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated method names or 'all'; default: {','.join(DEFAULT_METHODS)} "
                         "(--quick: without ridge_hest and diffbulk_no_genes)")
    ap.add_argument("--splits", default="loso", help="loso and/or patient (comma-separated)")
    ap.add_argument("--folds", default=None, help="comma-separated test sections: only these LOSO folds")
    ap.add_argument("--sections", default=None,
                    help="comma-separated sections to use at all (default all six); e.g. B4,C3,C6 with --splits loso "
                         "trains each fold on two sections")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: LOSO folds {'/'.join(QUICK_LOSO)}, first {QUICK_GENES} genes, 40 stage-1 steps")
    ap.add_argument("--n-genes", type=int, default=None, help="use the first N of the 785 genes")
    ap.add_argument("--top-k", type=int, default=50, help="k of the top-k HVG summary")
    ap.add_argument("--context-um", type=float, default=CONTEXT_UM, help="context radius of the *_ctx methods")
    ap.add_argument("--stage1-steps", type=int, default=None, help="stage-1 steps per fold (default 150; quick 40)")
    ap.add_argument("--stage1-preset", default="cpu-small", help="stage-1 preset (tiny, cpu-small, gpu, paper)")
    ap.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINTS,
                    help="stage-1 checkpoints per fold (keyed by the settings; resumed / reused)")
    ap.add_argument("--accelerator", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads")
    ap.add_argument("--tag", default="", help="suffix of the CSV files")
    ap.add_argument("--list-methods", action="store_true")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before numpy / torch are imported, so BLAS pools start at this size
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def shuffled_within(fold):
    """ridge_cv on training targets permuted across tiles within each training section (see the docstring)."""
    import dbk

    rng = np.random.default_rng([fold.seed, 1, *map(ord, fold.name)])
    perm = np.arange(fold.train.n_obs)
    for s in np.unique(fold.groups):
        idx = np.nonzero(fold.groups == s)[0]
        perm[idx] = rng.permutation(idx)
    train = fold.train.copy()
    train.X = fold.train.X[perm]
    for layer in [k for k in train.layers if k is not None]:
        train.layers[layer] = fold.train.layers[layer][perm]
    model = dbk.tl.fit_baseline(train, "ridge_cv", use_rep=fold.fm_key, genes=fold.genes, groups=fold.groups,
                                random_state=fold.seed)
    return model.predict(fold.test)


def folds(args, sections: list[str]) -> tuple[str | dict, str]:
    """The ``split`` argument of ``dbk.tl.benchmark`` and the split's name."""
    wanted = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in wanted if s not in ("loso", "patient")]
    if bad:
        raise SystemExit(f"Unknown split(s) {bad}; use loso, patient.")
    if args.folds:
        tests = [f.strip() for f in args.folds.split(",") if f.strip()]
    elif args.quick:
        tests = list(QUICK_LOSO)
    elif "loso" in wanted:
        return "loso", "loso"
    else:
        tests = ["B4"]  # the patient split: train C2-C6, test B4
    unknown = [t for t in tests if t not in sections]
    if unknown:
        raise SystemExit(f"Unknown sections {unknown}; the sections are {sections}.")
    return {t: [t] for t in tests}, "loso" if "loso" in wanted else "patient"


def print_summary(res: pd.DataFrame, top_k: int) -> None:
    import dbk

    metrics = ["pearson_mean_all", f"pearson_mean_top{top_k}_hvg", "spearman_mean_all", "mse_mean_all",
               "mae_mean_all", "cv_score_spearman"]
    summ = dbk.tl.benchmark_summary(res, metrics=[m for m in metrics if m in set(res["metric"])])
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(summ.to_string(float_format=lambda v: f"{v:.4f}"))


def print_verdict(res: pd.DataFrame) -> None:
    import dbk

    ran = set(res["method"])
    lines = []
    for a, b, what in VERDICT:
        if a in ran and b in ran:
            d = dbk.tl.paired_differences(res, a, b)
            lines.append(f"  {d.attrs['summary']['text']}\n      ({what})")
    if lines:
        print("\nWhere the gain comes from (mean Pearson over the genes, paired by fold: mean ± std of the difference "
              "over folds, and a 95% interval by resampling genes):")
        print("\n".join(lines))


def fold_details(res: pd.DataFrame, sections: dict, table_key: str = "dbk_table") -> pd.DataFrame:
    """Per fold and method: effective rank of the held-out predictions (and of the test table), and for methods with
    trust scores the CV-score/test-Pearson Spearman, the trusted genes and those of them with test r < 0."""
    from scipy.stats import spearmanr

    import dbk

    rows = []
    genes_of = {f: d["genes"] for f, d in res.attrs["folds"].items()}
    for fold, per_method in res.attrs["gene_scores"].items():
        tests = res.attrs["folds"][fold]["test"]
        for method, scores in per_method.items():
            r = pd.Series(scores["pearson"], dtype=float)
            row = {"fold": fold, "method": method}
            key = res.attrs["pred_keys"].get(method)
            preds, truth = [], []
            for t in tests:
                table = sections[t].tables[table_key]
                if key in table.obsm:
                    preds.append(table.obsm[key][genes_of[fold]].to_numpy())
                    x = table[:, genes_of[fold]].X
                    truth.append(x.toarray() if hasattr(x, "toarray") else x)
            if preds:
                row["pred_rank"] = dbk.tl.effective_rank(np.vstack(preds))
                row["test_rank"] = dbk.tl.effective_rank(np.vstack(truth))
            info = res.attrs["info"].get(fold, {}).get(method, {})
            cv = res.attrs["cv_pearson"].get(fold, {}).get(method)
            if cv:
                cv = pd.Series(cv, dtype=float).reindex(r.index)
                ok = cv.notna() & r.notna()
                row["cv_test_spearman"] = float(spearmanr(cv[ok], r[ok])[0])
                trusted = set(info.get("trusted_genes", []))
                t_mask = r.index.isin(list(trusted))
                row["n_genes"] = int(len(r))
                row["n_trusted"] = int(t_mask.sum())
                row["trusted_test_r_below_0"] = int((t_mask & (r < 0)).sum())
                row["test_r_trusted"] = float(r[t_mask].mean()) if t_mask.any() else float("nan")
                row["test_r_others"] = float(r[~t_mask].mean()) if (~t_mask).any() else float("nan")
                row["trust_scheme"] = info.get("trust_scheme", "")
            rows.append(row)
    return pd.DataFrame(rows)


def gene_table(res: pd.DataFrame) -> pd.DataFrame:
    """Tidy per-gene test scores (fold, method, gene, metric, value) with the CV scores and trust flags."""
    rows = []
    for fold, per_method in res.attrs["gene_scores"].items():
        for method, scores in per_method.items():
            cv = res.attrs["cv_pearson"].get(fold, {}).get(method) or {}
            trusted = set(res.attrs["info"].get(fold, {}).get(method, {}).get("trusted_genes", []))
            for gene in scores["pearson"]:
                rows.append({"fold": fold, "method": method, "gene": gene,
                             **{m: v.get(gene) for m, v in scores.items()},
                             "cv_pearson": cv.get(gene), "cv_trusted": gene in trusted if cv else None})
    return pd.DataFrame(rows)


def main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import dbk

    dbk.settings.progress = False
    dbk.settings.seed = args.seed
    dbk.tl.register_method("shuffled_within", shuffled_within, overwrite=True,
                           description="control: ridge_cv with training targets permuted within each section "
                                       "(keeps the sections' mean profiles)")
    if args.list_methods:
        print(dbk.tl.benchmark_methods().to_string(index=False))
        return
    t_start = time.perf_counter()
    sections = dbk.datasets.her2st(path=args.data)
    if args.sections:
        keep = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(keep) - set(sections))
        if unknown:
            raise SystemExit(f"--sections: unknown sections {unknown} (available: {sorted(sections)})")
        sections = {k: sections[k] for k in keep}
    genes = dbk.datasets.her2st_genes(path=args.data)
    n_genes = args.n_genes or (QUICK_GENES if args.quick else None)
    if n_genes:
        genes = genes[:n_genes]
    if args.methods in (None, ""):
        methods = [m for m in DEFAULT_METHODS if not (args.quick and m in ("ridge_hest", "diffbulk_no_genes"))]
    elif args.methods == "all":
        methods = list(dbk.tl.benchmark_methods()["name"])
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    split, split_name = folds(args, list(sections))
    steps = args.stage1_steps if args.stage1_steps is not None else (40 if args.quick else 150)
    print(f"her2st: {len(sections)} sections, {len(genes)} genes, methods {methods}, split {split_name}, stage 1 "
          f"{args.stage1_preset} x {steps} steps, {args.threads} thread(s)", flush=True)
    res = dbk.tl.benchmark(sections, methods=methods, split=split, genes=genes, top_k=args.top_k,
                           preset=args.stage1_preset, pretrain_steps=steps, random_state=args.seed,
                           checkpoint_dir=args.checkpoint_dir, accelerator=args.accelerator,
                           context_um=args.context_um)
    res["split"] = split_name
    res.attrs["split"] = split_name  # a given set of LOSO folds is still LOSO: the per-gene scores follow
    wall = time.perf_counter() - t_start
    print(f"\n{split_name.upper()}: {res['fold'].nunique()} fold(s) (test {', '.join(res['fold'].unique())}); "
          f"mean ± std over folds; {len(genes)} genes")
    print_summary(res, args.top_k)
    print_verdict(res)
    info = res.attrs["info"]
    heads = {f: d["diffbulk"].get("head") for f, d in info.items() if "diffbulk" in d}
    if heads:
        print("\nDiffBulk's head per fold (fusion='auto', chosen by inner CV on the training sections):")
        for f, h in heads.items():
            print(f"  {f}: {h}")
    for f, s in res.attrs["stage1"].items():
        if s:
            print(f"stage 1 [{f}]: " + ", ".join(f"{k} {v['steps']} steps {v['seconds']:.0f} s"
                                                 for k, v in s.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    tidy = args.out / f"her2st_results{tag}.csv"
    res.to_csv(tidy, index=False, float_format="%.6g")
    wide = res.pivot_table(index=["split", "fold", "method"], columns="metric", values="value").reset_index()
    secs = res.groupby(["fold", "method"])["seconds"].first().rename("fit_predict_s").reset_index()
    wide = wide.merge(secs, on=["fold", "method"])
    wide["n_genes"] = len(genes)
    wide["info"] = [json_info(info.get(f, {}).get(m, {})) for f, m in zip(wide["fold"], wide["method"], strict=True)]
    folds_csv = args.out / f"her2st_folds{tag}.csv"
    wide.to_csv(folds_csv, index=False, float_format="%.6g")
    details = fold_details(res, sections)
    print("\nPer fold: effective rank of the held-out predictions (test table's), and the trust scores")
    print(details.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    details.to_csv(args.out / f"her2st_details{tag}.csv", index=False, float_format="%.6g")
    gene_csv = args.out / f"her2st_genes{tag}.csv"
    gene_table(res).to_csv(gene_csv, index=False, float_format="%.6g")
    print(f"\ntables: {tidy} (tidy), {folds_csv} (per fold), {gene_csv} (per gene); total wall time {wall:.0f} s")


def json_info(d: dict) -> str:
    import json

    return json.dumps({k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}) if d else ""


if __name__ == "__main__":
    main(ARGS)
