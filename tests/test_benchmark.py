"""dbk.tl.benchmark: folds that never train on their test slides, the method registry, one stage-1 model per fold
shared by the DiffBulk methods, failures that are recorded (never dropped), the tidy table and its summaries."""

from __future__ import annotations

import copy
import inspect
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import dbk
from dbk.tl import _benchmark_methods as registry

# three small synthetic slides (47, 37 and 81 tiles of 28 µm, 8 genes), 32 px FM input, a 16 px stage 1
SLIDE = {"shape": (512, 512), "n_genes": 8}
TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 2,
        "log_every": 5}
RUN = {"tile_size_um": 28.0, "fm_size_px": 32, "top_k": 5, "random_state": 0, "accelerator": "cpu"}
STAGE1 = {"preset": "tiny", "pretrain_steps": 3, "pretrain_kwargs": TINY}
NAMES = ["s0", "s1", "s2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for the module


@pytest.fixture(autouse=True)
def _registry():
    """Methods registered by a test are removed after it."""
    before = dict(registry._METHODS)
    yield
    registry._METHODS.clear()
    registry._METHODS.update(before)


def _raw(seed: int):
    sd = dbk.datasets.synthetic(**SLIDE, random_state=seed)
    sd.attrs["sample"] = f"s{seed}"
    return sd


@pytest.fixture(scope="module")
def slides():
    """The three slides with tiles, pseudo-bulk and FM embeddings (prepared once for the module)."""
    dbk.settings.progress = False
    out = [_raw(i) for i in range(3)]
    dbk.pp.prepare_slides(out, tile_size_um=28.0)
    net, _ = dbk.tl.load_foundation_model("efficientnet_lite0", device="cpu")
    for sd in out:
        dbk.tl.embed_tiles(sd, fm=net, fm_size_px=32, accelerator="cpu", key_added="X_efficientnet_lite0")
    return out


def _table(sd):
    return sd.tables["dbk_table"]


def _snapshot(sd) -> dict:
    a = _table(sd)
    out = {"X": a.X.toarray() if sp.issparse(a.X) else np.array(a.X), "obs": a.obs.copy(), "var": a.var.copy(),
           "uns": pickle.dumps(dict(a.uns)), "layers": sorted(k for k in a.layers if k is not None),
           "shapes": {k: v.copy() for k, v in sd.shapes.items()}, "tables": sorted(sd.tables),
           "images": sorted(sd.images), "attrs": sorted(sd.attrs)}
    out["obsm"] = {k: (v.copy() if isinstance(v, pd.DataFrame) else np.array(v)) for k, v in a.obsm.items()}
    return out


def _same(before: dict, after: dict, allowed_prefix: str) -> None:
    assert np.array_equal(before["X"], after["X"])
    pd.testing.assert_frame_equal(before["obs"], after["obs"])
    pd.testing.assert_frame_equal(before["var"], after["var"])
    assert before["uns"] == after["uns"], "uns changed"
    for k in ("layers", "tables", "images", "attrs"):
        assert before[k] == after[k], k
    assert before["shapes"].keys() == after["shapes"].keys()
    for k in before["shapes"]:
        assert before["shapes"][k].equals(after["shapes"][k]), f"shapes[{k!r}] changed"
    new = set(after["obsm"]) - set(before["obsm"])
    assert all(k.startswith(allowed_prefix) for k in new), f"undocumented obsm keys {new}"
    for k, v in before["obsm"].items():
        if k.startswith(allowed_prefix):
            continue
        w = after["obsm"][k]
        assert (v.equals(w) if isinstance(v, pd.DataFrame) else np.array_equal(v, w)), f"obsm[{k!r}] changed"


# ---- leave one slide out with baselines and a user method ------------------------------------------------------------


def test_loso_baselines_user_method_predictions_and_no_mutation(slides):
    seen = []

    def train_mean_of_genes(fold: dbk.tl.BenchmarkFold):
        """A user method: records what it sees, predicts each gene's training mean."""
        seen.append(fold)
        assert isinstance(fold.train, type(fold.test)) and fold.fm_key in fold.train.obsm
        assert list(fold.train.var_names) == fold.genes and list(fold.test.var_names) == fold.genes
        assert set(fold.groups) == set(fold.train_slides) and len(fold.groups) == fold.train.n_obs
        assert fold.options == {"shift": 0.0}
        x = fold.train.X.toarray() if sp.issparse(fold.train.X) else np.asarray(fold.train.X)
        pred = np.tile(x.mean(axis=0) + fold.options["shift"], (fold.test.n_obs, 1))
        return pd.DataFrame(pred, index=fold.test.obs_names, columns=fold.genes), {"n_train": fold.train.n_obs}

    dbk.tl.register_method("user_mean", train_mean_of_genes, description="the training mean, by hand")
    listed = dbk.tl.benchmark_methods()
    assert list(listed.columns) == ["name", "family", "description"]
    assert {"mean", "ridge_cv", "ridge_rr_ctx", "diffbulk", "shuffled", "diffbulk_untrained",
            "diffbulk_no_genes", "user_mean"} <= set(listed["name"])
    assert listed.set_index("name").loc["diffbulk_ridge", "family"] == "diffbulk"

    before = [_snapshot(sd) for sd in slides]
    res = dbk.tl.benchmark(slides, methods=["mean", "ridge_cv", "user_mean"], split="loso",
                           method_kwargs={"user_mean": {"shift": 0.0}}, key_added="bench", **RUN)

    # the tidy table: 3 folds x 3 methods, one row per metric, seconds per (fold, method)
    assert list(res.columns) == ["split", "fold", "method", "metric", "value", "seconds"]
    assert set(res["split"]) == {"loso"} and list(pd.unique(res["fold"])) == NAMES
    assert list(pd.unique(res["method"])) == ["mean", "ridge_cv", "user_mean"]
    assert {"pearson_mean_all", "pearson_mean_top5_hvg", "spearman_mean_all", "mse_mean_all",
            "mae_mean_all"} <= set(res["metric"])
    assert not res.duplicated(["fold", "method", "metric"]).any()
    assert (res.groupby(["fold", "method"])["seconds"].nunique() == 1).all() and (res["seconds"] >= 0).all()

    # each slide is the test slide once, and never a training slide of its own fold
    folds = res.attrs["folds"]
    assert sorted(t for f in folds.values() for t in f["test"]) == NAMES
    for name, f in folds.items():
        assert f["test"] == [name] and name not in f["train"] and sorted(f["train"] + f["test"]) == NAMES
    assert len(seen) == 3
    for fold in seen:
        assert set(fold.test_slides) == {fold.name} and fold.name not in fold.train_slides
        assert not set(fold.train.obs["sample"].astype(str)) & set(fold.test.obs["sample"].astype(str))
        assert fold.test.n_obs == _table(slides[NAMES.index(fold.name)]).n_obs

    # the user method ran and is in the table, with its info; it equals the built-in mean predictor
    wide = res.pivot_table(index="fold", columns=["method", "metric"], values="value")
    assert np.allclose(wide[("user_mean", "mse_mean_all")], wide[("mean", "mse_mean_all")], rtol=1e-5)
    assert res.attrs["info"]["s0"]["user_mean"] == {"n_train": folds["s0"]["n_train_tiles"]}

    # signal: ridge_cv beats the training mean on MSE in every fold
    assert (wide[("ridge_cv", "mse_mean_all")] < wide[("mean", "mse_mean_all")]).all()

    # held-out predictions on each test slide: tiles x genes, the table's index, no gaps in LOSO
    genes = res.attrs["genes"]
    assert genes == list(_table(slides[0]).var_names)  # every gene is on every slide here
    for sd in slides:
        a = _table(sd)
        for m in ("mean", "ridge_cv", "user_mean"):
            df = a.obsm[f"bench_{m}"]
            assert isinstance(df, pd.DataFrame) and df.shape == (a.n_obs, len(genes))
            assert df.index.equals(a.obs_names) and list(df.columns) == genes and np.isfinite(df.to_numpy()).all()
        # the stored predictions are the ones evaluated
        a.obsm["_check"] = a.obsm["bench_ridge_cv"]
        ev = dbk.tl.evaluate(a, pred_key="_check", key_added=None, top_k=5)
        del a.obsm["_check"]
        got = res.query("fold == @sd.attrs['sample'] and method == 'ridge_cv' and metric == 'mse_mean_all'")
        assert np.isclose(ev.attrs["summary"]["mse_mean_all"], got["value"].item(), rtol=1e-5)
        # the per-gene test scores in attrs: plain {gene: value}, those of the stored held-out predictions
        kept = res.attrs["gene_scores"][sd.attrs["sample"]]
        assert set(kept) == {"mean", "ridge_cv", "user_mean"} and set(kept["ridge_cv"]) == {"pearson", "spearman",
                                                                                             "mse", "mae"}
        assert list(kept["ridge_cv"]["pearson"]) == genes and {type(v) for v in kept["ridge_cv"]["pearson"].values()} \
            == {float}
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        p = a.obsm["bench_ridge_cv"][genes].to_numpy(np.float64)
        by_hand = [np.corrcoef(x[:, j], p[:, j])[0, 1] for j in range(len(genes))]
        assert np.allclose(list(kept["ridge_cv"]["pearson"].values()), by_hand, atol=1e-6)
        assert np.allclose(pd.Series(kept["ridge_cv"]["mse"])[genes], ((x - p) ** 2).mean(axis=0), rtol=1e-5)
        assert np.isnan(list(kept["mean"]["pearson"].values())).all()  # a constant prediction: undefined, kept NaN
        hvg = res.attrs["folds"][sd.attrs["sample"]]["hvg"]  # the genes of the top-5 HVG metrics
        top = res.query("fold == @sd.attrs['sample'] and method == 'ridge_cv' and metric == 'pearson_mean_top5_hvg'")
        assert len(hvg) == 5 and np.isclose(np.mean([kept["ridge_cv"]["pearson"][g] for g in hvg]), top["value"].item())

    # a gene interval per fold and for the mean over the folds (which share their genes: one draw for all)
    d = dbk.tl.paired_differences(res, "ridge_cv", "user_mean", metric="mse_mean_all")
    assert np.isfinite(d[["ci_low", "ci_high"]].to_numpy()).all() and (d["n_genes"] == len(genes)).all()
    assert ((d["ci_low"] <= d["difference"]) & (d["difference"] <= d["ci_high"])).all()
    s = d.attrs["summary"]
    assert s["ci_low"] <= s["mean"] <= s["ci_high"] and "the same gene draw in all 3 folds" in s["ci_method"]

    # the slides changed only by the documented obsm keys
    for b, sd in zip(before, slides, strict=True):
        _same(b, _snapshot(sd), "bench_")

    # the summary: method x (metric, statistic), mean ± std (ddof=1) over folds
    summ = dbk.tl.benchmark_summary(res)
    assert list(summ.index) == ["mean", "ridge_cv", "user_mean"]
    mses = wide[("ridge_cv", "mse_mean_all")]
    assert np.isclose(summ.loc["ridge_cv", ("mse_mean_all", "mean")], mses.mean())
    assert np.isclose(summ.loc["ridge_cv", ("mse_mean_all", "std")], mses.std(ddof=1))
    assert summ.loc["ridge_cv", ("n_folds", "")] == 3 and summ.loc["ridge_cv", ("n_failed", "")] == 0
    assert [m for m in summ.columns.get_level_values(0).unique()][:5] == [
        "pearson_mean_all", "pearson_mean_top5_hvg", "spearman_mean_all", "mse_mean_all", "mae_mean_all"]


# ---- stage 1: once per fold, shared ----------------------------------------------------------------------------------


def test_default_methods_include_the_untrained_control_which_trains_no_stage1(slides, monkeypatch):
    default = inspect.signature(dbk.tl.benchmark).parameters["methods"].default
    assert list(default) == ["mean", "ridge_cv", "ridge_rr_ctx", "diffbulk", "diffbulk_untrained"]
    listed = dbk.tl.benchmark_methods().set_index("name")
    assert set(default) <= set(listed.index) and listed.loc["diffbulk_untrained", "family"] == "diffbulk"

    def no_training(*args, **kwargs):
        raise AssertionError("diffbulk_untrained trained a stage-1 model")

    monkeypatch.setattr(dbk.core, "fit_pretrainer", no_training)
    res = dbk.tl.benchmark(slides, methods=["diffbulk_untrained"], split={"a": ["s0"]}, key_added="untr",
                           method_kwargs={"diffbulk_untrained": {"fusion": "ridge"}}, **STAGE1, **RUN)
    assert set(res.attrs["stage1"]["a"]) == {"untrained"} and res.attrs["stage1"]["a"]["untrained"]["steps"] == 0
    assert res.attrs["info"]["a"]["diffbulk_untrained"]["stage1_steps"] == 0
    assert np.isfinite(res.query("metric == 'pearson_mean_all'")["value"]).all()



def test_stage1_trained_once_per_fold_and_shared_by_diffbulk_methods(slides, tmp_path, monkeypatch):
    calls = []
    original = dbk.core.fit_pretrainer

    def counting(data, **kwargs):
        model = original(data, **kwargs)
        calls.append({"slides": sorted(sd.attrs["sample"] for sd in data), "model": model,
                      "checkpoint_dir": kwargs.get("checkpoint_dir"), "cond_drop": kwargs.get("cond_drop")})
        return model

    monkeypatch.setattr(dbk.core, "fit_pretrainer", counting)
    used = []

    def probe(fold):
        """A DiffBulk-family user method: which stage-1 models does it get?"""
        used.append((fold.name, fold.stage1(), fold.stage1("untrained")))
        return pd.DataFrame(0.0, index=fold.test.obs_names, columns=fold.genes)

    dbk.tl.register_method("probe", probe, description="records fold.stage1()", family="diffbulk")
    res = dbk.tl.benchmark(slides, methods=["diffbulk_gated", "diffbulk_ridge", "probe", "diffbulk_untrained"],
                           split={"a": ["s0"], "b": {"train": ["s0", "s2"], "test": ["s1"]}},
                           method_kwargs={"diffbulk_gated": {"max_epochs": 2},
                                          "diffbulk_untrained": {"fusion": "ridge"}},
                           checkpoint_dir=tmp_path, **STAGE1, **RUN)
    # one trained stage-1 model per fold, on that fold's training slides only, checkpointed under <dir>/<fold>
    assert [c["slides"] for c in calls] == [["s1", "s2"], ["s0", "s2"]]
    assert [str(c["checkpoint_dir"]) for c in calls] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()
    # the methods of a fold share it (the probe gets the very object fit_pretrainer returned); the untrained
    # control is another model of the same architecture, never trained
    for (_, trained, untrained), call in zip(used, calls, strict=True):
        assert trained is call["model"]
        assert untrained is not trained and untrained.step == 0
        assert untrained.image_size == trained.image_size == TINY["image_size"]
        assert untrained.genes == trained.genes
    info = res.attrs["info"]
    for f in ("a", "b"):
        assert info[f]["diffbulk_gated"]["stage1_steps"] == STAGE1["pretrain_steps"]
        assert info[f]["diffbulk_ridge"]["fusion"] == "ridge" and info[f]["diffbulk_ridge"]["context_um"] > 0
        assert info[f]["diffbulk_untrained"]["stage1_steps"] == 0
        assert set(res.attrs["stage1"][f]) == {"trained", "untrained"}
    assert res.attrs["folds"]["b"]["train"] == ["s0", "s2"] and res.attrs["folds"]["b"]["test"] == ["s1"]
    assert set(res["method"]) == {"diffbulk_gated", "diffbulk_ridge", "probe", "diffbulk_untrained"}
    # the per-gene CV scores are plain {gene: score} dicts (attrs hold no Series or arrays), so the table merges and
    # concatenates like any other: pandas compares attrs there, and a Series raises "truth value ... ambiguous"
    for f in ("a", "b"):
        cv = res.attrs["cv_pearson"][f]["diffbulk_ridge"]
        assert set(cv) == set(res.attrs["folds"][f]["genes"]) and {type(v) for v in cv.values()} == {float}
    assert "cv_score_spearman" in set(res.query("method == 'diffbulk_ridge'")["metric"])
    other = res.copy()
    other.attrs = copy.deepcopy(res.attrs)
    assert len(pd.concat([res, other])) == 2 * len(res)
    merged = res.merge(other, on=["split", "fold", "method", "metric"], suffixes=("", "_again"))
    assert len(merged) == len(res) and (merged["value"].isna() | (merged["value"] == merged["value_again"])).all()
    # predictions only on the test slides of the run
    assert "dbk_bench_diffbulk_gated" in _table(slides[0]).obsm and "dbk_bench_diffbulk_gated" in _table(
        slides[1]).obsm


def test_untrained_stage1_is_the_trained_models_initialisation(slides):
    fold_seen = []

    def grab(fold):
        fold_seen.append(fold)
        return pd.DataFrame(0.0, index=fold.test.obs_names, columns=fold.genes)

    dbk.tl.register_method("grab", grab, description="keeps the fold", family="diffbulk")
    dbk.tl.benchmark(slides, methods=["grab"], split={"a": ["s0"]}, **STAGE1, **RUN)
    fold = fold_seen[0]
    untrained = fold.stage1("untrained")
    fresh = dbk.tl.DiffusionPretrainer(untrained.vocab, preset="tiny", random_state=0, **{
        k: v for k, v in TINY.items() if k != "batch_size"})
    for p, q in zip(untrained.net.parameters(), fresh.net.parameters(), strict=True):
        assert torch.equal(p.cpu(), q.cpu())
    assert fold.stage1("untrained") is untrained  # cached
    with pytest.raises(ValueError, match="Unknown stage-1 kind"):
        fold.stage1("half")


# ---- failures and bad arguments --------------------------------------------------------------------------------------


def test_unknown_method_and_bad_arguments_fail_before_any_work():
    raw = [_raw(0), _raw(1)]
    with pytest.raises(ValueError, match=r"Unknown benchmark method 'ridgecv'.*registered: mean, ridge_hest, ridge_cv"):
        dbk.tl.benchmark(raw, methods=["mean", "ridgecv"])
    with pytest.raises(ValueError, match="method_kwargs names methods that are not run"):
        dbk.tl.benchmark(raw, methods=["mean"], method_kwargs={"ridge_cv": {}})
    with pytest.raises(ValueError, match="Unknown split"):
        dbk.tl.benchmark(raw, methods=["mean"], split="random")
    with pytest.raises(ValueError, match=r"patient.*missing for \['s0', 's1'\]"):
        dbk.tl.benchmark(raw, methods=["mean"], split="patient")
    with pytest.raises(ValueError, match="both training and test"):
        dbk.tl.benchmark(raw, methods=["mean"], split={"f": {"train": ["s0", "s1"], "test": ["s1"]}})
    with pytest.raises(ValueError, match="tested in one fold at most"):
        dbk.tl.benchmark(raw, methods=["mean"], split={"f1": ["s0"], "f2": {"train": ["s1"], "test": ["s0"]}})
    with pytest.raises(ValueError, match="not in the data"):
        dbk.tl.benchmark(raw, methods=["mean"], split={"f": ["s7"]})
    with pytest.raises(ValueError, match="errors must be"):
        dbk.tl.benchmark(raw, methods=["mean"], errors="ignore")
    with pytest.raises(ValueError, match="Unknown preset"):
        dbk.tl.benchmark(raw, methods=["diffbulk"], preset="huge")
    for sd in raw:  # nothing was made: no tiles, no table
        assert "dbk_tiles" not in sd.shapes and "dbk_table" not in sd.tables
    with pytest.raises(ValueError, match="already registered"):
        dbk.tl.register_method("mean", lambda fold: None, description="another mean")
    with pytest.raises(ValueError, match="family"):
        dbk.tl.register_method("x", lambda fold: None, description="x", family="other")


def test_failing_method_raises_by_default_and_is_recorded_with_warn(slides):
    def boom(fold):
        raise RuntimeError(f"no luck on {fold.name}")

    dbk.tl.register_method("boom", boom, description="always fails")
    with pytest.raises(RuntimeError, match="no luck on s0"):
        dbk.tl.benchmark(slides, methods=["mean", "boom"], split={"s0": ["s0"], "s1": ["s1"]}, **RUN)
    with pytest.warns(RuntimeWarning, match=r"method 'boom' failed on fold"):
        res = dbk.tl.benchmark(slides, methods=["mean", "boom"], split={"s0": ["s0"], "s1": ["s1"]},
                               errors="warn", key_added="warned", **RUN)
    failed = res.attrs["failed"]
    assert [(f["fold"], f["method"]) for f in failed] == [("s0", "boom"), ("s1", "boom")]
    assert failed[0]["error"] == "RuntimeError: no luck on s0" and "raise RuntimeError" in failed[0]["traceback"]
    assert set(res["method"]) == {"mean"}  # the other method's results are kept
    summ = dbk.tl.benchmark_summary(res)
    assert summ.loc["boom", ("n_failed", "")] == 2 and summ.loc["boom", ("n_folds", "")] == 0  # listed, not dropped
    assert "warned_boom" not in _table(slides[0]).obsm and "warned_mean" in _table(slides[0]).obsm


def test_bad_predictions_are_an_error_of_the_method(slides):
    dbk.tl.register_method("short", lambda fold: pd.DataFrame(0.0, index=fold.test.obs_names[:3],
                                                              columns=fold.genes), description="too few rows")
    with pytest.raises(ValueError, match="predicted no row for"):
        dbk.tl.benchmark(slides, methods=["short"], split={"s0": ["s0"]}, **RUN)


# ---- other splits ----------------------------------------------------------------------------------------------------


def test_patient_split_and_genes_chosen_on_training_slides(slides):
    seen = []

    def rec(fold):
        seen.append(fold)
        return pd.DataFrame(0.0, index=fold.test.obs_names, columns=fold.genes)

    dbk.tl.register_method("rec", rec, description="records the fold")
    res = dbk.tl.benchmark(slides, methods=["mean", "rec"], split="patient", patients={"s0": "A", "s1": "A", "s2": "B"},
                           n_top_genes=4, key_added="pat", **RUN)
    folds = res.attrs["folds"]
    assert folds["A"]["test"] == ["s0", "s1"] and folds["A"]["train"] == ["s2"]
    assert folds["B"]["test"] == ["s2"] and folds["B"]["train"] == ["s0", "s1"]
    for fold in seen:  # the top genes by variance on the training slides only
        train_tables = [_table(slides[NAMES.index(s)]) for s in fold.train_slides]
        assert fold.genes == dbk.pp.select_genes(train_tables, n_top_genes=4)
        assert len(fold.genes) == 4 and folds[fold.name]["genes"] == fold.genes
    assert set(res.query("metric == 'pearson_mean_top4_hvg'")["method"]) == {"mean", "rec"}
    a = _table(slides[0])
    assert list(a.obsm["pat_mean"].columns) == seen[0].genes


def test_blocks_split_on_one_slide(slides):
    seen = []

    def rec(fold):
        seen.append((fold.name, set(fold.train.obs_names), set(fold.test.obs_names)))
        x = fold.train.X.toarray() if sp.issparse(fold.train.X) else np.asarray(fold.train.X)
        return pd.DataFrame(np.tile(x.mean(axis=0), (fold.test.n_obs, 1)), index=fold.test.obs_names,
                            columns=fold.genes)

    dbk.tl.register_method("rec", rec, description="the training mean, recording the tiles")
    sd = slides[2]
    n = _table(sd).n_obs
    res = dbk.tl.benchmark([sd], methods=["ridge_cv", "rec"], split="blocks",
                           split_kwargs={"n_folds": 3, "n_blocks": 9, "buffer_um": 30.0}, key_added="blk", **RUN)
    assert list(res.attrs["folds"]) == ["fold0", "fold1", "fold2"]
    tests = [t for _, _, t in seen]
    assert sum(len(t) for t in tests) == n and len(set().union(*tests)) == n  # every tile tested once
    for _, train, test in seen:
        assert train and test and not train & test
        assert len(train) + len(test) < n or len(train) + len(test) == n  # buffer tiles are left out of training
    assert any(len(tr) + len(te) < n for _, tr, te in seen)  # a 30 µm buffer drops the tiles next to the test blocks
    df = _table(sd).obsm["blk_rec"]
    assert df.shape == (n, 8) and np.isfinite(df.to_numpy()).all()
    assert set(res["fold"]) == {"fold0", "fold1", "fold2"} and set(res["method"]) == {"ridge_cv", "rec"}


# ---- the foundation model and its input size -------------------------------------------------------------------------

# RUN without its 32 px FM input: the size is the model's own unless given
OWN = {k: v for k, v in RUN.items() if k != "fm_size_px"}


def _tiny_timm(side: int = 48):
    """A tiny random timm model whose own input (its data config) is ``side`` px, recording its batches' shapes."""
    import timm

    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=0,
                            pretrained_cfg_overlay={"input_size": (3, side, side)})
    net.seen = []
    net.register_forward_pre_hook(lambda m, args: m.seen.append(tuple(args[0].shape[-2:])))
    return net


def _record_folds(seen: list):
    def rec(fold):
        seen.append(fold)
        return pd.DataFrame(0.0, index=fold.test.obs_names, columns=fold.genes)

    dbk.tl.register_method("rec", rec, description="records the fold")


def test_fm_size_defaults_to_the_models_own_input_size():
    for fn in (dbk.tl.benchmark, dbk.tl.prepare_corpus, dbk.tl.embed_tiles, dbk.tl.fit_diffbulk):
        assert inspect.signature(fn).parameters["fm_size_px"].default is None, fn.__name__
    assert registry.BenchmarkFold.__dataclass_fields__["fm_size_px"].default is None
    net = _tiny_timm(48)
    seen: list = []
    _record_folds(seen)
    raw = [_raw(i) for i in range(2)]
    res = dbk.tl.benchmark(raw, methods=["mean", "rec"], split={"a": ["s0"]}, fm=net, key_added="own", **OWN)
    # the model's own 48 px: recorded in the settings, the fold and the embeddings, and what the model was fed
    assert res.attrs["settings"]["fm_size_px"] == 48 and type(res.attrs["settings"]["fm_size_px"]) is int
    assert res.attrs["settings"]["fm"] == "test_efficientnet" and res.attrs["settings"]["fm_user_supplied"] is False
    assert seen[0].fm_size_px == 48
    for sd in raw:
        assert _table(sd).uns["dbk"]["embeddings"]["X_test_efficientnet"]["size_px"] == 48
    assert net.seen and set(net.seen) == {(48, 48)}
    # a size given is used as given (and recorded), the model's own or not
    res = dbk.tl.benchmark(raw, methods=["mean"], split={"a": ["s0"]}, fm=net, key_added="given", **RUN)
    assert res.attrs["settings"]["fm_size_px"] == 32 and net.seen[-1] == (32, 32)
    with pytest.raises(ValueError, match="fm_size_px must be a positive integer or None"):
        dbk.tl.benchmark(raw, methods=["mean"], fm=net, fm_size_px=0)


def test_default_fm_is_embedded_and_recorded_at_224_as_before(monkeypatch):
    raw = [_raw(i) for i in range(3)]
    kw = {"methods": ["mean", "ridge_cv"], "split": {"a": ["s0"]}, **OWN, "tile_size_um": 56.0}  # 56 µm: few tiles
    default = dbk.tl.benchmark(raw, key_added="default", **kw)
    assert default.attrs["settings"]["fm"] == "efficientnet_lite0"
    assert default.attrs["settings"]["fm_size_px"] == 224 and default.attrs["settings"]["fm_user_supplied"] is False
    for sd in raw:
        rec = _table(sd).uns["dbk"]["embeddings"]["X_efficientnet_lite0"]
        assert rec["size_px"] == 224 and rec["model"] == "efficientnet_lite0"

    # fm_size_px=224 given, as the old default: the embeddings made under the default are kept (the same model,
    # size and preprocessing: nothing is embedded again), and the results and settings are the same
    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded again: the default's embeddings are not those of fm_size_px=224")

    monkeypatch.setattr(dbk.tl._embed, "encode_images", no_embedding)
    given = dbk.tl.benchmark(raw, key_added="given", fm_size_px=224, **kw)
    cols = ["split", "fold", "method", "metric", "value"]
    pd.testing.assert_frame_equal(default[cols], given[cols])
    assert {**default.attrs["settings"], "key_added": None} == {**given.attrs["settings"], "key_added": None}
    for sd in raw:
        if "default_ridge_cv" in _table(sd).obsm:
            pd.testing.assert_frame_equal(_table(sd).obsm["default_ridge_cv"], _table(sd).obsm["given_ridge_cv"])


def test_benchmark_takes_a_module_with_its_transform_as_fit_diffbulk_does():
    from torchvision import transforms as T

    net = _tiny_timm(48)
    transform = T.Compose([T.Resize(40), T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    raw = [_raw(i) for i in range(2)]
    seen: list = []
    _record_folds(seen)
    res = dbk.tl.benchmark(raw, methods=["mean", "rec"], split={"a": ["s0"]}, fm=(net, transform), key_added="pair",
                           **OWN)
    s = res.attrs["settings"]
    # the module's own size is its transform's (40 px, as wrap_fm reads it), not 224
    assert s["fm_user_supplied"] is True and s["fm"] == "EfficientNet" and s["fm_size_px"] == 40
    assert seen[0].fm_size_px == 40 and isinstance(seen[0].foundation_model(), dbk.tl._fm_zoo.UserFM)
    rec = _table(raw[0]).uns["dbk"]["embeddings"][s["fm_key"]]
    assert rec["source"] == "user-supplied" and rec["size_px"] == 40 and set(net.seen) == {(40, 40)}
    assert np.isfinite(res.query("method == 'mean'")["value"].dropna()).all()
    # wrap_fm's object is the same route, under its name
    fm = dbk.tl.wrap_fm(net, transform, name="tiny_user")
    res = dbk.tl.benchmark(raw, methods=["mean"], split={"a": ["s0"]}, fm=fm, key_added="wrapped", **OWN)
    assert res.attrs["settings"]["fm"] == "tiny_user" and res.attrs["settings"]["fm_key"] == "X_tiny_user"
    assert res.attrs["settings"]["fm_user_supplied"] is True and res.attrs["settings"]["fm_size_px"] == 40
    with pytest.raises(TypeError, match=r"fm must be a model id, a torch module, or a module with its transform"):
        dbk.tl.benchmark([_raw(0), _raw(1)], methods=["mean"], fm=3)


# ---- summaries and the plot ------------------------------------------------------------------------------------------


def _hand_table() -> pd.DataFrame:
    rows = []
    values = {"a": [0.30, 0.25, 0.40], "b": [0.20, 0.28, 0.31]}
    mses = {"a": [1.0, 1.2, 0.9], "b": [1.1, 1.1, 1.0]}
    for m in ("a", "b"):
        for i, f in enumerate(["f1", "f2", "f3"]):
            rows.append({"split": "loso", "fold": f, "method": m, "metric": "pearson_mean_all",
                         "value": values[m][i], "seconds": 1.0 + i})
            rows.append({"split": "loso", "fold": f, "method": m, "metric": "mse_mean_all", "value": mses[m][i],
                         "seconds": 1.0 + i})
    return pd.DataFrame(rows)


def test_paired_differences_equal_a_hand_computation():
    res = _hand_table()
    d = dbk.tl.paired_differences(res, "a", "b")
    assert list(d["fold"]) == ["f1", "f2", "f3"]
    assert np.allclose(d["difference"], [0.10, -0.03, 0.09])
    assert np.allclose(d["a"], [0.30, 0.25, 0.40]) and np.allclose(d["b"], [0.20, 0.28, 0.31])
    s = d.attrs["summary"]
    diffs = np.array([0.10, -0.03, 0.09])
    assert np.isclose(s["mean"], diffs.mean())
    assert np.isclose(s["std"], np.sqrt(((diffs - diffs.mean()) ** 2).sum() / 2))  # ddof=1
    assert s["n_folds"] == 3 and s["n_higher"] == 2 and s["n_better"] == 2
    assert s["text"].startswith("a - b (pearson_mean_all): +0.053 ± 0.072 over 3 folds, higher on 2/3")
    assert np.isnan(s["ci_low"]) and np.isnan(s["ci_high"]) and d["ci_low"].isna().all()  # no per-gene scores
    e = dbk.tl.paired_differences(res, "a", "b", metric="mse_mean_all").attrs["summary"]
    assert e["n_higher"] == 1 and e["n_better"] == 2 and e["lower_is_better"]  # lower MSE is better
    two = pd.concat([res, res.assign(split="patient")])
    with pytest.raises(ValueError, match="several splits"):
        dbk.tl.paired_differences(two, "a", "b")
    assert dbk.tl.paired_differences(two, "a", "b", split="patient").attrs["summary"]["n_folds"] == 3
    with pytest.raises(KeyError, match="No method 'c'"):
        dbk.tl.paired_differences(res, "a", "c")
    summ = dbk.tl.benchmark_summary(res, metrics=["pearson_mean_all"])
    assert np.isclose(summ.loc["a", ("pearson_mean_all", "mean")], np.mean([0.30, 0.25, 0.40]))
    assert np.isclose(summ.loc["b", ("seconds", "mean")], 2.0) and summ.loc["b", ("n_folds", "")] == 3
    assert list(dbk.tl.benchmark_summary(two).index.names) == ["split", "method"]


def _gene_table(noise: float, *, folds=("f1",), n_genes: int = 300, seed: int = 0) -> pd.DataFrame:
    """Methods a and b on the same genes, per-gene Pearson in attrs: b = a - 0.05 + noise (genes differ a lot)."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(n_genes)]
    rows, scores, hvg = [], {}, {}
    for f in folds:
        a = rng.uniform(-0.2, 0.8, n_genes)
        a[:3] = np.nan  # undefined (e.g. constant truth): left out of the means, as evaluate does
        b = a - 0.05 + rng.normal(0.0, noise, n_genes)
        hvg[f] = {"hvg": genes[10:20]}
        scores[f] = {m: {"pearson": dict(zip(genes, v.tolist(), strict=True))} for m, v in (("a", a), ("b", b))}
        for m, v in (("a", a), ("b", b)):
            rows += [{"split": "loso", "fold": f, "method": m, "metric": "pearson_mean_all", "value": np.nanmean(v),
                      "seconds": 1.0},
                     {"split": "loso", "fold": f, "method": m, "metric": "pearson_mean_top10_hvg",
                      "value": np.nanmean(v[10:20]), "seconds": 1.0},
                     {"split": "loso", "fold": f, "method": m, "metric": "pearson_flattened", "value": 0.5 - (m == "b"),
                      "seconds": 1.0}]
    out = pd.DataFrame(rows)
    out.attrs.update({"split": "loso", "folds": hvg, "gene_scores": scores})
    return out


def test_paired_differences_gene_interval_on_one_fold():
    quiet, noisy = _gene_table(0.02), _gene_table(0.2)
    d = dbk.tl.paired_differences(quiet, "a", "b")
    s = d.attrs["summary"]
    assert s["n_folds"] == 1 and np.isnan(s["std"])  # one fold: no spread over folds, but a gene interval
    assert np.isfinite([s["ci_low"], s["ci_high"]]).all() and s["ci_low"] < s["mean"] < s["ci_high"]
    assert (d.loc[0, "ci_low"], d.loc[0, "ci_high"]) == (s["ci_low"], s["ci_high"])
    assert s["ci_method"].startswith("gene bootstrap, 2000 draws")
    assert s["text"].endswith(f"; 95% CI [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}] by resampling genes")
    a = np.array(list(quiet.attrs["gene_scores"]["f1"]["a"]["pearson"].values()))
    b = np.array(list(quiet.attrs["gene_scores"]["f1"]["b"]["pearson"].values()))
    assert d.loc[0, "n_genes"] == 297 and d.loc[0, "n_genes_higher"] == int((a[3:] > b[3:]).sum())
    # paired: the width follows the spread of the per-gene differences (2 x 1.96 SE), not that of the genes' scores
    se = np.std(a[3:] - b[3:], ddof=1) / np.sqrt(297)
    assert abs((s["ci_high"] - s["ci_low"]) / (2 * 1.96 * se) - 1) < 0.15
    # deterministic for a seed, and wider for noisier differences
    again = dbk.tl.paired_differences(quiet, "a", "b", random_state=0).attrs["summary"]
    assert (again["ci_low"], again["ci_high"]) == (s["ci_low"], s["ci_high"])
    other = dbk.tl.paired_differences(quiet, "a", "b", random_state=1).attrs["summary"]
    assert other["ci_low"] != s["ci_low"]
    n = dbk.tl.paired_differences(noisy, "a", "b").attrs["summary"]
    assert n["ci_high"] - n["ci_low"] > 3 * (s["ci_high"] - s["ci_low"])
    # a top-k HVG metric resamples the fold's HVGs only; a metric that is no mean over genes has no gene interval
    h = dbk.tl.paired_differences(quiet, "a", "b", metric="pearson_mean_top10_hvg")
    assert h.loc[0, "n_genes"] == 10 and h.attrs["summary"]["ci_low"] < h.attrs["summary"]["mean"]
    f = dbk.tl.paired_differences(quiet, "a", "b", metric="pearson_flattened").attrs["summary"]
    assert np.isnan([f["ci_low"], f["ci_high"]]).all() and "not a mean over a fixed set of genes" in f["ci_method"]
    with pytest.raises(ValueError, match="n_boot"):
        dbk.tl.paired_differences(quiet, "a", "b", n_boot=0)


def test_paired_differences_gene_interval_over_folds_and_without_gene_scores():
    res = _gene_table(0.05, folds=("f1", "f2", "f3"))
    d = dbk.tl.paired_differences(res, "a", "b")
    s = d.attrs["summary"]
    assert s["n_folds"] == 3 and np.isfinite(s["std"]) and s["ci_low"] < s["mean"] < s["ci_high"]
    assert "the same gene draw in all 3 folds" in s["ci_method"]
    assert np.isfinite(d[["ci_low", "ci_high"]].to_numpy()).all()
    # the mean's interval is narrower than a fold's: each draw averages three folds' differences
    assert s["ci_high"] - s["ci_low"] < (d["ci_high"] - d["ci_low"]).min()
    hv = dbk.tl.paired_differences(res, "a", "b", metric="pearson_mean_top10_hvg").attrs["summary"]
    assert np.isfinite(hv["ci_low"])
    # results of an older run (no per-gene scores): as before, with NaN intervals and the reason in the text
    old = res.copy()
    old.attrs = {}
    o = dbk.tl.paired_differences(old, "a", "b")
    pd.testing.assert_frame_equal(o[["split", "fold", "a", "b", "difference"]],
                                  d[["split", "fold", "a", "b", "difference"]])
    assert o[["ci_low", "ci_high", "n_genes", "n_genes_higher"]].isna().to_numpy().all()
    so = o.attrs["summary"]
    assert (so["mean"], so["std"], so["n_higher"]) == (s["mean"], s["std"], s["n_higher"])
    assert np.isnan(so["ci_low"]) and so["ci_method"].startswith("none: the results hold no per-gene test scores")
    assert "; no gene interval: the results hold no per-gene test scores" in so["text"]
    # scores that do not give the table's values (another run's attrs), or of another split, are not used
    wrong = res.copy()
    wrong.loc[wrong["metric"] == "pearson_mean_all", "value"] += 0.01
    assert "do not average to its pearson_mean_all" in dbk.tl.paired_differences(wrong, "a", "b").attrs[
        "summary"]["ci_method"]
    two = pd.concat([res, res.assign(split="patient")])
    assert "of split 'loso'" in dbk.tl.paired_differences(two, "a", "b", split="patient").attrs["summary"]["ci_method"]
    assert np.isfinite(dbk.tl.paired_differences(two, "a", "b", split="loso").attrs["summary"]["ci_low"])


def test_pl_benchmark_draws_the_tidy_and_the_wide_table_alike():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tidy = _hand_table()
    wide = tidy.pivot_table(index=["fold", "method"], columns="metric", values="value").reset_index()
    heights = []
    for table in (tidy, wide):
        fig = dbk.pl.benchmark(table, metric="pearson_mean_all", return_fig=True, show=False)
        ax = fig.axes[0]
        heights.append(([t.get_text() for t in ax.get_xticklabels()], [p.get_height() for p in ax.patches]))
        plt.close(fig)
    assert heights[0] == heights[1] and heights[0][0] == ["b", "a"]
    assert np.allclose(heights[0][1], [np.mean([0.20, 0.28, 0.31]), np.mean([0.30, 0.25, 0.40])])
    with pytest.raises(KeyError, match="No metric 'spearman_mean_all'"):
        dbk.pl.benchmark(tidy, metric="spearman_mean_all", show=False)
