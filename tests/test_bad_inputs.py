"""What dbk does with the images, files and arguments a real lab produces (each a clear error or a documented
behaviour)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

import dbk


def _level0(sdata):
    el = sdata.images["he"]
    return el["scale0"]["image"] if hasattr(el, "children") else el


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_grayscale_rgba_uint16_planar_become_rgb_uint8(tmp_path, rng):
    gray = rng.integers(0, 255, (300, 300), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    img = _level0(dbk.io.read_image(tmp_path / "gray.tif", pixel_size_um=0.5))
    assert img.shape == (3, 300, 300) and img.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(img[1]), gray)  # grey repeated to R, G, B

    rgba = rng.integers(0, 255, (300, 300, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba)
    img = _level0(dbk.io.read_image(tmp_path / "rgba.tif", pixel_size_um=0.5))
    np.testing.assert_array_equal(np.asarray(img).transpose(1, 2, 0), rgba[..., :3])  # alpha dropped

    u16 = rng.integers(0, 65535, (300, 300, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", u16)
    img = _level0(dbk.io.read_image(tmp_path / "u16.tif", pixel_size_um=0.5))
    np.testing.assert_array_equal(np.asarray(img).transpose(1, 2, 0), np.round(u16 / 257.0).astype(np.uint8))

    planar = rng.integers(0, 255, (3, 300, 300), dtype=np.uint8)  # channels first on disk
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(np.asarray(_level0(dbk.io.read_image(tmp_path / "planar.tif",
                                                                       pixel_size_um=0.5))), planar)


def test_images_that_are_refused(tmp_path, rng):
    tifffile.imwrite(tmp_path / "f32.tif", rng.random((100, 100, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="f32.tif has pixel type float32"):
        dbk.io.read_image(tmp_path / "f32.tif", pixel_size_um=0.5)
    tifffile.imwrite(tmp_path / "z.tif", rng.integers(0, 255, (5, 100, 100), dtype=np.uint8))
    with pytest.raises(ValueError, match="z.tif has axes"):
        dbk.io.read_image(tmp_path / "z.tif", pixel_size_um=0.5)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"garbage" * 20)
    with pytest.raises(ValueError, match="Cannot read .*bad.tif as a TIFF"):
        dbk.io.read_image(tmp_path / "bad.tif", pixel_size_um=0.5)
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        dbk.io.read_image(tmp_path / "nope.tif", pixel_size_um=0.5)
    tifffile.imwrite(tmp_path / "ok.tif", rng.integers(0, 255, (100, 100, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="pixel_size_um must be a number"):
        dbk.io.read_image(tmp_path / "ok.tif", pixel_size_um=None)
    with pytest.raises(ValueError, match="pixel_size_um must be a positive"):
        dbk.io.read_image(tmp_path / "ok.tif", pixel_size_um=0)


def test_image_smaller_than_a_tile(tmp_path, rng):
    tifffile.imwrite(tmp_path / "tiny.tif", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    sdata = dbk.io.read_image(tmp_path / "tiny.tif", pixel_size_um=0.5)
    with pytest.raises(ValueError, match="Tiles of 224 px do not fit in image 'he' of 8 x 8 px"):
        dbk.pp.make_tiles(sdata, tile_size_um=112)


def test_api_misuse(tmp_path, rng):
    tifffile.imwrite(tmp_path / "ok.tif", rng.integers(0, 255, (400, 400, 3), dtype=np.uint8))
    sdata = dbk.io.read_image(tmp_path / "ok.tif", pixel_size_um=0.5)
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="tile_size_um must be a positive"):
            dbk.pp.make_tiles(sdata, tile_size_um=bad)
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        dbk.pp.make_tiles(sdata, tile_size_um=50, min_tissue_fraction=2)
    dbk.pp.make_tiles(sdata, tile_size_um=50, min_tissue_fraction=0)
    with pytest.raises(ValueError, match="size_px must be a positive"):
        dbk.pp.TileDataset(sdata, size_px=-1)
    with pytest.raises(ValueError, match="target_pixel_size_um must be positive"):
        dbk.pp.TileDataset(sdata, target_pixel_size_um=0)


# ---- images: axes, pyramids, tiny and truncated files ---------------------------------------------------------------


def _tree(*levels):
    """A multiscale image made by hand from (c, y, x) arrays (spatialdata accepts inconsistent levels as they are)."""
    import dask.array as da
    import xarray as xr
    from spatialdata.transformations import Identity

    nodes = {}
    for i, a in enumerate(levels):
        c = list("rgb") if a.shape[0] == 3 else list(range(a.shape[0]))
        arr = xr.DataArray(da.from_array(a, chunks=(a.shape[0], 256, 256)), dims=("c", "y", "x"), coords={"c": c},
                           attrs={"transform": {"global": Identity()}})
        nodes[f"scale{i}"] = xr.Dataset({"image": arr})
    return xr.DataTree.from_dict(nodes)


def _with_pixel_size(image):
    from spatialdata import SpatialData

    sdata = SpatialData(images={"he": image})
    dbk.io.set_pixel_size(sdata, "he", pixel_size_um=0.5)
    return sdata


def test_multiscale_image_with_inconsistent_levels():
    from _builders import tissue_image

    level0 = tissue_image(400, 600)
    from dbk._image import image_levels

    assert [lv.shape_yx for lv in image_levels(_with_pixel_size(_tree(level0, level0[:, ::2, ::2])))] == [
        (400, 600), (200, 300)]
    bad = {
        "not smaller than the level before": _tree(level0, tissue_image(800, 1200)),
        "not smaller than the level before it \\(400 x 600": _tree(level0, level0),
        "'scale1' has 4 channels, level 'scale0' has 3": _tree(level0, np.concatenate([level0, level0[:1]])[:, ::2,
                                                                                                                ::2]),
        "not downsampled equally in y and x": _tree(level0, level0[:, ::4, ::2]),
    }
    for message, image in bad.items():
        sdata = _with_pixel_size(image)
        with pytest.raises(ValueError, match=message):
            dbk.pp.make_tiles(sdata, tile_size_um=28)
        with pytest.raises(ValueError, match="Image 'he'"):
            dbk.pp.tissue_mask(sdata)


def test_wrong_axis_order(tmp_path, rng):
    from _builders import tissue_image
    from spatialdata.models import Image2DModel

    yxc = tissue_image(400, 600).transpose(1, 2, 0)
    sdata = _with_pixel_size(Image2DModel.parse(yxc, dims=("c", "y", "x")))  # (y, x, c) data named (c, y, x)
    for fn in (lambda: dbk.pp.make_tiles(sdata, tile_size_um=28), lambda: dbk.pp.tissue_mask(sdata)):
        with pytest.raises(ValueError, match=r"Image 'he' .*400 channels of 600 x 3 px.*axes look swapped"):
            fn()
    # parsed with the right dims it is the same image
    ok = _with_pixel_size(Image2DModel.parse(yxc, dims=("y", "x", "c")))
    dbk.pp.make_tiles(ok, tile_size_um=28)
    # a TIFF whose RGB samples were written as 3 grey planes (3, y, x) reads as channels first, like a planar RGB
    planes = rng.integers(0, 255, (3, 100, 120), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planes.tif", planes)
    np.testing.assert_array_equal(np.asarray(_level0(dbk.io.read_image(tmp_path / "planes.tif", pixel_size_um=0.5))),
                                  planes)
    # (y, x, 3) written as grey pages: 100 pages of 120 x 3 px, refused with the axes named
    tifffile.imwrite(tmp_path / "pages.tif", planes.transpose(1, 2, 0), photometric="minisblack")
    with pytest.raises(ValueError, match=r"pages.tif has axes 'QYX' \(shape \(100, 120, 3\)\)"):
        dbk.io.read_image(tmp_path / "pages.tif", pixel_size_um=0.5)


def test_tiny_images(tmp_path):
    from spatialdata.models import Image2DModel

    one = _with_pixel_size(Image2DModel.parse(np.full((3, 1, 1), 200, np.uint8), dims=("c", "y", "x")))
    dbk.pp.make_tiles(one, tile_size_px=1, tile_size_um=None, min_tissue_fraction=0)
    assert dbk.pp.tile_bounds(one).tolist() == [[0, 0, 1, 1]]
    item = dbk.pp.TileDataset(one, size_px=8)[0]  # one pixel, upsampled to the model's input
    assert tuple(item["image"].shape) == (3, 8, 8)
    with pytest.raises(ValueError, match="Tiles of 2 px do not fit in image 'he' of 1 x 1 px"):
        dbk.pp.make_tiles(one, tile_size_px=2, tile_size_um=None)
    four = np.full((4, 4, 3), 240, np.uint8)
    four[1:3, 1:3] = (200, 90, 170)
    tifffile.imwrite(tmp_path / "four.tif", four)
    sdata = dbk.io.read_image(tmp_path / "four.tif", pixel_size_um=0.5)
    dbk.pp.tissue_mask(sdata, min_object_um2=0, min_hole_um2=0)
    assert np.asarray(sdata.labels["dbk_tissue"]).shape == (4, 4)


def test_truncated_tiff_is_refused_when_opened(tmp_path, rng):
    tifffile.imwrite(tmp_path / "ok.tif", rng.integers(0, 255, (300, 300, 3), dtype=np.uint8))
    raw = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])  # the header is intact, half the pixels are missing
    with pytest.raises(ValueError, match=r"cut.tif is truncated: its pixel data runs to byte"):
        dbk.io.read_image(tmp_path / "cut.tif", pixel_size_um=0.5)


# ---- coordinates -----------------------------------------------------------------------------------------------------


def test_transcripts_outside_the_image_are_not_counted():
    from _builders import make_sdata
    from spatialdata.models import PointsModel
    from spatialdata.transformations import get_transformation

    sdata, _ = make_sdata(3000)
    pts = sdata.points["transcripts"].compute()
    pts.loc[pts.index[:50], "x"] += 5000.0  # right of the image
    pts.loc[pts.index[50:60], "y"] -= 3000.0  # above it
    sdata.points["transcripts"] = PointsModel.parse(pts, transformations=dict(
        get_transformation(sdata.images["he"], get_all=True)))
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=0)
    dbk.pp.pseudobulk(sdata, min_qv=None, keep_controls=True)
    b = dbk.pp.tile_bounds(sdata)
    inside = np.zeros(len(pts), bool)
    for x0, y0, x1, y1 in b:
        inside |= (pts.x >= x0).to_numpy() & (pts.x < x1).to_numpy() & (pts.y >= y0).to_numpy() & (
            pts.y < y1).to_numpy()
    assert not inside[:60].any()
    assert int(sdata.tables["dbk_table"].layers["counts"].sum()) == int(inside.sum())


def test_zero_tiles_after_filtering():
    import geopandas as gpd
    import shapely
    from _builders import make_sdata
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    sdata, _ = make_sdata(100)
    with pytest.raises(ValueError, match=r"No tile of 800 px has tissue fraction >= 1.0 in image 'he' \(max 0\.\d+\)"):
        dbk.pp.make_tiles(sdata, tile_size_um=400.0, min_tissue_fraction=1.0)
    assert "dbk_tiles" not in sdata.shapes
    spots = gpd.GeoDataFrame({"radius": [5.0, 5.0]}, geometry=shapely.points([5000, 6000], [5000, 7000]))
    sdata.shapes["spots"] = ShapesModel.parse(spots, transformations=dict(
        get_transformation(sdata.images["he"], get_all=True)))
    with pytest.raises(ValueError, match="No spot of 'spots' gives a tile inside image 'he'"):
        dbk.pp.make_tiles(sdata, tile_size_um=56.0, mode="spots")


def test_cells_in_a_coordinate_system_the_image_is_not_in():
    from _builders import add_cells, make_sdata
    from spatialdata.transformations import Identity, set_transformation

    sdata, _ = make_sdata(100)
    add_cells(sdata)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    set_transformation(sdata.shapes["cells"], {"aligned": Identity()}, set_all=True)
    with pytest.raises(ValueError, match="Element 'cells' and image 'he' share no coordinate system"):
        dbk.pp.pseudobulk(sdata, source="cells")


# ---- expression --------------------------------------------------------------------------------------------------


def test_cell_table_with_inf_or_duplicate_genes_and_transcripts_with_numeric_genes():
    import anndata as ad
    import pandas as pd
    from _builders import add_cells, make_sdata
    from spatialdata.models import PointsModel
    from spatialdata.transformations import get_transformation

    sdata, _ = make_sdata(100)
    add_cells(sdata)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    table = sdata.tables["table"]
    table.X = table.X.astype(float)
    table.X[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite counts in table of 'cells'"):
        dbk.pp.pseudobulk(sdata, source="cells")
    table.X[0, 0] = 1.0
    table.var_names = ["A", "A", "C"]
    with pytest.raises(ValueError, match="annotating 'cells' has duplicate gene names"):
        dbk.pp.pseudobulk(sdata, source="cells")
    with pytest.raises(ValueError, match="infinite"):
        dbk.pp.normalize(ad.AnnData(np.array([[np.inf, 1.0]])))

    # gene ids stored as numbers in the transcripts become string gene names
    sdata, _ = make_sdata(1000)
    pts = sdata.points["transcripts"].compute()
    pts["feature_name"] = pts["feature_name"].cat.codes.astype(np.int64)
    sdata.points["transcripts"] = PointsModel.parse(pts, transformations=dict(
        get_transformation(sdata.images["he"], get_all=True)))
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    names = sdata.tables["dbk_table"].var_names
    assert all(isinstance(g, str) for g in names) and set(names) <= {str(i) for i in range(6)}
    assert isinstance(names, pd.Index)


def test_cell_table_with_numeric_gene_names_says_so():
    import pandas as pd
    from _builders import add_cells, make_sdata

    sdata, _ = make_sdata(100)
    add_cells(sdata)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    sdata.tables["table"].var_names = pd.Index([10, 11, 12])
    with pytest.raises(TypeError, match="not .*strings"):
        dbk.pp.pseudobulk(sdata, source="cells")


# ---- files: a HEST folder with corrupt parts ---------------------------------------------------------------------


@pytest.mark.parametrize(("part", "what", "hint"), [
    ("metadata/{}.json", "HEST metadata json", ""),
    ("st/{}.h5ad", "HEST spot table", "Delete or re-download it"),
    ("transcripts/{}_transcripts.parquet", "HEST transcripts parquet", "load_transcripts=False"),
    ("xenium_seg/{}_xenium_cell_seg.parquet", "HEST cell segmentation parquet", "load_cells=False"),
])
def test_hest_folder_with_a_corrupt_part_names_the_file(io_hest_sample, part, what, hint):
    s = io_hest_sample
    path = s.root / part.format(s.sample_id)
    path.write_bytes(path.read_bytes()[:7])  # an interrupted download
    with pytest.raises(ValueError, match=f"Cannot read {what} .*: the file is corrupt or truncated") as err:
        dbk.io.read_hest(s.root, s.sample_id)
    assert str(path) in str(err.value) and hint in str(err.value)


def test_requested_gene_absent_from_the_transcripts_is_zero_with_a_warning():
    import logging

    from _builders import make_sdata

    sdata, _ = make_sdata(500)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    present = ["A", "B"]
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    log = logging.getLogger("dbk")
    handler = _Collect(level=logging.WARNING)
    log.addHandler(handler)
    try:
        dbk.pp.pseudobulk(sdata, genes=[*present, "NOT_A_GENE"])
    finally:
        log.removeHandler(handler)
    t = sdata.tables["dbk_table"]
    assert list(t.var_names) == [*present, "NOT_A_GENE"]
    assert t.layers["counts"][:, 2].sum() == 0 and t.layers["counts"][:, :2].sum() > 0
    assert any("NOT_A_GENE" in m and "no transcript" in m for m in messages), messages
