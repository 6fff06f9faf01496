"""What the plots give back and where they save, as scanpy's do; the in-sample mark on a model's training tiles."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from _builders import make_sdata
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import dbk
from dbk.pl._data import pearson

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def predicted_sdata():
    sdata, _ = make_sdata(50_000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    a = sdata.tables["dbk_table"]
    rng = np.random.default_rng(0)
    x = a.X.toarray()
    a.obsm["dbk_pred"] = pd.DataFrame(x + rng.normal(0, 0.3, x.shape), index=a.obs_names, columns=a.var_names)
    return sdata


@pytest.fixture
def figdir(tmp_path, monkeypatch):
    """dbk.settings.figdir in a temporary folder, the working folder another one (suffixes must not land there)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(dbk.settings, "figdir", tmp_path / "figs")
    return tmp_path / "figs"


def _calls(sdata):
    """One call per plot function (not ``generated``: test_pl.py covers it), with the panels each draws."""
    a = sdata.tables["dbk_table"]
    hist = [{"step": i, "loss": 1.0 / i} for i in range(1, 6)]
    bench = pd.DataFrame({"method": ["mean", "ridge"] * 2, "fold": [0, 0, 1, 1], "pearson_mean_all": [0, .1, 0, .2]})
    return {
        "spatial": (lambda **kw: dbk.pl.spatial(sdata, ["A", "B"], **kw), 4),
        "scatter": (lambda **kw: dbk.pl.scatter(a, "A", **kw), 1),
        "tiles": (lambda **kw: dbk.pl.tiles(sdata, "n_transcripts", **kw), 1),
        "gene_metrics": (lambda **kw: dbk.pl.gene_metrics(a, top_k=2, **kw), 1),
        "benchmark": (lambda **kw: dbk.pl.benchmark(bench, **kw), 1),
        "training_history": (lambda **kw: dbk.pl.training_history(hist, **kw), 1),
    }


def test_show_false_returns_the_axes_of_the_figure_drawn(predicted_sdata):
    for name, (plot, n_panels) in _calls(predicted_sdata).items():
        before = set(plt.get_fignums())
        out = plot(show=False)
        (num,) = set(plt.get_fignums()) - before  # one new figure, left open (nothing was saved)
        fig = plt.figure(num)
        axes = [out] if n_panels == 1 else out
        if n_panels == 1:
            assert isinstance(out, Axes), name
        else:
            assert isinstance(out, list) and len(out) == n_panels and all(isinstance(x, Axes) for x in out), name
        assert all(x.figure is fig for x in axes), name
        # the panels drawn, in order (not the colour bars)
        drawn = [x for x in fig.axes if x.get_visible() and (x.get_title() or x.has_data() or x.images)]
        assert axes == drawn[:n_panels], name
        plt.close(fig)
    out = dbk.pl.spatial(predicted_sdata, ["A", "B"], show=False)
    assert [x.get_title().split(" (")[0] for x in out] == ["A measured", "A predicted", "B measured", "B predicted"]
    plt.close(out[0].figure)


def test_show_none_with_ax_returns_that_ax_and_return_fig_the_figure(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    fig, ax = plt.subplots()
    assert dbk.pl.scatter(a, "A", ax=ax) is ax  # show=None: the caller's axes are not shown, they come back
    assert "r = " in ax.get_title()
    fig2, axs = plt.subplots(1, 2)
    assert dbk.pl.spatial(a, "A", ax=axs) == list(axs)
    plt.close(fig)
    plt.close(fig2)
    for name, (plot, _) in _calls(predicted_sdata).items():
        out = plot(return_fig=True, show=False)
        assert isinstance(out, Figure), name
        assert any(x.get_title() for x in out.axes), name
        plt.close(out)


def test_show_none_on_agg_does_not_call_show(predicted_sdata, monkeypatch):
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    out = dbk.pl.scatter(predicted_sdata.tables["dbk_table"], "A")  # Agg: not interactive, so not shown
    assert isinstance(out, Axes) and shown == []
    assert dbk.pl.scatter(predicted_sdata.tables["dbk_table"], "A", show=True) is None and shown == [1]
    plt.close("all")


def test_save_suffix_writes_into_figdir(predicted_sdata, figdir):
    calls = _calls(predicted_sdata)
    for name, (plot, _) in calls.items():
        before = set(plt.get_fignums())
        plot(save="_x.png", show=False)
        path = figdir / f"{name}_x.png"
        assert path.read_bytes()[:8] == PNG, name
        assert set(plt.get_fignums()) == before, f"{name}: saved and not shown, the figure is closed"
    assert sorted(p.name for p in figdir.iterdir()) == sorted(f"{n}_x.png" for n in calls)  # no temporary left
    plot = calls["scatter"][0]
    plot(save=".pdf", show=False)
    assert (figdir / "scatter.pdf").read_bytes()[:4] == b"%PDF"
    plot(save=True, show=False)
    assert (figdir / "scatter.png").read_bytes()[:8] == PNG
    plot(save="_no_extension", show=False)  # scanpy's suffix without a format: png
    assert (figdir / "scatter_no_extension.png").read_bytes()[:8] == PNG
    assert list(Path.cwd().iterdir()) == []  # nothing in the working folder


def test_save_path_is_written_as_given(predicted_sdata, figdir, tmp_path):
    a = predicted_sdata.tables["dbk_table"]
    ax = dbk.pl.scatter(a, "A", save="out/a.png", show=False)  # a folder: a path, made when missing
    assert isinstance(ax, Axes)
    assert (Path.cwd() / "out" / "a.png").read_bytes()[:8] == PNG
    fig = dbk.pl.scatter(a, "A", save="b.svg", return_fig=True)  # an extension: a path in the working folder
    assert isinstance(fig, Figure) and plt.fignum_exists(fig.number)  # returned: left open
    assert b"<svg" in (Path.cwd() / "b.svg").read_bytes()[:2000]
    dbk.pl.scatter(a, "A", save=tmp_path / "c", show=False)  # a Path; no extension: png, as matplotlib does
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    assert not figdir.exists()
    assert sorted(p.name for p in (Path.cwd() / "out").iterdir()) == ["a.png"]
    (Path.cwd() / "d.png").mkdir()
    with pytest.raises(IsADirectoryError, match="d.png: it is a folder"):
        dbk.pl.scatter(a, "A", save="d.png", show=False)
    with pytest.raises(TypeError, match="save must be"):
        dbk.pl.scatter(a, "A", save=3, show=False)
    plt.close("all")


def test_a_failed_save_leaves_the_old_file(tmp_path, monkeypatch):
    from dbk.pl._utils import write_figure

    path = tmp_path / "fig.png"
    path.write_bytes(b"old")
    fig, _ = plt.subplots()

    def broken(fname, **kw):
        Path(fname).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_figure(fig, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    plt.close(fig)


# ---- in-sample ------------------------------------------------------------------------------------------------------

TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
        "log_every": 5}
# seconds on a CPU: untrained stage 1, a ridge head, a random-weight timm encoder (offline)
FIT = {"fm_size_px": 32, "preset": "tiny", "pretrain_steps": 0, "pretrain_kwargs": TINY, "tile_size_um": 32.0,
       "fusion": "ridge", "head_cv": 0, "random_state": 0}


def _tiled(seed: int, sample: str):
    sd = dbk.datasets.synthetic(shape=(512, 512), n_genes=8, include_cells=False, random_state=seed)
    sd.attrs["sample"] = sample
    dbk.pp.make_tiles(sd, tile_size_um=32.0)
    dbk.pp.pseudobulk(sd)
    return sd


@pytest.fixture(scope="module")
def fitted():
    import timm
    import torch

    torch.manual_seed(0)
    enc = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0).eval()
    progress = dbk.settings.progress
    dbk.settings.progress = False
    train, held = _tiled(0, "train"), _tiled(1, "held")
    try:
        model = dbk.tl.fit_diffbulk(train, fm=enc, **FIT)
        model.predict(held)  # a slide with measured genes the model never saw
    finally:
        dbk.settings.progress = progress
    return model, train, held


def _predicted_title(sdata, gene):
    fig = dbk.pl.spatial(sdata, gene, return_fig=True)
    title = next(x.get_title() for x in fig.axes if x.get_title().startswith(f"{gene} predicted"))
    plt.close(fig)
    return title


def _r(sdata, gene):
    a = sdata.tables["dbk_table"]
    return pearson(a[:, gene].X.toarray().ravel(), a.obsm["dbk_pred"][gene].to_numpy(dtype=float))


def test_training_slide_is_marked_in_sample_held_out_slide_is_not(fitted):
    model, train, held = fitted
    gene = model.genes[0]
    assert train.tables["dbk_table"].uns["dbk_pred"]["params"]["fit_id"] == model.config["fit_id"]
    assert held.tables["dbk_table"].uns["dbk"]["predict"]["fit_id"] == model.config["fit_id"]
    assert _predicted_title(train, gene) == f"{gene} predicted (r = {_r(train, gene):.2f}, in-sample)"
    assert _predicted_title(held, gene) == f"{gene} predicted (r = {_r(held, gene):.2f})"
    ax = dbk.pl.scatter(train, gene, show=False)
    assert ax.get_title().startswith(f"{gene}: r = {_r(train, gene):.2f}, in-sample (n = ")
    plt.close(ax.figure)
    ax = dbk.pl.scatter(held, gene, show=False)
    assert "in-sample" not in ax.get_title() and f"r = {_r(held, gene):.2f}" in ax.get_title()
    plt.close(ax.figure)


def test_in_sample_follows_the_model_that_predicted(fitted):
    model, train, _ = fitted
    gene = model.genes[0]
    sd = model.predict(train, copy=True)  # the model on its own training slide: still in-sample
    assert sd.tables["dbk_table"].uns["dbk_pred"]["params"]["fit_id"] == model.config["fit_id"]
    assert "in-sample" in _predicted_title(sd, gene)
    rec = sd.tables["dbk_table"].uns["dbk"]["predict"]
    rec["fit_id"] = "another-fit"  # predictions by another model: not marked
    assert "in-sample" not in _predicted_title(sd, gene)
    del rec["fit_id"]  # a model saved before fit ids: unknown, not marked
    assert "in-sample" not in _predicted_title(sd, gene)


def test_a_fit_drops_an_earlier_predict_record_of_its_key():
    from dbk.tl._fit_steps import write_back

    sd = _tiled(2, "s")
    a = sd.tables["dbk_table"]
    a.uns["dbk"] = {"predict": {"pred_key": "dbk_pred", "fit_id": "old", "cv_pearson": [0.9], "genes": ["A"]}}
    rows = [f"s:{o}" for o in a.obs_names]
    pred = pd.DataFrame(1.0, index=rows, columns=list(a.var_names))
    write_back([sd], ["s"], pred, table_key="dbk_table", key_added="other", results={"params": {"fit_id": "new"}})
    assert a.uns["dbk"]["predict"]["fit_id"] == "old"  # another key's record stays
    write_back([sd], ["s"], pred, table_key="dbk_table", key_added="dbk_pred", results={"params": {"fit_id": "new"}})
    assert "predict" not in a.uns["dbk"]  # stale: the predictions it described were replaced
    assert dbk.pl._data.in_sample(a, "dbk_pred").all()


def test_split_slide_gives_held_out_and_in_sample_r_apart(predicted_sdata):
    a = predicted_sdata.tables["dbk_table"]
    split = np.where(np.arange(a.n_obs) % 4 == 0, "test", "train")
    a.obs["dbk_split"] = pd.Categorical(split)
    a.uns["dbk_pred"] = {"params": {"fit_id": "f1"}, "split_key": "dbk_split"}
    a.uns["dbk"] = {"predict": {"pred_key": "dbk_pred", "fit_id": "f1", "genes": ["A", "B", "C"],
                                "cv_pearson": [0.66, 0.5, np.nan]}}
    x, y = a[:, "A"].X.toarray().ravel(), a.obsm["dbk_pred"]["A"].to_numpy()
    test = split == "test"
    r_out, r_in = pearson(x[test], y[test]), pearson(x[~test], y[~test])
    assert abs(r_out - r_in) > 0.005  # the two numbers can be told apart
    want = f"held-out r = {r_out:.2f} on {int(test.sum())} tiles, in-sample r = {r_in:.2f}"
    assert _predicted_title(predicted_sdata, "A") == f"A predicted ({want})\nCV r = 0.66"
    ax = dbk.pl.scatter(a, "A", show=False)
    assert ax.get_title() == f"A: {want} (n = {a.n_obs} tiles)\nCV r = 0.66"
    plt.close(ax.figure)
    a.uns["dbk_pred"] = {"params": {"fit_id": "f1"}}  # no split: every tile trained the model
    ax = dbk.pl.scatter(a, "A", show=False)
    assert ax.get_title() == f"A: r = {pearson(x, y):.2f}, in-sample (n = {a.n_obs} tiles)\nCV r = 0.66"
    plt.close(ax.figure)
    del a.uns["dbk_pred"]  # no record of a fit: a held-out slide
    assert _predicted_title(predicted_sdata, "A") == f"A predicted (r = {pearson(x, y):.2f})\nCV r = 0.66"
