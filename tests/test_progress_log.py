"""Long work says something in the log, progress bars or not, and names the slide it works on."""

from __future__ import annotations

import logging

import numpy as np

import dbk
import dbk.core._pretrainer as pretrainer_module
from dbk.core import DiffusionPretrainer, TileArrays


def test_stage1_logs_progress_lines_without_progress_bars(monkeypatch, caplog):
    monkeypatch.setattr(pretrainer_module, "LOG_INTERVAL_S", 0.0)  # a line after every step
    rng = np.random.default_rng(0)
    tiles = TileArrays(rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8), X=rng.random((8, 2)), genes=["A", "B"])
    model = DiffusionPretrainer(["A", "B"], preset="tiny", image_size=16, block_out_channels=(16, 32), gene_dim=32,
                                log_every=1)
    assert dbk.settings.progress is False  # the suite's default: no tqdm bar to watch
    with caplog.at_level(logging.INFO, logger="dbk"):
        model.fit(tiles, max_steps=3, batch_size=4, accelerator="cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit: step ")]
    assert [ln.split(",")[0] for ln in lines] == ["fit: step 1/3", "fit: step 2/3", "fit: step 3/3"]
    assert all("loss" in ln and "min left" in ln for ln in lines)


def test_readers_name_the_slide(tmp_path):
    import tifffile

    path = tmp_path / "patient7_he.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    sdata = dbk.io.read_image(path, pixel_size_um=0.5)
    assert sdata.attrs["sample"] == "patient7_he"
