"""Stage 2 of the stage-1 trial, on a CPU, from the cells the GPU machine brought back; one cumulative table.

    python benchmarks/device_cells.py --data .devcarry/her2st benchmarks/device_results/cells/
    python benchmarks/device_cells.py --data .devcarry/her2st CELLS/ --docs docs/benchmarks.md   # rewrite the table

Each cell (``cell_<FOLD>_s<SEED>.npz`` of ``benchmarks/device_check.py --cell FOLD:SEED``) holds the diffusion
features of every her2st spot tile from three stage-1 models of one (fold, seed): ``cond`` (trained with genes),
``nocond`` (trained without: condition dropout 1.0) and ``untrained`` (the same seeded initial weights). Here every
cell is scored by the same head code (this file's ``HEAD_VERSION``), training on the fold's five sections and
testing on FOLD, over the 785 genes of ``--data``'s ``tables.npz``:

- ``FM``: the reduced-rank ridge with 300 µm context on the EfficientNet-Lite0 features alone (no stage 1);
- ``early:<model>``: the same head on [FM; diffusion features] (one ridge on both blocks, each standardised);
- ``late:<model>``: ``RidgeFusionRegressor(rank="auto", blend="late")``: one ridge per block, blended by inner CV;
- ``default:<model>``: ``fit_diffbulk``'s default head (``fusion="auto"``): the same candidates, the same inner
  cross-validation over the training sections and the same selection rule, then the chosen head fitted on all
  training tiles.

Scores are tidy rows in ``dbk.tl.benchmark``'s format (``split``, ``fold`` = ``FOLD/sSEED``, ``method``, ``metric``,
``value``) with the per-gene Pearson in ``attrs["gene_scores"]``, so the comparisons use ``dbk.tl.paired_differences``
itself (mean ± std over cells, cells where A is higher, a 95 % interval by resampling genes) plus the t 95 % interval
over cells of ``benchmarks/her2st_combine.py`` (the cells are the replicates; seeds of one fold are not independent
sections, which the table says). ``--docs`` rewrites the block between the markers ``<!-- device-cells:begin -->``
and ``<!-- device-cells:end -->`` of that file (written atomically); ``--csv`` writes the tidy rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

HEAD_VERSION = "2026-12-07: FM / early / late ridge (rank auto, 300 µm context) and fit_diffbulk's fusion='auto'"
CONTEXT_UM = 300.0
MODELS = ("cond", "nocond", "untrained")
METRIC = "pearson_mean_all"
HEADS = ("early", "late", "default")  # FM alone is always scored
BEGIN, END = "<!-- device-cells:begin -->", "<!-- device-cells:end -->"
#: the comparisons that decide the trial (A, B, what it asks)
PAIRS = (
    ("default:cond", "default:nocond", "genes: with vs without, default head"),
    ("default:nocond", "default:untrained", "training without genes vs untrained, default head"),
    ("default:cond", "default:untrained", "training with genes vs untrained, default head"),
    ("late:cond", "late:nocond", "genes: with vs without, late fusion"),
    ("late:cond", "late:untrained", "trained with genes vs untrained, late fusion"),
    ("early:cond", "early:nocond", "genes: with vs without, early fusion"),
    ("default:cond", "FM", "DiffBulk (with genes) vs the FM features alone"),
)


def load_tables(data: Path) -> dict:
    """``tables.npz`` of ``benchmarks/device_data.py`` (strings decoded)."""
    path = data / "tables.npz"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --data must be the folder benchmarks/device_data.py writes.")
    with np.load(path, allow_pickle=False) as z:
        t = {k: z[k] for k in z.files}
    for k in ("sections", "spot_section", "spot_id", "genes", "dense_section"):
        if k in t:
            t[k] = t[k].astype(str)
    return t


def load_cell(path: Path, tables: dict) -> dict:
    """One cell: meta, conditioning rows, loss curves and float32 features aligned to ``tables``' spot order."""
    with np.load(path, allow_pickle=False) as z:
        cell = {k: z[k] for k in z.files}
    meta = json.loads(str(cell["meta"]))
    ids = cell["spot_id"].astype(str)
    if len(ids) != len(tables["spot_id"]) or set(ids) != set(tables["spot_id"]):
        raise SystemExit(f"{path}: its spot tiles are not those of tables.npz ({len(ids)} vs "
                         f"{len(tables['spot_id'])}); use the --data folder the cell was made from.")
    order = pd.Index(ids).get_indexer(tables["spot_id"])
    feats = {m: cell[f"feat_{m}"][order].astype(np.float32) for m in MODELS}
    for m, x in feats.items():
        if not np.isfinite(x).all():
            raise SystemExit(f"{path}: the {m} features hold non-finite values.")
    return {"path": path, "meta": meta, "feats": feats, "conditioning": json.loads(str(cell["conditioning"])),
            "curves": {m: cell.get(f"loss_{m}") for m in ("cond", "nocond")}}


def _anndata(y, genes, sections, blocks: dict, coords):
    import anndata as ad

    from dbk._constants import SAMPLE_COL, SPATIAL_KEY

    a = ad.AnnData(X=y.astype(np.float32))
    a.var_names = list(genes)
    a.obs_names = [f"t{i}" for i in range(len(y))]
    a.obs[SAMPLE_COL] = pd.Categorical(sections)
    a.obsm[SPATIAL_KEY] = coords
    for k, v in blocks.items():
        a.obsm[k] = np.asarray(v, np.float64)
    return a


def score_cell(tables: dict, cell: dict, heads: tuple[str, ...] = HEADS) -> tuple[list[dict], dict]:
    """Tidy rows and per-gene Pearson (``{method: {gene: r}}``) of ``heads`` on the cell's held-out fold."""
    import dbk
    from dbk._constants import DIFF_FEATURES_KEY
    from dbk.core import InputScaler
    from dbk.tl import RidgeBaseline, RidgeFusionRegressor, nan_pearson
    from dbk.tl._context import context_features, tile_spacing_um
    from dbk.tl._fit_steps import fit_fusion_head, scaled_table
    from dbk.tl._head_cv import cross_validate_heads, head_candidates

    fold = cell["meta"]["fold"]
    sec = tables["spot_section"]
    tr, te = sec != fold, sec == fold
    genes = list(tables["genes"])
    um = dict(zip(tables["sections"], tables["um_per_px"], strict=True))
    b = tables["spot_box"].astype(np.float64)
    px = np.array([um[s] for s in sec])[:, None]
    coords = np.column_stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2]) * px
    y = tables["Y"].astype(np.float64)
    fm = tables["fm"].astype(np.float64)
    scores: dict[str, dict] = {}
    rows: list[dict] = []
    fold_name = f"{fold}/s{cell['meta']['seed']}"

    def record(method: str, pred: np.ndarray, t0: float, **info) -> None:
        r = nan_pearson(y[te], np.asarray(pred, np.float64), axis=0)
        scores[method] = {"pearson": dict(zip(genes, map(float, r), strict=True))}
        rows.append({"split": "loso_cells", "fold": fold_name, "method": method, "metric": METRIC,
                     "value": float(np.nanmean(r)), "seconds": round(time.perf_counter() - t0, 1), **info})
        print(f"  {fold_name} {method:<20} {rows[-1]['value']:.4f}  ({rows[-1]['seconds']} s) {info or ''}",
              flush=True)

    def ctx(x):
        return context_features(coords, np.asarray(x, np.float64), CONTEXT_UM, sec)

    def ridge_early(blocks):
        parts = []
        for x in blocks:
            sc = InputScaler.fit(x[tr])
            parts.append((sc.transform(x[tr]), sc.transform(x[te])))
        a_tr = _anndata(y[tr], genes, sec[tr], {"X": np.hstack([p[0] for p in parts])}, coords[tr])
        a_te = _anndata(y[te], genes, sec[te], {"X": np.hstack([p[1] for p in parts])}, coords[te])
        model = RidgeBaseline("cv", rank="auto", random_state=0).fit(a_tr, use_rep="X", groups="sample")
        return model.predict(a_te).to_numpy(np.float64), {"rank": model.rank_ or "full", "alpha": float(model.alpha_)}

    def late(m: str, d: np.ndarray) -> None:
        t0 = time.perf_counter()
        blocks = {"X_fm": ctx(fm), DIFF_FEATURES_KEY: ctx(d)}
        scs = {k: InputScaler.fit(v[tr]) for k, v in blocks.items()}
        a_tr = _anndata(y[tr], genes, sec[tr], {k: scs[k].transform(v[tr]) for k, v in blocks.items()}, coords[tr])
        a_te = _anndata(y[te], genes, sec[te], {k: scs[k].transform(v[te]) for k, v in blocks.items()}, coords[te])
        head = RidgeFusionRegressor(rank="auto", blend="late", random_state=0).fit(a_tr, use_rep="X_fm",
                                                                                  groups="sample")
        record(f"late:{m}", head.predict(a_te).to_numpy(np.float64), t0, fm_weight=float(head.blend_weight_))

    def default(m: str, d: np.ndarray) -> None:
        """fit_diffbulk(fusion="auto"): its candidates, inner CV, selection rule and final fit, on these features."""
        t0 = time.perf_counter()
        keys = ["X_fm", DIFF_FEATURES_KEY]
        raw = {"X_fm": fm, DIFF_FEATURES_KEY: d}
        cands = head_candidates("auto", context_um=None, head_kwargs={}, spacing_um=spacing)
        train_tabs, test_tabs = {}, {}
        for c in cands:
            if c.context_um in train_tabs:
                continue
            blk = raw if c.context_um is None else {
                k: context_features(coords, v, c.context_um, sec) for k, v in raw.items()}
            train_tabs[c.context_um] = _anndata(y[tr], genes, sec[tr], {k: v[tr] for k, v in blk.items()}, coords[tr])
            test_tabs[c.context_um] = _anndata(y[te], genes, sec[te], {k: v[te] for k, v in blk.items()}, coords[te])
        sel = cross_validate_heads(train_tabs, genes, keys, cands, n_splits=3, random_state=0, accelerator="cpu",
                                   coords_um=coords[tr], spacing_um=spacing)
        best = sel.best
        fitted = fit_fusion_head(train_tabs[best.context_um], genes, keys, fusion=best.fusion, val_fraction=None,
                                 random_state=0, accelerator="cpu", head_kwargs=dict(best.head_kwargs))
        pred = fitted.head.predict(scaled_table(test_tabs[best.context_um], keys, fitted.scalers))
        record(f"default:{m}", pred.to_numpy(np.float64), t0, head=best.name)

    dbk.settings.progress = False
    t0 = time.perf_counter()
    pred, info = ridge_early([ctx(fm)])
    record("FM", pred, t0, **info)
    spacing = tile_spacing_um(coords[tr], sec[tr])
    for m in MODELS:
        d = cell["feats"][m].astype(np.float64)
        if "early" in heads:
            t0 = time.perf_counter()
            pred, info = ridge_early([ctx(fm), ctx(d)])
            record(f"early:{m}", pred, t0, **info)
        if "late" in heads:
            late(m, d)
        if "default" in heads:
            default(m, d)
    return rows, scores


def combine(results: pd.DataFrame) -> list[dict]:
    """The decisive comparisons: ``dbk.tl.paired_differences`` plus the t interval over cells."""
    from her2st_combine import paired

    import dbk

    wide = results[results["metric"] == METRIC].pivot_table(index="fold", columns="method", values="value",
                                                            aggfunc="first")
    out = []
    for a, b, what in PAIRS:
        if a not in wide.columns or b not in wide.columns:
            continue
        d = dbk.tl.paired_differences(results, a, b, metric=METRIC, random_state=0)
        s = d.attrs["summary"]
        t = paired(wide, a, b)
        out.append({"a": a, "b": b, "what": what, "mean": s["mean"], "std": s["std"], "n": s["n_folds"],
                    "n_higher": s["n_higher"], "gene_ci": (s["ci_low"], s["ci_high"]),
                    "t_ci": (t["ci_low"], t["ci_high"]), "per_cell": dict(zip(d["fold"], d["difference"],
                                                                             strict=True))})
    return out


def markdown(cells: list[dict], results: pd.DataFrame, comps: list[dict], command: str) -> str:
    """The cumulative table: one row per cell (card, date, command, call time, commit) and the comparisons."""
    wide = results[results["metric"] == METRIC].pivot_table(index="fold", columns="method", values="value",
                                                            aggfunc="first")
    lines = [BEGIN, "", f"Stage 2 by `{command}` (head code `{HEAD_VERSION}`); mean Pearson over the 785 genes on the "
             "held-out section. Cells in the order the trial runs them (B4 with seeds 0, 1, 2, then the other "
             "sections with seed 0).", "",
             "| cell | card | date | steps | call s | commit | FM | default: cond / nocond / untrained | "
             "late: cond / nocond / untrained | default head (cond) | gain at sigma 0.5 (cond) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        m = c["meta"]
        f = f"{m['fold']}/s{m['seed']}"
        r = wide.loc[f]
        gain = next((g["gain"] for g in c["conditioning"] if g["model"] == "cond" and g["sigma"] == 0.5), np.nan)
        chosen = results[(results["fold"] == f) & (results["method"] == "default:cond")]
        head = chosen["head"].iloc[0] if len(chosen) else "-"
        lines.append(
            f"| {f} | {m.get('card') or m.get('device')} | {m.get('date')} | {m.get('steps')} | {m.get('call_s')} | "
            f"{m.get('commit')} | {r['FM']:.4f} | "
            + " / ".join(f"{r.get(f'default:{k}', np.nan):.4f}" for k in MODELS) + " | "
            + " / ".join(f"{r.get(f'late:{k}', np.nan):.4f}" for k in MODELS) + f" | {head} | {gain:+.4f} |")
    lines += ["", f"Commands on the device: {'; '.join(sorted({c['meta'].get('command', '') for c in cells}))}.", "",
              "| A - B | what it asks | mean ± std over cells | higher | t 95% over cells | 95% by resampling genes |",
              "| --- | --- | --- | --- | --- | --- |"]
    for d in comps:
        sd = f" ± {d['std']:.4f}" if np.isfinite(d["std"]) else ""
        tci = (f"[{d['t_ci'][0]:+.4f}, {d['t_ci'][1]:+.4f}]" if np.isfinite(d["t_ci"][0]) else "needs 2 cells")
        lines.append(f"| {d['a']} - {d['b']} | {d['what']} | {d['mean']:+.4f}{sd} | {d['n_higher']}/{d['n']} | {tci} "
                     f"| [{d['gene_ci'][0]:+.4f}, {d['gene_ci'][1]:+.4f}] |")
    folds = {c["meta"]["fold"] for c in cells}
    lines += ["", f"{len(cells)} cell(s) over {len(folds)} held-out section(s): "
              + ("seeds of one section are not independent sections; the t interval over cells treats them as "
                 "replicates." if len(folds) < len(cells) else "one seed per section."), "", END]
    return "\n".join(lines) + "\n"


def write_docs(path: Path, block: str) -> None:
    """Replace the marked block of ``path`` (atomically); the markers must be there."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no block between {BEGIN} and {END}; add the two markers where the table goes.")
    a, b = text.index(BEGIN), text.index(END) + len(END)
    new = text[:a] + block.rstrip("\n") + text[b:]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="+", type=Path, help="cell_*.npz files, or folders holding them")
    ap.add_argument("--data", type=Path, required=True, help="the folder benchmarks/device_data.py wrote")
    ap.add_argument("--docs", type=Path, default=None, help="rewrite the marked table block of this markdown file")
    ap.add_argument("--csv", type=Path, default=None, help="write the tidy rows here")
    ap.add_argument("--heads", default=",".join(HEADS),
                    help=f"heads besides FM alone, comma-separated from {','.join(HEADS)} (default all)")
    args = ap.parse_args(argv)
    paths = sorted({p for c in args.cells for p in ([c] if c.is_file() else c.glob("cell_*.npz"))})
    if not paths:
        raise SystemExit(f"No cell_*.npz in {[str(c) for c in args.cells]}.")
    heads = tuple(h for h in args.heads.split(",") if h)
    if not heads or set(heads) - set(HEADS):
        raise SystemExit(f"--heads takes names from {HEADS}, got {args.heads!r}.")
    tables = load_tables(args.data)
    cells = [load_cell(p, tables) for p in paths]
    order = {"B4": 0}
    cells.sort(key=lambda c: (order.get(c["meta"]["fold"], 1), c["meta"]["seed"] > 0 and c["meta"]["fold"] != "B4",
                              c["meta"]["fold"], c["meta"]["seed"]))
    seen = [(c["meta"]["fold"], c["meta"]["seed"]) for c in cells]
    if len(set(seen)) != len(seen):
        raise SystemExit(f"A cell appears twice: {seen}; pass each (fold, seed) once.")
    rows, gene_scores = [], {}
    for c in cells:
        r, s = score_cell(tables, c, heads)
        rows += r
        gene_scores[r[0]["fold"]] = s
    results = pd.DataFrame(rows)
    results.attrs["gene_scores"] = gene_scores
    comps = combine(results)
    command = "python benchmarks/device_cells.py --data <device_data folder> " + " ".join(
        str(p.parent if len(paths) > 1 else p) for p in paths[:1])
    block = markdown(cells, results, comps, command)
    print(block)
    if args.csv is not None:
        results.to_csv(args.csv, index=False)
    if args.docs is not None:
        write_docs(args.docs, block)
        print(f"rewrote the table in {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
