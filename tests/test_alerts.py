"""Alerts at predict time: a slide unlike the training slides (pixel size, colours, clipped features) is warned about,
with the numbers, and the check's result is recorded; models saved before the check existed say it cannot run."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
from spatialdata import SpatialData
from spatialdata.models import Image2DModel

import dbk
from dbk._image import image_levels
from dbk.tl import DiffBulk, fit_diffbulk
from dbk.tl._slide_checks import (
    COLOUR_MAX_TILES,
    check_colours,
    check_pixel_size,
    tile_colour_stats,
    training_record,
)

TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
        "log_every": 5}
FIT = {"preset": "tiny", "pretrain_steps": 10, "pretrain_kwargs": TINY, "tile_size_um": 56.0, "fm_size_px": 64,
       "random_state": 0, "fusion": "ridge", "head_cv": 0}
SHAPE = (1024, 1024)  # 0.5 µm/px: ~50 tiles of 56 µm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted():
    train = dbk.datasets.synthetic(shape=SHAPE, n_genes=12, random_state=0)
    train.attrs["sample"] = "train0"
    return fit_diffbulk(train, **FIT), train


def he_image(sdata: SpatialData, *, pixel_size_um: float, transform=None, tiles_from: SpatialData | None = None):
    """A new H&E-only slide with the same pixels (optionally transformed), declared at ``pixel_size_um``.

    ``tiles_from``: reuse that slide's tiles (same pixel grid), so no tissue detection runs on a changed image.
    """
    arr = np.asarray(image_levels(sdata, "he")[0].data.values)
    if transform is not None:
        arr = transform(arr)
    new = SpatialData(images={"he": Image2DModel.parse(arr, dims=("c", "y", "x"))}, attrs={"sample": "new"})
    dbk.io.set_pixel_size(new, "he", pixel_size_um=pixel_size_um)
    if tiles_from is not None:
        new.shapes["dbk_tiles"] = copy.deepcopy(tiles_from.shapes["dbk_tiles"])
    return new


def warnings_of(log) -> list[str]:
    return [r.getMessage() for r in log.records if r.name == "dbk" and r.levelno >= logging.WARNING]


def test_fit_records_pixel_size_and_tile_colours_and_they_round_trip(fitted, tmp_path):
    model, train = fitted
    t = model.config["train"]
    assert t["pixel_size_um"] == {"train0": 0.5}
    assert t["pixel_size_um_median"] == 0.5
    rgb = t["tile_rgb"]
    n_tiles = len(train.shapes["dbk_tiles"])
    assert rgb["per_slide"]["train0"]["n_tiles"] == min(COLOUR_MAX_TILES, n_tiles)
    # the record is what the function measures on the training tiles, and plausible H&E (pink: R > G)
    assert rgb["per_slide"]["train0"] == tile_colour_stats(train)
    assert rgb["mean"] == rgb["per_slide"]["train0"]["mean"] and rgb["between_slide_std"] == [0.0, 0.0, 0.0]
    assert all(0 < v < 255 for v in rgb["mean"]) and rgb["mean"][0] > rgb["mean"][1]
    assert all(v > 0 for v in rgb["std"])
    path = model.save(tmp_path / "m")
    on_disk = json.loads((path / "config.json").read_text())["train"]
    assert {k: on_disk[k] for k in ("pixel_size_um", "pixel_size_um_median", "tile_rgb")} == {
        k: t[k] for k in ("pixel_size_um", "pixel_size_um_median", "tile_rgb")}
    loaded = DiffBulk.load(path, device="cpu")
    assert loaded.config["train"]["tile_rgb"] == rgb and loaded.config["train"]["pixel_size_um_median"] == 0.5


def test_training_record_of_several_slides_has_the_median_and_the_spread():
    slides = [dbk.datasets.synthetic(shape=(512, 512), pixel_size_um=px, n_genes=4, random_state=i)
              for i, px in enumerate((0.5, 0.25, 0.6))]
    for sd in slides:
        dbk.pp.make_tiles(sd, tile_size_um=56.0)
    rec = training_record(slides, ["a", "b", "c"])
    assert rec["pixel_size_um"] == {"a": 0.5, "b": 0.25, "c": 0.6} and rec["pixel_size_um_median"] == 0.5
    means = np.array([rec["tile_rgb"]["per_slide"][n]["mean"] for n in "abc"])
    np.testing.assert_allclose(rec["tile_rgb"]["between_slide_std"], means.std(axis=0), atol=1e-3)
    json.dumps(rec)  # plain JSON


def test_pixel_size_declared_2x_off_warns_naming_both_values(fitted, dbk_log):
    model, train = fitted
    new = he_image(train, pixel_size_um=0.25)  # the same pixels, declared at half their size
    model.predict(new)
    msgs = [m for m in warnings_of(dbk_log) if "has a pixel size of" in m]
    assert len(msgs) == 1, warnings_of(dbk_log)
    assert "0.25 µm/px" in msgs[0] and "0.5 µm/px" in msgs[0] and "50% below" in msgs[0]
    assert "train0: 0.5" in msgs[0] and "224 px of this image, 112 px of the training images" in msgs[0]
    assert "dbk.io.get_pixel_size" in msgs[0]
    rec = new.tables["dbk_table"].uns["dbk"]["predict"]["slide_checks"]
    assert rec["pixel_size"]["ok"] is False and rec["pixel_size"]["pixel_size_um"] == 0.25
    assert rec["pixel_size"]["training_median_um"] == 0.5 and rec["ok"] is False
    assert rec["colour"]["ok"] is True  # the pixels are the training slide's: only the scale is wrong


def test_slide_like_the_training_slides_gives_no_warning(fitted, dbk_log, tmp_path):
    model, train = fitted
    new = he_image(train, pixel_size_um=0.5, tiles_from=train)
    model.predict(new)
    assert warnings_of(dbk_log) == []
    rec = new.tables["dbk_table"].uns["dbk"]["predict"]["slide_checks"]
    assert rec["ran"] is True and rec["ok"] is True
    assert rec["pixel_size"]["relative_difference"] == 0.0
    # the same pixels, read from level 0 here and from the training slide's pyramid at fit: a few levels apart
    assert np.abs(rec["colour"]["difference"]).max() < 5 and rec["clipped"]["fraction"] <= 0.01
    new.tables["dbk_table"].write_h5ad(tmp_path / "t.h5ad")  # the uns record is storable in h5ad


def test_inverted_image_warns_about_colours_with_the_numbers(fitted, dbk_log):
    model, train = fitted
    new = he_image(train, pixel_size_um=0.5, transform=lambda a: 255 - a, tiles_from=train)
    model.predict(new)
    msgs = [m for m in warnings_of(dbk_log) if "colours unlike" in m]
    assert len(msgs) == 1, warnings_of(dbk_log)
    ref = model.config["train"]["tile_rgb"]["mean"]
    assert f"({', '.join(f'{v:.0f}' for v in ref)}) in training" in msgs[0]
    assert "R, B beyond it" in msgs[0]  # G of this pink H&E sits near the middle: inverted, it barely moves
    rec = new.tables["dbk_table"].uns["dbk"]["predict"]["slide_checks"]["colour"]
    assert rec["ok"] is False
    np.testing.assert_allclose(rec["rgb_mean"], 255 - np.asarray(ref), atol=5)  # level 0 vs the pyramid
    assert not [m for m in warnings_of(dbk_log) if "has a pixel size of" in m]


def test_colour_and_pixel_size_thresholds(dbk_log):
    train = {"pixel_size_um": {"a": 0.5, "b": 0.52}, "pixel_size_um_median": 0.51,
             "tile_rgb": {"mean": [180.0, 130.0, 160.0], "between_slide_std": [2.0, 20.0, 0.0]}}
    assert check_pixel_size(0.6, train, name="s", tile_size_um=112.0)["ok"]  # 18% off: another scanner
    assert not check_pixel_size(0.65, train, name="s", tile_size_um=112.0)["ok"]  # 27% off
    assert check_pixel_size(None, train, name="s", tile_size_um=112.0) is None
    assert len(warnings_of(dbk_log)) == 1
    stats = {"mean": [180.0, 130.0, 160.0], "std": [30.0, 30.0, 30.0]}
    # R: 40 levels is the floor; G: 3 between-slide stds (60) is wider; B: the floor
    assert check_colours(stats | {"mean": [219.0, 185.0, 121.0]}, train, name="s")["ok"]
    tinted = check_colours(stats | {"mean": [180.0, 130.0, 80.0]}, train, name="s")  # blue halved
    assert not tinted["ok"] and tinted["limit"] == [40.0, 60.0, 40.0] and tinted["difference"] == [0.0, 0.0, -80.0]
    assert "(+0, +0, -80) levels" in warnings_of(dbk_log)[-1] and "B beyond it" in warnings_of(dbk_log)[-1]
    assert check_colours(None, train, name="s") is None and check_colours(stats, {}, name="s") is None


def test_model_without_the_training_record_says_the_check_cannot_run(fitted, dbk_log):
    model, train = fitted
    config = copy.deepcopy(model.config)
    for k in ("pixel_size_um", "pixel_size_um_median", "tile_rgb"):
        del config["train"][k]
    old = DiffBulk(pretrainer=model.pretrainer, head=model.head, fm=model.fm, config=config, scalers=model.scalers)
    table = train.tables["dbk_table"].copy()
    for _ in range(2):
        old.predict(table, key_added="p_old")
    msgs = [m for m in warnings_of(dbk_log) if "cannot run" in m]
    assert len(msgs) == 1 and "pixel-size and colour checks" in msgs[0]  # once per model
    rec = table.uns["dbk"]["predict"]["slide_checks"]
    assert rec["ran"] is False
    # the fitted model checks a table by the pixel size it records
    table.uns["dbk"]["um_per_px"] = 1.0
    model.predict(table, key_added="p_new")
    msgs = [m for m in warnings_of(dbk_log) if "has a pixel size of" in m]
    assert len(msgs) == 1 and "1 µm/px, 100% above the training slides' 0.5 µm/px" in msgs[0]


def test_clipped_features_warn_with_the_fractions(fitted, dbk_log):
    model, train = fitted
    table = train.tables["dbk_table"].copy()
    table.obsm[model.fm_key] = np.asarray(table.obsm[model.fm_key]) * 50.0 + 10.0
    model.predict(table, key_added="p_shift")
    msgs = [m for m in warnings_of(dbk_log) if "clipped" in m]
    assert len(msgs) == 1 and "looks unlike the training slides" in msgs[0]
    rec = table.uns["dbk"]["predict"]["slide_checks"]["clipped"]
    assert rec["ok"] is False and rec["per_features"][model.diff_key] == 0.0
    frac = rec["per_features"][model.fm_key]
    assert frac > 0.02 and f"{model.fm_key}: {100 * frac:.1f}%" in msgs[0]
