"""Stage 1: the gene-to-image conditional diffusion pretrainer (training, sampling, evaluation, save / load)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .._constants import TILES_KEY, TILES_TABLE_KEY
from .._logging import logger
from .._settings import settings
from ._edm import EDM, edm_loss, heun_sample, precondition
from ._gene_encoder import GeneEncoder
from ._presets import PretrainerPreset, auto_preset_for, batch_for_memory, expected_seconds, get_preset
from ._vocab import GeneVocab

FORMAT = "dbk.DiffusionPretrainer"
FORMAT_VERSION = 1
CHECKPOINT_FORMAT = "dbk.DiffusionPretrainer.checkpoint"
_CKPT_PREFIX = "checkpoint-"
_KEEP_CHECKPOINTS = 2
_PRELOAD_MAX_BYTES = 2 * 1024**3  # tiles read once into memory below this; streamed by DataLoader workers above


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (a counter-based stream: the same parts give the same seed everywhere)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    device = settings.device if device in (None, "auto") else device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---- the network ---------------------------------------------------------------------------------------------------


class GeneToImageNet(nn.Module):
    """The EDM denoiser ``D(x; sigma, genes)``: a diffusers ``UNet2DModel`` whose noise embedding gets the gene vector.

    The gene encoder's vector is projected to the U-Net's time-embedding width and passed as ``class_labels`` of a
    ``UNet2DModel(class_embed_type="identity")``, which adds it to the embedding of ``c_noise`` that modulates every
    residual block. A learned null vector stands in for the condition of unconditioned samples.
    """

    def __init__(self, encoder: GeneEncoder, preset: PretrainerPreset, edm: EDM) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.edm = edm
        self.encoder = encoder
        chans = list(preset.block_out_channels)
        attn = [c for c, t in zip(chans, preset.down_block_types, strict=True) if t.startswith("Attn")] + chans[-1:]
        bad = [c for c in attn if c % preset.attention_head_dim]
        if bad or any(c % preset.norm_num_groups for c in chans):
            raise ValueError(f"block_out_channels {tuple(chans)} must be multiples of norm_num_groups "
                             f"({preset.norm_num_groups}), and of attention_head_dim ({preset.attention_head_dim}) "
                             "where there is self-attention (attention blocks and the last level).")
        self.unet = UNet2DModel(
            sample_size=preset.image_size,
            in_channels=3,
            out_channels=3,
            time_embedding_type="positional",
            block_out_channels=tuple(preset.block_out_channels),
            down_block_types=tuple(preset.down_block_types),
            up_block_types=tuple(preset.up_block_types),
            layers_per_block=preset.layers_per_block,
            attention_head_dim=preset.attention_head_dim,
            norm_num_groups=preset.norm_num_groups,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
        )
        temb = self.unet.time_embedding.linear_2.out_features
        # not zero-initialised: like a class embedding, the condition must move the U-Net from the first step, or
        # the network settles on a constant offset and the gene pathway gets almost no gradient
        self.cond_proj = nn.Sequential(nn.Linear(encoder.dim, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.null_cond = nn.Parameter(torch.randn(temb) / math.sqrt(temb))

    def condition(self, batch_size: int, ids=None, values=None, mask=None, drop=None) -> torch.Tensor:
        """(B, temb) vectors added to the noise embedding; the null vector where ``drop`` or a row has no gene."""
        null = self.null_cond.unsqueeze(0).expand(batch_size, -1)
        if ids is None:
            return null
        cond = self.cond_proj(self.encoder(ids, values, mask))
        use_null = ~mask.bool().any(dim=1)
        if drop is not None:
            use_null = use_null | drop.bool()
        return torch.where(use_null.unsqueeze(1), null.to(cond.dtype), cond)

    def forward(self, x, sigma, ids=None, values=None, mask=None, drop=None) -> torch.Tensor:
        """Denoised images ``D(x; sigma)`` (images in [-1, 1]); unconditioned when ``ids`` is ``None``."""
        emb = self.condition(x.shape[0], ids, values, mask, drop)
        return precondition(self.edm, lambda x_in, c_noise: self.unet(x_in, c_noise, class_labels=emb).sample, x,
                            sigma)


def _ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    with torch.no_grad():
        pe = [p for p in ema.parameters()]
        pn = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(pe, pn, 1.0 - beta)
        for be, bn in zip(ema.buffers(), net.buffers(), strict=True):
            be.copy_(bn)


# ---- training data -------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """The tiles of one slide (one tiles element), with or without profiles."""

    name: str
    n: int
    tile_size_um: float | None
    images: np.ndarray | None = None  # (n, S, S, 3) uint8, when read into memory
    reader: object = None  # a TileDataset, otherwise
    ids: np.ndarray | None = None  # (G,) vocabulary ids of the table columns used; None: no profiles
    x: np.ndarray | sp.csr_matrix | None = None  # (n, G) values
    measured: np.ndarray | None = None  # (n, G) bool; None: all measured


def _rows(mat, rows: np.ndarray) -> np.ndarray:
    out = mat[rows]
    return out.toarray() if sp.issparse(out) else np.asarray(out)


class _TileBatches(torch.utils.data.Dataset):
    """Batches of tiles from several sources: ``dataset[indices]`` -> a dict of tensors (one item per batch)."""

    def __init__(self, sources: list[_Source]) -> None:
        self.sources = sources
        self.offsets = np.cumsum([0] + [s.n for s in sources])
        self.n = int(self.offsets[-1])
        self.length = max([len(s.ids) for s in sources if s.ids is not None] + [1])
        self.n_labeled = sum(s.n for s in sources if s.ids is not None)

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.sources:
            h.update(json.dumps([s.name, s.n, None if s.ids is None else s.ids.tolist()]).encode())
        return h.hexdigest()[:16]

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        src = np.searchsorted(self.offsets, indices, side="right") - 1
        b = len(indices)
        first = self.sources[src[0]]
        size = first.images.shape[1] if first.images is not None else first.reader.size_px
        images = np.empty((b, size, size, 3), np.uint8)
        ids = np.zeros((b, self.length), np.int64)
        values = np.zeros((b, self.length), np.float32)
        mask = np.zeros((b, self.length), bool)
        for k in np.unique(src):
            pos = np.flatnonzero(src == k)
            s = self.sources[k]
            local = indices[pos] - self.offsets[k]
            if s.images is not None:
                images[pos] = s.images[local]
            else:
                images[pos] = np.stack([s.reader.read(int(i)) for i in local])
            if s.ids is not None:
                g = len(s.ids)
                ids[pos, :g] = s.ids
                values[pos, :g] = _rows(s.x, local)
                mask[pos, :g] = True if s.measured is None else s.measured[local]
        return {
            "image": torch.from_numpy(images).permute(0, 3, 1, 2),
            "ids": torch.from_numpy(ids),
            "values": torch.from_numpy(np.nan_to_num(values)),
            "mask": torch.from_numpy(mask & np.isfinite(values)),
        }

    def value_stats(self, n_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-vocabulary-gene mean and std over the tiles where the gene was measured, and the count."""
        s1, s2, cnt = np.zeros(n_vocab), np.zeros(n_vocab), np.zeros(n_vocab)
        for s in self.sources:
            if s.ids is None:
                continue
            x = s.x.toarray() if sp.issparse(s.x) else np.asarray(s.x, dtype=np.float64)
            m = np.ones(x.shape, bool) if s.measured is None else s.measured
            m = m & np.isfinite(x)
            x = np.where(m, x, 0.0)
            np.add.at(s1, s.ids, x.sum(0))
            np.add.at(s2, s.ids, (x**2).sum(0))
            np.add.at(cnt, s.ids, m.sum(0))
        mean = np.divide(s1, cnt, out=np.zeros(n_vocab), where=cnt > 0)
        var = np.divide(s2, cnt, out=np.ones(n_vocab), where=cnt > 0) - mean**2
        return mean, np.sqrt(np.maximum(var, 0.0)), cnt


class _StepSampler(torch.utils.data.Sampler):
    """Index batches for steps ``start .. stop - 1``: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Batch contents depend only on the step number, so a resumed run sees exactly the batches it would have seen.
    With several processes each takes its slice of the global batch.
    """

    def __init__(self, n: int, batch_size: int, start: int, stop: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.b, self.start, self.stop, self.seed = n, batch_size, start, stop, seed
        self.rank, self.world = rank, world
        self.per_epoch = max(1, n // (batch_size * world))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        perm, epoch = None, None
        gb = self.b * self.world
        for step in range(self.start, self.stop):
            e, j = divmod(step, self.per_epoch)
            if e != epoch:
                perm, epoch = np.random.default_rng([self.seed, e]).permutation(self.n), e
            glob = perm[j * gb : (j + 1) * gb]
            if len(glob) < gb:  # fewer tiles than one global batch: cycle
                glob = np.resize(perm, gb)
            yield glob[self.rank * self.b : (self.rank + 1) * self.b]


@dataclass
class TileArrays:
    """Tiles of one slide held as arrays: what the torch core trains on where no SpatialData is at hand.

    :func:`fit_pretrainer`, :meth:`DiffusionPretrainer.fit` and :meth:`DiffusionPretrainer.evaluate` take these
    (alone, in a list, or mixed with SpatialData objects), so stage 1 trains on a bare GPU node from exported tiles
    (``dbk.pp.export_tiles``) without spatialdata, geopandas or dask installed.

    Parameters
    ----------
    images
        (n, S, S, 3) uint8 RGB tiles; resampled (bilinear, antialiased) to the model's ``image_size`` when S differs.
    X
        (n, G) profiles (log1p-normalised, like ``X`` of the tile table), dense or scipy sparse; ``None`` for tiles
        without expression (trained unconditionally).
    genes
        The G gene symbols of the columns of ``X``.
    measured
        (n, G) bool: which genes were measured on each tile (``None``: all).
    name
        Slide name (in logs).
    tile_size_um
        Side of the tiles in µm (recorded by the model; ``None``: unknown).
    """

    images: np.ndarray
    X: np.ndarray | sp.spmatrix | None = None
    genes: Sequence[str] | None = None
    measured: np.ndarray | None = None
    name: str = "arrays"
    tile_size_um: float | None = None

    def __post_init__(self) -> None:
        im = self.images
        if not isinstance(im, np.ndarray) or im.ndim != 4 or im.shape[-1] != 3 or im.shape[1] != im.shape[2]:
            raise ValueError(f"TileArrays {self.name!r}: images must be an (n, S, S, 3) array, got "
                             f"{getattr(im, 'shape', type(im).__name__)}.")
        if im.dtype != np.uint8:
            raise ValueError(f"TileArrays {self.name!r}: images must be uint8 (0-255), got {im.dtype}.")
        n = im.shape[0]
        if self.X is None:
            if self.genes is not None or self.measured is not None:
                raise ValueError(f"TileArrays {self.name!r}: genes / measured given without X.")
            return
        if self.genes is None:
            raise ValueError(f"TileArrays {self.name!r}: X needs genes (its column names).")
        self.genes = [str(g) for g in self.genes]
        if self.X.ndim != 2 or self.X.shape != (n, len(self.genes)):
            raise ValueError(f"TileArrays {self.name!r}: X must be (n_tiles, n_genes) = ({n}, {len(self.genes)}), "
                             f"got {self.X.shape}.")
        if len(set(self.genes)) != len(self.genes):
            raise ValueError(f"TileArrays {self.name!r}: gene names are not unique.")
        if self.measured is not None:
            self.measured = np.asarray(self.measured, bool)
            if self.measured.shape != self.X.shape:
                raise ValueError(f"TileArrays {self.name!r}: measured must have the shape of X {self.X.shape}, got "
                                 f"{self.measured.shape}.")
        if self.tile_size_um is not None and not (np.isfinite(self.tile_size_um) and self.tile_size_um > 0):
            raise ValueError(f"TileArrays {self.name!r}: tile_size_um must be positive, got {self.tile_size_um!r}.")

    def __len__(self) -> int:
        return int(self.images.shape[0])


class _BalancedStepSampler(torch.utils.data.Sampler):
    """Like :class:`_StepSampler`, with a fixed share of each batch drawn from the tiles that have a profile.

    Labelled and unlabelled tiles run through their own seeded permutations (epochs counted per pool), so the
    labelled tiles, often a few percent of a dense grid, fill ``n_labeled`` places of every batch instead of their
    share of the data. Batch contents depend only on the step number (exact resume).
    """

    def __init__(self, labeled: np.ndarray, unlabeled: np.ndarray, batch_size: int, n_labeled: int, start: int,
                 stop: int, seed: int, rank: int = 0, world: int = 1):
        self.pools = [(np.asarray(labeled), int(n_labeled)), (np.asarray(unlabeled), int(batch_size - n_labeled))]
        self.start, self.stop, self.seed, self.rank, self.world = start, stop, seed, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _draw(self, pool: int, step: int) -> np.ndarray:
        idx, k = self.pools[pool]
        if k == 0:
            return idx[:0]
        gk = k * self.world
        per_epoch = max(1, len(idx) // gk)
        e, j = divmod(step, per_epoch)
        perm = idx[np.random.default_rng([self.seed, 7 + pool, e]).permutation(len(idx))]
        glob = perm[j * gk : (j + 1) * gk]
        if len(glob) < gk:
            glob = np.resize(perm, gk)
        return glob[self.rank * k : (self.rank + 1) * k]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield np.concatenate([self._draw(0, step), self._draw(1, step)])


def _as_list(data) -> list:
    from .._utils import is_sdata

    if is_sdata(data) or isinstance(data, TileArrays):
        return [data]
    if isinstance(data, dict):
        data = list(data.values())
    data = list(data) if isinstance(data, (list, tuple)) else None
    if not data or not all(is_sdata(d) or isinstance(d, TileArrays) for d in data):
        raise TypeError("data must be a SpatialData or a dbk.tl.TileArrays, or a non-empty list of them.")
    return data


def _resample(images: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S, 3) uint8 -> (n, size, size, 3) uint8 (bilinear, antialiased; unchanged when S == size)."""
    if images.shape[1] == size:
        return images
    out = np.empty((images.shape[0], size, size, 3), np.uint8)
    for s in range(0, len(images), 256):
        t = torch.from_numpy(np.ascontiguousarray(images[s : s + 256])).permute(0, 3, 1, 2).float()
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out[s : s + 256] = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _tile_size_um(sdata, tiles_key: str, image_key: str | None) -> float | None:
    from .._image import get_pixel_size
    from ..pp._tiles import tile_bounds

    b = tile_bounds(sdata, tiles_key)
    try:
        px = get_pixel_size(sdata, image_key)
    except ValueError:
        return None
    return float(np.median(b[:, 2] - b[:, 0])) * px


def _panel(sdata, table_key: str, genes: Sequence[str] | None) -> list[str]:
    if isinstance(sdata, TileArrays):
        names = [] if sdata.genes is None else list(sdata.genes)
    elif table_key not in sdata.tables:
        return []
    else:
        names = [str(g) for g in sdata.tables[table_key].var_names]
    if genes is None:
        return names
    keep = set(names)
    return [g for g in genes if g in keep]


def _build_sources(datas, *, vocab: GeneVocab, image_size: int, genes, table_key, tiles_key, unlabeled_tiles_key,
                   labeled_only: bool = False) -> list[_Source]:
    """One source per (slide, tiles element); tiles are read into memory when they fit the budget."""
    from tqdm.auto import tqdm

    plan, arrays = [], []
    for i, sdata in enumerate(datas):
        if isinstance(sdata, TileArrays):
            panel = _panel(sdata, table_key, genes)
            if sdata.X is not None and not panel:
                logger.warning(f"Slide {sdata.name!r}: none of the chosen genes is in its profiles; its tiles train "
                               "unconditioned.")
            if panel or not labeled_only:
                arrays.append((sdata, panel))
            continue
        name = str(sdata.attrs.get("sample", f"slide{i}"))
        image_key = None
        if tiles_key in sdata.shapes:
            image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key")
            panel = _panel(sdata, table_key, genes)
            if table_key in sdata.tables and not panel:
                logger.warning(f"Slide {name!r}: none of the chosen genes is in its table; its tiles train "
                               "unconditioned.")
            if panel or not labeled_only:
                plan.append((sdata, name, tiles_key, image_key, panel))
        elif unlabeled_tiles_key is None or unlabeled_tiles_key not in sdata.shapes:
            raise KeyError(f"Slide {name!r} has no tiles {tiles_key!r} (run dbk.pp.make_tiles) and no "
                           f"unlabeled tiles {unlabeled_tiles_key!r}.")
        if not labeled_only and unlabeled_tiles_key is not None and unlabeled_tiles_key in sdata.shapes:
            ukey = sdata.shapes[unlabeled_tiles_key].attrs.get("dbk", {}).get("image_key", image_key)
            plan.append((sdata, f"{name}:{unlabeled_tiles_key}", unlabeled_tiles_key, ukey, []))
    if not plan and not arrays:
        raise ValueError(f"No tiles with a profile in table {table_key!r} found in the data.")
    sources = [_array_source(a, panel, vocab, image_size) for a, panel in arrays]
    if not plan:
        return sources
    from ..pp._dataset import TileDataset  # the SpatialData stack, only for SpatialData inputs

    readers = [TileDataset(sd, key, image_key=ik, size_px=image_size) for sd, _, key, ik, _ in plan]
    total = sum(len(r) for r in readers) * image_size * image_size * 3
    preload = total <= _PRELOAD_MAX_BYTES
    for (sdata, name, key, image_key, panel), reader in zip(plan, readers, strict=True):
        src = _Source(name=name, n=len(reader), tile_size_um=_tile_size_um(sdata, key, reader.image_key))
        if preload:
            it = tqdm(range(len(reader)), desc=f"reading tiles of {name}", disable=not settings.progress,
                      leave=False)
            src.images = np.stack([reader.read(i) for i in it]) if len(reader) else np.zeros(
                (0, image_size, image_size, 3), np.uint8)
        else:
            src.reader = reader
        if panel:
            rows_ds = TileDataset(sdata, key, image_key=image_key, size_px=image_size, table_key=table_key,
                                  genes=panel)
            src.ids = vocab.ids(panel)
            src.x = rows_ds.expr
            m = rows_ds.mask > 0
            src.measured = None if m.all() else m
        sources.append(src)
    if not preload:
        logger.info(f"{total / 1024**3:.1f} GiB of tiles: streaming them with DataLoader workers instead of "
                    "reading them into memory.")
    return sources


def _array_source(a: TileArrays, panel: list[str], vocab: GeneVocab, image_size: int) -> _Source:
    src = _Source(name=a.name, n=len(a), tile_size_um=a.tile_size_um, images=_resample(a.images, image_size))
    if panel:
        cols = [a.genes.index(g) for g in panel]
        src.ids = vocab.ids(panel)
        x = a.X[:, cols]
        src.x = x.tocsr() if sp.issparse(x) else np.asarray(x, np.float32)
        if a.measured is not None and not a.measured[:, cols].all():
            src.measured = a.measured[:, cols]
    return src


# ---- the model object ----------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside the training loop after a signal asked it to stop."""


class DiffusionPretrainer:
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
        Seed of the initial weights (and the default seed of :meth:`fit`).
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
        """Move the networks to ``device`` (``"auto"``: CUDA if available); returns self."""
        device = _resolve_device(device)
        self.net.to(device)
        self.ema_net.to(device)
        return self

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        tile = f", tile {self.tile_size_um:g} µm" if self.tile_size_um else ""
        return (f"DiffusionPretrainer(preset={self.preset.name!r}, {self.image_size} px{tile}, {len(self.vocab)} "
                f"genes, {n / 1e6:.2f} M parameters, {self.step} steps trained)")

    def config(self) -> dict:
        """Everything needed to rebuild the model (JSON-ready)."""
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

    def _architecture(self) -> dict:
        c = self.config()
        return {k: c[k] for k in ("image_size", "vocab", "encoder", "edm")} | {
            "preset": {k: c["preset"][k] for k in PretrainerPreset.ARCHITECTURE}
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
        resume: bool = True,
        unlabeled_tiles_key: str | None = None,
        table_key: str = TILES_TABLE_KEY,
        tiles_key: str = TILES_KEY,
        num_workers: int | None = None,
        callbacks: Sequence[Callable[[DiffusionPretrainer, dict], None]] | None = None,
        labeled_fraction: float | None = None,
        max_time: float | None = None,
    ) -> DiffusionPretrainer:
        """Train (or continue training) on tiles and their profiles; see :func:`dbk.tl.fit_pretrainer`.

        Genes of ``data`` not yet in the vocabulary are added (their embeddings start random). ``max_steps`` counts
        all steps of the model, so a resumed run stops where the uninterrupted one would have.
        """
        from accelerate.utils import set_seed  # noqa: F401 - imported to fail early if accelerate is missing
        from tqdm.auto import tqdm

        datas = _as_list(data)
        seed = self.random_state if random_state is None else int(random_state)
        new = self._grow_vocab([g for sd in datas for g in _panel(sd, table_key, genes)])
        if new and self.step:
            logger.info(f"fit: {len(new)} new gene(s) added to the vocabulary (random embeddings): {new[:10]}.")
        sources = _build_sources(datas, vocab=self.vocab, image_size=self.image_size, genes=genes,
                                 table_key=table_key, tiles_key=tiles_key, unlabeled_tiles_key=unlabeled_tiles_key)
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
        device = acc.device
        self.to(device)
        p = self.preset
        if p.channels_last:
            self.net.to(memory_format=torch.channels_last)
        for name, v in (("batch_size", batch_size), ("max_steps", max_steps), ("max_epochs", max_epochs)):
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if lr is not None and not float(lr) > 0:
            raise ValueError(f"lr must be positive, got {lr!r}.")
        bsz = int(batch_size or p.batch_size)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            fits = batch_for_memory(p, bsz, total)
            if fits < bsz and batch_size is None:
                logger.warning(f"fit: batch {bsz} of preset {p.name!r} needs more than this card's {total:.0f} GiB "
                               f"(measured memory per tile); batch lowered to {fits}. Pass batch_size= to override.")
                bsz = fits
            elif fits < bsz:
                logger.warning(f"fit: batch_size={bsz} may not fit this card's {total:.0f} GiB (about {fits} would, "
                               "from the measured memory per tile).")
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
        if ckpt_dir is not None and resume:
            latest = latest_checkpoint(ckpt_dir)
            if latest is not None:
                self._load_checkpoint(latest, optimizer, seed=seed, fingerprint=fingerprint)
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
        p, s = self.preset, self.step
        lr = base_lr * min(1.0, (s + 1) / max(p.warmup_steps, 1))
        if p.lr_decay_ref:
            lr /= math.sqrt(max(s / p.lr_decay_ref, 1.0))
        return lr

    def _train_step(self, net, optimizer, batch, *, seed: int, base_lr: float, acc) -> float:
        device = acc.device
        g = torch.Generator(device=device).manual_seed(_seed(seed, self.step, acc.process_index))
        x0 = batch["image"].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if self.preset.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        b = x0.shape[0]
        if self.preset.augment:
            x0 = _dihedral(x0, torch.randint(0, 8, (b,), generator=g, device=device))
        sigma = self.edm.sample_sigma(b, g, device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        drop = torch.rand(b, generator=g, device=device) < self.preset.cond_drop
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
        return loss.detach()

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

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def _save_checkpoint(self, ckpt_dir: Path, optimizer, *, seed: int, fingerprint: str, acc) -> Path | None:
        from .._utils import atomic_path

        path = ckpt_dir / f"{_CKPT_PREFIX}{self.step:09d}.pt"
        if acc.is_main_process:
            state = {
                "format": CHECKPOINT_FORMAT,
                "config": json.dumps(self.config()),
                "architecture": json.dumps(self._architecture()),
                "step": self.step,
                "seed": seed,
                "fingerprint": fingerprint,
                "net": _cpu_state(self.net),
                "ema": _cpu_state(self.ema_net),
                "optimizer": optimizer.state_dict(),
                "history": json.dumps(self.history),
                "window": torch.tensor([float(v) for v in self._window], dtype=torch.float64),
                "train_time": self.train_time,
                "torch_rng": torch.get_rng_state(),
            }
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            for old in sorted(ckpt_dir.glob(f"{_CKPT_PREFIX}*.pt"))[:-_KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)
        acc.wait_for_everyone()
        return path

    def _load_checkpoint(self, path: Path, optimizer, *, seed: int, fingerprint: str) -> None:
        state = _read_checkpoint(path)
        arch = json.loads(state["architecture"])
        mine = self._architecture()
        if arch != mine:
            diff = sorted(k for k in mine if arch.get(k) != mine[k])
            raise ValueError(f"Checkpoint {path} was written by a different model (differs in {diff}); use another "
                             "checkpoint_dir or resume=False.")
        if state["seed"] != seed:
            logger.warning(f"Resuming {path} written with random_state={state['seed']} using {seed}.")
        if state["fingerprint"] != fingerprint:
            logger.warning(f"Resuming {path} on different data than it was trained on.")
        self.net.load_state_dict(state["net"])
        self.ema_net.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        self._window = [float(v) for v in state["window"]]
        self.train_time = float(state["train_time"])
        self.tile_size_um = json.loads(state["config"]).get("tile_size_um", self.tile_size_um)
        torch.set_rng_state(state["torch_rng"])
        logger.info(f"fit: resumed from {path} at step {self.step}.")

    # ---- inference --------------------------------------------------------------------------------------------

    def _model(self, use_ema: bool) -> GeneToImageNet:
        m = self.ema_net if use_ema else self.net
        m.eval()
        return m

    def _as_images(self, images) -> torch.Tensor:
        """uint8 images (N, H, W, 3) array or (N, 3, H, W) tensor -> float (N, 3, H, W) in [-1, 1]."""
        if isinstance(images, torch.Tensor):
            t = images
            if t.ndim == 4 and t.shape[-1] == 3 and t.shape[1] != 3:
                t = t.permute(0, 3, 1, 2)
        else:
            arr = np.asarray(images)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {arr.shape}.")
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
        if t.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0-255), got {t.dtype}.")
        if tuple(t.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(t.shape[2:])} px; this model works on {self.image_size} px tiles "
                             "(read them with dbk.pp.TileDataset(size_px=model.image_size)).")
        return t.float().div(127.5).sub(1.0)

    def _tokens(self, profiles, n: int, device) -> dict | None:
        if profiles is None:
            return None
        self._grow_vocab(())
        tok = self.encoder.tokenize(profiles, device=device)
        if tok["ids"].shape[0] != n:
            raise ValueError(f"{tok['ids'].shape[0]} profiles for {n} images.")
        return tok

    @torch.no_grad()
    def denoising_loss(
        self,
        images,
        profiles=None,
        *,
        sigma: float,
        random_state: int = 0,
        use_ema: bool = True,
        batch_size: int = 64,
    ) -> np.ndarray:
        """Per-image mean squared error of the denoiser at one noise level (images scaled to [-1, 1]).

        The noise of image ``i`` is seeded by ``(random_state, i)``, so a conditional and an unconditional call on
        the same images see the same noise: their difference is what the genes tell about the image.

        Parameters
        ----------
        images
            (N, H, W, 3) uint8 array (as :meth:`generate` returns) or (N, 3, H, W) uint8 tensor.
        profiles
            N profiles (anything :meth:`generate` accepts); ``None`` for the unconditional loss.
        sigma
            Noise level.
        random_state
            Seed of the noise.
        use_ema
            Use the EMA weights.
        batch_size
            Images per forward pass.

        Returns
        -------
        (N,) float array; multiply by ``(sigma^2 + 0.25) / (0.5 sigma)^2`` for the EDM-weighted training loss.
        """
        n = self._as_images(images).shape[0]
        tok = self._tokens(profiles, n, self.device)
        if tok is not None:
            tok = {k: tok[k] for k in ("ids", "values", "mask")}
        return self._loss_tokens(images, tok, float(sigma), random_state, use_ema, batch_size)

    @torch.no_grad()
    def generate(
        self,
        profiles,
        *,
        n_steps: int = 18,
        guidance: float = 1.0,
        random_state: int = 0,
        use_ema: bool = True,
        batch_size: int = 64,
        s_churn: float = 0.0,
    ) -> np.ndarray:
        """Generate tiles from expression profiles with the EDM Heun sampler and classifier-free guidance.

        Parameters
        ----------
        profiles
            An AnnData (rows = profiles; its ``measured`` layer marks each row's panel), a DataFrame (NaN = not
            measured), a Series or ``{gene: value}`` dict, a ``(genes, values)`` pair, a list of those with ``None``
            for unconditional samples, or an int ``n`` for ``n`` unconditional samples. Values are log1p-normalised
            (like ``X`` of the tile table); genes not in the vocabulary are dropped with a warning.
        n_steps
            Sampler steps (each two network evaluations but the last).
        guidance
            Classifier-free guidance weight ``w``: ``D = D_uncond + w (D_cond - D_uncond)``; 1 is plain conditional
            sampling, 0 unconditional, > 1 strengthens the genes' effect.
        random_state
            Sample ``i`` starts from noise seeded by ``(random_state, i)`` (independent of ``batch_size``).
        use_ema
            Use the EMA weights.
        batch_size
            Samples per batch.
        s_churn
            EDM stochasticity (0: deterministic ODE sampler).

        Returns
        -------
        (N, image_size, image_size, 3) uint8 RGB tiles.
        """
        _check_batch_size(batch_size)
        model = self._model(use_ema)
        device = self.device
        if isinstance(profiles, (int, np.integer)):
            profiles = [None] * int(profiles)
        self._grow_vocab(())
        tok = self.encoder.tokenize(profiles, device=device)
        n = tok["ids"].shape[0]
        shape = (n, 3, self.image_size, self.image_size)
        noise = _per_sample_noise(shape, random_state, 0)
        churn = [torch.Generator().manual_seed(_seed(random_state, i, 1)) for i in range(n)]
        sigmas = self.edm.schedule(n_steps, device)
        out = np.empty((n, self.image_size, self.image_size, 3), np.uint8)
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            b = e - s
            kw = {k: tok[k][s:e] for k in ("ids", "values", "mask")}
            emb_c = model.condition(b, **kw)
            emb_u = model.condition(b)

            def unet(x_in, c_noise, emb):
                return model.unet(x_in, c_noise, class_labels=emb).sample

            def denoise(x, sig, emb_c=emb_c, emb_u=emb_u):
                if guidance == 1.0:
                    return precondition(self.edm, lambda xi, cn: unet(xi, cn, emb_c), x, sig)
                if guidance == 0.0:
                    return precondition(self.edm, lambda xi, cn: unet(xi, cn, emb_u), x, sig)
                both = precondition(self.edm, lambda xi, cn: unet(xi, cn, torch.cat([emb_c, emb_u])),
                                    torch.cat([x, x]), torch.cat([sig, sig]))
                d_c, d_u = both.chunk(2)
                return d_u + guidance * (d_c - d_u)

            gens = churn[s:e]

            def randn_like(x, gens=gens):
                return torch.stack([torch.randn(x.shape[1:], generator=gg) for gg in gens]).to(x.device)

            x = heun_sample(denoise, noise[s:e].to(device), sigmas, s_churn=s_churn, randn_like=randn_like)
            img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
            out[s:e] = img.cpu().numpy()
        return out

    def evaluate(
        self,
        data,
        *,
        sigmas: Sequence[float] = (0.5, 1.0),
        random_state: int = 0,
        max_tiles: int | None = 512,
        use_ema: bool = True,
        genes: Sequence[str] | None = None,
        table_key: str = TILES_TABLE_KEY,
        tiles_key: str = TILES_KEY,
    ):
        """Does the model use the genes? Denoising loss with the tile's profile, without, and with another tile's.

        Evaluate on held-out slides (or tiles). All losses use the same noise (seeded by ``random_state``); a
        conditional loss clearly below the unconditional one means the profiles inform the image, and a loss with the
        tile's own profile below the one with a profile shuffled from another tile means the information is
        tile-specific (not only the slide's average composition).

        Returns
        -------
        DataFrame with one row per sigma: ``sigma``, ``loss_cond`` (own profile), ``loss_uncond`` (no profile),
        ``loss_shuffled`` (each tile conditioned on the profile of another tile of the evaluated set, a random
        derangement seeded by ``random_state``), as mean per-pixel MSE in [-1, 1] units; ``gain``
        (``1 - loss_cond / loss_uncond``), ``gain_shuffled`` (``1 - loss_shuffled / loss_uncond``) and ``n_tiles``.
        """
        import pandas as pd

        sources = _build_sources(_as_list(data), vocab=self.vocab, image_size=self.image_size, genes=genes,
                                 table_key=table_key, tiles_key=tiles_key, unlabeled_tiles_key=None,
                                 labeled_only=True)
        ds = _TileBatches([s for s in sources if s.ids is not None])
        idx = np.arange(ds.n)
        if max_tiles is not None and ds.n > max_tiles:
            idx = np.sort(np.random.default_rng(random_state).choice(ds.n, max_tiles, replace=False))
        batch = ds[idx]
        tok = {k: batch[k] for k in ("ids", "values", "mask")}
        n = len(idx)
        perm = np.random.default_rng([random_state, 1]).permutation(n)
        if n > 1:  # a derangement: a random cyclic shift of a random order, so no tile keeps its own profile
            perm = np.roll(perm, 1)[np.argsort(perm)]
        shuf = {k: v[torch.as_tensor(perm)] for k, v in tok.items()}
        rows = []
        for sigma in sigmas:
            lc = self._loss_tokens(batch["image"], tok, sigma, random_state, use_ema)
            lu = self._loss_tokens(batch["image"], None, sigma, random_state, use_ema)
            ls = self._loss_tokens(batch["image"], shuf, sigma, random_state, use_ema)
            rows.append({"sigma": float(sigma), "loss_cond": float(lc.mean()), "loss_uncond": float(lu.mean()),
                         "loss_shuffled": float(ls.mean()), "gain": float(1 - lc.mean() / lu.mean()),
                         "gain_shuffled": float(1 - ls.mean() / lu.mean()), "n_tiles": n})
        return pd.DataFrame(rows)

    @torch.no_grad()
    def _loss_tokens(self, images_u8, tok, sigma, random_state, use_ema, batch_size: int = 64) -> np.ndarray:
        _check_batch_size(batch_size)
        model = self._model(use_ema)
        device = self.device
        x0 = self._as_images(images_u8)
        noise = _per_sample_noise(x0.shape, random_state, 0)
        out = np.empty(x0.shape[0])
        for s in range(0, x0.shape[0], batch_size):
            e = min(x0.shape[0], s + batch_size)
            x = x0[s:e].to(device)
            kw = {} if tok is None else {k: v[s:e].to(device) for k, v in tok.items()}
            d = model(x + sigma * noise[s:e].to(device), torch.full((e - s,), float(sigma), device=device), **kw)
            out[s:e] = (d.float() - x).pow(2).flatten(1).mean(1).cpu().numpy()
        return out

    # ---- save / load ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model to a folder: ``config.json``, ``model.safetensors``, ``ema.safetensors``, ``history.json``.

        The folder is written beside the target and renamed into place, so an interrupted save leaves no partial
        model. Returns the path.
        """
        from safetensors.torch import save_file

        from .._utils import atomic_path

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        with atomic_path(path) as tmp:
            tmp.mkdir()
            hashes = {}
            for fname, module in (("model.safetensors", self.net), ("ema.safetensors", self.ema_net)):
                save_file(_cpu_state(module), tmp / fname, metadata={"format": FORMAT})
                hashes[fname] = _sha256(tmp / fname)
            (tmp / "history.json").write_text(json.dumps(self.history))
            config = self.config() | {"sha256": hashes}
            (tmp / "config.json").write_text(json.dumps(config, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "auto") -> DiffusionPretrainer:
        """Load a model written by :meth:`save` onto ``device`` (``"auto"``: CUDA if available, else CPU).

        Raises
        ------
        ValueError
            If the folder is not a saved pretrainer, a file is corrupt (checksum), or the weights do not fit the
            configuration.
        """
        from safetensors.torch import load_file

        from .. import __version__

        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{path} is not a saved DiffusionPretrainer (no config.json).")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_path} is corrupt: {err}.") from None
        if config.get("format") != FORMAT:
            raise ValueError(f"{path} holds {config.get('format')!r}, not a {FORMAT}.")
        if int(config.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer dbk ({config.get('dbk_version')}, format "
                             f"{config.get('format_version')}); this is dbk {__version__}. Upgrade dbk.")
        if config.get("dbk_version") != __version__:
            logger.info(f"Loading a model saved by dbk {config.get('dbk_version')} into dbk {__version__}.")
        for fname, digest in config.get("sha256", {}).items():
            f = path / fname
            if not f.is_file():
                raise ValueError(f"{path} is incomplete: {fname} is missing.")
            if _sha256(f) != digest:
                raise ValueError(f"{f} is corrupt or was changed after saving (checksum mismatch).")
        try:
            model = cls(GeneVocab.from_dict(config["vocab"]), preset=PretrainerPreset.from_dict(config["preset"]),
                        tile_size_um=config.get("tile_size_um"), random_state=config.get("random_state", 0),
                        edm=EDM(**config["edm"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{cfg_path} does not describe a valid model: {err}") from None
        for fname, module in (("model.safetensors", model.net), ("ema.safetensors", model.ema_net)):
            try:
                module.load_state_dict(load_file(path / fname))
            except Exception as err:  # safetensors raises several error types on bad files
                raise ValueError(f"{path / fname} does not fit the model in {cfg_path}: {err}") from None
        model.step = int(config.get("step", 0))
        model.train_time = float(config.get("train_time_s", 0.0))
        hist = path / "history.json"
        model.history = json.loads(hist.read_text()) if hist.is_file() else []
        return model.to(device)


# ---- helpers -------------------------------------------------------------------------------------------------------


def _dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips / 90° rotations per sample (``k`` in 0..7)."""
    out = x.clone()
    for code in range(1, 8):
        sel = (k == code).nonzero().flatten()
        if len(sel):
            y = torch.rot90(x[sel], code % 4, dims=(2, 3))
            out[sel] = y.flip(3) if code >= 4 else y
    return out


def _per_sample_noise(shape, random_state: int, stream: int) -> torch.Tensor:
    """Standard normal noise whose row ``i`` is seeded by ``(random_state, i, stream)``."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(_seed(random_state, i, stream)))
                        for i in range(shape[0])]) if shape[0] else torch.zeros(shape)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``checkpoint_dir`` (``None`` when there is none)."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = sorted(d.glob(f"{_CKPT_PREFIX}*.pt"))
    return found[-1] if found else None


def _read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types on truncated or foreign files
        raise ValueError(f"Checkpoint {path} is unreadable or corrupt ({err}); delete it to resume from the "
                         "previous one, or use resume=False.") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dbk pretrainer checkpoint.")
    return state


def _accelerator(accelerator: str, devices):
    """An HF Accelerate ``Accelerator``: bf16 autocast on CUDA, full precision elsewhere."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu', 'cuda' or 'mps', got {accelerator!r}.")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"accelerator={accelerator!r} but CUDA is not available.")
    cpu = accelerator == "cpu" or (accelerator == "auto" and settings.device == "cpu")
    use_cuda = not cpu and torch.cuda.is_available()
    kwargs = {"mixed_precision": "bf16" if use_cuda else "no", "cpu": cpu}
    try:
        acc = Accelerator(**kwargs)
    except ValueError:
        # the process-wide AcceleratorState was set up differently by an earlier call; start it afresh when
        # nothing distributed depends on it
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(**kwargs)
    n_dev = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, (list, tuple)) else None)
    if n_dev is not None and n_dev > 1 and acc.num_processes == 1:
        logger.warning(f"devices={devices!r}: several devices need a launch with `accelerate launch "
                       f"--num_processes {n_dev} your_script.py`; training on one device ({acc.device}).")
    return acc


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
    random_state: int | None = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    unlabeled_tiles_key: str | None = None,
    table_key: str = TILES_TABLE_KEY,
    tiles_key: str = TILES_KEY,
    num_workers: int | None = None,
    callbacks: Sequence[Callable[[DiffusionPretrainer, dict], None]] | None = None,
    labeled_fraction: float | None = None,
    max_time: float | None = None,
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
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"gpu"``/``"cuda"``. Training uses HF Accelerate with bf16
        autocast on CUDA; for several GPUs run the script with ``accelerate launch --num_processes N``.
    devices
        Number of devices, informative: the processes come from ``accelerate launch``.
    random_state
        Seed of the weights, batches, noise and condition dropout: the same seed gives the same weights on CPU.
    checkpoint_dir
        Folder for periodic checkpoints (atomic writes, the last two kept), also written at the end and when
        training is interrupted (Ctrl-C / SIGTERM).
    resume
        Continue from the latest checkpoint in ``checkpoint_dir`` (same step, optimizer, EMA and history).
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
    **preset_overrides
        Preset fields to change (e.g. ``image_size=32``, ``cond_drop=0.3``).

    Returns
    -------
    The trained :class:`~dbk.tl.DiffusionPretrainer`; ``model.history`` lists ``{"step", "loss", "lr", "time",
    "data_wait"}`` records (mean loss since the previous record, seconds of training, share of time spent waiting
    for data).
    """
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
                     labeled_fraction=labeled_fraction, max_time=max_time)
