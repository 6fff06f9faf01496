"""her2st benchmark: leave-one-section-out (6 folds) and the patient split (train C2-C6, test B4), methods side by side.

    python benchmarks/her2st.py                       # full: all available methods, LOSO + patient
    python benchmarks/her2st.py --quick               # smoke run: 2 LOSO folds + patient, 100 genes, no MLP
    python benchmarks/her2st.py --methods mean,ridge_cv --splits loso
    python benchmarks/her2st.py --list-methods

Protocol (docs/method.md): one tile of 112 µm centred on each spot, resampled to 224 px, embedded with the offline
ImageNet EfficientNet-Lite0 (the same features for every method); targets log1p of counts per 10k (normalised over
the whole library); genes: the 785 of genes_785.txt, and the top 50 of them by variance on the *training* sections of
each fold. Every model choice (ridge alpha, MLP early stopping) is made on training sections only, grouped by
section. Per-section tables with embeddings are cached under benchmarks/_data/her2st/ (keyed by the settings).

Prints one table per split type: per method the mean ± std over folds (sample std, ddof=1; "-" with one fold) of
pearson_mean_all, pearson_mean_top50_hvg, spearman_mean_all, mse_mean_all, mae_mean_all and the wall time of fit +
predict (mean per fold and total). Writes the per-fold metrics to benchmarks/results/her2st_folds.csv.

Noise floor: ``ridge_cv_shuffled`` permutes the training targets across tiles *within* each section, which keeps
every section's mean profile; the five training sections differ in depth (median 8.5k-12.4k counts per tile on C2-C6)
and composition, and the features tell the sections apart, so the control still learns a section-level axis that,
inside a C test section, tracks tile depth (|r| ~0.35-0.45 with log counts) and gives +0.02-0.05 mean Pearson.
With the section means removed after shuffling, or with ``ridge_cv_shuffled_all`` (targets permuted across all
training tiles), it is ~0 +- 0.01. Read ridge_cv_shuffled as "what a model gets from between-section differences
alone", ridge_cv_shuffled_all as the pure noise floor.

Methods are a registry ``name -> fn(train, test, genes, groups, ctx) -> DataFrame`` (tiles of ``test`` x ``genes``;
or ``(DataFrame, info dict)``). ``train``/``test`` are AnnData tile tables (targets in ``X``, features in
``obsm[ctx.obsm_key]``, ``obs["sample"]``, tile pixel bounds ``obs[x0, y0, x1, y1]``); ``groups`` is the training
section of each training tile; ``ctx`` holds the settings, the full per-section tables (all genes) and the section
folders, for methods that need the images (DiffBulk). Add a method with ``register("name", fn, "what it is")``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "her2st"
DEFAULT_CACHE = HERE / "_data" / "her2st"
DEFAULT_OUT = HERE / "results"
QUICK_LOSO = ("B4", "C3")
QUICK_GENES = 100


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with B4, C2..C6 and genes_785.txt")
    ap.add_argument("--genes", type=Path, default=None, help="gene list (default <data>/genes_785.txt)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="per-section h5ad cache")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for her2st_folds.csv")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method names, or 'all' (every registered one, unavailable ones reported); "
                         "default: baselines + control + the DiffBulk methods if available (quick: no MLP)")
    ap.add_argument("--splits", default="loso,patient", help="comma-separated: loso, patient")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: LOSO folds {'/'.join(QUICK_LOSO)} only + patient, first {QUICK_GENES} genes, "
                         "no MLP")
    ap.add_argument("--n-genes", type=int, default=None, help="use the first N genes of the list")
    ap.add_argument("--top-k", type=int, default=50, help="k of the top-k HVG summary")
    ap.add_argument("--tile-um", type=float, default=112.0)
    ap.add_argument("--size-px", type=int, default=224)
    ap.add_argument("--model", default="efficientnet_lite0", help="foundation model for the features")
    ap.add_argument("--pixel-size-um", type=float, default=None,
                    help="µm per pixel of the H&E (default: estimated from the spot pitch, ~0.688)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch / BLAS threads (1 is often fastest on a shared 2-core machine)")
    ap.add_argument("--stage1-steps", type=int, default=None,
                    help="stage-1 optimizer steps per fold (default 150, ~3 min a fold on 2 cores; --quick 60); "
                         "checkpoints resume")
    ap.add_argument("--stage1-preset", default="cpu-small", help="stage-1 preset (tiny, cpu-small, paper)")
    ap.add_argument("--stage1-batch", type=int, default=None, help="stage-1 batch size (the preset's by default)")
    ap.add_argument("--stage1-dense", action="store_true",
                    help="also train stage 1 unconditionally on overlapping grid tiles over the training tissue")
    ap.add_argument("--sigma", type=float, default=0.01, help="noise level of the diffusion features")
    ap.add_argument("--folds", default=None,
                    help="comma-separated test sections: run only these LOSO folds (e.g. B4,C2)")
    ap.add_argument("--tag", default="", help="suffix of the CSV files (runs with other settings side by side)")
    ap.add_argument("--list-methods", action="store_true")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before numpy / torch are imported, so BLAS pools start at this size
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

sys.path.insert(0, str(HERE))
from _her2st_features import SECTIONS, FeatureSettings, check_genes, section_table  # noqa: E402

SUMMARY_COLS = ("pearson_mean_all", "pearson_mean_top{k}_hvg", "spearman_mean_all", "mse_mean_all", "mae_mean_all")
EXTRA_COLS = ("spearman_mean_top{k}_hvg", "pearson_mean_top{k}_best", "spearman_per_tile_mean", "pearson_flattened",
              "n_genes_nan_pearson")


class NotAvailable(RuntimeError):
    """A registered method that cannot run yet (e.g. its dbk function has not landed)."""


# ---- method registry -------------------------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    fn: Callable
    description: str
    default: bool = True  # in the default selection
    quick: bool = True  # in the default --quick selection
    notes: list[str] = field(default_factory=list)


METHODS: dict[str, Method] = {}


def register(name: str, fn: Callable, description: str, *, default: bool = True, quick: bool = True,
             notes: list[str] | None = None) -> None:
    """Add a method: ``fn(train, test, genes, groups, ctx) -> DataFrame`` (or ``(DataFrame, info)``)."""
    METHODS[name] = Method(name, fn, description, default, quick, list(notes or []))


def _baseline(method: str, **kwargs) -> Callable:
    def fn(train, test, genes, groups, ctx):
        import dbk

        model = dbk.tl.fit_baseline(train, method, use_rep=ctx.obsm_key, genes=genes, groups=groups,
                                    **({"random_state": ctx.seed} if method != "mean" else {}), **kwargs)
        info = {}
        if hasattr(model, "alpha_"):
            a = model.alpha_
            info["alpha"] = float(a) if np.ndim(a) == 0 else float(np.median(a))
        if getattr(model, "rank_", None) is not None:
            info["rank"] = int(model.rank_)
        if getattr(model, "n_components_", None):
            info["pca"] = int(model.n_components_)
        if hasattr(model, "best_epoch_"):
            info["best_epoch"] = int(model.best_epoch_) + 1
        return model.predict(test), info

    return fn


def _shuffled(within_section: bool) -> Callable:
    """Noise-floor control: ridge_cv on training targets permuted across tiles (within each section, or across all).

    Within-section shuffling keeps each section's mean profile, so whatever separates the training *sections* in
    feature space (depth, stain, composition) can still be learned; shuffling across all training tiles removes that
    too (see the module docstring, "Noise floor").
    """

    def fn(train, test, genes, groups, ctx):
        rng = np.random.default_rng([ctx.seed, int(within_section), *map(ord, ctx.fold)])  # same test -> same shuffle
        if within_section:
            perm = np.arange(train.n_obs)
            for s in np.unique(groups):
                idx = np.nonzero(groups == s)[0]
                perm[idx] = rng.permutation(idx)
        else:
            perm = rng.permutation(train.n_obs)
        shuffled = train.copy()
        shuffled.X = train.X[perm]
        for layer in list(shuffled.layers):
            shuffled.layers[layer] = train.layers[layer][perm]
        return _baseline("ridge_cv")(shuffled, test, genes, groups, ctx)

    return fn


def _call_accepting(fn: Callable, *args, **kwargs):
    """Call ``fn`` with only the keyword arguments its signature accepts (unless it takes ``**kwargs``)."""
    import inspect

    sig = inspect.signature(fn)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    return fn(*args, **kwargs)


CONTEXT_UM = 300.0  # spatial context radius: the tile and its 8 nearest spots on her2st's 200 µm pitch


def _diffbulk(fusion: str, *, diffusion: str = "trained", **options) -> Callable:
    """DiffBulk (``fit_diffbulk`` + ``predict``) with the fold's stage-1 model (``"trained"`` or ``"untrained"``).

    ``options`` go to ``fit_diffbulk`` (``rank``, ``context_um`` ...).
    """

    def fn(train, test, genes, groups, ctx):
        from _her2st_diffbulk import diffbulk_predict

        return diffbulk_predict(ctx.diff, fusion, diffusion, ctx.train_s, ctx.test_s, list(genes), ctx.seed,
                                **options)

    return fn


def _with_context(adata, ctx, key: str, radius_um: float) -> np.ndarray:
    """``[features, their mean within radius_um]`` per section (µm from each section's estimated pixel size)."""
    from dbk.tl import neighbor_mean

    sections = adata.obs["sample"].astype(str).to_numpy()
    um = np.asarray([ctx.tables[s].uns["her2st_bench"]["pixel_size_um"] for s in sections], np.float64)
    coords = np.asarray(adata.obsm["spatial"], np.float64) * um[:, None]
    x = np.asarray(adata.obsm[key], np.float64)
    return np.hstack([x, neighbor_mean(coords, x, radius_um, sections)])


def _ridge_rr(*, context: bool) -> Callable:
    """ridge_cv with reduced-rank targets (rank by inner CV), on FM features (with their spatial context)."""

    def fn(train, test, genes, groups, ctx):
        key = ctx.obsm_key
        if context:
            key = f"{ctx.obsm_key}_ctx"
            train, test = train.copy(), test.copy()
            for a in (train, test):
                a.obsm[key] = _with_context(a, ctx, ctx.obsm_key, CONTEXT_UM)
        model_fn = _baseline("ridge_cv", rank="auto")
        df, info = model_fn(train, test, genes, groups, SimpleNamespace(**{**vars(ctx), "obsm_key": key}))
        return df, info

    return fn


def _diff_ridge(diffusion: str, *, with_fm: bool) -> Callable:
    """ridge_cv on the fold's diffusion features (alone, or concatenated with the FM features)."""

    def fn(train, test, genes, groups, ctx):
        from _her2st_diffbulk import attach

        key = "X_bench_diff"
        tr = attach(train, ctx.diff, diffusion, tuple(ctx.train_s), list(genes), key)
        te = attach(test, ctx.diff, diffusion, tuple(ctx.train_s), list(genes), key)
        if with_fm:
            for a in (tr, te):
                a.obsm[key] = np.hstack([np.asarray(a.obsm[ctx.obsm_key]), a.obsm[key]])
        sub = SimpleNamespace(**{**vars(ctx), "obsm_key": key})
        return _baseline("ridge_cv")(tr, te, genes, groups, sub)

    return fn


register("mean", _baseline("mean"), "training mean of each gene (the floor)")
register("ridge_hest", _baseline("ridge_hest"),
         "HEST-Benchmark: StandardScaler, PCA 256, ridge alpha = 100 / (256 * n_genes), no intercept (as HEST)")
register("ridge_cv", _baseline("ridge_cv"),
         "StandardScaler + ridge, alpha from logspace(-2, 8, 21) by inner CV grouped by training section")
register("mlp", _baseline("mlp"),
         "MLP on FM features (dbk MLPBaseline: 256 hidden, GELU, dropout 0.1, AdamW, early stopping on a held-out "
         "training section)", quick=False)
register("ridge_cv_shuffled", _shuffled(True),
         "control: ridge_cv with training targets shuffled across tiles within each section (noise floor)")
register("ridge_cv_shuffled_all", _shuffled(False),
         "control: ridge_cv with training targets shuffled across all training tiles (pure noise floor)")
register("diffbulk_gated", _diffbulk("gated"), "DiffBulk, gated residual fusion of FM and diffusion features")
register("diffbulk_concat", _diffbulk("concat"), "DiffBulk, concat fusion")
register("diffbulk_ridge", _diffbulk("ridge"),
         "DiffBulk, linear head (fusion='ridge': ridge on FM + diffusion features, alpha by inner CV over sections)")
register("ridge_cv_rr", _ridge_rr(context=False),
         "ridge_cv with reduced-rank targets (target PCA rank and alpha by the same inner CV), FM features: the "
         "DiffBulk rr head without diffusion features")
register("ridge_cv_rr_ctx", _ridge_rr(context=True),
         f"ridge_cv_rr on FM features and their mean within {CONTEXT_UM:g} µm (spatial context): the DiffBulk "
         "rr_ctx head without diffusion features, the bar for stage 1")
register("diffbulk_ridge_rr", _diffbulk("ridge", rank="auto"),
         "DiffBulk, reduced-rank ridge head (fusion='ridge', rank='auto')")
register("diffbulk_ridge_rr_ctx", _diffbulk("ridge", rank="auto", context_um=CONTEXT_UM),
         f"DiffBulk, reduced-rank ridge head on FM + diffusion features and their mean within {CONTEXT_UM:g} µm "
         "(context_um)")
register("diffbulk_ridge_rr_ctx_late", _diffbulk("ridge", rank="auto", context_um=CONTEXT_UM, blend="late"),
         "diffbulk_ridge_rr_ctx with late fusion (blend='late': one ridge per feature block, FM weight by inner CV)")
register("diffbulk_untrained_ridge_rr_ctx_late", _diffbulk("ridge", diffusion="untrained", rank="auto",
                                                           context_um=CONTEXT_UM, blend="late"),
         "control: diffbulk_ridge_rr_ctx_late with the diffusion features of an untrained U-Net")
register("diffbulk_untrained_ridge_rr_ctx", _diffbulk("ridge", diffusion="untrained", rank="auto",
                                                      context_um=CONTEXT_UM),
         "control: diffbulk_ridge_rr_ctx with the diffusion features of an untrained U-Net")
register("diffbulk_untrained_gated", _diffbulk("gated", diffusion="untrained"),
         "control: DiffBulk gated with the diffusion features of an untrained U-Net (same architecture and seed)")
register("diff_ridge", _diff_ridge("trained", with_fm=False),
         "ridge_cv on the trained stage-1 diffusion features alone (no FM)")
register("diff_untrained_ridge", _diff_ridge("untrained", with_fm=False),
         "control: ridge_cv on an untrained U-Net's diffusion features alone")
register("fm_diff_ridge", _diff_ridge("trained", with_fm=True),
         "ridge_cv on FM and trained diffusion features concatenated (a linear fusion)")
register("fm_diff_untrained_ridge", _diff_ridge("untrained", with_fm=True),
         "control: ridge_cv on FM and an untrained U-Net's diffusion features concatenated")
DIFFBULK = ("diffbulk_gated", "diffbulk_concat", "diffbulk_ridge", "diffbulk_ridge_rr", "diffbulk_ridge_rr_ctx",
            "diffbulk_untrained_ridge_rr_ctx", "diffbulk_untrained_gated", "diff_ridge",
            "diff_untrained_ridge", "fm_diff_ridge", "fm_diff_untrained_ridge")


# ---- folds, data -----------------------------------------------------------------------------------------------------


def folds(splits: list[str], quick: bool) -> list[tuple[str, str, list[str], list[str]]]:
    """(split, fold name, train sections, test sections)."""
    out = []
    for split in splits:
        if split == "loso":
            tests = QUICK_LOSO if quick else SECTIONS
            out += [("loso", t, [s for s in SECTIONS if s != t], [t]) for t in tests]
        elif split == "patient":
            out.append(("patient", "B4", [s for s in SECTIONS if s != "B4"], ["B4"]))
        else:
            raise SystemExit(f"Unknown split {split!r}; use loso, patient.")
    return out


def stack(tables: dict, sections: list[str], genes: list[str], obsm_key: str):
    """Concatenate section tables (genes already subset) with ``dbk.pp.concat``; re-attach the features."""
    import dbk

    cat = dbk.pp.concat({s: tables[s] for s in sections}, genes=genes)
    want = pd.Index([f"{s}:{n}" for s in sections for n in tables[s].obs_names])
    feats = np.vstack([np.asarray(tables[s].obsm[obsm_key]) for s in sections])
    pos = want.get_indexer(cat.obs_names)
    if (pos < 0).any():
        raise RuntimeError(f"concat renamed tiles unexpectedly (e.g. {list(cat.obs_names[:3])}).")
    cat.obsm[obsm_key] = feats[pos]
    if list(cat.var_names) != list(genes):
        raise RuntimeError("concat changed the gene order.")
    return cat


def fmt(values: list[float], digits: int) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def print_table(df: pd.DataFrame, split: str, cols: list[str], methods: list[str]) -> None:
    sub = df[df["split"] == split]
    n_folds = sub["fold"].nunique()
    header = ["method", *cols, "s/fold", "s total"]
    rows = []
    for m in methods:
        r = sub[sub["method"] == m]
        if r.empty:
            continue
        digits = [3 if c.startswith(("pearson", "spearman")) else 4 for c in cols]
        rows.append([m, *[fmt(r[c].tolist(), d) for c, d in zip(cols, digits, strict=True)],
                     f"{r['fit_predict_s'].mean():.1f}", f"{r['fit_predict_s'].sum():.1f}"])
    folds_txt = ", ".join(sub["fold"].unique())
    spread = "mean ± std over folds (ddof=1)" if n_folds > 1 else "one fold"
    print(f"\n{split.upper()}: {n_folds} fold(s) (test {folds_txt}); {spread}; "
          f"{int(sub['n_genes'].iloc[0])} genes")
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    for i, row in enumerate([header, *rows]):
        print("  ".join(f"{v!s:<{w}}" if j == 0 else f"{v!s:>{w}}" for j, (v, w) in enumerate(zip(row, widths,
                                                                                             strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# the comparisons that say where a gain comes from: (method, reference, what the difference measures)
VERDICT = (
    ("diffbulk_ridge_rr_ctx", "ridge_cv", "DiffBulk (best head) vs the issue's best baseline"),
    ("ridge_cv_rr_ctx", "ridge_cv", "the head alone (reduced rank + context), FM features only"),
    ("diffbulk_ridge_rr_ctx", "ridge_cv_rr_ctx", "what the diffusion features add to that head"),
    ("diffbulk_ridge_rr_ctx", "diffbulk_untrained_ridge_rr_ctx", "what stage-1 *training* adds (vs untrained U-Net)"),
    ("fm_diff_ridge", "fm_diff_untrained_ridge", "stage-1 training, plain ridge on FM + diffusion features"),
)


def print_verdict(df: pd.DataFrame) -> None:
    """Paired per-fold differences of mean Pearson (785 genes) for the pairs of :data:`VERDICT` that ran."""
    wide = df.pivot_table(index="fold", columns="method", values="pearson_mean_all")
    lines = []
    for a, b, what in VERDICT:
        if a in wide and b in wide:
            d = (wide[a] - wide[b]).dropna()
            if len(d) >= 2:
                lines.append(f"  {a} - {b}: {d.mean():+.3f} ± {d.std(ddof=1):.3f} over {len(d)} folds, higher on "
                             f"{int((d > 0).sum())}/{len(d)}  ({what})")
    if lines:
        print("\nWhere the gain comes from (LOSO, mean Pearson over the genes, paired by fold: mean ± std of the "
              "difference):")
        print("\n".join(lines))


# ---- main ------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import dbk

    dbk.settings.progress = False
    dbk.settings.verbosity = 0
    dbk.settings.seed = args.seed

    if args.list_methods:
        for m in METHODS.values():
            print(f"{m.name:26s} {m.description}")
        return

    t_start = time.perf_counter()
    settings = FeatureSettings(tile_size_um=args.tile_um, size_px=args.size_px, model=args.model,
                               pixel_size_um=args.pixel_size_um)
    obsm_key = settings.obsm_key
    gene_file = args.genes or (args.data / "genes_785.txt")
    genes = [g.strip() for g in gene_file.read_text().splitlines() if g.strip()]
    if len(set(genes)) != len(genes):
        raise SystemExit(f"{gene_file} has duplicated genes.")
    n_genes = args.n_genes or (QUICK_GENES if args.quick else None)
    if n_genes:
        genes = genes[:n_genes]

    if args.methods in (None, ""):
        names = [m.name for m in METHODS.values() if m.default and (m.quick or not args.quick)]
    elif args.methods == "all":
        names = list(METHODS)
    else:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if n not in METHODS]
        if unknown:
            raise SystemExit(f"Unknown methods {unknown}; registered: {list(METHODS)}.")

    # per-section tables (cached); one loaded FM for every section that has to be built
    print(f"her2st benchmark: features {settings.model} @ {settings.size_px} px on {settings.tile_size_um:g} µm spot "
          f"tiles; cache {args.cache}", flush=True)
    net = None
    full: dict = {}
    t_pre = time.perf_counter()
    for s in SECTIONS:
        from _her2st_features import cache_path

        folder = args.data / s
        if net is None and not cache_path(args.cache, folder, settings).is_file():
            net, _ = dbk.tl.load_foundation_model(settings.model)
        full[s], cached, sec = section_table(folder, settings, args.cache, net=net)
        bench = full[s].uns["her2st_bench"]
        print(f"  {s}: {full[s].n_obs} tiles, {full[s].n_vars} genes, {bench['tile_side_px']} px tiles at "
              f"{bench['pixel_size_um']:.4f} µm/px, median {np.median(full[s].obs['n_transcripts']):.0f} counts/tile "
              f"({'cache' if cached else 'built'} {sec:.1f} s)", flush=True)
    t_pre = time.perf_counter() - t_pre
    check_genes(full, genes)
    tables = {s: t[:, genes].copy() for s, t in full.items()}

    folders = {s: str((args.data / s).resolve()) for s in SECTIONS}
    ctx = SimpleNamespace(obsm_key=obsm_key, seed=args.seed, quick=args.quick, settings=settings, tables=full,
                          folders=folders, fold_index=0, split=None, fold=None, threads=args.threads,
                          train_s=None, test_s=None, diff=None)
    uses_diff = [n for n in names if n in DIFFBULK]
    if uses_diff:
        from _her2st_diffbulk import DiffBulkContext

        steps = args.stage1_steps if args.stage1_steps is not None else (60 if args.quick else 150)
        ctx.diff = DiffBulkContext(tables=full, folders=folders, obsm_key=obsm_key, cache=args.cache,
                                   settings=settings, seed=args.seed, steps=steps, preset=args.stage1_preset,
                                   dense=args.stage1_dense, stage1_batch=args.stage1_batch, sigma=args.sigma)
        print(f"stage 1 per fold: preset {args.stage1_preset}, {steps} steps"
              f"{', dense unlabeled tiles' if args.stage1_dense else ''}; diffusion features at sigma {args.sigma:g}",
              flush=True)
    fold_list = folds([s.strip() for s in args.splits.split(",") if s.strip()], args.quick)
    if args.folds:
        keep = {f.strip() for f in args.folds.split(",") if f.strip()}
        fold_list = [f for f in fold_list if f[1] in keep]
    print(f"{len(genes)} genes (all measured on every section); methods: {', '.join(names)}; "
          f"{len(fold_list)} folds; {args.threads} thread(s)", flush=True)

    rows, unavailable, failed, stage1_done = [], {}, {}, []
    done: dict[tuple, dict] = {}  # (train, test, method) -> row: the patient split is the LOSO fold "test B4"
    k_cols = [c.format(k=args.top_k) for c in SUMMARY_COLS]
    x_cols = [c.format(k=args.top_k) for c in EXTRA_COLS]
    for i, (split, fold, train_s, test_s) in enumerate(fold_list):
        train = stack(tables, train_s, genes, obsm_key)
        test = stack(tables, test_s, genes, obsm_key)
        groups = train.obs["sample"].astype(str).to_numpy()
        ctx.fold_index, ctx.split, ctx.fold = i, split, fold
        ctx.train_s, ctx.test_s = tuple(train_s), tuple(test_s)
        line = []
        for name in names:
            if name in unavailable:
                continue
            same = (tuple(train_s), tuple(test_s), name)
            if same in done:
                rows.append({**done[same], "split": split, "fold": fold})
                line.append(f"{name} {done[same]['pearson_mean_all']:.3f} (same fold as before)")
                continue
            t0 = time.perf_counter()
            try:
                out = METHODS[name].fn(train, test, genes, groups, ctx)
            except NotAvailable as err:
                unavailable[name] = str(err)
                continue
            except Exception as err:  # one failing method must not cost the others' results
                failed.setdefault(name, f"{type(err).__name__}: {err}")
                continue
            elapsed = time.perf_counter() - t0
            pred, info = out if isinstance(out, tuple) else (out, {})
            pred = pred.reindex(index=test.obs_names, columns=genes)
            test.obsm["bench_pred"] = pred
            ev = dbk.tl.evaluate(test, pred_key="bench_pred", genes=genes, top_k=args.top_k, train_adata=train,
                                 key_added=None)
            summ = ev.attrs["summary"]
            done[same] = {"split": split, "fold": fold, "method": name, "train": "+".join(train_s),
                          "n_train": train.n_obs, "n_test": test.n_obs, "n_genes": len(genes),
                          **{c: summ[c] for c in k_cols + x_cols}, "fit_predict_s": elapsed,
                          "info": json.dumps(info) if info else ""}
            rows.append(done[same])
            line.append(f"{name} {summ['pearson_mean_all']:.3f} ({elapsed:.1f}s)")
        print(f"  [{split} test {fold}] " + "; ".join(line), flush=True)
        if ctx.diff is not None and not any(r["train"] == tuple(train_s) for r in stage1_done):
            try:
                ctx.diff.stage1_controls(fold, split, tuple(train_s), tuple(test_s), list(genes))
                stage1_done.append({"train": tuple(train_s)})
            except Exception as err:
                failed.setdefault("stage1_controls", f"{type(err).__name__}: {err}")
            ctx.diff.forget_fold(tuple(train_s))

    df = pd.DataFrame(rows)
    for name, why in unavailable.items():
        print(f"\n{name}: not available yet ({why}).")
    for name, why in failed.items():
        print(f"\n{name}: FAILED ({why}).")
    if df.empty:
        raise SystemExit("No results.")
    ran = [n for n in names if n in set(df["method"])]
    for split in dict.fromkeys(df["split"]):
        print_table(df, split, k_cols, ran)
    print("\nNotes: correlations are per gene over the test tiles, then averaged; 'n/a' where every gene's is "
          "undefined (mean: a constant prediction). top-k HVG: chosen among the evaluated genes by variance on each "
          "fold's training tiles. The patient split is the LOSO fold 'test B4' (reused, not refitted).")
    if "ridge_hest" in ran:
        print("ridge_hest has no intercept (faithful to HEST): its correlations are valid, its MSE/MAE are not "
              "comparable.")
    print_verdict(df[df["split"] == "loso"])
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    path = args.out / f"her2st_folds{tag}.csv"
    df.to_csv(path, index=False, float_format="%.6g")
    print(f"\nper-fold table: {path}")
    if ctx.diff is not None and ctx.diff.stage1_rows:
        s1 = pd.DataFrame(ctx.diff.stage1_rows)
        print("\nSTAGE-1 CONTROLS: denoising loss (per-pixel MSE, images in [-1, 1]) on the test section's tiles with "
              "the tile's own profile (cond), no profile (uncond) and another test tile's profile (shuffled); gain = "
              "1 - loss / loss_uncond; mean ± std over folds")
        for (model, sigma), g in s1.groupby(["model", "sigma"], sort=False):
            print(f"  {model:9s} sigma {sigma:<4g} steps {int(g['steps'].iloc[0]):5d}  cond {fmt(g['loss_cond'], 5)}  "
                  f"uncond {fmt(g['loss_uncond'], 5)}  shuffled {fmt(g['loss_shuffled'], 5)}  "
                  f"gain {fmt(g['gain'], 4)}  gain_shuffled {fmt(g['gain_shuffled'], 4)}  ({len(g)} folds)")
        s1_path = args.out / f"her2st_stage1{tag}.csv"
        s1.to_csv(s1_path, index=False, float_format="%.6g")
        print(f"stage-1 controls per fold: {s1_path}")
    print(f"preprocessing {t_pre:.1f} s; total wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main(ARGS)
