"""Baselines (mean, HEST ridge, CV ridge, MLP) and the stage-2 fusion head, on data whose answers are known."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from dbk.core._head_training import masked_mse
from dbk.core._heads import FUSIONS, FusionHead
from dbk.tl._baselines import MeanPredictor, MLPBaseline, fit_baseline
from dbk.tl._evaluate import evaluate
from dbk.tl._fusion import FusionRegressor, fit_head
from dbk.tl._ridge import RidgeBaseline


@pytest.fixture(autouse=True)
def _one_thread():
    # Small problems: multi-threaded BLAS / OpenMP only spin on a busy shared 2-core machine (a 147 x 1280 SVD took
    # 3 s instead of 0.02 s, an MLP fit 13 s instead of 2 s). Speed only; no result depends on it.
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(n)


def planted(n=240, d=48, g=8, noise=1.0, signal=1.0, n_slides=4, seed=0, w_seed=123):
    """y = 2 + X W + noise, four slides; the same W (w_seed) for the training and test tables."""
    w = np.random.default_rng(w_seed).normal(size=(d, g)) * signal / np.sqrt(d) * 3
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d))
    y = 2.0 + x @ w + noise * r.normal(size=(n, g))
    a = ad.AnnData(X=y.astype(np.float32), obs=pd.DataFrame(index=[f"s{seed}_{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    a.obs["sample"] = pd.Categorical([f"slide{seed}_{k}" for k in np.arange(n) * n_slides // n])
    a.obsm["X_fm"] = x.astype(np.float32)
    return a


# ---- mean predictor -------------------------------------------------------------------------------------------------


def test_mean_predictor_equals_training_means_honouring_mask():
    tr = planted(n=40, g=3)
    measured = np.ones((40, 3), dtype=np.uint8)
    measured[20:, 2] = 0
    tr.X[20:, 2] = 1000.0  # not measured there: must not count
    tr.layers["measured"] = sp.csr_matrix(measured)
    te = planted(n=8, g=3, seed=1)
    p = MeanPredictor().fit(tr, use_rep="X_fm").predict(te)
    expected = np.array([tr.X[:, 0].mean(), tr.X[:, 1].mean(), tr.X[:20, 2].mean()])
    assert list(p.columns) == ["g0", "g1", "g2"] and list(p.index) == list(te.obs_names)
    np.testing.assert_allclose(p.to_numpy(), np.broadcast_to(expected, (8, 3)), rtol=1e-6)


def test_gene_never_measured_is_an_error():
    tr = planted(n=20, g=2)
    tr.layers["measured"] = sp.csr_matrix(np.array([[1, 0]] * 20, dtype=np.uint8))
    with pytest.raises(ValueError, match="g1"):
        MeanPredictor().fit(tr, use_rep="X_fm")


# ---- ridge ----------------------------------------------------------------------------------------------------------


def test_ridge_cv_recovers_planted_signal_far_better_than_mean():
    tr, te = planted(seed=0), planted(n=120, seed=1)
    ridge = fit_baseline(tr, "ridge_cv", use_rep="X_fm")
    ridge.predict(te, key_added="dbk_pred")
    s_ridge = evaluate(te, train_adata=tr, top_k=4, key_added=None).attrs["summary"]
    fit_baseline(tr, "mean", use_rep="X_fm").predict(te, key_added="dbk_pred")
    s_mean = evaluate(te, train_adata=tr, top_k=4, key_added=None).attrs["summary"]
    # noise 1, signal variance ~9 per gene: the best possible Pearson is ~0.95
    assert s_ridge["pearson_mean_all"] > 0.85
    assert s_ridge["mse_mean_all"] < 0.3 * s_mean["mse_mean_all"]
    assert np.isnan(s_mean["pearson_mean_all"])  # a constant prediction has no correlation
    assert ridge.cv_scheme_.endswith("by slide")
    assert ridge.alpha_ <= 1e3
    assert list(ridge.cv_results_.index) == pytest.approx(list(np.logspace(-2, 8, 21)))


def test_ridge_cv_picks_large_alpha_on_noise():
    tr = planted(signal=0.0, seed=2)
    ridge = RidgeBaseline("cv").fit(tr, use_rep="X_fm")
    assert ridge.alpha_ >= 1e5
    scores = ridge.cv_results_["score"]
    assert scores.iloc[-1] < scores.iloc[0]  # heavy shrinkage beats fitting noise
    per_gene = RidgeBaseline("cv", alpha_per_gene=True).fit(tr, use_rep="X_fm").alpha_
    assert per_gene.shape == (8,) and np.median(per_gene) >= 1e4  # per gene the choice is noisier


def test_ridge_cv_one_slide_uses_spatial_stripes():
    tr = planted(n_slides=1)
    tr.obsm["spatial"] = np.random.default_rng(0).uniform(0, 1000, size=(tr.n_obs, 2))
    ridge = RidgeBaseline("cv", n_splits=3).fit(tr, use_rep="X_fm")
    assert ridge.cv_scheme_ == "3-fold by spatial stripe"


@pytest.mark.parametrize(("n", "d", "k"), [(400, 300, 256), (100, 300, 100), (300, 40, 40)])
def test_ridge_hest_protocol(n, d, k):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    g = 5
    tr, te = planted(n=n, d=d, g=g, seed=3), planted(n=50, d=d, g=g, seed=4)
    hest = RidgeBaseline("hest", random_state=1).fit(tr, use_rep="X_fm")
    assert hest.n_components_ == k
    assert hest.alpha_ == pytest.approx(100.0 / (k * g))  # HEST: 100 / (n_features after PCA * n_genes)
    # the HEST-Benchmark code path, written out
    x = tr.obsm["X_fm"].astype(np.float64)
    scaler = StandardScaler().fit(x)
    pca = PCA(n_components=k, random_state=1).fit(scaler.transform(x))
    reg = Ridge(alpha=100.0 / (k * g), solver="lsqr", fit_intercept=False, max_iter=1000, random_state=1)
    reg.fit(pca.transform(scaler.transform(x)), tr.X.astype(np.float64))
    want = reg.predict(pca.transform(scaler.transform(te.obsm["X_fm"].astype(np.float64))))
    np.testing.assert_allclose(hest.predict(te).to_numpy(), want, rtol=1e-4, atol=1e-4)
    # HEST fits no intercept: the one linear map's is the PCA's centring, 0 on standardised training features
    assert np.abs(hest.intercept_).max() < 1e-10


def test_ridge_honours_measured_mask():
    tr = planted(n=200, g=3, seed=5)
    measured = np.ones((200, 3), dtype=np.uint8)
    measured[100:, 1] = 0  # g1 measured on the first two slides only
    tr.layers["measured"] = sp.csr_matrix(measured)
    garbage = tr.copy()
    garbage.X[100:, 1] = -50.0
    te = planted(n=30, g=3, seed=6)
    for flavor in ("hest", "cv"):
        a = RidgeBaseline(flavor, alphas=[1.0, 10.0]).fit(tr, use_rep="X_fm").predict(te)
        b = RidgeBaseline(flavor, alphas=[1.0, 10.0]).fit(garbage, use_rep="X_fm").predict(te)
        np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-5, atol=1e-5)
    # g0 / g2 (all tiles) and g1 (half of them) are fitted on different rows: g1 equals a fit on its rows only
    only = tr[:100].copy()
    del only.layers["measured"]
    c = RidgeBaseline("cv", alphas=[10.0]).fit(only, use_rep="X_fm", genes=["g1"]).predict(te)
    d = RidgeBaseline("cv", alphas=[10.0]).fit(tr, use_rep="X_fm").predict(te)
    # same alpha and same rows for g1, but the standardisation is fitted on all 200 tiles in the full fit
    assert np.corrcoef(c["g1"], d["g1"])[0, 1] > 0.95


def test_predict_checks_features():
    tr = planted(n=40)
    m = RidgeBaseline("cv", alphas=[1.0]).fit(tr, use_rep="X_fm")
    bad = tr.copy()
    bad.obsm["X_fm"] = bad.obsm["X_fm"][:, :10]
    with pytest.raises(ValueError, match="fitted on 48"):
        m.predict(bad)
    with pytest.raises(RuntimeError, match="not fitted"):
        MeanPredictor().predict(tr)
    with pytest.raises(ValueError, match="method must be one of"):
        fit_baseline(tr, "lasso", use_rep="X_fm")
    tr.obsm["X_other"] = tr.obsm["X_fm"]
    with pytest.raises(ValueError, match="use_rep"):
        fit_baseline(tr, "mean")


# ---- MLP ------------------------------------------------------------------------------------------------------------


def test_mlp_learns_signal_early_stops_and_is_seeded():
    tr, te = planted(n=320, d=24, g=4, seed=7), planted(n=100, d=24, g=4, seed=8)
    kw = {"hidden": 32, "max_epochs": 60, "patience": 5, "batch_size": 64, "lr": 3e-3, "random_state": 0}
    mlp = fit_baseline(tr, "mlp", use_rep="X_fm", **kw)
    mlp.predict(te, key_added="dbk_pred")
    s = evaluate(te, top_k=2, hvg_genes=["g0", "g1"], key_added=None).attrs["summary"]
    assert s["pearson_mean_all"] > 0.8
    assert mlp.validation_.startswith("held-out slides")
    assert len(mlp.history_["val_loss"]) <= 60
    assert mlp.history_["val_loss"][mlp.best_epoch_] == min(mlp.history_["val_loss"])
    again = MLPBaseline(**kw).fit(tr, use_rep="X_fm").predict(te)
    np.testing.assert_array_equal(again.to_numpy(), te.obsm["dbk_pred"].to_numpy())


def test_mlp_bounded_on_features_that_barely_vary_in_training():
    # A ReLU-like channel that is ~0 on every training tile (std 1e-9, a rounding residue) and one exactly constant,
    # both firing at 1.0 on the new slide: plain standardisation turns them into z-scores of 1e9 and the predictions
    # explode; the clipped / zeroed inputs keep them within the training range.
    tr, te = planted(n=240, d=16, g=4, seed=3), planted(n=80, d=16, g=4, seed=4)
    rng = np.random.default_rng(0)
    tr.obsm["X_fm"] = np.hstack([tr.obsm["X_fm"], 1e-9 * rng.random((tr.n_obs, 1)), np.zeros((tr.n_obs, 1))])
    te.obsm["X_fm"] = np.hstack([te.obsm["X_fm"], np.ones((te.n_obs, 2))])
    mlp = MLPBaseline(hidden=32, max_epochs=30, patience=5, random_state=0).fit(tr, use_rep="X_fm")
    assert not mlp.x_keep_[0][-2:].any() and mlp.x_keep_[0][:-2].all()
    pred = mlp.predict(te).to_numpy()
    y = np.asarray(tr.X)
    span = y.max(axis=0) - y.min(axis=0)
    assert np.isfinite(pred).all()
    assert (pred.max(axis=0) < y.max(axis=0) + span).all() and (pred.min(axis=0) > y.min(axis=0) - span).all()
    plain = MLPBaseline(hidden=32, max_epochs=30, patience=5, random_state=0, input_clip=None).fit(tr, use_rep="X_fm")
    assert np.abs(plain.predict(te).to_numpy()).max() > np.abs(pred).max()  # the rare channel alone is unbounded


# ---- fusion head ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_head_shapes(fusion):
    head = FusionHead(12, 5, 7, fusion=fusion, hidden=16)
    out = head(torch.randn(3, 12), torch.randn(3, 5))
    assert out.shape == (3, 7)
    assert head.fuse(torch.randn(3, 12), torch.randn(3, 5)).shape == (3, 17 if fusion == "concat" else 12)
    with pytest.raises(ValueError, match="z_fm"):
        head(torch.randn(3, 5), torch.randn(3, 12))
    linear = FusionHead(12, 5, 7, fusion=fusion, hidden=None)
    assert linear(torch.randn(2, 12), torch.randn(2, 5)).shape == (2, 7)


@pytest.mark.parametrize("fusion", ["gated", "add"])
def test_zero_diff_projection_reduces_exactly_to_fm_path(fusion):
    torch.manual_seed(0)
    head = FusionHead(10, 6, 4, fusion=fusion).eval()
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.zero_()
    z_fm, z_diff = torch.randn(5, 10), torch.randn(5, 6) * 100
    assert torch.equal(head(z_fm, z_diff), head.forward_fm(z_fm))
    assert torch.equal(head(z_fm, z_diff), head.decoder(z_fm))


def test_film_starts_as_fm_path_and_gate_is_used():
    torch.manual_seed(0)
    film = FusionHead(10, 6, 4, fusion="film").eval()
    z_fm, z_diff = torch.randn(5, 10), torch.randn(5, 6)
    assert torch.equal(film(z_fm, z_diff), film.forward_fm(z_fm))
    gated = FusionHead(10, 6, 4, fusion="gated").eval()
    with torch.no_grad():
        gated.gate.weight.zero_()
        gated.gate.bias.fill_(-1e4)  # gate closed: FM path again
    assert torch.allclose(gated(z_fm, z_diff), gated.forward_fm(z_fm))
    with torch.no_grad():
        gated.gate.bias.fill_(1e4)  # gate open: the add fusion
    want = gated.decoder(z_fm + gated.proj(z_diff))
    assert torch.allclose(gated(z_fm, z_diff), want)


def test_unknown_fusion_lists_options():
    with pytest.raises(ValueError, match="'gated', 'concat', 'add', 'film'"):
        FusionHead(4, 4, 2, fusion="sum")
    with pytest.raises(ValueError, match="options"):
        FusionRegressor(fusion="cross")


def test_masked_mse_ignores_masked_entries():
    pred = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    target = torch.tensor([[1.0, float("nan"), 0.0], [4.0, 1e6, 8.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    loss = masked_mse(pred, target, mask)
    assert loss.item() == pytest.approx((0 + 9 + 0 + 4) / 4)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0, 1] == 0 and pred.grad[1, 1] == 0
    assert masked_mse(pred, torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    assert masked_mse(pred, torch.zeros(2, 3)).item() == pytest.approx(float((pred.detach() ** 2).mean()))


def test_fit_head_uses_diffusion_features():
    # the target depends on z_diff only: the fused head learns it, an MLP on z_fm cannot
    r = np.random.default_rng(0)
    n = 300
    z_fm, z_diff = r.normal(size=(n, 16)), r.normal(size=(n, 8))
    y = z_diff[:, :3] @ np.array([[1.0, -1.0], [0.5, 1.0], [-1.0, 0.3]]) + 0.2 * r.normal(size=(n, 2))
    a = ad.AnnData(X=y.astype(np.float32), var=pd.DataFrame(index=["a", "b"]),
                   obs=pd.DataFrame({"sample": np.repeat(list("pqrs"), n // 4)}, index=[str(i) for i in range(n)]))
    a.obsm["X_fm"], a.obsm["X_dbk_diff"] = z_fm, z_diff
    tr, te = a[:225].copy(), a[225:].copy()
    kw = {"hidden": 32, "max_epochs": 80, "patience": 5, "batch_size": 32, "lr": 3e-3, "random_state": 0}
    head = fit_head(tr, fusion="gated", **kw)
    assert head.obsm_keys_ == ["X_fm", "X_dbk_diff"]
    head.predict(te, key_added="dbk_pred")
    fused = evaluate(te, top_k=2, hvg_genes=["a", "b"], key_added=None).attrs["summary"]["pearson_mean_all"]
    fit_baseline(tr, "mlp", use_rep="X_fm", **kw).predict(te, key_added="dbk_pred")
    fm_only = evaluate(te, top_k=2, hvg_genes=["a", "b"], key_added=None).attrs["summary"]["pearson_mean_all"]
    assert fused > 0.8 and abs(fm_only) < 0.4


# ---- learning on synthetic slides with EfficientNet-Lite0 features --------------------------------------------------


def _persisted_slide(seed: int, stride_um: float | None):
    import dbk

    sdata = dbk.datasets.synthetic(shape=(1024, 1024), n_genes=20, include_cells=False, random_state=seed)
    img = sdata.images["he"]
    for scale in img.children:  # render the lazy synthetic image once, not once per tile read
        img[scale]["image"].data = img[scale]["image"].data.persist(scheduler="synchronous")
    dbk.pp.make_tiles(sdata, tile_size_um=56, stride_um=stride_um)
    dbk.pp.pseudobulk(sdata)
    return sdata


@pytest.mark.slow
def test_ridge_cv_on_efficientnet_features_predicts_a_second_slide():
    from dbk.tl._embed import embed_tiles, load_foundation_model

    train, test = _persisted_slide(0, stride_um=28), _persisted_slide(1, stride_um=28)
    net, _ = load_foundation_model("efficientnet_lite0", device="cpu")
    for sdata in (train, test):
        embed_tiles(sdata, fm=net, fm_size_px=64, batch_size=512, accelerator="cpu")
    tr, te = train.tables["dbk_table"], test.tables["dbk_table"]
    assert tr.obsm["X_efficientnet_lite0"].shape[1] == 1280
    ridge = fit_baseline(tr, "ridge_cv", use_rep="X_efficientnet_lite0")
    ridge.predict(te, key_added="dbk_pred")
    s = evaluate(te, train_adata=tr, top_k=10, key_added=None).attrs["summary"]
    fit_baseline(tr, "mean", use_rep="X_efficientnet_lite0").predict(te, key_added="dbk_pred")
    s_mean = evaluate(te, train_adata=tr, top_k=10, key_added=None).attrs["summary"]
    assert s["pearson_mean_all"] > 0.3
    assert s["pearson_mean_top10_hvg"] > 0.3
    assert s["mse_mean_all"] < s_mean["mse_mean_all"]
    assert ridge.alpha_ < 1e8  # found signal: not the edge of the grid


# ---- reduced-rank ridge ---------------------------------------------------------------------------------------------


def low_rank(n=240, d=30, g=40, rank=2, noise=2.0, seed=0):
    """y = X A B + noise with A (d x rank), B (rank x g): every gene follows one of two hidden programmes."""
    w = np.random.default_rng(99)
    a, b = w.normal(size=(d, rank)) / np.sqrt(d), w.normal(size=(rank, g))
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d))
    y = 1.0 + x @ a @ b + noise * r.normal(size=(n, g))
    t = ad.AnnData(X=y.astype(np.float32), obs=pd.DataFrame(index=[f"t{seed}_{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    t.obs["sample"] = pd.Categorical([f"slide{seed}_{k}" for k in np.arange(n) * 4 // n])
    t.obsm["X_fm"] = x.astype(np.float32)
    return t


def test_reduced_rank_ridge_finds_the_rank_and_beats_per_gene_ridge():
    tr, te = low_rank(seed=0), low_rank(n=400, seed=1)
    full = RidgeBaseline("cv").fit(tr, use_rep="X_fm")
    rr = RidgeBaseline("cv", rank="auto").fit(tr, use_rep="X_fm")
    assert rr.rank_ in (2, 3)  # the planted rank (3 when noise happens to favour it), not the full 40
    assert rr.cv_results_.index.names == ["rank", "alpha"]
    assert rr.cv_results_["score"].min() < full.cv_results_["score"].min()
    truth = te.to_df()
    r_full = full.predict(te).corrwith(truth).mean()
    r_rr = rr.predict(te).corrwith(truth).mean()
    assert r_rr > r_full + 0.02, (r_rr, r_full)
    # the fit is one linear map of rank rank_
    w = rr.coef_
    assert np.linalg.matrix_rank(w, tol=1e-8 * np.abs(w).max()) == rr.rank_


def test_full_rank_reduced_rank_ridge_equals_plain_ridge():
    tr, te = low_rank(g=12, seed=2), low_rank(n=50, g=12, seed=3)
    a = RidgeBaseline("cv", alphas=[30.0]).fit(tr, use_rep="X_fm").predict(te)
    b = RidgeBaseline("cv", alphas=[30.0], rank=12).fit(tr, use_rep="X_fm").predict(te)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, atol=1e-6)
    c = RidgeBaseline("cv", alphas=[30.0], rank=1).fit(tr, use_rep="X_fm").predict(te)
    sv = np.linalg.svd(c.to_numpy().astype(np.float64) - c.to_numpy().mean(0), compute_uv=False)
    assert sv[1] < 1e-5 * sv[0]  # rank 1 (float32 predictions)


def test_reduced_rank_honours_measured_mask():
    tr = low_rank(n=200, g=6, seed=5)
    measured = np.ones((200, 6), dtype=np.uint8)
    measured[100:, 1] = 0
    tr.layers["measured"] = sp.csr_matrix(measured)
    garbage = tr.copy()
    garbage.X[100:, 1] = -50.0
    te = low_rank(n=30, g=6, seed=6)
    a = RidgeBaseline("cv", rank="auto").fit(tr, use_rep="X_fm")
    b = RidgeBaseline("cv", rank="auto").fit(garbage, use_rep="X_fm")
    np.testing.assert_allclose(a.predict(te).to_numpy(), b.predict(te).to_numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank": 0}, "rank must be"),
    ({"rank": 2.5}, "rank must be"),
    ({"rank": "full"}, "rank must be"),
    ({"rank": "auto", "ranks": [0, 3]}, "ranks must be"),
    ({"rank": 3, "alpha_per_gene": True}, "alpha_per_gene"),
])
def test_reduced_rank_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RidgeBaseline("cv", **kwargs)
    with pytest.raises(ValueError, match="flavor='cv'"):
        RidgeBaseline("hest", rank=3)


# ---- spatial context ------------------------------------------------------------------------------------------------


def test_neighbor_mean_is_the_brute_force_mean_within_each_slide():
    from dbk.tl._context import neighbor_mean

    r = np.random.default_rng(0)
    coords = r.uniform(0, 100, size=(120, 2))
    x = r.normal(size=(120, 3))
    groups = np.repeat(["a", "b", "c"], 40)
    got = neighbor_mean(coords, x, 15.0, groups)
    for i in range(120):
        near = (np.hypot(*(coords - coords[i]).T) <= 15.0) & (groups == groups[i])
        np.testing.assert_allclose(got[i], x[near].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(neighbor_mean(coords, x, 0.0), x)  # each tile alone
    np.testing.assert_allclose(neighbor_mean(coords, x, 1e6, groups)[:40], np.tile(x[:40].mean(0), (40, 1)))


def test_spatial_context_writes_features_and_means_and_checks_inputs():
    from dbk.tl import spatial_context

    a = planted(n=60, d=4, seed=1)
    a.obsm["spatial"] = np.c_[np.arange(60) % 10, np.arange(60) // 10].astype(float) * 200.0  # px, 10 x 6 grid
    before = a.copy()
    out = spatial_context(a, use_rep="X_fm", context_um=150.0, pixel_size_um=0.5, copy=True)  # 100 µm pitch
    assert "X_fm_ctx" not in a.obsm and set(a.obsm) == set(before.obsm)  # copy=True leaves the input alone
    ctx = out.obsm["X_fm_ctx"]
    assert ctx.shape == (60, 8)
    np.testing.assert_allclose(ctx[:, :4], a.obsm["X_fm"], rtol=1e-6)
    slide = a.obs["sample"].to_numpy()
    i = 25  # row 2, column 5: its 3 x 3 block (150 µm reaches the diagonal at 141 µm), within its slide
    nb = [j for j in range(60) if abs(j % 10 - 5) <= 1 and abs(j // 10 - 2) <= 1 and slide[j] == slide[i]]
    np.testing.assert_allclose(ctx[i, 4:], a.obsm["X_fm"][nb].mean(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="pixel_size_um"):
        spatial_context(a, use_rep="X_fm")
    with pytest.raises(KeyError, match="X_nope"):
        spatial_context(a, use_rep="X_nope", pixel_size_um=0.5)
    b = a.copy()
    del b.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        spatial_context(b, use_rep="X_fm", pixel_size_um=0.5)
    with pytest.raises(ValueError, match="context_um"):
        spatial_context(a, use_rep="X_fm", pixel_size_um=0.5, context_um=-1)
