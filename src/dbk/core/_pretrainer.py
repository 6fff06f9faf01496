"""Stage 1: the gene-to-image conditional diffusion pretrainer (the model object, its training loop, save / load).

The pieces live beside it: the network and its EMA (:mod:`._network`), the training data (:mod:`._data`), sampling
and evaluation (:mod:`._sampling`, inherited), training checkpoints (:mod:`._checkpoint`, inherited) and the model
folder it is saved as (:mod:`._folder`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .._constants import TILES_KEY, TILES_TABLE_KEY
from .._logging import logger
from .._settings import settings
from ._checkpoint import _CheckpointMixin, data_values_fingerprint, latest_checkpoint
from ._data import _as_list, _BalancedStepSampler, _build_sources, _panel, _Source, _StepSampler, _TileBatches
from ._device import _accelerator, _batch_for_device, resolve_device, train_device
from ._edm import EDM, edm_loss
from ._folder import load_tensors, read_model_folder, write_model_folder
from ._gene_encoder import GeneEncoder
from ._network import GeneToImageNet, _ema_update
from ._presets import PretrainerPreset, expected_seconds, get_preset
from ._sampling import _dihedral, _SamplingMixin, _seed
from ._vocab import GeneVocab

LOG_INTERVAL_S = 60.0  # seconds between the progress lines of fit in the log (they do not depend on tqdm)
# fit re-measures its rate once, early, and logs the time left from it (the preset table's estimate can be far off on
# another machine): after REMEASURE_FRACTION of the steps (at most REMEASURE_STEPS) or REMEASURE_S seconds, whichever
# comes first, over at least REMEASURE_MIN_STEPS steps after the first (the first step carries the warm-up)
REMEASURE_FRACTION = 0.1
REMEASURE_STEPS = 50
REMEASURE_S = 30.0
REMEASURE_MIN_STEPS = 3
FORMAT = "dbk.DiffusionPretrainer"
FORMAT_VERSION = 1
_WEIGHTS = ("model.safetensors", "ema.safetensors")  # net, ema_net


class _Stop(Exception):
    """Raised inside the training loop after a signal asked it to stop."""


class DiffusionPretrainer(_SamplingMixin, _CheckpointMixin):
    """Stage 1 of DiffBulk: a conditional diffusion model that generates a tile's H&E from its expression profile.

    Build it with :func:`dbk.tl.fit_pretrainer` (or ``DiffusionPretrainer(vocab, preset=...)`` then :meth:`fit`),
    sample tiles with :meth:`generate`, check that the genes inform the image with :meth:`evaluate` /
    :meth:`denoising_loss`, and :meth:`save` / :meth:`load` it. The network (:class:`GeneToImageNet`) is
    :attr:`net`; :attr:`ema_net` holds the exponential moving average of its weights, used for sampling,
    evaluation and stage 2 by default.

    Parameters
    ----------
    vocab
        Gene vocabulary (or a list of genes).
    preset
        ``"auto"`` (``"gpu"`` where CUDA is available, else ``"cpu-small"`` shortened to a few minutes),
        ``"tiny"``, ``"cpu-small"``, ``"gpu"``, ``"paper"``, a :class:`~dbk.tl.PretrainerPreset` or a dict.
    tile_size_um
        Side of the tiles in µm (recorded; images are resampled from such tiles to ``preset.image_size`` px).
    random_state
        Seed of the initial weights (and the default seed of :meth:`fit`); ``None``: ``dbk.settings.seed``.
    edm
        EDM constants.
    **overrides
        Preset fields to override (e.g. ``image_size=32``).
    """

    def __init__(
        self,
        vocab: GeneVocab | Sequence[str],
        *,
        preset: str | PretrainerPreset | dict = "auto",
        tile_size_um: float | None = None,
        random_state: int | None = None,
        edm: EDM | None = None,
        **overrides,
    ) -> None:
        self.vocab = vocab if isinstance(vocab, GeneVocab) else GeneVocab(vocab)
        self.preset = get_preset(preset, **overrides)
        self.edm = edm or EDM()
        self.tile_size_um = None if tile_size_um is None else float(tile_size_um)
        self.random_state = settings.seed if random_state is None else int(random_state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            encoder = GeneEncoder(self.vocab, dim=self.preset.gene_dim, n_layers=self.preset.gene_layers,
                                  n_heads=self.preset.gene_heads, zscore=self.preset.zscore)
            self.net = GeneToImageNet(encoder, self.preset, self.edm)
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.ema_net.encoder.vocab = self.vocab
        self.step = 0
        self.history: list[dict] = []
        self.train_time = 0.0
        self._window: list[float] = []
        self._stop_signal: int | None = None
        self._in_update = False

    # ---- properties -------------------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """Side of the generated / denoised images in px."""
        return self.preset.image_size

    @property
    def um_per_px(self) -> float | None:
        """Resolution of the model's images (tile side / image side)."""
        return None if self.tile_size_um is None else self.tile_size_um / self.image_size

    @property
    def encoder(self) -> GeneEncoder:
        """The gene encoder of :attr:`net`."""
        return self.net.encoder

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def genes(self) -> list[str]:
        """The vocabulary."""
        return self.vocab.genes

    def to(self, device: str | torch.device) -> DiffusionPretrainer:
        """Move the networks to ``device`` (``"auto"``: CUDA if available); returns self.

        Parameters
        ----------
        device
            ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... or a :class:`torch.device` (checked first).

        Returns
        -------
        DiffusionPretrainer
            ``self``, its network and EMA network on ``device``.
        """
        device = resolve_device(device, what="device")
        self.net.to(device)
        self.ema_net.to(device)
        return self

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        tile = f", tile {self.tile_size_um:g} µm" if self.tile_size_um else ""
        return (f"DiffusionPretrainer(preset={self.preset.name!r}, {self.image_size} px{tile}, {len(self.vocab)} "
                f"genes, {n / 1e6:.2f} M parameters, {self.step} steps trained)")

    def config(self) -> dict:
        """Everything needed to rebuild the model (JSON-ready).

        Returns
        -------
        dict
            ``format``, ``format_version``, ``dbk_version``, ``preset``, ``edm``, ``image_size``, ``tile_size_um``,
            ``um_per_px``, ``vocab``, ``encoder``, ``random_state``, ``step`` and ``train_time_s``: the
            ``config.json`` of :meth:`save`.
        """
        from .. import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dbk_version": __version__,
            "preset": self.preset.to_dict(),
            "edm": self.edm.to_dict(),
            "image_size": self.image_size,
            "tile_size_um": self.tile_size_um,
            "um_per_px": self.um_per_px,
            "vocab": self.vocab.to_dict(),
            "encoder": self.encoder.config(),
            "random_state": self.random_state,
            "step": self.step,
            "train_time_s": self.train_time,
        }


    # ---- training ---------------------------------------------------------------------------------------------

    def fit(
        self,
        data,
        *,
        genes: Sequence[str] | None = None,
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
    ) -> DiffusionPretrainer:
        """Train (or continue training) on tiles and their profiles; see :func:`dbk.tl.fit_pretrainer`.

        Genes of ``data`` not yet in the vocabulary are added (their embeddings start random).

        Parameters
        ----------
        data
            A SpatialData with tiles and their table, a :class:`~dbk.tl.TileArrays`, or a list of them (as
            :func:`dbk.tl.fit_pretrainer`).
        genes
            Genes to condition on (all genes of the tables when ``None``).
        max_steps
            Total optimizer steps of the model, counting those it already made, so a resumed run stops where the
            uninterrupted one would have (the preset's when neither this nor ``max_epochs`` is given).
        max_epochs, batch_size, lr, accelerator, devices, random_state, checkpoint_dir, resume, unlabeled_tiles_key, \
table_key, tiles_key, num_workers, callbacks, labeled_fraction, max_time, preload_max_bytes
            As in :func:`dbk.tl.fit_pretrainer`.

        Returns
        -------
        DiffusionPretrainer
            ``self``, trained; :attr:`history` gets the new ``{"step", "loss", "lr", "time", "data_wait"}``
            records and :attr:`stopped_by` says what ended the run.
        """
        from accelerate.utils import set_seed  # noqa: F401 - imported to fail early if accelerate is missing
        from tqdm.auto import tqdm

        resolve_device(accelerator)  # a bad name, or CUDA where there is none, fails before any tile is read
        if not (isinstance(resume, bool) or resume == "force"):
            raise ValueError(f"resume must be True, False or 'force', got {resume!r}.")
        datas = _as_list(data)
        seed = self.random_state if random_state is None else int(random_state)
        new = self._grow_vocab([g for sd in datas for g in _panel(sd, table_key, genes)])
        if new and self.step:
            logger.info(f"fit: {len(new)} new gene(s) added to the vocabulary (random embeddings): {new[:10]}.")
        if preload_max_bytes is not None and (isinstance(preload_max_bytes, bool) or int(preload_max_bytes) < 0):
            raise ValueError(f"preload_max_bytes must be a number of bytes >= 0, got {preload_max_bytes!r}.")
        sources = _build_sources(datas, vocab=self.vocab, image_size=self.image_size, genes=genes,
                                 table_key=table_key, tiles_key=tiles_key, unlabeled_tiles_key=unlabeled_tiles_key,
                                 preload_max_bytes=preload_max_bytes)
        dataset = _TileBatches(sources)
        self._check_tile_size(sources)
        if dataset.n_labeled == 0:
            logger.warning("fit: no tile has a profile; the model trains unconditionally only.")
        if self.preset.zscore and dataset.n_labeled and (self.step == 0 or new):
            # statistics of the training values; a model trained before keeps those of the genes it knew
            mean, std, cnt = dataset.value_stats(len(self.vocab))
            fresh = set(new) if self.step else set(self.vocab)
            seen = [i for i in np.flatnonzero(cnt > 0) if self.vocab.genes[i] in fresh]
            for enc in (self.encoder, self.ema_net.encoder):
                enc.set_value_stats([self.vocab.genes[i] for i in seen], mean[seen], std[seen])

        if labeled_fraction is not None and not 0.0 < float(labeled_fraction) < 1.0:
            raise ValueError(f"labeled_fraction must be in (0, 1), got {labeled_fraction!r}.")
        if max_time is not None and not float(max_time) > 0:
            raise ValueError(f"max_time must be a positive number of seconds, got {max_time!r}.")
        acc = _accelerator(accelerator, devices)
        device = train_device(acc, accelerator)
        self.to(device)
        p = self.preset
        if p.channels_last:
            self.net.to(memory_format=torch.channels_last)
        for name, v in (("batch_size", batch_size), ("max_steps", max_steps), ("max_epochs", max_epochs)):
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if lr is not None and not float(lr) > 0:
            raise ValueError(f"lr must be positive, got {lr!r}.")
        bsz = _batch_for_device(p, batch_size, device)
        if bsz * acc.num_processes > dataset.n:
            bsz = max(1, dataset.n // acc.num_processes)
            logger.warning(f"fit: only {dataset.n} tiles; batch size lowered to {bsz}.")
        base_lr = float(lr or p.lr)
        per_epoch = max(1, dataset.n // (bsz * acc.num_processes))
        if max_steps is None and max_epochs is None:
            max_steps = p.max_steps
        stop = min(x for x in (max_steps, None if max_epochs is None else max_epochs * per_epoch) if x is not None)

        optimizer = torch.optim.AdamW(self.net.parameters(), lr=base_lr, betas=(0.9, 0.99), weight_decay=0.0,
                                      foreach=True)
        ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        fingerprint = dataset.fingerprint()
        # the profiles' values too (names, counts and genes alike do not make the same data); written to checkpoints
        self._values_fingerprint = None if ckpt_dir is None else data_values_fingerprint(dataset)
        if ckpt_dir is not None and not resume and latest_checkpoint(ckpt_dir) is not None:
            # the folder keeps its newest checkpoints by step: a new run's lower steps would be the ones dropped
            raise ValueError(f"checkpoint_dir {ckpt_dir} holds checkpoints of an earlier run (the latest "
                             f"{latest_checkpoint(ckpt_dir).name}); resume=False trains from scratch, which needs an "
                             "empty folder: give another checkpoint_dir (dbk does not delete that run's checkpoints), "
                             "or resume=True to continue it.")
        if ckpt_dir is not None and resume:
            latest = latest_checkpoint(ckpt_dir)
            if latest is not None:
                self._load_checkpoint(latest, optimizer, seed=seed, fingerprint=fingerprint,
                                      other_data=resume == "force")
        net, optimizer = acc.prepare(self.net, optimizer)
        # torch.compile shares the parameters, so the saved state keeps its names; DBK_COMPILE_BACKEND (e.g. "eager")
        # lets a CPU test run the same path
        backend = os.environ.get("DBK_COMPILE_BACKEND")
        compiled = p.compile and (device.type == "cuda" or backend is not None)
        if p.compile and not compiled:
            logger.info("fit: the preset's torch.compile is used on CUDA only (compiling for a CPU costs minutes and "
                        "was not measured to help); training eagerly.")
        fwd = torch.compile(net, backend=backend or "inductor") if compiled else net
        if self.step >= stop:
            logger.info(f"fit: already trained {self.step} steps (max_steps={stop}); nothing to do.")
            return self

        workers = (0 if sources[0].images is not None else min(4, max(1, (os.cpu_count() or 2) - 1))) \
            if num_workers is None else int(num_workers)
        labeled = np.concatenate([np.arange(o, o + s.n) for o, s in zip(dataset.offsets, sources, strict=False)
                                  if s.ids is not None] + [np.zeros(0, np.int64)])
        balanced = labeled_fraction is not None and 0 < len(labeled) < dataset.n
        if labeled_fraction is not None and not balanced:
            logger.warning("fit: labeled_fraction needs tiles with and without profiles; batches are drawn "
                           "uniformly.")
        if balanced:
            n_lab = min(bsz - 1, max(1, round(bsz * float(labeled_fraction))))
            sampler = _BalancedStepSampler(labeled, np.setdiff1d(np.arange(dataset.n), labeled), bsz, n_lab,
                                           self.step, stop, seed, acc.process_index, acc.num_processes)
        else:
            sampler = _StepSampler(dataset.n, bsz, self.step, stop, seed, acc.process_index, acc.num_processes)
        loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers,
                                             pin_memory=device.type == "cuda",
                                             prefetch_factor=4 if workers else None)
        logger.info(
            f"fit: {dataset.n} tiles ({dataset.n_labeled} with profiles) from {len(datas)} slide(s), "
            f"{len(self.vocab)} genes, preset {p.name!r} ({self.image_size} px), batch {bsz} x "
            f"{acc.num_processes} device(s) on {device}, steps {self.step} -> {stop} ({per_epoch} per epoch)"
            + (f", {n_lab} of each batch with profiles" if balanced else "")
            + (f", at most {max_time:g} s" if max_time is not None else "") + "."
        )
        eta = expected_seconds(p, stop - self.step, bsz, device)
        if eta is not None:
            logger.info(f"fit: expected {eta[0] / 60:.1f} min ({eta[1]}).")
        callbacks = list(callbacks or [])
        cudnn_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = device.type == "cuda" or cudnn_benchmark  # fixed shapes: tuned kernels
        old_handlers = self._install_signal_handlers()
        pbar = tqdm(total=stop, initial=self.step, desc="stage 1", disable=not settings.progress or
                    not acc.is_main_process, dynamic_ncols=True)
        t_start, t_wait, t_logged = time.perf_counter(), 0.0, self.train_time
        t_line, first_step = t_start, self.step
        t_warm, warm_step = None, None  # the end of the first step: rates are measured from there
        remeasure_at = first_step + max(REMEASURE_MIN_STEPS + 1,
                                        min(REMEASURE_STEPS, math.ceil(REMEASURE_FRACTION * (stop - first_step))))
        images_per_step = bsz * acc.num_processes
        self.stopped_by = "max_steps"
        try:
            t0 = time.perf_counter()
            for batch in loader:
                t1 = time.perf_counter()
                t_wait += t1 - t0
                loss = self._train_step(fwd, optimizer, batch, seed=seed, base_lr=base_lr, acc=acc)
                self._window.append(loss)  # a device tensor: read (synchronised) only when logged
                pbar.update(1)
                t0 = time.perf_counter()
                self.train_time = t_logged + (t0 - t_start)
                out_of_time = max_time is not None and t0 - t_start >= max_time
                if self.step % p.log_every == 0 or self.step == stop or out_of_time:
                    self._log(base_lr, t_wait / max(t0 - t_start, 1e-9))
                    pbar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}")
                if t_warm is None:
                    t_warm, warm_step = t0, self.step
                measured = self.step - warm_step
                # seconds per step after the first (warm-up, compilation); over all steps until a second one is done
                per_step = (t0 - t_warm) / measured if measured else (t0 - t_start) / max(self.step - first_step, 1)
                left = (stop - self.step) * per_step
                if max_time is not None:
                    left = min(left, max(0.0, max_time - (t0 - t_start)))
                if remeasure_at is not None and self.step < stop and measured >= REMEASURE_MIN_STEPS \
                        and (self.step >= remeasure_at or t0 - t_warm >= REMEASURE_S):
                    remeasure_at = None  # once per fit
                    table = (f"; the preset table expected {eta[0] / 60:.1f} min in all ({eta[1]})"
                             if eta is not None else "")
                    logger.info(f"fit: step {self.step}/{stop} at {images_per_step / per_step:.3g} img/s "
                                f"(measured over steps {warm_step}-{self.step}), about {left / 60:.1f} min left"
                                f"{table}.")
                if t0 - t_line >= LOG_INTERVAL_S or self.step == stop:  # a line now and then, progress bars or not
                    t_line = t0
                    last = f", loss {self.history[-1]['loss']:.4f}" if self.history else ""
                    logger.info(f"fit: step {self.step}/{stop}{last}, {(t0 - t_start) / 60:.1f} min, about "
                                f"{left / 60:.1f} min left.")
                if ckpt_dir is not None and (self.step % p.checkpoint_every == 0 or self.step == stop or out_of_time):
                    self._save_checkpoint(ckpt_dir, optimizer, seed=seed, fingerprint=fingerprint, acc=acc)
                for cb in callbacks:
                    cb(self, {"step": self.step, "loss": float(loss), "lr": self._lr(base_lr), "data_wait": t_wait})
                if self._stop_signal is not None:
                    raise _Stop()
                if out_of_time:
                    self.stopped_by = "max_time"
                    logger.info(f"fit: stopped by max_time={max_time:g} s after step {self.step}.")
                    break
        except (KeyboardInterrupt, _Stop):
            signum = self._stop_signal
            if ckpt_dir is not None:
                path = self._save_checkpoint(ckpt_dir, optimizer, seed=seed, fingerprint=fingerprint, acc=acc)
                logger.warning(f"fit: interrupted after step {self.step}; checkpoint {path}. Run again with the "
                               "same checkpoint_dir and resume=True to continue.")
            else:
                logger.warning(f"fit: interrupted after step {self.step} (no checkpoint_dir, nothing saved).")
            self._restore_signal_handlers(old_handlers)
            old_handlers = None
            self._stop_signal = None
            if signum == signal.SIGTERM:
                signal.raise_signal(signal.SIGTERM)  # the previous handler decides (default: terminate)
            raise KeyboardInterrupt from None
        finally:
            pbar.close()
            torch.backends.cudnn.benchmark = cudnn_benchmark
            if old_handlers is not None:
                self._restore_signal_handlers(old_handlers)
            self.net.eval()
        return self

    def _grow_vocab(self, genes: Sequence[str]) -> list[str]:
        """Add genes to the vocabulary; both networks get the same new embedding rows. Returns the new genes."""
        n_old = self.encoder.embedding.num_embeddings
        new = self.vocab.add(genes)
        self.ema_net.encoder.vocab = self.vocab  # deepcopy gave the EMA copy its own vocabulary object
        if len(self.vocab) > n_old:  # also when the vocabulary object was grown by the user
            self.encoder.sync_vocab()
            self.ema_net.encoder.sync_vocab()
            with torch.no_grad():
                self.ema_net.encoder.embedding.weight[n_old:] = self.encoder.embedding.weight[n_old:]
        return new

    def _lr(self, base_lr: float) -> float:
        # not a LambdaLR: it computes base_lr * factor, which rounds differently from these two steps once the
        # inverse square-root decay is on (e.g. 28,887 of the "paper" preset's 200,001 learning rates differ)
        p, s = self.preset, self.step
        lr = base_lr * min(1.0, (s + 1) / max(p.warmup_steps, 1))
        if p.lr_decay_ref:
            lr /= math.sqrt(max(s / p.lr_decay_ref, 1.0))
        return lr

    def _train_step(self, net, optimizer, batch, *, seed: int, base_lr: float, acc) -> float:
        device = self.device  # where fit put the model: acc.device, or the one accelerator named ("cuda:1" ...)
        # the random draws of the whole (global) batch, from one seed per step, and this process's slice of them: n
        # processes with batch b draw exactly what one process with batch n * b draws (same weights, up to the order
        # of the gradient all-reduce)
        g = torch.Generator(device=device).manual_seed(_seed(seed, self.step, 0))
        x0 = batch["image"].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if self.preset.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        b, world = x0.shape[0], acc.num_processes
        mine = slice(acc.process_index * b, (acc.process_index + 1) * b)
        if self.preset.augment:
            x0 = _dihedral(x0, torch.randint(0, 8, (b * world,), generator=g, device=device)[mine])
        sigma = self.edm.sample_sigma(b * world, g, device)[mine]
        noise = torch.randn((b * world, *x0.shape[1:]), generator=g, device=device)[mine]
        if self.preset.channels_last:
            noise = noise.contiguous(memory_format=torch.channels_last)
        drop = (torch.rand(b * world, generator=g, device=device) < self.preset.cond_drop)[mine]
        net.train()
        with acc.autocast():
            denoised = net(x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, batch["ids"].to(device),
                           batch["values"].to(device), batch["mask"].to(device), drop)
        loss = edm_loss(self.edm, denoised, x0, sigma).mean()
        optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        if self.preset.grad_clip:
            acc.clip_grad_norm_(self.net.parameters(), self.preset.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = self._lr(base_lr)
        self._in_update = True
        try:
            optimizer.step()
            _ema_update(self.ema_net, self.net, min(self.preset.ema_decay, (1 + self.step) / (10 + self.step)))
            self.step += 1
        finally:
            self._in_update = False
        return acc.reduce(loss.detach(), "mean") if world > 1 else loss.detach()  # the global batch's loss

    def _log(self, base_lr: float, data_wait: float) -> None:
        if not self._window:
            return
        loss = float(torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in self._window]).mean())
        self.history.append({"step": self.step, "loss": loss, "lr": self._lr(base_lr),
                             "time": round(self.train_time, 3), "data_wait": round(float(data_wait), 4)})
        self._window = []

    def _check_tile_size(self, sources: list[_Source]) -> None:
        sizes = [s.tile_size_um for s in sources if s.tile_size_um is not None]
        if not sizes:
            return
        if self.tile_size_um is None:
            self.tile_size_um = float(np.median(sizes))
        off = [s.name for s in sources if s.tile_size_um and abs(s.tile_size_um / self.tile_size_um - 1) > 0.02]
        if off:
            logger.warning(f"Tiles of {off} differ in size from the model's {self.tile_size_um:g} µm; their images "
                           "are resampled to the same pixel size, so they show tissue at another scale.")

    # ---- interruption -----------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        self._stop_signal = None

        def handler(signum, frame):
            if signum == signal.SIGINT and self._stop_signal is not None and not self._in_update:
                raise KeyboardInterrupt  # second Ctrl-C: stop now
            self._stop_signal = signum

        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, handler)
            except (ValueError, OSError):  # pragma: no cover - platforms without the signal
                pass
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict | None) -> None:
        for s, h in (old or {}).items():
            signal.signal(s, h)

    # ---- save / load ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``config.json``, ``model.safetensors``, ``ema.safetensors``, ``history.json``.

        The folder is written beside the target and renamed into place, so an interrupted save leaves no partial
        model.

        Parameters
        ----------
        path
            The folder to write.
        overwrite
            Replace a folder already at ``path``, once the new one is complete, and only a dbk model folder holding
            nothing but what dbk wrote; without it an existing ``path`` raises :class:`FileExistsError`.

        Returns
        -------
        pathlib.Path
            The folder written.
        """
        return write_model_folder(
            path, format=FORMAT, format_version=FORMAT_VERSION, config=self.config(),
            tensors={fname: m.state_dict() for fname, m in zip(_WEIGHTS, (self.net, self.ema_net), strict=True)},
            files={"history.json": json.dumps(self.history)}, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> DiffusionPretrainer:
        """Load a model written by :meth:`save` onto ``device`` (``"auto"``: CUDA if available, else CPU).

        Parameters
        ----------
        path
            The folder :meth:`save` wrote (``~`` expanded).
        device
            Where the networks go: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... or a :class:`torch.device`.

        Returns
        -------
        DiffusionPretrainer
            The model with its weights, EMA weights, vocabulary and history, checked against the folder's checksums.

        Raises
        ------
        FileNotFoundError
            If ``path`` is not a folder with a ``config.json``.
        ValueError
            If the folder is not a saved pretrainer (or one from a newer dbk), a file is missing or corrupt
            (checksum), or the weights do not fit the configuration.
        """
        path = Path(os.path.expanduser(os.fspath(path)))
        config = read_model_folder(path, format=FORMAT, format_version=FORMAT_VERSION, what="DiffusionPretrainer",
                                   required=(*_WEIGHTS, "history.json"))
        cfg_path = path / "config.json"
        _check_config(path, config)
        try:
            model = cls(GeneVocab.from_dict(config["vocab"]), preset=PretrainerPreset.from_dict(config["preset"]),
                        tile_size_um=config.get("tile_size_um"), random_state=config.get("random_state", 0),
                        edm=EDM(**config["edm"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{cfg_path} does not describe a valid model: {err}") from None
        for fname, module in zip(_WEIGHTS, (model.net, model.ema_net), strict=True):
            try:
                module.load_state_dict(load_tensors(path, fname))
            except Exception as err:  # also a file safetensors cannot read
                raise ValueError(f"{path / fname} does not fit the model in {cfg_path}: {err}") from None
        model.step = int(config.get("step", 0))
        model.train_time = float(config.get("train_time_s", 0.0))
        history = json.loads((path / "history.json").read_text())
        if not isinstance(history, list):
            raise ValueError(f"{path / 'history.json'} is corrupt: expected a list of records.")
        model.history = history
        return model.to(device)


def _safetensors_data_bytes(file: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the 8-byte length and the JSON header)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return file.stat().st_size - 8 - n


def _check_config(path: Path, config: dict) -> None:
    """Types and sizes of a saved pretrainer's configuration, checked before any network is built.

    The network the configuration describes is built on the ``meta`` device (no memory) and its size compared with
    the tensor data of ``model.safetensors``: a configuration that would allocate more than the file holds is
    refused before anything is allocated.
    """
    cfg_path = path / "config.json"
    tile = config.get("tile_size_um")
    if tile is not None and not (isinstance(tile, (int, float)) and not isinstance(tile, bool)
                                 and math.isfinite(tile) and tile > 0):
        raise ValueError(f"{cfg_path}: tile_size_um is {tile!r}; expected null or a finite number of µm > 0.")
    vocab = config.get("vocab")
    genes = vocab.get("genes") if isinstance(vocab, dict) else None
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
        raise ValueError(f"{cfg_path}: vocab.genes is not a non-empty list of gene names (strings).")
    for key in ("preset", "edm"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{cfg_path}: {key} is {type(config.get(key)).__name__}; expected a mapping.")
    try:
        preset = PretrainerPreset.from_dict(config["preset"])
        chans = [int(c) for c in preset.block_out_channels]
        if preset.image_size > 4096 or any(c <= 0 for c in chans):
            raise ValueError(f"image_size {preset.image_size} (at most 4096) or block_out_channels {chans}")
        with torch.device("meta"):
            encoder = GeneEncoder(GeneVocab.from_dict(vocab), dim=preset.gene_dim, n_layers=preset.gene_layers,
                                  n_heads=preset.gene_heads, zscore=preset.zscore)
            net = GeneToImageNet(encoder, preset, EDM(**config["edm"]))
        need = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{cfg_path} does not describe a valid model: {err}") from None
    have = _safetensors_data_bytes(path / _WEIGHTS[0])
    if need > have * 1.01 + 4096:
        raise ValueError(f"{cfg_path} describes a network of {need:,} bytes of weights, but {path / _WEIGHTS[0]} "
                         f"holds {have:,}: the configuration was changed after saving.")
