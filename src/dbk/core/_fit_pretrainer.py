"""``fit_pretrainer``: a stage-1 model made for the genes of the data and trained on it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from .._constants import TILES_KEY, TILES_TABLE_KEY
from .._logging import logger
from ._data import _as_list, _panel
from ._presets import PretrainerPreset, auto_preset_for
from ._pretrainer import DiffusionPretrainer
from ._vocab import GeneVocab


def fit_pretrainer(
    data,
    *,
    genes: Sequence[str] | None = None,
    preset: str | PretrainerPreset | dict = "auto",
    max_steps: int | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    accelerator: str = "auto",
    devices: int | str = "auto",
    random_state: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool | str = True,
    unlabeled_tiles_key: str | None = None,
    table_key: str = TILES_TABLE_KEY,
    tiles_key: str = TILES_KEY,
    num_workers: int | None = None,
    callbacks: Sequence[Callable[[DiffusionPretrainer, dict], None]] | None = None,
    labeled_fraction: float | None = None,
    max_time: float | None = None,
    preload_max_bytes: int | None = None,
    **preset_overrides,
) -> DiffusionPretrainer:
    """Train the stage-1 gene-to-image diffusion model on tiles and their pseudo-bulk profiles.

    Parameters
    ----------
    data
        A SpatialData with tiles (:func:`dbk.pp.make_tiles`) and their table (:func:`dbk.pp.pseudobulk`), a
        :class:`~dbk.tl.TileArrays` (tiles and profiles as arrays, no SpatialData needed), or a list of them.
        Slides may carry different gene panels: the vocabulary is their union, and a gene absent from a slide's panel
        (or not measured on a tile, per the table's ``measured`` layer) is absent from the tile's token set rather
        than a zero. A slide without the table (H&E only) contributes its tiles unconditionally.
    genes
        Genes to condition on (all genes of the tables when ``None``).
    preset
        ``"auto"`` (default): ``"gpu"`` when training runs on CUDA, else ``"cpu-small"`` shortened to
        ``AUTO_CPU_STEPS`` (200) steps, a few minutes on 2 cores; the choice and the expected time are logged.
        ``"cpu-small"`` (64 px, a laptop CPU), ``"gpu"`` (128 px, the paper's U-Net, one GPU), ``"paper"``
        (224 px, GPUs), ``"tiny"`` (tests), a :class:`~dbk.tl.PretrainerPreset` or a dict.
    max_steps
        Total optimizer steps (a resumed run continues up to it); the preset's when neither this nor
        ``max_epochs`` is given.
    max_epochs
        Passes over the tiles (the smaller limit wins when both are given).
    batch_size
        Tiles per step and device (the preset's when ``None``).
    lr
        Peak AdamW learning rate (the preset's when ``None``).
    accelerator
        ``"auto"`` (``dbk.settings.device``: CUDA if available), ``"cpu"``, ``"gpu"``/``"cuda"``, ``"cuda:1"`` ...,
        ``"mps"``. Training uses HF Accelerate with bf16 autocast on CUDA; for several GPUs run the script with
        ``accelerate launch --num_processes N`` (each process then trains on the device the launcher gives it).
    devices
        Number of devices, informative: the processes come from ``accelerate launch``.
    random_state
        Seed of the weights, batches, noise and condition dropout: the same seed gives the same weights on CPU
        (``None``: ``dbk.settings.seed``).
    checkpoint_dir
        Folder for periodic checkpoints (atomic writes, the last two kept), also written at the end and when
        training is interrupted (Ctrl-C / SIGTERM).
    resume
        ``True``: continue from the latest checkpoint in ``checkpoint_dir`` (same step, optimizer, EMA and
        history) when it is a run on the same data (same slide names, tile counts and genes: the data fingerprint,
        the same in every process); a checkpoint of other data is refused with a ValueError naming the file, since
        resuming it would return (or continue) the other data's stage-1 model. ``"force"``: resume it anyway,
        continuing that run on this data (warned). ``False``: train from scratch, into an empty (or new)
        ``checkpoint_dir``; a folder holding checkpoints of an earlier run is refused (its newest checkpoints by step
        would be kept and the new run's dropped), and dbk does not delete them for you.
    unlabeled_tiles_key
        Shapes element of extra tiles without profiles (e.g. a dense overlapping grid) trained unconditionally.
    table_key
        The tile table.
    tiles_key
        The tiles the table annotates.
    num_workers
        DataLoader workers (0 when the tiles fit in memory, which is the fast path).
    callbacks
        Functions ``f(model, {"step", "loss", "lr", "data_wait"})`` called after every step (``data_wait``: seconds
        spent waiting for batches so far in this call).
    labeled_fraction
        Share of each batch drawn from the tiles with a profile when there are also tiles without (a dense
        unlabelled grid is often 20-50x larger than the labelled spots, and uniform batches would condition almost
        nothing). ``None``: batches drawn uniformly from all tiles.
    max_time
        Wall-clock budget in seconds: training stops after the step that passes it (``model.stopped_by`` says
        ``"max_time"``), with a checkpoint when ``checkpoint_dir`` is given.
    preload_max_bytes
        Tiles of SpatialData slides are read into memory once when they take at most this many bytes at the model's
        image size (``None``: 2 GiB), and streamed by DataLoader workers otherwise (0: always streamed).
        :class:`~dbk.tl.TileArrays` are in memory anyway.
    **preset_overrides
        Preset fields to change (e.g. ``image_size=32``, ``cond_drop=0.3``).

    Returns
    -------
    The trained :class:`~dbk.tl.DiffusionPretrainer`; ``model.history`` lists ``{"step", "loss", "lr", "time",
    "data_wait"}`` records (mean loss since the previous record, seconds of training, share of time spent waiting
    for data).
    """
    from .._settings import settings

    settings.apply_threads()  # dbk.settings.n_jobs
    datas = _as_list(data)
    vocab = GeneVocab()
    for sd in datas:
        vocab.add(_panel(sd, table_key, genes))
    if len(vocab) == 0:
        raise ValueError(f"No genes found: no slide has a table {table_key!r} with the chosen genes; run "
                         "dbk.pp.pseudobulk first.")
    if preset == "auto":
        preset = auto_preset_for(accelerator)
        logger.info(f"fit_pretrainer: preset='auto' -> {preset.name!r}, {preset.max_steps} steps "
                    f"(accelerator={accelerator!r}).")
    model = DiffusionPretrainer(vocab, preset=preset, random_state=random_state, **preset_overrides)
    return model.fit(datas, genes=genes, max_steps=max_steps, max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                     accelerator=accelerator, devices=devices, random_state=random_state,
                     checkpoint_dir=checkpoint_dir, resume=resume, unlabeled_tiles_key=unlabeled_tiles_key,
                     table_key=table_key, tiles_key=tiles_key, num_workers=num_workers, callbacks=callbacks,
                     labeled_fraction=labeled_fraction, max_time=max_time, preload_max_bytes=preload_max_bytes)
