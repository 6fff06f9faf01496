from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


@pytest.fixture(autouse=True)
def _quiet_progress():
    import dbk

    old = dbk.settings.progress
    dbk.settings.progress = False
    yield
    dbk.settings.progress = old


@pytest.fixture
def her2st_dir() -> Path:
    if not HER2ST.is_dir():
        pytest.skip(f"real her2st data not found at {HER2ST} (the shared/ folder beside the checkout)")
    return HER2ST
