"""Foundation models by name: the listing, transformers models (tiny, random weights) against their own image
processors, user-supplied modules with their transform, and the messages of gated models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import dbk
from dbk.tl._embed import _table_rows_to_tiles, embed_tiles, load_foundation_model
from dbk.tl._fm_zoo import FM_CARDS, NOT_VERIFIED, HFVisionEncoder, fm_card, resolve_timm_kwargs

transformers = pytest.importorskip("transformers")  # the 'fm' extra, installed by the test extra: runs in CI


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def slide():
    sd = dbk.datasets.synthetic(shape=(512, 512), n_genes=8, include_cells=False, random_state=0)
    sd.attrs["sample"] = "s0"
    dbk.pp.make_tiles(sd, tile_size_um=32.0)  # 38 tiles of 64 px (32 px at pyramid level 1)
    dbk.pp.pseudobulk(sd)
    return sd


def _quiet(fn, *args, **kwargs):
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIPModel checkpoint as PLIP's (vision tower + 16-d projection + text tower) with its CLIP processor."""
    d = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        projection_dim=16)
    model = _quiet(transformers.CLIPModel, cfg).eval()
    model.save_pretrained(d)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A Dinov2Model (Phikon-v2's class) whose processor resizes to 40 px, then centre-crops 32 px."""
    d = tmp_path_factory.mktemp("tiny_dinov2")
    torch.manual_seed(1)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    image_size=32, patch_size=8)
    model = transformers.Dinov2Model(cfg).eval()
    model.save_pretrained(d)
    transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                                   ).save_pretrained(d)
    return d, model


def _capture_inputs(enc: HFVisionEncoder) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        seen.append((kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).detach().clone())

    enc.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _tiles_as_read(sd, read_px: int) -> list:
    """The uint8 tiles dbk reads (at ``read_px``), in the table's row order, as PIL images."""
    from PIL import Image

    ds = dbk.pp.TileDataset(sd, "dbk_tiles", size_px=read_px, dtype="uint8")
    rows = _table_rows_to_tiles(sd, "dbk_table", "dbk_tiles", ds.tile_ids)
    return [Image.fromarray(ds.read(int(i))) for i in rows]


def _processors(path):
    """transformers' own processors of the model: the PIL one and, where transformers has it, the torchvision one."""
    out = [transformers.AutoImageProcessor.from_pretrained(path, use_fast=False)]
    fast = transformers.AutoImageProcessor.from_pretrained(path, use_fast=True)
    if type(fast) is not type(out[0]):
        out.append(fast)
    return out


# ----------------------------------------------------------------------------------------------- the listing

def test_list_fms_gives_every_models_size_resolution_and_width_with_its_source():
    df = dbk.tl.list_fms()
    assert {"plip", "phikon-v2", "uni", "uni2-h", "conch", "virchow2", "h-optimus-0",
            "efficientnet_lite0"} <= set(df.index)
    for col in ("library", "hub_id", "um_per_px", "size_px", "dim", "pooling", "mean", "std", "gated", "licence",
                "card", "um_per_px_source", "size_px_source", "dim_source", "sources"):
        assert col in df.columns, col
    for name, row in df.iterrows():
        assert row["card"].startswith("https://"), name
        for field in ("um_per_px", "size_px", "dim"):
            src = row[f"{field}_source"]
            assert isinstance(src, str) and src, (name, field)
            if pd.isna(row[field]):  # a missing value says why: not on the card, or no single value
                assert "not verified" in src or "no single value" in src or "no pixel size" in src or \
                    "read at load time" in src, (name, field, src)
    # values as their cards state them
    assert df.loc["h-optimus-0", "um_per_px"] == 0.5 and df.loc["h-optimus-0", "size_px"] == 224
    assert df.loc["h-optimus-0", "dim"] == 1536 and df.loc["h-optimus-0", "mean"] == [0.707223, 0.578729, 0.703617]
    assert df.loc["plip", "dim"] == 512 and df.loc["plip", "pooling"] == "image_embeds"
    assert df.loc["conch", "size_px"] == 448 and df.loc["conch", "library"] == "module"
    assert (df.loc["uni", "dim"], df.loc["uni2-h", "dim"], df.loc["virchow2", "dim"]) == (1024, 1536, 2560)
    assert bool(df.loc["uni", "gated"]) and df.loc["uni", "licence"] == "CC-BY-NC-ND-4.0"
    assert pd.isna(df.loc["uni", "um_per_px"]) and NOT_VERIFIED in df.loc["uni", "um_per_px_source"]
    assert fm_card("UNI2-h") is FM_CARDS["uni2-h"] and fm_card("phikon_v2") is FM_CARDS["phikon-v2"]


def test_lite0_entry_is_timms_config_of_the_loaded_model():
    net, cfg = load_foundation_model("efficientnet_lite0", device="cpu")
    card = FM_CARDS["efficientnet_lite0"]
    assert tuple(cfg["mean"]) == card.mean and tuple(cfg["std"]) == card.std
    assert cfg["input_size"][-1] == card.size_px and net.num_features == card.dim


@pytest.mark.parametrize("name", ["uni", "uni2-h", "h-optimus-0"])
def test_timm_entries_feature_width_is_that_of_the_architecture_their_card_describes(name):
    import timm

    card = FM_CARDS[name]
    kwargs = {**resolve_timm_kwargs(card.timm_kwargs), **card.timm_arch}
    with torch.device("meta"):  # the architecture only: no memory, no weights
        net = timm.create_model(kwargs.pop("model_name"), pretrained=False, num_classes=0, **kwargs)
    assert net.num_features == card.dim
    assert net.patch_embed.img_size == (card.size_px, card.size_px)


# ------------------------------------------------------------- transformers models against their processors

def test_clip_style_model_embeds_with_its_processors_pixels_and_the_projection(slide, tiny_clip):
    path, full = tiny_clip
    net, cfg = load_foundation_model(f"hf:{path}", device="cpu")
    assert isinstance(net, HFVisionEncoder) and type(net.model).__name__ == "CLIPVisionModelWithProjection"
    assert cfg["pooling"] == "image_embeds" and cfg["input_size"] == (3, 32, 32) and cfg["resize_px"] is None
    assert cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # the processor's (CLIP's)
    seen = _capture_inputs(net)
    sd = slide
    embed_tiles(sd, fm=net, key_added="X_clip", batch_size=16)
    t = sd.tables["dbk_table"]
    fed = torch.cat(seen)
    assert t.obsm["X_clip"].shape == (t.n_obs, 16)  # the 16-d projection, not the 32-d tower
    tiles = _tiles_as_read(sd, 32)
    for proc in _processors(path):  # the same tiles through transformers' own processors
        want = proc(images=tiles, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(fed, want, atol=2e-6, rtol=0)
    with torch.inference_mode():  # and the features are CLIPModel.get_image_features of those pixels
        ref = full.get_image_features(pixel_values=want)
    ref = ref if torch.is_tensor(ref) else ref.pooler_output
    np.testing.assert_allclose(t.obsm["X_clip"], ref.numpy(), atol=1e-5)
    rec = t.uns["dbk"]["embeddings"]["X_clip"]
    assert rec["library"] == "transformers" and rec["pooling"] == "image_embeds" and rec["size_px"] == 32
    assert "centre crop" not in rec["preprocessing"] and "image_embeds" in rec["preprocessing"]


def test_dinov2_model_follows_its_processors_resize_and_centre_crop(slide, tiny_dinov2):
    path, full = tiny_dinov2
    sd = slide
    embed_tiles(sd, fm=f"hf:{path}", accelerator="cpu", batch_size=16)  # by path, through dbk's loader
    t = sd.tables["dbk_table"]
    key = dbk.tl.model_key(f"hf:{path}")
    rec = t.uns["dbk"]["embeddings"][key]
    assert rec["size_px"] == 32 and rec["pooling"] == "cls" and rec["library"] == "transformers"
    assert "read at 40 px" in rec["preprocessing"] and "centre crop 32 px" in rec["preprocessing"]
    assert t.obsm[key].shape == (t.n_obs, 32)
    net, _ = load_foundation_model(f"hf:{path}", device="cpu")
    seen = _capture_inputs(net)
    embed_tiles(sd, fm=net, key_added="X_dino_again", batch_size=64)
    fed = torch.cat(seen)
    tiles = _tiles_as_read(sd, 40)  # read at the processor's resize, then cropped by dbk
    for proc in _processors(path):
        want = proc(images=tiles, return_tensors="pt")["pixel_values"]
        assert want.shape[-1] == 32
        torch.testing.assert_close(fed, want, atol=2e-6, rtol=0)
    with torch.inference_mode():
        ref = full(pixel_values=want).last_hidden_state[:, 0]  # Phikon-v2's card: the CLS token
    np.testing.assert_allclose(t.obsm[key], ref.numpy(), atol=1e-5)
    # pooling is part of what the features are: another pooling, other fingerprint, embedded again
    pooled, _ = load_foundation_model(f"hf:{path}", device="cpu", pooling="mean_patch")
    assert dbk.tl._embed.fm_fingerprint(pooled) != dbk.tl._embed.fm_fingerprint(net)


def test_hf_model_input_size_and_pooling_checks(slide, tiny_clip):
    path, _ = tiny_clip
    with pytest.raises(ValueError, match="takes 32 px inputs only"):  # CLIP's position embeddings are fixed
        embed_tiles(slide, fm=f"hf:{path}", fm_size_px=48, accelerator="cpu", key_added="X_no")
    with pytest.raises(ValueError, match="pooling must be one of"):
        load_foundation_model(f"hf:{path}", device="cpu", pooling="max")
    with pytest.raises(ValueError, match="not a transformers vision model folder"):
        load_foundation_model(f"hf:{path.parent}", device="cpu")


def test_benchmark_and_prepare_corpus_embed_at_the_models_own_input_size(tiny_clip, tmp_path):
    """fm_size_px=None (their default): a model whose own input is not 224 (this CLIP takes 32 px only, as CONCH takes
    448) is loaded once, embedded at its own size, and that integer is recorded."""
    import functools
    import json

    from dbk.pp._corpus import MARKER

    path, _ = tiny_clip
    fm = f"hf:{path}"
    slides = []
    for i in range(2):
        sd = dbk.datasets.synthetic(shape=(512, 512), n_genes=8, include_cells=False, random_state=i)
        sd.attrs["sample"] = f"s{i}"
        slides.append(sd)
    res = dbk.tl.benchmark(slides, methods=["mean"], split={"a": ["s0"]}, fm=fm, tile_size_um=56.0, top_k=5,
                           random_state=0, accelerator="cpu")
    s = res.attrs["settings"]
    assert s["fm"] == fm and s["fm_size_px"] == 32 and s["fm_user_supplied"] is False
    for sd in slides:
        assert sd.tables["dbk_table"].uns["dbk"]["embeddings"][s["fm_key"]]["size_px"] == 32
    slide = functools.partial(dbk.datasets.synthetic, shape=(512, 512), n_genes=8, include_cells=False,
                              random_state=0)
    report = dbk.tl.prepare_corpus({"c0": slide}, out=tmp_path / "corpus", fm=fm, tile_size_um=56.0, threads=1,
                                   accelerator="cpu")
    assert report["status"].tolist() == ["done"], report["error"].tolist()
    marker = json.loads((tmp_path / "corpus" / "c0.zarr" / MARKER).read_text())
    assert marker["settings"]["fm_size_px"] == 32 == report.attrs["settings"]["fm_size_px"]


# ---------------------------------------------------------------------------------- user-supplied modules

class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = torch.nn.Conv2d(3, 7, 3)

    def forward(self, x):  # a two-tower model's forward: not the image features
        raise RuntimeError("needs text too")

    def encode_image(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_loaded_module_with_its_own_transform(slide):
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(48, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(40), T.ToTensor(),
                           T.Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))])
    module = _Tiny()
    fm = dbk.tl.wrap_fm(module, transform, name="my_conch", forward="encode_image")
    sd = slide
    embed_tiles(sd, fm=fm, batch_size=8, accelerator="cpu")
    t = sd.tables["dbk_table"]
    assert t.obsm["X_my_conch"].shape == (t.n_obs, 7)
    rec = t.uns["dbk"]["embeddings"]["X_my_conch"]
    assert rec["source"] == "user-supplied" and rec["pretrained"] == "unknown" and rec["library"] == "user-supplied"
    assert rec["size_px"] == 48 and rec["mean"] == pytest.approx([0.5, 0.4, 0.3])  # the transform's Resize, Normalize
    assert "CenterCrop(size=(40, 40))" in rec["preprocessing"]
    tiles = _tiles_as_read(sd, 48)
    with torch.inference_mode():
        want = module.encode_image(torch.stack([transform(im) for im in tiles]))
    np.testing.assert_allclose(t.obsm["X_my_conch"], want.numpy(), atol=1e-5)
    # (module, transform) is the same model; the plain forward of a two-tower model is refused with a hint
    with pytest.raises(RuntimeError, match="needs text too"):
        embed_tiles(sd, fm=(module, transform), accelerator="cpu", key_added="X_pair")
    with pytest.raises(ValueError, match="no method 'encode'"):
        dbk.tl.wrap_fm(module, transform, forward="encode")
    # without a transform dbk reads and normalises at size_px
    plain = dbk.tl.wrap_fm(module, forward=lambda m, x: m.encode_image(x), size_px=24, name="plain")
    embed_tiles(sd, fm=plain, accelerator="cpu")
    assert t.obsm["X_plain"].shape == (t.n_obs, 7) and t.uns["dbk"]["embeddings"]["X_plain"]["size_px"] == 24
    assert Image  # PIL is what transforms receive


def test_conch_by_name_points_to_the_module_route():
    with pytest.raises(ValueError, match=r"wrap_fm\(model, preprocess"):
        load_foundation_model("conch", device="cpu")


def test_fit_and_reload_with_a_user_supplied_fm(slide, tmp_path):
    from torchvision import transforms as T

    module = _Tiny()
    transform = T.Compose([T.Resize(32), T.ToTensor()])
    fm = dbk.tl.wrap_fm(module, transform, name="tiny_user", forward="encode_image")
    tiny = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
            "log_every": 5}
    model = dbk.tl.fit_diffbulk(slide, fm=fm, preset="tiny", pretrain_steps=0, pretrain_kwargs=tiny,
                                tile_size_um=32.0, fusion="ridge", head_cv=0, random_state=0, accelerator="cpu")
    assert model.config["fm"]["id"] == "tiny_user" and model.config["fm"]["size_px"] == 32
    path = model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="user-supplied foundation model"):
        dbk.tl.DiffBulk.load(path, device="cpu")
    back = dbk.tl.DiffBulk.load(path, device="cpu", fm=fm)
    other = dbk.tl.wrap_fm(_Tiny(), transform, forward="encode_image")  # the same class, other weights
    with torch.no_grad():
        other.net.conv.weight.add_(1.0)
    with pytest.raises(ValueError, match="other weights"):
        dbk.tl.DiffBulk.load(path, device="cpu", fm=other)
    pred = back.predict(slide, key_added="pred_back")
    assert pred.shape[1] == len(model.genes)


def test_token_is_used_not_recorded(tiny_clip):
    from dbk.tl._fit_steps import load_fm

    path, _ = tiny_clip
    fm = load_fm(f"hf:{path}", size_px=None, device=torch.device("cpu"),
                 fm_kwargs={"token": "hf_secret", "pooling": "pooler"})
    assert "token" not in fm.kwargs and fm.kwargs == {"pooling": "pooler"} and fm.size_px == 32
    assert fm.net.pooling == "pooler"
    again = load_fm(fm.net, size_px=None, device=torch.device("cpu"))  # a loaded module: its pooling is recorded
    assert again.kwargs == {"pooling": "pooler"} and again.id == f"hf:{path}"


# ------------------------------------------------------------------------------------------- gated models

def _gated_error(repo: str) -> Exception:
    from huggingface_hub.errors import GatedRepoError

    url = f"https://huggingface.co/{repo}/resolve/main/config.json"
    msg = (f"401 Client Error. Cannot access gated repo for url {url}. Access to model {repo} is restricted. "
           "You must have access to it and be authenticated to access it. Please log in.")
    try:
        try:
            import httpx2 as httpx
        except ImportError:
            import httpx
        return GatedRepoError(msg, response=httpx.Response(401, request=httpx.Request("GET", url)))
    except Exception:  # older huggingface_hub: requests-based errors
        return GatedRepoError(msg)


def test_gated_transformers_model_without_token_says_licence_and_token(monkeypatch):
    def refuse(repo, **_):
        try:
            raise _gated_error(repo)
        except Exception as err:  # as transformers re-raises the hub's error
            raise OSError(f"You are trying to access a gated repo.\nMake sure to have access to it at "
                          f"https://huggingface.co/{repo}.\n{err}") from err

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(RuntimeError) as err:
        load_foundation_model("phikon-v2", device="cpu")
    msg = str(err.value)
    assert "owkin/phikon-v2 is a gated model" in msg and "accepted its licence (Owkin non-commercial licence)" in msg
    assert "https://huggingface.co/owkin/phikon-v2" in msg and "HF_TOKEN" in msg and "token=" in msg
    assert isinstance(err.value.__cause__, OSError)


def test_gated_timm_model_offline_without_token(monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(RuntimeError) as err:
        load_foundation_model("uni2-h", device="cpu")
    msg = str(err.value)
    assert "'uni2-h' (MahmoodLab/UNI2-h)" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "MahmoodLab/UNI2-h is gated" in msg and "licence (CC-BY-NC-ND-4.0)" in msg
    assert "https://huggingface.co/MahmoodLab/UNI2-h" in msg and "HF_TOKEN" in msg

    import timm

    def refuse(*_a, **_k):
        raise _gated_error("MahmoodLab/UNI2-h")

    monkeypatch.setattr(timm, "create_model", refuse)
    with pytest.raises(RuntimeError, match=r"MahmoodLab/UNI2-h is a gated model.*HF_TOKEN"):
        load_foundation_model("uni2-h", device="cpu")
