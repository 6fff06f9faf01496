"""``fit_diffbulk``: DiffBulk end to end (stage 1, then stage 2) as a short sequence of named steps."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._constants import DIFF_FEATURES_KEY, PRED_KEY, TILES_KEY, TILES_TABLE_KEY
from .._logging import logger, once_per_call
from .._utils import check_batch_size, is_sdata, renamed_kwargs, resolve_seed
from ._embed import resolve_device

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

    from ._model import DiffBulk


@once_per_call
@renamed_kwargs(validation="val_fraction")
def fit_diffbulk(
    data: SpatialData | Sequence[SpatialData] | dict[str, SpatialData],
    *,
    genes: Sequence[str] | None = None,
    n_top_genes: int | None = None,
    fm: str | torch.nn.Module | tuple = "efficientnet_lite0",
    fm_size_px: int | None = None,
    fm_kwargs: dict | None = None,
    preset: str = "auto",
    fusion: str = "auto",
    head_cv: int = 3,
    patients: dict[str, str] | None = None,
    pretrainer=None,
    pretrain_steps: int | None = None,
    pretrain_kwargs: dict | None = None,
    sigma: float = 0.01,
    levels: Sequence[str] | None = None,
    pool: str = "mean",
    context_um: float | None = None,
    tile_size_um: float = 112.0,
    val_fraction: float | None = None,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    batch_size: int = 32,
    accelerator: str = "auto",
    random_state: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    key_added: str = PRED_KEY,
    split_key: str | None = None,
    copy: bool = False,
    **head_kwargs,
) -> DiffBulk:
    """Fit DiffBulk on slides with H&E and expression: stage 1 (gene-to-image diffusion) then stage 2 (fusion head).

    Named steps, each logged and timed (``uns[key_added]["training_metrics"]["timings_s"]``): tiles and the
    pseudo-bulk table where missing (:func:`dbk.pp.prepare_slides`); the genes; foundation-model embeddings
    (:func:`dbk.tl.embed_tiles`, kept when already made by the same model and input size); stage 1
    (:func:`dbk.tl.fit_pretrainer`) unless a fitted ``pretrainer`` is given; diffusion features
    (:func:`dbk.tl.diffusion_features`, kept when made by the same weights and settings); the training table with
    spatial context; the fusion head (:func:`dbk.tl.fit_head`) with early stopping on held-out training slides when
    there are several, else on held-out tiles (``fusion="ridge"``: alpha by inner cross-validation instead); the
    predictions and the record written back to the slides.

    Parameters
    ----------
    data
        A SpatialData, or a list (or ``{name: sdata}`` dict) of slides. Panels may differ (genes not measured on a
        slide are masked out of the loss). LazySlide ``WSIData`` slides are read through their own readers
        (:func:`dbk.pp.from_wsidata`): ``table_key`` then names each one's table of raw counts per tile annotating
        its tiles, and the training predictions come back as its table ``f"{key_added}_{tiles_key}"`` (in-sample).
    genes
        Genes to predict (default: all genes of the tables, the union over slides).
    n_top_genes
        Keep the ``n`` most variable of those, measured on every slide (:func:`dbk.pp.select_genes`).
    fm
        Foundation model: any id :func:`dbk.tl.load_foundation_model` accepts (default the offline ImageNet
        EfficientNet-Lite0; a name of :func:`dbk.tl.list_fms` such as ``"plip"``, DiffBulk's reference model, or
        ``"uni2-h"``; ``"hf:<org>/<name>"``, ``"hf-hub:MahmoodLab/UNI"`` ...), a module it returned, or a loaded
        module with its transform: ``(module, transform)`` / :func:`dbk.tl.wrap_fm` (recorded as user-supplied).
    fm_size_px
        Input side of the foundation model in pixels (the tile is resampled to it); ``None`` (default): the
        model's own input size (224 for EfficientNet-Lite0).
    fm_kwargs
        Extra arguments of :func:`dbk.tl.load_foundation_model` (``arch``, ``model_kwargs``, ``data_config``,
        ``pooling``, ``token``; the token is not recorded).
    preset
        Stage-1 preset: ``"auto"`` (``"gpu"`` when training on CUDA; on a CPU ``"cpu-small"`` *not trained*, unless
        ``pretrain_steps`` is given: on her2st, 200 and 500 CPU steps did not beat the untrained U-Net, so the CPU
        default spends no minutes on them; the fit's log and ``uns[key_added]["params"]["stage1_note"]`` say so),
        ``"cpu-small"`` (64 px, a CPU: 1,000 steps when named), ``"gpu"`` (128 px, one GPU),
        ``"paper"`` (224 px), ``"tiny"`` (tests, demos).
    fusion
        ``"auto"`` (default): the head chosen by inner cross-validation over the training slides (``head_cv``
        folds, grouped by slide) among reduced-rank ridge heads (``fusion="ridge", rank="auto"``, early- and
        late-fused: ``blend="late"``) without spatial context and, unless ``context_um`` is given, with context radii
        of 1.5 and 2.5 times the spacing of the tile centres, and the gated neural head; the choice and every
        candidate's CV score are logged and stored in ``uns[key_added]["head_selection"]``. Or one head:
        ``"gated"``, ``"concat"``, ``"add"`` or ``"film"`` (neural heads, see :class:`dbk.tl.FusionHead`), or
        ``"ridge"``: a linear head, ridge regression on the concatenated ``[z_fm; z_diff]`` (each block first scaled
        by :class:`InputScaler`), alpha chosen from ``logspace(-2, 8, 21)`` by inner cross-validation grouped by
        training slide, exactly as ``fit_baseline(..., "ridge_cv")``
        (:class:`~dbk.tl._fusion.RidgeFusionRegressor`). On small training sets (hundreds to a few thousand tiles)
        the ridge head is the stronger one: the neural heads overfit there.
    head_cv
        Folds of the head's inner cross-validation on the training slides (groups of slides held out; spatial
        stripes of a single slide). It gives every gene its *CV score* (:attr:`DiffBulk.cv_pearson`: the Pearson r
        of held-out training tiles, averaged over folds; never computed on other slides), carried by
        :meth:`DiffBulk.predict` to the predictions so that :func:`dbk.tl.predictions_to_adata` and the plots can
        set apart the genes the model does not predict well. ``0`` skips it (no CV scores; ``fusion="auto"`` then
        cannot choose). It costs ``head_cv`` extra head fits per candidate.
    patients
        ``{slide: patient}`` (default: each slide's ``sdata.attrs["patient"]``, which the readers set where the data
        says it). With training slides from two or more patients, the trust scores hold out whole patients, so a
        gene whose link to the image changes between patients is not trusted; with one patient (or unknown
        patients) the scores cannot see such a shift, and the fit warns. The same name as
        :func:`dbk.tl.benchmark`'s ``patients``.
    pretrainer
        A fitted :class:`~dbk.tl.DiffusionPretrainer` (or its saved folder) to use instead of training stage 1,
        e.g. one shared by several methods of a benchmark. Train it on training slides only.
    pretrain_steps
        Stage-1 optimizer steps (the preset's when ``None``; with ``preset="auto"`` on a CPU, ``None`` means ``0``);
        ``0``: no training, the diffusion features come from the U-Net at its seeded initialisation (the
        ``diffbulk_untrained`` control of :func:`dbk.tl.benchmark`).
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
    val_fraction
        Fraction of training slides (tiles, with one slide) held out for early stopping of the head (default 0.2;
        the heads' ``val_fraction``).
        With ``fusion="ridge"`` (no early stopping) the split only gives the validation metrics: the ridge head is
        fitted once on the remaining training tiles and evaluated on the held-out ones, then refitted on all
        training tiles for the returned model.
    tiles_key, table_key
        Tiles and their table. The defaults are made where missing; a key given otherwise must exist on every slide
        (a typo raises ``KeyError`` naming the slide and its keys, instead of making a second table). On a WSIData:
        its tiles (LazySlide's ``"tiles"`` when ``tiles_key`` is left at its default) and its expression table, which
        must exist.
    batch_size
        Tiles per forward pass of the feature extractors.
    accelerator
        Where everything trains and runs: ``"auto"`` (``dbk.settings.device``: CUDA if available), ``"cpu"``,
        ``"cuda"``, ``"cuda:1"`` ... (checked before any work).
    random_state
        Seed of stage 1, the diffusion-feature noise and the head (``None``: ``dbk.settings.seed``).
    checkpoint_dir
        Folder for stage-1 checkpoints (resumed when present).
    key_added
        ``obsm`` key of the training predictions; the fit's record goes to ``uns[key_added]``, so a second fit with
        another key keeps the first.
    split_key
        One slide (or several) split into training and test tiles by :func:`dbk.pp.spatial_blocks`: both stages
        learn from the tiles whose ``obs[split_key]`` is ``"train"`` only; at the end every tile of the slides gets
        its prediction in ``obsm[key_added]`` (:meth:`DiffBulk.predict`), so the ``"test"`` tiles hold held-out
        predictions for ``dbk.tl.evaluate(..., split_key=split_key)``.
    copy
        Leave ``data`` untouched: work on copies, which the returned model keeps as ``model.training_data``.
    **head_kwargs
        Options of the head (:class:`dbk.tl.MLPBaseline`: ``hidden``, ``dropout``, ``lr``, ``max_epochs``,
        ``patience`` ...); for ``fusion="ridge"``: ``alphas``, ``alpha_per_gene``, ``n_splits``, ``rank``
        (``"auto"``: reduced-rank ridge, see :class:`dbk.tl.RidgeBaseline`), ``ranks``, ``blend`` (``"late"``: one
        ridge per feature block blended by inner CV, see :class:`~dbk.tl.RidgeFusionRegressor`).

    Returns
    -------
    The fitted :class:`DiffBulk` (also with ``copy=True``: a fit returns its model, as in scvi-tools). Writes, on each
    slide's ``tables[table_key]``: ``obsm[key_added]`` (DataFrame, tiles x genes, predictions of the training tiles,
    so in-sample), the features (``obsm["X_<fm>"]``, ``obsm["X_dbk_diff"]``) and ``uns[key_added]``: ``params`` (the
    settings), ``history`` (``stage1``: step / loss / lr / time lists, ``head``: train / val loss per epoch; for
    ``fusion="ridge"`` the inner-CV curve, alpha / cv_score) and ``training_metrics`` (:func:`dbk.tl.evaluate`
    summaries on the held-out validation tiles for DiffBulk and the training-mean predictor, and in-sample on all
    training tiles, plus seconds per step; for ``fusion="ridge"`` the validation summary is of the head refitted
    without the held-out tiles, as its ``note`` says, and ``head_inner_cv`` gives the chosen alpha and its inner-CV
    score).
    """
    from .._settings import settings
    from ..pp._prepare import prepare_slides, train_view
    from ._fit_steps import (
        CPU_DEFAULT_NOTE,
        add_diffusion_features,
        choose_genes,
        cpu_default_untrained,
        embed_slides,
        fit_fusion_head,
        fit_record,
        load_fm,
        model_tile_size,
        select_head,
        slide_patients,
        train_stage1,
        training_table,
        write_back,
    )
    from ._model import DiffBulk
    from ._slide_checks import training_record

    settings.apply_threads()  # dbk.settings.n_jobs
    _check_options(fusion=fusion, head_cv=head_cv, head_kwargs=head_kwargs, val_fraction=val_fraction,
                   n_top_genes=n_top_genes,
                   batch_size=batch_size, pretrain_kwargs=pretrain_kwargs, tile_size_um=tile_size_um,
                   context_um=context_um, preset=preset if pretrainer is None else None, accelerator=accelerator,
                   patients=patients)
    from .._keys import check_named_keys_of_slides
    from ..pp._prepare import as_slides
    from ._wsidata import write_fit_back, wsidata_views

    data, wsi_back = wsidata_views(data, tiles_key=tiles_key, table_key=table_key)  # LazySlide's WSIData: dbk views
    if wsi_back:
        tiles_key, table_key = TILES_KEY, TILES_TABLE_KEY
    check_named_keys_of_slides(*as_slides(data), tiles_key=tiles_key, table_key=table_key, where="fit_diffbulk")
    random_state = resolve_seed(random_state)
    timings: dict[str, float] = {}
    with _timed(timings, "prepare_s"):
        slides, names = prepare_slides(data, tile_size_um=tile_size_um, tiles_key=tiles_key, table_key=table_key,
                                       copy=copy)
    genes = choose_genes([sd.tables[table_key] for sd in slides], genes, n_top_genes)
    logger.info(f"fit_diffbulk: {len(slides)} slide(s) {names}, {sum(sd.tables[table_key].n_obs for sd in slides)} "
                f"tiles, {len(genes)} genes.")
    with _timed(timings, "fm_embeddings_s"):
        device = resolve_device(accelerator)
        fm = load_fm(fm, size_px=fm_size_px, device=device, fm_kwargs=fm_kwargs)
        embed_slides(slides, fm, tiles_key=tiles_key, table_key=table_key, batch_size=batch_size,
                     device=device)
    if split_key is not None:  # the model sees the training tiles only; all tiles are predicted at the end
        full, slides = slides, [train_view(sd, split_key, tiles_key, table_key) for sd in slides]
    stage1_note = CPU_DEFAULT_NOTE if pretrainer is None and cpu_default_untrained(preset, pretrain_steps,
                                                                                 accelerator) else None
    with _timed(timings, "stage1_s"):
        pretrainer = train_stage1(slides, genes, pretrainer=pretrainer, preset=preset, steps=pretrain_steps,
                                  random_state=random_state, checkpoint_dir=checkpoint_dir, tiles_key=tiles_key,
                                  table_key=table_key, accelerator=accelerator, pretrain_kwargs=pretrain_kwargs)
    tile_um = model_tile_size(slides, pretrainer, tiles_key=tiles_key, default_um=tile_size_um)
    with _timed(timings, "diffusion_features_s"):
        drec = add_diffusion_features(slides, pretrainer, sigma=sigma, levels=levels, pool=pool,
                                      random_state=random_state, tiles_key=tiles_key, table_key=table_key,
                                      batch_size=batch_size)
    keys = [fm.key, DIFF_FEATURES_KEY]
    with _timed(timings, "head_cv_s"):
        tables = {context_um: training_table(slides, names, genes, keys, tiles_key=tiles_key, table_key=table_key,
                                             context_um=context_um)}
        selection = None
        if head_cv:
            selection = select_head(slides, names, genes, keys, tables, fusion=fusion, context_um=context_um,
                                    head_kwargs=head_kwargs, head_cv=head_cv, random_state=random_state,
                                    accelerator=accelerator, tiles_key=tiles_key, table_key=table_key,
                                    patients=slide_patients(slides, names, patients))
            head_fusion, context_um, head_kwargs = (selection.best.fusion, selection.best.context_um,
                                                    selection.best.head_kwargs)
        else:
            head_fusion = fusion
    with _timed(timings, "head_s"):
        train = tables[context_um]
        fitted = fit_fusion_head(train, genes, keys, fusion=head_fusion, val_fraction=val_fraction,
                                 random_state=random_state, accelerator=accelerator, head_kwargs=head_kwargs)
    record = fit_record(train, genes, names, fm=fm, pretrainer=pretrainer, features=drec, fitted=fitted,
                        timings=timings, fusion=head_fusion, context_um=context_um, sigma=sigma, pool=pool,
                        random_state=random_state, tile_size_um=tile_um, key_added=key_added, selection=selection,
                        fusion_requested=fusion, slide_checks=training_record(slides, names, tiles_key=tiles_key),
                        stage1_note=stage1_note)
    model = DiffBulk(pretrainer=pretrainer, head=fitted.head, fm=fm.net, config=record["config"],
                     scalers=fitted.scalers)
    write_back(slides, names, fitted.pred, table_key=table_key, key_added=key_added, results=record["results"])
    if split_key is not None:
        for sd, view in zip(full, slides, strict=True):
            model.predict(sd, tiles_key=tiles_key, table_key=table_key, key_added=key_added, batch_size=batch_size)
            sd.tables[table_key].uns[key_added] = view.tables[table_key].uns[key_added] | {"split_key": split_key}
        slides = full
    if copy:
        model.training_data = slides[0] if len(slides) == 1 and is_sdata(data) else slides
    elif wsi_back:
        write_fit_back(wsi_back, key_added=key_added, model=model)
    return model


def _check_options(*, fusion, head_kwargs, head_cv=3, val_fraction, n_top_genes, batch_size, pretrain_kwargs,
                   tile_size_um,
                   context_um, preset, accelerator="auto", patients=None) -> None:
    """Every option of :func:`fit_diffbulk` checked before any work (an unknown preset fails before tiling)."""
    from ._fusion import DIFFBULK_FUSIONS, RIDGE_OPTIONS

    if fusion != "auto" and fusion not in DIFFBULK_FUSIONS:
        raise ValueError(f"Unknown fusion {fusion!r}; options: 'auto', {', '.join(map(repr, DIFFBULK_FUSIONS))}.")
    if isinstance(head_cv, bool) or not isinstance(head_cv, (int, np.integer)) or head_cv < 0 or head_cv == 1:
        raise ValueError(f"head_cv must be 0 (no inner cross-validation) or a number of folds >= 2, got {head_cv!r}.")
    if fusion == "auto" and not head_cv:
        raise ValueError("fusion='auto' chooses the head by inner cross-validation: it needs head_cv >= 2 (or pass "
                         "one fusion, e.g. fusion='ridge', with head_cv=0).")
    if fusion == "auto" and head_kwargs:
        raise ValueError(f"Head options {sorted(head_kwargs)} need one fusion (e.g. fusion='ridge' or 'gated'); "
                         "fusion='auto' sets the options of each head it tries.")
    if fusion == "ridge" and set(head_kwargs) - set(RIDGE_OPTIONS):
        raise ValueError(f"fusion='ridge' takes the head options {list(RIDGE_OPTIONS)}, not "
                         f"{sorted(set(head_kwargs) - set(RIDGE_OPTIONS))} (those are for the neural fusions).")
    from collections.abc import Mapping

    if patients is not None and not isinstance(patients, Mapping):
        raise TypeError(f"patients must be a dict {{slide: patient}}, got {type(patients).__name__}.")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a fraction in (0, 1), got {val_fraction!r}.")
    if n_top_genes is not None and n_top_genes <= 0:
        raise ValueError(f"n_top_genes must be positive, got {n_top_genes!r}.")
    check_batch_size(batch_size)
    if (pretrain_kwargs or {}).get("batch_size") is not None:
        check_batch_size(pretrain_kwargs["batch_size"], "pretrain_kwargs['batch_size']")
    if not np.isfinite(tile_size_um) or tile_size_um <= 0:
        raise ValueError(f"tile_size_um must be a positive number, got {tile_size_um!r}.")
    if context_um is not None and not (isinstance(context_um, (int, float)) and np.isfinite(context_um)
                                       and context_um > 0):
        raise ValueError(f"context_um must be a positive number of µm or None, got {context_um!r}.")
    if preset is not None:
        from ..core._presets import get_preset

        get_preset(preset)
    resolve_device(accelerator)  # an unknown name, or CUDA where there is none, fails before any work


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
