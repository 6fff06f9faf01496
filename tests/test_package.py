from __future__ import annotations

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
    s.verbosity = 3
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
