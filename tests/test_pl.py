from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _builders import make_sdata

import dbk


@pytest.fixture
def predicted_sdata():
    sdata, _ = make_sdata(50_000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    a = sdata.tables["dbk_table"]
    rng = np.random.default_rng(0)
    x = a.X.toarray()
    a.obsm["dbk_pred"] = pd.DataFrame(x + rng.normal(0, 0.05, x.shape), index=a.obs_names, columns=a.var_names)
    return sdata


def _r(a, gene):
    m = a[:, gene].X.toarray().ravel()
    return np.corrcoef(m, a.obsm["dbk_pred"][gene].to_numpy())[0, 1]


def test_spatial_shared_scale_titles(predicted_sdata):
    fig = dbk.pl.spatial(predicted_sdata, ["A", "B"], return_fig=True)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(" (")[0] for ax in axes] == ["A measured", "A predicted", "B measured",
                                                              "B predicted"]
    a = predicted_sdata.tables["dbk_table"]
    for gene, (m_ax, p_ax) in zip("AB", [axes[0:2], axes[2:4]], strict=True):
        cm, cp = m_ax.collections[0], p_ax.collections[0]
        assert cm.get_clim() == cp.get_clim()  # one colour scale per gene
        assert len(cm.get_paths()) == a.n_obs
        assert f"r = {_r(a, gene):.2f}" in p_ax.get_title()
        assert m_ax.images, "the H&E is drawn under the tiles"
    colorbars = [ax for ax in fig.axes if not ax.get_title()]
    assert len(colorbars) == 2  # one per gene, shared by its measured and predicted panels
    assert [cb.get_ylabel() for cb in colorbars] == ["A, log1p expression", "B, log1p expression"]
    plt.close(fig)


def test_spatial_anndata_and_errors(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    fig = dbk.pl.spatial(a, "C", kinds=("predicted",), return_fig=True)
    ax = next(x for x in fig.axes if x.get_title())
    assert ax.get_title().startswith("C predicted") and len(ax.collections[0].get_offsets()) == a.n_obs
    plt.close(fig)
    with pytest.raises(KeyError, match="Gene 'nope'"):
        dbk.pl.spatial(a, "nope")
    with pytest.raises(ValueError, match="kinds"):
        dbk.pl.spatial(a, "A", kinds=("residual",))
    b = a.copy()
    del b.obsm["dbk_pred"]
    with pytest.raises(KeyError, match="No predictions"):
        dbk.pl.spatial(b, "A", kinds=("measured", "predicted"))
    fig = dbk.pl.spatial(b, "A", return_fig=True)  # no predictions: the measured map only
    assert [x.get_title() for x in fig.axes if x.get_title()] == ["A measured"]
    plt.close(fig)


@pytest.fixture
def he_only_sdata(predicted_sdata):
    """An H&E-only slide as a model's predict leaves it: tiles, a table with no genes, predictions in obsm."""
    from dbk.tl._embed import _image_only_table

    a = predicted_sdata.tables["dbk_table"]
    sdata, _ = make_sdata(10)
    del sdata.points["transcripts"]
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    _image_only_table(sdata, "dbk_tiles", "dbk_table")
    t = sdata.tables["dbk_table"]
    assert t.n_vars == 0 and t.n_obs == a.n_obs
    rng = np.random.default_rng(1)
    t.obsm["dbk_pred"] = pd.DataFrame(rng.normal(size=(t.n_obs, 3)), index=t.obs_names, columns=["A", "B", "C"])
    return sdata


def test_spatial_predictions_only_slide(he_only_sdata):
    t = he_only_sdata.tables["dbk_table"]
    fig = dbk.pl.spatial(he_only_sdata, ["A", "C"], return_fig=True)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["A predicted", "C predicted"]  # no measured panel, no r
    for gene, axis in zip("AC", axes, strict=True):
        pc = axis.collections[0]
        np.testing.assert_allclose(np.ma.filled(pc.get_array(), np.nan), t.obsm["dbk_pred"][gene].to_numpy())
        assert axis.images
    plt.close(fig)
    with pytest.raises(KeyError, match=r"no measured values.*kinds=\('predicted',\)"):
        dbk.pl.spatial(he_only_sdata, "A", kinds=("measured", "predicted"))


def test_spatial_scale_of_a_rarely_detected_gene():
    import anndata as ad

    yy, xx = np.mgrid[0:15, 0:20]
    x = np.zeros((300, 2), np.float32)
    x[0, 0] = 3.0  # gene A detected on one tile of 300: the 99% quantile is 0
    a = ad.AnnData(X=x, var=pd.DataFrame(index=["A", "B"]),
                   obsm={"spatial": np.column_stack([xx.ravel(), yy.ravel()]).astype(float)})
    fig = dbk.pl.spatial(a, "A", kinds=("measured",), return_fig=True)
    assert fig.axes[0].collections[0].get_clim() == (0.0, 3.0)
    plt.close(fig)
    a.X = np.zeros_like(x)  # never detected
    fig = dbk.pl.spatial(a, "A", kinds=("measured",), return_fig=True)
    assert fig.axes[0].collections[0].get_clim() == (0.0, 1.0)
    plt.close(fig)


def test_scatter_identity_and_r(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    fig, ax = plt.subplots()
    assert dbk.pl.scatter(a, "A", ax=ax, show=False) is ax  # scanpy's rule: not shown, the axes come back
    assert f"r = {_r(a, 'A'):.2f}" in ax.get_title()
    (line,) = [ln for ln in ax.lines if ln.get_label() == "_identity"]
    xs, ys = line.get_data()
    assert np.allclose(xs, ys)
    assert len(ax.collections[0].get_offsets()) == a.n_obs
    plt.close(fig)


def test_tiles_colour_by_obs(predicted_sdata):
    fig = dbk.pl.tiles(predicted_sdata, "n_transcripts", return_fig=True)
    ax = fig.axes[0]
    pc = ax.collections[0]
    assert ax.get_title() == "n_transcripts"
    a = predicted_sdata.tables["dbk_table"]
    assert np.allclose(np.asarray(pc.get_array()), a.obs["n_transcripts"].to_numpy())
    # the view is the tiles plus a 5% margin (the thumbnail is the full-resolution 1400 x 1000 image here)
    b = dbk.pp.tile_bounds(predicted_sdata)
    pad = 0.05 * max(b[:, 2].max() - b[:, 0].min(), b[:, 3].max() - b[:, 1].min())
    np.testing.assert_allclose(ax.get_xlim(), [b[:, 0].min() - pad, b[:, 2].max() + pad])
    np.testing.assert_allclose(ax.get_ylim(), [b[:, 3].max() + pad, b[:, 1].min() - pad])
    plt.close(fig)


def test_tiles_colour_by_category_with_missing(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    labels = np.array(["tumour", "stroma", "immune"])[np.arange(a.n_obs) % 3].astype(object)
    labels[0] = np.nan
    a.obs["domain"] = pd.Categorical(labels, categories=["tumour", "stroma", "immune"])
    fig = dbk.pl.tiles(predicted_sdata, "domain", return_fig=True)
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["tumour", "stroma", "immune", "NA"]
    faces = ax.collections[0].get_facecolors()[:, :3]
    # tiles are in the table's order here: equal labels, equal colours; three distinct colours and grey for NA
    assert np.allclose(faces[0], matplotlib.colors.to_rgb("lightgray"))
    assert len({tuple(f) for f in faces[1:]}) == 3
    assert np.allclose(faces[3], faces[6]) and not np.allclose(faces[1], faces[2])
    plt.close(fig)


def test_gene_metrics_ranked_and_mean(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    per_gene = dbk.tl.evaluate(a)
    fig = dbk.pl.gene_metrics(per_gene, top_k=3, return_fig=True)
    ax = fig.axes[0]
    bars = [p.get_width() for p in ax.patches]
    assert len(bars) == 3
    best = per_gene["pearson"].sort_values(ascending=False).iloc[:3]
    assert np.allclose(sorted(bars, reverse=True), best.to_numpy())
    (mean_line,) = [ln for ln in ax.lines if ln.get_label().startswith("mean")]
    assert np.isclose(mean_line.get_xdata()[0], per_gene["pearson"].mean())
    plt.close(fig)
    fig = dbk.pl.gene_metrics(a, metric="mse", top_k=2, return_fig=True)  # evaluated on the fly, lowest first
    assert "lowest 2" in fig.axes[0].get_title()
    plt.close(fig)


def test_benchmark_bars_and_folds():
    res = pd.DataFrame({"method": ["mean"] * 3 + ["ridge"] * 3, "fold": [0, 1, 2] * 2,
                        "pearson_mean_all": [0.0, 0.01, -0.01, 0.1, 0.12, 0.08]})
    fig = dbk.pl.benchmark(res, return_fig=True)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert np.allclose(heights, [0.0, 0.1], atol=1e-9)  # ordered by mean, best last
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mean", "ridge"]
    assert sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets")) >= 6
    plt.close(fig)
    # a method whose metric is undefined on every fold is shown first and marked, not dropped
    nan = pd.DataFrame({"method": ["const"] * 3, "fold": [0, 1, 2], "pearson_mean_all": [np.nan] * 3})
    fig = dbk.pl.benchmark(pd.concat([res, nan]), return_fig=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["const", "mean", "ridge"]
    assert np.allclose([p.get_height() for p in ax.patches], [0.0, 0.0, 0.1], atol=1e-9)
    assert [t.get_text() for t in ax.texts] == ["undefined"]
    plt.close(fig)
    res["mse_mean_all"] = [1.0, 1.1, 0.9, 0.5, 0.6, 0.4]
    fig = dbk.pl.benchmark(res, metric="mse_mean_all", return_fig=True)  # errors: lowest (best) last
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mean", "ridge"]
    assert np.allclose([p.get_height() for p in ax.patches], [1.0, 0.5])
    assert "lower is better" in ax.get_title()
    plt.close(fig)


def test_training_history():
    hist = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(1, 21)]
    fig = dbk.pl.training_history(hist, smooth=1, return_fig=True)
    (line,) = fig.axes[0].lines
    assert np.allclose(line.get_ydata(), [h["loss"] for h in hist])
    plt.close(fig)
    fig = dbk.pl.training_history(hist, smooth=3, return_fig=True)
    raw, avg = fig.axes[0].lines
    assert np.allclose(raw.get_ydata(), [h["loss"] for h in hist])
    assert np.isclose(avg.get_ydata()[5], np.mean([h["loss"] for h in hist[4:7]]))  # centred: no lag
    assert avg.get_label() == "loss (moving mean of 3)"
    plt.close(fig)
    with pytest.raises(ValueError, match="no training history"):
        dbk.pl.training_history([])


@pytest.fixture(scope="module")
def pretrainer():
    sdata, _ = make_sdata(20_000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    model = dbk.tl.fit_pretrainer(sdata, preset="tiny", image_size=16, block_out_channels=(16, 32), gene_dim=32,
                                  batch_size=8, warmup_steps=1, max_steps=2, random_state=0)
    return model, sdata


def test_generated_next_to_real_tiles(pretrainer):
    model, sdata = pretrainer
    rows = sdata.tables["dbk_table"][[3, 0, 7]]
    fig = dbk.pl.generated(model, rows, sdata, n_samples=2, n_steps=2, return_fig=True)
    assert len(fig.axes) == 3 * 3  # rows = tiles, columns = real | generated #1 | generated #2
    images = [ax.images[0].get_array() for ax in fig.axes]
    assert all(ax.images and len(ax.images) == 1 for ax in fig.axes)
    assert all(np.asarray(im).shape == (16, 16, 3) for im in images)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["real", "generated #1", "generated #2"]
    assert all(ax.get_title() == "" for ax in fig.axes[3:])
    assert [fig.axes[i * 3].get_ylabel() for i in range(3)] == [f"tile {t}" for t in rows.obs_names]
    # the real column holds each profile's own tile, the generated ones what generate gives for those seeds
    reader = dbk.pp.TileDataset(sdata, size_px=16)
    pos = pd.Index(reader.tile_ids).get_indexer(rows.obs["instance_id"])
    for i in range(3):
        np.testing.assert_array_equal(images[i * 3], reader.read(int(pos[i])))
    np.testing.assert_array_equal(np.stack(images[1::3]), model.generate(rows, n_steps=2, random_state=0))
    np.testing.assert_array_equal(np.stack(images[2::3]), model.generate(rows, n_steps=2, random_state=1))
    plt.close(fig)


def test_generated_arrays_axes_and_errors(pretrainer):
    model, sdata = pretrainer
    rows = sdata.tables["dbk_table"][:2]
    real = np.zeros((2, 40, 40, 3), np.uint8)
    fig, axes = plt.subplots(2, 2)
    assert dbk.pl.generated(model, rows, real, n_steps=2, ax=axes, show=False) == list(axes.ravel())
    assert [ax.get_title() for ax in axes[0]] == ["real", "generated"]
    assert axes[1, 0].images[0].get_array().shape == (40, 40, 3)
    plt.close(fig)
    fig = dbk.pl.generated(model, [{"A": 2.0}, None], n_steps=2, return_fig=True)  # generated only
    assert len(fig.axes) == 2 and [ax.get_ylabel() for ax in fig.axes] == ["profile 0", "profile 1"]
    plt.close(fig)
    with pytest.raises(ValueError, match="3 real tiles for 2 profiles"):
        dbk.pl.generated(model, rows, np.zeros((3, 16, 16, 3), np.uint8), n_steps=1)
    with pytest.raises(TypeError, match="rows of its tile table"):
        dbk.pl.generated(model, [{"A": 1.0}], sdata, n_steps=1)


def test_predictions_to_adata_for_scanpy(predicted_sdata, he_only_sdata):
    a = predicted_sdata.tables["dbk_table"]
    out = dbk.tl.predictions_to_adata(predicted_sdata, measured_layer="log1p")
    pred = a.obsm["dbk_pred"]
    assert out is not a and list(out.obs_names) == list(a.obs_names)
    assert list(out.var_names) == list(pred.columns)
    np.testing.assert_allclose(out.X, pred.to_numpy(), rtol=1e-6)
    assert out.X.dtype == np.float32
    np.testing.assert_array_equal(out.obsm["spatial"], a.obsm["spatial"])
    assert "dbk_pred" not in out.obsm
    np.testing.assert_allclose(out.layers["log1p"], a[:, list(pred.columns)].X.toarray())
    assert out.obs["sample"].equals(a.obs["sample"])
    out.obsm["spatial"][0, 0] = -1.0  # a copy: the table is untouched
    assert a.obsm["spatial"][0, 0] != -1.0
    # an H&E-only slide, a gene subset, and scanpy on the result
    t = he_only_sdata.tables["dbk_table"]
    only = dbk.tl.predictions_to_adata(t, genes=["C", "A"])
    assert list(only.var_names) == ["C", "A"]
    np.testing.assert_allclose(only.X[:, 1], t.obsm["dbk_pred"]["A"].to_numpy(), rtol=1e-6)
    import scanpy as sc

    sc.pp.pca(only, n_comps=1)
    assert only.obsm["X_pca"].shape == (t.n_obs, 1)
    with pytest.raises(KeyError, match="not in the table"):
        dbk.tl.predictions_to_adata(t, measured_layer="log1p")
    with pytest.raises(KeyError, match="not predicted"):
        dbk.tl.predictions_to_adata(t, genes=["Z"])
    with pytest.raises(KeyError, match="No predictions"):
        dbk.tl.predictions_to_adata(predicted_sdata.tables["dbk_table"][:, :0].copy(), pred_key="nope")
