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
    plt.close(fig)


def test_spatial_anndata_and_errors(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    fig = dbk.pl.spatial(a, "C", kinds=("predicted",), return_fig=True)
    ax = [x for x in fig.axes if x.get_title()][0]
    assert ax.get_title().startswith("C predicted") and len(ax.collections[0].get_offsets()) == a.n_obs
    plt.close(fig)
    with pytest.raises(KeyError, match="Gene 'nope'"):
        dbk.pl.spatial(a, "nope")
    with pytest.raises(ValueError, match="kinds"):
        dbk.pl.spatial(a, "A", kinds=("residual",))
    b = a.copy()
    del b.obsm["dbk_pred"]
    with pytest.raises(KeyError, match="No predictions"):
        dbk.pl.spatial(b, "A")


def test_scatter_identity_and_r(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    fig, ax = plt.subplots()
    assert dbk.pl.scatter(a, "A", ax=ax, show=False) is None
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
    plt.close(fig)


def test_gene_metrics_ranked_and_mean(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    per_gene = dbk.tl.evaluate(a)
    fig = dbk.pl.gene_metrics(per_gene, top=3, return_fig=True)
    ax = fig.axes[0]
    bars = [p.get_width() for p in ax.patches]
    assert len(bars) == 3
    best = per_gene["pearson"].sort_values(ascending=False).iloc[:3]
    assert np.allclose(sorted(bars, reverse=True), best.to_numpy())
    (mean_line,) = [ln for ln in ax.lines if ln.get_label().startswith("mean")]
    assert np.isclose(mean_line.get_xdata()[0], per_gene["pearson"].mean())
    plt.close(fig)
    fig = dbk.pl.gene_metrics(a, metric="mse", top=2, return_fig=True)  # evaluated on the fly, lowest first
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


def test_training_history():
    hist = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(1, 21)]
    fig = dbk.pl.training_history(hist, smooth=1, return_fig=True)
    (line,) = fig.axes[0].lines
    assert np.allclose(line.get_ydata(), [h["loss"] for h in hist])
    plt.close(fig)
    with pytest.raises(ValueError, match="no training history"):
        dbk.pl.training_history([])
