"""Inputs dbk refuses or flags (issue 23): float images in 0..255, typos in element keys, duplicate tile names, tiles
outside the image, pseudo-bulks with no gene left, paths out of their folder, Ensembl ids with version suffixes."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import dbk


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_dbk():
    """The WARNING messages of the "dbk" logger during the test."""
    handler = _Collect()
    log = logging.getLogger("dbk")
    log.addHandler(handler)
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)


def _sdata_of(image_cyx, pixel_size_um=0.5):
    import dask.array as da
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    img = Image2DModel.parse(da.from_array(image_cyx, chunks=(image_cyx.shape[0], 256, 256)), dims=("c", "y", "x"),
                             c_coords=["r", "g", "b"])
    sdata = SpatialData(images={"he": img})
    dbk.io.set_pixel_size(sdata, "he", pixel_size_um=pixel_size_um)
    return sdata


# ---- 13: float images in 0..255 -------------------------------------------------------------------------------------


def test_float_image_in_0_255_reads_as_the_uint8_image_with_a_warning(warnings_of_dbk):
    from _builders import tissue_image

    u8 = tissue_image(300, 400, tissue=(50, 250, 60, 340))
    u8[:, 100:120, 100:200] = np.arange(100, dtype=np.uint8)[None, None, :] * 2  # a ramp: every level of grey
    ref = _sdata_of(u8)
    f255 = _sdata_of(u8.astype(np.float32))  # the same pixels as float 0..255
    f01 = _sdata_of(u8.astype(np.float32) / 255)  # and as float 0..1
    tiles = []
    for sd in (ref, f255, f01):
        dbk.pp.make_tiles(sd, tile_size_px=100, tile_size_um=None, min_tissue_fraction=0)
        ds = dbk.pp.TileDataset(sd, size_px=100)
        tiles.append(np.stack([np.asarray(ds[i]["image"]) for i in range(len(ds))]))
    np.testing.assert_array_equal(tiles[1], tiles[0])  # before: clipped to 1, i.e. white almost everywhere
    np.testing.assert_array_equal(tiles[2], tiles[0])
    said = [m for m in warnings_of_dbk if "float image" in m]
    assert len(said) == 1, warnings_of_dbk  # once for the image, not once per tile or per step
    assert "Image 'he' is a float image with values from 0 to 245" in said[0] and "read as 0..255" in said[0]


@pytest.mark.parametrize(("scale", "offset", "message"), [
    (257.0, 0.0, r"Image 'he' is a float image with values from 3.084e\+04 to 6.296e\+04: in neither 0..1 nor 0..255"),
    (1 / 255, -0.5, r"Image 'he' is a float image with values from -0.02941 to 0.4608: negative pixel values"),
    (1.0, -128.0, r"Image 'he' is a float image with values from -8 to 117: negative pixel values"),
])
def test_float_image_in_neither_range_is_refused_with_the_numbers(scale, offset, message):
    from _builders import tissue_image

    sdata = _sdata_of(tissue_image(300, 400).astype(np.float32) * np.float32(scale) + np.float32(offset))
    with pytest.raises(ValueError, match=message):
        dbk.pp.make_tiles(sdata, tile_size_px=100, tile_size_um=None, min_tissue_fraction=0)


def test_float_image_white_helper():
    from dbk._image import float_image_white

    assert float_image_white(np.full((3, 8, 8), 0.9, np.float32)) == 1.0
    assert float_image_white(np.full((3, 8, 8), 1.2, np.float32)) == 1.0  # resampling overshoot
    assert float_image_white(np.full((3, 8, 8), 200.0, np.float32)) == 255.0
    with pytest.raises(ValueError, match="no finite value"):
        float_image_white(np.full((3, 8, 8), np.nan, np.float32))


# ---- 14: a key the user names must exist -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"table_key": "dbk_tabel"},
     r"fit_diffbulk: table_key='dbk_tabel' names no table of slide 'sample' \(its tables: \['dbk_table', 'table'\]\)"),
    ({"tiles_key": "dbk_tils"},
     r"fit_diffbulk: tiles_key='dbk_tils' names no shapes element of slide 'sample' \(its shapes: \['dbk_tiles'\]\)"),
])
def test_a_typo_in_a_key_is_refused_not_made(kwargs, message):
    from _builders import make_sdata

    sdata, _ = make_sdata(2000)
    sdata.attrs["sample"] = "sample"
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    import anndata as ad
    from spatialdata.models import TableModel

    sdata.tables["table"] = TableModel.parse(ad.AnnData(np.zeros((1, 1), np.float32)))
    before = (sorted(sdata.shapes), sorted(sdata.tables))
    with pytest.raises(KeyError, match=message):
        dbk.tl.fit_diffbulk(sdata, fusion="ridge", head_cv=0, preset="tiny", **kwargs)
    assert (sorted(sdata.shapes), sorted(sdata.tables)) == before  # nothing was made under the misspelt key


def test_named_keys_that_exist_and_defaults_pass():
    from _builders import make_sdata

    from dbk._keys import check_named_keys

    sdata, _ = make_sdata(100)
    check_named_keys(sdata, "s")  # the defaults are made on demand: not checked
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, key_added="my_tiles")
    check_named_keys(sdata, "s", tiles_key="my_tiles")
    with pytest.raises(KeyError, match=r"table_key='my_table' names no table of slide 's'"):
        check_named_keys(sdata, "s", tiles_key="my_tiles", table_key="my_table", where="predict")


# ---- 15: duplicate tile names, tiles outside the image, no gene left -------------------------------------------------


def test_duplicate_obs_names_in_the_tile_table_are_refused_before_training():
    from _builders import make_sdata

    sdata, _ = make_sdata(2000)
    sdata.attrs["sample"] = "s1"
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    table = sdata.tables["dbk_table"]
    names = table.obs_names.to_numpy().copy()
    names[3], names[5] = names[0], names[1]  # instance ids stay unique: the rows still match their tiles
    table.obs_names = names
    with pytest.raises(ValueError, match=r"Table 'dbk_table' of slide 's1' has duplicate obs_names: 2 names are used "
                                         r"by several rows \(e.g. \['0', '1'\]\)"):
        dbk.tl.fit_diffbulk(sdata, fusion="ridge", head_cv=0, preset="tiny", pretrain_steps=0)
    assert not any(k.startswith("X_") for k in table.obsm)  # refused before any embedding


def _with_tiles(sdata, bounds):
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    b = np.asarray(bounds, dtype=np.float64)
    frame = {"x0": b[:, 0], "y0": b[:, 1], "x1": b[:, 2], "y1": b[:, 3]}
    ok = np.isfinite(b).all(axis=1)
    geom = [shapely.box(*row) if good else shapely.Point(0, 0) for row, good in zip(b, ok, strict=True)]
    sdata.shapes["dbk_tiles"] = ShapesModel.parse(gpd.GeoDataFrame(frame, geometry=geom), transformations=dict(
        get_transformation(sdata.images["he"], get_all=True)))


@pytest.mark.parametrize(("bounds", "message"), [
    ([[0, 0, 100, 100], [100, np.nan, 200, 100]],
     r"1 of the 2 tiles of 'dbk_tiles' have NaN or infinite bounds .*e.g. tiles \[1\]"),
    ([[0, 0, 100, 100], [200, 0, 100, 100], [0, 0, 100, 100]],
     r"1 of the 3 tiles of 'dbk_tiles' are empty or inverted \(x1 <= x0 or y1 <= y0.*tile 1 has \(x0, y0, x1, y1\) = "
     r"\(200, 0, 100, 100\)"),
    ([[0, 0, 100, 100], [5000, 0, 5100, 100]],
     r"1 of the 2 tiles of 'dbk_tiles' lie wholly outside image 'he' \(1000 x 1400 px\), e.g. tiles \[1\]"),
])
def test_tile_bounds_nan_inverted_or_outside_the_image_are_refused(bounds, message):
    from _builders import make_sdata

    sdata, _ = make_sdata(1000)
    _with_tiles(sdata, bounds)
    with pytest.raises(ValueError, match=message):
        dbk.pp.pseudobulk(sdata)
    with pytest.raises(ValueError, match=message):
        dbk.pp.TileDataset(sdata)


def test_tiles_partly_outside_the_image_are_said(warnings_of_dbk):
    from _builders import make_sdata

    sdata, _ = make_sdata(1000)
    _with_tiles(sdata, [[0, 0, 100, 100], [1350, 0, 1450, 100], [-50, 900, 50, 1000]])
    dbk.pp.pseudobulk(sdata)
    dbk.pp.TileDataset(sdata)
    said = [m for m in warnings_of_dbk if "extend past image" in m]
    assert said == ["2 of the 3 tiles of 'dbk_tiles' extend past image 'he' (1000 x 1400 px): 50.0% of their pixels "
                    "lie outside it (read as white glass, with no expression), e.g. tiles [1, 2]. dbk.pp.make_tiles "
                    "lays tiles inside the image only."]  # once, though both steps read the tiles


def test_pseudobulk_with_every_gene_filtered_out_is_refused():
    import pandas as pd
    from _builders import add_cells, make_sdata
    from spatialdata.models import PointsModel
    from spatialdata.transformations import get_transformation

    sdata, _ = make_sdata(2000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    pts = sdata.points["transcripts"].compute()
    pts = pts[pts["feature_name"].astype(str).str.startswith(("BLANK_", "NegControl"))].copy()
    pts["feature_name"] = pd.Categorical(pts["feature_name"].astype(str))
    sdata.points["transcripts"] = PointsModel.parse(pts, transformations=dict(
        get_transformation(sdata.images["he"], get_all=True)))
    with pytest.raises(ValueError, match=r"every feature of the points 'transcripts' \(column 'feature_name'\) is a "
                                         r"control probe \(2 features.*keep_controls=False drops them all, so the "
                                         r"table would have 0 genes"):
        dbk.pp.pseudobulk(sdata)
    assert "dbk_table" not in sdata.tables
    dbk.pp.pseudobulk(sdata, keep_controls=True)
    assert sdata.tables["dbk_table"].n_vars == 2

    sdata, _ = make_sdata(100)
    add_cells(sdata, genes=("BLANK_0001", "NegControlProbe_00001", "BLANK_0002"))
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    with pytest.raises(ValueError, match=r"every feature of the table annotating 'cells' is a control probe \(3 "):
        dbk.pp.pseudobulk(sdata, source="cells")


def test_pseudobulk_with_every_transcript_below_min_qv_says_so(warnings_of_dbk):
    from _builders import make_sdata

    sdata, _ = make_sdata(2000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata, min_qv=100)
    assert sdata.tables["dbk_table"].layers["counts"].sum() == 0
    assert any("no transcript of 'transcripts' passing min_qv=100 (column 'qv') lies in a tile" in m
               for m in warnings_of_dbk), warnings_of_dbk


# ---- 17: paths stay in their folder; Ensembl version suffixes ------------------------------------------------------


@pytest.mark.parametrize("good", ["TENX95", "SPA145", "NCBI783", "MEND139", "ZEN36", "INT1", "LYMPH_IDC", "IDC",
                                  "CCRCC", "TENX95.v2", "a-b_c"])
def test_hest_names_that_pass(good):
    from dbk.io._hest import check_hest_id

    assert check_hest_id(good) == good


@pytest.mark.parametrize("bad", ["..", "../outside", "~", "~user", "a\x00b", "/abs", "a/b", "a\\b", ".hidden", "",
                                 "a..b", "TENX95\n", "TENX 95"])
def test_hest_names_that_are_refused_everywhere(tmp_path, bad):
    with pytest.raises(ValueError, match="Invalid HEST sample id .*a name is never a path"):
        dbk.io.read_hest(tmp_path, bad)
    with pytest.raises(ValueError, match="Invalid HEST sample id"):
        dbk.datasets.hest(bad, root=tmp_path)


def test_read_hest_does_not_read_outside_its_root(io_hest_sample):
    import shutil

    s = io_hest_sample
    beside = s.root.parent  # a complete sample beside the HEST folder, which "../../outside" reaches from wsis/
    shutil.copy(s.root / "wsis" / f"{s.sample_id}.tif", beside / "outside.tif")
    shutil.copy(s.root / "metadata" / f"{s.sample_id}.json", beside / "outside.json")
    with pytest.raises(ValueError, match=r"Invalid HEST sample id '\.\./\.\./outside'"):
        dbk.io.read_hest(s.root, "../../outside", load_transcripts=False, load_cells=False)


@pytest.mark.parametrize("path", ["../../x", "/etc/x", "~/x", "a/../../x", "a\\..\\x", "a\x00b", "", "./x", "C:/x"])
def test_registry_paths_outside_the_data_folder_are_refused(path):
    from dbk.datasets._registry import Dataset, RemoteFile

    with pytest.raises(ValueError, match="would point outside the data folder|must be a non-empty string"):
        RemoteFile(path, "https://example.org/x", None, None)
    with pytest.raises(ValueError, match="Invalid dataset name"):
        Dataset(name=path or "..", description="", source="", licence="", files=())
    assert RemoteFile("B4/counts.tsv.gz", "https://example.org/x", None, None).path == "B4/counts.tsv.gz"


def test_ensembl_ids_with_version_suffixes_match_a_mapping_without_them(dbk_log):
    import anndata as ad
    import pandas as pd

    ids = [f"ENSG{i:011d}" for i in range(1000)]
    adata = ad.AnnData(np.ones((2, 1000), np.float32), var=pd.DataFrame(index=[f"{g}.1" for g in ids]))
    mapping = {g: f"GENE{i}" for i, g in enumerate(ids)}  # keyed without version suffixes
    with dbk_log.at_level(logging.INFO, logger="dbk"):
        out = dbk.pp.map_gene_names(adata, mapping, keep_unmapped=False)
    assert list(out.var_names) == [f"GENE{i}" for i in range(1000)]  # before: "No gene ... has a new name"
    assert "1,000 Ensembl ids of the AnnData matched the mapping only without their version suffix (e.g. " \
           "'ENSG00000000000.1' as 'ENSG00000000000')" in dbk_log.text
    # a mapping keyed with other versions matches too; an id whose unversioned form maps to two symbols does not
    adata = ad.AnnData(np.ones((1, 2), np.float32), var=pd.DataFrame(index=["ENSG00000141510.1", "ENSG00000000001.3"]))
    out = dbk.pp.map_gene_names(adata, {"ENSG00000141510.16": "TP53", "ENSG00000000001.1": "X1",
                                        "ENSG00000000001.2": "X2"})
    assert list(out.var_names) == ["TP53", "ENSG00000000001.3"]


def test_benchmark_refuses_a_misspelt_key_before_any_work():
    from _builders import make_sdata

    slides = {}
    for name in ("a", "b"):
        sd, _ = make_sdata(200)
        slides[name] = sd
    with pytest.raises(KeyError, match=r"benchmark: table_key='dbk_tabel' names no table of slide 'a'"):
        dbk.tl.benchmark(slides, methods=["mean"], table_key="dbk_tabel")
    assert all("dbk_tabel" not in sd.tables for sd in slides.values())
