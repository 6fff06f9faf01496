"""dbk.tl.evaluate on hand-made tables whose metrics are known (scipy as the reference)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr

from dbk.tl._evaluate import evaluate, nan_pearson, nan_spearman


def _table(truth, pred, genes=None, measured=None, pred_key="dbk_pred"):
    n, g = truth.shape
    genes = genes or [f"g{i}" for i in range(g)]
    a = ad.AnnData(X=np.asarray(truth, dtype=np.float32), obs=pd.DataFrame(index=[f"t{i}" for i in range(n)]),
                   var=pd.DataFrame(index=genes))
    if measured is not None:
        a.layers["measured"] = sp.csr_matrix(np.asarray(measured, dtype=np.uint8))
    a.obsm[pred_key] = pd.DataFrame(np.asarray(pred, dtype=np.float32), index=a.obs_names, columns=genes)
    return a


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def test_per_gene_metrics_match_scipy(rng):
    n, g = 40, 6
    truth = rng.gamma(2.0, 1.0, size=(n, g))
    pred = truth * rng.uniform(0.2, 1.0, size=g) + rng.normal(scale=0.8, size=(n, g))
    truth[:5, 0] = truth[0, 0]  # ties: Spearman uses average ranks, as scipy
    a = _table(truth, pred)
    df = evaluate(a, top_k=3, key_added=None)
    t, p = a.X.astype(np.float64), a.obsm["dbk_pred"].to_numpy(np.float64)
    for j, gene in enumerate(a.var_names):
        assert df.loc[gene, "pearson"] == pytest.approx(pearsonr(t[:, j], p[:, j])[0], abs=1e-10)
        assert df.loc[gene, "spearman"] == pytest.approx(spearmanr(t[:, j], p[:, j])[0], abs=1e-10)
        assert df.loc[gene, "mse"] == pytest.approx(np.mean((t[:, j] - p[:, j]) ** 2), rel=1e-10)
        assert df.loc[gene, "mae"] == pytest.approx(np.mean(np.abs(t[:, j] - p[:, j])), rel=1e-10)
        assert df.loc[gene, "n_tiles"] == n
    s = df.attrs["summary"]
    assert s["pearson_mean_all"] == pytest.approx(df["pearson"].mean())
    assert s["spearman_mean_all"] == pytest.approx(df["spearman"].mean())
    assert s["mse_mean_all"] == pytest.approx(df["mse"].mean())
    assert s["mae_mean_all"] == pytest.approx(df["mae"].mean())
    assert s["pearson_mean_top3_best"] == pytest.approx(df["pearson"].nlargest(3).mean())
    assert s["spearman_mean_top3_best"] == pytest.approx(df["spearman"].nlargest(3).mean())
    per_tile = [spearmanr(t[i], p[i])[0] for i in range(n)]
    assert s["spearman_per_tile_mean"] == pytest.approx(np.mean(per_tile), abs=1e-10)
    assert s["pearson_flattened"] == pytest.approx(pearsonr(t.ravel(), p.ravel())[0], abs=1e-10)


def test_exact_summary_names():
    truth = np.arange(20, dtype=float).reshape(10, 2) % 7
    a = _table(truth, truth + 1)
    s = evaluate(a, top_k=1, hvg_genes=["g1", "g0"]).attrs["summary"]
    for name in ("pearson_mean_all", "pearson_mean_top1_hvg", "pearson_mean_top1_best", "spearman_mean_all",
                 "spearman_mean_top1_hvg", "spearman_mean_top1_best", "mse_mean_all", "mae_mean_all",
                 "spearman_per_tile_mean", "pearson_flattened"):
        assert name in s
    assert s["mse_mean_all"] == pytest.approx(1.0) and s["mae_mean_all"] == pytest.approx(1.0)
    assert s["pearson_mean_all"] == pytest.approx(1.0)


def test_constant_genes_are_nan_not_zero(rng):
    n = 30
    truth = rng.normal(size=(n, 3))
    pred = truth + rng.normal(scale=0.5, size=(n, 3))
    truth[:, 1] = 2.5  # constant truth
    pred[:, 2] = 0.3  # constant prediction (what the mean predictor gives)
    df = evaluate(_table(truth, pred), top_k=3, key_added=None)
    assert np.isnan(df.loc["g1", "pearson"]) and np.isnan(df.loc["g1", "spearman"])
    assert np.isnan(df.loc["g2", "pearson"]) and np.isnan(df.loc["g2", "spearman"])
    assert np.isfinite(df.loc["g1", "mse"]) and np.isfinite(df.loc["g2", "mae"])
    s = df.attrs["summary"]
    assert s["n_genes_nan_pearson"] == 2 and s["n_genes_nan_spearman"] == 2
    assert s["pearson_mean_all"] == pytest.approx(df.loc["g0", "pearson"])  # NaNs left out, not averaged as 0


def test_nan_pearson_constant_after_rounding():
    # the mean of identical values can differ from them by rounding; a constant vector must still give NaN
    a = np.full(7, 0.1 + 0.2)
    assert np.isnan(nan_pearson(a, np.arange(7.0)))
    assert np.isnan(nan_spearman(np.arange(7.0), np.ones(7)))
    assert np.isnan(nan_pearson(np.array([1.0, np.nan]), np.array([2.0, 3.0])))  # one valid pair


def test_masked_genes_are_excluded(rng):
    n = 50
    truth = rng.normal(size=(n, 2))
    pred = truth + rng.normal(scale=0.3, size=(n, 2))
    measured = np.ones((n, 2), dtype=bool)
    measured[30:, 1] = False  # gene g1 absent from the panel of the last 20 tiles
    truth[30:, 1] = 0.0  # stored as 0 there, and the prediction is way off: must not count
    pred[30:, 1] = 100.0
    df = evaluate(_table(truth, pred, measured=measured), top_k=2, key_added=None)
    assert df.loc["g1", "n_tiles"] == 30 and df.loc["g0", "n_tiles"] == n
    assert df.loc["g1", "pearson"] == pytest.approx(pearsonr(truth[:30, 1], pred[:30, 1])[0], abs=1e-6)
    assert df.loc["g1", "mse"] == pytest.approx(np.mean((truth[:30, 1] - pred[:30, 1]) ** 2), rel=1e-5)
    valid = measured.ravel()
    flat = pearsonr(truth.ravel()[valid], pred.ravel()[valid])[0]
    assert df.attrs["summary"]["pearson_flattened"] == pytest.approx(flat, abs=1e-6)


def test_flattened_rewards_gene_levels_per_gene_does_not(rng):
    # predictions that get each gene's level right but its variation across tiles wrong: the flattened PCC (over
    # all tiles x genes) is high, the per-gene PCC is ~0
    n, g = 200, 20
    levels = np.linspace(0, 6, g)
    truth = levels + rng.normal(scale=0.3, size=(n, g))
    pred = levels + rng.normal(scale=0.3, size=(n, g))
    s = evaluate(_table(truth, pred), top_k=5, key_added=None).attrs["summary"]
    assert s["pearson_flattened"] > 0.95
    assert abs(s["pearson_mean_all"]) < 0.1


def test_hvg_chosen_on_train_adata(rng, caplog):
    n = 30
    truth = rng.normal(size=(n, 4)) * np.array([0.1, 5.0, 1.0, 0.2])  # g1 most variable on the evaluated data
    pred = truth + rng.normal(size=(n, 4))
    a = _table(truth, pred)
    train = ad.AnnData(X=(rng.normal(size=(n, 4)) * np.array([9.0, 0.1, 0.1, 3.0])).astype(np.float32),
                       var=pd.DataFrame(index=a.var_names))
    df = evaluate(a, top_k=2, train_adata=train)
    assert df.index[df["hvg"]].tolist() == ["g0", "g3"]
    s = df.attrs["summary"]
    assert s["hvg_source"] == "train_adata"
    assert s["pearson_mean_top2_hvg"] == pytest.approx(df.loc[["g0", "g3"], "pearson"].mean())
    with caplog.at_level("WARNING", logger="dbk"):
        df2 = evaluate(a, top_k=2)
    assert "evaluated data itself" in caplog.text
    assert df2.attrs["summary"]["hvg_source"] == "evaluated data"
    assert set(df2.index[df2["hvg"]]) == {"g1", "g2"}
    df3 = evaluate(a, top_k=1, hvg_genes=["g3", "g0"])
    assert df3.index[df3["hvg"]].tolist() == ["g3"]


def test_top_k_larger_than_genes_is_named_by_genes_used(rng, caplog):
    truth = rng.normal(size=(10, 3))
    with caplog.at_level("WARNING", logger="dbk"):
        s = evaluate(_table(truth, truth), top_k=50, hvg_genes=["g0"]).attrs["summary"]
    assert "pearson_mean_top3_best" in s and "pearson_mean_top50_best" not in s
    assert s["top_k"] == 3


def test_metrics_written_to_uns_and_h5ad(rng, tmp_path):
    truth = rng.normal(size=(12, 3))
    truth[:, 2] = 1.0
    a = _table(truth, truth + rng.normal(size=(12, 3)))
    a.uns["dbk"] = {"pseudobulk": {"source": "transcripts"}}
    df = evaluate(a, top_k=2, hvg_genes=["g0", "g1"])
    m = a.uns["dbk"]["metrics"]
    assert a.uns["dbk"]["pseudobulk"] == {"source": "transcripts"}  # other records kept
    assert m["per_gene"]["gene"] == ["g0", "g1", "g2"]
    assert m["summary"]["pearson_mean_all"] == pytest.approx(df.attrs["summary"]["pearson_mean_all"])
    a.write_h5ad(tmp_path / "t.h5ad")
    back = ad.read_h5ad(tmp_path / "t.h5ad").uns["dbk"]["metrics"]
    assert np.isnan(back["per_gene"]["pearson"][2])
    assert back["summary"]["hvg_source"] == "hvg_genes"


def test_prediction_columns_matched_by_name(rng):
    truth = rng.normal(size=(15, 3))
    a = _table(truth, truth)
    a.obsm["dbk_pred"] = a.obsm["dbk_pred"][["g2", "g0", "g1"]]  # other column order
    df = evaluate(a, top_k=2, key_added=None)
    assert np.allclose(df["pearson"], 1.0) and np.allclose(df["mse"], 0.0, atol=1e-12)
    a.obsm["dbk_pred"] = a.obsm["dbk_pred"][["g0"]]  # only one gene predicted: only it is evaluated
    assert evaluate(a, top_k=2, key_added=None).index.tolist() == ["g0"]
    with pytest.raises(KeyError, match="g1"):
        evaluate(a, genes=["g0", "g1"], key_added=None)
    a.obsm["dbk_pred"] = np.zeros((15, 3))
    with pytest.raises(TypeError, match="DataFrame"):
        evaluate(a, key_added=None)


def test_a_constant_predictor_logs_no_undefined_pearson_noise(caplog):
    import logging

    import anndata as ad
    import numpy as np
    import pandas as pd

    import dbk

    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.random((20, 3)), var=pd.DataFrame(index=["A", "B", "C"]))
    a.obs_names = [f"t{i}" for i in range(20)]
    a.obsm["mean"] = pd.DataFrame(np.tile([1.0, 2.0, 3.0], (20, 1)), index=a.obs_names, columns=["A", "B", "C"])
    a.obsm["half"] = a.obsm["mean"].copy()
    a.obsm["half"]["A"] = rng.random(20)  # one gene varies: the others' undefined Pearson is worth a line
    with caplog.at_level(logging.INFO, logger="dbk"):
        dbk.tl.evaluate(a, pred_key="mean", hvg_genes=["A", "B", "C"], key_added=None)
        assert "undefined Pearson" not in caplog.text
        dbk.tl.evaluate(a, pred_key="half", hvg_genes=["A", "B", "C"], key_added=None)
    assert "2 genes have an undefined Pearson" in caplog.text
