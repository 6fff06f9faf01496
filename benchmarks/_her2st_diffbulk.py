"""DiffBulk on her2st for ``her2st.py``: section SpatialData, one stage-1 model per fold, diffusion features, controls.

Per fold (training sections only; the test section is never used to train or to choose anything):

- stage 1 (:func:`dbk.tl.fit_pretrainer`) on the training sections' spot tiles and their profiles (the fold's genes),
  optionally with a dense grid of overlapping tiles over the training sections' tissue trained unconditionally
  (``--stage1-dense``); checkpointed under ``<cache>/stage1/<key>/`` (the key holds the training sections, preset,
  steps, seed and genes), so a second run with the same settings loads the model (or resumes an interrupted one);
- an *untrained* pretrainer of the same architecture and seed (the control);
- the stage-1 controls on the test section's tiles: denoising loss with the tile's own profile, with none and with
  another tile's (:meth:`dbk.tl.DiffusionPretrainer.evaluate`);
- diffusion features of every section's tiles from each pretrainer (cached in memory for the fold).

The section SpatialData are built once per run (``read_st_folder`` -> spot tiles -> pseudo-bulk, the same pipeline
as the cached tables) and get the cached FM embeddings, so ``fit_diffbulk`` reuses them instead of re-embedding.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

DIFF_KEY = "X_dbk_diff"


class DiffBulkContext:
    """Shared state of the DiffBulk methods of one benchmark run (see the module docstring)."""

    def __init__(self, *, tables: dict, folders: dict, obsm_key: str, cache: Path, settings, seed: int,
                 steps: int, preset: str, dense: bool, stage1_batch: int | None, sigma: float, log=print) -> None:
        self.tables, self.folders, self.obsm_key = tables, folders, obsm_key
        self.cache, self.settings, self.seed = Path(cache), settings, int(seed)
        self.steps, self.preset, self.dense, self.stage1_batch = int(steps), preset, bool(dense), stage1_batch
        self.sigma = float(sigma)
        self.log = log
        self._sdata: dict = {}
        self._pre: dict = {}
        self._feats: dict = {}
        self.stage1_rows: list[dict] = []
        self.stage1_seconds: dict = {}

    # ---- sections ---------------------------------------------------------------------------------------------

    def sdata(self, section: str):
        """The section's SpatialData with spot tiles, pseudo-bulk table and the cached FM embeddings."""
        if section in self._sdata:
            return self._sdata[section]
        import dbk

        s = self.settings
        sd = dbk.io.read_st_folder(self.folders[section], pixel_size_um=s.pixel_size_um)
        sd.attrs["sample"] = section
        dbk.pp.make_tiles(sd, tile_size_um=s.tile_size_um, mode="spots")
        dbk.pp.pseudobulk(sd, source="spots", target_sum=s.target_sum)
        table, cached = sd.tables["dbk_table"], self.tables[section]
        if list(table.obs_names) != list(cached.obs_names):
            raise RuntimeError(f"{section}: the rebuilt tile table's rows differ from the cached table's.")
        table.obsm[self.obsm_key] = np.asarray(cached.obsm[self.obsm_key])
        table.uns.setdefault("dbk", {}).setdefault("embeddings", {})[self.obsm_key] = dict(
            cached.uns["dbk"]["embeddings"][self.obsm_key])
        if self.dense:
            # overlapping tiles (stride half a tile) over the tissue, trained without a profile
            dbk.pp.tissue_mask(sd)
            dbk.pp.make_tiles(sd, tile_size_um=s.tile_size_um, stride_um=s.tile_size_um / 2, mode="grid",
                              key_added="dense_tiles")
        self._sdata[section] = sd
        return sd

    # ---- stage 1 ----------------------------------------------------------------------------------------------

    def _key(self, train: tuple[str, ...], genes: list[str]) -> str:
        h = hashlib.sha1(json.dumps([list(genes), self.settings.key()]).encode()).hexdigest()[:8]
        batch = f"_b{self.stage1_batch}" if self.stage1_batch else ""
        dense = "_dense" if self.dense else ""
        return f"{'+'.join(train)}_{self.preset}{batch}{dense}_n{self.steps}_s{self.seed}_g{h}"

    def pretrainer(self, kind: str, train: tuple[str, ...], genes: list[str]):
        """The fold's stage-1 model: ``"trained"`` on the training sections, or ``"untrained"`` (same init)."""
        import dbk

        key = (kind, train, tuple(genes))
        if key in self._pre:
            return self._pre[key]
        slides = [self.sdata(s) for s in train]
        kw = {"batch_size": self.stage1_batch} if self.stage1_batch else {}
        if kind == "untrained":
            from dbk.core import DiffusionPretrainer, GeneVocab
            from dbk.core._data import _panel

            vocab = GeneVocab()
            for sd in slides:
                vocab.add(_panel(sd, "dbk_table", genes))
            model = DiffusionPretrainer(vocab, preset=self.preset, random_state=self.seed)
            model.tile_size_um = self.settings.tile_size_um
        else:
            folder = self.cache / "stage1" / self._key(train, genes)
            t0 = time.perf_counter()
            model = dbk.tl.fit_pretrainer(slides, genes=genes, preset=self.preset, max_steps=self.steps,
                                          random_state=self.seed, checkpoint_dir=folder, resume=True,
                                          unlabeled_tiles_key="dense_tiles" if self.dense else None, **kw)
            sec = time.perf_counter() - t0
            h = model.history
            trained_now = sum(1 for r in h if r.get("time") is not None)
            self.stage1_seconds[train] = sec
            self.log(f"    stage 1 on {'+'.join(train)}: step {model.step} ({sec:.0f} s this run; {len(h)} history "
                     f"records, {trained_now} timed), checkpoints in {folder}", flush=True)
        model.ema_net.eval()
        self._pre[key] = model
        return model

    def stage1_controls(self, fold: str, split: str, train: tuple[str, ...], test: tuple[str, ...],
                        genes: list[str]) -> None:
        """Denoising loss on the test tiles: own profile / none / another tile's, trained and untrained model."""
        for kind in ("trained", "untrained"):
            model = self.pretrainer(kind, train, genes)
            res = model.evaluate([self.sdata(s) for s in test], sigmas=(0.2, 0.5, 1.0), random_state=0,
                                 max_tiles=512, genes=genes)
            for r in res.to_dict("records"):
                self.stage1_rows.append({"split": split, "fold": fold, "model": kind, "steps": int(model.step), **r})

    # ---- features ---------------------------------------------------------------------------------------------

    def features(self, kind: str, train: tuple[str, ...], genes: list[str], section: str) -> np.ndarray:
        """Diffusion features of one section's tiles from the fold's (trained / untrained) stage-1 model."""
        import dbk

        key = (kind, train, tuple(genes), section)
        if key not in self._feats:
            model = self.pretrainer(kind, train, genes)
            sd = self.sdata(section)
            table = sd.tables["dbk_table"]
            # the key and settings fit_diffbulk uses (default levels, mean pooling, the EMA weights): diffusion_features
            # keeps features made with the same weights and settings, so fit_diffbulk's fits of this fold reuse these
            dbk.tl.diffusion_features(sd, model, sigma=self.sigma, random_state=self.seed, key_added=DIFF_KEY)
            self._feats[key] = np.asarray(table.obsm[DIFF_KEY]).copy()
        return self._feats[key]

    def forget_fold(self, train: tuple[str, ...]) -> None:
        """Drop the fold's models and features (memory)."""
        self._pre = {k: v for k, v in self._pre.items() if k[1] != train}
        self._feats = {k: v for k, v in self._feats.items() if k[1] != train}


def attach(adata, ctx: DiffBulkContext, kind: str, train: tuple[str, ...], genes: list[str], key: str):
    """Copy of a stacked table (``obs_names`` ``section:tile``) with the fold's diffusion features in ``obsm[key]``."""
    out = adata.copy()
    sections = out.obs["sample"].astype(str).to_numpy()
    names = np.array([n.split(":", 1)[1] for n in out.obs_names])
    feats = None
    for s in pd.unique(sections):
        f = ctx.features(kind, train, genes, s)
        idx = pd.Index(ctx.sdata(s).tables["dbk_table"].obs_names).get_indexer(names[sections == s])
        if (idx < 0).any():
            raise RuntimeError(f"{s}: tiles of the stacked table are missing from the section's table.")
        if feats is None:
            feats = np.zeros((out.n_obs, f.shape[1]), np.float32)
        feats[sections == s] = f[idx]
    out.obsm[key] = feats
    return out


def diffbulk_predict(ctx: DiffBulkContext, fusion: str, kind: str, train_s, test_s, genes, seed: int, **options):
    """``fit_diffbulk`` on the training sections with the fold's stage-1 model, ``predict`` on the test sections.

    ``options``: more ``fit_diffbulk`` arguments (``rank``, ``context_um`` ...).
    """
    import dbk

    train_s, test_s = tuple(train_s), tuple(test_s)
    pre = ctx.pretrainer(kind, train_s, genes)
    for s in (*train_s, *test_s):  # into the fold's cache and the tables (fit_diffbulk / predict reuse them)
        ctx.features(kind, train_s, genes, s)
    model = dbk.tl.fit_diffbulk({s: ctx.sdata(s) for s in train_s}, genes=genes, fusion=fusion, pretrainer=pre,
                                sigma=ctx.sigma, random_state=seed, tile_size_um=ctx.settings.tile_size_um,
                                **options)
    frames = []
    for s in test_s:
        sd = ctx.sdata(s)
        model.predict(sd)
        df = sd.tables["dbk_table"].obsm["dbk_pred"].copy()
        df.index = [f"{s}:{n}" for n in df.index]
        frames.append(df)
    val = model.config.get("head", {})
    info = {"stage1_steps": int(pre.step)}
    sel = model.config.get("head_selection")
    if sel:
        info["head"] = sel["chosen"]
    if model.cv_pearson is not None:
        info["_cv_pearson"] = model.cv_pearson  # per gene; her2st.py compares it with the test Pearson
    if model.fusion == "ridge":
        alpha = getattr(model.head, "alpha_", None)
        if alpha is not None:
            info["alpha"] = float(np.median(alpha))
        if getattr(model.head, "rank_", None) is not None:
            info["rank"] = int(model.head.rank_)
    else:
        info["head_best_epoch"] = int(val.get("best_epoch", -1)) + 1
    return pd.concat(frames), info
