"""Every head saves its own state: ``get_state()`` -> (config, tensors) -> ``from_state`` predicts identically."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from dbk.tl._baselines import MeanPredictor, MLPBaseline
from dbk.tl._fusion import FusionRegressor, RidgeFusionRegressor
from dbk.tl._head_state import head_from_state
from dbk.tl._ridge import RidgeBaseline

TORCH_KW = {"hidden": 16, "max_epochs": 6, "patience": 3, "batch_size": 32, "random_state": 0, "accelerator": "cpu"}


@pytest.fixture(autouse=True)
def _one_thread():
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(n)


def table(n=160, d_fm=12, d_diff=6, g=5, seed=0, partial=True) -> ad.AnnData:
    """y = 1 + [z_fm, z_diff] W + noise on four slides; gene g1 unmeasured on the last slide (a second pattern)."""
    w = np.random.default_rng(7).normal(size=(d_fm + d_diff, g)) / np.sqrt(d_fm + d_diff) * 2
    r = np.random.default_rng(seed)
    z_fm, z_diff = r.normal(size=(n, d_fm)), r.normal(size=(n, d_diff))
    y = 1.0 + np.hstack([z_fm, z_diff]) @ w + 0.5 * r.normal(size=(n, g))
    a = ad.AnnData(X=y.astype(np.float32), obs=pd.DataFrame(index=[f"t{seed}_{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    a.obs["sample"] = pd.Categorical([f"s{k}" for k in np.arange(n) * 4 // n])
    a.obsm["X_fm"], a.obsm["X_dbk_diff"] = z_fm.astype(np.float32), z_diff.astype(np.float32)
    if partial:
        measured = np.ones((n, g), np.uint8)
        measured[3 * n // 4 :, 1] = 0
        a.layers["measured"] = sp.csr_matrix(measured)
    return a


HEADS = {
    "mean": lambda: MeanPredictor(),
    "ridge_hest": lambda: RidgeBaseline("hest", n_components=8, random_state=0),
    "ridge_cv": lambda: RidgeBaseline("cv", alphas=[0.1, 10.0, 1e3]),
    "ridge_cv_per_gene": lambda: RidgeBaseline("cv", alphas=[0.1, 10.0, 1e3], alpha_per_gene=True),
    "ridge_cv_rank": lambda: RidgeBaseline("cv", rank="auto", ranks=[1, 2, None]),
    "mlp": lambda: MLPBaseline(**TORCH_KW),
    "mlp_plain": lambda: MLPBaseline(input_clip=None, **TORCH_KW),
    "gated": lambda: FusionRegressor(fusion="gated", **TORCH_KW),
    "concat": lambda: FusionRegressor(fusion="concat", **TORCH_KW),
    "film_linear": lambda: FusionRegressor(fusion="film", **(TORCH_KW | {"hidden": None})),
    "add": lambda: FusionRegressor(fusion="add", **TORCH_KW),
    "ridge_fusion": lambda: RidgeFusionRegressor(alphas=[0.1, 10.0, 1e3]),
    "ridge_fusion_rank": lambda: RidgeFusionRegressor(rank="auto", ranks=[1, 3, None], random_state=3),
    "ridge_fusion_late": lambda: RidgeFusionRegressor(rank="auto", ranks=[1, 3, None], blend="late"),
}
FUSED = ("gated", "concat", "film_linear", "add", "ridge_fusion", "ridge_fusion_rank", "ridge_fusion_late")


@pytest.fixture(scope="module")
def data():
    return table(seed=0), table(n=40, seed=1)


@pytest.fixture(scope="module")
def fitted(data):
    tr, _ = data
    out = {}
    for name, make in HEADS.items():
        kw = {"use_rep": "X_fm"} | ({"diff_key": "X_dbk_diff"} if name in FUSED else {})
        out[name] = make().fit(tr, **kw)
    return out


def on_disk(tmp_path, config: dict, tensors: dict) -> tuple[dict, dict]:
    """The state written as DiffBulk writes it (JSON, safetensors) and read back."""
    from safetensors.torch import load_file, save_file

    save_file(tensors, tmp_path / "head.safetensors")
    (tmp_path / "head.json").write_text(json.dumps(config))  # fails on anything not JSON-ready (numpy values ...)
    return json.loads((tmp_path / "head.json").read_text()), load_file(tmp_path / "head.safetensors")


@pytest.mark.parametrize("name", list(HEADS))
def test_round_trip_predicts_identically(name, fitted, data, tmp_path):
    head = fitted[name]
    _, te = data
    want = head.predict(te).to_numpy()
    config, tensors = head.get_state()
    assert config["class"] == type(head).__name__
    assert all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors.values())
    rng = torch.get_rng_state()
    direct = type(head).from_state(config, tensors, genes=head.genes_, device="cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # rebuilding a network leaves the caller's torch RNG alone
    config2, tensors2 = on_disk(tmp_path, config, tensors)
    loaded = head_from_state(config2, tensors2, genes=head.genes_, device="cpu")
    for h in (direct, loaded):
        assert type(h) is type(head)
        assert h.genes_ == head.genes_ and h.obsm_keys_ == head.obsm_keys_ and h.n_features_in_ == head.n_features_in_
        np.testing.assert_array_equal(h.predict(te).to_numpy(), want)
        assert repr(h) == repr(head)
    # the rebuilt head's own state is the same again
    config3, tensors3 = loaded.get_state()
    assert json.loads(json.dumps(config3)) == config2
    assert tensors3.keys() == tensors.keys() and all(torch.equal(tensors3[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("name", ["ridge_hest", "ridge_cv_per_gene", "ridge_cv_rank", "ridge_fusion_rank",
                                  "ridge_fusion_late"])
def test_ridge_round_trip_keeps_what_fitting_chose(name, fitted):
    head = fitted[name]
    new = head_from_state(*head.get_state(), genes=head.genes_)
    for k in ("x_mean_", "x_scale_", "coef_", "intercept_", "alpha_"):
        np.testing.assert_array_equal(getattr(new, k), getattr(head, k))
    assert new.rank_ == head.rank_ and new.n_components_ == head.n_components_
    if head.cv_results_ is None:
        assert new.cv_results_ is None
    else:
        pd.testing.assert_frame_equal(new.cv_results_, head.cv_results_)
        assert new.cv_scheme_ == head.cv_scheme_
    if isinstance(head, RidgeFusionRegressor):
        assert new.history_ == head.history_ and new.validation_ == head.validation_
        if head.blend == "late":
            assert (new.blend_weight_, new.block_alpha_, new.block_rank_, new.blend_cv_) == (
                head.blend_weight_, head.block_alpha_, head.block_rank_, head.blend_cv_)


def test_torch_round_trip_keeps_standardisation_and_takes_the_history(fitted):
    head = fitted["gated"]
    new = FusionRegressor.from_state(*head.get_state(), genes=head.genes_, device="cpu", history=head.history_)
    assert new.fusion == "gated" and new.input_clip == head.input_clip and new.best_epoch_ == head.best_epoch_
    assert new.history_ == head.history_ and new.validation_ == head.validation_
    for a, b in zip(new.x_keep_, head.x_keep_, strict=True):
        np.testing.assert_array_equal(a, b)
    assert FusionRegressor.from_state(*head.get_state(), genes=head.genes_).history_ == {}


def test_fusion_heads_keep_the_saved_format(fitted):
    """Tensor names and config keys of the fusion heads are those DiffBulk folders have held (format 1)."""
    config, tensors = fitted["gated"].get_state()
    assert set(config) == {"class", "fusion", "hidden", "dropout", "lr", "weight_decay", "batch_size", "max_epochs",
                           "patience", "val_fraction", "random_state", "dims", "obsm_keys", "layer", "best_epoch",
                           "validation", "head_input_clip", "scale_inputs"}  # scale_inputs: new, optional on load
    assert {k for k in tensors if not k.startswith("module.")} == {"x_mean.0", "x_mean.1", "x_std.0", "x_std.1",
                                                                   "x_keep.0", "x_keep.1", "y_mean", "y_std"}
    assert "module.decoder.3.weight" in tensors and tensors["x_keep.0"].dtype == torch.uint8
    config, tensors = fitted["ridge_fusion_late"].get_state()
    assert set(config) == {"class", "fusion", "alphas", "alpha_per_gene", "n_splits", "random_state", "alpha", "rank",
                           "ranks", "rank_chosen", "cv_scheme", "cv_score", "dims", "obsm_keys", "layer", "best_epoch",
                           "validation", "blend", "blend_weight", "block_alpha", "block_rank", "blend_cv"}
    assert set(tensors) == {f"ridge.{k}" for k in ("x_mean", "x_scale", "coef", "intercept", "alpha", "cv_alphas",
                                                   "cv_ranks", "cv_score")}
    assert all(t.dtype == torch.float64 for t in tensors.values())
    assert config["fusion"] == "ridge" and FusionRegressor.OPTIONS == MLPBaseline.OPTIONS


def test_states_saved_before_newer_options_still_load(fitted, data):
    _, te = data
    # a neural head saved before its inputs were clipped: no head_input_clip, no x_keep -> plain standardisation
    config, tensors = fitted["gated"].get_state()
    del config["head_input_clip"]
    old = head_from_state(config, {k: v for k, v in tensors.items() if not k.startswith("x_keep")},
                          genes=fitted["gated"].genes_, device="cpu")
    assert old.input_clip is None and old.x_keep_ is None and np.isfinite(old.predict(te).to_numpy()).all()
    # a ridge head saved before reduced rank and late fusion: no rank / ranks / rank_chosen / blend / cv_ranks
    head = fitted["ridge_fusion"]
    config, tensors = head.get_state()
    for k in ("rank", "ranks", "rank_chosen", "blend"):
        del config[k]
    del tensors["ridge.cv_ranks"]
    old = head_from_state(config, tensors, genes=head.genes_)
    np.testing.assert_array_equal(old.predict(te).to_numpy(), head.predict(te).to_numpy())
    assert old.blend == "early" and old.rank is None
    pd.testing.assert_frame_equal(old.cv_results_, head.cv_results_)
    # and one that does not record its class: the fusion key decides
    del config["class"]
    assert isinstance(head_from_state(config, tensors, genes=head.genes_), RidgeFusionRegressor)


def _edit(state, config=None, tensors=None):
    c, t = json.loads(json.dumps(state[0])), dict(state[1])
    if config is not None:
        config(c)
    if tensors is not None:
        tensors(t)
    return c, t


@pytest.mark.parametrize(("name", "config", "tensors", "match"), [
    ("ridge_fusion", lambda c: c.pop("alphas"), None, r"head\.json: invalid ridge head settings \('alphas'\)"),
    ("ridge_fusion", None, lambda t: t.pop("ridge.coef"), r"head\.st is not a ridge head: it lacks the tensors"),
    ("ridge_fusion", None, lambda t: t.update({"ridge.coef": t["ridge.coef"][:, 1:].clone()}),
     r"head\.st does not fit 5 genes and features \[12, 6\]"),
    ("ridge_fusion", None, lambda t: t["ridge.intercept"].__setitem__(0, float("nan")), "corrupt ridge head"),
    ("ridge_fusion", None, lambda t: t.update({"ridge.x_mean": t["ridge.x_mean"][1:].clone()}),
     "corrupt ridge head: ridge head arrays of inconsistent shapes"),
    ("ridge_fusion", None, lambda t: t.update({"ridge.alpha": torch.arange(1.0, 6.0, dtype=torch.float64)}),
     "several alphas"),
    ("ridge_fusion_late", lambda c: c.pop("blend_weight"), None, "invalid late-fusion settings"),
    ("ridge_hest", lambda c: c.update(flavor="lasso"), None, "invalid ridge head settings"),
    ("ridge_cv", None, lambda t: t.update({"ridge.cv_score": torch.zeros(0, dtype=torch.float64),
                                           "ridge.cv_alphas": torch.zeros(0, dtype=torch.float64),
                                           "ridge.cv_ranks": torch.zeros(0, dtype=torch.float64)}),
     "without its inner-CV curve"),
    ("gated", lambda c: c.update(fusion="sum"), None, r"head\.json: invalid head settings \(Unknown fusion"),
    ("gated", lambda c: c.pop("hidden"), None, r"invalid head settings \('hidden'\)"),
    ("gated", lambda c: c.update(dims=[12]), None, "invalid head settings"),
    ("gated", lambda c: c.update(dims=[12, 7]), None, r"head\.st does not fit 5 genes and features \[12, 7\]"),
    ("gated", None, lambda t: t.pop("module.gate.bias"), r"head\.st does not fit 5 genes"),
    ("gated", None, lambda t: t.pop("y_std"), r"head\.st lacks the standardisation tensor 'y_std'"),
    ("gated", None, lambda t: t.pop("x_keep.1"), "lacks the standardisation tensor 'x_keep.1'"),
    ("gated", None, lambda t: t.update({"x_std.0": t["x_std.0"][:3].clone()}), "standardisation sizes"),
    ("gated", None, lambda t: t["y_std"].__setitem__(0, 0.0), "non-finite or non-positive standardisation"),
    ("mlp", lambda c: c.update(obsm_keys=["X_fm", "X_other"]), None, "do not describe the feature sets"),
    ("mean", None, lambda t: t.update(means=t["means"][:4].clone()), r"does not fit 5 genes: 'means'"),
    ("mean", None, lambda t: t.pop("means"), "is not a mean predictor: it lacks the tensors"),
    ("mean", lambda c: c.update({"class": "Lasso"}), None, r"unknown head class 'Lasso' \(key 'class'\)"),
])
def test_corrupt_or_mismatched_state_is_a_clear_error(fitted, name, config, tensors, match):
    head = fitted[name]
    c, t = _edit(head.get_state(), config, tensors)
    with pytest.raises(ValueError, match=match):
        head_from_state(c, t, genes=head.genes_, device="cpu", config_file="head.json", tensor_file="head.st")


def test_state_of_another_class_or_genes_is_refused(fitted):
    mean, gated = fitted["mean"], fitted["gated"]
    with pytest.raises(ValueError, match="describes a MeanPredictor .*not a RidgeBaseline"):
        RidgeBaseline.from_state(*mean.get_state(), genes=mean.genes_, config_file="head.json")
    with pytest.raises(ValueError, match="does not fit 4 genes"):
        head_from_state(*gated.get_state(), genes=gated.genes_[:4], device="cpu")
    with pytest.raises(ValueError, match="empty or has duplicates"):
        head_from_state(*gated.get_state(), genes=["a"] * 5)
    with pytest.raises(ValueError, match="must be a JSON object"):
        head_from_state(["not", "a", "dict"], {}, genes=gated.genes_)
    with pytest.raises(RuntimeError, match="not fitted"):
        MLPBaseline().get_state()
