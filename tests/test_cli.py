"""The ``dbk`` command: demo (with the model stages), fit, predict, benchmark."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import numpy as np
import pytest
import torch

from dbk.cli import main


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


def test_benchmark_prints_metrics_of_a_saved_model(demo, tmp_path):
    out, _ = demo
    text = run("benchmark", out / "model", out / "heldout.zarr", "--csv", tmp_path / "m.csv")
    assert np.isfinite([float(v) for v in _row(text, "DiffBulk")]).all()
    assert _row(text, "mean (training mean per gene)")[0] == "nan"
    assert (tmp_path / "m.csv").read_text().count("\n") == 3  # header + 2 methods


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



def test_fit_help_shows_choices_and_defaults_without_the_spatialdata_stack():
    import subprocess
    import sys

    code = ("import sys, contextlib, io; from dbk.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try: main(['fit', '--help'])\n"
            "    except SystemExit: pass\n"
            "print(buf.getvalue())\n"
            "print('HEAVY', [m for m in ('spatialdata', 'torch', 'anndata') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    text = " ".join(res.stdout.split())
    assert "{auto,tiny,cpu-small,gpu,paper}" in text and "(default: auto)" in text
    assert "--context-um" in text and "--rank" in text and "--fm-arch" in text and "(default: 32)" in text
    assert "HEAVY []" in text


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
