"""HEST-Benchmark inside dbk: a task folder in the hub's layout (tests/_hest_bench_fixture.py) read by
dbk.datasets.hest_bench and run through dbk.tl.benchmark, checked against HEST's own code path written out here
(mahmoodlab/HEST src/hest/bench: st_dataset.load_adata, trainer.train_test_reg, benchmark.merge_fold_results)."""

from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from _hest_bench_fixture import FOLDS, GENES, PITCH_UM, SAMPLES, write_task
from scipy.stats import pearsonr

import dbk

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for the module

TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 2,
        "log_every": 5}
RUN = {"fm_size_px": 32, "top_k": 5, "random_state": 0, "accelerator": "cpu", "preset": "tiny",
       "pretrain_steps": 2, "pretrain_kwargs": TINY}
METHODS = ["mean", "ridge_hest", "ridge_cv", "ridge_rr_ctx", "diffbulk"]
LATENT_DIM = 8


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("DBK_OFFLINE", "1")


def _hest_targets(folder, sample_id: str) -> np.ndarray:
    """HEST's targets, its way: the patches' barcodes, adata[barcodes][:, genes], log1p (st_dataset.load_adata)."""
    with h5py.File(folder / "patches" / f"{sample_id}.h5", "r") as f:
        barcodes = f["barcode"][:].flatten().astype(str).tolist()
    with open(folder / "var_50genes.json") as f:
        genes = json.load(f)["genes"]
    adata = ad.read_h5ad(folder / "adata" / f"{sample_id}.h5ad")[barcodes][:, genes]
    return np.log1p(adata.to_df().to_numpy(np.float64))


def _hest_folds(folder) -> list[tuple[list[str], list[str]]]:
    """HEST's folds: n_splits = len(os.listdir(split_dir)) // 2, fold i from train_{i}.csv / test_{i}.csv."""
    n = len(list((folder / "splits").iterdir())) // 2
    return [(pd.read_csv(folder / "splits" / f"train_{i}.csv")["sample_id"].tolist(),
             pd.read_csv(folder / "splits" / f"test_{i}.csv")["sample_id"].tolist()) for i in range(n)]


# ---- the task folder -------------------------------------------------------------------------------------------------


def test_task_reads_genes_folds_and_targets_aligned_by_barcode(tmp_path):
    written = write_task(tmp_path)
    task = dbk.datasets.hest_bench("IDC", root=tmp_path)
    folder = tmp_path / "IDC"
    assert isinstance(task, dbk.datasets.HestBenchTask) and task.name == "IDC" and task.path == folder
    assert task.genes == GENES
    assert task.splits == _hest_folds(folder) == [(list(tr), list(te)) for tr, te in FOLDS]
    assert task.folds() == {"split0": {"train": ["SAMPC", "SAMPD"], "test": ["SAMPA", "SAMPB"]},
                            "split1": {"train": ["SAMPA", "SAMPB"], "test": ["SAMPC", "SAMPD"]}}
    for sid in SAMPLES:
        # the fixture's .h5ad is in another row and column order than the patches and the gene list
        h5ad_rows = list(written[sid]["counts"].index)
        assert h5ad_rows[: len(written[sid]["barcode"])] != list(written[sid]["barcode"])
        want = _hest_targets(folder, sid)
        got = task.targets(sid)
        assert list(got.index) == list(written[sid]["barcode"]) and list(got.columns) == GENES
        np.testing.assert_allclose(got.to_numpy(), want, rtol=0, atol=1e-12)
        # a wrong alignment would not match: the rows of the .h5ad as stored give other values
        assert not np.allclose(np.log1p(written[sid]["counts"][GENES].to_numpy()[: len(want)]), want)
        sd = task.to_spatialdata(sid)
        table = sd.tables["dbk_table"]
        np.testing.assert_allclose(np.asarray(table.X), want, rtol=1e-6, atol=1e-6)  # float32
        np.testing.assert_array_equal(table.layers["counts"], np.expm1(want).round())
        assert list(table.obs["barcode"]) == list(written[sid]["barcode"])
        assert dbk.io.get_pixel_size(sd) == pytest.approx(112.0 / 32)
        # every tile is its patch, pixel for pixel (tile i of the mosaic, read as embed_tiles and stage 1 read it)
        ds = dbk.pp.TileDataset(sd, "dbk_tiles", size_px=32, dtype="uint8")
        for i in (0, 7, len(ds) - 1):
            np.testing.assert_array_equal(np.asarray(ds[i]["image"]).transpose(1, 2, 0), written[sid]["img"][i])
        # the patch centres on the slide in µm (0.25 µm/px from the patches file's attributes)
        assert task.pixel_size_um[sid] == 0.25 and "pixel_size" in task.pixel_size_source[sid]
        xy = table.obsm["spatial_um"]
        d = np.sort(np.hypot(*(xy[1:] - xy[:-1]).T))[0]
        assert d == pytest.approx(PITCH_UM, abs=0.5)


def test_missing_files_offline_are_listed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)gene list or split files are missing.*(HF_HUB|DBK)_OFFLINE.*"
                                                 r"var_50genes\.json.*train_\{i\}\.csv.*snapshot_download"):
        dbk.datasets.hest_bench("IDC", root=tmp_path)
    write_task(tmp_path)
    (tmp_path / "IDC" / "patches" / "SAMPC.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 file\(s\) missing.*patches/SAMPC\.h5.*resolve/main/IDC/"):
        dbk.datasets.hest_bench("IDC", root=tmp_path)
    # the README's label LUAD is the folder LUNG; unknown names are refused before any file is looked for
    with pytest.raises(FileNotFoundError, match=r"task 'LUNG'"):
        dbk.datasets.hest_bench("luad", root=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown HEST-Benchmark task 'BRCA'.*LYMPH_IDC"):
        dbk.datasets.hest_bench("BRCA", root=tmp_path)


def test_online_fetches_only_missing_files_and_names_them_on_failure(tmp_path, monkeypatch):
    """The hub route, with huggingface_hub's two calls replaced by copies from a task written here."""
    import shutil

    import huggingface_hub

    hub = tmp_path / "hub"
    write_task(hub)
    monkeypatch.delenv("DBK_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []

    def snapshot_download(repo_id, *, repo_type, local_dir, allow_patterns, **kw):
        assert repo_id == "MahmoodLab/hest-bench" and repo_type == "dataset"
        asked.append(("snapshot", tuple(allow_patterns)))
        for p in hub.rglob("*"):
            rel = p.relative_to(hub).as_posix()
            if p.is_file() and (rel == "IDC/var_50genes.json" or rel.startswith("IDC/splits/")):
                (local_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, local_dir / rel)

    def hf_hub_download(repo_id, filename, *, repo_type, local_dir, **kw):
        asked.append(("file", filename))
        if filename.endswith("SAMPB.h5ad"):  # the last file the split files name
            raise huggingface_hub.utils.LocalEntryNotFoundError("no connection")
        (local_dir / filename).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hub / filename, local_dir / filename)
        return str(local_dir / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    root = tmp_path / "local"
    (root / "IDC" / "patches").mkdir(parents=True)
    shutil.copyfile(hub / "IDC" / "patches" / "SAMPA.h5", root / "IDC" / "patches" / "SAMPA.h5")  # already here
    with pytest.raises(ConnectionError, match=r"(?s)cannot be reached.*adata/SAMPB\.h5ad"):
        dbk.datasets.hest_bench("IDC", root=root)
    assert asked[0] == ("snapshot", ("IDC/var_50genes.json", "IDC/splits/*"))
    files = [f for kind, f in asked[1:]]
    assert files == ["IDC/patches/SAMPC.h5", "IDC/adata/SAMPC.h5ad", "IDC/patches/SAMPD.h5", "IDC/adata/SAMPD.h5ad",
                     "IDC/adata/SAMPA.h5ad", "IDC/patches/SAMPB.h5", "IDC/adata/SAMPB.h5ad"]  # SAMPA.h5 was here
    asked.clear()

    def fetch(repo_id, filename, *, repo_type, local_dir, **kw):
        asked.append(filename)
        shutil.copyfile(hub / filename, local_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    task = dbk.datasets.hest_bench("IDC", root=root)  # the second call fetches what the first did not get
    assert asked == ["IDC/adata/SAMPB.h5ad"] and task.genes == GENES


def test_source_pixel_size_from_h5_metadata_or_given(tmp_path):
    write_task(tmp_path, pixel_size_um={"SAMPA": 0.25})  # only SAMPA's patches file says it
    hest_root = tmp_path / "hest"
    (hest_root / "metadata").mkdir(parents=True)
    (hest_root / "metadata" / "SAMPB.json").write_text(json.dumps({"pixel_size_um_estimated": 0.2737}))
    task = dbk.datasets.hest_bench("IDC", root=tmp_path, hest_root=hest_root)
    assert task.pixel_size_um == {"SAMPA": 0.25, "SAMPB": 0.2737, "SAMPC": None, "SAMPD": None}
    assert "SAMPB.json: pixel_size_um_estimated" in task.pixel_size_source["SAMPB"]
    assert np.isnan(task.to_spatialdata("SAMPC").tables["dbk_table"].obsm["spatial_um"]).all()
    given = dbk.datasets.hest_bench("IDC", root=tmp_path, pixel_size_um={"SAMPC": 0.5})
    assert given.pixel_size_um["SAMPC"] == 0.5 and given.pixel_size_source["SAMPC"] == "pixel_size_um="
    with pytest.raises(KeyError, match="SAMPX"):
        dbk.datasets.hest_bench("IDC", root=tmp_path, pixel_size_um={"SAMPX": 0.5})


# ---- the protocol ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The fixture task through dbk.tl.benchmark once (HEST's probe, dbk's baselines, DiffBulk)."""
    root = tmp_path_factory.mktemp("hest_bench")
    write_task(root)
    progress, dbk.settings.progress = dbk.settings.progress, False  # module fixtures run before conftest's quieting
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DBK_OFFLINE", "1")
        task = dbk.datasets.hest_bench("IDC", root=root)
    # ridge_hest with HEST's --latent_dim 8: the FM features of the fixture's 38-46 training patches per fold span ~15
    # dimensions; PCA components past those are rounding noise, on which lsqr's answer is arbitrary (HEST's 256 assume
    # thousands of spots)
    try:
        res = dbk.tl.benchmark(task, methods=METHODS, **RUN, method_kwargs={"ridge_hest": {"n_components": LATENT_DIM},
                                                                            "diffbulk": {"fusion": "ridge"}})
    finally:
        dbk.settings.progress = progress
    return task, res


def test_protocol_folds_targets_and_averaging_match_hest(run):
    task, res = run
    folder = task.path
    assert res.attrs["split"] == "hest" and set(res["split"]) == {"hest"}
    folds = _hest_folds(folder)
    assert list(res.attrs["folds"]) == ["split0", "split1"]
    for i, (train, test) in enumerate(folds):
        rec = res.attrs["folds"][f"split{i}"]
        assert rec["train"] == train and rec["test"] == test and rec["genes"] == GENES
    assert res.attrs["hest"]["task"] == "IDC" and res.attrs["hest"]["genes"] == GENES
    slides = task.slides()
    per_fold: dict[str, list[float]] = {}
    for method in METHODS:
        for i, (_, test) in enumerate(folds):
            # HEST's train_test_reg on this fold: the test samples' targets and predictions stacked, one pearsonr
            # per gene, np.mean over the genes
            y = np.vstack([_hest_targets(folder, s) for s in test])
            p = np.vstack([slides[s].tables["dbk_table"].obsm[f"dbk_bench_{method}"][GENES].to_numpy(np.float64)
                           for s in test])
            with np.errstate(all="ignore"):
                r = [pearsonr(y[:, g], p[:, g])[0] if np.ptp(p[:, g]) > 0 else np.nan for g in range(len(GENES))]
            want = float(np.mean(r))
            got = res.query("method == @method and fold == @f and metric == 'pearson_mean_hest'",
                            local_dict={"method": method, "f": f"split{i}"})["value"]
            assert len(got) == 1
            if method == "mean":  # constant predictions: HEST's np.mean of undefined correlations is NaN
                assert np.isnan(want) and np.isnan(got.iloc[0])
            else:
                assert got.iloc[0] == pytest.approx(want, abs=1e-6)
            per_fold.setdefault(method, []).append(want)
            # DiffBulk's reference metric: one Pearson over all test (patch, gene) pairs flattened
            flat = res.query("method == @method and fold == @f and metric == 'pearson_flattened'",
                             local_dict={"method": method, "f": f"split{i}"})["value"].iloc[0]
            assert flat == pytest.approx(pearsonr(y.ravel(), p.ravel())[0], abs=1e-6)
    # merge_fold_results: np.mean and np.std (ddof 0) over the folds' means
    summ = dbk.tl.hest_summary(res)
    for method in METHODS[1:]:
        assert summ.loc[method, ("IDC", "pearson_mean")] == pytest.approx(np.mean(per_fold[method]), abs=1e-6)
        assert summ.loc[method, ("IDC", "pearson_std")] == pytest.approx(np.std(per_fold[method]), abs=1e-6)
        assert np.std(per_fold[method]) != pytest.approx(np.std(per_fold[method], ddof=1))
    assert np.isnan(summ.loc["mean", ("IDC", "pearson_mean")])
    assert summ.loc["H-optimus-0 (published)", ("average", "pearson_mean")] == 0.4146
    assert summ.loc["ridge_hest", ("fm", "")] == "efficientnet_lite0"


def test_ridge_hest_through_the_protocol_is_hests_pipeline(run):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    task, res = run
    slides = task.slides()
    key = res.attrs["settings"]["fm_key"]
    for train, test in task.splits:
        x_tr = np.vstack([slides[s].tables["dbk_table"].obsm[key] for s in train]).astype(np.float64)
        y_tr = np.vstack([_hest_targets(task.path, s) for s in train])
        x_te = np.vstack([slides[s].tables["dbk_table"].obsm[key] for s in test]).astype(np.float64)
        k = LATENT_DIM  # benchmark.py: PCA(n_components=args.latent_dim, random_state=args.seed)
        pipe = [StandardScaler().fit(x_tr)]
        pipe.append(PCA(n_components=k, random_state=0).fit(pipe[0].transform(x_tr)))
        reg = Ridge(solver="lsqr", alpha=100 / (k * len(GENES)), random_state=0, fit_intercept=False, max_iter=1000)
        reg.fit(pipe[1].transform(pipe[0].transform(x_tr)), y_tr)
        want = reg.predict(pipe[1].transform(pipe[0].transform(x_te)))
        got = np.vstack([slides[s].tables["dbk_table"].obsm["dbk_bench_ridge_hest"][GENES].to_numpy() for s in test])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_protocol_table_and_stage1_on_patches(run, capsys):
    _, res = run
    # spatial context from the patches' own positions: 1.5 x the 100 µm pitch, not the mosaic's neighbours
    assert res.attrs["info"]["split0"]["ridge_rr_ctx"]["context_um"] == pytest.approx(1.5 * PITCH_UM, abs=1)
    assert res.attrs["stage1"]["split0"]["trained"]["steps"] == 2  # stage 1 trained on the fold's patches
    assert {"pearson_mean_hest", "pearson_mean_all", "pearson_flattened"} <= set(res["metric"])
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(dbk.tl.hest_summary(res).to_string(float_format=lambda v: f"{v:.4f}"))
    out = capsys.readouterr().out
    assert "IDC" in out and "ridge_hest" in out and "H-optimus-0 (published)" in out and "0.4146" in out


def test_without_pixel_sizes_no_context(tmp_path, dbk_log):
    write_task(tmp_path, pixel_size_um={}, n_patches=(12,))
    task = dbk.datasets.hest_bench("IDC", root=tmp_path)
    with pytest.raises(ValueError, match=r"(?s)source pixel size of samples \['SAMPA'.*no spatial context.*"
                                         r"\['ridge_rr_ctx'\] need it"):
        dbk.tl.benchmark(task, methods=["ridge_rr_ctx"], **RUN)
    with pytest.raises(ValueError, match="own split files"):
        dbk.tl.benchmark(task, methods=["ridge_hest"], split="loso", **RUN)
    with pytest.raises(ValueError, match="pass the task"):
        dbk.tl.benchmark(task.slides(), methods=["ridge_hest"], split="hest", **RUN)
    from dbk.tl._benchmark import DEFAULT_METHODS
    from dbk.tl._benchmark_hest import hest_arguments

    methods = hest_arguments(task, methods=list(DEFAULT_METHODS), default_methods=True, split=None, genes=None,
                             n_top_genes=None, patients=None, split_kwargs=None, context_um=None)
    assert methods == ["mean", "ridge_hest", "ridge_cv", "diffbulk", "diffbulk_untrained"]
    assert "ridge_rr_ctx left out of the default methods" in dbk_log.text
    res = dbk.tl.benchmark(task, methods=["ridge_hest"], **RUN)
    assert res.attrs["hest"]["context"] is False
    assert np.isfinite(res.query("metric == 'pearson_mean_hest'")["value"]).all()


def test_hest_task_embeds_at_the_models_own_input_size_unless_given(tmp_path):
    """A HEST-Benchmark run resolves fm_size_px as every benchmark does: the model's own, recorded as an integer."""
    import timm

    write_task(tmp_path, n_patches=(6,))
    task = dbk.datasets.hest_bench("IDC", root=tmp_path)
    run = {k: v for k, v in RUN.items() if k != "fm_size_px"}
    res = dbk.tl.benchmark(task, methods=["mean"], **run)  # the default EfficientNet-Lite0: 224, as before
    assert res.attrs["split"] == "hest" and res.attrs["settings"]["fm_size_px"] == 224
    slides = task.slides()
    assert {slides[s].tables["dbk_table"].uns["dbk"]["embeddings"]["X_efficientnet_lite0"]["size_px"]
            for s in SAMPLES} == {224}
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=0,
                            pretrained_cfg_overlay={"input_size": (3, 48, 48)})
    res = dbk.tl.benchmark(task, methods=["mean"], fm=net, **run)
    assert res.attrs["settings"]["fm_size_px"] == 48
    assert slides["SAMPA"].tables["dbk_table"].uns["dbk"]["embeddings"]["X_test_efficientnet"]["size_px"] == 48
    res = dbk.tl.benchmark(task, methods=["mean"], fm=net, fm_size_px=32, **run)
    assert res.attrs["settings"]["fm_size_px"] == 32


# ---- the command line ------------------------------------------------------------------------------------------------


def test_command_line_runs_tasks_and_prints_the_hest_summary(tmp_path, capsys):
    """`dbk benchmark --hest-task IDC` is dbk.tl.benchmark on the task: the same numbers, hest_summary printed
    beside the published averages, the tidy table with a task column; options the protocol fixes are refused."""
    from dbk.cli import main

    write_task(tmp_path / "bench", n_patches=(12, 14, 12, 14))
    task = dbk.datasets.hest_bench("IDC", root=tmp_path / "bench")
    kwargs = {"methods": ["mean", "ridge_cv"], "fm_size_px": 32, "top_k": 5, "random_state": 0,
              "accelerator": "cpu"}
    direct = dbk.tl.benchmark(task, **kwargs)
    capsys.readouterr()
    out = tmp_path / "res.csv"
    assert main(["benchmark", "--hest-task", "idc", "--hest-bench-root", str(tmp_path / "bench"), "--methods",
                 "mean,ridge_cv", "--fm-size-px", "32", "--top-k", "5", "--accelerator", "cpu", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert "HEST-Benchmark task 'IDC', 2 folds (its split files), 50 genes" in text
    assert "H-optimus-0 (published)" in text and "0.4146" in text and "ridge_cv" in text
    table = pd.read_csv(out)
    assert list(table.columns) == ["task", "split", "fold", "method", "metric", "value", "seconds"]
    assert set(table["task"]) == {"IDC"} and set(table["split"]) == {"hest"}
    got = table.set_index(["fold", "method", "metric"])["value"]
    want = direct.set_index(["fold", "method", "metric"])["value"]
    assert got.index.sort_values().equals(want.index.sort_values())
    np.testing.assert_allclose(got.loc[want.index].to_numpy(), want.to_numpy(), rtol=1e-6, equal_nan=True)
    summary = dbk.tl.hest_summary(direct)
    mean = summary.loc["ridge_cv", ("IDC", "pearson_mean")]
    assert f"{mean:.4f}" in text

    for extra, named in ((["a.zarr"], "SLIDE arguments"), (["--split", "loso"], "--split"),
                         (["--n-top-genes", "3"], "--n-top-genes"), (["--tile-um", "56"], "--tile-um")):
        with pytest.raises(SystemExit, match=f"so {named} cannot be given with it"):
            main(["benchmark", *extra, "--hest-task", "IDC", "--hest-bench-root", str(tmp_path / "bench")])
    with pytest.raises(SystemExit, match="--hest-task LUNG: .*'LUNG': its gene list or split files are missing"):
        main(["benchmark", "--hest-task", "IDC,LUNG", "--hest-bench-root", str(tmp_path / "bench")])  # offline
    with pytest.raises(SystemExit, match="--hest-task NOPE: Unknown HEST-Benchmark task 'NOPE'"):
        main(["benchmark", "--hest-task", "NOPE", "--hest-bench-root", str(tmp_path / "bench")])
    with pytest.raises(SystemExit, match="name the task"):
        main(["benchmark", "a.zarr", "--hest-bench-root", str(tmp_path / "bench")])
