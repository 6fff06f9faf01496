"""The ``dbk`` command: demo (with the model stages), fit, predict, evaluate, benchmark; one vocabulary (help,
options named as the API names them, the old spellings warning) and one reader of slides (zarr, HEST, ST folders)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dbk.cli import _read_slides, _resolve_renamed, build_parser, main


def run(*argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([str(a) for a in argv]) == 0
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import dbk

    old = torch.get_num_threads()
    yield
    dbk.settings.n_jobs = None  # --threads sets dbk.settings.n_jobs, process-wide
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    text = run("--threads", 1, "demo", "--size", 1024, "--tile-um", 56, "--quick", "--out", out)
    return out, text


def _row(text: str, method: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(method + " "))
    return line[len(method):].split()


def test_demo_runs_end_to_end_and_prints_the_metrics_table(demo):
    out, text = demo
    assert re.search(r"exact\s+yes", text)
    header = next(ln for ln in text.splitlines() if ln.startswith("method "))
    assert header.split()[1:] == ["pearson_mean_all", "pearson_mean_top50_hvg", "spearman_mean_all", "mse_mean_all",
                                  "mae_mean_all", "spearman_per_tile_mean", "pearson_flattened"]
    ours = [float(v) for v in _row(text, "DiffBulk")]
    mean = _row(text, "mean (training mean per gene)")
    ridge = [float(v) for v in _row(text, "ridge_cv (FM embeddings)")]
    assert len(ours) == len(ridge) == 7 and np.isfinite(ours).all() and np.isfinite(ridge).all()
    assert mean[0] == "nan" and float(mean[3]) > 0  # constant prediction: no Pearson, but an MSE
    assert "among 10 heads: " in text  # the candidates counted (not the record's columns), and why this one
    for stage in ("fit DiffBulk", "predict (H&E-only slide)", "evaluate", "write zarr"):
        assert stage in text
    for f in ("model/config.json", "model/pretrainer/config.json", "demo.zarr", "heldout.zarr",
              "heldout_measured_vs_predicted.png", "training_stage1.png", "head_selection.png", "tiles_ERBB2.png"):
        assert (out / f).exists(), f
    # the head chosen by inner CV (fusion="auto"): its epochs are drawn only when it is a neural head
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert (out / "training_head.png").exists() == (cfg["fusion"] != "ridge")
    assert "chosen by inner CV" in text


def test_predict_from_zarr_and_from_a_plain_image(demo, tmp_path):
    import spatialdata
    import tifffile

    out, _ = demo
    text = run("predict", out / "model", out / "heldout.zarr", "--out", tmp_path / "p.zarr")
    assert "genes predicted" in text
    table = spatialdata.read_zarr(tmp_path / "p.zarr").tables["dbk_table"]
    assert table.obsm["dbk_pred"].shape == (table.n_obs, 60)

    # an H&E scan with nothing else: a TIFF and its pixel size
    held = spatialdata.read_zarr(out / "heldout.zarr")
    img = np.asarray(held.images["he"]["scale0"]["image"].values).transpose(1, 2, 0)
    tifffile.imwrite(tmp_path / "scan.tif", img, photometric="rgb")
    with pytest.raises(SystemExit, match="pixel size"):
        run("predict", out / "model", tmp_path / "scan.tif", "--out", tmp_path / "s.zarr")
    run("predict", out / "model", tmp_path / "scan.tif", "--pixel-size-um", 0.5, "--out", tmp_path / "s.zarr")
    scan = spatialdata.read_zarr(tmp_path / "s.zarr").tables["dbk_table"]
    assert scan.n_vars == 0 and scan.obsm["dbk_pred"].shape == (scan.n_obs, 60)
    assert np.isfinite(scan.obsm["dbk_pred"].to_numpy()).all()
    # same tiles and pixels as the zarr store; only the resampling differs (the TIFF has no pyramid), so nearly the
    # same predictions
    assert (scan.obs_names == table.obs_names).all()
    a, b = scan.obsm["dbk_pred"].to_numpy().ravel(), table.obsm["dbk_pred"].to_numpy().ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.98 and np.abs(a - b).mean() < 0.05
    with pytest.raises(SystemExit, match="exists"):
        run("predict", out / "model", tmp_path / "scan.tif", "--pixel-size-um", 0.5, "--out", tmp_path / "s.zarr")


def test_evaluate_prints_metrics_of_a_saved_model(demo, tmp_path):
    out, _ = demo
    text = run("evaluate", out / "model", out / "heldout.zarr", "--out", tmp_path / "m.csv", "--accelerator", "cpu")
    ours = [float(v) for v in _row(text, "DiffBulk")]
    assert np.isfinite(ours).all()
    assert _row(text, "mean (training mean per gene)")[0] == "nan"
    table = pd.read_csv(tmp_path / "m.csv", index_col=0)
    assert list(table.index) == ["DiffBulk", "mean (training mean per gene)"]
    assert table.loc["DiffBulk", "pearson_mean_all"] == pytest.approx(ours[0], abs=5e-4)
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):  # checked before any work
        run("evaluate", out / "model", out / "heldout.zarr", "--out", tmp_path / "m.csv")
    (tmp_path / "d").mkdir()
    with pytest.raises(SystemExit, match="is a folder, not a CSV file"):
        run("evaluate", out / "model", out / "heldout.zarr", "--out", tmp_path / "d", "--overwrite")


def test_old_benchmark_form_runs_evaluate_and_warns(demo, tmp_path):
    """`dbk benchmark MODEL SLIDE` (what evaluate does) keeps working for one release, with its --csv and --device."""
    out, _ = demo
    with pytest.warns(FutureWarning) as record:
        text = run("--threads", 1, "benchmark", out / "model", out / "heldout.zarr", "--csv", tmp_path / "m.csv",
                   "--device", "cpu", "--top-k", 5)
    messages = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert any("use `dbk evaluate MODEL SLIDE`; this form goes in the next release" in m for m in messages)
    assert any(m.startswith("--device is now --accelerator") for m in messages)
    assert any(m.startswith("--csv is now --out") for m in messages)
    assert "pearson_mean_top5_hvg" in text and np.isfinite([float(v) for v in _row(text, "DiffBulk")]).all()
    assert (tmp_path / "m.csv").read_text().count("\n") == 3  # header + 2 methods
    # --csv replaces its file, as it did
    with pytest.warns(FutureWarning, match="dbk evaluate"), pytest.warns(FutureWarning, match="--csv is now --out"):
        run("benchmark", out / "model", out / "heldout.zarr", "--csv", tmp_path / "m.csv")
    # the old form's options are checked as dbk evaluate's: the new form's are refused there
    with pytest.warns(FutureWarning, match="dbk evaluate"), pytest.raises(SystemExit):
        run("benchmark", out / "model", out / "heldout.zarr", "--methods", "mean")


def test_fit_saves_a_model(demo, tmp_path, caplog):
    out, _ = demo
    text = run("fit", out / "demo.zarr", "--out", tmp_path / "m", "--preset", "tiny", "--pretrain-steps", 2,
               "--fm-size-px", 96, "--tile-um", 56, "--fusion", "gated", "--max-epochs", 3, "--n-top-genes", 10)
    assert "saved to" in text and "Validation" in text
    import json

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert len(cfg["genes"]) == 10 and cfg["fm"]["size_px"] == 96
    with pytest.raises(SystemExit, match="No data"):
        run("fit", "--out", tmp_path / "m2")
    # the recommended head from the command line: reduced-rank ridge with spatial context, late blend
    run("fit", out / "demo.zarr", "--out", tmp_path / "r", "--preset", "tiny", "--pretrain-steps", 2,
        "--fm-size-px", 96, "--tile-um", 56, "--fusion", "ridge", "--rank", "auto", "--blend", "late",
        "--context-um", 120, "--batch-size", 16)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["fusion"] == "ridge" and cfg["context_um"] == 120.0
    assert cfg["head"]["rank"] == "auto" and cfg["head"]["blend"] == "late"
    with pytest.raises(SystemExit, match="add --fusion ridge"):
        run("fit", out / "demo.zarr", "--out", tmp_path / "g", "--rank", "auto")
    with pytest.raises(SystemExit, match="add --fusion gated"):
        run("fit", out / "demo.zarr", "--out", tmp_path / "g", "--max-epochs", 3)
    # the default head: chosen by inner CV, recorded in the model folder; --patients reaches the trust score
    from dbk.cli import _read_slides

    sample = _read_slides([out / "demo.zarr"])[0].attrs["sample"]
    with pytest.raises(SystemExit, match=r"names samples \['nope'\] that are not among the slides"):
        run("fit", out / "demo.zarr", "--out", tmp_path / "p", "--patients", "nope=P1")
    with caplog.at_level(logging.WARNING, logger="dbk"):
        run("fit", out / "demo.zarr", "--out", tmp_path / "a", "--preset", "tiny", "--pretrain-steps", 2,
            "--fm-size-px", 96, "--tile-um", 56, "--n-top-genes", 10, "--patients", f"{sample}=P1")
    assert "one patient's slides" in caplog.text  # a patient was known: one, so the score cannot see patient shift
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    sel = cfg["head_selection"]
    # the reference, full-rank ridge at 2 radii, reduced-rank early and late ridge at 3 radii, the gated head
    assert len(sel["candidates"]["name"]) == 10 and sel["chosen"] in sel["candidates"]["name"]
    assert sel["candidates"]["name"][0] == sel["reference"] == "ridge" and "standard error" in sel["rule"]
    assert len(cfg["cv_pearson"]) == len(cfg["cv_trusted"]) == 10 and cfg["fusion"] in ("ridge", "gated")
    assert cfg["effective_rank"]["predictions"] >= 1
    with pytest.raises(SystemExit, match="exists"):
        run("fit", out / "demo.zarr", "--out", tmp_path / "m")


def test_demo_on_a_slide_too_small_for_a_model_still_checks_the_preprocessing(tmp_path):
    text = run("demo", "--size", 1024, "--out", tmp_path)  # 112 µm tiles: ~10 tiles
    assert re.search(r"exact\s+yes", text) and "model stages were skipped" in text
    assert (tmp_path / "demo.zarr").exists() and not (tmp_path / "model").exists()



def test_help_shows_choices_and_defaults_without_the_spatialdata_stack():
    import subprocess
    import sys

    code = ("import sys, contextlib, io; from dbk.cli import main\n"
            "for cmd in ([], ['fit'], ['predict'], ['evaluate'], ['benchmark'], ['prepare'], ['demo']):\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try: main([*cmd, '--help'])\n"
            "        except SystemExit: pass\n"
            "    print('CMD', cmd, buf.getvalue())\n"
            "print('HEAVY', [m for m in ('spatialdata', 'torch', 'anndata') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    text = " ".join(res.stdout.split())
    fit = text[text.index("CMD ['fit']"):text.index("CMD ['predict']")]
    assert "{auto,tiny,cpu-small,gpu,paper}" in fit and "(default: auto)" in fit
    assert "--context-um" in fit and "--rank" in fit and "--fm-arch" in fit and "(default: 32)" in fit
    assert "stage-1 steps (default: the preset's) --fm" in fit  # said once, not followed by "(default: None)"
    assert "--out OUT model folder to write --preset" in fit  # required: no default shown
    assert "evaluate" in text[:text.index("CMD ['fit']")]  # the subcommand is listed
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert "--device" not in text and "--csv" not in text  # the old names are accepted, not shown
    assert "HEAVY []" in text


HIDDEN = {"--device", "--csv", "--pixel-size-um"}  # old names and the old benchmark form's options: accepted, hidden


def test_every_option_has_help_and_one_true_default():
    """No option without help; the default appended only where there is a value to show, never twice."""
    import dbk.tl._benchmark
    from dbk.cli import BENCHMARK_DEFAULT_METHODS, _HelpFormatter

    parser, commands = build_parser()
    assert set(commands) == {"demo", "fit", "predict", "evaluate", "benchmark", "prepare"}
    for name, p in [("dbk", parser), *commands.items()]:
        fmt = _HelpFormatter(name)
        hidden = set()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:
                hidden.update(action.option_strings)
                continue
            what = action.option_strings or action.dest
            assert action.help and action.help.strip(), f"dbk {name}: {what} has no help"
            shown = fmt._expand_help(action)
            assert shown.count("default") <= 1 + action.help.count("default"), (name, shown)
            assert shown.count("(default:") <= 1, (name, shown)
            if action.required or not action.option_strings:
                assert "(default:" not in shown, (name, shown)
            if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                    or action.default == []:
                assert "(default:" not in shown or "(default:" in action.help, (name, shown)
            elif action.option_strings and "default" not in action.help:  # a value: shown, and true
                assert shown.endswith(f"(default: {action.default})"), (name, shown)
        assert hidden <= HIDDEN, (name, hidden)
        if name in ("fit", "predict", "evaluate", "benchmark", "prepare"):
            assert "--accelerator" in p._option_string_actions and "--device" in hidden, name
    assert BENCHMARK_DEFAULT_METHODS == tuple(dbk.tl._benchmark.DEFAULT_METHODS)  # what --methods' help says


def test_fm_size_px_defaults_to_the_models_own(monkeypatch, tmp_path):
    """--fm-size-px of fit, benchmark and prepare: None (the model's own input size), passed on as None; demo keeps
    its own sizes."""
    import dbk

    parser, commands = build_parser()
    for argv in (["fit", "x", "--out", "o"], ["benchmark", "x"], ["prepare", "x", "--out", "o"]):
        args = parser.parse_args(argv)
        assert args.fm_size_px is None, argv
        assert parser.parse_args([*argv, "--fm-size-px", "448"]).fm_size_px == 448
        action = commands[argv[0]]._option_string_actions["--fm-size-px"]
        assert action.help == "foundation-model input size (default: the model's own)", argv
    assert "--fm-size-px" not in commands["demo"]._option_string_actions
    seen = {}

    def fake(name):
        def fn(*args, **kwargs):
            seen[name] = kwargs
            raise SystemExit(0)
        return fn

    import dbk.cli

    monkeypatch.setattr(dbk.cli, "_read_slides", lambda *a, **k: [object(), object()])
    monkeypatch.setattr(dbk.tl, "prepare_corpus", fake("prepare"))
    monkeypatch.setattr(dbk.tl, "benchmark", fake("benchmark"))
    monkeypatch.setattr(dbk.tl, "fit_diffbulk", fake("fit"))
    for argv in (["prepare", "a.zarr", "--out", str(tmp_path / "out"), "--scheduler", "none"],
                 ["benchmark", "a.zarr", "b.zarr"], ["fit", "a.zarr", "--out", str(tmp_path / "m")]):
        with pytest.raises(SystemExit):
            main(argv)
    assert seen["prepare"]["fm_size_px"] is seen["benchmark"]["fm_size_px"] is seen["fit"]["fm_size_px"] is None


@pytest.mark.parametrize("argv", [["fit", "x", "--out", "o"], ["predict", "m", "x", "--out", "o"],
                                  ["evaluate", "m", "x"], ["benchmark", "x"], ["prepare", "x", "--out", "o"]])
def test_device_is_a_deprecated_alias_of_accelerator(argv):
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    _resolve_renamed(args)
    assert args.accelerator == "auto"
    args = parser.parse_args([*argv, "--accelerator", "cpu"])
    _resolve_renamed(args)
    assert args.accelerator == "cpu"
    args = parser.parse_args([*argv, "--device", "cpu"])
    with pytest.warns(FutureWarning, match=r"--device is now --accelerator .* goes in the next release"):
        _resolve_renamed(args)
    assert args.accelerator == "cpu"
    args = parser.parse_args([*argv, "--device", "cpu", "--accelerator", "cuda"])
    with pytest.warns(FutureWarning), pytest.raises(SystemExit, match="give --accelerator only"):
        _resolve_renamed(args)


# ---- one reader of slides: zarr stores, HEST samples, ST folders ---------------------------------------------------


def _write_st_folder(folder: Path, *, seed: int, nx: int = 7, ny: int = 6, genes=tuple("ABCDEF")) -> Path:
    """A her2st-layout ST folder (counts.tsv.gz, spot_selection.tsv, he.jpg): nx x ny spots of a 1k array at
    290 px per 200 µm step (0.69 µm/px) on a rectangle of tissue, darker where a spot's expression is higher."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pos = np.array([(x, y) for x in range(1, nx + 1) for y in range(1, ny + 1)])
    spots = pd.DataFrame({"x": pos[:, 0], "y": pos[:, 1], "new_x": pos[:, 0], "new_y": pos[:, 1],
                          "pixel_x": 100 + 290.0 * pos[:, 0], "pixel_y": 80 + 290.0 * pos[:, 1], "selected": 1})
    level = rng.uniform(0, 1, len(spots))
    img = np.full((int(spots.pixel_y.max()) + 250, int(spots.pixel_x.max()) + 250, 3), 240.0)
    (x0, y0), (x1, y1) = pos.min(axis=0) * 290 - 50, pos.max(axis=0) * 290 + 250
    img[y0:y1, x0:x1] = (215, 140, 190)  # tissue under the spots, with glass around it
    for px, py, v in zip(spots.pixel_x.astype(int), spots.pixel_y.astype(int), level, strict=True):
        img[py - 80:py + 80, px - 80:px + 80] = (200 - 80 * v, 120 - 60 * v, 180 - 40 * v)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(folder / "he.jpg")
    spots.to_csv(folder / "spot_selection.tsv", sep="\t", index=False)
    lam = (1 + 20 * level)[:, None] + rng.uniform(1, 10, (len(spots), len(genes)))
    counts = pd.DataFrame(rng.poisson(lam), index=[f"{x}x{y}" for x, y in pos], columns=list(genes))
    counts.to_csv(folder / "counts.tsv.gz", sep="\t")
    return folder


@pytest.fixture(scope="module")
def st_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    return [_write_st_folder(root / name, seed=i) for i, name in enumerate(("S1", "S2"))]


def test_slides_are_read_from_zarr_hest_and_st_folders_alike(demo, st_folders, io_hest_sample, tmp_path):
    out, _ = demo
    (zarr,) = _read_slides([out / "heldout.zarr"])
    assert zarr.attrs["sample"] == "heldout" and "dbk_table" in zarr.tables
    st = _read_slides(st_folders)
    assert [sd.attrs["sample"] for sd in st] == ["S1", "S2"]
    assert st[0].tables["table"].n_obs == 42 and list(st[0].tables["table"].var_names) == list("ABCDEF")
    root = io_hest_sample.root
    for given in ([root], [root / "TINY1"]):  # a HEST folder (its every sample) or HEST_ROOT/SAMPLE_ID
        (hest,) = _read_slides(given)
        assert hest.attrs["sample"] == "TINY1" and "he" in hest.images
    (hest,) = _read_slides([], hest_root=root, samples=["TINY1"])
    assert hest.attrs["sample"] == "TINY1"
    with pytest.raises(SystemExit, match="is a dbk model folder, not a slide"):
        _read_slides([out / "model"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(SystemExit, match=r"notes is not a SpatialData \.zarr store, a HEST folder or an ST folder: "
                                         r".*counts table"):
        _read_slides([tmp_path / "notes"])
    with pytest.raises(SystemExit, match="nope does not exist"):
        _read_slides([tmp_path / "nope"])
    with pytest.raises(SystemExit, match="needs slides with expression"):
        _read_slides([tmp_path / "notes" / "a.txt"], images=False)


def test_fit_on_an_st_folder_then_predict_and_evaluate_another(st_folders, tmp_path):
    import spatialdata

    s1, s2 = st_folders
    text = run("--threads", 1, "fit", s1, "--out", tmp_path / "m", "--preset", "tiny", "--pretrain-steps", 2,
               "--fm-size-px", 32, "--fusion", "ridge", "--head-cv", 0, "--accelerator", "cpu")
    assert "saved to" in text
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["train"]["samples"] == ["S1"] and sorted(cfg["genes"]) == list("ABCDEF")
    text = run("predict", tmp_path / "m", s2, "--out", tmp_path / "p.zarr")
    assert re.search(r"\d+ tiles x 6 genes predicted", text)
    pred = spatialdata.read_zarr(tmp_path / "p.zarr").tables["dbk_table"].obsm["dbk_pred"]
    assert pred.shape[1] == 6 and pred.shape[0] >= 42 and np.isfinite(pred.to_numpy()).all()
    text = run("evaluate", tmp_path / "m", s2)
    assert "slide 'S2': 42 tiles, 6 of the model's 6 genes" in text
    assert np.isfinite([float(v) for v in _row(text, "DiffBulk")[2:5]]).all()  # spearman, mse, mae


def test_benchmark_runs_methods_on_slides_and_writes_the_tidy_table(st_folders, tmp_path):
    text = run("--threads", 1, "benchmark", *st_folders, "--methods", "mean,ridge_cv", "--fm-size-px", 32,
               "--top-k", 3, "--accelerator", "cpu", "--out", tmp_path / "res.csv")
    res = pd.read_csv(tmp_path / "res.csv")
    assert list(res.columns) == ["split", "fold", "method", "metric", "value", "seconds"]
    assert set(res["split"]) == {"loso"} and set(res["fold"]) == {"S1", "S2"}
    assert list(pd.unique(res["method"])) == ["mean", "ridge_cv"]
    r = res.set_index(["fold", "method", "metric"])["value"]
    assert np.isfinite(r.loc[("S1", "ridge_cv", "pearson_mean_all")]) and r.loc[("S2", "mean", "mse_mean_all")] > 0
    assert "split 'loso' (2 folds), 6 candidate genes" in text and "pearson_mean_top3_hvg" in text
    lines = text.splitlines()
    assert any(ln.startswith("mean ") for ln in lines) and any(ln.startswith("ridge_cv ") for ln in lines)
    assert "-> " + str(tmp_path / "res.csv") in text
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        run("benchmark", *st_folders, "--methods", "mean", "--out", tmp_path / "res.csv")
    with pytest.raises(SystemExit, match=r"unknown method\(s\) \['nope'\]; the methods are mean, "):
        run("benchmark", *st_folders, "--methods", "mean,nope")
    with pytest.raises(SystemExit, match="--csv and --pixel-size-um belong to `dbk evaluate MODEL SLIDE`"):
        run("benchmark", *st_folders, "--csv", tmp_path / "x.csv")
    text = run("benchmark", "--list-methods")
    assert re.search(r"^ridge_cv\s+baseline\s", text, flags=re.M) and re.search(r"^diffbulk\s+diffbulk", text, re.M)


def test_patients_option_reads_pairs_and_files(tmp_path):
    from dbk.cli import _read_patients

    assert _read_patients(None) is None
    assert _read_patients("B4=B, C2=C") == {"B4": "B", "C2": "C"}
    f = tmp_path / "patients.csv"
    f.write_text("# sample,patient\nB4,B\nC2\tC\n")
    assert _read_patients(str(f)) == {"B4": "B", "C2": "C"}
    for bad in ("B4", "B4=B=C", "B4=", "=B"):
        with pytest.raises(SystemExit, match="SAMPLE=PATIENT"):
            _read_patients(bad)
    with pytest.raises(SystemExit, match="two patients"):
        _read_patients("B4=B,B4=C")


def test_old_names_warn_on_stderr_with_python_default_filters():
    """The deprecation notice reaches a user of the command (stderr, default filters), not only a test's recorder."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "dbk.cli", "benchmark", "--list-methods", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "dbk:0: FutureWarning: --device is now --accelerator" in res.stderr
    assert "goes in the next release" in res.stderr and "ridge_cv" in res.stdout
