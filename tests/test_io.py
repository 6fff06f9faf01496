from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import dask.array as da
import dask.dataframe as dd
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import spatialdata as sd
import tifffile
from PIL import Image
from spatialdata.models import Image2DModel, TableModel
from spatialdata.transformations import Identity, get_transformation

import dbk
from dbk.io import image_levels


@contextmanager
def dbk_log():
    """Collect the messages of the "dbk" logger (it does not propagate, so caplog misses them)."""
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("dbk")
    handler, old_level = _Collect(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def scale_data(element, i: int):
    return element[f"scale{i}"]["image"]


# ---- read_hest ------------------------------------------------------------------------------------------------------


def test_read_hest_image_is_the_files_pyramid_lazily(io_hest_sample):
    s = io_hest_sample
    sdata = dbk.io.read_hest(s.root, s.sample_id)
    he = sdata.images["he"]
    Image2DModel().validate(he)
    assert [lvl.shape_yx for lvl in image_levels(sdata, "he")] == [(768, 1024), (384, 512)]
    for i, written in enumerate([s.level0, s.level1]):
        arr = scale_data(he, i)
        assert arr.dims == ("c", "y", "x") and arr.dtype == np.uint8
        assert list(arr.coords["c"].values) == ["r", "g", "b"]
        assert isinstance(arr.data, da.Array)  # lazy
        for y, x in [(0, 0), (5, 13), (200, 300), (arr.sizes["y"] - 1, arr.sizes["x"] - 1)]:
            np.testing.assert_array_equal(arr[:, y, x].values, written[y, x])
    # scale1 is the file's level 1 (blue 200), not a level recomputed from level 0 (blue 7)
    assert (scale_data(he, 1).sel(c="b").values == 200).all()
    assert get_transformation(he, "global") == Identity()


def test_read_hest_pixel_size_and_coordinate_systems(io_hest_sample):
    s = io_hest_sample
    sdata = dbk.io.read_hest(s.root, s.sample_id)
    assert dbk.io.get_pixel_size(sdata, "he") == pytest.approx(0.5)  # estimated wins over embedded (0.2625)
    for name in ("spots", "cells", "transcripts"):
        t = get_transformation(sdata[name], get_all=True)
        assert t["global"] == Identity()
        m = t["um"].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        np.testing.assert_allclose(np.diag(m)[:2], [0.5, 0.5])
    assert sdata.attrs["hest_metadata"]["st_technology"] == "Xenium"
    assert sdata.attrs["hest_metadata"]["not_a_number"] is None  # NaN made json-safe


def test_read_hest_pixel_size_falls_back_to_embedded_then_errors(io_hest_sample):
    s = io_hest_sample
    meta_path = s.root / "metadata" / f"{s.sample_id}.json"
    meta = dict(s.metadata, pixel_size_um_estimated=None)
    meta_path.write_text(json.dumps(meta))
    sdata = dbk.io.read_hest(s.root, s.sample_id, load_transcripts=False, load_cells=False)
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(0.2625)
    meta_path.write_text(json.dumps({"st_technology": "Visium"}))
    with pytest.raises(ValueError, match="pixel_size_um_estimated"):
        dbk.io.read_hest(s.root, s.sample_id)


def test_read_hest_spots_and_table(io_hest_sample):
    s = io_hest_sample
    sdata = dbk.io.read_hest(s.root, s.sample_id)
    spots, table = sdata.shapes["spots"], sdata.tables["table"]
    np.testing.assert_allclose(np.c_[spots.geometry.x, spots.geometry.y], s.spots_xy)
    np.testing.assert_allclose(spots["radius"], 55.0 / 2 / 0.5)  # spot_diameter 55 µm at 0.5 µm/px
    TableModel().validate(table)
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "spots"
    region_key, instance_key = attrs["region_key"], attrs["instance_key"]
    assert (table.obs[region_key] == "spots").all()
    np.testing.assert_array_equal(table.obs[instance_key].to_numpy(), spots.index.to_numpy())
    np.testing.assert_allclose(table.obsm["spatial"], s.spots_xy)
    np.testing.assert_array_equal(table.X.toarray(), s.counts)
    np.testing.assert_array_equal(table.layers["counts"].toarray(), s.counts)
    assert list(table.var_names) == s.genes and list(table.obs_names) == s.barcodes
    assert (table.obs["sample"] == s.sample_id).all()


def test_read_hest_spot_radius_fallbacks(io_hest_sample):
    s = io_hest_sample
    meta_path = s.root / "metadata" / f"{s.sample_id}.json"
    meta_path.write_text(json.dumps({"pixel_size_um_estimated": 0.5, "inter_spot_dist": 100.0}))
    sdata = dbk.io.read_hest(s.root, s.sample_id, load_transcripts=False, load_cells=False)
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 0.55 * 100 / 2 / 0.5)
    meta_path.write_text(json.dumps({"pixel_size_um_estimated": 0.5}))
    with dbk_log() as log:
        sdata = dbk.io.read_hest(s.root, s.sample_id, load_transcripts=False, load_cells=False)
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 55 / 2 / 0.5)
    assert any("Visium" in m for m in log)


def test_read_hest_transcripts_lazy_and_exact(io_hest_sample):
    s = io_hest_sample
    sdata = dbk.io.read_hest(s.root, s.sample_id)
    pts = sdata.points["transcripts"]
    assert isinstance(pts, dd.DataFrame)
    assert set(pts.columns) == {"x", "y", "feature_name", "qv", "cell_id"}  # no x_location, transcript_id, ...
    assert pts.attrs["spatialdata_attrs"]["feature_key"] == "feature_name"
    assert pts["feature_name"].cat.known
    assert list(pts["feature_name"].cat.categories) == sorted(s.transcripts["feature_name"].unique())
    df = pts.compute().sort_values(["x", "y"]).reset_index(drop=True)
    exp = s.transcripts.sort_values(["he_x", "he_y"]).reset_index(drop=True)
    assert len(df) == len(exp) == 1000
    np.testing.assert_allclose(df["x"], exp["he_x"])
    np.testing.assert_allclose(df["y"], exp["he_y"])
    assert (df["feature_name"].astype(str).to_numpy() == exp["feature_name"].to_numpy()).all()
    assert (df["cell_id"].to_numpy() == exp["cell_id"].to_numpy()).all()


def test_read_hest_transcripts_with_binary_gene_names(io_hest_sample):
    s = io_hest_sample
    tx = s.transcripts.assign(feature_name=s.transcripts["feature_name"].str.encode("utf-8"))
    pq.write_table(
        pa.Table.from_pandas(tx, preserve_index=False), s.root / "transcripts" / f"{s.sample_id}_transcripts.parquet"
    )
    pts = dbk.io.read_hest(s.root, s.sample_id, load_cells=False).points["transcripts"]
    assert list(pts["feature_name"].cat.categories) == sorted(s.transcripts["feature_name"].unique())
    assert pts.compute()["feature_name"].astype(str).isin([*s.genes, "NegControlProbe_00001"]).all()


def test_read_hest_cells_from_wkb_and_geoparquet(io_hest_sample):
    s = io_hest_sample
    cells = dbk.io.read_hest(s.root, s.sample_id, load_transcripts=False).shapes["cells"]
    assert list(cells.index) == list(s.cells)
    for cid, poly in s.cells.items():
        assert cells.geometry[cid].equals(poly)
    # a GeoParquet file with the ids in a cell_id column reads the same
    gdf = gpd.GeoDataFrame({"cell_id": list(s.cells)}, geometry=list(s.cells.values()))
    gdf.to_parquet(s.root / "xenium_seg" / f"{s.sample_id}_xenium_cell_seg.parquet")
    cells2 = dbk.io.read_hest(s.root, s.sample_id, load_transcripts=False).shapes["cells"]
    assert list(cells2.index) == list(s.cells)
    assert all(cells2.geometry[cid].equals(poly) for cid, poly in s.cells.items())


@pytest.mark.parametrize(
    ("sub", "name", "what"), [("wsis", "{}.tif", "H&E image"), ("metadata", "{}.json", "metadata")]
)
def test_read_hest_missing_required_file_names_it(io_hest_sample, sub, name, what):
    s = io_hest_sample
    path = s.root / sub / name.format(s.sample_id)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=what) as err:
        dbk.io.read_hest(s.root, s.sample_id)
    assert str(path) in str(err.value)


def test_read_hest_optional_parts_skipped_or_off(io_hest_sample):
    s = io_hest_sample
    sdata = dbk.io.read_hest(s.root, s.sample_id, load_transcripts=False, load_cells=False)
    assert "transcripts" not in sdata.points and "cells" not in sdata.shapes and "spots" in sdata.shapes
    for sub in ("st", "transcripts", "xenium_seg"):
        for f in (s.root / sub).iterdir():
            f.unlink()
    with dbk_log() as log:
        sdata = dbk.io.read_hest(s.root, s.sample_id)
    assert set(sdata.images) == {"he"} and not sdata.shapes and not sdata.points and not sdata.tables
    assert sum("reading without" in m for m in log) == 3


def test_read_hest_writes_to_zarr_and_reads_back(io_hest_sample, tmp_path):
    s = io_hest_sample
    sdata = dbk.io.read_hest(s.root, s.sample_id)
    sdata.write(tmp_path / "x.zarr")
    back = sd.read_zarr(tmp_path / "x.zarr")
    assert dbk.io.get_pixel_size(back, "he") == pytest.approx(0.5)
    assert back.attrs["hest_metadata"]["spot_diameter"] == 55.0
    np.testing.assert_array_equal(scale_data(back.images["he"], 1).values.transpose(1, 2, 0), s.level1)
    assert len(back.points["transcripts"]) == 1000
    np.testing.assert_array_equal(back.tables["table"].layers["counts"].toarray(), s.counts)
    um = get_transformation(back.shapes["spots"], "um").to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    np.testing.assert_allclose(np.diag(um)[:2], [0.5, 0.5])


@pytest.mark.parametrize(
    ("patient", "expected"),
    [("Patient B", "Patient B"), (" 7 ", "7"), (3, "3"), (3.0, "3"), (None, None), ("", None), ("missing", None)],
)
def test_read_hest_patient_from_the_metadata(io_hest_sample, tmp_path, patient, expected):
    s = io_hest_sample
    meta = dict(s.metadata) if patient == "missing" else dict(s.metadata, patient=patient)
    (s.root / "metadata" / f"{s.sample_id}.json").write_text(json.dumps(meta))
    sdata = dbk.io.read_hest(s.root, s.sample_id, load_transcripts=False, load_cells=False)
    assert sdata.attrs.get("patient") == expected
    if patient != "missing":
        assert sdata.attrs["hest_metadata"]["patient"] == patient  # the metadata itself is kept as it is
    if expected is not None:  # it is what dbk.tl.benchmark(split="patient") reads, and it survives a zarr store
        dbk.io.write_zarr(sdata, tmp_path / "x.zarr")
        assert sd.read_zarr(tmp_path / "x.zarr").attrs["patient"] == expected


# ---- TIFF pyramids and pixel types ----------------------------------------------------------------------------------


def test_tiff_pyramid_with_ceil_level_shapes_is_cropped_not_recomputed(tmp_path):
    # levels 1001x777 -> 501x389 -> 251x195 (ceil, as many writers do); spatialdata expects floor: 500x388, 250x194
    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(777, 1001), (389, 501), (195, 251)]]
    path = tmp_path / "odd.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(128, 128), photometric="rgb", subifds=2)
        for lvl in levels[1:]:
            tw.write(lvl, tile=(128, 128), photometric="rgb", subfiletype=1)
    sdata = dbk.io.read_image(path, pixel_size_um=0.25)
    shapes = [lvl.shape_yx for lvl in image_levels(sdata)]
    assert shapes == [(777, 1001), (388, 500), (194, 250)]
    for i, written in enumerate(levels):
        h, w = shapes[i]
        np.testing.assert_array_equal(scale_data(sdata["he"], i).values.transpose(1, 2, 0), written[:h, :w])
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(0.25)


def test_direct_tiff_readers_release_their_files_with_the_slides(tmp_path):
    """A slide's direct TIFF reader lives as long as its arrays: slides read one after the other keep no file open
    once dropped (it was one open file per slide, for the whole session: 'Too many open files' past the limit)."""
    import gc
    import os

    from dbk.io._tiff import _DIRECT, TiffLevel

    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc/self/fd to list the open files")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"slide{i}.tif")
        tifffile.imwrite(paths[-1], rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), photometric="rgb",
                         tile=(128, 128))
    ours = {os.path.realpath(p) for p in paths}

    def open_files() -> set[str]:
        found = set()
        for f in fd_dir.iterdir():
            try:
                found.add(os.readlink(f))
            except OSError:
                continue
        return found & ours

    def registered() -> set[str]:
        return {os.path.realpath(src.path) for ref, _ in list(_DIRECT.values())
                if isinstance(src := ref(), TiffLevel)} & ours

    def dataset(path):
        sdata = dbk.io.read_image(path, pixel_size_um=0.5)
        dbk.pp.make_tiles(sdata, tile_size_um=112, min_tissue_fraction=0)
        return sdata, dbk.pp.TileDataset(sdata, size_px=224)

    kept = None
    for i, path in enumerate(paths):
        sdata, ds = dataset(path)
        assert ds._direct is not None  # read straight from the file
        ds.read(0)
        if i == 0:
            kept = sdata
        del sdata, ds
    gc.collect()
    assert open_files() == {os.path.realpath(paths[0])}  # only the slide still held
    assert registered() == {os.path.realpath(paths[0])}

    # the kept slide still reads directly, the same pixels as through its dask array
    ds = dbk.pp.TileDataset(kept, size_px=224)
    assert ds._direct is not None
    direct = ds.read(3)
    ds._direct = None
    np.testing.assert_array_equal(direct, ds.read(3))
    # the same file read again while its reader lives: the one reader, one open file
    again, ds2 = dataset(paths[0])
    ds2.read(1)
    assert len([f for f in fd_dir.iterdir() if os.path.realpath(f) in ours]) == 1
    del kept, again, ds, ds2
    gc.collect()
    assert open_files() == set()
    assert registered() == set()


@pytest.mark.parametrize(
    ("array", "kwargs", "expected"),
    [
        (np.full((64, 80), 90, np.uint8), {"photometric": "minisblack"}, [90, 90, 90]),
        (np.dstack([np.full((64, 80), v, np.uint8) for v in (10, 20, 30, 255)]), {"photometric": "rgb"}, [10, 20, 30]),
        (
            np.full((3, 64, 80), 40, np.uint8) + np.arange(3, dtype=np.uint8)[:, None, None] * 10,
            {"photometric": "rgb", "planarconfig": "separate"},
            [40, 50, 60],
        ),
        (np.full((64, 80, 3), 257 * 100, np.uint16), {"photometric": "rgb"}, [100, 100, 100]),
    ],
    ids=["gray", "rgba", "planar", "uint16"],
)
def test_tiff_pixel_types_become_rgb_uint8(tmp_path, array, kwargs, expected):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, array, **kwargs)
    he = dbk.io.read_image(path, pixel_size_um=0.5)["he"]
    Image2DModel().validate(he)
    assert he.dtype == np.uint8 and he.shape == (3, 64, 80)
    np.testing.assert_array_equal(he[:, 10, 20].values, expected)


def test_float_tiff_is_a_clear_error(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.zeros((32, 32, 3), np.float32), photometric="rgb")
    with pytest.raises(TypeError, match="float32"):
        dbk.io.read_image(tmp_path / "f.tif", pixel_size_um=0.5)


# ---- read_image (plain formats) -------------------------------------------------------------------------------------


def test_read_image_png_exact_values_and_key(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (1200, 1100, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "he.png")
    sdata = dbk.io.read_image(tmp_path / "he.png", pixel_size_um=0.3, image_key="slide")
    assert list(sdata.images) == ["slide"]
    levels = image_levels(sdata, "slide")
    assert levels[0].shape_yx == (1200, 1100) and len(levels) == 2  # lazy factor-2 pyramid down to >= 512 px
    assert isinstance(levels[0].data.data, da.Array)
    np.testing.assert_array_equal(levels[0].data.values.transpose(1, 2, 0), rgb)
    assert dbk.io.get_pixel_size(sdata, "slide") == pytest.approx(0.3)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jpg"):
        dbk.io.read_image(tmp_path / "nope.jpg", pixel_size_um=0.5)


# ---- read_st --------------------------------------------------------------------------------------------------------


def _write_st_folder(folder: Path, *, pitch_px: float = 290.0):
    """6 x 4 array of spots on a known pitch; one selected spot without counts, one unselected, a duplicated gene."""
    folder.mkdir(parents=True)
    Image.fromarray(np.full((1300, 1900, 3), 230, np.uint8)).save(folder / "he.jpg")
    rows = []
    for x in range(1, 7):
        for y in range(1, 5):
            rows.append(
                {
                    "x": x,
                    "y": y,
                    "new_x": x + 0.01,
                    "new_y": y - 0.02,
                    "pixel_x": 100 + pitch_px * (x + 0.01),
                    "pixel_y": 50 + pitch_px * (y - 0.02),
                    "selected": 0 if (x, y) == (6, 4) else 1,
                }
            )
    spots = pd.DataFrame(rows)
    spots.to_csv(folder / "spot_selection.tsv", sep="\t", index=False)
    keys = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True) if (x, y) != (1, 1)]  # 1x1: no counts
    counts = pd.DataFrame(np.arange(len(keys) * 3).reshape(len(keys), 3), index=keys, columns=["A", "B", "A"])
    counts.to_csv(folder / "counts.tsv.gz", sep="\t")
    return spots, counts


def test_read_st_folder_joins_spots_and_counts(tmp_path):
    spots, counts = _write_st_folder(tmp_path / "S1")
    with pytest.warns(UserWarning, match="more than once"), dbk_log() as log:
        sdata = dbk.io.read_st_folder(tmp_path / "S1")
    table, circles = sdata.tables["table"], sdata.shapes["spots"]
    assert table.n_obs == 22  # 24 spots - 1 unselected - 1 without counts
    assert "1x1" not in table.obs_names and "6x4" not in table.obs_names
    assert any("1 selected spot" in m for m in log)
    assert list(table.var_names) == ["A", "B", "A-1"]
    np.testing.assert_array_equal(table.X.toarray(), counts.loc[table.obs_names].to_numpy())
    assert table.X.dtype == np.int32 and table.X.format == "csr"
    assert (table.obs["sample"] == "S1").all()
    sel = spots.set_index(spots["x"].astype(str) + "x" + spots["y"].astype(str)).loc[table.obs_names]
    np.testing.assert_array_equal(table.obs["array_x"], sel["x"])
    np.testing.assert_allclose(table.obsm["spatial"], sel[["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], table.obsm["spatial"])
    ps = dbk.io.get_pixel_size(sdata)
    assert ps == pytest.approx(200 / 290.0)  # estimated from the spot pitch
    np.testing.assert_allclose(circles["radius"], 50.0 / ps)
    assert sdata.attrs["dbk_pixel_size_fit"]["rms_residual_px"] < 1e-6
    assert table.uns["spatialdata_attrs"]["region"] == "spots"


def test_read_st_given_pixel_size_and_missing_files(tmp_path):
    _write_st_folder(tmp_path / "S1")
    f = tmp_path / "S1"
    with pytest.warns(UserWarning):
        sdata = dbk.io.read_st(
            f / "counts.tsv.gz",
            f / "spot_selection.tsv",
            f / "he.jpg",
            pixel_size_um=0.7,
            spot_diameter_um=55.0,
            sample="mine",
        )
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(0.7)
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 27.5 / 0.7)
    assert (sdata.tables["table"].obs["sample"] == "mine").all()
    (f / "counts.tsv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="counts"):
        dbk.io.read_st_folder(f)
    with pytest.raises(FileNotFoundError, match=re.escape(str(f / "counts.tsv.gz"))):
        dbk.io.read_st(f / "counts.tsv.gz", f / "spot_selection.tsv", f / "he.jpg", pixel_size_um=0.7)


@pytest.mark.her2st
def test_her2st_b4_section(her2st_dir):
    folder = her2st_dir / "B4"
    sel = pd.read_csv(folder / "spot_selection.tsv", sep="\t")
    sel = sel[sel["selected"] == 1]
    keys = set(pd.read_csv(folder / "counts.tsv.gz", sep="\t", index_col=0, usecols=[0]).index)
    n_expected = int(sum(f"{x}x{y}" in keys for x, y in zip(sel["x"], sel["y"], strict=True)))

    sdata = dbk.io.read_st_folder(folder)
    table = sdata.tables["table"]
    assert table.n_obs == n_expected == len(sdata.shapes["spots"])
    assert 14_000 <= table.n_vars <= 16_000
    _, h, w = sdata.images["he"]["scale0"]["image"].shape
    assert (h, w) == (9923, 9272)
    ps = dbk.io.get_pixel_size(sdata)
    assert 0.67 < ps < 0.70
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 50.0 / ps)
    assert (table.obsm["spatial"][:, 0] < w).all() and (table.obsm["spatial"][:, 1] < h).all()
