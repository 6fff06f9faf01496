"""Why do an untrained U-Net's features match the trained stage 1's at CPU scale? (issue 22, item 4)

    python benchmarks/stage1_cpu_study.py                                  # folds B4, C4; cpu-small; steps 0-500
    python benchmarks/stage1_cpu_study.py --folds B4 --steps 0,50,150,500,1500 --sigmas 0.01,0.1,0.5
    python benchmarks/stage1_cpu_study.py --lr 3e-4 --batch-size 32        # another regime (its own row label)
    python benchmarks/stage1_cpu_study.py --no-genes                       # stage 1 without genes (cond_drop 1)
    python benchmarks/stage1_cpu_study.py --levels "all;mid;up2"           # feature levels, from the same pass
    python benchmarks/stage1_cpu_study.py --folds B4 --steps 0,5 --genes 50 --preset tiny --out /tmp/t.csv  # smoke

For each LOSO fold (the test section is never used to train or choose anything) and each seed:

- stage 1 (``dbk.tl.fit_pretrainer``) on the fold's *training* sections' spot tiles and their profiles (the 785
  genes, or the first ``--genes``), one training per (fold, regime, seed), with a model saved at every requested
  step (``--steps``) and training checkpoints (``<cache-dir>/stage1/<fold>_<regime>_s<seed>_g<n>/``): a rerun
  continues from the last checkpoint and skips the cells already in the table. Step 0 is the untrained U-Net of the
  same architecture, vocabulary and seed (the weights ``fit_pretrainer`` starts from), always computed: it is the
  control every other step is compared with.
- at each step, diffusion features (``dbk.tl.diffusion_features``: unconditioned decoder activations, mean-pooled,
  noise seeded per tile) of every tile of the six sections for each requested noise level (``--sigmas``) and weights
  (``--weights``: the EMA and the raw network; at step 0 they are the same network, computed once, written twice);
  the decoder levels (``--levels``) are column blocks of the one pass.
- a FIXED cheap head so only the features change: ``dbk.tl.fit_baseline(..., "ridge_cv")`` (one alpha by inner CV
  grouped by training section) on (a) the diffusion features alone (``diff_ridge_cv``) and (b) [FM; diffusion]
  early-fused (``fm+diff_ridge_cv``), plus the FM-only ``fm_ridge_cv`` reference (once per fold). FM: the offline
  ImageNet EfficientNet-Lite0 at 224 px (``dbk.tl.embed_tiles``), computed once per section and cached on disk.
- per row: the held-out section's mean Pearson over the genes, and for steps > 0 the paired difference to step 0
  (same fold, regime, seed, weights, sigma, levels and head) over genes with a gene-bootstrap 95 % interval
  (``--bootstrap`` resamples of the genes) and the number of genes higher. The gene bootstrap treats genes as
  independent (they are not): it is a within-fold interval, not the across-fold one the verdict needs.

Regimes: the default is ``cpu-small`` as ``preset="auto"`` trains it on a CPU (64 px, batch 16, lr 1e-3 with 100
warm-up steps, EMA 0.999, condition dropout 0.5; ``auto`` only shortens ``max_steps`` to 200, which changes no
step of the schedule). ``--lr``, ``--batch-size``, ``--image-size``, ``--no-genes`` (``cond_drop=1.0``: every
condition dropped, as the ``diffbulk_no_genes`` benchmark method) and ``--preset`` change it; the regime's label
(``default``, ``lr0.0003+b32``, ``nogenes`` ...) names the rows and the cache folder.

Output: rows appended (under a file lock) to ``--out`` (default ``benchmarks/results_committed/stage1_cpu_study.csv``,
committed) as each (step, weights, sigma) is done; per-gene Pearson of every row in ``<cache-dir>/pergene/``. At the
end the script prints the rows of this run's folds / regime / seeds and, where two or more folds have a cell, the
mean over folds of the difference to step 0 with a t 95 % interval (the issue's criterion: "earns its place" when
that interval over the six LOSO folds is above 0).

Columns: fold, regime, seed, step, weights, sigma, levels, head, n_genes, pearson_mean, diff_vs_step0, ci_low,
ci_high, n_genes_higher, train_loss_at_step (mean training loss over the 50 steps up to the step), seconds (features
of the row's (weights, sigma) — shared by its heads and levels — plus its head), dbk_commit, date. The FM reference
rows leave regime, seed, step, weights, sigma and levels empty.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data" / "her2st"
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
TILE_UM = 112.0
FM, FM_PX = "efficientnet_lite0", 224
KEYS = ["fold", "regime", "seed", "step", "weights", "sigma", "levels", "head", "n_genes"]
COLUMNS = [*KEYS, "pearson_mean", "diff_vs_step0", "ci_low", "ci_high", "n_genes_higher", "train_loss_at_step",
           "seconds", "dbk_commit", "date"]
LOSS_WINDOW = 50  # train_loss_at_step: mean of the history records of the last LOSS_WINDOW steps


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else None,
                    help="folder with the her2st sections and genes_785.txt (default ../shared/data/her2st)")
    ap.add_argument("--folds", default="B4,C4", help="test sections of the LOSO folds to run (comma-separated)")
    ap.add_argument("--steps", default="0,50,150,500", help="stage-1 steps to measure (0, the control, is added)")
    ap.add_argument("--sigmas", default="0.01,0.1", help="noise levels of the diffusion features")
    ap.add_argument("--weights", default="ema,raw", help="ema and/or raw weights of the stage-1 network")
    ap.add_argument("--levels", default="all",
                    help="';'-separated decoder level sets, e.g. 'all;mid;up2;mid+up0' (column blocks of one pass)")
    ap.add_argument("--heads", default="diff,fm+diff", help="diff and/or fm+diff (the fm reference always runs)")
    ap.add_argument("--genes", type=int, default=None, help="the first N of the 785 genes (default: all)")
    ap.add_argument("--seeds", default="0", help="stage-1 seeds (init, batches, noise; also the feature noise)")
    ap.add_argument("--preset", default="cpu-small", help="stage-1 preset (cpu-small = preset 'auto' on a CPU)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (preset's when unset)")
    ap.add_argument("--batch-size", type=int, default=None, help="tiles per step (preset's when unset)")
    ap.add_argument("--image-size", type=int, default=None, help="stage-1 image side in px (preset's when unset)")
    ap.add_argument("--no-genes", action="store_true", help="train without genes (cond_drop=1.0)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="gene-bootstrap resamples of the 95%% interval")
    ap.add_argument("--feature-batch", type=int, default=64, help="tiles per forward pass of the features")
    ap.add_argument("--accelerator", default="cpu", help="where stage 1 trains and the features run")
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads")
    ap.add_argument("--cache-dir", type=Path, default=HERE / "results" / "stage1_cpu_study",
                    help="FM embeddings, stage-1 checkpoints and models, per-gene Pearson (gitignored)")
    ap.add_argument("--out", type=Path, default=HERE / "results_committed" / "stage1_cpu_study.csv")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before numpy / torch are imported, so the BLAS pools start at this size
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# ---- the table ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl
    import hashlib
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    # the lock file lives in the temporary folder (not beside the committed table), one per table path
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    lock = Path(tempfile.gettempdir()) / f"stage1_cpu_study_{tag}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS, dtype=str)
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows whose key is not in the table yet (read, add, write to a temporary file, rename; locked)."""
    if not rows:
        return
    with _locked(path):
        old = read_table(path)
        have = set(map(tuple, old[KEYS].to_numpy().tolist())) if len(old) else set()
        new = pd.DataFrame([{c: _s(r.get(c)) for c in COLUMNS} for r in rows])
        new = new[[tuple(k) not in have for k in new[KEYS].to_numpy().tolist()]]
        if new.empty:
            return
        df = pd.concat([old, new], ignore_index=True) if len(old) else new
        tmp = path.with_suffix(".tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(path)


def _s(v) -> str:
    """The table's text for a value (keys compare as text)."""
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.6g}"
    return str(v)


def key(fold, regime, seed, step, weights, sigma, levels, head, n_genes) -> tuple[str, ...]:
    return tuple(_s(v) for v in (fold, regime, seed, step, weights, sigma, levels, head, n_genes))


def commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- statistics ---------------------------------------------------------------------------------------------------


def paired(r: np.ndarray, r0: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Mean over genes of ``r - r0`` with a gene-bootstrap 95 % interval, and the genes where ``r > r0``."""
    ok = np.isfinite(r) & np.isfinite(r0)
    d = (r - r0)[ok]
    if not len(d):
        return {"diff_vs_step0": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_genes_higher": ""}
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for s in range(0, n_boot, 250):  # chunks: memory
        k = min(250, n_boot - s)
        boot[s : s + k] = d[rng.integers(0, len(d), (k, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff_vs_step0": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "n_genes_higher": int((d > 0).sum())}


# ---- data ---------------------------------------------------------------------------------------------------------


class Data:
    """The six sections (spot tiles, pseudo-bulk), the genes' targets, cached FM embeddings, tile images per size."""

    def __init__(self, args) -> None:
        import dbk

        self.args = args
        genes = dbk.datasets.her2st_genes(path=args.data)
        self.genes = genes[: args.genes] if args.genes else genes
        raw = dbk.datasets.her2st(path=args.data)
        slides, names = dbk.pp.prepare_slides(raw, tile_size_um=TILE_UM)
        self.sdata = dict(zip(names, slides, strict=True))
        missing = {s: [g for g in self.genes if g not in set(sd.tables["dbk_table"].var_names)]
                   for s, sd in self.sdata.items()}
        if any(missing.values()):
            raise SystemExit(f"genes not measured on every section: { {s: m[:5] for s, m in missing.items() if m} }")
        self.fm_key = dbk.tl.model_key(FM)
        self.y, self.fm, self.names = {}, {}, {}
        for s, sd in self.sdata.items():
            t = sd.tables["dbk_table"]
            x = t[:, self.genes].X
            self.y[s] = np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float32)
            self.names[s] = [f"{s}:{n}" for n in t.obs_names]
            self.fm[s] = self._fm(s, sd)
        self._images: dict = {}

    def _fm(self, s: str, sd) -> np.ndarray:
        """FM embeddings of the section's tiles, cached on disk (keyed by model, input size, tile size and tiles)."""
        import dbk

        t = sd.tables["dbk_table"]
        path = self.args.cache_dir / "fm" / f"{s}_{FM}_{FM_PX}px_t{TILE_UM:g}um.npz"
        ids = np.asarray(t.obs["instance_id"]).astype(np.int64)
        if path.is_file():
            z = np.load(path)
            if np.array_equal(z["instance_id"], ids):
                return z["X"]
            print(f"  {path.name}: tiles differ from the section's; recomputing", flush=True)
        t0 = time.perf_counter()
        dbk.tl.embed_tiles(sd, fm=FM, fm_size_px=FM_PX, key_added=self.fm_key)
        x = np.asarray(t.obsm[self.fm_key], np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, X=x, instance_id=ids)
        tmp.replace(path)
        print(f"  FM embeddings of {s}: {x.shape} in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
        return x

    def images(self, s: str, image_size: int, um_per_px: float) -> tuple[np.ndarray, np.ndarray]:
        """(n, S, S, 3) uint8 tiles of section ``s`` in table-row order as the features read them, and tile ids."""
        import dbk

        k = (s, int(image_size), round(float(um_per_px), 9))
        if k not in self._images:
            sd = self.sdata[s]
            ds = dbk.pp.TileDataset(sd, size_px=int(image_size), target_pixel_size_um=float(um_per_px),
                                    dtype="uint8")
            ids = np.asarray(ds.tile_ids)
            inst = np.asarray(sd.tables["dbk_table"].obs["instance_id"])
            pos = pd.Index(ids).get_indexer(inst)
            if (pos < 0).any():
                raise RuntimeError(f"{s}: table rows without a tile.")
            imgs = np.stack([ds[int(i)]["image"].numpy() for i in pos]).transpose(0, 2, 3, 1)
            self._images[k] = (np.ascontiguousarray(imgs), ids[pos])
        return self._images[k]

    def adata(self, sections: list[str], feats: dict[str, np.ndarray] | None = None):
        """Stacked AnnData of the sections: targets in X, FM (and diffusion) features in obsm."""
        import anndata as ad

        obs = pd.DataFrame({"sample": np.concatenate([[s] * len(self.names[s]) for s in sections])},
                           index=[n for s in sections for n in self.names[s]])
        a = ad.AnnData(X=np.vstack([self.y[s] for s in sections]), obs=obs, var=pd.DataFrame(index=self.genes))
        a.obsm["fm"] = np.vstack([self.fm[s] for s in sections])
        if feats is not None:
            a.obsm["diff"] = np.vstack([feats[s] for s in sections])
            a.obsm["fm+diff"] = np.hstack([a.obsm["fm"], a.obsm["diff"]])
        return a


def pearson_per_gene(train, test, rep: str, genes: list[str]) -> np.ndarray:
    """ridge_cv (alpha by inner CV grouped by training section) on ``obsm[rep]``: per-gene test Pearson."""
    import dbk

    model = dbk.tl.fit_baseline(train, "ridge_cv", use_rep=rep, genes=genes,
                                groups=train.obs["sample"].astype(str).to_numpy())
    te = test.copy()
    te.obsm["dbk_pred"] = model.predict(test)
    # hvg_genes: only the per-gene Pearson is read (no top-k summary chosen on the test section)
    res = dbk.tl.evaluate(te, genes=genes, top_k=min(50, len(genes)), hvg_genes=genes, key_added=None)
    return res.loc[genes, "pearson"].to_numpy(np.float64)


# ---- stage 1 ------------------------------------------------------------------------------------------------------


def regime_of(args) -> tuple[str, dict]:
    """(label, fit_pretrainer keyword arguments) of the flags."""
    parts, kw = [], {}
    if args.preset != "cpu-small":
        parts.append(args.preset)
    if args.lr is not None:
        parts.append(f"lr{args.lr:g}")
        kw["lr"] = args.lr
    if args.batch_size is not None:
        parts.append(f"b{args.batch_size}")
        kw["batch_size"] = args.batch_size
    if args.image_size is not None:
        parts.append(f"px{args.image_size}")
        kw["image_size"] = args.image_size
    if args.no_genes:
        parts.append("nogenes")
        kw["cond_drop"] = 1.0
    return "+".join(parts) or "default", kw


class Stage1:
    """One (fold, regime, seed): the untrained model, training to each step, a saved model per measured step."""

    def __init__(self, data: Data, fold: str, regime: str, kw: dict, seed: int, args) -> None:
        self.data, self.fold, self.regime, self.kw, self.seed, self.args = data, fold, regime, kw, seed, args
        self.train = [s for s in SECTIONS if s != fold]
        self.folder = args.cache_dir / "stage1" / f"{fold}_{regime}_s{seed}_g{len(data.genes)}"
        self.model = None

    def tile_size_um(self) -> float:
        """The model's tile size as fit records it: median over the training slides of their median tile side."""
        import dbk
        from dbk.io import get_pixel_size

        return float(np.median([float(np.median(np.diff(dbk.pp.tile_bounds(sd)[:, [0, 2]], axis=1)))
                                * get_pixel_size(sd) for sd in (self.data.sdata[s] for s in self.train)]))

    def _untrained(self):
        """The weights fit_pretrainer starts from: same vocabulary (training panels in order), preset and seed."""
        import dbk

        vocab = dbk.tl.GeneVocab()
        for s in self.train:
            have = set(self.data.sdata[s].tables["dbk_table"].var_names)
            vocab.add([g for g in self.data.genes if g in have])
        arch = {k: v for k, v in self.kw.items() if k not in ("lr", "batch_size")}
        model = dbk.tl.DiffusionPretrainer(vocab, preset=self.args.preset, tile_size_um=self.tile_size_um(),
                                           random_state=self.seed, **arch)
        return model.to(self.args.accelerator)

    def at(self, step: int):
        """The model after ``step`` steps: loaded if saved, else trained (resuming the last checkpoint)."""
        import dbk

        if step == 0:
            if self.model is None or self.model.step != 0:
                self.model = self._untrained()
            return self.model, 0.0
        saved = self.folder / f"model-{step:07d}"
        if (saved / "config.json").is_file():
            self.model = dbk.tl.DiffusionPretrainer.load(saved, device=self.args.accelerator)
            return self.model, 0.0
        last = dbk.tl.latest_checkpoint(self.folder / "checkpoints")
        if last is not None and int(last.stem.split("-")[-1]) > step:
            raise SystemExit(f"{self.folder}: training is past step {step} ({last.name}) and no model of step {step} "
                             "was saved; measure it in a fresh --cache-dir (or delete the folder to retrain).")
        t0 = time.perf_counter()
        slides = [self.data.sdata[s] for s in self.train]
        self.model = dbk.tl.fit_pretrainer(slides, genes=self.data.genes, preset=self.args.preset, max_steps=step,
                                           random_state=self.seed, checkpoint_dir=self.folder / "checkpoints",
                                           resume=True, accelerator=self.args.accelerator, **self.kw)
        sec = time.perf_counter() - t0
        if abs((self.model.tile_size_um or 0) - self.tile_size_um()) > 1e-6:
            print(f"  warning: trained tile size {self.model.tile_size_um} µm != the control's "
                  f"{self.tile_size_um()}", flush=True)
        self.model.save(saved, overwrite=True)
        print(f"  stage 1 [{self.fold} {self.regime} s{self.seed}]: step {self.model.step} ({sec:.0f} s this call, "
              f"loss {train_loss(self.model, step):.4f}) -> {saved}", flush=True)
        return self.model, sec


def train_loss(model, step: int) -> float:
    h = [r["loss"] for r in model.history if step - LOSS_WINDOW < r["step"] <= step]
    return float(np.mean(h)) if h else float("nan")


def level_columns(model, levels_spec: str, dims: dict[str, int], order: list[str]) -> np.ndarray:
    if levels_spec == "all":
        return np.arange(sum(dims.values()))
    want = levels_spec.split("+")
    bad = [lv for lv in want if lv not in dims]
    if bad:
        raise SystemExit(f"unknown levels {bad}; the model has {order}")
    off = dict(zip(order, np.cumsum([0, *[dims[lv] for lv in order]])[:-1], strict=True))
    return np.concatenate([np.arange(off[lv], off[lv] + dims[lv]) for lv in order if lv in want])


def level_dims(model, imgs: np.ndarray) -> tuple[list[str], dict[str, int]]:
    """Decoder level names (coarsest first, as diffusion_features orders them) and their feature widths."""
    import dbk

    order = ["mid"] + [f"up{i}" for i in range(len(model.preset.up_block_types))]
    dims = {lv: int(dbk.tl.diffusion_features(imgs[:1], model, levels=[lv], random_state=0).shape[1])
            for lv in order}
    return order, dims


# ---- the study ----------------------------------------------------------------------------------------------------


def run_fold(data: Data, fold: str, seed: int, regime: str, kw: dict, args, plan: dict) -> None:
    import dbk

    genes, n_genes = data.genes, len(data.genes)
    train_s = [s for s in SECTIONS if s != fold]
    pg = args.cache_dir / "pergene" / fold
    pg.mkdir(parents=True, exist_ok=True)
    done = set(map(tuple, read_table(args.out)[KEYS].to_numpy().tolist())) if args.out.is_file() else set()
    stamp = {"dbk_commit": plan["commit"], "date": datetime.date.today().isoformat()}

    # the FM reference (once per fold and gene set)
    fm_file = pg / f"fm_ridge_cv_g{n_genes}.npy"
    k_fm = key(fold, "", "", "", "", "", "", "fm_ridge_cv", n_genes)
    if k_fm not in done or not fm_file.is_file():
        t0 = time.perf_counter()
        r = pearson_per_gene(data.adata(train_s), data.adata([fold]), "fm", genes)
        np.save(fm_file, r)
        append_rows(args.out, [{**dict(zip(KEYS, k_fm, strict=True)), "pearson_mean": float(np.nanmean(r)),
                                "seconds": time.perf_counter() - t0, **stamp}])
        print(f"[{fold}] fm_ridge_cv: {np.nanmean(r):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    st = Stage1(data, fold, regime, kw, seed, args)
    stem = f"{regime}_s{seed}_g{n_genes}"
    heads = [f"{h}_ridge_cv" for h in plan["heads"]]

    def pg_file(step, weights, sigma, levels, head):
        return pg / stem / f"n{step}_{weights}_sig{sigma:g}_{levels}_{head}.npy"

    for step in plan["steps"]:
        weights_list = ["ema"] if step == 0 else plan["weights"]  # step 0: one network, written as every weight
        todo = []
        for w in weights_list:
            for sigma in plan["sigmas"]:
                cells = [(lv, h) for lv in plan["levels"] for h in heads]
                names = plan["weights"] if step == 0 else [w]
                need = [c for c in cells for wn in names
                        if key(fold, regime, seed, step, wn, sigma, *c, n_genes) not in done
                        or not pg_file(step, wn, sigma, *c).is_file()]
                if need:
                    todo.append((w, sigma))
        if not todo:
            print(f"[{fold} {regime} s{seed}] step {step}: all cells done, skipped", flush=True)
            continue
        model, _ = st.at(step)
        loss = train_loss(model, step)
        um = model.um_per_px
        imgs = {s: data.images(s, model.image_size, um) for s in SECTIONS}
        order, dims = level_dims(model, imgs[SECTIONS[0]][0])
        for w, sigma in todo:
            t0 = time.perf_counter()
            feats = {s: dbk.tl.diffusion_features(im, model, sigma=sigma, use_ema=(w == "ema"), random_state=seed,
                                                  tile_ids=ids, batch_size=args.feature_batch)
                     for s, (im, ids) in imgs.items()}
            t_feat = time.perf_counter() - t0
            rows = []
            for lv in plan["levels"]:
                cols = level_columns(model, lv, dims, order)
                sub = {s: f[:, cols] for s, f in feats.items()}
                tr, te = data.adata(train_s, sub), data.adata([fold], sub)
                for h in heads:
                    t1 = time.perf_counter()
                    r = pearson_per_gene(tr, te, h.removesuffix("_ridge_cv"), genes)
                    sec = t_feat + time.perf_counter() - t1
                    for wn in (plan["weights"] if step == 0 else [w]):
                        f = pg_file(step, wn, sigma, lv, h)
                        f.parent.mkdir(parents=True, exist_ok=True)
                        np.save(f, r)
                        row = {**dict(zip(KEYS, key(fold, regime, seed, step, wn, sigma, lv, h, n_genes),
                                          strict=True)),
                               "pearson_mean": float(np.nanmean(r)), "train_loss_at_step": loss, "seconds": sec,
                               **stamp}
                        if step > 0:
                            r0 = np.load(pg_file(0, wn, sigma, lv, h))
                            row.update(paired(r, r0, args.bootstrap))
                        rows.append(row)
                        d = row.get("diff_vs_step0")
                        extra = "" if d is None else (f", vs step 0 {d:+.4f} [{row['ci_low']:+.4f}, "
                                                      f"{row['ci_high']:+.4f}], higher {row['n_genes_higher']}/"
                                                      f"{n_genes}")
                        print(f"[{fold} {regime} s{seed}] step {step} {wn} sigma {sigma:g} {lv} {h}: "
                              f"{row['pearson_mean']:.4f}{extra} ({sec:.0f} s)", flush=True)
            append_rows(args.out, rows)


def print_summary(args, folds: list[str], regime: str, seeds: list[int], n_genes: int) -> None:
    from scipy import stats

    df = read_table(args.out)
    if df.empty:
        return
    df = df[df["fold"].isin(folds) & (df["n_genes"] == str(n_genes))
            & (df["regime"].isin([regime, ""])) & df["seed"].isin([str(s) for s in seeds] + [""])]
    num = ["pearson_mean", "diff_vs_step0", "ci_low", "ci_high", "train_loss_at_step", "seconds"]
    df = df.copy()
    for c in num:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["step_n"] = pd.to_numeric(df["step"], errors="coerce")
    df = df.sort_values(["fold", "head", "weights", "sigma", "levels", "step_n"], na_position="first")
    show = ["fold", "regime", "seed", "step", "weights", "sigma", "levels", "head", "pearson_mean", "diff_vs_step0",
            "ci_low", "ci_high", "n_genes_higher", "train_loss_at_step", "seconds"]
    print(f"\n{args.out}: {len(df)} rows of folds {','.join(folds)}, regime {regime}, seeds "
          f"{','.join(map(str, seeds))}, {n_genes} genes")
    with pd.option_context("display.width", 250, "display.max_rows", 1000, "display.max_columns", 30):
        print(df[show].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep=""))
    d = df[df["step_n"] > 0]
    g = d.groupby(["regime", "seed", "step_n", "weights", "sigma", "levels", "head"])["diff_vs_step0"]
    lines = []
    for k, v in g:
        v = v.dropna().to_numpy()
        if len(v) < 2:
            continue
        m, se = v.mean(), v.std(ddof=1) / np.sqrt(len(v))
        h = stats.t.ppf(0.975, len(v) - 1) * se
        lines.append(f"  {k[0]} s{k[1]} step {int(k[2])} {k[3]} sigma {k[4]} {k[5]} {k[6]}: {m:+.4f} "
                     f"[{m - h:+.4f}, {m + h:+.4f}] over {len(v)} folds, higher on {int((v > 0).sum())}")
    if lines:
        print("\nDifference to step 0 (untrained U-Net), mean over folds with a t 95 % interval:")
        print("\n".join(lines))


def main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.threads == 1:
        with contextlib.suppress(ImportError):
            import dask

            dask.config.set(scheduler="synchronous")  # tile reads in this thread (the other core is someone else's)
    import dbk

    dbk.settings.progress = False
    t_start = time.perf_counter()
    folds = [f.strip() for f in args.folds.split(",") if f.strip()]
    bad = [f for f in folds if f not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown folds {bad}; the sections are {SECTIONS}")
    steps = sorted({0, *(int(s) for s in args.steps.split(",") if s.strip())})
    weights = [w.strip() for w in args.weights.split(",") if w.strip()]
    if not weights or set(weights) - {"ema", "raw"}:
        raise SystemExit("--weights: ema and/or raw")
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not heads or set(heads) - {"diff", "fm+diff"}:
        raise SystemExit("--heads: diff and/or fm+diff")
    plan = {"steps": steps, "weights": weights, "heads": heads,
            "sigmas": [float(s) for s in args.sigmas.split(",") if s.strip()],
            "levels": [lv.strip() for lv in args.levels.split(";") if lv.strip()], "commit": commit()}
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    regime, kw = regime_of(args)
    print(f"stage1_cpu_study: folds {folds}, regime {regime} ({args.preset} {kw}), seeds {seeds}, steps {steps}, "
          f"sigmas {plan['sigmas']}, weights {weights}, levels {plan['levels']}, heads {heads}, "
          f"{args.threads} thread(s), commit {plan['commit']}; table {args.out}", flush=True)
    data = Data(args)
    print(f"data: {len(data.genes)} genes, tiles per section "
          f"{ {s: len(n) for s, n in data.names.items()} } ({time.perf_counter() - t_start:.0f} s)", flush=True)
    for fold in folds:
        for seed in seeds:
            run_fold(data, fold, seed, regime, kw, args, plan)
    print_summary(args, folds, regime, seeds, len(data.genes))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main(ARGS)
