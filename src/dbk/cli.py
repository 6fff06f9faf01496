"""The ``dbk`` command: ``dbk demo``, ``fit``, ``predict``, ``evaluate``, ``benchmark`` and ``prepare``.

One vocabulary across the subcommands, the Python API's: ``--accelerator`` (as ``fit_diffbulk``, ``DiffBulk.predict``,
``embed_tiles`` and ``benchmark`` name it), ``--out`` for what a command writes, and one reader of slides
(:func:`_read_slides`: zarr stores, HEST samples, ST folders). Old spellings (:data:`RENAMED`, the old form of
``dbk benchmark``) still work for one release and warn.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from dbk._constants import PRED_KEY

# the metrics printed by `dbk demo` and `dbk benchmark`, by their exact names in dbk.tl.evaluate's summary
# (the top-k name is filled in with the k actually used)
METRICS = ("pearson_mean_all", "pearson_mean_top{k}_hvg", "spearman_mean_all", "mse_mean_all", "mae_mean_all",
           "spearman_per_tile_mean", "pearson_flattened")

# dbk.tl.benchmark's default methods (dbk.tl._benchmark.DEFAULT_METHODS, listed here for `dbk benchmark --help`)
BENCHMARK_DEFAULT_METHODS = ("mean", "ridge_cv", "ridge_rr_ctx", "diffbulk", "diffbulk_untrained")

# the stage-1 presets (dbk.core._presets.PRESETS, listed here so that `dbk --help` imports nothing heavy)
PRESET_CHOICES = ("auto", "tiny", "cpu-small", "gpu", "paper")

# stage-1 settings of the demo: the "tiny" preset (32 px) trains a few hundred steps in minutes on 2 CPU cores;
# --quick shrinks it to a smoke test (16 px, two narrow levels, a few steps)
DEMO_STAGE1_STEPS = 150
QUICK_STAGE1 = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8,
                "warmup_steps": 5, "log_every": 5}
QUICK_STAGE1_STEPS = 10
QUICK_FM_SIZE_PX = 96


def _table(rows: list[tuple], header: tuple) -> str:
    cols = list(zip(header, *rows, strict=False)) if rows else [(h,) for h in header]
    widths = [max(len(str(v)) for v in col) for col in cols]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(f"{v!s:<{w}}" for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def metrics_table(summaries: dict[str, dict]) -> str:
    """One row per method, one column per metric of :data:`METRICS` (summaries of :func:`dbk.tl.evaluate`)."""
    k = next(iter(summaries.values()))["top_k"]
    names = [m.format(k=k) for m in METRICS]
    rows = [(method, *(_fmt(s.get(n, float("nan"))) for n in names)) for method, s in summaries.items()]
    return _table(rows, ("method", *names))


def _evaluate_methods(truth, preds: dict, hvg: list[str], top_k: int = 50) -> dict[str, dict]:
    """``{method: summary}``: each DataFrame of ``preds`` evaluated against ``truth`` (an AnnData) on shared genes."""
    import dbk

    out = {}
    genes = [g for g in hvg if g in truth.var_names]
    for method, df in preds.items():
        a = truth.copy()
        a.obsm["_pred"] = df.loc[a.obs_names, [g for g in df.columns if g in set(genes)]]
        res = dbk.tl.evaluate(a, pred_key="_pred", hvg_genes=genes, top_k=min(top_k, len(genes)), key_added=None)
        out[method] = res.attrs["summary"]
    return out


# ---- demo ------------------------------------------------------------------------------------------------------------


MIN_DEMO_TILES = 20  # fewer tiles: the demo checks the pre-processing only and skips the model stages


def demo(
    out: str | Path = "dbk_demo_output",
    *,
    size: int = 4096,
    random_state: int | None = None,
    tile_size_um: float = 112.0,
    quick: bool = False,
) -> dict:
    """Run the whole pipeline on synthetic slides, from tissue detection to held-out metrics.

    Tissue -> tiles -> pseudo-bulk -> exactness check -> DiffBulk fit -> prediction on a second, H&E-only slide ->
    metrics against its truth (with the mean predictor and ridge) -> figures, model folder and zarr stores. On a
    slide with fewer than 20 tiles the model stages are skipped.

    Returns a dict with the stage timings, the pseudo-bulk checks and the held-out metrics (also printed).
    ``random_state`` seeds the training slide (the held-out one gets ``random_state + 1``) and the model; ``None``:
    ``dbk.settings.seed``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from tqdm.auto import tqdm

    import dbk
    from dbk._constants import QV_COL, TILES_TABLE_KEY
    from dbk._utils import resolve_seed
    from dbk.pp._binning import TileLookup

    random_state = resolve_seed(random_state)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    verbosity = dbk.settings.verbosity
    dbk.settings.verbosity = 1  # warnings only: the progress bar and the tables below tell the story
    timings: list[tuple] = []
    model_stages = ["fit DiffBulk", "predict (H&E-only slide)", "evaluate", "save model"]
    stages = ["synthetic slide", "tissue mask", "tiles", "pseudo-bulk", "exactness check", *model_stages, "figures",
              "write zarr"]
    bar = tqdm(total=len(stages), desc="dbk demo", unit="stage")

    def stage(name, fn):
        bar.set_postfix_str(name)
        t = time.perf_counter()
        res = fn()
        timings.append((name, f"{time.perf_counter() - t:.2f}"))
        bar.update(1)
        return res

    sdata = stage("synthetic slide", lambda: dbk.datasets.synthetic(shape=(size, size), random_state=random_state))
    sdata.attrs["sample"] = "train"
    stage("tissue mask", lambda: dbk.pp.tissue_mask(sdata))
    stage("tiles", lambda: dbk.pp.make_tiles(sdata, tile_size_um=tile_size_um))
    stage("pseudo-bulk", lambda: dbk.pp.pseudobulk(sdata, source="transcripts"))
    adata = sdata.tables[TILES_TABLE_KEY]

    def exact():
        # independent count: load the (small) demo transcripts and count, per tile, those inside its bounds
        df = sdata.points["transcripts"].compute()
        keep = ~df["feature_name"].astype(str).map(dbk.pp.is_control_probe).to_numpy()
        if QV_COL in df.columns:
            keep &= df[QV_COL].to_numpy() >= 20
        b = dbk.pp.tile_bounds(sdata)
        p, _ = TileLookup.build(b).assign(df["x"].to_numpy()[keep], df["y"].to_numpy()[keep])
        brute = 0
        x, y = df["x"].to_numpy()[keep], df["y"].to_numpy()[keep]
        for x0, y0, x1, y1 in b:
            brute += int(((x >= x0) & (x < x1) & (y >= y0) & (y < y1)).sum())
        return len(df), int(keep.sum()), brute, int(adata.layers["counts"].sum()), len(p)

    n_all, n_kept, brute, table_total, _ = stage("exactness check", exact)

    fitted = None
    if adata.n_obs >= MIN_DEMO_TILES:
        fitted = _demo_model(sdata, out, stage, size=size, tile_size_um=tile_size_um, random_state=random_state,
                             quick=quick)
    else:
        bar.update(len(model_stages))

    def figures():
        import matplotlib.pyplot as plt

        markers = [g for g in ("ERBB2", "KRT5", "PTPRC", "COL1A1") if g in adata.var_names]
        genes = markers[:2] or list(adata.var_names[:2])
        paths = []
        for color in ["n_transcripts", *genes]:
            p = out / f"tiles_{color}.png"
            dbk.pl.tiles(sdata, color, show=False, save=str(p))
            paths.append(p)
        if fitted is not None:
            paths += _demo_model_figures(fitted, out)
        plt.close("all")
        return paths

    figs = stage("figures", figures)

    def write():
        paths = [dbk.io.write_zarr(sdata, out / "demo.zarr", overwrite=True)]  # dbk's own stores of an earlier demo
        if fitted is not None:
            paths.append(dbk.io.write_zarr(fitted["held"], out / "heldout.zarr", overwrite=True))
        return paths

    zarr_paths = stage("write zarr", write)
    bar.close()

    summary = [
        ("tiles", adata.n_obs),
        ("genes", adata.n_vars),
        ("transcripts (all)", f"{n_all:,}"),
        ("transcripts kept (genes, qv>=20)", f"{n_kept:,}"),
        ("in tiles, brute force", f"{brute:,}"),
        ("in tiles, pseudo-bulk table", f"{table_total:,}"),
        ("exact", "yes" if brute == table_total else "NO"),
        ("median transcripts / tile", f"{np.median(adata.obs['n_transcripts']):.0f}"),
    ]
    print("\nStage timings (s)")
    print(_table(timings, ("stage", "seconds")))
    print("\nPseudo-bulk checks")
    print(_table(summary, ("metric", "value")))
    if fitted is None:
        print(f"\nOnly {adata.n_obs} tiles of {tile_size_um:g} µm: too few to fit a model, so the model stages were "
              "skipped (use a larger --size or a smaller --tile-um).")
    else:
        model = fitted["model"]
        tm = adata.uns[PRED_KEY]["training_metrics"]
        head, diff = model.head, model.config["diffusion"]
        training = [
            ("stage 1", f"preset {model.pretrainer.preset.name!r}, {model.pretrainer.image_size} px, "
                        f"{model.pretrainer.step} steps, {tm['timings_s']['stage1_s']:.0f} s"),
            ("diffusion features", f"{diff['dim']} from {'+'.join(diff['levels'])}, sigma {diff['sigma']:g}"),
            ("foundation model", f"{model.fm_id} at {model.config['fm']['size_px']} px, "
                                 f"{model.config['fm']['dim']} features"),
            ("fusion head", _head_text(model, head, adata.uns[PRED_KEY])),
        ]
        print("\nModel")
        print(_table(training, ("part", "setting")))
        print(f"\nHeld-out slide (another synthetic seed; the model saw its H&E only): {fitted['truth'].n_obs} tiles "
              f"x {len(model.genes)} genes. Metrics per gene over tiles, then averaged; the mean predictor has no "
              "Pearson (constant prediction).")
        print(metrics_table(fitted["metrics"]))
        if quick:
            print("(--quick: a smoke-test model; its numbers say little.)")
    print(f"\nFigures: {', '.join(str(p) for p in figs)}")
    if fitted is not None:
        print(f"Model: {fitted['path']}   (dbk predict {fitted['path']} SLIDE.zarr --out OUT.zarr)")
    print(f"SpatialData: {', '.join(str(p) for p in zarr_paths)}")
    dbk.settings.verbosity = verbosity
    if brute != table_total:
        raise SystemExit("pseudo-bulk total differs from the brute-force count")
    return {"timings": timings, "summary": summary, "metrics": fitted["metrics"] if fitted else None,
            "model": fitted["model"] if fitted else None}


def _head_text(model, head, record: dict) -> str:
    """One line on the fitted head: which, how it stopped or was regularised, and the inner-CV choice."""
    import numpy as np

    if model.fusion == "ridge":
        alpha = head.alpha_ if np.ndim(head.alpha_) == 0 else float(np.median(head.alpha_))
        text = f"ridge, alpha {alpha:.3g}" + ("" if head.rank_ is None else f", target rank {head.rank_}")
    else:
        text = (f"{model.fusion}, best epoch {head.best_epoch_ + 1} of {len(head.history_['val_loss'])} "
                f"(early stopping on {head.validation_})")
    if model.context_um is not None:
        text += f", context {model.context_um:g} µm"
    sel = record.get("head_selection")
    names = list((sel or {}).get("candidates", {}).get("name", [])) if isinstance(sel, dict) else []
    if len(names) > 1:
        why = ("no other head beat the full-rank reference by > 1 SE" if sel.get("chosen") == sel.get("reference")
               else "it beat the full-rank reference by > 1 SE")
        text += f"; chosen by inner CV ({sel['scheme']}) among {len(names)} heads: {why}"
    return text


def _demo_model(sdata, out: Path, stage, *, size: int, tile_size_um: float, random_state: int, quick: bool) -> dict:
    """The model stages of the demo: fit, predict on a second (H&E-only) slide, evaluate against its truth, save."""
    from spatialdata import SpatialData

    import dbk
    from dbk._constants import TILES_KEY, TILES_TABLE_KEY
    from dbk.tl import fit_diffbulk

    adata = sdata.tables[TILES_TABLE_KEY]
    fit_kw: dict = {"preset": "tiny", "pretrain_steps": DEMO_STAGE1_STEPS, "fm_size_px": 224}
    if quick:
        fit_kw = {"preset": "tiny", "pretrain_steps": QUICK_STAGE1_STEPS, "fm_size_px": QUICK_FM_SIZE_PX,
                  "pretrain_kwargs": QUICK_STAGE1}
    model = stage("fit DiffBulk", lambda: fit_diffbulk(sdata, tile_size_um=tile_size_um, random_state=random_state,
                                                       **fit_kw))

    # a second slide of the same synthetic tissue type (another seed); the model sees its H&E only
    held = dbk.datasets.synthetic(shape=(size, size), random_state=random_state + 1)
    held.attrs["sample"] = "heldout"
    he_only = SpatialData(images={"he": held.images["he"]}, attrs={"sample": "heldout"})
    stage("predict (H&E-only slide)", lambda: model.predict(he_only))

    def evaluate():
        # the truth of the held-out slide, on the very tiles the model predicted, from its transcripts
        held.shapes[TILES_KEY] = he_only.shapes[TILES_KEY]
        dbk.pp.pseudobulk(held, source="transcripts")
        truth = held.tables[TILES_TABLE_KEY]
        pred_table = he_only.tables[TILES_TABLE_KEY]
        if list(truth.obs_names) != list(pred_table.obs_names):
            raise RuntimeError("held-out tiles and predictions are not aligned")
        for key, value in pred_table.obsm.items():
            truth.obsm[key] = value
        base = {m: dbk.tl.fit_baseline(adata, m, use_rep=model.fm_key, genes=model.genes)
                for m in ("mean", "ridge_cv")}
        preds = {"DiffBulk": truth.obsm["dbk_pred"],
                 "mean (training mean per gene)": base["mean"].predict(truth),
                 "ridge_cv (FM embeddings)": base["ridge_cv"].predict(truth)}
        hvg = list(model.config["train"]["hvg_order"])
        dbk.tl.evaluate(truth, hvg_genes=hvg, top_k=min(50, len(hvg)))  # stored in uns["dbk"]["metrics"] (zarr)
        return truth, _evaluate_methods(truth, preds, hvg)

    truth, summaries = stage("evaluate", evaluate)
    path = stage("save model", lambda: model.save(out / "model", overwrite=True))
    return {"model": model, "held": held, "truth": truth, "metrics": summaries, "path": path}


def _demo_model_figures(fitted: dict, out: Path) -> list[Path]:
    import dbk

    model, held, truth = fitted["model"], fitted["held"], fitted["truth"]
    paths = []
    shown = [g for g in model.config["train"]["hvg_order"] if g in truth.var_names][:2]
    p = out / "heldout_measured_vs_predicted.png"
    dbk.pl.spatial(held, shown, show=False, save=str(p))
    paths.append(p)
    p = out / f"heldout_scatter_{shown[0]}.png"
    dbk.pl.scatter(held, shown[0], show=False, save=str(p))
    paths.append(p)
    p = out / "training_stage1.png"
    dbk.pl.training_history(model.pretrainer, show=False, save=str(p))
    paths.append(p)
    head = model.head.history_
    if "train_loss" in head:  # a neural head's epochs (the ridge head has an inner-CV curve instead)
        records = [{"step": i + 1, "train_loss": a, "val_loss": b}
                   for i, (a, b) in enumerate(zip(head["train_loss"], head["val_loss"], strict=True))]
        p = out / "training_head.png"
        dbk.pl.training_history(records, keys=("train_loss", "val_loss"), show=False, save=str(p))
        paths.append(p)
    sel = model.config.get("head_selection")
    if sel and len(sel["candidates"]["name"]) > 1:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(sel["candidates"]["name"])))
        ax.barh(sel["candidates"]["name"], sel["candidates"]["cv_pearson_mean"], color="tab:blue")
        ax.set_xlabel(f"mean Pearson r over genes, inner CV ({sel['scheme']})")
        ax.set_title(f"fusion='auto' chose {sel['chosen']}")
        p = out / "head_selection.png"
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths


# ---- fit / predict / evaluate / benchmark ----------------------------------------------------------------------------


def _is_model_folder(path) -> bool:
    """Whether ``path`` is a folder dbk wrote as a model (``config.json`` with a ``dbk.*`` format and checksums)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        return False
    from dbk.core._folder import _dbk_config

    return _dbk_config(p) is not None


def _read_slides(paths, *, hest_root=None, samples=(), pixel_size_um=None, images: bool = True) -> list:
    """SpatialData objects of the slides named on the command line, each with ``attrs["sample"]`` set.

    The one reader of ``dbk fit``, ``predict``, ``evaluate`` and ``benchmark``. A path is a SpatialData ``.zarr``
    store, a HEST folder (every sample in it) or ``HEST_ROOT/SAMPLE_ID``, a legacy ST folder
    (:func:`dbk.io.read_st_folder`: counts table, spot file and H&E image), told apart by the rules of
    :func:`dbk.tl.prepare_corpus` (``dbk prepare``), or, with ``images``, an H&E image file (``pixel_size_um`` needed).
    ``--hest-root`` with ``--sample`` adds HEST samples.
    """
    import dbk
    from dbk.pp._corpus import _is_zarr, _read, _sources

    slides = []
    for given in paths:
        p = Path(given).expanduser()
        if p.is_file():
            if not images:
                raise SystemExit(f"{given} is a file: this command needs slides with expression (SpatialData .zarr "
                                 "stores, HEST folders or HEST_ROOT/SAMPLE_ID, ST folders), not an image.")
            if pixel_size_um is None:
                raise SystemExit(f"{given} is an image file: give its pixel size with --pixel-size-um.")
            sd = dbk.io.read_image(p, pixel_size_um=pixel_size_um)
            sd.attrs["sample"] = p.stem
            slides.append(sd)
            continue
        if p.is_dir() and _is_model_folder(p):
            raise SystemExit(f"{given} is a dbk model folder, not a slide.")
        for name, source in _sources(str(p), len(slides), None):
            if source[0] == "path" and not p.exists():
                raise SystemExit(f"{given} does not exist (expected a SpatialData .zarr store, a HEST folder or "
                                 f"HEST_ROOT/SAMPLE_ID, an ST folder{' or an image file' if images else ''}).")
            try:
                sd = _read(source, None)
            except FileNotFoundError as err:
                if source[0] != "path" or _is_zarr(p):
                    raise
                # a folder that is neither a store nor a HEST folder is read as an ST folder: say what was looked for
                raise SystemExit(f"{given} is not a SpatialData .zarr store, a HEST folder or an ST folder: "
                                 f"{err}") from None
            if source[0] == "hest" or "sample" not in sd.attrs:
                sd.attrs["sample"] = name
            slides.append(sd)
    for s in samples:
        if hest_root is None:
            raise SystemExit("--sample needs --hest-root (the HEST download folder).")
        sd = dbk.io.read_hest(hest_root, s)
        sd.attrs["sample"] = s
        slides.append(sd)
    if not slides:
        raise SystemExit("No data: give SpatialData .zarr stores, HEST folders (or HEST_ROOT/SAMPLE_ID) or ST folders, "
                         "or --hest-root with --sample.")
    return slides


def _read_genes(path) -> list[str]:
    genes = [g.strip() for g in Path(path).read_text().splitlines() if g.strip() and not g.startswith("#")]
    if not genes:
        raise SystemExit(f"{path} lists no genes (one gene per line).")
    return genes


def _read_patients(value: str | None) -> dict[str, str] | None:
    """``--patients``: ``SAMPLE=PATIENT,...`` pairs, or a file of ``sample,patient`` lines (comma or tab)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        pairs = [ln.replace("\t", ",").split(",") for ln in lines]
        where = f"{path}"
    else:
        pairs = [item.split("=") for item in value.split(",") if item.strip()]
        where = "--patients"
    out: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2 or not pair[0].strip() or not pair[1].strip():
            raise SystemExit(f"{where}: expected SAMPLE=PATIENT pairs separated by commas (e.g. B4=B,C2=C) or a "
                             f"file of 'sample,patient' lines; got {'='.join(pair)!r}.")
        sample, patient = pair[0].strip(), pair[1].strip()
        if sample in out and out[sample] != patient:
            raise SystemExit(f"{where}: sample {sample!r} is given two patients ({out[sample]!r}, {patient!r}).")
        out[sample] = patient
    if not out:
        raise SystemExit(f"{where}: no SAMPLE=PATIENT pairs found.")
    return out


def _refuse_overlap(out: str, inputs, *, replaces: bool = True) -> None:
    """Exit before any work when ``--out`` is, contains (``replaces``: it would be replaced) or lies inside an input."""
    import os

    o = Path(os.path.expanduser(out)).resolve()
    for given in inputs:
        if not given:
            continue
        p = Path(os.path.expanduser(str(given))).resolve()
        if not p.exists():
            continue
        if p == o or (replaces and o in p.parents):
            n = sum(len(fs) for _, _, fs in os.walk(o)) if o.is_dir() else 1
            raise SystemExit(f"--out {out} {'is' if p == o else 'contains'} the input {given}: writing there would "
                             f"delete it ({n} files in {o}). Choose an --out outside the inputs.")
        if p in o.parents:
            raise SystemExit(f"--out {out} lies inside the input {given}; dbk does not write into its inputs. Choose "
                             "an --out outside the inputs.")


def _check_out(out: Path, overwrite: bool, check) -> None:
    """Exit before any work when ``out`` exists without ``--overwrite``, or is not dbk's to replace."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise SystemExit(f"{out} exists; pass --overwrite to replace it.")
        try:
            check(out)
        except FileExistsError as err:
            raise SystemExit(str(err)) from None


def _check_csv(out: Path) -> None:
    """``check`` of :func:`_check_out` for a CSV file: a folder (or a link) is never replaced by one."""
    if out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{out} is a {'link' if out.is_symlink() else 'folder'}, not a CSV file; dbk does not "
                              "replace it. Choose another --out.")


def _apply_patients(slides: list, value: str | None) -> None:
    """``--patients``: set ``attrs["patient"]`` of the slides it names; exit when it names a slide not given."""
    patients = _read_patients(value)
    if patients is None:
        return
    names = [str(sd.attrs.get("sample")) for sd in slides]
    unknown = sorted(set(patients) - set(names))
    if unknown:
        raise SystemExit(f"--patients names samples {unknown} that are not among the slides {names}.")
    for name, sd in zip(names, slides, strict=True):
        if name in patients:
            sd.attrs["patient"] = patients[name]


def cmd_fit(args) -> int:
    """``dbk fit``: fit DiffBulk on the given slides and save the model folder."""
    from dbk.core._folder import check_replaceable
    from dbk.tl import fit_diffbulk

    _refuse_overlap(args.out, [*args.data, args.hest_root, args.genes, args.patients])
    out = Path(args.out).expanduser()
    _check_out(out, args.overwrite, check_replaceable)

    slides = _read_slides(args.data, hest_root=args.hest_root, samples=args.sample, pixel_size_um=args.pixel_size_um)
    _apply_patients(slides, args.patients)
    head = {k: v for k, v in (("max_epochs", args.max_epochs),) if v is not None}
    if args.fusion != "ridge" and (args.rank is not None or args.blend is not None):
        raise SystemExit("--rank and --blend are options of the ridge head: add --fusion ridge.")
    if args.fusion in ("auto", "ridge") and args.max_epochs is not None:
        raise SystemExit("--max-epochs is an option of the neural heads: add --fusion gated (or concat, add, film).")
    if args.rank is not None:
        head["rank"] = args.rank if args.rank == "auto" else int(args.rank)
    if args.blend is not None:
        head["blend"] = args.blend
    t = time.perf_counter()
    model = fit_diffbulk(
        slides if len(slides) > 1 else slides[0],
        genes=_read_genes(args.genes) if args.genes else None, n_top_genes=args.n_top_genes, fm=args.fm,
        fm_size_px=args.fm_size_px, preset=args.preset, fusion=args.fusion, head_cv=args.head_cv,
        pretrain_steps=args.pretrain_steps,
        tile_size_um=args.tile_um, random_state=args.seed, accelerator=args.accelerator,
        checkpoint_dir=args.checkpoint_dir, context_um=args.context_um, batch_size=args.batch_size,
        fm_kwargs={"arch": args.fm_arch} if args.fm_arch else None, **head)
    model.save(out, overwrite=args.overwrite)
    print(f"\n{model!r}\nfitted in {time.perf_counter() - t:.0f} s, saved to {out}")
    tm = slides[0].tables["dbk_table"].uns[PRED_KEY]["training_metrics"]
    if "validation" in tm:
        v = tm["validation"]
        how = ("a head refitted without them" if model.fusion == "ridge"
               else "used for early stopping, so slightly optimistic")
        print(f"\nValidation ({v['split']}, {v['n_tiles']} tiles; {how})")
        print(metrics_table({"DiffBulk": v["diffbulk"], "mean (training mean per gene)": v["mean"]}))
    return 0


def _one_slide(args, *, images: bool = True) -> object:
    slides = _read_slides([args.data] if args.data else [], hest_root=args.hest_root,
                          samples=[args.sample] if args.sample else [], pixel_size_um=args.pixel_size_um,
                          images=images)
    if len(slides) != 1:
        raise SystemExit(f"Give one slide (got {len(slides)}): DATA (of a HEST folder, one sample: "
                         "HEST_ROOT/SAMPLE_ID), or --hest-root with one --sample.")
    return slides[0]


def cmd_predict(args) -> int:
    """``dbk predict``: predictions for one slide, written to a zarr store."""
    import dbk
    from dbk.io._write import check_store_replaceable

    # the input is read lazily while writing: --out must not be it, contain it or lie inside it
    _refuse_overlap(args.out, [args.data, args.model, args.hest_root])
    out = Path(args.out).expanduser()
    _check_out(out, args.overwrite, check_store_replaceable)
    from dbk.tl import DiffBulk

    model = DiffBulk.load(args.model, device=args.accelerator)
    sd = _one_slide(args)
    model.predict(sd, tiles_key=args.tiles_key)
    dbk.io.write_zarr(sd, out, overwrite=args.overwrite)
    pred = sd.tables["dbk_table"].obsm["dbk_pred"]
    print(f"{pred.shape[0]} tiles x {pred.shape[1]} genes predicted -> {out} (tables['dbk_table'].obsm['dbk_pred'])")
    return 0


def cmd_evaluate(args) -> int:
    """``dbk evaluate``: metrics of a saved model (and the training-mean predictor) on one labelled slide."""
    import pandas as pd

    from dbk.pp._prepare import prepare_slide
    from dbk.tl import DiffBulk

    out = None
    if args.out is not None:
        _refuse_overlap(args.out, [args.data, args.model, args.hest_root])
        out = Path(args.out).expanduser()
        _check_out(out, args.overwrite, _check_csv)
    model = DiffBulk.load(args.model, device=args.accelerator)
    sd = _one_slide(args, images=False)
    name = str(sd.attrs.get("sample", "slide"))
    if name in model.config["train"]["samples"]:
        print(f"WARNING: slide {name!r} has the name of a training slide; metrics on training tiles are optimistic.")
    prepare_slide(sd, tile_size_um=model.tile_size_um, need_table=True, name=name)
    model.predict(sd)
    truth = sd.tables["dbk_table"]
    genes = [g for g in model.genes if g in truth.var_names]
    if not genes:
        raise SystemExit(f"Slide {name!r} measured none of the model's {len(model.genes)} genes.")
    mean = pd.DataFrame([model.config["train"]["gene_mean"]] * truth.n_obs, index=truth.obs_names,
                        columns=model.genes)
    hvg = [g for g in model.config["train"]["hvg_order"] if g in set(genes)]
    summaries = _evaluate_methods(truth, {"DiffBulk": truth.obsm["dbk_pred"],
                                          "mean (training mean per gene)": mean}, hvg, top_k=args.top_k)
    print(f"\n{model!r}\nslide {name!r}: {truth.n_obs} tiles, {len(genes)} of the model's {len(model.genes)} genes "
          "measured; top-k most variable genes chosen on the training slides.")
    print(metrics_table(summaries))
    if out is not None:
        pd.DataFrame(summaries).T.to_csv(out)
        print(f"metrics -> {out}")
    return 0


def _split_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def cmd_benchmark(args) -> int:
    """``dbk benchmark``: :func:`dbk.tl.benchmark` on the slides given; prints the summary, writes the tidy table."""
    import pandas as pd

    import dbk

    if args.list_methods:
        table = dbk.tl.benchmark_methods()
        print(_table(list(table.itertuples(index=False)), tuple(table.columns)))
        return 0
    if args.csv is not None or args.pixel_size_um is not None:
        raise SystemExit("--csv and --pixel-size-um belong to `dbk evaluate MODEL SLIDE` (the old form of "
                         "`dbk benchmark`); `dbk benchmark SLIDE ...` writes its table with --out.")
    methods = _split_list(args.methods)
    if methods is not None:
        known = list(dbk.tl.benchmark_methods()["name"])
        unknown = [m for m in methods if m not in known]
        if unknown or not methods:
            raise SystemExit(f"--methods: unknown method(s) {unknown}; the methods are {', '.join(known)} "
                             "(dbk benchmark --list-methods describes them).")
    tasks = [t for given in args.hest_task for t in _split_list(given)]
    if args.hest_bench_root is not None and not tasks:
        raise SystemExit("--hest-bench-root is the folder of HEST-Benchmark task folders: name the task(s) with "
                         "--hest-task.")
    if tasks:
        given = [opt for opt, value in (("SLIDE arguments", args.slides), ("--sample", args.sample),
                                        ("--split", args.split), ("--genes", args.genes),
                                        ("--n-top-genes", args.n_top_genes), ("--patients", args.patients),
                                        ("--tile-um", args.tile_um)) if value is not None and value != []]
        if given:
            raise SystemExit(f"--hest-task runs HEST-Benchmark's protocol: the task's split files, its 50 genes and "
                             f"its 112 µm patches as the tiles, so {', '.join(given)} cannot be given with it.")
    out = None
    if args.out is not None:
        _refuse_overlap(args.out, [*args.slides, args.hest_root, args.hest_bench_root, args.genes, args.patients])
        out = Path(args.out).expanduser()
        _check_out(out, args.overwrite, _check_csv)
    common = dict(**({} if methods is None else {"methods": methods}), top_k=args.top_k, fm=args.fm,
                  fm_size_px=args.fm_size_px, context_um=args.context_um, pretrain_steps=args.pretrain_steps,
                  preset=args.preset, checkpoint_dir=args.checkpoint_dir, accelerator=args.accelerator,
                  random_state=args.seed, errors=args.errors, batch_size=args.batch_size)
    if tasks:
        return _benchmark_hest_tasks(tasks, args, common, out)
    split = args.split or "loso"
    slides = _read_slides(args.slides, hest_root=args.hest_root, samples=args.sample, images=False)
    _apply_patients(slides, args.patients)
    t = time.perf_counter()
    res = dbk.tl.benchmark(
        slides, split=split, genes=_read_genes(args.genes) if args.genes else None, n_top_genes=args.n_top_genes,
        tile_size_um=112.0 if args.tile_um is None else args.tile_um, **common)
    folds = res.attrs["folds"]
    print(f"\nbenchmark: {len(slides)} slides, split {split!r} ({len(folds)} folds), "
          f"{len(res.attrs['genes'])} candidate genes, {time.perf_counter() - t:.0f} s. Mean and std over the folds:")
    summary = dbk.tl.benchmark_summary(res)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    for f in res.attrs.get("failed", []):
        print(f"FAILED: {f.get('method')} on fold {f.get('fold')}: {f.get('error')}")
    if out is not None:
        res.to_csv(out, index=False)
        print(f"results ({len(res)} rows: split, fold, method, metric, value, seconds) -> {out}")
    return 0


def _benchmark_hest_tasks(tasks: list[str], args, common: dict, out: Path | None) -> int:
    """``dbk benchmark --hest-task``: :func:`dbk.tl.benchmark` on each HEST-Benchmark task, then their summary.

    :func:`dbk.tl.hest_summary` of them all is printed beside the published averages; ``out`` gets the tidy tables
    with a ``task`` column.
    """
    import pandas as pd

    import dbk

    # every task found (or its missing files listed) before any is run
    found = []
    for name in tasks:
        try:
            found.append(dbk.datasets.hest_bench(name, root=args.hest_bench_root, hest_root=args.hest_root))
        except (FileNotFoundError, ConnectionError, ValueError) as err:  # the listing of what is missing, and where
            raise SystemExit(f"--hest-task {name}: {err}") from None
    runs: dict[str, pd.DataFrame] = {}
    for task in found:
        t = time.perf_counter()
        res = dbk.tl.benchmark(task, **common)
        runs[task.name] = res
        print(f"\nbenchmark: HEST-Benchmark task {task.name!r}, {len(res.attrs['folds'])} folds (its split files), "
              f"{len(task.genes)} genes, {time.perf_counter() - t:.0f} s")
        for f in res.attrs.get("failed", []):
            print(f"FAILED: {f.get('method')} on fold {f.get('fold')}: {f.get('error')}")
    print("\nHEST-Benchmark (dbk.tl.hest_summary): per task the mean and np.std (ddof 0) over folds of each fold's "
          "mean over genes of the Pearson r; pearson_flattened is the DiffBulk reference code's metric, not HEST's. "
          "The published averages are over HEST's nine tasks, each with its own foundation model:")
    summary = dbk.tl.hest_summary(runs)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    if out is not None:
        table = pd.concat([res.assign(task=name) for name, res in runs.items()], ignore_index=True)
        table = table[["task", *[c for c in table.columns if c != "task"]]]
        table.to_csv(out, index=False)
        print(f"results ({len(table)} rows: task, split, fold, method, metric, value, seconds) -> {out}")
    return 0


# ---- prepare ---------------------------------------------------------------------------------------------------------


def cmd_prepare(args) -> int:
    """``dbk prepare``: prepare a corpus of slides, one task per slide on a dask cluster; print the report."""
    import contextlib
    import os

    import dbk

    if args.workers is not None and args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    # prepare never replaces --out itself, only <out>/<name>.zarr stores it marked (an input there is refused)
    _refuse_overlap(args.out, args.slides, replaces=False)
    with contextlib.ExitStack() as stack:
        client, threads = None, None
        if args.scheduler == "local":
            import importlib.util

            from distributed import Client, LocalCluster

            n = args.workers or max(1, (os.cpu_count() or 1) // 2)
            threads = max(1, (os.cpu_count() or 1) // n)  # torch / dask threads of each slide
            # ":0": a free port for the scheduler's HTTP server (the dashboard when bokeh is installed)
            cluster = stack.enter_context(LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                       dashboard_address=":0"))
            client = stack.enter_context(Client(cluster))
            print(f"local dask cluster: {n} workers x 1 slide, {threads} thread(s) each"
                  + (f", dashboard {client.dashboard_link}" if importlib.util.find_spec("bokeh") else ""))
        elif args.scheduler != "none":
            client = args.scheduler  # a scheduler address; prepare connects to it
            if args.workers is not None:
                print(f"--workers is ignored with --scheduler {args.scheduler} (the cluster has its own workers)")
        report = dbk.tl.prepare_corpus(args.slides, out=args.out, tile_size_um=args.tile_um, fm=args.fm,
                                       fm_size_px=args.fm_size_px, client=client, overwrite=args.overwrite,
                                       threads=threads, accelerator=args.accelerator)
    shown = report[["name", "status", "n_tiles", "n_genes", "seconds", "path", "error"]].astype(object)
    shown = shown.where(shown.notna(), "")
    rows = [(n, st, t, g, f"{sec:.1f}", p, e if len(e) <= 100 else e[:97] + "...")
            for n, st, t, g, sec, p, e in shown.itertuples(index=False)]
    print(_table(rows, ("slide", "status", "tiles", "genes", "seconds", "path", "error")))
    counts = report["status"].value_counts()
    print(f"{counts.get('done', 0)} done, {counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} failed "
          f"-> {args.out}")
    return 1 if counts.get("failed", 0) else 0


# ---- entry point -----------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default where it has one worth showing, once.

    ``argparse.ArgumentDefaultsHelpFormatter`` appends ``(default: None)`` to options without a default, a default to
    required options, and a second default to help that already says it. Here the default is appended only to an
    optional option whose default is a value (not ``None``, ``False`` or an empty list) and whose help does not say
    ``default:`` itself.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (not action.option_strings or action.required or "default:" in text or "%(default)" in text
                or d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, list) and not d)):
            return text
        return text + " (default: %(default)s)"


# options renamed: {old option: (new option, why)}; the old one is accepted, hidden, for one release and warns
RENAMED = {"--device": ("--accelerator", "the name of the Python API's argument"),
           "--csv": ("--out", "the option of every command for what it writes")}
ACCELERATOR_HELP = "auto (CUDA if available), cpu, cuda, cuda:1 ... (default: auto)"


def _deprecated(message: str) -> None:
    """Warn (FutureWarning) about a command-line form that goes.

    Python's default filters show it on stderr as ``dbk:0: FutureWarning: ...``, without a line of dbk's source.
    """
    import warnings

    warnings.warn_explicit(message, FutureWarning, "dbk", 0, module="dbk.cli")


def _add_accelerator(p, where: str) -> None:
    p.add_argument("--accelerator", default=None, help=f"{where}: {ACCELERATOR_HELP}")
    p.add_argument("--device", dest="old_device", default=None, help=argparse.SUPPRESS)  # RENAMED


def _add_data_args(p, *, many: bool, images: bool = True) -> None:
    p.add_argument("--hest-root", default=None, help="HEST download folder (with wsis/, metadata/, st/ ...), for "
                   "--sample")
    p.add_argument("--sample", default=[] if many else None, action="append" if many else "store",
                   help="HEST sample id in --hest-root" + (" (repeat for several)" if many else ""))
    p.add_argument("--pixel-size-um", type=float, default=None,
                   help="µm per pixel, for a plain image file" if images else argparse.SUPPRESS)


def _resolve_renamed(args) -> None:
    """The hidden old options of :data:`RENAMED`: warn, and use their value under the new name."""
    for old, dest, new in (("--device", "old_device", "accelerator"), ("--csv", "csv", "out")):
        value = getattr(args, dest, None)
        if value is None or (dest == "csv" and getattr(args, "command", None) == "benchmark"):
            continue
        name, why = RENAMED[old]
        _deprecated(f"{old} is now {name} ({why}); {old} goes in the next release.")
        if getattr(args, new) is not None and getattr(args, new) != value:
            raise SystemExit(f"{old} and {name} are one option ({old} its old name): give {name} only.")
        setattr(args, new, value)
        if dest == "csv":
            args.overwrite = True  # as --csv did: the metrics file was replaced
    if getattr(args, "accelerator", "") is None:
        args.accelerator = "auto"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``dbk`` parser and its subcommands' parsers by name (built without importing the scientific stack)."""
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="dbk", description="DiffBulk: spatial expression from H&E.",
                                     formatter_class=fmt)
    parser.add_argument("--version", action="store_true", help="print the dbk version and exit")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of torch, BLAS and OpenMP (dbk.settings.n_jobs; default: the cores this "
                             "process may use; 1 is often fastest on a busy, small machine)")
    sub = parser.add_subparsers(dest="command")
    slides_help = ("slides: SpatialData .zarr stores, HEST folders (every sample) or HEST_ROOT/SAMPLE_ID, ST folders "
                   "(counts table, spot file and H&E image, as dbk.io.read_st_folder reads them)")

    p_demo = sub.add_parser("demo", help="run the whole pipeline on built-in synthetic slides (no download)",
                            formatter_class=fmt)
    p_demo.add_argument("--out", default="dbk_demo_output", help="output folder (figures, model, zarr stores)")
    p_demo.add_argument("--size", type=int, default=4096, help="synthetic slide side in pixels (0.5 µm/px)")
    p_demo.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm")
    p_demo.add_argument("--seed", type=int, default=0, help="random seed")
    p_demo.add_argument("--quick", action="store_true", help="a smoke-test model (seconds, not minutes)")

    p_fit = sub.add_parser("fit", help="fit DiffBulk on slides with H&E and expression; save the model folder",
                           formatter_class=fmt)
    p_fit.add_argument("data", nargs="*", help=slides_help)
    _add_data_args(p_fit, many=True)
    p_fit.add_argument("--out", required=True, help="model folder to write")
    p_fit.add_argument("--preset", default="auto", choices=PRESET_CHOICES,
                       help="stage-1 preset (auto: gpu on CUDA, else a short cpu-small)")
    p_fit.add_argument("--pretrain-steps", type=int, default=None, help="stage-1 steps (default: the preset's)")
    p_fit.add_argument("--fm", default="efficientnet_lite0",
                       help="foundation model: a timm name, an hf-hub: id, local-dir:/folder or a checkpoint file")
    p_fit.add_argument("--fm-arch", default=None,
                       help="timm architecture of a --fm checkpoint file (e.g. vit_large_patch16_224 for UNI)")
    p_fit.add_argument("--fm-size-px", type=int, default=None,
                        help="foundation-model input size (default: the model's own)")
    p_fit.add_argument("--genes", default=None, help="file with the genes to predict, one per line")
    p_fit.add_argument("--n-top-genes", type=int, default=None, help="keep the N most variable genes")
    p_fit.add_argument("--fusion", default="auto", choices=["auto", "gated", "concat", "add", "film", "ridge"],
                       help="fusion head: auto (inner CV on the training slides keeps a full-rank ridge unless a "
                            "reduced-rank, spatial-context, late-fused or gated head beats it by more than one "
                            "standard error), neural (gated, concat, add, film) or ridge (linear, alpha by inner CV)")
    p_fit.add_argument("--head-cv", type=int, default=3,
                       help="folds of the head's inner CV on the training slides (per-gene CV scores; auto's choice); "
                            "0: none")
    p_fit.add_argument("--patients", default=None,
                       help="the patient of each slide, SAMPLE=PATIENT pairs (B4=B,C2=C) or a file of 'sample,patient' "
                            "lines: the trust scores then hold out whole patients (default: each slide's "
                            "attrs['patient'], as read_hest sets it)")
    p_fit.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm for slides without tiles")
    p_fit.add_argument("--rank", default=None,
                       help="ridge head (--fusion ridge): reduced rank, 'auto' (by inner CV) or a number; none: full")
    p_fit.add_argument("--blend", default=None, choices=["early", "late"],
                       help="ridge head (--fusion ridge): one ridge on both feature sets (early) or one per set, "
                            "blended by inner CV (late); none: early")
    p_fit.add_argument("--context-um", type=float, default=None,
                       help="spatial context: features joined by their mean within this radius in µm (e.g. 300)")
    p_fit.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass of the feature extractors")
    p_fit.add_argument("--max-epochs", type=int, default=None, help="fusion-head epochs (early stopping)")
    p_fit.add_argument("--checkpoint-dir", default=None, help="stage-1 checkpoints (resumed when present)")
    p_fit.add_argument("--seed", type=int, default=0, help="random seed of both stages")
    _add_accelerator(p_fit, "where to train")
    p_fit.add_argument("--overwrite", action="store_true", help="replace --out when it is a dbk model folder")

    p_pred = sub.add_parser("predict", help="predict expression on a slide (H&E only is enough); write zarr",
                            formatter_class=fmt)
    p_pred.add_argument("model", help="model folder (dbk fit --out)")
    p_pred.add_argument("data", nargs="?", default=None,
                        help="the slide: a SpatialData .zarr store, HEST_ROOT/SAMPLE_ID, an ST folder or an H&E image "
                             "file (with --pixel-size-um)")
    _add_data_args(p_pred, many=False)
    p_pred.add_argument("--out", required=True, help="SpatialData .zarr to write")
    p_pred.add_argument("--tiles-key", default="dbk_tiles",
                        help="shapes element of the tiles to predict (made over the tissue when missing)")
    _add_accelerator(p_pred, "where the model runs")
    p_pred.add_argument("--overwrite", action="store_true", help="replace --out when it is a store dbk wrote")

    p_eval = sub.add_parser("evaluate", help="metrics of a saved model (and the training-mean predictor) on one "
                            "slide with expression", formatter_class=fmt)
    _add_evaluate_args(p_eval)

    p_bench = sub.add_parser(
        "benchmark", formatter_class=fmt,
        help="benchmark methods on held-out slides (dbk.tl.benchmark): fit each method on each fold's training slides,"
             " score it on its test slides; print the summary",
        description="Runs dbk.tl.benchmark. The old form `dbk benchmark MODEL SLIDE` (a model on one slide) is now "
                    "`dbk evaluate MODEL SLIDE`; it still works, with a warning, until the next release.")
    p_bench.add_argument("slides", nargs="*", help=slides_help + "; all with expression")
    _add_data_args(p_bench, many=True, images=False)
    p_bench.add_argument("--methods", default=None,
                         help="comma-separated method names (default: dbk.tl.benchmark's: "
                              f"{','.join(BENCHMARK_DEFAULT_METHODS)}; --list-methods lists them all)")
    p_bench.add_argument("--split", default=None, choices=["loso", "patient", "blocks"],
                         help="loso: each slide is the test once; patient: each patient's slides (--patients or "
                              "attrs['patient']); blocks: spatial blocks within each slide (for one slide) "
                              "(default: loso; a --hest-task runs on its own split files)")
    p_bench.add_argument("--hest-task", default=[], action="append",
                         help="a HEST-Benchmark task (IDC, PRAD, PAAD, SKCM, COAD, READ, CCRCC, LUNG, LYMPH_IDC; "
                              "repeat or comma-separate for several) instead of slides: HEST's split files, 50 genes "
                              "and targets, ridge_hest beside the default methods; prints dbk.tl.hest_summary beside "
                              "the published averages (--hest-root: HEST-1k metadata for the pixel sizes)")
    p_bench.add_argument("--hest-bench-root", default=None,
                         help="folder of the HEST-Benchmark task folders (default: dbk.settings.datasetdir/hest_bench;"
                              " missing files are fetched from the hub unless HF_HUB_OFFLINE or DBK_OFFLINE is set)")
    p_bench.add_argument("--genes", default=None, help="file with the genes to predict, one per line (default: those "
                         "measured on every slide)")
    p_bench.add_argument("--n-top-genes", type=int, default=None,
                         help="keep the N most variable genes, chosen on each fold's training tiles")
    p_bench.add_argument("--top-k", type=int, default=50, help="k of the top-k most variable genes' metrics")
    p_bench.add_argument("--patients", default=None,
                         help="the patient of each slide, SAMPLE=PATIENT pairs or a file of 'sample,patient' lines "
                              "(for --split patient; default: each slide's attrs['patient'])")
    p_bench.add_argument("--tile-um", type=float, default=None,
                         help="tile side in µm for slides without tiles (default: 112)")
    p_bench.add_argument("--fm", default="efficientnet_lite0",
                         help="foundation model of every method's features (a name dbk fit --fm takes)")
    p_bench.add_argument("--fm-size-px", type=int, default=None,
                         help="foundation-model input size (default: the model's own)")
    p_bench.add_argument("--context-um", type=float, default=None,
                         help="spatial-context radius in µm of the context methods (default: 1.5 x the median "
                              "distance between neighbouring tiles of each fold's training slides)")
    p_bench.add_argument("--preset", default="auto", choices=PRESET_CHOICES,
                         help="stage-1 preset of the DiffBulk methods (auto: gpu on CUDA, else cpu-small)")
    p_bench.add_argument("--pretrain-steps", type=int, default=None,
                         help="stage-1 steps of the DiffBulk methods (default: the preset's)")
    p_bench.add_argument("--checkpoint-dir", default=None, help="stage-1 checkpoints, one folder per fold")
    p_bench.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass of the feature extractors")
    p_bench.add_argument("--errors", default="raise", choices=["raise", "warn"],
                         help="a method that fails: stop (raise) or record it and go on (warn)")
    p_bench.add_argument("--seed", type=int, default=0, help="random seed of every method")
    _add_accelerator(p_bench, "where the methods train and run")
    p_bench.add_argument("--out", default=None, help="CSV file of the tidy results (split, fold, method, metric, "
                         "value, seconds)")
    p_bench.add_argument("--overwrite", action="store_true", help="replace --out")
    p_bench.add_argument("--list-methods", action="store_true", help="list the methods and exit")
    # the old form's options (`dbk benchmark MODEL SLIDE --csv FILE`, now dbk evaluate), hidden
    p_bench.add_argument("--csv", default=None, help=argparse.SUPPRESS)

    p_prep = sub.add_parser("prepare", help="prepare a corpus for training (tiles, pseudo-bulk, embeddings), "
                            "one slide per task on a dask cluster; reruns skip finished slides", formatter_class=fmt)
    p_prep.add_argument("slides", nargs="+",
                        help="SpatialData .zarr stores, HEST folders (or HEST_ROOT/SAMPLE_ID), ST folders")
    p_prep.add_argument("--out", required=True, help="output folder, one <name>.zarr per slide")
    p_prep.add_argument("--scheduler", default="local",
                        help="'local' (a LocalCluster of --workers processes), a scheduler address "
                        "(tcp://host:8786), or 'none' (one slide after the other in this process)")
    p_prep.add_argument("--workers", type=int, default=None, help="local workers (default: half the CPU cores)")
    p_prep.add_argument("--tile-um", type=float, default=112.0, help="tile side in µm")
    p_prep.add_argument("--fm", default="efficientnet_lite0", help="foundation model of the embeddings")
    p_prep.add_argument("--fm-size-px", type=int, default=None,
                        help="foundation-model input size (default: the model's own)")
    _add_accelerator(p_prep, "where each worker embeds the tiles")
    p_prep.add_argument("--overwrite", action="store_true", help="prepare every slide again")
    return parser, dict(sub.choices)


def _add_evaluate_args(p) -> None:
    p.add_argument("model", help="model folder (dbk fit --out)")
    p.add_argument("data", nargs="?", default=None,
                   help="the slide, with expression: a SpatialData .zarr store, HEST_ROOT/SAMPLE_ID or an ST folder")
    _add_data_args(p, many=False, images=False)  # --pixel-size-um: hidden, old form
    p.add_argument("--top-k", type=int, default=50,
                   help="k of the top-k metrics: the most variable genes of the training slides")
    p.add_argument("--out", default=None, help="CSV file of the metrics table (one row per method)")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    _add_accelerator(p, "where the model runs")
    p.add_argument("--csv", default=None, help=argparse.SUPPRESS)  # RENAMED: --out


def _after(argv: list[str], command: str) -> list[str]:
    """The arguments of ``command`` in ``argv`` (those after its name; the global options take no such word)."""
    return argv[argv.index(command) + 1:]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dbk`` command."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import dbk

        print(dbk.__version__)
        return 0
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        import dbk

        dbk.settings.n_jobs = args.threads  # torch, BLAS and OpenMP threads
    if args.command == "benchmark" and args.slides and _is_model_folder(args.slides[0]):
        # the old form, `dbk benchmark MODEL SLIDE`: dbk evaluate, with a warning, for one release
        _deprecated("`dbk benchmark MODEL SLIDE` evaluates one model on one slide: use `dbk evaluate MODEL SLIDE`; "
                    "this form goes in the next release (`dbk benchmark SLIDE ...` runs dbk.tl.benchmark).")
        args = commands["evaluate"].parse_args(_after(argv, "benchmark"))
        args.command = "evaluate"
    _resolve_renamed(args)
    if args.command == "demo":
        if args.size < 512:
            parser.error("--size must be at least 512 pixels")
        demo(args.out, size=args.size, random_state=args.seed, tile_size_um=args.tile_um, quick=args.quick)
        return 0
    run = {"fit": cmd_fit, "predict": cmd_predict, "evaluate": cmd_evaluate, "benchmark": cmd_benchmark,
           "prepare": cmd_prepare}.get(args.command)
    if run is None:
        parser.print_help()
        return 1
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
