from __future__ import annotations

import os
import subprocess
import sys

import pytest

import dbk


def test_public_submodules_and_version():
    for name in ("io", "datasets", "pp", "tl", "pl", "settings", "__version__"):
        assert hasattr(dbk, name), name
    assert dbk.__version__ and dbk.__version__ != "0.0.0+unknown"


def test_import_is_light_and_quick():
    code = (
        "import time, sys; t = time.perf_counter(); import dbk; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'diffusers', 'timm', 'squidpy', 'scanpy') if m in sys.modules]; "
        "print(dt, ','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 6.0  # < 3 s on the 2-core dev machine; generous for loaded CI
    assert len(out) == 1, f"import dbk pulled in heavy modules: {out[1]}"


def test_settings_validate():
    s = dbk.settings
    old = s.verbosity
    s.verbosity = 4  # scanpy's scale: 3 is 'hint', 4 'debug'
    import logging

    assert logging.getLogger("dbk").level == logging.DEBUG
    s.verbosity = old
    with pytest.raises(ValueError, match="verbosity"):
        s.verbosity = 7
    with pytest.raises(ValueError, match="device"):
        s.device = "tpu"
    s.datasetdir = "~/somewhere"
    assert "~" not in str(s.datasetdir)


def test_cli_help_and_version():
    from dbk.cli import main

    assert main(["--version"]) == 0
    assert main([]) == 1


def test_n_jobs_sets_torch_blas_and_openmp_threads(tmp_path):
    import torch
    from threadpoolctl import threadpool_info

    from dbk._settings import available_cores

    n = available_cores()
    assert 1 <= n <= (os.cpu_count() or 1) and dbk.settings.n_jobs == n  # unset: the cores this process may use
    # a cgroup v2 quota of 1.5 CPUs caps it at 1; "max" leaves the affinity; v1 quota files are read too
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == n
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert available_cores(v1) == 1
    old_torch = torch.get_num_threads()
    old_omp = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        dbk.settings.n_jobs = 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert all(p["num_threads"] == 1 for p in threadpool_info())  # BLAS and OpenMP pools
        assert "n_jobs=1" in repr(dbk.settings)
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="n_jobs must be a positive integer"):
                dbk.settings.n_jobs = bad
        assert dbk.settings.n_jobs == 1
        # unset: dbk's calls only lower torch to the available cores, never raise it
        dbk.settings.n_jobs = None
        torch.set_num_threads(n + 3)
        assert dbk.settings.apply_threads() == n and torch.get_num_threads() == n
        torch.set_num_threads(1)
        assert dbk.settings.apply_threads() == 1
        # None gives back the threads as they were before n_jobs was set
        dbk.settings.n_jobs = 2
        dbk.settings.n_jobs = None
        assert torch.get_num_threads() == 1 and "OMP_NUM_THREADS" not in os.environ  # 1: set just before
        torch.set_num_threads(old_torch)
        before = {p["user_api"]: p["num_threads"] for p in threadpool_info()}
        dbk.settings.n_jobs = 1
        dbk.settings.n_jobs = None
        assert {p["user_api"]: p["num_threads"] for p in threadpool_info()} == before
        assert torch.get_num_threads() == old_torch
    finally:
        dbk.settings.n_jobs = None
        torch.set_num_threads(old_torch)
        os.environ.pop("OMP_NUM_THREADS", None)
        if old_omp is not None:
            os.environ["OMP_NUM_THREADS"] = old_omp
