from __future__ import annotations

import numpy as np
import pytest
from _builders import add_cells, make_sdata

import dbk
from dbk.pp._binning import TileLookup


def brute_counts(df, bounds, genes, min_qv=20.0):
    ok = df["qv"].to_numpy() >= min_qv if min_qv is not None else np.ones(len(df), bool)
    out = np.zeros((len(bounds), len(genes)), dtype=np.int64)
    x, y, g = df["x"].to_numpy(), df["y"].to_numpy(), df["feature_name"].astype(str).to_numpy()
    for t, (x0, y0, x1, y1) in enumerate(bounds):
        inside = ok & (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        for j, gene in enumerate(genes):
            out[t, j] = int((inside & (g == gene)).sum())
    return out


def test_tissue_mask_finds_rectangle():
    sdata, _ = make_sdata(1000)
    dbk.pp.tissue_mask(sdata)
    mask = np.asarray(sdata.labels["dbk_tissue"].data)
    # the tissue rectangle is rows 100:900, cols 150:1250 of a 1000 x 1400 image
    assert abs(mask.mean() - (800 * 1100) / (1000 * 1400)) < 0.01
    assert mask[500, 700] == 1 and mask[10, 10] == 0


def test_make_tiles_grid_sizes_and_tissue_filter():
    sdata, _ = make_sdata(1000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)  # 112 px at 0.5 µm/px
    tiles = sdata.shapes["dbk_tiles"]
    b = dbk.pp.tile_bounds(sdata)
    assert (b[:, 2] - b[:, 0] == 112).all() and (b[:, 3] - b[:, 1] == 112).all()
    assert (b[:, 0] % 112 == 0).all() and (b[:, 1] % 112 == 0).all()
    assert (tiles["tissue_fraction"] >= 0.5).all()
    # every kept tile centre lies in (or within half a tile of) the tissue rectangle
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    assert ((cx > 150 - 56) & (cx < 1250 + 56) & (cy > 100 - 56) & (cy < 900 + 56)).all()
    # tiles fully on glass are excluded: the full grid has 8 x 12 = 96 tiles
    assert 50 < len(tiles) < 96
    # polygons match the bounds
    assert np.allclose(tiles.geometry.bounds.to_numpy(), b)


def test_make_tiles_px_and_errors():
    sdata, _ = make_sdata(1000)
    dbk.pp.make_tiles(sdata, tile_size_um=None, tile_size_px=100, min_tissue_fraction=0.0)
    assert len(sdata.shapes["dbk_tiles"]) == (1000 // 100) * (1400 // 100)
    with pytest.raises(ValueError, match="tile_size_um must be a positive"):
        dbk.pp.make_tiles(sdata, tile_size_um=-3)
    with pytest.raises(ValueError, match="do not fit"):
        dbk.pp.make_tiles(sdata, tile_size_um=10_000)
    with pytest.raises(KeyError, match="No image 'nope'"):
        dbk.pp.make_tiles(sdata, image_key="nope")
    with pytest.raises(ValueError, match="mode must be"):
        dbk.pp.make_tiles(sdata, mode="hexagons")


def test_make_tiles_dense_stride_overlaps():
    sdata, _ = make_sdata(1000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, stride_um=28.0, min_tissue_fraction=0.0, key_added="dense")
    b = dbk.pp.tile_bounds(sdata, "dense")
    assert len(b) == ((1000 - 112) // 56 + 1) * ((1400 - 112) // 56 + 1)


def test_pseudobulk_transcripts_exact_and_edges():
    sdata, df = make_sdata(200_000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    adata = sdata.tables["dbk_table"]
    assert list(adata.var_names) == ["A", "B", "C", "D"]  # control probes excluded by default
    b = dbk.pp.tile_bounds(sdata)
    expected = brute_counts(df, b, list(adata.var_names))
    got = adata.layers["counts"].toarray()
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(adata.obs["n_transcripts"].to_numpy(), expected.sum(1))
    # X is log1p of counts per 10k
    row = got[0] / got[0].sum() * 1e4
    np.testing.assert_allclose(adata.X[0].toarray().ravel(), np.log1p(row), rtol=1e-5)
    # table annotates the tiles
    attrs = adata.uns["spatialdata_attrs"]
    assert attrs["region"] == "dbk_tiles" and attrs["instance_key"] == "instance_id"
    np.testing.assert_allclose(adata.obsm["spatial"], np.c_[(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2])


def test_pseudobulk_edge_points_counted_once():
    sdata, df = make_sdata(50_000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=0.0)  # full grid, no gaps
    dbk.pp.pseudobulk(sdata, min_qv=None, keep_controls=True)
    b = dbk.pp.tile_bounds(sdata)
    inside_grid = (df.x < b[:, 2].max()) & (df.y < b[:, 3].max())
    assert int(sdata.tables["dbk_table"].layers["counts"].sum()) == int(inside_grid.sum())
    assert "BLANK_0001" in sdata.tables["dbk_table"].var_names


def test_pseudobulk_points_in_other_coordinate_system():
    # the same transcripts given in µm in the "um" system must give the same table as in pixels
    s_px, _ = make_sdata(30_000, seed=3)
    s_um, _ = make_sdata(30_000, seed=3, points_scale=0.5)
    for s in (s_px, s_um):
        dbk.pp.make_tiles(s, tile_size_um=56.0)
        dbk.pp.pseudobulk(s)
    np.testing.assert_array_equal(
        s_px.tables["dbk_table"].layers["counts"].toarray(), s_um.tables["dbk_table"].layers["counts"].toarray()
    )


def test_empty_tile_table_has_the_rows_of_pseudobulk():
    from dbk.pp._tile_table import empty_tile_table

    sdata, _ = make_sdata(1000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    full = sdata.tables["dbk_table"]
    empty = empty_tile_table(sdata, table_key="empty")
    assert empty is sdata.tables["empty"] and empty.shape == (full.n_obs, 0) and empty.X.dtype == np.float32
    assert list(empty.obs.columns) == ["region", "instance_id"]
    assert list(empty.obs_names) == list(full.obs_names)
    np.testing.assert_array_equal(empty.obs["instance_id"], full.obs["instance_id"])
    np.testing.assert_array_equal(empty.obsm["spatial"], full.obsm["spatial"])
    assert empty.uns["spatialdata_attrs"]["region"] == "dbk_tiles"


def test_pseudobulk_genes_order_and_copy():
    sdata, df = make_sdata(20_000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    before = set(sdata.tables)
    out = dbk.pp.pseudobulk(sdata, genes=["D", "A", "ZZZ"], copy=True)
    assert set(sdata.tables) == before  # input untouched
    adata = out.tables["dbk_table"]
    assert list(adata.var_names) == ["D", "A", "ZZZ"]
    assert adata.layers["counts"][:, 2].sum() == 0
    expected = brute_counts(df, dbk.pp.tile_bounds(out), ["D", "A"])
    np.testing.assert_array_equal(adata.layers["counts"][:, :2].toarray(), expected)


def test_pseudobulk_from_cells_by_centroid():
    sdata, _ = make_sdata(1000)
    cells = add_cells(sdata)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata, source="cells")
    adata = sdata.tables["dbk_table"]
    b = dbk.pp.tile_bounds(sdata)
    X = sdata.tables["table"].X.toarray()
    for t in range(0, len(b), 7):
        x0, y0, x1, y1 = b[t]
        inside = ((cells.x >= x0) & (cells.x < x1) & (cells.y >= y0) & (cells.y < y1)).to_numpy()
        np.testing.assert_array_equal(adata.layers["counts"][t].toarray().ravel(), X[inside].sum(0))
        assert adata.obs["n_cells"].iloc[t] == inside.sum()


def test_pseudobulk_errors():
    sdata, _ = make_sdata(1000)
    with pytest.raises(KeyError, match="run dbk.pp.make_tiles first"):
        dbk.pp.pseudobulk(sdata)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    with pytest.raises(KeyError, match="No points 'nope'"):
        dbk.pp.pseudobulk(sdata, points_key="nope")
    with pytest.raises(ValueError, match="source must be"):
        dbk.pp.pseudobulk(sdata, source="voxels")
    with pytest.raises(ValueError, match="spot_id"):
        dbk.pp.pseudobulk(sdata, source="spots")


def test_tile_lookup_matches_brute_force_with_overlap():
    rng = np.random.default_rng(0)
    bounds = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 5, 10, 15], [5, 5, 15, 15], [30, 30, 40, 40]])
    x, y = rng.uniform(-5, 45, 20_000), rng.uniform(-5, 45, 20_000)
    x[:4], y[:4] = [10, 5, 15, 40], [10, 5, 0, 39.999]
    p, t = TileLookup.build(bounds).assign(x, y)
    got = set(zip(p.tolist(), t.tolist(), strict=True))
    want = {(i, j) for j, (x0, y0, x1, y1) in enumerate(bounds)
            for i in np.nonzero((x >= x0) & (x < x1) & (y >= y0) & (y < y1))[0].tolist()}
    assert got == want


def test_normalize():
    import anndata as ad

    a = ad.AnnData(np.array([[1, 3, 0], [0, 0, 0]], dtype=float))
    dbk.pp.normalize(a, target_sum=4)
    np.testing.assert_allclose(a.X, np.log1p([[1, 3, 0], [0, 0, 0]]), rtol=1e-6)
    with pytest.raises(ValueError, match="negative"):
        dbk.pp.normalize(ad.AnnData(np.array([[-1.0, 2.0]])))


def test_bad_inputs_give_clear_errors(caplog):
    import pandas as pd
    from spatialdata.transformations import Identity, set_transformation

    # no pixel size: a µm tile size cannot be converted
    sdata, _ = make_sdata(1000)
    from spatialdata.transformations import get_transformation

    image = sdata.images["he"]
    for name in list(image.children):
        image[name]["image"].attrs["transform"] = {"global": Identity()}
    with pytest.raises(ValueError, match="has no pixel size .*set_pixel_size"):
        dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    assert "um" not in get_transformation(sdata.images["he"], get_all=True)

    # transcripts in a coordinate system the image is not in
    sdata, _ = make_sdata(1000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    set_transformation(sdata.points["transcripts"], {"aligned": Identity()}, set_all=True)
    with pytest.raises(ValueError, match="share no coordinate system"):
        dbk.pp.pseudobulk(sdata)

    # empty tissue (a blank slide)
    sdata, _ = make_sdata(1000)
    import dask.array as da
    from spatialdata.models import Image2DModel

    sdata.images["he"] = Image2DModel.parse(da.full((3, 1000, 1400), 245, dtype="uint8"), dims=("c", "y", "x"))
    dbk._image.set_pixel_size(sdata, "he", pixel_size_um=0.5)
    with pytest.raises(ValueError, match="No tile of 112 px has tissue fraction"):
        dbk.pp.make_tiles(sdata, tile_size_um=56.0)

    # negative / NaN counts in a cell table
    sdata, _ = make_sdata(1000)
    add_cells(sdata)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    sdata.tables["table"].X = sdata.tables["table"].X.astype(float)
    sdata.tables["table"].X[0, 0] = -1
    with pytest.raises(ValueError, match="Negative counts"):
        dbk.pp.pseudobulk(sdata, source="cells")
    sdata.tables["table"].X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite counts"):
        dbk.pp.pseudobulk(sdata, source="cells")

    # NaN transcript coordinates: not counted, and said so
    sdata, _ = make_sdata(5000)
    pts = sdata.points["transcripts"].compute()
    pts.loc[pts.index[:7], "x"] = np.nan
    from spatialdata.models import PointsModel

    sdata.points["transcripts"] = PointsModel.parse(pts, transformations=dict(
        get_transformation(sdata.images["he"], get_all=True)))
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=0.0)
    import logging

    logger = logging.getLogger("dbk")
    logger.addHandler(caplog.handler)
    try:
        dbk.pp.pseudobulk(sdata, min_qv=None, keep_controls=True)
    finally:
        logger.removeHandler(caplog.handler)
    assert "7 transcripts of 'transcripts' have NaN" in caplog.text
    b = dbk.pp.tile_bounds(sdata)
    ok = pts["x"].notna() & (pts.x < b[:, 2].max()) & (pts.y < b[:, 3].max())
    assert int(sdata.tables["dbk_table"].layers["counts"].sum()) == int(ok.sum())
    assert isinstance(pts, pd.DataFrame)


def test_pseudobulk_int32_flush_keeps_counts_exact(monkeypatch):
    """The int32 table is flushed into int64 before it could wrap: force a flush every few thousand counts."""
    from dbk.pp import _pseudobulk

    sdata, df = make_sdata(60_000, npartitions=6)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    monkeypatch.setattr(_pseudobulk._Counter, "_FLUSH_AT", 12_000)
    dbk.pp.pseudobulk(sdata)
    adata = sdata.tables["dbk_table"]
    expected = brute_counts(df, dbk.pp.tile_bounds(sdata), list(adata.var_names))
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), expected)


# ---- what the tissue filter drops: make_tiles reads no points, pseudobulk counts them in its own pass ----------------


def _counted_points(sdata, df, npartitions=5):
    """Replace the transcripts by the same rows read through a function that records each partition it serves."""
    import uuid

    import dask.dataframe as dd
    from spatialdata.models import PointsModel
    from spatialdata.transformations import get_transformation

    reads: list[int] = []
    step = -(-len(df) // npartitions)

    def part(i, _nonce):
        reads.append(i)
        return df.iloc[i * step : (i + 1) * step]

    # a fresh argument: dask would otherwise reuse an earlier call's graph (same data, same function name)
    ddf = dd.from_map(part, range(npartitions), args=[uuid.uuid4().hex], meta=df.iloc[:0])
    tr = dict(get_transformation(sdata.points["transcripts"], get_all=True))
    sdata.points["transcripts"] = PointsModel.parse(ddf, feature_key="feature_name", transformations=tr, sort=True)
    reads.clear()
    return reads


@pytest.mark.parametrize("min_tissue_fraction", [0.0, 0.5])
def test_make_tiles_reads_no_points(min_tissue_fraction):
    sdata, df = make_sdata(20_000)
    reads = _counted_points(sdata, df)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=min_tissue_fraction)
    assert reads == []  # not one partition of the transcripts read, whether tiles were dropped or not
    filt = sdata.shapes["dbk_tiles"].attrs["dbk"]["tissue_filter"]
    assert filt["n_tiles_in_grid"] == 8 * 12
    assert filt["n_tiles_dropped"] == 8 * 12 - len(sdata.shapes["dbk_tiles"])
    if min_tissue_fraction == 0.0:  # nothing dropped: nothing lost, said without reading anything
        assert filt["n_tiles_dropped"] == 0 and filt["n_dropped"] == 0 and filt["fraction_dropped"] == 0.0
        dbk.pp.pseudobulk(sdata)
        assert "tissue_filter" not in sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]
    else:
        assert filt["n_tiles_dropped"] > 0 and "n_dropped" not in filt  # counted by pseudobulk, not sampled here
        dbk.pp.pseudobulk(sdata)
        assert "tissue_filter" in sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]
    assert sorted(reads) == list(range(5))  # pseudobulk read each partition once, the report included


def _in_tiles(x, y, bounds):
    inside = np.zeros(len(x), bool)
    for x0, y0, x1, y1 in bounds:
        inside |= (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    return inside


@pytest.mark.parametrize("stride_um", [None, 28.0, 84.0])  # tiles side by side, overlapping, with gaps
def test_pseudobulk_reports_the_transcripts_in_dropped_tiles_exactly(stride_um, dbk_log):
    import logging

    dbk_log.set_level(logging.INFO, logger="dbk")
    sdata, df = make_sdata(30_000)  # transcripts only (no cells, no spots), points on tile edges included
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, stride_um=stride_um)
    meta = sdata.shapes["dbk_tiles"].attrs["dbk"]
    stride, (n_rows, n_cols) = meta["grid"]["stride_px"], (meta["grid"]["n_rows"], meta["grid"]["n_cols"])
    assert stride == (112 if stride_um is None else int(stride_um * 2))
    dbk_log.clear()
    dbk.pp.pseudobulk(sdata)  # min_qv=20, control probes left out: the report counts the transcripts the table counts
    rec = sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]["tissue_filter"]
    x, y = df["x"].to_numpy(np.float64), df["y"].to_numpy(np.float64)
    ok = (df["qv"].to_numpy() >= 20) & df["feature_name"].isin(["A", "B", "C", "D"]).to_numpy()
    grid = np.array([(c * stride, r * stride, c * stride + 112, r * stride + 112)
                     for r in range(n_rows) for c in range(n_cols)])
    in_grid = ok & _in_tiles(x, y, grid)
    kept = ok & _in_tiles(x, y, dbk.pp.tile_bounds(sdata))
    n_grid, n_dropped = int(in_grid.sum()), int((in_grid & ~kept).sum())
    assert 0 < n_dropped < n_grid
    assert rec["n_in_grid"] == n_grid and rec["n_dropped"] == n_dropped
    assert rec["fraction_dropped"] == pytest.approx(n_dropped / n_grid)
    assert rec["n_tiles_dropped"] == n_rows * n_cols - len(sdata.shapes["dbk_tiles"])
    assert rec["min_tissue_fraction"] == 0.5
    assert rec["objects"] == "transcripts of 'transcripts' passing the quality filter"
    (msg,) = [r.getMessage() for r in dbk_log.records if "tissue fraction <" in r.getMessage()]
    assert (f"pseudobulk: dropping the tiles with tissue fraction < 0.5 drops {n_dropped / n_grid:.1%} of the "
            f"transcripts of 'transcripts' passing the quality filter in the grid ({n_dropped:,} of {n_grid:,}), "
            "which were not counted") in msg


def test_pseudobulk_dropped_tile_report_warns_and_skips_changed_tiles(dbk_log):
    import logging

    dbk_log.set_level(logging.INFO, logger="dbk")
    sdata, _ = make_sdata(20_000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=0.99)  # drops the tiles on the tissue's edges
    dbk_log.clear()
    dbk.pp.pseudobulk(sdata)
    rec = sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]["tissue_filter"]
    assert rec["fraction_dropped"] > 0.25
    (msg,) = [r.getMessage() for r in dbk_log.records if r.levelno == logging.WARNING and "tissue fraction <" in
              r.getMessage()]
    assert f"drops {rec['fraction_dropped']:.1%} of the" in msg and "The tissue mask may miss tissue" in msg
    # tiles removed by hand after make_tiles: their transcripts are not blamed on the tissue filter
    tiles = sdata.shapes["dbk_tiles"]
    sdata.shapes["dbk_tiles"] = tiles.iloc[: len(tiles) // 2]
    assert sdata.shapes["dbk_tiles"].attrs["dbk"]["tissue_filter"]["n_tiles_dropped"] > 0
    dbk_log.clear()
    dbk.pp.pseudobulk(sdata)
    assert "tissue_filter" not in sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]
    assert any("are not the" in r.getMessage() and "not counted" in r.getMessage() for r in dbk_log.records)
