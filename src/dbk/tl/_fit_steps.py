"""The named steps of :func:`dbk.tl.fit_diffbulk`, each a function of its own (and a test of its own).

prepare slides (:func:`dbk.pp.prepare_slides`) -> :func:`choose_genes` -> :func:`embed_slides` ->
:func:`train_stage1` -> :func:`add_diffusion_features` -> :func:`training_table` (with spatial context) ->
:func:`fit_fusion_head` -> :func:`write_back`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import torch

from .._constants import DIFF_FEATURES_KEY, SAMPLE_COL, SPATIAL_KEY, UNS_KEY
from .._logging import logger
from .._utils import jsonable, resolve_seed
from ..core._scaler import InputScaler


def choose_genes(tables: list[ad.AnnData], genes: Sequence[str] | None = None,
                 n_top_genes: int | None = None) -> list[str]:
    """The genes to predict.

    ``genes`` (checked against the tables), the ``n_top_genes`` most variable of them, or the union of the tables'
    genes in order of first appearance.
    """
    from ..pp import select_genes

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
        genes = select_genes(cand, n_top_genes=n_top_genes)
    if genes is None:
        genes = []
        for t in tables:
            genes += [g for g in t.var_names if g not in set(genes)]
    return list(genes)


@dataclass
class FoundationModel:
    """A loaded foundation model with its id, ``obsm`` key, input size and loader options."""

    net: torch.nn.Module
    id: str
    key: str
    size_px: int
    kwargs: dict = field(default_factory=dict)

    @property
    def timm_arch(self) -> str | None:
        return getattr(self.net, "pretrained_cfg", {}).get("architecture") if hasattr(self.net, "pretrained_cfg") \
            else None


def load_fm(fm, *, size_px: int | None, device: torch.device, fm_kwargs: dict | None = None) -> FoundationModel:
    """The foundation model: a module as given (its id from ``dbk_model`` or timm's config), or loaded by id.

    ``fm`` may also be a loaded module with its transform (``(module, transform)`` or :func:`dbk.tl.wrap_fm`).
    ``size_px=None`` takes the model's own input size. A ``token`` in ``fm_kwargs`` is used to load and not kept in
    :attr:`FoundationModel.kwargs` (which a saved model records).
    """
    from ._embed import fm_input_plan, load_foundation_model, model_key, module_data_config
    from ._fm_zoo import as_user_fm

    kwargs = dict(fm_kwargs or {})
    token = kwargs.pop("token", None)
    user = as_user_fm(fm)
    if user is not None:
        fm = user
    if isinstance(fm, torch.nn.Module):
        net = fm.eval().to(device)
        fm_id = str(getattr(net, "dbk_model", None) or getattr(net, "pretrained_cfg", {}).get("architecture")
                    or type(net).__name__)
        pooling = getattr(net, "pooling", None)  # dbk's loaders' pooling: reloading by id must make it again
        if isinstance(pooling, str) and getattr(net, "dbk_source", None) != "user-supplied":
            kwargs.setdefault("pooling", pooling)
    else:
        net, _ = load_foundation_model(str(fm), device=device, token=token, **kwargs)
        fm_id = str(net.dbk_model)
    size, _, _ = fm_input_plan(module_data_config(net), size_px, fm_id)
    return FoundationModel(net=net, id=fm_id, key=model_key(fm_id), size_px=int(size), kwargs=kwargs)


def embed_slides(slides: list, fm: FoundationModel, *, tiles_key: str, table_key: str,
                 batch_size: int, device) -> None:
    """FM embeddings of every slide's tiles into ``obsm[fm.key]`` (kept when already made by the same model)."""
    from ._embed import embed_tiles

    for sd in slides:
        embed_tiles(sd, fm=fm.net, tiles_key=tiles_key, table_key=table_key, fm_size_px=fm.size_px,
                    batch_size=batch_size, accelerator=device, key_added=fm.key)


CPU_DEFAULT_NOTE = (
    "on a CPU, preset='auto' does not train stage 1: the diffusion features come from the cpu-small U-Net at its "
    "seeded initialisation. On her2st (six held-out sections, 785 genes) 200 and 500 CPU steps of training did not "
    "beat that untrained U-Net (the 95% interval of the paired difference over the sections includes 0; see the "
    "benchmarks page of the docs), so the default spends no minutes on it. pretrain_steps=N trains N steps anyway "
    "(cpu-small: about N x 16 / 14.6 s on 2 cores); on a GPU, preset='auto' trains the 'gpu' preset.")


def cpu_default_untrained(preset, steps: int | None, accelerator: str = "auto") -> bool:
    """Whether ``fit_diffbulk``'s defaults (``preset="auto"``, ``pretrain_steps=None``) skip stage-1 training here.

    True on a CPU (:func:`dbk.core._presets.auto_preset` picks ``"cpu-small"``): see :data:`CPU_DEFAULT_NOTE`.
    """
    if not (isinstance(preset, str) and preset == "auto" and steps is None):
        return False
    from ..core._presets import auto_preset

    return auto_preset(accelerator) == "cpu-small"


def train_stage1(slides: list, genes: list[str], *, pretrainer=None, preset: str = "auto",
                 steps: int | None = None, random_state: int = 0,
                 checkpoint_dir: str | os.PathLike | None = None, tiles_key: str, table_key: str,
                 accelerator: str = "auto", pretrain_kwargs: dict | None = None):
    """Stage 1: train the gene-to-image diffusion model on the slides, or take the given one (or its folder)."""
    from ..core._fit_pretrainer import fit_pretrainer
    from ._diffusion_features import _resolve_pretrainer

    if pretrainer is not None:
        pretrainer = _resolve_pretrainer(pretrainer)
        logger.info(f"fit_diffbulk: using the given stage-1 model ({pretrainer!r}); no stage-1 training.")
        return pretrainer
    if cpu_default_untrained(preset, steps, accelerator):
        logger.info(f"fit_diffbulk: {CPU_DEFAULT_NOTE}")
        steps = 0
    if steps == 0:
        logger.info("fit_diffbulk: pretrain_steps=0: stage 1 is not trained; the diffusion features come from the "
                    "U-Net at its seeded initialisation (the 'untrained' control).")
        return untrained_pretrainer(slides, genes, preset=preset, random_state=random_state, tiles_key=tiles_key,
                                    table_key=table_key, accelerator=accelerator, pretrain_kwargs=pretrain_kwargs)
    pretrainer = fit_pretrainer(slides, genes=genes, preset=preset, max_steps=steps, random_state=random_state,
                                checkpoint_dir=checkpoint_dir, tiles_key=tiles_key, table_key=table_key,
                                accelerator=accelerator, **dict(pretrain_kwargs or {}))
    pretrainer.ema_net.eval()
    return pretrainer


def untrained_pretrainer(slides: list, genes: list[str], *, preset="auto", random_state: int = 0,
                         tiles_key: str, table_key: str, accelerator: str = "auto", pretrain_kwargs: dict | None = None,
                         tile_size_um: float | None = None):
    """The stage-1 model :func:`dbk.tl.fit_pretrainer` would start from, untrained: same vocabulary, preset and seed.

    The vocabulary is built as ``fit_pretrainer`` builds it (each slide's panel among ``genes``); preset fields in
    ``pretrain_kwargs`` apply, training options (``lr``, ``batch_size`` ...) are ignored.
    """
    import inspect

    from ..core._fit_pretrainer import fit_pretrainer
    from ..core._presets import auto_preset
    from ..core._pretrainer import DiffusionPretrainer
    from ..core._vocab import GeneVocab
    from ..pp._prepare import tile_size_um as slide_tile_size
    from ._embed import resolve_device

    fit_args = set(inspect.signature(fit_pretrainer).parameters)
    overrides = {k: v for k, v in dict(pretrain_kwargs or {}).items() if k not in fit_args}
    vocab = GeneVocab()
    for sd in slides:
        names = set(sd.tables[table_key].var_names)
        vocab.add([g for g in genes if g in names])
    if tile_size_um is None:
        sizes = [v for v in (slide_tile_size(sd, tiles_key) for sd in slides) if v is not None]
        tile_size_um = float(np.median(sizes)) if sizes else None
    model = DiffusionPretrainer(vocab, preset=auto_preset(accelerator) if preset == "auto" else preset,
                                tile_size_um=tile_size_um, random_state=random_state, **overrides)
    model.to(resolve_device(accelerator))
    model.ema_net.eval()
    return model


def model_tile_size(slides: list, pretrainer, *, tiles_key: str, default_um: float) -> float:
    """The tile side the model is trained on (median over slides, in µm); warns when stage 1 saw another size."""
    from ..pp._prepare import tile_size_um

    sizes = [s for s in (tile_size_um(sd, tiles_key) for sd in slides) if s is not None]
    size = float(np.median(sizes)) if sizes else float(default_um)
    if pretrainer.tile_size_um and abs(pretrainer.tile_size_um / size - 1) > 0.02:
        logger.warning(f"fit_diffbulk: the stage-1 model works on {pretrainer.tile_size_um:g} µm tiles, the slides' "
                       f"tiles are {size:g} µm; diffusion features see {pretrainer.tile_size_um:g} µm around each tile "
                       "centre.")
    return size


def add_diffusion_features(slides: list, pretrainer, *, sigma: float, levels, pool: str,
                           random_state: int, tiles_key: str, table_key: str, batch_size: int,
                           key: str = DIFF_FEATURES_KEY) -> dict:
    """Diffusion features of every slide into ``obsm[key]``; returns their record (``dim``, ``levels``, ``dims``...).

    Features already made by the same weights and settings are kept (:func:`dbk.tl.diffusion_features`).
    """
    from ._diffusion_features import diffusion_features

    for sd in slides:
        diffusion_features(sd, pretrainer, sigma=sigma, tiles_key=tiles_key, table_key=table_key, levels=levels,
                           pool=pool, batch_size=batch_size, random_state=random_state, key_added=key)
    return dict(slides[0].tables[table_key].uns[UNS_KEY]["diffusion_features"][key])


def training_table(slides: list, names: list[str], genes: list[str], keys: list[str], *, tiles_key: str,
                   table_key: str, context_um: float | None = None) -> ad.AnnData:
    """All training tiles in one table (:func:`dbk.pp.concat`) with the feature sets ``keys`` in ``obsm``.

    With ``context_um`` each feature set becomes ``[features, their mean within context_um]`` per slide
    (:func:`dbk.tl.spatial_context`'s computation, on the tiles' centres in µm).
    """
    from ..pp import concat
    from ..pp._prepare import record_pixel_size
    from ._context import context_features, tile_coords_um

    train = concat(dict(zip(names, slides, strict=True)), genes=genes, table_key=table_key)
    missing = [k for k in keys if k not in train.obsm]
    if missing:
        raise RuntimeError(f"The training table lacks the features {missing}; every slide must have them.")
    for k in keys:
        train.obsm[k] = np.asarray(train.obsm[k])
    for sd, name in zip(slides, names, strict=True):
        if record_pixel_size(sd, tiles_key, table_key) is None and context_um is not None:
            raise ValueError(f"context_um needs the pixel size of slide {name!r}, and its image has none.")
    if context_um is not None:
        coords = np.vstack([tile_coords_um(sd.tables[table_key]) for sd in slides])
        groups = train.obs[SAMPLE_COL].astype(str).to_numpy()
        for k in keys:
            train.obsm[k] = context_features(coords, train.obsm[k], context_um, groups)
    return train


def select_head(slides: list, names: list[str], genes: list[str], keys: list[str], tables: dict, *, fusion: str,
                context_um: float | None, head_kwargs: dict, head_cv: int, random_state: int, accelerator: str,
                tiles_key: str, table_key: str, patients: dict[str, str] | None = None):
    """The head's inner cross-validation on the training slides (:mod:`dbk.tl._head_cv`).

    Gives per-gene trust scores (held-out patients where ``patients`` names two or more) and, with
    ``fusion="auto"``, the head, context radius and options to fit by the selection rule. ``tables``
    (``{context_um: training table}``) is filled with the tables the candidates need.
    """
    from ._context import tile_spacing_um
    from ._head_cv import _coords_um, cross_validate_heads, head_candidates

    coords, groups = _coords_um(slides, table_key)
    spacing = tile_spacing_um(coords, groups) if coords is not None else None
    cands = head_candidates(fusion, context_um=context_um, head_kwargs=head_kwargs,
                            spacing_um=spacing if fusion == "auto" and context_um is None else None)
    for c in cands:
        if c.context_um not in tables:
            tables[c.context_um] = training_table(slides, names, genes, keys, tiles_key=tiles_key,
                                                  table_key=table_key, context_um=c.context_um)
    base = next(iter(tables.values()))
    tile_patients = None
    if patients:
        of_slide = base.obs[SAMPLE_COL].astype(str).to_numpy()
        tile_patients = np.array([patients[s] for s in of_slide], dtype=object)  # every slide has one
    return cross_validate_heads(tables, genes, keys, cands, n_splits=head_cv, random_state=random_state,
                                accelerator=accelerator, coords_um=coords, spacing_um=spacing,
                                patients=tile_patients)


def known_patients(names: list[str], slides: list, patients) -> dict[str, str]:
    """``{slide: patient}`` of the slides whose patient is known: ``patients`` first, then ``sdata.attrs["patient"]``.

    ``patients`` must be a mapping naming only slides of ``names``.
    """
    from collections.abc import Mapping

    if patients is not None and not isinstance(patients, Mapping):
        raise TypeError(f"patients must be a dict {{slide: patient}}, got {type(patients).__name__}.")
    if patients is not None:
        unknown = [s for s in patients if s not in names]
        if unknown:
            raise ValueError(f"patients names slides {unknown} that are not in the data (slides: {names}).")
    of = {}
    for n, sd in zip(names, slides, strict=True):
        p = (patients or {}).get(n, sd.attrs.get("patient"))
        if p is not None:
            of[n] = str(p)
    return of


def slide_patients(slides: list, names: list[str], patients) -> dict[str, str] | None:
    """The patient of each training slide (:func:`known_patients`).

    ``None`` when any slide's patient is unknown (a partial map would hold out some patients and pool the rest).
    """
    of = known_patients(names, slides, patients)
    missing = [n for n in names if n not in of]
    if of and missing:
        logger.warning(f"fit_diffbulk: the patient of slides {missing} is unknown (set sdata.attrs['patient'] or "
                       f"patients=); the trust scores hold out slides, not patients.")
        return None
    return of or None


def scaled_table(train: ad.AnnData, keys: list[str], scalers: list[InputScaler]) -> ad.AnnData:
    """The head's table: targets, ``obs`` and ``obsm["spatial"]`` of ``train``, the features ``keys`` scaled."""
    # anndata >= 0.13 lists X as layers[None]; passing it back beside X raises, so copy the named layers only
    layers = {k: v for k, v in train.layers.items() if k is not None}
    out = ad.AnnData(X=train.X, obs=train.obs, var=train.var, layers=layers)
    if SPATIAL_KEY in train.obsm:  # spatial-stripe folds of the ridge head's inner CV on one slide
        out.obsm[SPATIAL_KEY] = np.asarray(train.obsm[SPATIAL_KEY])
    for k, sc in zip(keys, scalers, strict=True):
        out.obsm[k] = sc.transform(np.asarray(train.obsm[k]))
    return out


@dataclass
class FittedHead:
    """What :func:`fit_fusion_head` returns: the head, its input scalers, training predictions and validation."""

    head: object
    scalers: list[InputScaler]
    pred: pd.DataFrame
    split: tuple[np.ndarray, np.ndarray, str]
    pred_val: pd.DataFrame | None = None


def fit_fusion_head(train: ad.AnnData, genes: list[str], keys: list[str], *, fusion: str,
                    val_fraction: float | None, random_state: int | None, accelerator: str,
                    head_kwargs: dict) -> FittedHead:
    """The stage-2 head on the training table's feature sets ``keys`` ([FM, diffusion]), inputs scaled per set.

    The held-out split is the one the neural heads' early stopping draws; the input scaling is fitted on its training
    part. The ridge head (no early stopping) is first fitted on that part for honest validation predictions, then
    refitted, scaling included, on all training tiles (the head returned).
    """
    from ..core._head_training import holdout_split
    from ._fusion import fit_head
    from ._head_base import resolve_groups

    val_fraction = 0.2 if val_fraction is None else float(val_fraction)
    head_kwargs = dict(head_kwargs)
    head_kwargs.setdefault("random_state", random_state)
    if fusion != "ridge":
        head_kwargs.setdefault("accelerator", accelerator)
        # the InputScaler below is fitted on the head's own training split: the head does not scale them again
        head_kwargs.setdefault("scale_inputs", False)
    seed = resolve_seed(head_kwargs["random_state"])
    # the head's own split (TorchRegressor draws it first from default_rng(seed)), reproduced here
    tr, va, how = holdout_split(train.n_obs, resolve_groups(train, None), val_fraction, np.random.default_rng(seed))
    fm_key, diff_key = keys
    pred_va = None
    if fusion == "ridge":
        sc_tr = [InputScaler.fit(np.asarray(train.obsm[k])[tr]) for k in keys]
        part = fit_head(scaled_table(train[tr], keys, sc_tr), use_rep=fm_key, diff_key=diff_key, genes=genes,
                        fusion=fusion, **head_kwargs)
        pred_va = part.predict(scaled_table(train[va], keys, sc_tr))
        scalers = [InputScaler.fit(np.asarray(train.obsm[k])) for k in keys]
    else:
        scalers = [InputScaler.fit(np.asarray(train.obsm[k])[tr]) for k in keys]
    scaled = scaled_table(train, keys, scalers)
    if fusion == "ridge":
        head = fit_head(scaled, use_rep=fm_key, diff_key=diff_key, genes=genes, fusion=fusion, **head_kwargs)
    else:
        head = fit_head(scaled, use_rep=fm_key, diff_key=diff_key, genes=genes, fusion=fusion,
                        val_fraction=val_fraction, **head_kwargs)
        if head.validation_ != how:  # pragma: no cover - only if TorchRegressor changes how it splits
            logger.warning(f"fit_diffbulk: the head held out {head.validation_}, not {how} as expected; the input "
                           "scaling saw some of its validation tiles.")
    return FittedHead(head=head, scalers=scalers, pred=head.predict(scaled), split=(tr, va, how), pred_val=pred_va)


def gene_stats(train: ad.AnnData, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each gene over the training tiles where it was measured."""
    from ._head_base import targets

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
    return jsonable(evaluate(a, pred_key="_pred", hvg_genes=hvg, top_k=top_k, key_added=None).attrs["summary"])


def training_metrics(train: ad.AnnData, genes: list[str], fitted: FittedHead, hvg: list[str], *, fm_key: str,
                     timings: dict[str, float]) -> dict:
    """In-sample and held-out summaries (:func:`dbk.tl.evaluate`) of the head and of the training-mean predictor."""
    head = fitted.head
    tr, va, how = fitted.split
    metrics: dict = {"timings_s": {k: round(v, 3) for k, v in timings.items()},
                     "train_in_sample": _summary(train, fitted.pred, hvg)}
    if fitted.pred_val is not None or head.validation_ == how:
        from ._baselines import MeanPredictor

        mp = MeanPredictor().fit(train[tr], use_rep=fm_key, genes=genes)
        val = train[va]
        metrics["validation"] = {"split": how, "n_tiles": int(len(va)),
                                 "diffbulk": _summary(val, fitted.pred if fitted.pred_val is None else fitted.pred_val,
                                                      hvg),
                                 "mean": _summary(val, mp.predict(val), hvg)}
        if fitted.pred_val is not None:
            metrics["validation"]["note"] = ("ridge head refitted (input scaling, inner-CV alpha, coefficients) on the "
                                             "other training tiles, then evaluated on these; the returned model is "
                                             "fitted on all training tiles")
    if hasattr(head, "cv_scheme_"):
        metrics["head_inner_cv"] = {"scheme": head.cv_scheme_, "alpha": jsonable(head.alpha_),
                                    "score": float(head.cv_results_["score"].min()),
                                    "score_definition": "validation MSE / training variance, mean over genes"}
        if getattr(head, "blend", None) == "late":
            metrics["head_inner_cv"].update(blend="late", fm_weight=head.blend_weight_,
                                            block_alpha=head.block_alpha_,
                                            block_rank=[0 if r is None else int(r) for r in head.block_rank_],
                                            blend_score=min(head.blend_cv_))
    v = metrics.get("validation")
    if v:
        logger.info(f"fit_diffbulk: validation ({v['split']}, {v['n_tiles']} tiles) mean Pearson "
                    f"{v['diffbulk']['pearson_mean_all']:.3f} (training mean predictor: "
                    f"{v['mean']['pearson_mean_all']:.3f}), MSE {v['diffbulk']['mse_mean_all']:.4f} "
                    f"(mean predictor {v['mean']['mse_mean_all']:.4f}).")
    return metrics


def write_back(slides: list, names: list[str], pred: pd.DataFrame, *, table_key: str, key_added: str,
               results: dict) -> None:
    """Each slide's training predictions into ``obsm[key_added]`` and ``results`` into ``uns[key_added]``."""
    for sd, name in zip(slides, names, strict=True):
        a = sd.tables[table_key]
        rows = pd.Index([f"{name}:{o}" for o in a.obs_names])
        df = pred.loc[rows]
        df.index = a.obs_names.copy()
        a.obsm[key_added] = df
        a.uns[key_added] = jsonable(results)
        rec = a.uns.get(UNS_KEY)
        old = rec.get("predict") if isinstance(rec, dict) else None
        if isinstance(old, dict) and old.get("pred_key") == key_added:
            del rec["predict"]  # an earlier predict's record (CV scores, model): not of these predictions any more


def _nan_to_none(v):
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return None if isinstance(v, float) and not np.isfinite(v) else v


def _fit_id(pred: pd.DataFrame, names: list[str]) -> str:
    """Which fit this is: a hash of its training slides and training predictions (equal fits, equal ids).

    :func:`fit_diffbulk` writes it to the training tables (``uns[key_added]["params"]["fit_id"]``) and the model's
    ``config``; :meth:`DiffBulk.predict` copies it to ``uns["dbk"]["predict"]``, so that :mod:`dbk.pl` can tell
    predictions of a model on its own training tiles (in-sample) from held-out ones.
    """
    import hashlib

    h = hashlib.sha256()
    for part in (names, pred.index, pred.columns):
        h.update("\x1f".join(map(str, part)).encode() + b"\x1e")
    h.update(np.ascontiguousarray(pred.to_numpy(dtype=np.float32)).tobytes())
    return h.hexdigest()[:16]


def fit_record(train: ad.AnnData, genes: list[str], names: list[str], *, fm: FoundationModel, pretrainer,
               features: dict, fitted: FittedHead, timings: dict[str, float], fusion: str, context_um: float | None,
               sigma: float, pool: str, random_state: int, tile_size_um: float, key_added: str, selection=None,
               fusion_requested: str | None = None, slide_checks: dict | None = None,
               stage1_note: str | None = None) -> dict:
    """What a fit leaves behind: the model's ``config`` and the ``results`` for ``uns[key_added]``.

    ``results`` holds ``params`` (the settings), ``history`` (stage 1 and head curves) and ``training_metrics``
    (:func:`training_metrics`); ``config`` the genes, tile geometry, feature layouts (the FM's weights
    ``fingerprint`` and normalisation ``mean`` / ``std``: which features the head expects), head state and training
    statistics a saved model needs; ``slide_checks`` (:func:`dbk.tl._slide_checks.training_record`: the training
    slides' pixel sizes and tile colours, which :meth:`DiffBulk.predict` compares new slides with) joins
    ``config["train"]``.
    """
    from .. import __version__
    from .._utils import records_to_columns
    from ..core._scaler import INPUT_CLIP
    from ._diffusion_features import pretrainer_fingerprint
    from ._effective_rank import effective_rank, rank_record
    from ._embed import fm_fingerprint, module_data_config
    from ._head_base import targets

    head = fitted.head
    fm_cfg = module_data_config(fm.net)  # the features the head expects: these weights, this preprocessing
    fm_features = {"fingerprint": fm_fingerprint(fm.net),  # mean / std None: a user transform normalises
                   "mean": None if fm_cfg.get("mean") is None else [float(v) for v in fm_cfg["mean"]],
                   "std": None if fm_cfg.get("std") is None else [float(v) for v in fm_cfg["std"]]}
    mean, var = gene_stats(train, genes)
    hvg = [genes[j] for j in sorted(range(len(genes)), key=lambda j: (-var[j], genes[j]))]
    metrics = training_metrics(train, genes, fitted, hvg, fm_key=fm.key, timings=timings)
    y, m = targets(train, genes, None)
    rank = rank_record(fitted.pred.reindex(columns=genes).to_numpy(), effective_rank(np.where(m, y, np.nan)),
                       what="fit_diffbulk")
    trust = selection.trust if selection is not None else {}
    head_cfg = {**head.get_state()[0], "input_clip": INPUT_CLIP}
    fit_id = _fit_id(fitted.pred, names)
    context = None if context_um is None else float(context_um)
    config = {
        "genes": list(genes),
        "tile_size_um": tile_size_um,
        "fusion": fusion,
        "context_um": context,
        "fm": {"id": fm.id, "key": fm.key, "size_px": fm.size_px, "dim": int(train.obsm[fm.key].shape[1])
               // (1 if context is None else 2), "kwargs": fm.kwargs, "timm_arch": fm.timm_arch,
               **fm_features},
        "diffusion": {"key": DIFF_FEATURES_KEY, "dim": int(features["dim"]), "levels": list(features["levels"]),
                      "dims": list(features["dims"]), "pool": pool, "sigma": float(sigma),
                      "random_state": random_state, "use_ema": True,
                      "pretrainer_fingerprint": pretrainer_fingerprint(pretrainer, True)},
        "head": head_cfg,
        "train": {"samples": names, "n_tiles": int(train.n_obs), "gene_mean": mean.tolist(),
                  "gene_var": var.tolist(), "hvg_order": hvg, **(slide_checks or {})},
        "random_state": random_state,
        "fit_id": fit_id,  # also in uns[key_added]["params"] and predict's record: dbk.pl tells in-sample predictions
        "stage1_note": stage1_note,  # why stage 1 was not trained, when the defaults chose so
        "dbk_version": __version__,
        "cv_pearson": None if selection is None else [None if not np.isfinite(v) else float(v)
                                                      for v in selection.cv_pearson.reindex(genes).to_numpy()],
        "cv_se": None if not trust else [None if not np.isfinite(v) else float(v)
                                         for v in trust["se"].reindex(genes).to_numpy()],
        "cv_trusted": None if not trust else [bool(v) for v in trust["trusted"].reindex(genes).to_numpy()],
        "effective_rank": rank,
        "head_selection": None if selection is None else _nan_to_none(selection.record()),  # strict JSON
    }
    params = {
        "fm": fm.id, "fm_key": fm.key, "fm_size_px": fm.size_px, "fusion": fusion,
        "preset": pretrainer.preset.name, "pretrain_steps": int(pretrainer.step), "stage1_note": stage1_note,
        "stage1_image_size": int(pretrainer.image_size), "sigma": float(sigma), "levels": list(features["levels"]),
        "fusion_requested": fusion_requested or fusion,
        "pool": pool, "context_um": context, "tile_size_um": tile_size_um, "genes": list(genes), "samples": names,
        "n_train_tiles": int(train.n_obs), "validation": head.validation_, "random_state": random_state,
        "pred_key": key_added, "diff_key": DIFF_FEATURES_KEY, "fit_id": fit_id,
        "head": {k: head_cfg[k] for k in head.OPTIONS}, "dbk_version": __version__,
    }
    history = {"stage1": records_to_columns(pretrainer.history),
               "head": {k: [float(v) for v in vals] for k, vals in head.history_.items()}}
    results = {"params": params, "history": history, "training_metrics": metrics, "effective_rank": rank}
    if selection is not None:
        # NaN (not None) where a gene's score is undefined: h5ad stores a float array
        results["head_selection"] = {**selection.record(), "genes": list(genes),
                                     "cv_pearson": [float(v) for v in selection.cv_pearson.reindex(genes)]}
        if trust:
            results["head_selection"]["cv_se"] = [float(v) for v in trust["se"].reindex(genes)]
            results["head_selection"]["cv_trusted"] = [bool(v) for v in trust["trusted"].reindex(genes)]
    return {"config": config, "results": results}
