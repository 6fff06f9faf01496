"""Stage 2 features: activations of the frozen stage-1 U-Net decoder on slightly noised real tiles (``z_diff``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .._constants import DIFF_FEATURES_KEY, TILES_KEY, TILES_TABLE_KEY, UNS_KEY
from .._logging import logger
from .._settings import settings
from .._utils import copy_sdata, is_sdata, resolve_seed

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

POOLS = ("mean", "mean+std")


def feature_levels(unet) -> list[str]:
    """Names of the decoder blocks that can give features, coarsest first: ``"mid"``, ``"up0"``, ``"up1"`` ...

    ``"mid"`` is the U-Net's middle block (lowest resolution); ``"up{i}"`` the output of decoder block ``i``
    (after its upsampler, if any), so the resolution rises with ``i``.
    """
    return ["mid"] + [f"up{i}" for i in range(len(unet.up_blocks))]


def _module(unet, level: str):
    if level == "mid":
        return unet.mid_block
    return unet.up_blocks[int(level[2:])]


def tile_seed(random_state: int, tile_id) -> int:
    """A 63-bit seed from ``random_state`` and a tile id (int or string): the same pair gives the same seed."""
    if isinstance(tile_id, (int, np.integer)) and not isinstance(tile_id, bool):
        v = int(tile_id)
        parts = [0, v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF]
    else:
        d = hashlib.sha256(str(tile_id).encode()).digest()
        parts = [1, *np.frombuffer(d[:16], dtype="<u4").tolist()]
    ss = np.random.SeedSequence([int(random_state) & 0xFFFFFFFF, *parts])
    return int(ss.generate_state(2, np.uint64)[0] >> 1)


def tile_noise(shape: tuple[int, ...], random_state: int, tile_ids: Sequence) -> torch.Tensor:
    """Standard normal noise, one ``shape`` per tile, each from its own generator seeded by (random_state, tile id)."""
    if len(tile_ids) == 0:
        return torch.zeros((0, *shape))
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(tile_seed(random_state, t)))
                        for t in tile_ids])


def pretrainer_fingerprint(pretrainer, use_ema: bool = True) -> str:
    """A short hash of the weights whose activations are used (identifies the stage-1 model of the features)."""
    h = hashlib.sha256()
    net = pretrainer.ema_net if use_ema else pretrainer.net
    for k, v in net.unet.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(net.null_cond.detach().to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


class DecoderFeatures:
    """Forward hooks on a U-Net's decoder blocks that pool each block's output per sample.

    Use as a context manager around forward passes; :meth:`pop` returns the (batch, features) matrix of the last
    pass, levels concatenated in the order given.
    """

    def __init__(self, unet, levels: Sequence[str], pool: str = "mean") -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}.")
        self.unet, self.levels, self.pool = unet, list(levels), pool
        self._out: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self.shapes: dict[str, tuple[int, int, int]] = {}

    def __enter__(self) -> DecoderFeatures:
        for level in self.levels:
            self._handles.append(_module(self.unet, level).register_forward_hook(self._hook(level)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, level: str):
        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            x = x.float()
            self.shapes[level] = tuple(int(s) for s in x.shape[1:])
            parts = [x.mean(dim=(2, 3))]
            if self.pool == "mean+std":
                parts.append(x.std(dim=(2, 3), unbiased=False))
            self._out[level] = torch.cat(parts, dim=1)

        return hook

    def pop(self) -> torch.Tensor:
        missing = [lv for lv in self.levels if lv not in self._out]
        if missing:
            raise RuntimeError(f"U-Net blocks {missing} produced no output in the forward pass.")
        out = torch.cat([self._out[lv] for lv in self.levels], dim=1)
        self._out = {}
        return out

    def dims(self) -> list[int]:
        k = 2 if self.pool == "mean+std" else 1
        return [self.shapes[lv][0] * k for lv in self.levels]


def _resolve_pretrainer(pretrainer, accelerator: str | None = None):
    """The pretrainer (loaded from its folder), moved to the device ``accelerator`` names (``None``: left as is)."""
    from ..core._device import resolve_device
    from ..core._pretrainer import DiffusionPretrainer

    device = None if accelerator is None else resolve_device(accelerator)  # a bad name fails before any loading
    if isinstance(pretrainer, (str, os.PathLike)):
        return DiffusionPretrainer.load(pretrainer, device="auto" if device is None else device)
    if not hasattr(pretrainer, "ema_net") or not hasattr(pretrainer, "preset"):
        raise TypeError(f"pretrainer must be a dbk.tl.DiffusionPretrainer (or the folder of a saved one), got "
                        f"{type(pretrainer).__name__}.")
    return pretrainer if device is None else pretrainer.to(device)


@torch.inference_mode()
def _extract(net, loader, tile_ids: np.ndarray, *, sigma: float, random_state: int, levels, pool, device, n,
             bf16: bool = False):
    from tqdm.auto import tqdm

    feats = DecoderFeatures(net.unet, levels, pool)
    out: list[np.ndarray] = []
    done = 0
    with feats, tqdm(total=n, desc="diffusion features", unit="tile", disable=not settings.progress) as bar:
        for batch in loader:
            x0 = batch["image"].to(device).float().div_(127.5).sub_(1.0)
            b = x0.shape[0]
            noise = tile_noise(tuple(x0.shape[1:]), random_state, tile_ids[done : done + b]).to(device)
            s = torch.full((b,), float(sigma), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                net(x0 + float(sigma) * noise, s)  # unconditioned: ids=None uses the learned null condition
            out.append(feats.pop().cpu().numpy())
            done += b
            bar.update(b)
    dims = feats.dims() if out else []
    shapes = dict(feats.shapes)
    return (np.concatenate(out, axis=0) if out else np.zeros((0, 0), np.float32)), dims, shapes


def _check_levels(net, levels, pool) -> list[str]:
    available = feature_levels(net.unet)
    levels = list(available if levels is None else levels)
    bad = [lv for lv in levels if lv not in available]
    if bad or not levels or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct names among {available}, got {levels}.")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}.")
    return levels


def _use_bf16(autocast: bool | None, device: torch.device) -> bool:
    return device.type == "cuda" and (autocast is None or bool(autocast))


def _array_features(images, pretrainer, *, tile_ids, sigma, levels, pool, use_ema, batch_size, random_state,
                    autocast, accelerator=None) -> np.ndarray:
    """``diffusion_features`` of an (n, S, S, 3) uint8 array of tiles already at the model's resolution."""
    from ..core._data import _resample

    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"images must be an (n, S, S, 3) uint8 array, got {arr.shape} {arr.dtype}.")
    tile_ids = np.arange(len(arr)) if tile_ids is None else np.asarray(tile_ids)
    if len(tile_ids) != len(arr):
        raise ValueError(f"{len(tile_ids)} tile_ids for {len(arr)} images.")
    pretrainer = _resolve_pretrainer(pretrainer, accelerator)
    net = pretrainer.ema_net if use_ema else pretrainer.net
    net.eval()
    levels = _check_levels(net, levels, pool)
    arr = _resample(arr, pretrainer.image_size)
    loader = ({"image": torch.from_numpy(arr[s : s + batch_size]).permute(0, 3, 1, 2)}
              for s in range(0, len(arr), batch_size))
    device = next(net.parameters()).device
    feats, _, _ = _extract(net, loader, tile_ids, sigma=float(sigma), random_state=int(random_state), levels=levels,
                           pool=pool, device=device, n=len(arr), bf16=_use_bf16(autocast, device))
    return feats.astype(np.float32, copy=False)


def diffusion_features(
    data: SpatialData | np.ndarray,
    pretrainer,
    *,
    sigma: float = 0.01,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    image_key: str | None = None,
    levels: Sequence[str] | None = None,
    pool: str = "mean",
    use_ema: bool = True,
    batch_size: int = 32,
    num_workers: int = 0,
    random_state: int | None = None,
    accelerator: str | None = None,
    autocast: bool | None = None,
    tile_ids: Sequence | None = None,
    key_added: str = DIFF_FEATURES_KEY,
    overwrite: bool = False,
    copy: bool = False,
) -> SpatialData | np.ndarray | None:
    """Diffusion features ``z_diff`` of every tile from the frozen stage-1 U-Net (DiffBulk stage 2).

    Each tile is read at the pretrainer's resolution (``image_size`` px over its ``tile_size_um``: a square of
    ``tile_size_um`` centred on the tile), scaled to [-1, 1], given Gaussian noise of standard deviation ``sigma``
    and passed once through the U-Net *unconditioned* (the learned null condition, as in the condition dropout of
    stage 1) with EDM preconditioning at noise level ``sigma``. Forward hooks take the outputs of the middle block
    and of the decoder blocks (one per resolution); each is global-average-pooled (``pool="mean+std"`` adds the
    standard deviation over positions) and the levels are concatenated, coarsest first.

    The noise of a tile comes from its own generator, seeded by ``random_state`` and the tile id, so the features
    are deterministic, do not depend on which tiles share a batch, and the global torch / numpy random state is not
    used. The network is in eval mode (GroupNorm is per sample), so a tile's features do not depend on the others.

    The learned reduction of the method description (conv, norm, SiLU before pooling) belongs to the trained head;
    here the frozen activations are pooled as they are.

    Parameters
    ----------
    data
        SpatialData with the H&E image and the tiles (:func:`dbk.pp.make_tiles`); or an (n, S, S, 3) uint8 array of
        tiles (resampled to the model's ``image_size``), for which the (n, features) array is returned and nothing
        is written (the torch core's path, no SpatialData needed).
    pretrainer
        A trained :class:`~dbk.tl.DiffusionPretrainer` (or the folder it was saved to).
    sigma
        Noise level of the input (EDM sigma, images in [-1, 1]).
    tiles_key
        Shapes element with the tiles.
    table_key
        Tile table the features are written to (rows matched by instance id); made (tiles x 0 genes) when the
        slide has none (H&E only).
    image_key
        The H&E image; the only image when ``None``.
    levels
        Blocks to read, any of ``"mid"``, ``"up0"``, ``"up1"``, ... (see :func:`feature_levels`); all when ``None``.
    pool
        ``"mean"`` (global average pool) or ``"mean+std"``.
    use_ema
        Use the EMA weights of the pretrainer (default) rather than the raw ones.
    batch_size
        Tiles per forward pass (does not change the result).
    num_workers
        ``DataLoader`` workers reading tiles.
    random_state
        Seed of the per-tile noise (``None``: ``dbk.settings.seed``).
    accelerator
        Where the U-Net runs: ``"auto"`` (``dbk.settings.device``: CUDA if available), ``"cpu"``, ``"cuda"``,
        ``"cuda:1"`` ... (the pretrainer is moved there); ``None`` (default): where the pretrainer is.
    autocast
        bf16 autocast of the forward pass on CUDA (``None``: on for CUDA; never on CPU). Features under autocast
        differ from float32 ones by bf16 rounding (measured in ``benchmarks/device_check.py``).
    tile_ids
        Array input only: the id of each tile, which seeds its noise (default ``0 .. n-1``).
    key_added
        ``obsm`` key written.
    overwrite
        Recompute even when ``obsm[key_added]`` already holds features whose record names the same stage-1 weights
        (fingerprint) and settings (``sigma``, ``random_state``, ``levels``, ``pool``, ``use_ema``, ``tiles_key``,
        ``image_size``, ``um_per_px``, ``precision``). Without it such features are kept (they are deterministic, so
        reuse is exact).
    copy
        Return a modified copy instead of changing ``data`` in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes to ``sdata.tables[table_key]``:

    - ``obsm[key_added]``: float32 (tiles x features), rows aligned with the table;
    - ``uns["dbk"]["diffusion_features"][key_added]``: the layout (``levels``, ``dims`` and ``offsets`` of each
      level in the feature vector, ``shapes`` (channels, height, width) of the pooled activations, ``pool``) and
      the settings (``sigma``, ``random_state``, ``use_ema``, ``image_size``, ``um_per_px``, ``tiles_key``, the
      pretrainer's ``step`` and a ``pretrainer_fingerprint`` of its weights).
    """
    random_state = resolve_seed(random_state)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}.")
        return _array_features(data, pretrainer, tile_ids=tile_ids, sigma=sigma, levels=levels, pool=pool,
                               use_ema=use_ema, batch_size=batch_size, random_state=random_state, autocast=autocast,
                               accelerator=accelerator)
    from torch.utils.data import DataLoader, Subset

    from ..pp._dataset import TileDataset
    from ._embed import _image_only_table, _table_rows_to_tiles

    if not is_sdata(data):
        raise TypeError(f"diffusion_features needs the SpatialData with the H&E image and tiles, got "
                        f"{type(data).__name__}.")
    if tiles_key not in data.shapes:
        raise KeyError(f"No tiles {tiles_key!r} in sdata.shapes (available: {list(data.shapes)}); run "
                       "dbk.pp.make_tiles first.")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}.")
    pretrainer = _resolve_pretrainer(pretrainer, accelerator)
    net = pretrainer.ema_net if use_ema else pretrainer.net
    net.eval()
    levels = _check_levels(net, levels, pool)
    if copy:
        data = copy_sdata(data)
    if table_key not in data.tables:
        _image_only_table(data, tiles_key, table_key)
    pixel_size_um = pretrainer.um_per_px
    if pixel_size_um is None:
        logger.warning("diffusion_features: the pretrainer does not know its tile size in µm; each tile is resampled "
                       f"to {pretrainer.image_size} px whatever its size.")
    device = next(net.parameters()).device
    bf16 = _use_bf16(autocast, device)
    settings_rec = {
        "sigma": float(sigma),
        "random_state": int(random_state),
        "use_ema": bool(use_ema),
        "image_size": int(pretrainer.image_size),
        "um_per_px": "None" if pixel_size_um is None else float(pixel_size_um),  # record key: data contract
        "tiles_key": tiles_key,
        "pretrainer_fingerprint": pretrainer_fingerprint(pretrainer, use_ema),
        "precision": "bf16" if bf16 else "float32",
        "levels": list(levels),
        "pool": pool,
    }
    adata = data.tables[table_key]
    if not overwrite and _stored_features_match(adata, key_added, settings_rec):
        logger.info(f"diffusion_features: slide {str(data.attrs.get('sample', 'slide'))!r}: keeping obsm"
                    f"[{key_added!r}] (same stage-1 weights and settings; overwrite=True recomputes).")
        return data if copy else None
    ds = TileDataset(data, tiles_key, image_key=image_key, size_px=pretrainer.image_size,
                     target_pixel_size_um=pixel_size_um, dtype="uint8")
    rows = _table_rows_to_tiles(data, table_key, tiles_key, ds.tile_ids)
    # an own generator: a DataLoader iterator otherwise draws its workers' base seed from the global torch RNG
    loader = DataLoader(Subset(ds, rows.tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    feats, dims, shapes = _extract(net, loader, ds.tile_ids[rows], sigma=float(sigma), random_state=int(random_state),
                                   levels=levels, pool=pool, device=device, n=len(rows), bf16=bf16)
    if not np.isfinite(feats).all():
        logger.warning(f"diffusion_features: {int((~np.isfinite(feats)).any(axis=1).sum())} tiles got non-finite "
                       "features.")
    adata.obsm[key_added] = feats.astype(np.float32, copy=False)
    record = {
        "dims": [int(d) for d in dims],
        "offsets": [int(o) for o in np.cumsum([0, *dims])[:-1]],
        "shapes": [list(shapes[lv]) for lv in levels] if shapes else [],
        "dim": int(feats.shape[1]),
        "pretrainer_step": int(pretrainer.step),
        **settings_rec,
    }
    uns = adata.uns.setdefault(UNS_KEY, {})
    uns.setdefault("diffusion_features", {})[key_added] = record
    logger.info(f"diffusion_features: {feats.shape[0]} tiles x {feats.shape[1]} ({'+'.join(levels)}, {pool}, "
                f"sigma={sigma:g}) -> sdata.tables[{table_key!r}].obsm[{key_added!r}].")
    return data if copy else None


def _stored_features_match(adata, key: str, want: dict) -> bool:
    """Whether ``obsm[key]`` holds one row per tile made with exactly the weights and settings in ``want``."""
    from .._utils import jsonable

    rec = adata.uns.get(UNS_KEY, {}).get("diffusion_features", {}).get(key, {})
    return (key in adata.obsm and len(adata.obsm[key]) == adata.n_obs
            and all(jsonable(rec.get(k)) == jsonable(v) for k, v in want.items()))
