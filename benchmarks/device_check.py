"""The GPU work of dbk, one call at a time: a cell of the stage-1 trial, GPU tests, stage-1 throughput.

    python benchmarks/device_check.py --data .devcarry/her2st --cell B4:0 --out results/cell   # on the GPU machine
    python benchmarks/device_check.py --dry-run --out /tmp/dry                                  # CPU, toy size, ~1 min
    python benchmarks/device_cells.py --data .devcarry/her2st benchmarks/device_results/cells/  # stage 2, on a CPU

``--data`` is the folder ``benchmarks/device_data.py`` writes (the six her2st JPEGs and ``tables.npz``: spot boxes,
785-gene targets, EfficientNet-Lite0 embeddings, dense tile boxes). The GPU machine needs torch, timm, accelerate,
numpy, pandas, scipy, scikit-learn, pillow and diffusers; not anndata, spatialdata, dask or geopandas: everything here
goes through the torch core (:class:`dbk.tl.TileArrays`, array inputs of :func:`dbk.tl.diffusion_features`).
``--dry-run`` runs the same code on the CPU on a synthetic folder of the same layout, with the tiny preset and a few
steps (``tests/test_device_check.py`` runs it).

Sections (``--sections``, default ``env,cell``), each written to ``<out>/device_check.json`` and
``<out>/device_check.md`` as soon as it ends (a run cut short keeps what it finished):

1. ``env``: torch / CUDA / card, and the card's bf16 matrix rate measured now (median of 10 products of 8192^3
   after 3 warm-ups, CUDA events): the ceiling for the achieved fractions of ``throughput``.
2. ``tests``: ``pytest -m gpu tests/test_gpu.py`` (with ``DBK_GPU_TESTS_ON_CPU=1`` in a dry run).
3. ``cell``: one cell (``--cell FOLD:SEED``) of the three-way stage-1 trial on her2st, leave one section out (test
   FOLD, train the other five). Three stage-1 models of the ``gpu`` preset (128 px, batch 128, compiled), all from
   the same seeded initial weights: (i) with genes (condition dropout 0.5) and (ii) without (dropout 1.0: in-domain
   denoising only), each trained the same fixed number of steps (``--steps``, default 250: steps, not seconds, so
   cells from an H100 and an H200 compare) on every labelled spot tile of the training sections plus dense
   overlapping tiles (112 µm every 56 µm) over their tissue, half of each batch spot tiles (the
   ``labeled_fraction=0.5`` sampler); side by side where the card holds both (>= 120 GiB), else one after the other;
   (iii) untrained. Then the held-out conditioning gain on FOLD (denoising loss with the tile's own profile, none,
   another tile's, at sigma 0.2 / 0.5 / 1) and each model's diffusion features (sigma 0.01, all decoder levels, mean
   pool) of every spot tile of every section, saved as ``cell_<FOLD>_s<SEED>.npz`` (float16, with the loss curves,
   the conditioning table and the call's card, date, command, seconds and dbk commit: a few MiB, so it comes back).
   Stage 2 is not run here: ``benchmarks/device_cells.py`` scores every cell with the same head code on a CPU.
4. ``throughput``: stage-1 training throughput (bf16 autocast) of the ``gpu`` preset at 128 and 224 px and of the
   ``paper`` preset at 224 px, each plain and channels-last, and with ``torch.compile`` while time remains:
   images/s and step time (30 steps after 5 warm-up steps, synchronised before and after only, so loading overlaps
   queued GPU work as in training), model FLOPs per image (``torch.utils.flop_counter``, forward + backward of the
   denoiser) and the achieved fraction of the measured bf16 matrix rate, data-wait share, peak GPU memory.

A global budget (``--budget-s``) bounds the waits; the cell's order is B4 with seeds 0, 1, 2, then the other sections
with seed 0 (see ``docs/benchmarks.md``); after any change to the training step, B4 / seed 0 is rerun first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
T0 = time.perf_counter()
TRAIN = ("C2", "C3", "C4", "C5", "C6")  # the dry-run data's training sections for B4
SIGMAS = (0.2, 0.5, 1.0)
CONTEXT_UM = 300.0


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


# ---- report --------------------------------------------------------------------------------------------------------


class Report:
    """Results as JSON and markdown, rewritten (atomically) after every section."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out = out
        self.data: dict = {"meta": meta, "sections": {}}

    def put(self, section: str, value) -> None:
        self.data["sections"][section] = value
        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - T0, 1)
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("device_check.json", json.dumps(self.data, indent=1, default=str)),
                           ("device_check.md", self.markdown())):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def markdown(self) -> str:
        m, s = self.data["meta"], self.data["sections"]
        lines = [f"# dbk device check ({'dry run' if m.get('dry_run') else 'full run'})", "",
                 f"{m.get('date')}, {m.get('device')}, torch {m.get('torch')}, command `{m.get('command')}`, "
                 f"{m.get('elapsed_s')} s.", ""]
        env = s.get("env")
        if env:
            lines += ["## Card", "", f"- {env.get('device')}; matmul {env.get('matmul_shape')}: "
                      f"{env.get('matmul_tflops')} TFLOP/s (the ceiling used below)", ""]
        tests = s.get("tests")
        if tests:
            lines += ["## GPU tests", "",
                      f"`{tests.get('command')}`: {tests.get('summary')} ({tests.get('seconds')} s with start-up)",
                      "", "| test | outcome | s |", "| --- | --- | --- |"]
            lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']} |" for t in tests.get("tests", [])]
            lines.append("")
        cell = s.get("cell")
        if cell:
            lines += _cell_md(cell)
        thr = s.get("throughput")
        if thr:
            lines += ["## Stage-1 training throughput (bf16 autocast)", "",
                      "| preset | px | batch | channels_last | compile | images/s | step ms | GFLOP/image | "
                      "% of bf16 matmul | data wait | peak GiB | note |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in thr.get("rows", []):
                lines.append(f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['channels_last']} | "
                             f"{r['compile']} | {r.get('images_per_s', '-')} | {r.get('step_ms', '-')} | "
                             f"{r.get('gflop_per_image', '-')} | {r.get('pct_of_matmul', '-')} | "
                             f"{r.get('data_wait', '-')} | {r.get('peak_gib', '-')} | {r.get('note', '')} |")
            lines.append("")
        for name, sec in s.items():
            if isinstance(sec, dict) and sec.get("error"):
                lines += [f"## {name}: FAILED", "", "```", sec["error"][-3000:], "```", ""]
            if isinstance(sec, dict) and sec.get("skipped"):
                lines += [f"## {name}: skipped", "", sec["skipped"], ""]
        return "\n".join(lines) + "\n"


def _cell_md(t: dict) -> list[str]:
    lines = [f"## Stage-1 trial cell: test {t.get('fold')}, seed {t.get('seed')}", ""]
    if "setup" in t:
        lines += [f"- {t['setup']}", ""]
    models = t.get("models", {})
    if models:
        lines += ["| stage-1 model | cond_drop | steps | images seen | fit s | images/s | final loss |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for k, v in models.items():
            lines.append(f"| {k} | {v.get('cond_drop')} | {v.get('steps')} | {v.get('images_seen')} | "
                         f"{v.get('fit_wall_s', '-')} | {v.get('images_per_s', '-')} | {v.get('final_loss')} |")
        lines.append("")
    gain = t.get("conditioning", [])
    if gain:
        lines += [f"Held-out conditioning on {t.get('fold')} (mean per-pixel denoising MSE; gain = 1 - cond / uncond):",
                  "", "| model | sigma | own profile | none | shuffled | gain | gain shuffled |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['model']} | {r['sigma']} | {r['loss_cond']:.5f} | {r['loss_uncond']:.5f} | "
                  f"{r['loss_shuffled']:.5f} | {r['gain']:+.4f} | {r['gain_shuffled']:+.4f} |" for r in gain]
        lines.append("")
    if t.get("file"):
        lines += [f"Features: `{t['file']}` (stage 2: `python benchmarks/device_cells.py`).", ""]
    return lines


def run_section(report: Report, name: str, fn, *args, **kwargs):
    log(f"== {name}")
    try:
        out = fn(*args, **kwargs)
    except Exception:  # recorded and shown in the report; the other sections still run
        err = traceback.format_exc()
        print(err, flush=True)
        report.put(name, {"error": err})
        return None
    report.put(name, out)
    return out


def left(budget: float) -> float:
    return budget - (time.perf_counter() - T0)


# ---- env -----------------------------------------------------------------------------------------------------------


def section_env(dry: bool) -> dict:
    import torch

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            a @ b
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        out["matmul_shape"] = f"{n}^3 bf16"
        out["matmul_tflops"] = round(2 * n**3 / float(np.median(times)) / 1e12, 1)
        del a, b
        torch.cuda.empty_cache()
    else:
        out["device"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        out["matmul_shape"] = f"{n}^3 float32"
        out["matmul_tflops"] = round(5 * 2 * n**3 / (time.perf_counter() - t) / 1e12, 4)
    for mod in ("diffusers", "accelerate", "timm", "anndata", "sklearn", "numpy", "pandas"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as err:
            out[mod] = f"missing ({type(err).__name__})"
    return out


# ---- tests ---------------------------------------------------------------------------------------------------------


def section_tests(out: Path, dry: bool, timeout: float) -> dict:
    import xml.etree.ElementTree as ET

    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if dry:
        env["DBK_GPU_TESTS_ON_CPU"] = "1"
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    secs = round(time.perf_counter() - t, 1)
    rows = []
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = f"{tag}: {(el.get('message') or '')[:200]}"
            rows.append({"name": case.get("name"), "outcome": outcome,
                         "seconds": round(float(case.get("time", 0)), 1)})
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    res = {"command": "pytest -m gpu tests/test_gpu.py" + (" (DBK_GPU_TESTS_ON_CPU=1)" if dry else ""),
           "returncode": proc.returncode, "summary": summary, "seconds": secs, "tests": rows}
    if proc.returncode != 0:
        res["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
        print(res["output_tail"], flush=True)
    return res


# ---- data ----------------------------------------------------------------------------------------------------------


def make_dry_data(folder: Path, seed: int = 0) -> Path:
    """A tiny her2st-shaped folder (six JPEGs, tables.npz) whose colours follow the first genes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sections = ("B4", *TRAIN)
    n_genes, side, tile = 40, 480, 48
    genes = [f"GENE{i}" for i in range(n_genes)]
    rows = {k: [] for k in ("spot_section", "spot_box", "spot_id", "Y", "fm", "dense_section", "dense_box")}
    for s in sections:
        img = np.full((side, side, 3), 235, np.float64)
        grid = [(x, y) for y in range(24, side - tile, 56) for x in range(24, side - tile, 56)]
        for i, (x, y) in enumerate(grid):
            prog = rng.gamma(2.0, 1.0, size=2)
            expr = rng.poisson(5 + 20 * np.outer(prog, np.ones(n_genes // 2)).ravel())
            color = np.array([200 - 40 * prog[0], 120 + 30 * prog[1], 200 - 20 * prog[1]])
            img[y : y + tile, x : x + tile] = np.clip(color + rng.normal(0, 12, (tile, tile, 3)), 0, 255)
            rows["spot_section"].append(s)
            rows["spot_box"].append([x, y, x + tile, y + tile])
            rows["spot_id"].append(f"{s}_{i}")
            rows["Y"].append(np.log1p(1e4 * expr / expr.sum()))
            rows["fm"].append(np.concatenate([color / 255, rng.normal(0, 1, 14)]))
        for y in range(0, side - tile, tile // 2):
            for x in range(0, side - tile, tile // 2):
                rows["dense_section"].append(s)
                rows["dense_box"].append([x, y, x + tile, y + tile])
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{s}.jpg", quality=90)
    np.savez_compressed(folder / "tables.npz", sections=np.array(sections),
                        um_per_px=np.full(len(sections), 112 / tile),
                        genes=np.array(genes), **{k: np.array(v) for k, v in rows.items()})
    return folder


def cut_section(args) -> np.ndarray:
    """Tiles of one JPEG: each box cropped and resized to ``size`` px (PIL bilinear, antialiased)."""
    from PIL import Image

    path, boxes, size = args
    Image.MAX_IMAGE_PIXELS = None
    img = Image.open(path).convert("RGB")
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i] = np.asarray(img.crop((int(x0), int(y0), int(x1), int(y1))).resize((size, size), Image.BILINEAR))
    return out


def cut_tiles(data: Path, tables: dict, size: int, workers: int,
              train: tuple[str, ...] = TRAIN) -> tuple[np.ndarray, np.ndarray]:
    """(spot tiles of all sections, dense tiles of the training sections ``train``) at ``size`` px."""
    from concurrent.futures import ProcessPoolExecutor

    jobs, keys = [], []
    for s in tables["sections"]:
        sel = tables["spot_section"] == s
        jobs.append((data / f"{s}.jpg", tables["spot_box"][sel], size))
        keys.append(("spot", s))
        if s in train:
            dsel = tables["dense_section"] == s
            jobs.append((data / f"{s}.jpg", tables["dense_box"][dsel], size))
            keys.append(("dense", s))
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as ex:
        parts = dict(zip(keys, ex.map(cut_section, jobs), strict=True))
    spots = np.empty((len(tables["spot_section"]), size, size, 3), np.uint8)
    for s in tables["sections"]:
        spots[tables["spot_section"] == s] = parts[("spot", s)]
    dense = np.concatenate([parts[("dense", s)] for s in train if ("dense", s) in parts])
    return spots, dense


def parse_cell(text: str, sections) -> tuple[str, int, tuple[str, ...]]:
    """``"B4:0"`` -> (test section, seed, training sections: all the others)."""
    fold, _, seed = text.partition(":")
    sections = [str(x) for x in sections]
    if fold not in sections or not seed.strip().isdigit():
        raise SystemExit(f"--cell must be FOLD:SEED with FOLD one of {sections} and SEED an integer, got {text!r}.")
    return fold, int(seed), tuple(x for x in sections if x != fold)


def load_tables(data: Path) -> dict:
    with np.load(data / "tables.npz", allow_pickle=False) as z:
        t = {k: z[k] for k in z.files}
    for k in ("sections", "spot_section", "spot_id", "genes", "dense_section"):
        t[k] = t[k].astype(str)
    return t


# ---- the fair trial ------------------------------------------------------------------------------------------------


def trial_preset(dry: bool):
    from dbk.tl import get_preset

    return get_preset("tiny", log_every=5) if dry else get_preset("gpu", log_every=25)


def worker(args) -> None:
    """One stage-1 training of a cell (run as a subprocess): loads the cut tiles, trains ``--steps`` steps, saves."""
    import torch

    import dbk
    from dbk.tl import DiffusionPretrainer, TileArrays

    work = Path(args.work)
    tables = load_tables(Path(args.data))
    _, seed, train = parse_cell(args.cell, tables["sections"])
    spots = np.load(work / "spots.npy", mmap_mode="r")
    dense = np.load(work / "dense.npy", mmap_mode="r")
    genes = list(tables["genes"])
    dbk.settings.progress = False
    arrays = []
    for s in train:
        sel = tables["spot_section"] == s
        arrays.append(TileArrays(np.ascontiguousarray(spots[sel]), X=tables["Y"][sel], genes=genes, name=s,
                                 tile_size_um=112.0))
    arrays.append(TileArrays(np.ascontiguousarray(dense), name="dense", tile_size_um=112.0))
    cond_drop = {"cond": 0.5, "nocond": 1.0}[args.worker]
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 if args.parallel else 1)))
    model = DiffusionPretrainer(genes, preset=trial_preset(args.dry_run), random_state=seed, cond_drop=cond_drop)
    t = time.perf_counter()
    model.fit(arrays, labeled_fraction=0.5, max_steps=args.steps)
    wall = time.perf_counter() - t
    model.save(work / f"model_{args.worker}", overwrite=True)
    info = {"cond_drop": cond_drop, "steps": model.step, "images_seen": model.step * model.preset.batch_size,
            "train_s": round(model.train_time, 1), "fit_wall_s": round(wall, 1),
            "images_per_s": round(model.step * model.preset.batch_size / max(wall, 1e-9), 1),
            "final_loss": round(model.history[-1]["loss"], 5), "stopped_by": model.stopped_by,
            "history": [{"step": h["step"], "loss": h["loss"]} for h in model.history],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}
    (work / f"model_{args.worker}.json").write_text(json.dumps(info))


def _card_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0


def section_cell(args, report: Report, data: Path, out: Path, work: Path) -> dict:
    """One cell of the three-way trial: (i) with genes, (ii) without, (iii) untrained, for one (fold, seed).

    Brings back ``cell_<fold>_s<seed>.npz`` (float16 diffusion features of every spot tile of every section for each
    model, loss curves, held-out conditioning gain, the call's facts); stage 2 runs elsewhere
    (``benchmarks/device_cells.py``), so every cell is scored by the same head code.
    """
    import torch

    from dbk.tl import DiffusionPretrainer, TileArrays, diffusion_features

    dry = args.dry_run
    tables = load_tables(data)
    fold, seed, train = parse_cell(args.cell, tables["sections"])
    genes = list(tables["genes"])
    preset = trial_preset(dry)
    t = time.perf_counter()
    spots, dense = cut_tiles(data, tables, preset.image_size, workers=os.cpu_count() or 2, train=train)
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "spots.npy", spots)
    np.save(work / "dense.npy", dense)
    n_lab = int(np.isin(tables["spot_section"], train).sum())
    # two trainings side by side only where the card holds both (the gpu preset peaks at ~47 GiB eager on an H200)
    args.parallel = dry or _card_gib() >= 120
    res: dict = {"fold": fold, "seed": seed, "train": list(train), "setup": (
        f"cell {fold}/seed {seed}: {n_lab} labelled spot tiles + {len(dense)} dense tiles (112 µm every 56 µm) of "
        f"{', '.join(train)} at {preset.image_size} px, cut in {time.perf_counter() - t:.0f} s; preset "
        f"{preset.name!r} (compile={preset.compile}), batch {preset.batch_size} with half spot tiles; (i) and (ii) "
        f"trained {args.steps} steps each, {'side by side' if args.parallel else 'one after the other'}; "
        f"{len(genes)} genes; test {fold}.")}
    log(res["setup"])
    report.put("cell", res)

    def launch(name):
        cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--data", str(data),
               "--cell", args.cell, "--steps", str(args.steps)] + (["--dry-run"] if dry else []) + \
              (["--parallel"] if args.parallel else [])
        logf = open(out / f"cell_{name}.log", "w")
        return subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT), logf

    def finish(name, p, logf):
        p.wait(timeout=max(60.0, left(args.budget_s)))
        logf.close()
        if p.returncode != 0:
            tail = (out / f"cell_{name}.log").read_text()[-3000:]
            raise RuntimeError(f"cell worker {name!r} failed (exit {p.returncode}):\n{tail}")

    if args.parallel:
        procs = {name: launch(name) for name in ("cond", "nocond")}
        for name, (p, logf) in procs.items():
            finish(name, p, logf)
    else:
        for name in ("cond", "nocond"):
            finish(name, *launch(name))
    models, infos = {}, {}
    for name in ("cond", "nocond"):
        infos[name] = json.loads((work / f"model_{name}.json").read_text())
        models[name] = DiffusionPretrainer.load(work / f"model_{name}")
    models["untrained"] = DiffusionPretrainer(genes, preset=preset, random_state=seed)
    models["untrained"].to("cuda" if torch.cuda.is_available() else "cpu")
    infos["untrained"] = {"cond_drop": "-", "steps": 0, "images_seen": 0, "train_s": 0, "final_loss": "-"}
    res["models"] = {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in infos.items()}
    report.put("cell", res)

    test = tables["spot_section"] == fold
    held = TileArrays(spots[test], X=tables["Y"][test], genes=genes, name=fold, tile_size_um=112.0)
    rows, feats = [], {}
    for name, m in models.items():
        ev = m.evaluate(held, sigmas=SIGMAS, max_tiles=None)
        rows += [{"model": name, **r} for r in ev.to_dict("records")]
        feats[name] = diffusion_features(spots, m, sigma=0.01, tile_ids=tables["spot_id"], batch_size=128)
        log(f"{name}: features {feats[name].shape}, conditioning gain at sigma 0.5: "
            f"{float(ev.loc[ev['sigma'] == 0.5, 'gain'].iloc[0]):+.4f}")
    res["conditioning"] = rows
    meta = dict(report.data["meta"], card=(report.data["sections"].get("env") or {}).get("device"),
                call_s=round(time.perf_counter() - T0, 1), fold=fold, seed=seed, steps=args.steps,
                preset=preset.name, image_size=preset.image_size, batch_size=preset.batch_size,
                compile=preset.compile, train=list(train))
    curves = {f"loss_{k}": np.array([[h["step"], h["loss"]] for h in v.get("history", [])], np.float32).reshape(-1, 2)
              for k, v in infos.items() if k != "untrained"}
    path = out / f"cell_{fold}_s{seed}.npz"
    tmp = out / f".{path.name}.tmp.npz"
    np.savez_compressed(tmp, spot_id=tables["spot_id"], spot_section=tables["spot_section"],
                        meta=np.array(json.dumps(meta | {"models": res["models"]})),
                        conditioning=np.array(json.dumps(rows)), **curves,
                        **{f"feat_{k}": v.astype(np.float16) for k, v in feats.items()})
    tmp.replace(path)
    res["file"] = path.name
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return res


# ---- throughput ----------------------------------------------------------------------------------------------------


def _flops_per_image(model, image_size: int, device) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = model.net
    net.train()
    x = torch.randn(2, 3, image_size, image_size, device=device)
    sigma = torch.full((2,), 0.5, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        net(x, sigma).float().pow(2).mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def throughput_config(preset_name: str, overrides: dict, *, steps: int, warm: int, peak_tflops: float | None,
                      dry: bool) -> dict:
    """Images/s of training steps as ``fit`` runs them: ``warm`` steps first (cuDNN autotuning, compilation), then
    ``steps`` more in a second ``fit`` call timed from a synchronise before to one after, with no synchronisation in
    between (the data loading of the next batch overlaps the queued GPU work, as in real training)."""
    import torch

    import dbk
    from dbk.tl import DiffusionPretrainer, TileArrays, get_preset

    dbk.settings.progress = False
    p = get_preset(preset_name, **overrides)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rng = np.random.default_rng(0)
    n = p.batch_size * 4
    genes = [f"G{i}" for i in range(785 if not dry else 20)]
    data = TileArrays(rng.integers(0, 256, (n, p.image_size, p.image_size, 3), dtype=np.uint8),
                      X=rng.gamma(1.0, 1.0, (n, len(genes))).astype(np.float32), genes=genes)
    model = DiffusionPretrainer(genes, preset=p, random_state=0, log_every=10**6)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model.fit(data, max_steps=warm)
    first = time.perf_counter() - t
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    model.fit(data, max_steps=warm + steps)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    step_s = dt / steps
    row = {"preset": preset_name, "image_size": p.image_size, "batch": p.batch_size, "channels_last": p.channels_last,
           "compile": p.compile, "images_per_s": round(p.batch_size / step_s, 1), "step_ms": round(1e3 * step_s, 1),
           "data_wait": f"{100 * model.history[-1]['data_wait']:.1f}%",
           "params_m": round(sum(q.numel() for q in model.net.parameters()) / 1e6, 1),
           "first_steps_s": round(first, 1), "timed_s": round(dt, 1)}
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    flops = _flops_per_image(model, p.image_size, device)
    row["gflop_per_image"] = round(flops / 1e9, 1)  # forward + backward, as counted
    if peak_tflops:
        row["pct_of_matmul"] = round(100 * flops * row["images_per_s"] / (peak_tflops * 1e12), 1)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return row


DEFAULT_CONFIGS = ("gpu;gpu:channels_last=1;gpu:image_size=224,batch_size=64;"
                   "gpu:image_size=224,batch_size=64,channels_last=1;paper;paper:channels_last=1;gpu:compile=1")


def parse_configs(text: str) -> list[tuple[str, dict]]:
    """``"gpu;gpu:batch_size=256,compile=1;paper"`` -> [(preset, overrides), ...] (values as int, float or bool)."""
    out = []
    for item in filter(None, text.split(";")):
        name, _, rest = item.partition(":")
        ov = {}
        for kv in filter(None, rest.split(",")):
            k, v = kv.split("=")
            ov[k] = bool(int(v)) if k in ("channels_last", "compile") else (float(v) if "." in v else int(v))
        out.append((name, ov))
    return out


def section_throughput(args, report: Report, peak_tflops: float | None) -> dict:
    dry = args.dry_run
    if dry:
        configs = parse_configs(args.configs or "tiny;tiny:channels_last=1;tiny:compile=1")
        steps, warm = 3, 2
    else:
        configs = parse_configs(args.configs or DEFAULT_CONFIGS)
        steps, warm = 30, 5
    res = {"rows": [], "steps_timed": steps, "warmup_steps": warm}
    for name, ov in configs:
        need = 120 if ov.get("compile") else 40
        if not dry and left(args.budget_s) < need:
            res["rows"].append({"preset": name, "image_size": ov.get("image_size", "-"), "batch": "-",
                                "channels_last": ov.get("channels_last", False), "compile": ov.get("compile", False),
                                "note": f"skipped: {left(args.budget_s):.0f} s left of the budget"})
            continue
        try:
            row = throughput_config(name, ov, steps=steps, warm=warm, peak_tflops=peak_tflops, dry=dry)
        except Exception as err:  # one failing configuration (e.g. out of memory) is reported, the others run
            print(traceback.format_exc(), flush=True)
            row = {"preset": name, "image_size": ov.get("image_size", "-"), "batch": "-",
                   "channels_last": ov.get("channels_last", False), "compile": ov.get("compile", False),
                   "note": f"failed: {type(err).__name__}: {str(err)[:150]}"}
        log(f"throughput {name} {ov}: {row}")
        res["rows"].append(row)
        report.put("throughput", res)
    return res


# ---- main ----------------------------------------------------------------------------------------------------------


def _commit() -> str:
    """The dbk commit of this tree (``--commit`` where the tree travelled without its ``.git``)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except Exception:  # no git, or a copy of the tree without .git (the device machine)
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="folder written by benchmarks/device_data.py")
    ap.add_argument("--out", type=Path, default=Path("device_check_out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, synthetic data, tiny preset, seconds-long budgets")
    ap.add_argument("--budget-s", type=float, default=530.0, help="wall budget of the whole call")
    ap.add_argument("--cell", default="B4:0", help="the trial cell FOLD:SEED (test section, seed; default B4:0)")
    ap.add_argument("--steps", type=int, default=None,
                    help="stage-1 steps of each trained model of the cell (default 250; dry run 6)")
    ap.add_argument("--commit", default=None, help="dbk commit recorded in the cell (default: git rev-parse HEAD)")
    ap.add_argument("--sections", default="env,cell", help="comma-separated: env, tests, cell, throughput")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default <out>/work)")
    ap.add_argument("--configs", default=None,
                    help=f"throughput configurations, 'preset[:field=value,...];...' (default {DEFAULT_CONFIGS!r})")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--parallel", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run:  # the compile path through dynamo, without minutes of CPU code generation
        os.environ.setdefault("DBK_COMPILE_BACKEND", "eager")
    if args.steps is None:
        args.steps = 6 if args.dry_run else 250
    if args.steps < 1:
        sys.exit(f"--steps must be >= 1, got {args.steps}.")
    sys.path.insert(0, str(REPO / "src"))
    if args.worker:
        worker(args)
        return
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out / "work"
    if args.dry_run and args.data is None:
        args.data = make_dry_data(work / "data")
    if args.data is None:
        sys.exit("--data is required (the folder benchmarks/device_data.py writes), or use --dry-run.")
    parse_cell(args.cell, load_tables(args.data)["sections"])  # a bad --cell fails before any work
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": args.dry_run,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "commit": args.commit or _commit()}
    report = Report(out, meta)
    report.save()
    sections = args.sections.split(",")
    unknown = set(sections) - {"env", "tests", "cell", "throughput"}
    if unknown:
        sys.exit(f"Unknown sections {sorted(unknown)}; choose from env, tests, cell, throughput.")
    env = run_section(report, "env", section_env, args.dry_run) if "env" in sections else None
    if "tests" in sections:
        # on the device the GPU tests take ~75 s and must fit the budget; a dry run on a busy CPU takes minutes
        run_section(report, "tests", section_tests, out, args.dry_run,
                    timeout=900.0 if args.dry_run else max(30.0, min(150.0, left(args.budget_s))))
    if "cell" in sections:
        run_section(report, "cell", section_cell, args, report, args.data, out, work)
    if "throughput" in sections:
        run_section(report, "throughput", section_throughput, args, report, (env or {}).get("matmul_tflops"))
    log(f"done; results in {out}/device_check.md")
    print((out / "device_check.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
