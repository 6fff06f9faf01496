"""Real data as users bring it: no silent wrong answers.

Counts off the image or outside every tile, Ensembl gene ids, HEST-derived folders (JPEG/PNG slides, metadata
without a pixel size, spot centres in obs columns, in either axis order), one slide split into train and test
blocks, and the pixel size the tile table records. Every test builds its own small data.
"""

from __future__ import annotations

import json
import logging

import anndata as ad
import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from spatialdata.models import PointsModel
from spatialdata.transformations import get_transformation

import dbk

# ---- helpers ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def log(dbk_log):
    dbk_log.set_level(logging.INFO, logger="dbk")
    return dbk_log


@pytest.fixture(autouse=True)
def _fresh_ensembl_warnings():
    """Ensembl ids are warned about once per set and session: each test starts afresh."""
    from dbk import _genes

    warned = getattr(_genes, "_WARNED", set())
    warned.clear()
    yield
    warned.clear()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dbk" and r.levelno >= logging.WARNING]


def _slide(shape=(512, 1024)):
    """A synthetic slide (h x w px at 0.5 µm/px) with its tiles."""
    sdata = dbk.datasets.synthetic(shape=shape, random_state=0)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    return sdata


def _swap_xy(sdata, key="transcripts"):
    pts = sdata.points[key]
    df = pts.compute()
    df["x"], df["y"] = df["y"].to_numpy(), df["x"].to_numpy()
    sdata.points[key] = PointsModel.parse(dd.from_pandas(df, npartitions=2), feature_key="feature_name",
                                          transformations=dict(get_transformation(pts, get_all=True)))


# ---- 1. counts off the image or outside every tile -------------------------------------------------------------------


def test_pseudobulk_warns_when_swapped_xy_puts_counts_off_the_image(log):
    sdata = _slide()  # 1024 px wide, 512 high: with x and y swapped, half of the slide's extent is off the image
    _swap_xy(sdata)
    log.clear()
    dbk.pp.pseudobulk(sdata)
    rec = sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]
    assert rec["fraction_in_image"] < 0.5 and rec["fraction_in_tiles"] < rec["fraction_in_image"]
    assert rec["n_counts_source"] > 10_000
    (msg,) = [m for m in _warnings(log) if "off image" in m]
    assert f"{1 - rec['fraction_in_image']:.1%} of the {rec['n_counts_source']:,} transcripts" in msg
    assert "lie off image 'he'" in msg and "were not counted" in msg
    assert "the image is 1,024 px wide (x) and 512 px high (y)" in msg
    assert "their extent fits the image with x and y swapped" in msg
    assert "x and y swapped, a wrong pixel size" in msg and "another coordinate system" in msg


def test_pseudobulk_on_a_correct_slide_records_fractions_and_warns_nothing(log):
    sdata = _slide()
    log.clear()
    dbk.pp.pseudobulk(sdata)
    dbk.pp.pseudobulk(sdata, source="cells", key_added="from_cells")
    assert _warnings(log) == []
    for key in ("dbk_table", "from_cells"):
        rec = sdata.tables[key].uns["dbk"]["pseudobulk"]
        assert rec["fraction_in_image"] == pytest.approx(1.0)
        assert 0.8 < rec["fraction_in_tiles"] <= 1.0
    # the fraction in tiles is the share of the counts the table holds
    t = sdata.tables["from_cells"]
    rec = t.uns["dbk"]["pseudobulk"]
    assert t.layers["counts"].sum() == pytest.approx(rec["fraction_in_tiles"] * rec["n_counts_source"], abs=0.5)
    assert any("lie on image 'he' and" in r.getMessage() and "inside a tile" in r.getMessage() for r in log.records)


def test_pseudobulk_warns_when_most_counts_on_the_image_miss_the_tiles(log):
    sdata = _slide((512, 512))
    tiles = sdata.shapes["dbk_tiles"]
    sdata.shapes["dbk_tiles"] = tiles.iloc[:2]  # two tiles left of the tissue's many
    log.clear()
    dbk.pp.pseudobulk(sdata, source="cells")
    rec = sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]
    (msg,) = [m for m in _warnings(log) if "outside every one of the 2 tiles" in m]
    assert f"{1 - rec['fraction_in_tiles']:.1%} of the" in msg and "counts of the cells of 'cells'" in msg
    assert "min_tissue_fraction" in msg


def test_pseudobulk_from_spots_records_fractions(io_hest_sample, log):
    s = io_hest_sample
    sdata = dbk.io.read_hest(s.root, s.sample_id, load_transcripts=False, load_cells=False)
    dbk.pp.make_tiles(sdata, mode="spots", tile_size_um=50.0)  # 100 px: the spot at (50, 600) is kept, all are
    dbk.pp.pseudobulk(sdata, source="spots")
    rec = sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]
    assert rec["n_counts_source"] == s.counts.sum()
    assert rec["fraction_in_image"] == 1.0 and rec["fraction_in_tiles"] == 1.0


def test_make_tiles_reports_what_the_tissue_filter_drops(log):
    sdata = _slide((512, 512))
    meta = sdata.shapes["dbk_tiles"].attrs["dbk"]["tissue_filter"]
    assert meta["objects"] == "cell centroids" and meta["min_tissue_fraction"] == 0.5
    assert 0 <= meta["fraction_dropped"] < 0.25 and meta["n_in_grid"] > 100
    log.clear()
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=0.99)
    meta = sdata.shapes["dbk_tiles"].attrs["dbk"]["tissue_filter"]
    assert meta["fraction_dropped"] > 0.25
    (msg,) = [m for m in _warnings(log) if "make_tiles" in m]
    assert (f"dropping the tiles with tissue fraction < 0.99 drops {meta['fraction_dropped']:.1%} of the cell "
            f"centroids in the grid ({meta['n_dropped']:,} of {meta['n_in_grid']:,}). The tissue mask") in msg
    assert "The tissue mask may miss tissue" in msg


def test_pseudobulk_measures_the_loss_on_all_the_transcripts():
    from _builders import make_sdata

    sdata, df = make_sdata(20_000)  # no cells, no spots: transcripts, uniform over a 1000 x 1400 image
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)  # reads no transcripts: pseudobulk counts those it dropped
    dbk.pp.pseudobulk(sdata, min_qv=None, keep_controls=True)  # every transcript counts
    meta = sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]["tissue_filter"]
    assert meta["objects"] == "transcripts of 'transcripts'"
    b = dbk.pp.tile_bounds(sdata)
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    in_grid = (x < 1400 // 112 * 112) & (y < 1000 // 112 * 112)
    kept = np.zeros(len(x), bool)
    for x0, y0, x1, y1 in b:
        kept |= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    assert meta["n_in_grid"] == in_grid.sum() and meta["n_dropped"] == in_grid.sum() - kept.sum()
    assert meta["fraction_dropped"] == pytest.approx(1 - kept.sum() / in_grid.sum())


# ---- 2. gene identifiers ---------------------------------------------------------------------------------------------


def test_ensembl_ids_are_recognised():
    from dbk._genes import ensembl_like

    names = ["ENSG00000141736", "ENSMUSG00000020122.5", "ENSDARG00000012345", "ENSRNOG00000001234.12", "ERBB2",
             "ENSG123", "ENSG00000141736_1", "ensg00000141736", "CD3E"]
    assert ensembl_like(names) == names[:4]


def _ensembl_cells(sdata):
    """Rename the cell table's genes to Ensembl ids; return the id -> symbol mapping."""
    t = sdata.tables["table"]
    ids = [f"ENSG{i:011d}" for i in range(t.n_vars)]
    mapping = dict(zip(ids, t.var_names, strict=True))
    t.var["symbol"] = list(t.var_names)
    t.var_names = ids
    return mapping


def test_pseudobulk_warns_once_on_ensembl_ids_and_map_gene_names_fixes_them(log):
    sdata = _slide((512, 512))
    symbols = list(sdata.tables["table"].var_names)
    mapping = _ensembl_cells(sdata)
    log.clear()
    dbk.pp.pseudobulk(sdata, source="cells")
    (msg,) = [m for m in _warnings(log) if "Ensembl" in m]
    dbk.pp.pseudobulk(sdata, source="cells")  # the same ids again: not warned twice
    assert len([m for m in _warnings(log) if "Ensembl" in m]) == 1
    assert "names its genes by Ensembl id (60 of 60, e.g. ['ENSG00000000000', 'ENSG00000000001'" in msg
    assert "dbk matches genes by symbol" in msg and "dbk.pp.map_gene_names" in msg and "gene_symbols=" in msg
    before = sdata.tables["dbk_table"].layers["counts"].toarray()

    dbk.pp.map_gene_names(sdata, mapping)  # the readers' table "table"
    assert list(sdata.tables["table"].var_names) == symbols
    assert sdata.tables["table"].var["original_name"].iloc[0] == "ENSG00000000000"
    log.clear()
    dbk.pp.pseudobulk(sdata, source="cells")
    assert not [m for m in _warnings(log) if "Ensembl" in m]
    np.testing.assert_array_equal(sdata.tables["dbk_table"].layers["counts"].toarray(), before)


def test_map_gene_names_sums_genes_of_one_symbol_and_counts_the_unmapped(log):
    X = sp.csr_matrix(np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64))
    a = ad.AnnData(X=X, var=pd.DataFrame({"sym": ["A", "A", "B", None]},
                                         index=["ENSG00000000001", "ENSG00000000002", "ENSG00000000003",
                                                "ENSG00000000004"]))
    a.layers["counts"] = X.copy()
    out = dbk.pp.map_gene_names(a, "sym")
    assert list(out.var_names) == ["A", "B", "ENSG00000000004"]
    np.testing.assert_array_equal(out.X.toarray(), [[3, 3, 4], [11, 7, 8]])
    np.testing.assert_array_equal(out.layers["counts"].toarray(), [[3, 3, 4], [11, 7, 8]])
    assert list(out.var["original_name"]) == ["ENSG00000000001;ENSG00000000002", "ENSG00000000003",
                                              "ENSG00000000004"]
    msg = [m for m in _warnings(log) if "no new name" in m][-1]
    assert "1 of the 4 genes of the AnnData have no new name in var['sym'] (e.g. ['ENSG00000000004']); kept" in msg
    out = dbk.pp.map_gene_names(a, {"ENSG00000000001": "A", "ENSG00000000003": "B"}, keep_unmapped=False)
    assert list(out.var_names) == ["A", "B"]
    np.testing.assert_array_equal(out.X.toarray(), [[1, 3], [5, 7]])
    assert "3 of the 4" not in " ".join(_warnings(log)) and "dropped (keep_unmapped=False)" in _warnings(log)[-1]
    # normalised values cannot be summed; a dbk tile table's log1p X is merged exactly
    b = a.copy()
    b.X = sp.csr_matrix(np.log1p(X.toarray().astype(np.float32)))
    with pytest.raises(ValueError, match="non-integer values"):
        dbk.pp.map_gene_names(b, "sym")
    b.uns["dbk"] = {"pseudobulk": {}}
    out = dbk.pp.map_gene_names(b, "sym")
    np.testing.assert_allclose(out.X.toarray(), np.log1p([[3, 3, 4], [11, 7, 8]]), rtol=1e-6)


def test_map_gene_names_errors():
    a = ad.AnnData(X=np.ones((2, 2), np.int64), var=pd.DataFrame(index=["x", "y"]))
    with pytest.raises(KeyError, match="No var column 'nope'"):
        dbk.pp.map_gene_names(a, "nope")
    with pytest.raises(ValueError, match="nothing would be left"):
        dbk.pp.map_gene_names(a, {"z": "Z"}, keep_unmapped=False)
    with pytest.raises(TypeError, match="SpatialData or an AnnData"):
        dbk.pp.map_gene_names([1], {})


# ---- 3. HEST-derived folders -----------------------------------------------------------------------------------------


def _tissue_rgb(h, w, tissue):
    """White glass with pink tissue where ``tissue`` (an (h, w) bool array) is True."""
    img = np.full((h, w, 3), 242, np.uint8)
    img[tissue] = (200, 110, 180)
    return img


def _hest_folder(root, sid, img, xy, *, suffix=".jpg", meta=None, obs_cols=None, genes=("ERBB2", "KRT5", "CD3E"),
                 var=None):
    """wsis/{sid}{suffix}, metadata/{sid}.json and st/{sid}.h5ad with spots at ``xy`` (obsm or ``obs_cols``)."""
    for sub in ("wsis", "metadata", "st"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / "wsis" / f"{sid}{suffix}", quality=95)
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta if meta is not None else
                                                              {"pixel_size_um_estimated": 1.0}))
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(3, (len(xy), len(genes))).astype(np.int64))
    obs = pd.DataFrame(index=[f"s{i}" for i in range(len(xy))])
    a = ad.AnnData(X=X, obs=obs, var=var if var is not None else pd.DataFrame(index=list(genes)))
    if obs_cols is None:
        a.obsm["spatial"] = np.asarray(xy, np.float64)
    else:
        a.obs[obs_cols[0]], a.obs[obs_cols[1]] = np.asarray(xy)[:, 0], np.asarray(xy)[:, 1]
        a.obs["array_row"] = 0
    a.write_h5ad(root / "st" / f"{sid}.h5ad")
    return a


def _grid_xy(x0, x1, y0, y1, n=6):
    gx, gy = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    return np.column_stack([gx.ravel(), gy.ravel()])


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_read_hest_reads_a_jpeg_or_png_slide(tmp_path, suffix):
    h, w = 300, 400
    img = _tissue_rgb(h, w, np.ones((h, w), bool))
    _hest_folder(tmp_path, "J1", img, _grid_xy(20, 380, 20, 280), suffix=suffix)
    sdata = dbk.io.read_hest(tmp_path, "J1")
    level0 = dbk.io.image_levels(sdata)[0].data
    assert level0.shape == (3, h, w) and level0.dtype == np.uint8
    assert isinstance(level0.data, da.Array)
    back = np.moveaxis(level0.values, 0, -1)
    if suffix == ".png":
        np.testing.assert_array_equal(back, img)
    else:
        assert np.abs(back.astype(int) - img).max() < 12  # JPEG
    assert dbk.io.get_pixel_size(sdata) == 1.0 and len(sdata.shapes["spots"]) == 36


def test_read_hest_warns_about_memory_for_a_huge_plain_image(tmp_path, monkeypatch, log):
    from dbk.io import _image

    monkeypatch.setattr(_image, "LARGE_PLAIN_IMAGE_PX", 1000)
    _hest_folder(tmp_path, "J2", _tissue_rgb(100, 120, np.ones((100, 120), bool)), _grid_xy(10, 110, 10, 90))
    dbk.io.read_hest(tmp_path, "J2")
    (msg,) = [m for m in _warnings(log) if "decoding it takes" in m]
    assert "J2.jpg is a 120 x 100 px JPEG image: decoding it takes about 0.0 GB of memory" in msg
    assert "pyramidal TIFF" in msg


def test_read_hest_pixel_size_argument_when_the_metadata_has_none(tmp_path, log):
    _hest_folder(tmp_path, "P1", _tissue_rgb(200, 200, np.ones((200, 200), bool)), _grid_xy(10, 190, 10, 190),
                 meta={"st_technology": "Visium", "pixel_size_um_estimated": None})
    meta_path = tmp_path / "metadata" / "P1.json"
    with pytest.raises(ValueError) as err:
        dbk.io.read_hest(tmp_path, "P1")
    msg = str(err.value)
    assert str(meta_path) in msg and "'pixel_size_um_estimated', 'pixel_size_um_embedded'" in msg
    assert "Pass read_hest(..., pixel_size_um=)" in msg and "P1.jpg" in msg
    sdata = dbk.io.read_hest(tmp_path, "P1", pixel_size_um=0.8)
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(0.8)
    # no metadata at all: the given pixel size is enough
    meta_path.unlink()
    sdata = dbk.io.read_hest(tmp_path, "P1", pixel_size_um=0.8)
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(0.8)
    with pytest.raises(FileNotFoundError, match="or pass read_hest"):
        dbk.io.read_hest(tmp_path, "P1")
    # given and in the metadata, and far apart: the given one wins, with a warning
    meta_path.write_text(json.dumps({"pixel_size_um_estimated": 0.25}))
    log.clear()
    sdata = dbk.io.read_hest(tmp_path, "P1", pixel_size_um=0.8)
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(0.8)
    assert any("differs from pixel_size_um_estimated=0.25" in m for m in _warnings(log))


def test_read_hest_missing_slide_names_the_suffixes_tried(tmp_path):
    (tmp_path / "wsis").mkdir()
    with pytest.raises(FileNotFoundError, match=r"wsis/Q1\.tif \(nor Q1 with suffix .tiff, .*\.jpg, \.jpeg, \.png\)"):
        dbk.io.read_hest(tmp_path, "Q1")


def test_read_hest_spot_centres_from_obs_columns(tmp_path, log):
    h, w = 300, 600
    xy = _grid_xy(50, 550, 30, 270)
    _hest_folder(tmp_path, "O1", _tissue_rgb(h, w, np.ones((h, w), bool)), xy,
                 obs_cols=("pxl_col_in_fullres", "pxl_row_in_fullres"))
    log.clear()
    sdata = dbk.io.read_hest(tmp_path, "O1")
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], xy)
    np.testing.assert_allclose(np.c_[sdata.shapes["spots"].geometry.x, sdata.shapes["spots"].geometry.y], xy)
    assert _warnings(log) == []


def test_read_hest_swapped_obs_columns_on_a_wide_image_are_swapped_back(tmp_path, log):
    h, w = 300, 600
    xy = _grid_xy(50, 550, 30, 270)
    _hest_folder(tmp_path, "O2", _tissue_rgb(h, w, np.ones((h, w), bool)), xy[:, ::-1],  # SpaGCN: x_pixel = row
                 obs_cols=("x_pixel", "y_pixel"))
    log.clear()
    sdata = dbk.io.read_hest(tmp_path, "O2")
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], xy)
    (msg,) = _warnings(log)
    assert "O2.h5ad: reading the spot centres in obs columns ['x_pixel', 'y_pixel'] as (y, x), not (x, y):" in msg
    assert "100% of the spots lie on the image with the columns swapped, 50% as given" in msg
    assert "the image is 600 px wide (x) and 300 px high (y)" in msg


def test_read_hest_swapped_obs_columns_on_a_square_image_are_told_by_the_tissue(tmp_path, log):
    n = 400
    yy, xx = np.mgrid[0:n, 0:n]
    tissue = (xx > 250) & (yy < 150)  # a band at the top right
    xy = _grid_xy(260, 390, 10, 140)  # spots over it
    _hest_folder(tmp_path, "O3", _tissue_rgb(n, n, tissue), xy[:, ::-1], obs_cols=("x_pixel", "y_pixel"))
    log.clear()
    sdata = dbk.io.read_hest(tmp_path, "O3")
    np.testing.assert_allclose(sdata.tables["table"].obsm["spatial"], xy)
    (msg,) = _warnings(log)
    assert "100% of the spots lie over tissue with the columns swapped, 0% as given (both orders fit the image" in msg
    # given in the right order: read as given, without a warning
    _hest_folder(tmp_path, "O4", _tissue_rgb(n, n, tissue), xy, obs_cols=("x_pixel", "y_pixel"))
    log.clear()
    np.testing.assert_allclose(dbk.io.read_hest(tmp_path, "O4").tables["table"].obsm["spatial"], xy)
    assert _warnings(log) == []


def test_read_hest_spot_centres_fitting_neither_order_raise(tmp_path):
    xy = _grid_xy(50, 2000, 30, 1500)  # µm, or another image's pixels: off a 300 x 600 image either way
    _hest_folder(tmp_path, "O5", _tissue_rgb(300, 600, np.ones((300, 600), bool)), xy,
                 obs_cols=("imagecol", "imagerow"))
    with pytest.raises(ValueError) as err:
        dbk.io.read_hest(tmp_path, "O5")
    msg = str(err.value)
    assert str(tmp_path / "st" / "O5.h5ad") in msg and "obs columns ['imagecol', 'imagerow']" in msg
    assert "do not fit the H&E image in either axis order" in msg
    assert "the image is 600 px wide (x) and 300 px high (y); the values span 50 to 2,000 (first)" in msg


def test_read_hest_without_any_spot_centres_names_the_columns_looked_for(tmp_path):
    a = _hest_folder(tmp_path, "O6", _tissue_rgb(100, 100, np.ones((100, 100), bool)), _grid_xy(10, 90, 10, 90),
                     obs_cols=("a", "b"))
    assert "array_row" in a.obs
    with pytest.raises(ValueError, match=r"no obsm\['spatial'\] and none of the obs column pairs .*"
                                         r"pxl_col_in_fullres.*array_row.*array indices, not pixels"):
        dbk.io.read_hest(tmp_path, "O6")


def test_read_hest_ensembl_genes_warn_and_gene_symbols_maps_them(tmp_path, log):
    ids = ["ENSG00000141736", "ENSG00000186081", "ENSG00000198851"]
    var = pd.DataFrame({"gene_symbols": ["ERBB2", "KRT5", "CD3E"]}, index=ids)
    _hest_folder(tmp_path, "E1", _tissue_rgb(100, 100, np.ones((100, 100), bool)), _grid_xy(10, 90, 10, 90),
                 genes=ids, var=var)
    log.clear()
    sdata = dbk.io.read_hest(tmp_path, "E1")
    (msg,) = _warnings(log)
    assert "E1.h5ad names its genes by Ensembl id (3 of 3, e.g. ['ENSG00000141736'" in msg
    assert "gene_symbols=<the var column of the symbols>) (its var columns: ['gene_symbols'])" in msg
    assert list(sdata.tables["table"].var_names) == ids
    log.clear()
    sdata = dbk.io.read_hest(tmp_path, "E1", gene_symbols="gene_symbols")
    assert list(sdata.tables["table"].var_names) == ["ERBB2", "KRT5", "CD3E"] and _warnings(log) == []
    np.testing.assert_array_equal(sdata.tables["table"].layers["counts"].toarray(),
                                  sdata.tables["table"].X.toarray())


def test_read_st_gene_symbols_maps_ensembl_columns(tmp_path, log):
    rng = np.random.default_rng(0)
    keys = [f"{x}x{y}" for x in range(2, 8) for y in range(2, 8)]
    ids = ["ENSG00000141736", "ENSG00000186081"]
    counts = pd.DataFrame(rng.poisson(2, (len(keys), 2)), index=keys, columns=ids)
    spots = pd.DataFrame({"x": [int(k.split("x")[0]) for k in keys], "y": [int(k.split("x")[1]) for k in keys]})
    spots["pixel_x"], spots["pixel_y"] = spots["x"] * 100.0, spots["y"] * 100.0
    Image.fromarray(_tissue_rgb(900, 900, np.ones((900, 900), bool))).save(tmp_path / "he.jpg")
    log.clear()
    sdata = dbk.io.read_st(counts, spots, tmp_path / "he.jpg", pixel_size_um=0.5)
    assert any("names its genes by Ensembl id (2 of 2" in m for m in _warnings(log))
    sdata = dbk.io.read_st(counts, spots, tmp_path / "he.jpg", pixel_size_um=0.5,
                           gene_symbols={"ENSG00000141736": "ERBB2", "ENSG00000186081": "KRT5"})
    assert list(sdata.tables["table"].var_names) == ["ERBB2", "KRT5"]
    with pytest.raises(TypeError, match="no gene annotation columns"):
        dbk.io.read_st(counts, spots, tmp_path / "he.jpg", pixel_size_um=0.5, gene_symbols="symbol")


# ---- 5. one slide, train and test ------------------------------------------------------------------------------------


def _grid_table(ny=20, nx=30, side=100.0, um_per_px=0.5):
    gy, gx = np.mgrid[0:ny, 0:nx]
    xy = np.column_stack([gx.ravel() * side + side / 2, gy.ravel() * side + side / 2])
    a = ad.AnnData(X=np.zeros((len(xy), 1), np.float32), obs=pd.DataFrame({"sample": "s1"},
                                                                         index=[str(i) for i in range(len(xy))]))
    a.obsm["spatial"] = xy
    a.uns["dbk"] = {"um_per_px": um_per_px}
    return a


def test_spatial_blocks_whole_blocks_buffer_and_fraction():
    a = _grid_table()
    dbk.pp.spatial_blocks(a, n_blocks=(4, 5), test_fraction=0.25, buffer_um=50.0, random_state=0)
    split, block = a.obs["dbk_split"], a.obs["dbk_split_block"].to_numpy()
    assert list(split.cat.categories) == ["train", "test", "buffer"]
    xy = a.obsm["spatial"]
    # blocks are rectangles of the grid: 30 x 20 tiles in 5 x 4 blocks of 6 x 5 tiles
    for b in np.unique(block):
        sel = block == b
        assert sel.sum() == 30
        assert np.ptp(xy[sel, 0]) == 500 and np.ptp(xy[sel, 1]) == 400
        # a test block is test whole; a train block is train but for its buffer
        labels = set(split[sel])
        assert labels in ({"test"}, {"train"}, {"train", "buffer"}, {"buffer"})
    test = (split == "test").to_numpy()
    train = (split == "train").to_numpy()
    assert abs(test.mean() - 0.25) <= 30 / 600 / 2 + 1e-9  # whole blocks of 30 tiles: within half a block
    # buffer 50 µm = 100 px = one tile: no train tile shares an edge with a test tile
    d = np.sqrt(((xy[train][:, None] - xy[test][None]) ** 2).sum(-1)).min(axis=1)
    assert d.min() > 100
    assert (split == "buffer").sum() > 0
    assert a.uns["dbk"]["spatial_blocks"]["fraction_test"] == pytest.approx(test.mean())


def test_spatial_blocks_is_deterministic_and_follows_the_seed():
    runs = []
    for seed in (0, 0, 1):
        a = _grid_table()
        dbk.pp.spatial_blocks(a, n_blocks=16, test_fraction=0.2, random_state=seed)
        runs.append(a.obs["dbk_split"].to_numpy())
    assert (runs[0] == runs[1]).all() and not (runs[0] == runs[2]).all()
    old = dbk.settings.seed
    try:
        dbk.settings.seed = 0
        a = _grid_table()
        dbk.pp.spatial_blocks(a, n_blocks=16, test_fraction=0.2)
        assert (a.obs["dbk_split"].to_numpy() == runs[0]).all()
    finally:
        dbk.settings.seed = old


def test_spatial_blocks_on_a_slide_and_how_to_use_the_column():
    sdata = _slide((512, 512))
    dbk.pp.pseudobulk(sdata, source="cells")
    out = dbk.pp.spatial_blocks(sdata, n_blocks=4, test_fraction=0.3, buffer_um=56.0, random_state=0, copy=True)
    assert "dbk_split" not in sdata.tables["dbk_table"].obs
    table = out.tables["dbk_table"]
    train = table[table.obs["dbk_split"] == "train"]
    test = table[table.obs["dbk_split"] == "test"]
    assert train.n_obs > 0 and test.n_obs > 0
    d = np.sqrt(((train.obsm["spatial"][:, None] - test.obsm["spatial"][None]) ** 2).sum(-1))
    assert d.min() > 56.0 / 0.5  # beyond the buffer, in px


def test_spatial_blocks_errors():
    a = _grid_table()
    with pytest.raises(ValueError, match="test_fraction must be in"):
        dbk.pp.spatial_blocks(a, test_fraction=1.0)
    with pytest.raises(ValueError, match="n_blocks must be"):
        dbk.pp.spatial_blocks(a, n_blocks=1)
    del a.uns["dbk"]
    with pytest.raises(ValueError, match="buffer_um needs the pixel size"):
        dbk.pp.spatial_blocks(a, buffer_um=10.0)
    one = _grid_table(1, 1)
    with pytest.raises(ValueError, match="at least two blocks need tiles"):
        dbk.pp.spatial_blocks(one)


# ---- 6. the tile table records µm per pixel --------------------------------------------------------------------------


def test_pseudobulk_records_um_per_px_so_spatial_context_works_directly():
    sdata = _slide((512, 512))
    dbk.pp.pseudobulk(sdata, source="cells")
    t = sdata.tables["dbk_table"]
    assert t.uns["dbk"]["um_per_px"] == pytest.approx(0.5)
    t.obsm["X_feat"] = np.arange(t.n_obs, dtype=np.float32)[:, None]
    dbk.tl.spatial_context(t, use_rep="X_feat")  # no um_per_px to pass
    assert t.obsm["X_feat_ctx"].shape == (t.n_obs, 2)
