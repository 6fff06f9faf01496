"""DiffBulk end to end: ``fit_diffbulk`` (stage 1 + stage 2) and the :class:`DiffBulk` model (predict, save, load)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from spatialdata import SpatialData

from .._constants import (
    DIFF_FEATURES_KEY,
    PRED_KEY,
    SPATIAL_KEY,
    SPOTS_KEY,
    TILES_KEY,
    TILES_TABLE_KEY,
    TRANSCRIPTS_KEY,
    UNS_KEY,
)
from .._logging import logger
from .._settings import settings
from .._utils import copy_sdata
from ..core._scaler import INPUT_CLIP, InputScaler
from ._context import UM_PER_PX_KEY, neighbor_mean, tile_coords_um, with_context

FORMAT = "dbk.DiffBulk"
FORMAT_VERSION = 1
_HEAD_FILE = "head.safetensors"
_FM_FILE = "fm.safetensors"
_HISTORY_FILE = "history.json"
_PRETRAINER_DIR = "pretrainer"
_HEAD_OPTIONS = ("hidden", "dropout", "lr", "weight_decay", "batch_size", "max_epochs", "patience", "val_fraction",
                 "random_state")
_RIDGE_TENSORS = ("x_mean", "x_scale", "coef", "intercept", "alpha", "cv_alphas", "cv_score")


# ---- data preparation ----------------------------------------------------------------------------------------------


def _as_slides(data) -> list[SpatialData]:
    if isinstance(data, SpatialData):
        return [data]
    if isinstance(data, dict):
        data = list(data.values())
    data = list(data) if isinstance(data, (list, tuple)) else None
    if not data or not all(isinstance(d, SpatialData) for d in data):
        raise TypeError("data must be a SpatialData or a non-empty list of SpatialData objects (slides with the H&E "
                        "image and expression).")
    return data


def _slide_names(slides: list[SpatialData], table_key: str, data) -> list[str]:
    if isinstance(data, dict):
        return [str(k) for k in data]
    names = []
    for i, sd in enumerate(slides):
        name = sd.attrs.get("sample")
        if name is None and table_key in sd.tables and "sample" in sd.tables[table_key].obs:
            u = sd.tables[table_key].obs["sample"].astype(str).unique()
            name = u[0] if len(u) == 1 else None
        names.append(str(name) if name is not None else f"slide{i}")
    if len(set(names)) != len(names):  # e.g. two synthetic slides both called "sample"
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def _expression_source(sdata: SpatialData, tiles_key: str) -> str:
    mode = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("mode")
    if mode == "spots":
        return "spots"
    if TRANSCRIPTS_KEY in sdata.points:
        return "transcripts"
    if "cells" in sdata.shapes and sdata.tables:
        return "cells"
    raise ValueError(f"No expression to sum into tiles: no table {TILES_TABLE_KEY!r}, no points "
                     f"{TRANSCRIPTS_KEY!r}, no cells and no spot tiles. Run dbk.pp.pseudobulk yourself, or use "
                     "model.predict for an H&E-only slide.")


def prepare_slide(
    sdata: SpatialData,
    *,
    tile_size_um: float,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    need_table: bool = True,
    name: str = "slide",
) -> list[str]:
    """Make the tiles (and with ``need_table`` the pseudo-bulk table) of a slide when missing; return what was done.

    Tiles: a grid over tissue, or one tile per spot when the slide has spots and no transcripts. Expression: from
    the transcripts, else the spots, else the cells.
    """
    from ..pp import make_tiles, pseudobulk

    done = []
    if tiles_key not in sdata.shapes:
        spots = need_table and SPOTS_KEY in sdata.shapes and TRANSCRIPTS_KEY not in sdata.points
        mode = "spots" if spots else "grid"
        make_tiles(sdata, tile_size_um=tile_size_um, mode=mode, key_added=tiles_key)
        done.append(f"make_tiles({tile_size_um:g} µm, mode={mode!r}): {len(sdata.shapes[tiles_key])} tiles")
    if need_table and table_key not in sdata.tables:
        source = _expression_source(sdata, tiles_key)
        pseudobulk(sdata, tiles_key=tiles_key, source=source, key_added=table_key)
        t = sdata.tables[table_key]
        done.append(f"pseudobulk(source={source!r}): {t.n_obs} tiles x {t.n_vars} genes")
    for d in done:
        logger.info(f"slide {name!r}: {d}.")
    return done


def tile_size_um_of(sdata: SpatialData, tiles_key: str = TILES_KEY) -> float | None:
    """Median side of the tiles in µm (``None`` when the image has no pixel size)."""
    from .._image import get_pixel_size
    from ..pp._tiles import tile_bounds

    image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key")
    try:
        px = get_pixel_size(sdata, image_key)
    except (ValueError, KeyError):
        return None
    b = tile_bounds(sdata, tiles_key)
    return float(np.median(b[:, 2] - b[:, 0])) * px if len(b) else None


def _diff_features_match(adata: ad.AnnData, key: str, want: dict, name: str) -> bool:
    """Whether ``obsm[key]`` holds diffusion features made with exactly the settings and weights in ``want``."""
    rec = adata.uns.get(UNS_KEY, {}).get("diffusion_features", {}).get(key, {})
    if key in adata.obsm and len(adata.obsm[key]) == adata.n_obs and all(
            _jsonable(rec.get(k)) == _jsonable(v) for k, v in want.items()):
        logger.info(f"slide {name!r}: reusing the diffusion features in obsm[{key!r}] (same stage-1 weights and "
                    "settings).")
        return True
    return False


def _embed_if_needed(sdata, fm, *, fm_id, key, size_px, tiles_key, table_key, batch_size, accelerator, name) -> None:
    from ._embed import embed_tiles

    if table_key in sdata.tables:
        a = sdata.tables[table_key]
        rec = a.uns.get(UNS_KEY, {}).get("embeddings", {}).get(key, {})
        if (key in a.obsm and len(a.obsm[key]) == a.n_obs and str(rec.get("model")) == fm_id
                and int(rec.get("size_px", -1)) == size_px and str(rec.get("tiles_key")) == tiles_key):
            logger.info(f"slide {name!r}: reusing the {fm_id} embeddings in obsm[{key!r}].")
            return
    embed_tiles(sdata, model=fm, tiles_key=tiles_key, table_key=table_key, size_px=size_px, batch_size=batch_size,
                accelerator=accelerator, key_added=key)


def _jsonable(v, none="None"):
    """Plain values for JSON / h5ad: numpy scalars and arrays to Python, ``None`` to ``none``.

    h5ad cannot store ``None``, so ``uns`` gets the string ``"None"``; JSON keeps ``null`` with ``none=None``.
    """
    if isinstance(v, dict):
        return {str(k): _jsonable(x, none) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x, none) for x in v]
    if v is None:
        return none
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def _records_to_columns(records: list[dict]) -> dict[str, list]:
    keys = []
    for r in records:
        keys += [k for k in r if k not in keys]
    return {k: [float(r[k]) if isinstance(r.get(k), (int, float)) else float("nan") for r in records] for k in keys}


# ---- the model -----------------------------------------------------------------------------------------------------


class DiffBulk:
    """A fitted DiffBulk model: frozen stage-1 diffusion U-Net, foundation model, fusion head.

    Made by :func:`dbk.tl.fit_diffbulk` or :meth:`load`. :meth:`predict` writes predicted expression for the tiles of
    any slide with an H&E image (with or without measured expression); :meth:`save` writes a folder that
    :meth:`load` reads back on CPU or GPU.

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
    """

    def __init__(self, *, pretrainer, head, fm: torch.nn.Module, config: dict, scalers: list[InputScaler]) -> None:
        self.pretrainer = pretrainer
        self.head = head
        self.fm = fm
        self.config = config
        self.scalers = scalers

    def _head_predict(self, adata: ad.AnnData, key_added: str | None) -> pd.DataFrame:
        """The head on ``adata``'s features after the model's :class:`InputScaler` (one per feature set)."""
        light = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
        n_clipped, n_values = 0, 0
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
            light.obsm[key] = z
        if n_values and n_clipped > 0.01 * n_values:
            logger.info(f"predict: {100 * n_clipped / n_values:.1f}% of the feature values lie beyond "
                        f"±{self.scalers[0].clip:g} training standard deviations (clipped): the slide looks unlike "
                        "the training slides.")
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
        return (f"DiffBulk({len(self.genes)} genes, tile {self.tile_size_um:g} µm, FM {self.fm_id!r}, fusion "
                f"{self.fusion!r}, stage 1 {self.pretrainer.preset.name!r} {self.pretrainer.image_size} px / "
                f"{self.pretrainer.step} steps, z_diff {d['dim']} from {'+'.join(d['levels'])})")

    def to(self, device: str | torch.device) -> DiffBulk:
        """Move every network to ``device`` (``"auto"``: CUDA if available); returns self."""
        from ._embed import resolve_device

        dev = resolve_device(device)
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
    ) -> None:
        """Write the model's FM embeddings and diffusion features of ``sdata``'s tiles into the tile table's ``obsm``.

        Makes a table (tiles x 0 genes) when the slide has none. FM embeddings already there from the same model and
        input size are reused when ``reuse_fm``; diffusion features when ``reuse_diff`` and their record in
        ``uns["dbk"]["diffusion_features"]`` names the same stage-1 weights (fingerprint), noise level, seed, levels,
        pooling and tiles (features are deterministic, so reuse is exact).
        """
        from ._diffusion_features import diffusion_features
        from ._embed import resolve_device

        f, d = self.config["fm"], self.config["diffusion"]
        device = resolve_device("auto") if self.fm is None else next(self.fm.parameters()).device
        name = str(sdata.attrs.get("sample", "slide"))
        if reuse_fm:
            _embed_if_needed(sdata, self.fm, fm_id=self.fm_id, key=self.fm_key, size_px=int(f["size_px"]),
                             tiles_key=tiles_key, table_key=table_key, batch_size=batch_size, accelerator=device,
                             name=name)
        else:
            from ._embed import embed_tiles

            embed_tiles(sdata, model=self.fm, tiles_key=tiles_key, table_key=table_key, size_px=int(f["size_px"]),
                        batch_size=batch_size, accelerator=device, key_added=self.fm_key)
        want = {k: d[k] for k in ("sigma", "random_state", "pool", "use_ema", "levels", "pretrainer_fingerprint")}
        if not (reuse_diff and table_key in sdata.tables
                and _diff_features_match(sdata.tables[table_key], self.diff_key, {**want, "tiles_key": tiles_key},
                                         name)):
            diffusion_features(sdata, self.pretrainer, sigma=float(d["sigma"]), tiles_key=tiles_key,
                               table_key=table_key, levels=list(d["levels"]), pool=str(d["pool"]),
                               use_ema=bool(d["use_ema"]), batch_size=batch_size, random_state=int(d["random_state"]),
                               key_added=self.diff_key)
        _record_pixel_size(sdata, tiles_key, table_key)

    def predict(
        self,
        data: SpatialData | ad.AnnData,
        *,
        tiles_key: str = TILES_KEY,
        table_key: str = TILES_TABLE_KEY,
        key_added: str = PRED_KEY,
        batch_size: int = 32,
        copy: bool = False,
    ) -> SpatialData | pd.DataFrame | None:
        """Predict expression for every tile of a slide.

        On a SpatialData: tiles of the model's size are laid over the tissue when ``tiles_key`` is missing
        (:func:`dbk.pp.make_tiles`), a tile table with no genes is made when there is none (H&E-only slide), then
        the FM embeddings, the diffusion features and the fusion head give the predictions. A slide with measured
        expression keeps its table; the predictions are added beside the truth, ready for :func:`dbk.tl.evaluate`.

        On an AnnData tile table that already holds both feature sets (``obsm`` keys :attr:`fm_key` and
        :attr:`diff_key`, e.g. from :meth:`features`), only the head runs.

        Parameters
        ----------
        data
            SpatialData with the H&E image, or a tile table with the features.
        tiles_key
            Shapes element with the tiles (made when missing).
        table_key
            Tile table the features and predictions are written to.
        key_added
            ``obsm`` key of the predictions.
        batch_size
            Tiles per forward pass of the networks.
        copy
            Return a modified copy instead of changing ``data`` in place.

        Returns
        -------
        For SpatialData: ``None``, or the copy when ``copy=True``; for AnnData: the predictions DataFrame. Writes to
        the tile table ``obsm[key_added]``, a DataFrame (tiles x :attr:`genes`, float32, index the table's
        ``obs_names``), the features ``obsm[fm_key]``, ``obsm[diff_key]`` and ``uns["dbk"]["predict"]`` (model
        summary and settings).
        """
        _check_batch_size(batch_size)
        if isinstance(data, ad.AnnData):
            adata = data.copy() if copy else data
            missing = [k for k in (self.fm_key, self.diff_key) if k not in adata.obsm]
            if missing:
                raise KeyError(f"The table lacks the features obsm{missing}; pass the SpatialData (with the H&E) so "
                               "that they are computed, or run model.features(sdata) first.")
            df = self._head_predict(adata, key_added)
            self._record(adata, key_added, tiles_key)
            return df
        if not isinstance(data, SpatialData):
            raise TypeError(f"predict expects a SpatialData (or a tile table), got {type(data).__name__}.")
        sdata = copy_sdata(data) if copy else data
        name = str(sdata.attrs.get("sample", "slide"))
        prepare_slide(sdata, tile_size_um=self.tile_size_um, tiles_key=tiles_key, table_key=table_key,
                      need_table=False, name=name)
        size = tile_size_um_of(sdata, tiles_key)
        if size is not None and abs(size / self.tile_size_um - 1) > 0.02:
            logger.warning(f"predict: the tiles {tiles_key!r} of slide {name!r} are {size:g} µm, the model was "
                           f"trained on {self.tile_size_um:g} µm tiles; predictions on other tile sizes are not what "
                           "it learned (use another tiles_key to let predict make matching tiles).")
        self.features(sdata, tiles_key=tiles_key, table_key=table_key, batch_size=batch_size)
        adata = sdata.tables[table_key]
        df = self._head_predict(adata, key_added)
        self._record(adata, key_added, tiles_key)
        logger.info(f"predict: {df.shape[0]} tiles x {df.shape[1]} genes -> sdata.tables[{table_key!r}]"
                    f".obsm[{key_added!r}].")
        return sdata if copy else None

    def _record(self, adata: ad.AnnData, key_added: str, tiles_key: str) -> None:
        from .. import __version__

        if adata.n_vars and not set(map(str, adata.var_names)) & set(self.genes):
            logger.warning(f"predict: the table's {adata.n_vars} measured genes (e.g. {list(adata.var_names[:5])}) "
                           f"include none of the model's {len(self.genes)} genes (e.g. {self.genes[:5]}); the "
                           "predictions are written but cannot be evaluated against this table.")

        uns = adata.uns.setdefault(UNS_KEY, {})
        uns["predict"] = _jsonable({
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

    # ---- save / load ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to a folder, atomically (a temporary folder renamed into place).

        Contents: ``config.json`` (format and dbk version, genes, tile geometry, FM id and input size, fusion,
        diffusion-feature layout, head options, training statistics, SHA-256 of every other file),
        ``head.safetensors`` (head weights and input / target standardisation; for ``fusion="ridge"`` the
        coefficients, intercepts, standardisation, chosen alpha and inner-CV curve), ``history.json``, ``pretrainer/``
        (the stage-1 model, :meth:`dbk.tl.DiffusionPretrainer.save`) and, for a foundation model that cannot be
        reloaded by name (random weights), ``fm.safetensors``.
        """
        from safetensors.torch import save_file

        from .. import __version__
        from .._utils import atomic_path
        from ..core._pretrainer import _sha256

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        fm_cfg = dict(self.config["fm"])
        save_fm = not bool(getattr(self.fm, "dbk_pretrained", False))
        if save_fm and not fm_cfg.get("timm_arch"):
            raise ValueError(f"The foundation model {self.fm_id!r} has no pretrained weights to reload by name and is "
                             "not a timm architecture whose weights dbk can store; fit with fm=<timm model name or "
                             "checkpoint>.")
        with atomic_path(path) as tmp:
            tmp.mkdir()
            self.pretrainer.save(tmp / _PRETRAINER_DIR)
            tensors = _head_tensors(self.head)
            for i, scaler in enumerate(self.scalers):
                tensors |= scaler.tensors(f"scaler.{i}.")
            save_file(tensors, tmp / _HEAD_FILE, metadata={"format": FORMAT})
            if save_fm:
                state = {k: v.detach().cpu().contiguous().clone() for k, v in self.fm.state_dict().items()}
                save_file(state, tmp / _FM_FILE, metadata={"format": FORMAT})
            (tmp / _HISTORY_FILE).write_text(json.dumps({"head": self.head.history_}))
            hashed = [_HEAD_FILE, _HISTORY_FILE, f"{_PRETRAINER_DIR}/config.json"] + ([_FM_FILE] if save_fm else [])
            fm_cfg["weights_saved"] = save_fm
            config = dict(self.config) | {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "dbk_version": __version__,
                "fm": fm_cfg,
                "sha256": {f: _sha256(tmp / f) for f in hashed},
            }
            (tmp / "config.json").write_text(json.dumps(_jsonable(config, none=None), indent=1))
        logger.info(f"DiffBulk saved to {path}.")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> DiffBulk:
        """Load a model written by :meth:`save` onto ``device`` (``"auto"``: CUDA if available, else CPU).

        Raises
        ------
        FileNotFoundError
            If ``path`` is not a folder with a ``config.json``.
        ValueError
            If the folder holds another kind of model or one written by a newer dbk, a file is missing or corrupt
            (checksum), or the parts do not fit together (genes vs head outputs, feature widths, stage-1 weights).
        """
        from safetensors.torch import load_file

        from .. import __version__
        from ..core._pretrainer import DiffusionPretrainer, _sha256
        from ._diffusion_features import pretrainer_fingerprint
        from ._embed import resolve_device

        path = Path(path)
        cfg_path = path / "config.json"
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a folder (a saved DiffBulk model is a folder).")
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{path} is not a saved DiffBulk model (no config.json).")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{cfg_path} is corrupt: {err}.") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            got = config.get("format") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"{path} holds {got!r}, not a {FORMAT} model.")
        if int(config.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer dbk ({config.get('dbk_version')}, format "
                             f"{config.get('format_version')}); this is dbk {__version__}. Upgrade dbk.")
        if config.get("dbk_version") != __version__:
            logger.info(f"Loading a DiffBulk model saved by dbk {config.get('dbk_version')} into dbk {__version__}.")
        sums = config.get("sha256")
        if not isinstance(sums, dict) or _HEAD_FILE not in sums:
            raise ValueError(f"{cfg_path} lists no checksums; the folder is incomplete or was not written by save().")
        for fname, digest in sums.items():
            f = path / fname
            if not f.is_file():
                raise ValueError(f"{path} is incomplete: {fname} is missing.")
            if _sha256(f) != digest:
                raise ValueError(f"{f} is corrupt or was changed after saving (checksum mismatch).")
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
        tensors = load_file(path / _HEAD_FILE)
        head = _head_from_tensors(tensors, hcfg, genes, path, dev)
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
        fm = _load_fm(fcfg, path, dev)
        model = cls(pretrainer=pretrainer, head=head, fm=fm, config=config, scalers=scalers)
        out_dim = _fm_dim(fm, int(fcfg["size_px"]), dev)
        if k * out_dim != dims[0]:
            raise ValueError(f"The foundation model {fcfg['id']!r} gives {out_dim} features; the head was trained on "
                             f"{dims[0]}: a different model is installed under that name.")
        hist = path / _HISTORY_FILE
        head.history_ = json.loads(hist.read_text()).get("head", {})
        return model


def _is_ridge(head) -> bool:
    return getattr(head, "fusion", None) == "ridge"


def _head_tensors(head) -> dict[str, torch.Tensor]:
    if _is_ridge(head):
        alpha = np.broadcast_to(np.asarray(head.alpha_, np.float64), (len(head.genes_),))
        arrays = {"x_mean": head.x_mean_, "x_scale": head.x_scale_, "coef": head.coef_, "intercept": head.intercept_,
                  "alpha": alpha, "cv_alphas": np.asarray(head.history_["alpha"]),
                  "cv_ranks": np.asarray(head.history_["rank"]), "cv_score": np.asarray(head.history_["cv_score"])}
        return {f"ridge.{k}": torch.from_numpy(np.array(v, dtype=np.float64, order="C")) for k, v in arrays.items()}
    out = {f"module.{k}": v.detach().cpu().contiguous().clone() for k, v in head.module_.state_dict().items()}
    for i, (m, s) in enumerate(zip(head.x_mean_, head.x_std_, strict=True)):
        out[f"x_mean.{i}"] = torch.as_tensor(np.asarray(m, dtype=np.float64))
        out[f"x_std.{i}"] = torch.as_tensor(np.asarray(s, dtype=np.float64))
    for i, k in enumerate(getattr(head, "x_keep_", None) or []):
        out[f"x_keep.{i}"] = torch.as_tensor(np.asarray(k, dtype=np.uint8))
    out["y_mean"] = torch.as_tensor(np.asarray(head.y_mean_, dtype=np.float64))
    out["y_std"] = torch.as_tensor(np.asarray(head.y_std_, dtype=np.float64))
    return out


def _head_options(head) -> tuple[str, ...]:
    from ._fusion import RIDGE_OPTIONS

    return RIDGE_OPTIONS if _is_ridge(head) else _HEAD_OPTIONS


def _head_config(head) -> dict:
    if _is_ridge(head):
        return {
            "class": type(head).__name__,
            "fusion": "ridge",
            "alphas": [float(a) for a in head.alphas],
            "alpha_per_gene": bool(head.alpha_per_gene),
            "n_splits": int(head.n_splits),
            "random_state": head.random_state,
            "alpha": "per gene" if np.ndim(head.alpha_) else float(head.alpha_),
            "rank": head.rank,
            "ranks": [None if k is None else int(k) for k in head.ranks],
            "rank_chosen": head.rank_,
            "cv_scheme": head.cv_scheme_,
            "cv_score": float(head.cv_results_["score"].min()),
            "dims": [int(d) for d in head.n_features_in_],
            "obsm_keys": list(head.obsm_keys_),
            "layer": head.layer_,
            "best_epoch": -1,
            "validation": head.validation_,
            "input_clip": INPUT_CLIP,
            "blend": head.blend,
            **({"blend_weight": head.blend_weight_, "block_alpha": head.block_alpha_,
                "block_rank": [0 if r is None else int(r) for r in head.block_rank_],  # 0: full rank
                "blend_cv": head.blend_cv_} if head.blend == "late" else {}),
        }
    return {
        "class": type(head).__name__,
        "fusion": head.fusion,
        **{k: getattr(head, k) for k in _HEAD_OPTIONS},
        "dims": [int(d) for d in head.n_features_in_],
        "obsm_keys": list(head.obsm_keys_),
        "layer": head.layer_,
        "best_epoch": int(head.best_epoch_),
        "validation": head.validation_,
        "input_clip": INPUT_CLIP,
        "head_input_clip": head.input_clip,
    }


def _ridge_head_from_tensors(t: dict[str, torch.Tensor], hcfg: dict, genes: list[str], path: Path):
    from ._fusion import RidgeFusionRegressor

    try:
        seed = hcfg.get("random_state")
        rank = hcfg.get("rank")
        head = RidgeFusionRegressor(alphas=hcfg["alphas"], alpha_per_gene=bool(hcfg["alpha_per_gene"]),
                                    n_splits=int(hcfg["n_splits"]),
                                    random_state=None if seed in (None, "None") else int(seed),
                                    rank=rank if rank in (None, "auto") else int(rank), ranks=hcfg.get("ranks"),
                                    blend=hcfg.get("blend", "early"))
        chosen = hcfg.get("rank_chosen")
        dims = [int(d) for d in hcfg["dims"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'}: invalid ridge head settings ({err}).") from None
    missing = [f"ridge.{k}" for k in _RIDGE_TENSORS if f"ridge.{k}" not in t]
    if missing:
        raise ValueError(f"{path / _HEAD_FILE} is not a ridge head: it lacks the tensors {missing}.")
    arrays = {k: t[f"ridge.{k}"].numpy().astype(np.float64, copy=False) for k in _RIDGE_TENSORS}
    if "ridge.cv_ranks" in t:
        arrays["cv_ranks"] = t["ridge.cv_ranks"].numpy().astype(np.float64, copy=False)
    if arrays["coef"].shape != (len(genes), sum(dims)):
        raise ValueError(f"{path / _HEAD_FILE} does not fit {len(genes)} genes and features {dims} of the config: "
                         f"ridge coefficients of shape {tuple(arrays['coef'].shape)}.")
    try:
        head.set_arrays(**arrays, rank=chosen)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path / _HEAD_FILE}: corrupt ridge head: {err}") from None
    try:
        head.obsm_keys_ = [str(k) for k in hcfg["obsm_keys"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path / 'config.json'}: invalid ridge head settings ({err}).") from None
    head.n_features_in_ = dims
    head.genes_ = list(genes)
    head.layer_ = None if hcfg.get("layer") in (None, "None") else hcfg["layer"]
    head.cv_scheme_ = hcfg.get("cv_scheme")
    head.validation_ = hcfg.get("validation")
    if head.blend == "late":
        try:
            head.blend_weight_ = float(hcfg["blend_weight"])
            head.block_alpha_ = [float(a) for a in hcfg["block_alpha"]]
            head.block_rank_ = [None if r in (None, "None", 0) else int(r) for r in hcfg["block_rank"]]
            head.blend_cv_ = [float(v) for v in hcfg["blend_cv"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path / 'config.json'}: invalid late-fusion settings ({err}).") from None
    return head


def _head_from_tensors(t: dict[str, torch.Tensor], hcfg: dict, genes: list[str], path: Path, device):
    from ._fusion import FusionHead, FusionRegressor

    if hcfg.get("fusion") == "ridge":
        return _ridge_head_from_tensors(t, hcfg, genes, path)
    try:
        head = FusionRegressor(fusion=hcfg["fusion"], **{k: hcfg[k] for k in _HEAD_OPTIONS})
        dims = [int(d) for d in hcfg["dims"]]
        module = FusionHead(dims[0], dims[1], len(genes), fusion=hcfg["fusion"], hidden=hcfg["hidden"],
                            dropout=hcfg["dropout"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'}: invalid head settings ({err}).") from None
    state = {k[len("module."):]: v for k, v in t.items() if k.startswith("module.")}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:3]
        raise ValueError(f"{path / _HEAD_FILE} does not fit {len(genes)} genes and features {dims} of the config: "
                         f"{' '.join(first)}") from None
    try:
        head.x_mean_ = [t[f"x_mean.{i}"].numpy() for i in range(len(dims))]
        head.x_std_ = [t[f"x_std.{i}"].numpy() for i in range(len(dims))]
        head.y_mean_, head.y_std_ = t["y_mean"].numpy(), t["y_std"].numpy()
        # saved before dbk kept these (no x_keep tensors, no head_input_clip): plain standardisation, as trained
        head.x_keep_ = ([t[f"x_keep.{i}"].numpy() > 0 for i in range(len(dims))] if "x_keep.0" in t else None)
        clip = hcfg.get("head_input_clip", None)
        head.input_clip = None if clip in (None, "None") else float(clip)
    except KeyError as err:
        raise ValueError(f"{path / _HEAD_FILE} lacks the standardisation tensor {err}.") from None
    if any(len(m) != d for m, d in zip(head.x_mean_, dims, strict=True)) or len(head.y_mean_) != len(genes):
        raise ValueError(f"{path / _HEAD_FILE}: standardisation sizes do not fit the config.")
    head.obsm_keys_ = [str(k) for k in hcfg["obsm_keys"]]
    head.n_features_in_ = dims
    head.genes_ = list(genes)
    head.layer_ = None if hcfg.get("layer") in (None, "None") else hcfg["layer"]
    head.best_epoch_ = int(hcfg.get("best_epoch", -1))
    head.validation_ = hcfg.get("validation")
    head.history_ = {}
    head.module_ = module.to(device).eval()
    return head


def _load_fm(fcfg: dict, path: Path, device) -> torch.nn.Module:
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
    return net


@torch.inference_mode()
def _fm_dim(fm: torch.nn.Module, size_px: int, device) -> int:
    x = torch.zeros(1, 3, size_px, size_px, device=device)
    return int(fm(x).shape[-1])


# ---- fit -----------------------------------------------------------------------------------------------------------


def _check_batch_size(batch_size, name: str = "batch_size") -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"{name} must be a positive integer, got {batch_size!r}.")


def _check_training_table(sdata: SpatialData, name: str, tiles_key: str, table_key: str) -> None:
    """Clear errors, before any training, for a tile table fit cannot use as it is."""
    import scipy.sparse as sp

    from .._genes import check_gene_names
    from ..pp._tiles import table_rows_to_tiles

    a = sdata.tables[table_key]
    check_gene_names(a.var_names, f"table {table_key!r} of slide {name!r}")
    x = a.X.data if sp.issparse(a.X) else np.asarray(a.X)
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"Table {table_key!r} of slide {name!r}: X (the training targets) has "
                         f"{int((~np.isfinite(x)).sum())} NaN or infinite values; recompute it from finite counts "
                         "with dbk.pp.normalize.")
    table_rows_to_tiles(sdata, table_key, tiles_key, np.asarray(sdata.shapes[tiles_key].index))


def _record_pixel_size(sdata: SpatialData, tiles_key: str, table_key: str) -> float | None:
    """Write the tiles' level-0 pixel size (µm) into ``tables[table_key].uns["dbk"]["um_per_px"]``; return it."""
    from .._image import get_pixel_size

    image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key")
    try:
        px = float(get_pixel_size(sdata, image_key))
    except (ValueError, KeyError):
        return None
    sdata.tables[table_key].uns.setdefault(UNS_KEY, {})[UM_PER_PX_KEY] = px
    return px


def _stack_obsm(slides, names, train: ad.AnnData, keys: list[str], table_key: str) -> None:
    """Put each slide's ``obsm[key]`` into the concatenated table (rows ``{name}:{tile}``)."""
    for key in keys:
        want = pd.Index([f"{n}:{o}" for n, sd in zip(names, slides, strict=True)
                         for o in sd.tables[table_key].obs_names])
        feats = np.vstack([np.asarray(sd.tables[table_key].obsm[key]) for sd in slides])
        pos = want.get_indexer(train.obs_names)
        if (pos < 0).any():
            raise RuntimeError("dbk.pp.concat renamed tiles unexpectedly.")
        train.obsm[key] = feats[pos]


def _scaled_table(train: ad.AnnData, keys: list[str], scalers: list[InputScaler]) -> ad.AnnData:
    """The head's training table: targets, ``obs`` and ``obsm["spatial"]`` of ``train``, features ``keys`` scaled."""
    # anndata >= 0.13 lists X as layers[None]; passing it back beside X raises, so copy the named layers only
    layers = {k: v for k, v in train.layers.items() if k is not None}
    out = ad.AnnData(X=train.X, obs=train.obs, var=train.var, layers=layers)
    if SPATIAL_KEY in train.obsm:  # spatial-stripe folds of the ridge head's inner CV on one slide
        out.obsm[SPATIAL_KEY] = np.asarray(train.obsm[SPATIAL_KEY])
    for k, sc in zip(keys, scalers, strict=True):
        out.obsm[k] = sc.transform(np.asarray(train.obsm[k]))
    return out


def _gene_stats(train: ad.AnnData, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from ._baselines import targets

    y, m = targets(train, genes, None)
    cnt = np.maximum(m.sum(axis=0), 1)
    mean = (y * m).sum(axis=0) / cnt
    var = (((y - mean) ** 2) * m).sum(axis=0) / cnt
    return mean, var


def _summary(adata: ad.AnnData, pred: pd.DataFrame, hvg: list[str]) -> dict:
    from ._evaluate import evaluate

    a = adata.copy()
    a.obsm["_pred"] = pred.loc[a.obs_names]
    top_k = min(50, len(pred.columns))
    return _jsonable(evaluate(a, pred_key="_pred", hvg_genes=hvg, top_k=top_k, key_added=None).attrs["summary"])


def fit_diffbulk(
    data: SpatialData | Sequence[SpatialData] | dict[str, SpatialData],
    *,
    genes: Sequence[str] | None = None,
    n_top_genes: int | None = None,
    fm: str | torch.nn.Module = "efficientnet_lite0",
    fm_size_px: int = 224,
    fm_kwargs: dict | None = None,
    preset: str = "auto",
    fusion: str = "gated",
    pretrainer=None,
    pretrain_steps: int | None = None,
    pretrain_kwargs: dict | None = None,
    sigma: float = 0.01,
    levels: Sequence[str] | None = None,
    pool: str = "mean",
    context_um: float | None = None,
    tile_size_um: float = 112.0,
    validation: float | None = None,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    batch_size: int = 32,
    accelerator: str = "auto",
    random_state: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    key_added: str = PRED_KEY,
    copy: bool = False,
    **head_kwargs,
) -> DiffBulk | tuple[DiffBulk, SpatialData | list[SpatialData]]:
    """Fit DiffBulk on slides with H&E and expression: stage 1 (gene-to-image diffusion) then stage 2 (fusion head).

    Steps, each logged: tiles and the pseudo-bulk table where missing (:func:`dbk.pp.make_tiles`,
    :func:`dbk.pp.pseudobulk`); foundation-model embeddings (:func:`dbk.tl.embed_tiles`; reused when already there
    from the same model and input size); stage 1 (:func:`dbk.tl.fit_pretrainer`) unless a fitted ``pretrainer`` is
    given; diffusion features (:func:`dbk.tl.diffusion_features`); the fusion head (:func:`dbk.tl.fit_head`) with
    early stopping on held-out training slides when there are several, else on held-out tiles (``fusion="ridge"``:
    alpha by inner cross-validation instead); predictions for the training tiles.

    Parameters
    ----------
    data
        A SpatialData, or a list (or ``{name: sdata}`` dict) of slides. Panels may differ (genes not measured on a
        slide are masked out of the loss).
    genes
        Genes to predict (default: all genes of the tables, the union over slides).
    n_top_genes
        Keep the ``n`` most variable of those, measured on every slide (:func:`dbk.pp.select_genes`).
    fm
        Foundation model: any id :func:`dbk.tl.load_foundation_model` accepts (default the offline ImageNet
        EfficientNet-Lite0; ``"hf-hub:MahmoodLab/UNI"`` ...) or a module it returned.
    fm_size_px
        Input side of the foundation model in pixels (the tile is resampled to it).
    fm_kwargs
        Extra arguments of :func:`dbk.tl.load_foundation_model` (``arch``, ``model_kwargs``, ``data_config``).
    preset
        Stage-1 preset: ``"auto"`` (``"gpu"`` when training on CUDA, else ``"cpu-small"`` shortened to a few
        minutes), ``"cpu-small"`` (64 px, a CPU), ``"gpu"`` (128 px, one GPU), ``"paper"`` (224 px), ``"tiny"``
        (tests, demos).
    fusion
        ``"gated"`` (default), ``"concat"``, ``"add"`` or ``"film"`` (neural heads, see :class:`dbk.tl.FusionHead`),
        or ``"ridge"``: a linear head, ridge regression on the concatenated ``[z_fm; z_diff]`` (each block first
        scaled by :class:`InputScaler`), alpha chosen from ``logspace(-2, 8, 21)`` by inner cross-validation grouped
        by training slide, exactly as ``fit_baseline(..., "ridge_cv")``
        (:class:`~dbk.tl._fusion.RidgeFusionRegressor`). On small training sets (hundreds to a few thousand tiles)
        the ridge head is the stronger one: the neural heads overfit there.
    pretrainer
        A fitted :class:`~dbk.tl.DiffusionPretrainer` (or its saved folder) to use instead of training stage 1,
        e.g. one shared by several methods of a benchmark. Train it on training slides only.
    pretrain_steps
        Stage-1 optimizer steps (the preset's when ``None``).
    pretrain_kwargs
        Other arguments of :func:`dbk.tl.fit_pretrainer` (``batch_size``, ``lr``, preset overrides such as
        ``image_size``).
    sigma, levels, pool
        Diffusion features (see :func:`dbk.tl.diffusion_features`).
    context_um
        Spatial context: when set, each tile's FM and diffusion features are joined by their mean over the tiles of
        the same slide within this radius in µm (see :func:`dbk.tl.spatial_context`), here and in
        :meth:`DiffBulk.predict`. ``None`` (default): each tile on its own, as in the paper.
    tile_size_um
        Tile side for slides without tiles.
    validation
        Fraction of training slides (tiles, with one slide) held out for early stopping of the head (default 0.2).
        With ``fusion="ridge"`` (no early stopping) the split only gives the validation metrics: the ridge head is
        fitted once on the remaining training tiles and evaluated on the held-out ones, then refitted on all
        training tiles for the returned model.
    tiles_key, table_key
        Tiles and their table.
    batch_size
        Tiles per forward pass of the feature extractors.
    accelerator
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``.
    random_state
        Seed of stage 1, the diffusion-feature noise and the head.
    checkpoint_dir
        Folder for stage-1 checkpoints (resumed when present).
    key_added
        ``obsm`` key of the training predictions.
    copy
        Leave ``data`` untouched and work on copies.
    **head_kwargs
        Options of the head (:class:`dbk.tl.MLPBaseline`: ``hidden``, ``dropout``, ``lr``, ``max_epochs``,
        ``patience`` ...); for ``fusion="ridge"``: ``alphas``, ``alpha_per_gene``, ``n_splits``, ``rank``
        (``"auto"``: reduced-rank ridge, see :class:`dbk.tl.RidgeBaseline`), ``ranks``, ``blend`` (``"late"``: one
        ridge per feature block blended by inner CV, see :class:`~dbk.tl.RidgeFusionRegressor`).

    Returns
    -------
    The fitted :class:`DiffBulk`; with ``copy=True``, ``(model, copy of data)``. Writes, on each slide's
    ``tables[table_key]``: ``obsm[key_added]`` (DataFrame, tiles x genes, predictions of the training tiles, so
    in-sample), the features (``obsm["X_<fm>"]``, ``obsm["X_dbk_diff"]``) and in ``uns["dbk"]``: ``params`` (the
    settings), ``history`` (``stage1``: step / loss / lr / time lists, ``head``: train / val loss per epoch; for
    ``fusion="ridge"`` the inner-CV curve, alpha / cv_score) and ``training_metrics`` (:func:`dbk.tl.evaluate`
    summaries on the held-out validation tiles for DiffBulk and the training-mean predictor, and in-sample on all
    training tiles, plus seconds per step; for ``fusion="ridge"`` the validation summary is of the head refitted
    without the held-out tiles, as its ``note`` says, and ``head_inner_cv`` gives the chosen alpha and its inner-CV
    score).
    """
    from ..core._pretrainer import fit_pretrainer
    from ..pp import concat, select_genes
    from ._baselines import holdout_split, resolve_groups
    from ._diffusion_features import _resolve_pretrainer, diffusion_features, feature_levels, pretrainer_fingerprint
    from ._embed import load_foundation_model, model_key, resolve_device
    from ._fusion import DIFFBULK_FUSIONS, RIDGE_OPTIONS, fit_head

    if fusion not in DIFFBULK_FUSIONS:
        raise ValueError(f"Unknown fusion {fusion!r}; options: {', '.join(map(repr, DIFFBULK_FUSIONS))}.")
    if fusion == "ridge" and set(head_kwargs) - set(RIDGE_OPTIONS):
        raise ValueError(f"fusion='ridge' takes the head options {list(RIDGE_OPTIONS)}, not "
                         f"{sorted(set(head_kwargs) - set(RIDGE_OPTIONS))} (those are for the neural fusions).")
    if validation is not None and not 0 < validation < 1:
        raise ValueError(f"validation must be a fraction in (0, 1), got {validation!r}.")
    if n_top_genes is not None and n_top_genes <= 0:
        raise ValueError(f"n_top_genes must be positive, got {n_top_genes!r}.")
    _check_batch_size(batch_size)
    if (pretrain_kwargs or {}).get("batch_size") is not None:
        _check_batch_size(pretrain_kwargs["batch_size"], "pretrain_kwargs['batch_size']")
    if not np.isfinite(tile_size_um) or tile_size_um <= 0:
        raise ValueError(f"tile_size_um must be a positive number, got {tile_size_um!r}.")
    if context_um is not None and not (isinstance(context_um, (int, float)) and np.isfinite(context_um)
                                       and context_um > 0):
        raise ValueError(f"context_um must be a positive number of µm or None, got {context_um!r}.")
    if pretrainer is None:
        from ..core._presets import get_preset

        get_preset(preset)  # an unknown preset fails now, not after the tiles are made and embedded
    slides = _as_slides(data)
    if copy:
        slides = [copy_sdata(s) for s in slides]
    names = _slide_names(slides, table_key, data)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    for sd, name in zip(slides, names, strict=True):
        prepare_slide(sd, tile_size_um=tile_size_um, tiles_key=tiles_key, table_key=table_key, name=name)
        if sd.tables[table_key].n_vars == 0:
            raise ValueError(f"Slide {name!r} has no genes in table {table_key!r}; fit needs measured expression.")
        _check_training_table(sd, name, tiles_key, table_key)
    timings["prepare_s"] = time.perf_counter() - t0

    # genes
    tables = [sd.tables[table_key] for sd in slides]
    if genes is not None:
        genes = [str(g) for g in genes]
        known = {g for t in tables for g in t.var_names}
        missing = [g for g in genes if g not in known]
        if missing:
            raise KeyError(f"{len(missing)} genes are in no slide's table: {missing[:10]}.")
        if len(set(genes)) != len(genes):
            raise ValueError("genes has duplicates.")
    if n_top_genes is not None:
        cand = [t[:, [g for g in t.var_names if genes is None or g in set(genes)]] for t in tables]
        genes = select_genes(cand, n_top=n_top_genes)
    if genes is None:
        genes = []
        for t in tables:
            genes += [g for g in t.var_names if g not in set(genes)]
    logger.info(f"fit_diffbulk: {len(slides)} slide(s) {names}, {sum(t.n_obs for t in tables)} tiles, "
                f"{len(genes)} genes.")

    # foundation-model embeddings
    t0 = time.perf_counter()
    device = resolve_device(accelerator)
    fm_kwargs = dict(fm_kwargs or {})
    if isinstance(fm, torch.nn.Module):
        fm_net = fm.eval().to(device)
        fm_id = str(getattr(fm_net, "dbk_model", None) or getattr(fm_net, "pretrained_cfg", {}).get("architecture")
                    or type(fm_net).__name__)
    else:
        fm_id = str(fm)
        fm_net, _ = load_foundation_model(fm_id, device=device, **fm_kwargs)
    fm_key = model_key(fm_id)
    for sd, name in zip(slides, names, strict=True):
        _embed_if_needed(sd, fm_net, fm_id=fm_id, key=fm_key, size_px=int(fm_size_px), tiles_key=tiles_key,
                         table_key=table_key, batch_size=batch_size, accelerator=device, name=name)
    timings["fm_embeddings_s"] = time.perf_counter() - t0

    # stage 1
    t0 = time.perf_counter()
    if pretrainer is None:
        kw = dict(pretrain_kwargs or {})
        pretrainer = fit_pretrainer(slides, genes=genes, preset=preset, max_steps=pretrain_steps,
                                    random_state=random_state, checkpoint_dir=checkpoint_dir, tiles_key=tiles_key,
                                    table_key=table_key, accelerator=accelerator, **kw)
        pretrainer.ema_net.eval()
    else:
        pretrainer = _resolve_pretrainer(pretrainer)
        logger.info(f"fit_diffbulk: using the given stage-1 model ({pretrainer!r}); no stage-1 training.")
    timings["stage1_s"] = time.perf_counter() - t0
    sizes = [s for s in (tile_size_um_of(sd, tiles_key) for sd in slides) if s is not None]
    model_tile_um = float(np.median(sizes)) if sizes else float(tile_size_um)
    if pretrainer.tile_size_um and abs(pretrainer.tile_size_um / model_tile_um - 1) > 0.02:
        logger.warning(f"fit_diffbulk: the stage-1 model works on {pretrainer.tile_size_um:g} µm tiles, the slides' "
                       f"tiles are {model_tile_um:g} µm; diffusion features see {pretrainer.tile_size_um:g} µm around "
                       "each tile centre.")

    # diffusion features
    t0 = time.perf_counter()
    diff_key = DIFF_FEATURES_KEY
    want = {"sigma": float(sigma), "random_state": int(random_state), "pool": pool, "use_ema": True,
            "tiles_key": tiles_key, "pretrainer_fingerprint": pretrainer_fingerprint(pretrainer, True),
            "levels": list(feature_levels(pretrainer.ema_net.unet) if levels is None else levels)}
    for sd, name in zip(slides, names, strict=True):
        if _diff_features_match(sd.tables[table_key], diff_key, want, name):
            continue
        diffusion_features(sd, pretrainer, sigma=sigma, tiles_key=tiles_key, table_key=table_key, levels=levels,
                           pool=pool, batch_size=batch_size, random_state=random_state, key_added=diff_key)
    drec = dict(slides[0].tables[table_key].uns[UNS_KEY]["diffusion_features"][diff_key])
    timings["diffusion_features_s"] = time.perf_counter() - t0

    # the head, on all training tiles (one table); its inputs scaled on the tiles its early stopping trains on
    t0 = time.perf_counter()
    train = concat(dict(zip(names, slides, strict=True)), genes=genes, table_key=table_key)
    _stack_obsm(slides, names, train, [fm_key, diff_key], table_key)
    fm_dim = int(train.obsm[fm_key].shape[1])
    for sd, name in zip(slides, names, strict=True):
        if _record_pixel_size(sd, tiles_key, table_key) is None and context_um is not None:
            raise ValueError(f"context_um needs the pixel size of slide {name!r}, and its image has none.")
    if context_um is not None:  # [features, their mean within context_um], per slide
        um = {n: tile_coords_um(sd.tables[table_key]) for n, sd in zip(names, slides, strict=True)}
        rows = {n: pd.Index(sd.tables[table_key].obs_names) for n, sd in zip(names, slides, strict=True)}
        slide_of, tile_of = zip(*(o.split(":", 1) for o in train.obs_names), strict=True)
        slide_of = np.asarray(slide_of)
        coords = np.zeros((train.n_obs, 2))
        for n in names:
            sel = slide_of == n
            coords[sel] = um[n][rows[n].get_indexer(np.asarray(tile_of)[sel])]
        for k in (fm_key, diff_key):
            train.obsm[k] = np.hstack([np.asarray(train.obsm[k], np.float64),
                                       neighbor_mean(coords, train.obsm[k], context_um, slide_of)])
    val_fraction = 0.2 if validation is None else float(validation)
    head_kwargs.setdefault("random_state", random_state)
    if fusion != "ridge":
        head_kwargs.setdefault("accelerator", accelerator)
    seed = settings.seed if head_kwargs["random_state"] is None else int(head_kwargs["random_state"])
    # the head's own split (TorchRegressor draws it first from default_rng(seed)), reproduced here
    tr, va, how = holdout_split(train.n_obs, resolve_groups(train, None), val_fraction, np.random.default_rng(seed))
    pred_va = None
    if fusion == "ridge":
        # no early stopping: the ridge head is first fitted on the training part of the split (its own scalers and
        # inner CV) for honest held-out validation metrics, then refitted on all training tiles (the model returned)
        sc_tr = [InputScaler.fit(np.asarray(train.obsm[k])[tr]) for k in (fm_key, diff_key)]
        part = fit_head(_scaled_table(train[tr], [fm_key, diff_key], sc_tr), obsm_key=fm_key, diff_key=diff_key,
                        genes=genes, fusion=fusion, **head_kwargs)
        pred_va = part.predict(_scaled_table(train[va], [fm_key, diff_key], sc_tr))
        scalers = [InputScaler.fit(np.asarray(train.obsm[k])) for k in (fm_key, diff_key)]
    else:
        scalers = [InputScaler.fit(np.asarray(train.obsm[k])[tr]) for k in (fm_key, diff_key)]
    scaled = _scaled_table(train, [fm_key, diff_key], scalers)
    if fusion == "ridge":
        head = fit_head(scaled, obsm_key=fm_key, diff_key=diff_key, genes=genes, fusion=fusion, **head_kwargs)
    else:
        head = fit_head(scaled, obsm_key=fm_key, diff_key=diff_key, genes=genes, fusion=fusion,
                        val_fraction=val_fraction, **head_kwargs)
        if head.validation_ != how:  # pragma: no cover - only if TorchRegressor changes how it splits
            logger.warning(f"fit_diffbulk: the head held out {head.validation_}, not {how} as expected; the input "
                           "scaling saw some of its validation tiles.")
    timings["head_s"] = time.perf_counter() - t0

    # training predictions and metrics
    pred = head.predict(scaled)
    mean, var = _gene_stats(train, genes)
    hvg = [genes[j] for j in sorted(range(len(genes)), key=lambda j: (-var[j], genes[j]))]
    metrics: dict = {"timings_s": {k: round(v, 3) for k, v in timings.items()},
                     "train_in_sample": _summary(train, pred, hvg)}
    if pred_va is not None or head.validation_ == how:
        from ._baselines import MeanPredictor

        mp = MeanPredictor().fit(train[tr], obsm_key=fm_key, genes=genes)
        val = train[va]
        metrics["validation"] = {"split": how, "n_tiles": int(len(va)),
                                 "diffbulk": _summary(val, pred if pred_va is None else pred_va, hvg),
                                 "mean": _summary(val, mp.predict(val), hvg)}
        if pred_va is not None:
            metrics["validation"]["note"] = ("ridge head refitted (input scaling, inner-CV alpha, coefficients) on the "
                                             "other training tiles, then evaluated on these; the returned model is "
                                             "fitted on all training tiles")
    if fusion == "ridge":
        metrics["head_inner_cv"] = {"scheme": head.cv_scheme_, "alpha": _jsonable(head.alpha_),
                                    "score": float(head.cv_results_["score"].min()),
                                    "score_definition": "validation MSE / training variance, mean over genes"}
        if head.blend == "late":
            metrics["head_inner_cv"].update(blend="late", fm_weight=head.blend_weight_,
                                            block_alpha=head.block_alpha_,
                                            block_rank=[0 if r is None else int(r) for r in head.block_rank_],
                                            blend_score=min(head.blend_cv_))

    from .. import __version__

    head_cfg = _head_config(head)
    config = {
        "genes": list(genes),
        "tile_size_um": model_tile_um,
        "fusion": fusion,
        "context_um": None if context_um is None else float(context_um),
        "fm": {"id": fm_id, "key": fm_key, "size_px": int(fm_size_px), "dim": fm_dim,
               "kwargs": fm_kwargs,
               "timm_arch": getattr(fm_net, "pretrained_cfg", {}).get("architecture") if hasattr(
                   fm_net, "pretrained_cfg") else None},
        "diffusion": {"key": diff_key, "dim": int(drec["dim"]), "levels": list(drec["levels"]),
                      "dims": list(drec["dims"]), "pool": pool, "sigma": float(sigma),
                      "random_state": int(random_state), "use_ema": True,
                      "pretrainer_fingerprint": pretrainer_fingerprint(pretrainer, True)},
        "head": head_cfg,
        "train": {"samples": names, "n_tiles": int(train.n_obs), "gene_mean": mean.tolist(),
                  "gene_var": var.tolist(), "hvg_order": hvg},
        "random_state": int(random_state),
        "dbk_version": __version__,
    }
    model = DiffBulk(pretrainer=pretrainer, head=head, fm=fm_net, config=config, scalers=scalers)

    params = {
        "fm": fm_id, "fm_key": fm_key, "fm_size_px": int(fm_size_px), "fusion": fusion,
        "preset": pretrainer.preset.name, "pretrain_steps": int(pretrainer.step),
        "stage1_image_size": int(pretrainer.image_size), "sigma": float(sigma), "levels": list(drec["levels"]),
        "pool": pool, "context_um": None if context_um is None else float(context_um),
        "tile_size_um": model_tile_um, "genes": list(genes), "samples": names,
        "n_train_tiles": int(train.n_obs), "validation": head.validation_, "random_state": int(random_state),
        "pred_key": key_added, "diff_key": diff_key, "head": {k: head_cfg[k] for k in _head_options(head)},
        "dbk_version": __version__,
    }
    history = {"stage1": _records_to_columns(pretrainer.history),
               "head": {k: [float(v) for v in vals] for k, vals in head.history_.items()}}
    for sd, name in zip(slides, names, strict=True):
        a = sd.tables[table_key]
        rows = pd.Index([f"{name}:{o}" for o in a.obs_names])
        df = pred.loc[rows]
        df.index = a.obs_names.copy()
        a.obsm[key_added] = df
        uns = a.uns.setdefault(UNS_KEY, {})
        uns["params"] = _jsonable(params)
        uns["history"] = _jsonable(history)
        uns["training_metrics"] = _jsonable(metrics)
    v = metrics.get("validation")
    if v:
        logger.info(f"fit_diffbulk: validation ({v['split']}, {v['n_tiles']} tiles) mean Pearson "
                    f"{v['diffbulk']['pearson_mean_all']:.3f} (training mean predictor: "
                    f"{v['mean']['pearson_mean_all']:.3f}), MSE {v['diffbulk']['mse_mean_all']:.4f} "
                    f"(mean predictor {v['mean']['mse_mean_all']:.4f}).")
    if copy:
        return model, (slides[0] if isinstance(data, SpatialData) else slides)
    return model
