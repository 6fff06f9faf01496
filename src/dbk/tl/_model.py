"""The fitted DiffBulk model: predict on new slides, save to a folder, load back on CPU or GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .._constants import PRED_KEY, TILES_KEY, TILES_TABLE_KEY, UM_PER_PX_KEY, UNS_KEY
from .._logging import logger, once_per_call
from .._utils import check_batch_size, copy_sdata, is_sdata, jsonable
from ..core._scaler import InputScaler
from ..pp._prepare import prepare_slide, record_pixel_size, slide_names, tile_size_um
from ._context import with_context
from ._slide_checks import check_colours, check_pixel_size, slide_pixel_size, tile_colour_stats

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

FORMAT = "dbk.DiffBulk"
FORMAT_VERSION = 1
_HEAD_FILE = "head.safetensors"
_FM_FILE = "fm.safetensors"
_HISTORY_FILE = "history.json"
_PRETRAINER_DIR = "pretrainer"
#: Share of clipped feature values above which predict logs (INFO), and warns (WARNING): a held-out synthetic slide
#: from the training slides' generator, with 45 training tiles, had 1.05%; the same slide at a 2x wrong pixel size 3.2%.
CLIPPED_NOTE, CLIPPED_WARN = 0.01, 0.02


class DiffBulk:
    """A fitted DiffBulk model: frozen stage-1 diffusion U-Net, foundation model, fusion head.

    Made by :func:`dbk.tl.fit_diffbulk` or :meth:`load`. :meth:`predict` writes predicted expression for the tiles of
    any slide with an H&E image (with or without measured expression); :meth:`save` writes a folder that
    :meth:`load` reads back on CPU or GPU.

    Parameters
    ----------
    pretrainer
        The stage-1 :class:`~dbk.tl.DiffusionPretrainer`.
    head
        The fitted head (:class:`~dbk.tl.FusionRegressor` or :class:`~dbk.tl.RidgeFusionRegressor`).
    fm
        The foundation-model image encoder (a torch module).
    config
        The model's settings and training statistics (see :attr:`config`), as :func:`dbk.tl.fit_diffbulk` writes
        them.
    scalers
        One :class:`InputScaler` per feature set of the head, fitted on its training tiles.

    Attributes
    ----------
    genes
        The predicted genes, in output order.
    pretrainer
        The stage-1 :class:`~dbk.tl.DiffusionPretrainer` (its EMA U-Net gives the diffusion features).
    fm
        The foundation-model image encoder (a torch module); :attr:`fm_id` names it.
    head
        The fitted :class:`~dbk.tl.FusionRegressor`, or :class:`~dbk.tl._fusion.RidgeFusionRegressor` for
        ``fusion="ridge"``.
    history
        ``{"stage1": [...], "head": {"train_loss": [...], "val_loss": [...]}}``; for ``fusion="ridge"`` the head's
        entry is the inner-CV curve ``{"alpha": [...], "cv_score": [...]}``.
    tile_size_um
        Side of the tiles the model was trained on; :meth:`predict` makes such tiles on new slides.
    config
        Everything else that defines the model (JSON-ready): feature settings, training statistics, params.
    scalers
        The :class:`InputScaler` of the FM and the diffusion features (fitted on the head's training tiles).
    training_data
        With ``fit_diffbulk(..., copy=True)``: the copies of the training slides it wrote to (the slide, or a list);
        otherwise ``None`` (the slides given were changed in place).
    """

    def __init__(self, *, pretrainer, head, fm: torch.nn.Module, config: dict, scalers: list[InputScaler]) -> None:
        self.pretrainer = pretrainer
        self.head = head
        self.fm = fm
        self.config = config
        self.scalers = scalers
        self.training_data = None
        self._slide_check_noted = False  # "this model cannot check slides" is said once per model

    def _head_predict(self, adata: ad.AnnData, key_added: str | None, *, name: str = "the table",
                      checks: dict | None = None) -> pd.DataFrame:
        """The head on ``adata``'s features after the model's :class:`InputScaler` (one per feature set).

        More than 1% of the feature values clipped (beyond the scaler's ``clip`` training standard deviations) is
        warned about; the fractions go to ``checks["clipped"]`` when ``checks`` is given.
        """
        light = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
        n_clipped, n_values, per_key = 0, 0, {}
        ctx = self.context_um
        for key, scaler in zip(self.head.obsm_keys_, self.scalers, strict=True):
            x = adata.obsm[key]
            x = np.asarray(x.to_numpy() if isinstance(x, pd.DataFrame) else x, dtype=np.float64)
            width = len(scaler.mean) // (1 if ctx is None else 2)
            if x.ndim != 2 or x.shape[1] != width:
                raise ValueError(f"obsm[{key!r}] has shape {x.shape}; the model takes {width} features.")
            if not np.isfinite(x).all():
                raise ValueError(f"obsm[{key!r}] has non-finite values in {int((~np.isfinite(x)).any(axis=1).sum())} "
                                 "tiles.")
            if ctx is not None:
                x = with_context(adata, x, ctx)
            z, clipped = scaler.transform(x, return_clipped=True)
            n_clipped, n_values = n_clipped + int(clipped), n_values + x.size
            per_key[key] = int(clipped) / max(x.size, 1)
            light.obsm[key] = z
        frac = n_clipped / n_values if n_values else 0.0
        if checks is not None:
            checks["clipped"] = {"fraction": round(frac, 6), "per_features": {k: round(v, 6) for k, v in
                                                                               per_key.items()},
                                 "limit": CLIPPED_WARN, "ok": frac <= CLIPPED_WARN}
        if frac > CLIPPED_NOTE:
            parts = ", ".join(f"{k}: {100 * v:.1f}%" for k, v in per_key.items())
            text = (f"predict: slide {name!r}: {100 * frac:.1f}% of the feature values ({n_clipped} of {n_values}; "
                    f"{parts}) lie beyond ±{self.scalers[0].clip:g} training standard deviations and were clipped")
            if frac > CLIPPED_WARN:
                logger.warning(text + f", where at most {100 * CLIPPED_WARN:g}% is expected of slides like the "
                               "training slides: the slide looks unlike the training slides and its predictions are "
                               "not to be trusted (a wrong pixel size or another stain are the usual causes).")
            else:
                logger.info(text + f" (up to {100 * CLIPPED_WARN:g}% is seen on held-out slides like the training "
                            "ones, more so with few training tiles).")
        df = self.head.predict(light)
        if key_added is not None:
            adata.obsm[key_added] = df
        return df

    # ---- properties -------------------------------------------------------------------------------------------

    @property
    def genes(self) -> list[str]:
        return list(self.config["genes"])

    @property
    def context_um(self) -> float | None:
        """Radius (µm) of the neighbourhood whose mean features join each tile's (``None``: the tile alone)."""
        c = self.config.get("context_um")
        return None if c is None else float(c)

    @property
    def cv_pearson(self) -> pd.Series | None:
        """Each gene's CV score: Pearson r of the head's inner cross-validation on the training slides.

        Held-out groups of training slides (spatial stripes of a single slide) are predicted by the head fitted on
        the others, each gene's r over their tiles is averaged over the groups (``fit_diffbulk(head_cv=...)``). It
        says which genes the model predicts well *before* a map is believed; no test slide is involved. ``None``
        for a model fitted with ``head_cv=0`` or saved before CV scores existed; NaN for a gene whose r is
        undefined (constant on held-out tiles).
        """
        cv = self.config.get("cv_pearson")
        if cv is None:
            return None
        return pd.Series([np.nan if v is None else float(v) for v in cv], index=pd.Index(self.genes),
                         name="cv_pearson", dtype=np.float64)

    @property
    def cv_trusted(self) -> pd.Series | None:
        """Which genes to trust (a Series gene -> bool).

        A gene is trusted when its CV score's lower bound (mean minus one standard error over the held-out groups)
        is above chance and the held-out r is positive in every group (``uns[key_added]["head_selection"]["trust"]``
        says which groups were held out and what shift they can see). ``None`` for models without it.
        """
        t = self.config.get("cv_trusted")
        if t is None:
            return None
        return pd.Series([bool(v) for v in t], index=pd.Index(self.genes), name="cv_trusted", dtype=bool)

    @property
    def effective_rank(self) -> dict | None:
        """Effective rank of the training predictions and of the training targets (:func:`dbk.tl.effective_rank`)."""
        return self.config.get("effective_rank")

    @property
    def fm_id(self) -> str:
        return str(self.config["fm"]["id"])

    @property
    def tile_size_um(self) -> float:
        return float(self.config["tile_size_um"])

    @property
    def fusion(self) -> str:
        return str(self.config["fusion"])

    @property
    def history(self) -> dict:
        return {"stage1": list(self.pretrainer.history), "head": dict(self.head.history_)}

    @property
    def fm_key(self) -> str:
        return str(self.config["fm"]["key"])

    @property
    def diff_key(self) -> str:
        return str(self.config["diffusion"]["key"])

    def __repr__(self) -> str:
        d = self.config["diffusion"]
        steps = f"{self.pretrainer.step} steps" if self.pretrainer.step else "untrained"
        return (f"DiffBulk({len(self.genes)} genes, tile {self.tile_size_um:g} µm, FM {self.fm_id!r}, "
                f"{self._repr_head()}, stage 1 {self.pretrainer.preset.name!r} {self.pretrainer.image_size} px / "
                f"{steps}, z_diff {d['dim']} from {'+'.join(d['levels'])}{self._repr_trust()})")

    def _repr_head(self) -> str:
        """The head in words: fusion, target rank (ridge), blend, spatial context, and whether inner CV chose it.

        E.g. ``fusion 'ridge' target rank 8, context 150 µm (chosen from 7 heads by inner CV)`` or ``fusion 'ridge' late
        (FM weight 0.6, ranks 8/full), no context`` or ``fusion 'gated', no context``.
        """
        out = f"fusion {self.fusion!r}"
        head = self.head
        if self.fusion == "ridge":
            block_ranks = getattr(head, "block_rank_", None)
            if getattr(head, "blend", "early") == "late" and block_ranks is not None:
                ranks = "/".join("full" if r is None else str(r) for r in block_ranks)
                out += f" late (FM weight {head.blend_weight_:g}, ranks {ranks})"
            elif hasattr(head, "rank_"):
                out += " full rank" if head.rank_ is None else f" target rank {head.rank_}"
        ctx = self.context_um
        out += ", no context" if ctx is None else f", context {ctx:g} µm"
        names = ((self.config.get("head_selection") or {}).get("candidates") or {}).get("name") or []
        if len(names) > 1:
            out += f" (chosen from {len(names)} heads by inner CV)"
        return out

    def _repr_trust(self) -> str:
        out = ""
        r = self.effective_rank
        if r:  # effective rank (dbk.tl.effective_rank) of the training predictions and of the measured targets
            target = "" if r.get("targets") is None else f" (targets {r['targets']})"
            out += f", effective prediction rank {r['predictions']}{target}"
        t = self.cv_trusted
        if t is not None:
            out += f", {int(t.sum())}/{len(t)} genes trusted"
        return out

    def to(self, device: str | torch.device) -> DiffBulk:
        """Move every network to ``device`` (``"auto"``: CUDA if available); returns self.

        Parameters
        ----------
        device
            ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... or a :class:`torch.device` (checked first).

        Returns
        -------
        DiffBulk
            ``self``, on ``device`` (a ridge head stays numpy arrays on the CPU).
        """
        from ._embed import resolve_device

        dev = resolve_device(device, what="device")
        self.pretrainer.to(dev)
        self.fm.to(dev)
        if hasattr(self.head, "module_"):  # the ridge head is numpy arrays, on the CPU
            self.head.module_.to(dev)
        return self

    # ---- features and prediction ------------------------------------------------------------------------------

    def features(
        self,
        sdata: SpatialData,
        *,
        tiles_key: str = TILES_KEY,
        table_key: str = TILES_TABLE_KEY,
        batch_size: int = 32,
        reuse_fm: bool = True,
        reuse_diff: bool = True,
        accelerator: str | None = None,
    ) -> None:
        """Write the model's FM embeddings and diffusion features of ``sdata``'s tiles into the tile table's ``obsm``.

        Makes a table (tiles x 0 genes) when the slide has none. FM embeddings already there from the same model and
        input size are kept when ``reuse_fm`` (:func:`dbk.tl.embed_tiles`); diffusion features when ``reuse_diff`` and
        their record in ``uns["dbk"]["diffusion_features"]`` names the same stage-1 weights (fingerprint), noise
        level, seed, levels, pooling, tiles and precision (:func:`dbk.tl.diffusion_features`; features are
        deterministic, so reuse is exact).

        Parameters
        ----------
        sdata
            SpatialData with the H&E image and the tiles.
        tiles_key
            Shapes element with the tiles.
        table_key
            Tile table the features are written to (made with no genes when missing).
        batch_size
            Tiles per forward pass of the networks.
        reuse_fm
            Keep FM embeddings already there from the same weights and input size.
        reuse_diff
            Keep diffusion features already there from the same stage-1 weights and settings.
        accelerator
            Where the networks run, as in :meth:`predict` (``None``: where the model is).
        """
        from ._embed import resolve_device

        if accelerator is not None:
            self.to(resolve_device(accelerator))
        self._embed(sdata, tiles_key=tiles_key, table_key=table_key, batch_size=batch_size, reuse=reuse_fm)
        self._diffuse(sdata, tiles_key=tiles_key, table_key=table_key, batch_size=batch_size, reuse=reuse_diff)
        record_pixel_size(sdata, tiles_key, table_key)

    def _embed(self, sdata: SpatialData, *, tiles_key: str, table_key: str, batch_size: int, reuse: bool) -> None:
        """The FM embeddings of :meth:`features`."""
        from ._embed import embed_tiles, resolve_device

        device = resolve_device("auto") if self.fm is None else next(self.fm.parameters()).device
        embed_tiles(sdata, fm=self.fm, tiles_key=tiles_key, table_key=table_key,
                    fm_size_px=int(self.config["fm"]["size_px"]), batch_size=batch_size, accelerator=device,
                    key_added=self.fm_key, overwrite=not reuse)

    def _diffuse(self, sdata: SpatialData, *, tiles_key: str, table_key: str, batch_size: int, reuse: bool) -> None:
        """The diffusion features of :meth:`features`."""
        from ._diffusion_features import diffusion_features

        d = self.config["diffusion"]
        diffusion_features(sdata, self.pretrainer, sigma=float(d["sigma"]), tiles_key=tiles_key, table_key=table_key,
                           levels=list(d["levels"]), pool=str(d["pool"]), use_ema=bool(d["use_ema"]),
                           batch_size=batch_size, random_state=int(d["random_state"]), key_added=self.diff_key,
                           overwrite=not reuse)

    @once_per_call
    def predict(
        self,
        data: SpatialData | ad.AnnData,
        *,
        tiles_key: str = TILES_KEY,
        table_key: str = TILES_TABLE_KEY,
        key_added: str = PRED_KEY,
        features_key: str | None = None,
        batch_size: int = 32,
        accelerator: str | None = None,
        copy: bool = False,
    ) -> SpatialData | ad.AnnData | pd.DataFrame:
        """Predict expression for every tile of a slide.

        On a SpatialData: tiles of the model's size are laid over the tissue when ``tiles_key`` is missing
        (:func:`dbk.pp.make_tiles`), a tile table with no genes is made when there is none (H&E-only slide), then
        the FM embeddings, the diffusion features and the fusion head give the predictions. A slide with measured
        expression keeps its table; the predictions are added beside the truth, ready for :func:`dbk.tl.evaluate`.

        On an AnnData tile table that already holds both feature sets (``obsm`` keys :attr:`fm_key` and
        :attr:`diff_key`, e.g. from :meth:`features`), only the head runs. Their records in ``uns["dbk"]`` must
        name this model's feature settings (FM weights fingerprint, input size, normalisation and resolution;
        stage-1 weights, noise level, seed, levels, pooling): features made otherwise are refused with a ValueError
        (the table has no images to recompute them from; a SpatialData recomputes them). Features without a record
        (from another tool) are taken as given, and ``uns["dbk"]["predict"]["features"]`` says ``"user-supplied"``.

        On a LazySlide ``WSIData`` (``wsidata.open_wsi``, tiled by ``zs.pp.tile_tissues``): its tiles are read through
        its own reader (:func:`dbk.pp.from_wsidata`; the WSIData gains nothing but the predictions), and the
        predictions come back as a table of the WSIData, ``wsi.tables[f"{key_added}_{tiles_key}"]`` (tiles x genes,
        annotating the tiles as LazySlide's feature tables do; ``var`` the genes' CV scores), which
        ``zs.pl.tiles(wsi, feature_key=key_added, color=gene)`` and spatialdata-plot draw. Tiles whose side is not
        the model's tile size in µm are refused (ValueError with the ``zs.pp.tile_tissues`` call that makes matching
        ones): the model learned nothing about other sizes.

        Parameters
        ----------
        data
            SpatialData with the H&E image, a tile table with the features, or a LazySlide ``WSIData`` with tiles.
        tiles_key
            Shapes element with the tiles (made when missing). On a WSIData: LazySlide's ``"tiles"`` when this is
            left at ``"dbk_tiles"`` and the WSIData has no such element.
        table_key
            Tile table the features and predictions are written to.
        key_added
            ``obsm`` key of the predictions (on a WSIData: the table ``f"{key_added}_{tiles_key}"``).
        features_key
            WSIData only: a LazySlide feature table to use as the FM embeddings instead of computing them, named
            as LazySlide names it (``"uni"`` for ``wsi["uni_tiles"]``, or the table's full name). It must come from
            the model's foundation model with its preprocessing: dbk checks its width against the model's and
            records it as user-supplied, but cannot check its weights.
        batch_size
            Tiles per forward pass of the networks.
        accelerator
            Where the networks run: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... (the model
            is moved there); ``None``: where the model is.
        copy
            Return a modified copy instead of changing ``data`` in place.

        Returns
        -------
        SpatialData | AnnData | DataFrame
            One rule for both inputs: the predictions, a DataFrame tiles x :attr:`genes` (float32, index the
            table's ``obs_names``; what is written to ``obsm[key_added]``), as every ``predict`` of :mod:`dbk.tl`
            returns (the baselines', the heads'); with ``copy=True``, the modified copy of ``data`` instead (its
            table holds the predictions). Either way the tile table gets ``obsm[key_added]`` (the predictions), the
            features ``obsm[fm_key]``, ``obsm[diff_key]`` and ``uns["dbk"]["predict"]`` (model summary and
            settings; ``features``: each feature key's source and weights fingerprint; ``slide_checks``: the
            slide's pixel size, tile colours and clipped features against the training slides', each with its
            numbers and ``ok``; a slide unlike them is warned about, see ``docs/reliability.md``). On a WSIData
            the DataFrame's rows are named by ``tile_id`` (its copy with ``copy=True``), and the WSIData gets only
            the table ``f"{key_added}_{tiles_key}"`` (the predictions, ``uns["dbk"]["predict"]`` as above).
        """
        from .._settings import settings

        settings.apply_threads()  # dbk.settings.n_jobs
        check_batch_size(batch_size)
        if accelerator is not None:
            from ._embed import resolve_device

            self.to(resolve_device(accelerator))
        from ..io._wsidata import is_wsidata

        if is_wsidata(data):
            from ._wsidata import predict_wsidata

            return predict_wsidata(self, data, tiles_key=tiles_key, key_added=key_added, features_key=features_key,
                                   batch_size=batch_size, copy=copy)
        if features_key is not None:
            raise ValueError("features_key names a LazySlide feature table of a WSIData; on a SpatialData or a tile "
                             f"table put precomputed FM embeddings into the tile table's obsm[{self.fm_key!r}].")
        if isinstance(data, ad.AnnData):
            adata = data.copy() if copy else data
            missing = [k for k in (self.fm_key, self.diff_key) if k not in adata.obsm]
            if missing:
                raise KeyError(f"The table lacks the features obsm{missing}; pass the SpatialData (with the H&E) so "
                               "that they are computed, or run model.features(sdata) first.")
            name = "the table"
            sources = self._check_table_features(adata)  # no images here: features made otherwise are refused
            checks = self._check_slide(name, px=adata.uns.get(UNS_KEY, {}).get(UM_PER_PX_KEY))
            df = self._head_predict(adata, key_added, name=name, checks=checks)
            self._record(adata, key_added, tiles_key, checks)
            adata.uns[UNS_KEY]["predict"]["features"] = sources
            return adata if copy else df
        if not is_sdata(data):
            raise TypeError(f"predict expects a SpatialData (or a tile table), got {type(data).__name__}.")
        sdata = copy_sdata(data) if copy else data
        name = slide_names([sdata], table_key)[0]  # attrs["sample"] (the readers set it), else the table's
        prepare_slide(sdata, tile_size_um=self.tile_size_um, tiles_key=tiles_key, table_key=table_key,
                      need_table=False, name=name)
        size = tile_size_um(sdata, tiles_key)
        if size is not None and abs(size / self.tile_size_um - 1) > 0.02:
            logger.warning(f"predict: the tiles {tiles_key!r} of slide {name!r} are {size:g} µm, the model was "
                           f"trained on {self.tile_size_um:g} µm tiles; predictions on other tile sizes are not what "
                           "it learned (use another tiles_key to let predict make matching tiles).")
        df = self._predict_slide(sdata, name, tiles_key=tiles_key, table_key=table_key, key_added=key_added,
                                 batch_size=batch_size)
        logger.info(f"predict: {df.shape[0]} tiles x {df.shape[1]} genes -> sdata.tables[{table_key!r}]"
                    f".obsm[{key_added!r}].")
        return sdata if copy else df

    def _predict_slide(self, sdata: SpatialData, name: str, *, tiles_key: str, table_key: str, key_added: str,
                       batch_size: int, fm_source: dict | None = None) -> pd.DataFrame:
        """Checks, features, head and record of :meth:`predict` on a prepared slide (tiles and table there).

        ``fm_source`` (a record such as ``{"source": "user-supplied", "table": ...}``): the FM embeddings are
        already in the table's ``obsm[fm_key]`` and are used as they are; only the diffusion features are made.
        """
        checks = self._check_slide(name, px=slide_pixel_size(sdata, tiles_key), sdata=sdata, tiles_key=tiles_key)
        if fm_source is None:
            self.features(sdata, tiles_key=tiles_key, table_key=table_key, batch_size=batch_size)
        else:
            self._diffuse(sdata, tiles_key=tiles_key, table_key=table_key, batch_size=batch_size, reuse=True)
            record_pixel_size(sdata, tiles_key, table_key)
        adata = sdata.tables[table_key]
        df = self._head_predict(adata, key_added, name=name, checks=checks)
        self._record(adata, key_added, tiles_key, checks)
        sources = self._feature_sources(adata)
        if fm_source is not None:
            sources[self.fm_key] = dict(fm_source)
        adata.uns[UNS_KEY]["predict"]["features"] = sources
        return df

    def _expected_features(self) -> tuple[dict, dict]:
        """The record fields the FM embeddings and the diffusion features of this model's head must have.

        The FM weights fingerprint and normalisation are those the model's config records (fit with dbk >= the
        fingerprinting one), else those of the loaded :attr:`fm`; the diffusion settings are the config's.
        """
        from ._diffusion_features import pretrainer_fingerprint
        from ._embed import fm_fingerprint, module_data_config

        f, d = self.config["fm"], self.config["diffusion"]
        cfg = module_data_config(self.fm) if f.get("mean") is None or f.get("std") is None else {}
        mean, std = f.get("mean") or cfg.get("mean"), f.get("std") or cfg.get("std")  # None: a user transform's
        fm_want = {"weights_fingerprint": f.get("fingerprint") or fm_fingerprint(self.fm),
                   "size_px": int(f["size_px"]), "mean": None if mean is None else list(mean),
                   "std": None if std is None else list(std), "target_um_per_px": None}
        use_ema = bool(d.get("use_ema", True))
        diff_want = {"pretrainer_fingerprint": d.get("pretrainer_fingerprint")
                     or pretrainer_fingerprint(self.pretrainer, use_ema), "sigma": float(d["sigma"]),
                     "random_state": int(d["random_state"]), "use_ema": use_ema, "levels": list(d["levels"]),
                     "pool": str(d["pool"])}
        return fm_want, diff_want

    def _check_table_features(self, adata: ad.AnnData) -> dict:
        """Refuse a tile table whose features were recorded as made otherwise than the model's; say their source.

        The records ``uns["dbk"]["embeddings"][fm_key]`` and ``uns["dbk"]["diffusion_features"][diff_key]`` are
        compared with :meth:`_expected_features`: any difference (other FM weights, input size, normalisation or
        resolution; other stage-1 weights, noise level, seed, levels or pooling) raises a ValueError naming the key,
        the recorded and the expected value. Features without a record (user-supplied) are taken as given and said
        so (INFO); an FM record of a dbk that did not fingerprint weights is checked on the model name and settings
        and its weights said to be unverified (WARNING). Returns ``{key: {"source": "dbk" | "user-supplied" |
        "dbk, weights unverified", ...}}`` for ``uns["dbk"]["predict"]["features"]``.
        """
        from ._embed import describe_mismatches, embedding_mismatches

        fm_want, diff_want = self._expected_features()
        uns = adata.uns.get(UNS_KEY, {})
        out = {}
        for key, what, group, want in ((self.fm_key, "foundation-model embeddings", "embeddings", fm_want),
                                       (self.diff_key, "diffusion features", "diffusion_features", diff_want)):
            rec = (uns.get(group) or {}).get(key)
            if rec is None:
                logger.info(f"predict: obsm[{key!r}] has no record in uns[{UNS_KEY!r}][{group!r}]: user-supplied "
                            f"{what}, taken as given; they must be made as the model's are "
                            f"({', '.join(f'{k}={v!r}' for k, v in want.items())}).")
                out[key] = {"source": "user-supplied"}
                continue
            want = dict(want)
            source = "dbk"
            if group == "embeddings" and rec.get("weights_fingerprint") is None:  # recorded by an older dbk
                want.pop("weights_fingerprint")
                want["model"] = self.fm_id
                source = "dbk, weights unverified"
            diff = embedding_mismatches(rec, want)
            if diff:
                raise ValueError(
                    f"predict: the table's {what} obsm[{key!r}] were made otherwise than this model's: "
                    f"{describe_mismatches(diff)}. The head would read other numbers than it was trained on; pass "
                    "the SpatialData with the H&E image instead (predict then computes the model's own features), "
                    "or run model.features(sdata) and predict on its table.")
            if source != "dbk":
                logger.warning(f"predict: obsm[{key!r}] was recorded by a dbk that did not fingerprint the foundation "
                               f"model's weights: its model name {self.fm_id!r} and settings match, but whether its "
                               "weights are this model's cannot be checked.")
            tile = rec.get("tile_size_um")
            if tile is not None and abs(float(tile) / self.tile_size_um - 1) > 0.02:
                logger.warning(f"predict: obsm[{key!r}] was made from {float(tile):g} µm tiles, the model was trained "
                               f"on {self.tile_size_um:g} µm tiles; predictions on other tile sizes are not what it "
                               "learned.")
            out[key] = {"source": source, **{k: v for k, v in want.items() if k.endswith("fingerprint")}}
        return out

    def _feature_sources(self, adata: ad.AnnData) -> dict:
        """Provenance of the features :meth:`features` just made or kept (with the model's weights): their records."""
        uns = adata.uns.get(UNS_KEY, {})
        fm = (uns.get("embeddings") or {}).get(self.fm_key) or {}
        diff = (uns.get("diffusion_features") or {}).get(self.diff_key) or {}
        return {self.fm_key: {"source": "dbk", "weights_fingerprint": str(fm.get("weights_fingerprint"))},
                self.diff_key: {"source": "dbk", "pretrainer_fingerprint": str(diff.get("pretrainer_fingerprint"))}}

    def _check_slide(self, name: str, *, px: float | None, sdata=None, tiles_key: str = TILES_KEY) -> dict:
        """The slide against the training slides: pixel size, and tile colours when ``sdata`` is given.

        Warns with the numbers (:mod:`dbk.tl._slide_checks`). A model saved before dbk recorded its training slides'
        pixel sizes and colours cannot check: said once per model, at WARNING, since the slide then goes unchecked.
        """
        train = self.config.get("train") or {}
        if "pixel_size_um_median" not in train and "tile_rgb" not in train:
            if not self._slide_check_noted:
                self._slide_check_noted = True
                logger.warning(f"predict: this model (dbk {self.config.get('dbk_version', '?')}) does not record "
                               "the pixel size or the tile colours of its training slides, so the pixel-size and "
                               "colour checks cannot run: a slide with a wrong pixel size or another look goes "
                               "unflagged. Check dbk.io.get_pixel_size(sdata) yourself, or refit with this dbk.")
            return {"ran": False, "reason": "the model records no training pixel size or tile colours"}
        out = {"ran": True, "pixel_size": check_pixel_size(px, train, name=name, tile_size_um=self.tile_size_um)}
        if sdata is not None:
            stats = tile_colour_stats(sdata, tiles_key) if train.get("tile_rgb") else None
            out["colour"] = check_colours(stats, train, name=name)
        return out

    def _record(self, adata: ad.AnnData, key_added: str, tiles_key: str, checks: dict | None = None) -> None:
        from .. import __version__

        if adata.n_vars and not set(map(str, adata.var_names)) & set(self.genes):
            logger.warning(f"predict: the table's {adata.n_vars} measured genes (e.g. {list(adata.var_names[:5])}) "
                           f"include none of the model's {len(self.genes)} genes (e.g. {self.genes[:5]}); the "
                           "predictions are written but cannot be evaluated against this table.")

        uns = adata.uns.setdefault(UNS_KEY, {})
        uns["predict"] = jsonable({
            "pred_key": key_added,
            "tiles_key": tiles_key,
            "model": repr(self),
            "fm": self.fm_id,
            "fm_key": self.fm_key,
            "diff_key": self.diff_key,
            "fusion": self.fusion,
            "tile_size_um": self.tile_size_um,
            "n_genes": len(self.genes),
            "dbk_version": __version__,
        })
        if self.config.get("fit_id"):  # the fit that made the model: dbk.pl marks predictions on its training tiles
            uns["predict"]["fit_id"] = str(self.config["fit_id"])
        cv = self.cv_pearson
        if cv is not None:  # floats, NaN where undefined: h5ad stores them as arrays
            uns["predict"]["genes"] = list(self.genes)
            uns["predict"]["cv_pearson"] = [float(v) for v in cv.to_numpy()]
            trusted = self.cv_trusted
            if trusted is not None:
                uns["predict"]["cv_trusted"] = [bool(v) for v in trusted.to_numpy()]
        if checks is not None:  # pixel size, colours, clipped features vs the training slides (None: "None")
            checks["ok"] = all(c.get("ok", True) for c in checks.values() if isinstance(c, dict))
            uns["predict"]["slide_checks"] = jsonable(checks)
        pred = adata.obsm.get(key_added)
        if pred is not None and len(pred) >= 2:
            from ._effective_rank import rank_record

            target = (self.effective_rank or {}).get("targets")
            uns["predict"]["effective_rank"] = rank_record(np.asarray(pred, np.float64), target, what="predict")

    # ---- save / load ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to a folder, atomically (a temporary folder renamed into place).

        Contents: ``config.json`` (format and dbk version, genes, tile geometry, FM id and input size, fusion,
        diffusion-feature layout, head options, training statistics, SHA-256 of every other file),
        ``head.safetensors`` (head weights and input / target standardisation; for ``fusion="ridge"`` the
        coefficients, intercepts, standardisation, chosen alpha and inner-CV curve), ``history.json``, ``pretrainer/``
        (the stage-1 model, :meth:`dbk.tl.DiffusionPretrainer.save`) and, for a foundation model that cannot be
        reloaded by name (random weights), ``fm.safetensors``. Files get the permissions of anything else the user
        writes (the umask), so a lab folder can share them.

        Parameters
        ----------
        path
            The folder to write (``~`` expanded).
        overwrite
            Replace a folder already at ``path``, once the new one is complete, and only a dbk model folder holding
            nothing but what dbk wrote; without it an existing ``path`` raises :class:`FileExistsError`.

        Returns
        -------
        pathlib.Path
            The folder written.
        """
        from ..core._folder import write_model_folder

        fm_cfg = dict(self.config["fm"])
        user_supplied = getattr(self.fm, "dbk_source", None) == "user-supplied"
        save_fm = not user_supplied and not bool(getattr(self.fm, "dbk_pretrained", False))
        if user_supplied:  # its weights are the user's to load: DiffBulk.load(path, fm=...) checks their fingerprint
            fm_cfg["user_supplied"] = True
        if save_fm and not fm_cfg.get("timm_arch"):
            raise ValueError(f"The foundation model {self.fm_id!r} has no pretrained weights to reload by name and is "
                             "not a timm architecture whose weights dbk can store; fit with fm=<timm model name or "
                             "checkpoint>.")
        _, tensors = self.head.get_state()
        for i, scaler in enumerate(self.scalers):
            tensors |= scaler.tensors(f"scaler.{i}.")
        fm_cfg["weights_saved"] = save_fm
        config = {k: v for k, v in self.config.items() if k not in ("format", "format_version", "dbk_version",
                                                                     "sha256")} | {"fm": fm_cfg}
        path = write_model_folder(
            path, format=FORMAT, format_version=FORMAT_VERSION, config=jsonable(config, none=None),
            tensors={_HEAD_FILE: tensors, **({_FM_FILE: self.fm.state_dict()} if save_fm else {})},
            files={_HISTORY_FILE: json.dumps({"head": self.head.history_})},
            subfolders={_PRETRAINER_DIR: self.pretrainer.save}, overwrite=overwrite)
        logger.info(f"DiffBulk saved to {path}.")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto", fm=None) -> DiffBulk:
        """Load a model written by :meth:`save` onto ``device`` (``"auto"``: CUDA if available, else CPU).

        Parameters
        ----------
        path
            The folder :meth:`save` wrote.
        device
            Where the networks go: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... or a :class:`torch.device`.
        fm
            The foundation model, when the model was fitted on a user-supplied one (``(module, transform)`` or
            :func:`dbk.tl.wrap_fm`, whose weights a folder does not hold); its weights fingerprint must be the
            recorded one. ``None``: loaded by the recorded id.

        Returns
        -------
        DiffBulk
            The model, its stage-1 weights, head and foundation model checked against the folder's checksums and
            against each other.

        Raises
        ------
        FileNotFoundError
            If ``path`` is not a folder with a ``config.json``.
        ValueError
            If the folder holds another kind of model or one written by a newer dbk, a file is missing or corrupt
            (checksum), or the parts do not fit together (genes vs head outputs, feature widths, stage-1 weights).
        """
        from ..core._folder import load_tensors, read_model_folder
        from ..core._pretrainer import DiffusionPretrainer
        from ._diffusion_features import pretrainer_fingerprint
        from ._embed import resolve_device

        path = Path(os.path.expanduser(os.fspath(path)))
        cfg_path = path / "config.json"
        needed = [_HEAD_FILE, _HISTORY_FILE, *(f"{_PRETRAINER_DIR}/{f}" for f in _PRETRAINER_FILES)]
        config = read_model_folder(path, format=FORMAT, format_version=FORMAT_VERSION, what="DiffBulk model",
                                   required=needed)
        _check_config(cfg_path, config)
        if config["fm"].get("weights_saved") and _FM_FILE not in config["sha256"]:
            raise ValueError(f"{cfg_path} lists no checksum for {_FM_FILE}: every file a DiffBulk model needs must "
                             "be listed (the folder is incomplete, was edited, or was not written by save()).")
        try:
            genes = [str(g) for g in config["genes"]]
            hcfg, fcfg, dcfg = config["head"], config["fm"], config["diffusion"]
            dims = [int(v) for v in hcfg["dims"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{cfg_path} does not describe a DiffBulk model: missing or invalid {err}.") from None
        if len(dims) != 2 or config.get("fusion") != hcfg.get("fusion"):
            raise ValueError(f"{cfg_path}: the head ({hcfg.get('fusion')!r}, feature widths {dims}) does not fit the "
                             f"model's fusion {config.get('fusion')!r} with two feature sets.")
        if not genes or len(set(genes)) != len(genes):
            raise ValueError(f"{cfg_path}: the gene list is empty or has duplicates.")
        dev = resolve_device(device)
        try:
            pretrainer = DiffusionPretrainer.load(path / _PRETRAINER_DIR, device=dev)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{path / _PRETRAINER_DIR}: the stage-1 model does not load: {err}") from None
        fp = pretrainer_fingerprint(pretrainer, bool(dcfg.get("use_ema", True)))
        if dcfg.get("pretrainer_fingerprint") not in (None, fp):
            raise ValueError(f"{path / _PRETRAINER_DIR} holds another stage-1 model than the one the head was trained "
                             f"on (weights fingerprint {fp}, expected {dcfg.get('pretrainer_fingerprint')}).")
        from ._head_state import head_from_state

        tensors = load_tensors(path, _HEAD_FILE)
        history = json.loads((path / _HISTORY_FILE).read_text()).get("head", {})
        head = head_from_state(hcfg, tensors, genes=genes, device=dev, history=history, config_file=cfg_path,
                               tensor_file=path / _HEAD_FILE)
        try:
            scalers = [InputScaler.from_tensors(tensors, f"scaler.{i}.", float(hcfg["input_clip"]))
                       for i in range(len(dims))]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path / _HEAD_FILE} lacks the input scaling {err}.") from None
        if any(len(sc.mean) != d for sc, d in zip(scalers, dims, strict=True)):
            raise ValueError(f"{path / _HEAD_FILE}: the input scaling does not fit the feature widths {dims}.")
        k = 2 if config.get("context_um") is not None else 1  # [features, neighbourhood mean]
        if dims[1] != k * int(dcfg["dim"]):
            raise ValueError(f"{cfg_path}: the head takes {dims[1]} diffusion features, the layout has {dcfg['dim']}.")
        fm = _load_fm(fcfg, path, dev, given=fm)
        model = cls(pretrainer=pretrainer, head=head, fm=fm, config=config, scalers=scalers)
        out_dim = _fm_dim(fm, int(fcfg["size_px"]), dev)
        if k * out_dim != dims[0]:
            raise ValueError(f"The foundation model {fcfg['id']!r} gives {out_dim} features; the head was trained on "
                             f"{dims[0]}: a different model is installed under that name.")
        return model


_PRETRAINER_FILES = ("config.json", "model.safetensors", "ema.safetensors", "history.json")
MAX_GENES = 1_000_000  # more genes than any panel or transcriptome: a corrupt config


def _bad(cfg_path: Path, key: str, value, expected: str) -> ValueError:
    shown = repr(value)
    return ValueError(f"{cfg_path}: {key} is {shown[:80] + '...' if len(shown) > 80 else shown}; expected "
                      f"{expected}.")


def _positive_number(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check_config(cfg_path: Path, config: dict) -> None:
    """Types, ranges and sizes of what :meth:`DiffBulk.load` builds from, before anything is built."""
    genes = config.get("genes")
    if not isinstance(genes, list) or not all(isinstance(g, str) and g for g in genes):
        raise _bad(cfg_path, "genes", genes, "a list of gene names (non-empty strings)")
    if not 0 < len(genes) <= MAX_GENES:
        raise _bad(cfg_path, "genes", f"<{len(genes)} genes>", f"1 to {MAX_GENES:,} genes")
    if not _positive_number(config.get("tile_size_um")):
        raise _bad(cfg_path, "tile_size_um", config.get("tile_size_um"), "a finite number of µm > 0")
    if config.get("context_um") is not None and not _positive_number(config["context_um"]):
        raise _bad(cfg_path, "context_um", config["context_um"], "null or a finite number of µm > 0")
    for key in ("fm", "diffusion", "head"):
        if not isinstance(config.get(key), dict):
            raise _bad(cfg_path, key, config.get(key), "a mapping")
    fm = config["fm"]
    if not isinstance(fm.get("id"), str):
        raise _bad(cfg_path, "fm.id", fm.get("id"), "the foundation model's name")
    size = fm.get("size_px")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise _bad(cfg_path, "fm.size_px", size, "an integer from 8 to 4096")
    dim = config["diffusion"].get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= 1 << 20:
        raise _bad(cfg_path, "diffusion.dim", dim, "a positive integer")
    dims = config["head"].get("dims")
    if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 20
                                             for d in dims):
        raise _bad(cfg_path, "head.dims", dims, "a list of positive integers (the feature widths)")


def _load_fm(fcfg: dict, path: Path, device, given=None) -> torch.nn.Module:
    if given is not None:
        from ._fm_zoo import as_user_fm

        net = as_user_fm(given) or given
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"fm must be a loaded module ((module, transform) or dbk.tl.wrap_fm), got "
                            f"{type(given).__name__}.")
        net = net.eval().to(device)
    elif fcfg.get("user_supplied"):
        raise ValueError(f"{path}: the model was fitted on a user-supplied foundation model ({fcfg['id']!r}), whose "
                         "weights the folder does not hold: load it as you did for the fit and pass it, "
                         "DiffBulk.load(path, fm=dbk.tl.wrap_fm(module, transform, ...)).")
    else:
        net = _load_fm_weights(fcfg, path, device)
    want = fcfg.get("fingerprint")
    if want is not None:
        from ._embed import fm_fingerprint

        got = fm_fingerprint(net)
        if got != want:
            raise ValueError(
                f"{path}: the foundation model {fcfg['id']!r} loaded here has other weights than the one the model "
                f"was fitted on (weights fingerprint {got}, recorded {want}): another checkpoint or revision under "
                "the same name, whose features the head was not trained on. Load the weights the model was fitted "
                "with (the same hub revision or local checkpoint), or fit the model again on these.")
    return net


def _load_fm_weights(fcfg: dict, path: Path, device) -> torch.nn.Module:
    from ._embed import load_foundation_model

    kwargs = dict(fcfg.get("kwargs") or {})
    if fcfg.get("weights_saved"):
        import timm
        from safetensors.torch import load_file

        net = timm.create_model(fcfg["timm_arch"], pretrained=False, num_classes=0, **kwargs.get("model_kwargs", {}))
        try:
            net.load_state_dict(load_file(path / _FM_FILE), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path / _FM_FILE} does not fit timm {fcfg['timm_arch']!r}: "
                             f"{str(err).splitlines()[0]}") from None
        net.eval().requires_grad_(False).to(device)
        net.dbk_pretrained, net.dbk_model = False, fcfg["id"]
        return net
    net, _ = load_foundation_model(fcfg["id"], device=device, **kwargs)
    if not getattr(net, "dbk_pretrained", True):
        raise ValueError(
            f"{path}: the model was fitted on the pretrained weights of the foundation model {fcfg['id']!r}, which "
            "are not available here (offline, not in the timm / Hugging Face cache, or access not granted); with "
            "random weights its predictions would be meaningless. Make the weights available (download them once "
            "with network access, e.g. dbk.tl.load_foundation_model(" + repr(fcfg["id"]) + "), or copy the HF cache "
            "to this machine) and load again.")
    return net


@torch.inference_mode()
def _fm_dim(fm: torch.nn.Module, size_px: int, device) -> int:
    x = torch.zeros(1, 3, size_px, size_px, device=device)
    return int(fm(x).shape[-1])
