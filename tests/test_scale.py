"""Scale out on existing engines: stage 1 on several processes (torchrun / accelerate launch), and
dbk.tl.prepare_corpus / ``dbk prepare``, a corpus slide by slide on a dask.distributed LocalCluster.

Tiny synthetic slides (512 x 512 px, 56 µm tiles, 32 px embeddings) keep the whole file to about a minute or two on
two cores. The cluster run must give the very tables of an in-process run; a rerun skips what is done and redoes
what a killed run left incomplete; a corrupt slide is reported and the others land.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import spatialdata
import torch
from distributed import Client, LocalCluster

import dbk
from dbk.cli import main
from dbk.pp._corpus import MARKER

KW = {"tile_size_um": 56.0, "fm_size_px": 32, "threads": 1}
NAMES = ("s0", "s1", "s2")
EMB = "X_efficientnet_lite0"


def _slides() -> dict:
    # partials of a library function travel to the workers by reference (a test-module function may not import there)
    return {n: functools.partial(dbk.datasets.synthetic, shape=(512, 512), random_state=i)
            for i, n in enumerate(NAMES)}


def _garbage_zarr(path):
    path.mkdir(parents=True)
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gro')  # truncated mid-write
    return path


def _table(path):
    return spatialdata.read_zarr(path).tables["dbk_table"]


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _assert_same_tables(a, b):
    assert a.shape == b.shape and a.n_obs > 0
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    np.testing.assert_array_equal(_dense(a.layers["counts"]), _dense(b.layers["counts"]))
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert list(a.var_names) == list(b.var_names)
    assert sorted(a.obsm) == sorted(b.obsm) and EMB in a.obsm
    for k in a.obsm:
        np.testing.assert_array_equal(np.asarray(a.obsm[k]), np.asarray(b.obsm[k]))


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    return out, dbk.tl.prepare_corpus(_slides(), out=out, **KW)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory, client):
    """The three slides and a corrupt store, on the 2-worker cluster."""
    out = tmp_path_factory.mktemp("clustered")
    bad = _garbage_zarr(tmp_path_factory.mktemp("inputs") / "broken.zarr")
    slides = [*_slides().values(), bad]
    return out, dbk.tl.prepare_corpus(slides, names=[*NAMES, "broken"], out=out, client=client, **KW)


def test_sequential_run_writes_complete_stores(sequential):
    out, report = sequential
    assert list(report.columns[:7]) == ["name", "status", "n_tiles", "n_genes", "seconds", "error", "path"]
    assert report["name"].tolist() == list(NAMES) and (report["status"] == "done").all()
    assert (report["n_tiles"] > 0).all() and (report["n_genes"] == 60).all()
    for name in NAMES:
        marker = json.loads((out / f"{name}.zarr" / MARKER).read_text())
        assert marker["settings"] == report.attrs["settings"] and marker["embedding_key"] == EMB
        t = _table(out / f"{name}.zarr")
        assert t.obsm[EMB].shape == (t.n_obs, 1280) and t.obsm[EMB].dtype == np.float32
        assert (t.obs["sample"] == name).all()


def test_cluster_run_equals_the_sequential_run(sequential, clustered):
    seq, _ = sequential
    out, report = clustered
    done = report[report["name"].isin(NAMES)]
    assert (done["status"] == "done").all(), report[["name", "status", "error"]]
    assert all(w and not w.endswith(f":{__import__('os').getpid()}") for w in done["worker"])  # not this process
    for name in NAMES:
        _assert_same_tables(_table(out / f"{name}.zarr"), _table(seq / f"{name}.zarr"))


def test_a_corrupt_slide_is_reported_and_the_others_land(clustered):
    out, report = clustered
    bad = report.set_index("name").loc["broken"]
    assert bad["status"] == "failed" and bad["error"] and pd.isna(bad["n_tiles"])
    assert "read_zarr" in bad["traceback"] or "zarr" in bad["traceback"].lower()
    assert not (out / "broken.zarr").exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [f"{n}.zarr" for n in NAMES]


def test_a_killed_run_resumes(sequential, clustered, client, tmp_path):
    seq, _ = sequential
    src, _ = clustered
    out = tmp_path / "corpus"
    shutil.copytree(src, out)
    again = dbk.tl.prepare_corpus(_slides(), out=out, client=client, **KW)
    assert (again["status"] == "skipped").all() and again["n_tiles"].tolist() == clustered[1]["n_tiles"][:3].tolist()

    # killed before s1's store landed (its marker is written inside it, so a store without one is not dbk's and is
    # refused); killed while s2 was writing (only a temporary left)
    shutil.rmtree(out / "s1.zarr")
    shutil.rmtree(out / "s2.zarr")
    (out / ".s2.zarr.k1ll3d.tmp" / "s2.zarr" / "images").mkdir(parents=True)  # what the atomic writer leaves
    before = (out / "s0.zarr" / MARKER).stat().st_mtime_ns
    resumed = dbk.tl.prepare_corpus(_slides(), out=out, client=client, **KW)
    assert resumed.set_index("name")["status"].to_dict() == {"s0": "skipped", "s1": "done", "s2": "done"}
    assert (out / "s0.zarr" / MARKER).stat().st_mtime_ns == before
    for name in ("s1", "s2"):
        _assert_same_tables(_table(out / f"{name}.zarr"), _table(seq / f"{name}.zarr"))


def test_other_settings_need_overwrite(sequential, tmp_path):
    src, _ = sequential
    out = tmp_path / "corpus"
    shutil.copytree(src / "s0.zarr", out / "s0.zarr")
    slide = {"s0": _slides()["s0"]}
    refused = dbk.tl.prepare_corpus(slide, out=out, **{**KW, "fm_size_px": 64})
    assert refused["status"].tolist() == ["failed"]
    assert "other settings (fm_size_px: 32 -> 64)" in refused["error"][0] and "overwrite=True" in refused["error"][0]
    redone = dbk.tl.prepare_corpus(slide, out=out, overwrite=True, **{**KW, "fm_size_px": 64})
    assert redone["status"].tolist() == ["done"]
    assert json.loads((out / "s0.zarr" / MARKER).read_text())["settings"]["fm_size_px"] == 64


def test_default_size_is_the_models_own_and_corpora_of_224_resume(sequential, tmp_path, monkeypatch):
    """fm_size_px=None is resolved once (the model's own: 224 for EfficientNet-Lite0) and recorded as that integer,
    so a corpus prepared with fm_size_px=224 (the old default) is skipped, not refused, under the new default."""
    import inspect

    import dbk.tl._corpus as corpus

    assert inspect.signature(dbk.tl.prepare_corpus).parameters["fm_size_px"].default is None
    kw = {k: v for k, v in KW.items() if k != "fm_size_px"}
    slides = {n: f for n, f in _slides().items() if n in ("s0", "s1")}
    out = tmp_path / "corpus"
    old = dbk.tl.prepare_corpus(slides, out=out, fm_size_px=224, **kw)  # as the old default recorded it
    assert (old["status"] == "done").all() and old.attrs["settings"]["fm_size_px"] == 224
    before = {n: (out / f"{n}.zarr" / MARKER).stat().st_mtime_ns for n in slides}
    calls, own = [], corpus.model_input_size

    def counted(fm):
        calls.append(fm)
        return own(fm)

    monkeypatch.setattr(corpus, "model_input_size", counted)
    again = dbk.tl.prepare_corpus(slides, out=out, **kw)
    assert again["status"].tolist() == ["skipped", "skipped"] and calls == ["efficientnet_lite0"]  # resolved once
    assert again.attrs["settings"] == old.attrs["settings"]
    assert {n: (out / f"{n}.zarr" / MARKER).stat().st_mtime_ns for n in slides} == before
    # a store of another size is refused under the default, which reads as the integer it resolved to
    src, _ = sequential
    other = tmp_path / "other"
    shutil.copytree(src / "s0.zarr", other / "s0.zarr")  # prepared at 32 px
    refused = dbk.tl.prepare_corpus({"s0": slides["s0"]}, out=other, **kw)
    assert "other settings (fm_size_px: 32 -> 224)" in refused["error"][0]
    with pytest.raises(ValueError, match="fm_size_px must be a positive integer or None"):
        dbk.tl.prepare_corpus(slides, out=other, fm_size_px=0, **kw)


def test_a_slide_that_raises_does_not_stop_the_others(tmp_path):
    def broken():
        raise RuntimeError("scanner file truncated")

    report = dbk.tl.prepare_corpus({"broken": broken, "s2": _slides()["s2"]}, out=tmp_path, **KW)
    assert report["status"].tolist() == ["failed", "done"]
    assert report["error"][0] == "read: RuntimeError: scanner file truncated"
    assert "in broken" in report["traceback"][0]


def test_a_hest_folder_gives_one_slide_per_sample(io_hest_sample, tmp_path):
    root = io_hest_sample.root
    out = tmp_path / "corpus"
    report = dbk.tl.prepare_corpus(root, out=out, **KW)  # every sample of the HEST download
    assert report["name"].tolist() == ["TINY1"] and report["status"].tolist() == ["done"], report["error"].tolist()
    assert (_table(out / "TINY1.zarr").obs["sample"] == "TINY1").all()
    again = dbk.tl.prepare_corpus(root / "TINY1", out=out, **KW)  # <hest root>/<sample id>
    assert again["status"].tolist() == ["skipped"]
    missing = dbk.tl.prepare_corpus([tmp_path / "nowhere.zarr"], out=out, **KW)
    assert missing["status"].tolist() == ["failed"] and "read: FileNotFoundError" in missing["error"][0]


def _cli(*argv) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in argv])
    return rc, buf.getvalue()


def test_cli_prepare_on_a_local_cluster(tmp_path):
    stores = []
    for name, make in _slides().items():
        dbk.io.write_zarr(make(), tmp_path / "in" / f"{name}.zarr")
        stores.append(tmp_path / "in" / f"{name}.zarr")
    out = tmp_path / "out"
    args = ("--scheduler", "local", "--workers", 2, "--tile-um", 56, "--fm-size-px", 32, "--out", out)
    rc, text = _cli("prepare", *stores, *args)
    print(text)
    assert rc == 0 and "3 done, 0 skipped, 0 failed" in text
    assert "local dask cluster: 2 workers" in text and text.count(" done ") == 3
    for name in NAMES:
        assert (out / f"{name}.zarr" / MARKER).exists()
        assert EMB in _table(out / f"{name}.zarr").obsm

    rc, text = _cli("prepare", *stores, *args)
    print(text)
    assert rc == 0 and "0 done, 3 skipped, 0 failed" in text

    bad = _garbage_zarr(tmp_path / "in" / "broken.zarr")
    rc, text = _cli("prepare", *stores, bad, *args)
    print(text)
    assert rc == 1 and "0 done, 3 skipped, 1 failed" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("broken "))
    assert "failed" in line and "Error" in line


def test_prepare_help_does_not_load_the_spatialdata_stack():
    code = ("import sys, contextlib, io\nfrom dbk.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['prepare', '--help'])\n"
            "print([m for m in ('spatialdata', 'torch', 'distributed', 'anndata') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


# ---- several processes, one training: stage 1 data-parallel (2 CPU processes, gloo) --------------------------------

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_stage1.py"
TOL = 1e-4  # the gradient all-reduce sums in another order than one process does: float32 rounding, ~1e-5 here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, batch: int, steps: int, *, procs: int = 1, resume: Path | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [str(SCRIPT), str(out), str(batch), str(steps)] + ([str(resume)] if resume else [])
    cmd = [sys.executable, *args] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_doubled_batch_and_resume_in_one(tmp_path):
    log2 = _run(tmp_path / "two", batch=4, steps=4, procs=2)
    _run(tmp_path / "one", batch=8, steps=4)
    one = torch.load(tmp_path / "one" / "weights-rank0.pt")
    r0 = torch.load(tmp_path / "two" / "weights-rank0.pt")
    r1 = torch.load(tmp_path / "two" / "weights-rank1.pt")
    assert r0["step"] == r1["step"] == one["step"] == 4
    for k in ("net", "ema"):
        assert _max_diff(r0[k], r1[k]) == 0.0  # the processes hold one model
        assert _max_diff(r0[k], one[k]) < TOL, k
    assert [h["loss"] for h in r0["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-4)
    # nothing written twice: one process writes the checkpoints, one process logs
    assert r0["writes"] == ["checkpoint-000000002.pt", "checkpoint-000000004.pt"] and r1["writes"] == []
    assert log2.count("INFO dbk: fit: 32 tiles") == 1
    assert sorted(p.name for p in (tmp_path / "two" / "ckpt").iterdir()) == ["checkpoint-000000002.pt",
                                                                            "checkpoint-000000004.pt"]
    # the 2-process checkpoint resumes in one process and ends where an uninterrupted one-process run ends
    log = _run(tmp_path / "resumed", batch=8, steps=6, resume=tmp_path / "two" / "ckpt")
    assert "resumed from" in log and "at step 4" in log
    _run(tmp_path / "straight", batch=8, steps=6)
    a = torch.load(tmp_path / "resumed" / "weights-rank0.pt")
    b = torch.load(tmp_path / "straight" / "weights-rank0.pt")
    for k in ("net", "ema"):
        assert _max_diff(a[k], b[k]) < TOL, k


@pytest.mark.slow
def test_a_head_trains_on_two_processes_like_one_with_the_doubled_batch(tmp_path):
    script = Path(__file__).resolve().parent / "scripts" / "ddp_head.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in ([sys.executable, str(script), str(tmp_path / "one"), "16"],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(_free_port()), str(script), str(tmp_path / "two"), "8"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "head-rank0.pt")
    r0, r1 = (torch.load(tmp_path / "two" / f"head-rank{r}.pt") for r in (0, 1))
    assert _max_diff(r0["net"], r1["net"]) == 0.0
    assert _max_diff(r0["net"], one["net"]) < TOL  # the global masked MSE, split over processes (1.5e-8 measured)
    assert r0["best_epoch"] == one["best_epoch"]
    assert r0["history"]["val_loss"] == pytest.approx(one["history"]["val_loss"], rel=1e-5)
