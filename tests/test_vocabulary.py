"""One vocabulary across the public API: renamed keywords, ``random_state=None``, and ``accelerator=`` everywhere.

- Each renamed keyword is the one name in the signatures; the old name raises a ``TypeError`` naming the new one,
  before any work (also where the function forwards unknown keywords elsewhere), and the wrapper keeps the
  signature and docstring (Sphinx reads them).
- ``random_state=None`` means ``dbk.settings.seed`` wherever a public function or class takes ``random_state``.
- Every public function or method that trains or infers takes ``accelerator=``, and one resolver reads it: a device
  this machine lacks (``"cuda:1"`` on a CPU machine) is refused by all with the same message.
"""

from __future__ import annotations

import inspect

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import dbk

# ---- renames -----------------------------------------------------------------------------------------------------


def _renamed():
    """``(name, callable that passes its keyword to the public entry point, signature owner, old, new)``."""
    from dbk.tl import (
        FusionRegressor,
        MeanPredictor,
        MLPBaseline,
        RidgeBaseline,
        RidgeFusionRegressor,
    )

    def call(fn, *args):
        return lambda kw: fn(*args, **kw)

    rows = [
        ("pp.select_genes", dbk.pp.select_genes, "n_top", "n_top_genes"),
        ("pp.select_genes", dbk.pp.select_genes, "adatas", "data"),
        ("pp.concat", dbk.pp.concat, "tables", "data"),
        ("pp.TileDataset", dbk.pp.TileDataset, "target_um_per_px", "target_pixel_size_um"),
        ("pp.export_tiles", dbk.pp.export_tiles, "target_um_per_px", "target_pixel_size_um"),
        ("pl.gene_metrics", dbk.pl.gene_metrics, "top", "top_k"),
        ("tl.fit_diffbulk", dbk.tl.fit_diffbulk, "validation", "val_fraction"),
        ("tl.fit_baseline", dbk.tl.fit_baseline, "obsm_key", "use_rep"),
        ("tl.fit_baseline", dbk.tl.fit_baseline, "adata_train", "adata"),
        ("tl.fit_head", dbk.tl.fit_head, "obsm_key", "use_rep"),
        ("tl.fit_head", dbk.tl.fit_head, "adata_train", "adata"),
        ("tl.spatial_context", dbk.tl.spatial_context, "radius_um", "context_um"),
        ("tl.spatial_context", dbk.tl.spatial_context, "um_per_px", "pixel_size_um"),
        ("tl.embed_tiles", dbk.tl.embed_tiles, "model", "fm"),
        ("tl.embed_tiles", dbk.tl.embed_tiles, "size_px", "fm_size_px"),
        ("tl.embed_tiles", dbk.tl.embed_tiles, "target_um_per_px", "target_pixel_size_um"),
        ("tl.embed_tiles", dbk.tl.embed_tiles, "data", "sdata"),
    ]
    out = []
    for name, fn, old, new in rows:
        sig_of = fn.__init__ if inspect.isclass(fn) else fn
        first = [] if old in ("adatas", "tables", "adata_train", "data") else [None]
        out.append((name, call(fn, *first), sig_of, old, new))
    for cls in (MeanPredictor, RidgeBaseline, MLPBaseline, FusionRegressor, RidgeFusionRegressor):
        head = cls() if cls is not RidgeBaseline else cls("cv")
        out.append((f"{cls.__name__}.fit", call(head.fit, None), cls.fit, "obsm_key", "use_rep"))
    return out


RENAMED = _renamed()


@pytest.mark.parametrize(("name", "call", "sig_of", "old", "new"), RENAMED,
                         ids=[f"{r[0]}:{r[3]}" for r in RENAMED])
def test_old_keyword_names_raise_a_type_error_naming_the_new_one(name, call, sig_of, old, new):
    params = inspect.signature(sig_of).parameters
    assert new in params and old not in params, (name, list(params))
    with pytest.raises(TypeError, match=rf"^{name.split('.', 1)[1] if name[:3] in ('pp.', 'pl.', 'tl.') else name}: "
                                       rf"'{old}' was renamed '{new}' \(dbk 0\.1\)\.$"):
        call({old: 1})


def test_old_names_are_caught_before_a_function_forwards_keywords():
    """fit_diffbulk forwards unknown keywords to the head, fit_baseline / fit_head to its constructor."""
    for fn in (dbk.tl.fit_diffbulk, dbk.tl.fit_baseline, dbk.tl.fit_head):
        assert any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    with pytest.raises(TypeError, match="'validation' was renamed 'val_fraction'"):
        dbk.tl.fit_diffbulk(None, validation=0.3, hidden=8)  # would otherwise reach the head as an unknown option
    with pytest.raises(TypeError, match="'obsm_key' was renamed 'use_rep'"):
        dbk.tl.fit_baseline(None, "mlp", obsm_key="X", hidden=8)


def test_the_wrapper_keeps_signature_and_docstring():
    from dbk._utils import renamed_kwargs

    def f(data, *, new: int = 1) -> int:
        """Doc of f."""
        return data + new

    g = renamed_kwargs(old="new")(f)
    assert g.__doc__ == "Doc of f." and g.__name__ == "f" and g.__wrapped__ is f
    assert inspect.signature(g) == inspect.signature(f)
    assert g(1, new=2) == 3 and g.__renamed_kwargs__ == {"old": "new"}
    with pytest.raises(TypeError, match=r"^f: 'old' was renamed 'new' \(dbk 0\.1\)\.$"):
        g(1, old=2)
    # the public functions keep their documentation (the numpydoc sections Sphinx renders)
    for fn in (dbk.tl.embed_tiles, dbk.tl.fit_diffbulk, dbk.pl.gene_metrics, dbk.pp.TileDataset.__init__):
        assert fn.__wrapped__ is not None
    assert "fm_size_px\n" in dbk.tl.embed_tiles.__doc__ and "val_fraction\n" in dbk.tl.fit_diffbulk.__doc__
    assert "top_k\n" in dbk.pl.gene_metrics.__doc__ and "{plot_params}" not in dbk.pl.gene_metrics.__doc__


def _public_callables():
    """``(qualified name, callable)`` of every public function, class and public method of io, pp, tl, pl."""
    out = []
    for sub in ("io", "pp", "tl", "pl", "datasets"):
        module = getattr(dbk, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                out.append((f"{sub}.{name}", obj))
                for meth in vars(obj):
                    fn = getattr(obj, meth)
                    if not meth.startswith("_") and callable(fn) and not isinstance(fn, type):
                        out.append((f"{sub}.{name}.{meth}", fn))
            elif callable(obj):
                out.append((f"{sub}.{name}", obj))
    return out


def _params(obj):
    try:
        return inspect.signature(obj).parameters
    except (TypeError, ValueError):  # builtins, dataclass fields without a signature ...
        return {}


OLD_NAMES = {"n_top", "top", "validation", "obsm_key", "radius_um", "um_per_px", "target_um_per_px", "adata_train",
             "adatas"}


def test_no_public_signature_keeps_an_old_name():
    found = [(name, p) for name, obj in _public_callables() for p in _params(obj) if p in OLD_NAMES]
    assert not found, found
    assert "model" not in _params(dbk.tl.embed_tiles) and "size_px" not in _params(dbk.tl.embed_tiles)


@pytest.mark.parametrize(("fn", "first"), [
    (dbk.pp.select_genes, "data"), (dbk.pp.concat, "data"), (dbk.tl.fit_baseline, "adata"),
    (dbk.tl.fit_head, "adata"), (dbk.tl.embed_tiles, "sdata"), (dbk.tl.spatial_context, "adata"),
    (dbk.tl.evaluate, "data"), (dbk.tl.diffusion_features, "data"), (dbk.tl.fit_diffbulk, "data"),
    (dbk.pl.spatial, "data"), (dbk.pl.tiles, "sdata"), (dbk.pp.normalize, "adata"), (dbk.pp.make_tiles, "sdata"),
])
def test_first_argument_names_what_it_takes(fn, first):
    """``data``: SpatialData or AnnData (or several); ``sdata``: SpatialData only; ``adata``: AnnData only."""
    assert next(iter(_params(fn))) == first


# ---- seeds ---------------------------------------------------------------------------------------------------------

# public callables whose random_state default is not None yet, each with its reason
SEED_EXCEPTIONS = {"datasets.synthetic": "owned by the datasets work (defaults to 0, the seed of the shipped demos)"}


def test_random_state_defaults_to_none_everywhere():
    found = []
    for name, obj in _public_callables():
        p = _params(obj).get("random_state")
        if p is not None and p.default is not None and name not in SEED_EXCEPTIONS:
            found.append((name, p.default))
    assert not found, f"random_state should default to None (dbk.settings.seed): {found}"
    p = inspect.signature(dbk.tl.DiffusionPretrainer.generate).parameters["random_state"]
    assert p.default is None


@pytest.fixture
def seed3():
    old = dbk.settings.seed
    dbk.settings.seed = 3
    yield
    dbk.settings.seed = old


def _planted(n=80, d=6, g=3, n_slides=2, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d))
    y = 1.0 + x @ r.normal(size=(d, g)) + r.normal(size=(n, g))
    a = ad.AnnData(X=y.astype(np.float32), obs=pd.DataFrame(index=[f"t{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    a.obs["sample"] = pd.Categorical([f"s{k}" for k in np.arange(n) * n_slides // n])
    a.obsm["X_fm"] = x.astype(np.float32)
    return a


def test_settings_seed_acts_as_random_state(seed3):
    """dbk.settings.seed = 3 does exactly what random_state=3 does: MLP head, ridge inner CV, stage-1 sampling."""
    a = _planted()
    kw = {"hidden": 8, "max_epochs": 4, "patience": 2, "accelerator": "cpu"}
    by_setting = dbk.tl.fit_baseline(a, "mlp", use_rep="X_fm", **kw).predict(a)
    explicit = dbk.tl.fit_baseline(a, "mlp", use_rep="X_fm", random_state=3, **kw).predict(a)
    other = dbk.tl.fit_baseline(a, "mlp", use_rep="X_fm", random_state=0, **kw).predict(a)
    pd.testing.assert_frame_equal(by_setting, explicit)
    assert not np.allclose(by_setting.to_numpy(), other.to_numpy())
    # ridge_cv on one slide without obsm["spatial"]: random inner folds, drawn from the seed
    one = _planted(n=60, n_slides=1)
    cv = {"alphas": [0.1, 1.0, 10.0, 100.0]}
    by_setting = dbk.tl.fit_baseline(one, "ridge_cv", use_rep="X_fm", **cv).cv_results_
    explicit = dbk.tl.fit_baseline(one, "ridge_cv", use_rep="X_fm", random_state=3, **cv).cv_results_
    other = dbk.tl.fit_baseline(one, "ridge_cv", use_rep="X_fm", random_state=0, **cv).cv_results_
    pd.testing.assert_frame_equal(by_setting, explicit)
    assert not np.allclose(by_setting["score"], other["score"])
    # stage 1: the sampler noise and the diffusion-feature noise
    pre = dbk.tl.DiffusionPretrainer(["A", "B"], preset="tiny", image_size=16, block_out_channels=(16, 32),
                                     gene_dim=32)
    assert pre.random_state == 3
    np.testing.assert_array_equal(pre.generate(2, n_steps=2), pre.generate(2, n_steps=2, random_state=3))
    tiles = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    f3 = dbk.tl.diffusion_features(tiles, pre, random_state=3)
    np.testing.assert_array_equal(dbk.tl.diffusion_features(tiles, pre), f3)
    assert not np.array_equal(dbk.tl.diffusion_features(tiles, pre, random_state=0), f3)
    np.testing.assert_array_equal(pre.denoising_loss(tiles, sigma=1.0), pre.denoising_loss(tiles, sigma=1.0,
                                                                                             random_state=3))


# ---- accelerator ----------------------------------------------------------------------------------------------------


def _trains_or_infers():
    from dbk.tl import DiffBulk, DiffusionPretrainer, MLPBaseline
    from dbk.tl._torch_head import TorchRegressor

    return {
        "tl.fit_diffbulk": dbk.tl.fit_diffbulk,
        "tl.fit_pretrainer": dbk.tl.fit_pretrainer,
        "tl.DiffusionPretrainer.fit": DiffusionPretrainer.fit,
        "tl.DiffusionPretrainer.generate": DiffusionPretrainer.generate,
        "tl.DiffusionPretrainer.denoising_loss": DiffusionPretrainer.denoising_loss,
        "tl.DiffusionPretrainer.evaluate": DiffusionPretrainer.evaluate,
        "tl.embed_tiles": dbk.tl.embed_tiles,
        "tl.diffusion_features": dbk.tl.diffusion_features,
        "tl.DiffBulk.predict": DiffBulk.predict,
        "tl.DiffBulk.features": DiffBulk.features,
        "tl.MLPBaseline": MLPBaseline,  # trains and predicts where its constructor says
        "tl.FusionRegressor (TorchRegressor)": TorchRegressor,  # FusionRegressor(fusion=..., **TorchRegressor options)
        "pl.generated": dbk.pl.generated,
        "tl.prepare_corpus": dbk.tl.prepare_corpus,  # a corpus up to the FM embeddings
    }


def test_everything_that_trains_or_infers_takes_accelerator():
    missing = [name for name, fn in _trains_or_infers().items() if "accelerator" not in _params(fn)]
    assert not missing, missing
    # the loaders name where a model goes: device=
    for fn in (dbk.tl.DiffBulk.load, dbk.tl.DiffusionPretrainer.load, dbk.tl.load_foundation_model):
        assert "device" in _params(fn) and "accelerator" not in _params(fn)
    # the forwarders hand accelerator to the torch heads
    assert dbk.tl.FusionRegressor(accelerator="cpu").accelerator == "cpu"


def test_one_resolver_for_every_device_name():
    from dbk.core._device import resolve_device as core_resolve
    from dbk.tl._embed import resolve_device as tl_resolve

    assert core_resolve is tl_resolve
    assert tl_resolve("cpu") == torch.device("cpu") and tl_resolve(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="accelerator must be 'auto', 'cpu', 'cuda', 'cuda:<i>'"):
        tl_resolve("tpu")
    with pytest.raises(ValueError, match="device must be"):
        dbk.settings.device = "cudax"


def _unavailable() -> tuple[str, str]:
    """A CUDA device this machine lacks and the error every entry point gives for it."""
    if not torch.cuda.is_available():
        return "cuda:1", "accelerator='cuda:1' asks for CUDA, but torch sees no CUDA device."
    n = torch.cuda.device_count()
    return f"cuda:{n}", f"accelerator='cuda:{n}' asks for CUDA device {n}, but torch sees {n} "


@pytest.fixture
def tiny_pretrainer():
    return dbk.tl.DiffusionPretrainer(["A", "B"], preset="tiny", image_size=16, block_out_channels=(16, 32),
                                      gene_dim=32)


def test_a_missing_cuda_device_is_refused_by_all_with_the_same_message(tiny_pretrainer, tmp_path):
    """``accelerator="cuda:1"`` on a CPU machine: one RuntimeError, word for word, from every entry point."""
    from _builders import make_sdata

    from dbk.core._device import _accelerator, resolve_device
    from dbk.tl import DiffBulk, TileArrays

    bad, message = _unavailable()
    pre = tiny_pretrainer
    tiles = np.zeros((4, 16, 16, 3), np.uint8)
    arrays = TileArrays(tiles, X=np.ones((4, 2), np.float32), genes=["A", "B"], tile_size_um=56.0)
    a = _planted(n=40)
    a.obsm["X_dbk_diff"] = a.obsm["X_fm"][:, :3]
    sdata, _ = make_sdata(2_000, h=300, w=300)
    dbk.pp.make_tiles(sdata, tile_size_um=56, min_tissue_fraction=0)
    model = DiffBulk(pretrainer=pre, head=None, fm=torch.nn.Linear(2, 2), config={}, scalers=[])
    calls = {
        "resolve_device": lambda: resolve_device(bad),
        "stage-1 Accelerator": lambda: _accelerator(bad, "auto"),
        "fit_diffbulk": lambda: dbk.tl.fit_diffbulk(None, accelerator=bad),  # checked before any work
        "fit_pretrainer": lambda: dbk.tl.fit_pretrainer(arrays, preset="tiny", max_steps=1, accelerator=bad),
        "DiffusionPretrainer.fit": lambda: pre.fit(arrays, max_steps=1, accelerator=bad),
        "generate": lambda: pre.generate(1, n_steps=1, accelerator=bad),
        "denoising_loss": lambda: pre.denoising_loss(tiles, sigma=1.0, accelerator=bad),
        "DiffusionPretrainer.evaluate": lambda: pre.evaluate(arrays, accelerator=bad),
        "diffusion_features": lambda: dbk.tl.diffusion_features(tiles, pre, accelerator=bad),
        "diffusion_features (folder)": lambda: dbk.tl.diffusion_features(tiles, pre.save(tmp_path / "pre"),
                                                                         accelerator=bad),
        "embed_tiles": lambda: dbk.tl.embed_tiles(sdata, fm=torch.nn.Identity(), accelerator=bad),
        "DiffBulk.predict": lambda: model.predict(a, accelerator=bad),
        "DiffBulk.features": lambda: model.features(sdata, accelerator=bad),
        "MLPBaseline": lambda: dbk.tl.MLPBaseline(max_epochs=1, accelerator=bad).fit(a, use_rep="X_fm"),
        "fit_baseline mlp": lambda: dbk.tl.fit_baseline(a, "mlp", use_rep="X_fm", max_epochs=1, accelerator=bad),
        "fit_head": lambda: dbk.tl.fit_head(a, use_rep="X_fm", max_epochs=1, accelerator=bad),
        "pl.generated": lambda: dbk.pl.generated(pre, [{"A": 1.0}], n_steps=1, accelerator=bad),
    }
    got = {}
    for name, call in calls.items():
        with pytest.raises(RuntimeError) as err:
            call()
        got[name] = str(err.value)
    assert all(m.startswith(message) for m in got.values()), got
    assert len(set(got.values())) == 1, got
    # settings.device names it the same way for accelerator="auto"
    old = dbk.settings.device
    dbk.settings.device = bad
    try:
        with pytest.raises(RuntimeError, match="asks for CUDA"):
            resolve_device("auto")
    finally:
        dbk.settings.device = old
