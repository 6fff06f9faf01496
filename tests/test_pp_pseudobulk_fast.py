"""pseudobulk from transcripts read straight from parquet (pyarrow) must equal the dask partition path, exactly."""

from __future__ import annotations

import logging

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, TableModel
from spatialdata.transformations import Identity, Scale

import dbk
from dbk.io import _parquet
from dbk.pp import _pseudobulk

TILE = 64
SIDE = 6  # tiles per side
W = TILE * SIDE
GENES = ["G0", "G1", "G2", "G3", "G4"]
CONTROLS = ["BLANK_0001", "NegControlProbe_00001"]


def _frame(n: int, seed: int, genes=GENES) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-10, W + 10, n)
    y = rng.uniform(-10, W + 10, n)
    k = n // 10  # points exactly on tile edges, and on the far border of the grid (outside every half-open tile)
    x[:k] = rng.integers(0, SIDE + 1, k) * TILE
    y[k : 2 * k] = rng.integers(0, SIDE + 1, k) * TILE
    x[2 * k : 2 * k + 3] = np.nan
    y[2 * k + 3] = np.inf
    names = [*genes, *CONTROLS]
    p = np.r_[np.full(len(genes), 0.9 / len(genes)), np.full(len(CONTROLS), 0.1 / len(CONTROLS))]
    return pd.DataFrame({
        "transcript_id": np.arange(n, dtype=np.uint64) + seed * 10**6,
        "feature_name": rng.choice(names, n, p=p),
        "he_x": x.astype(np.float32),
        "he_y": y.astype(np.float32),
        "qv": np.where(rng.random(n) < 0.02, np.nan, rng.uniform(0, 40, n)).astype(np.float32),
    })


def _write(path, frames: list[pd.DataFrame], *, use_dictionary=True) -> pd.DataFrame:
    """One row group per frame; parquet builds each row group's gene dictionary from its own values."""
    with pq.ParquetWriter(path, pa.Schema.from_pandas(frames[0], preserve_index=False),
                          use_dictionary=use_dictionary) as w:
        for f in frames:
            w.write_table(pa.Table.from_pandas(f, preserve_index=False))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture
def transcripts(tmp_path):
    """A file whose row groups have different dictionaries, one lacking G4 and one lacking G0 entirely."""
    frames = [_frame(3000, 1), _frame(2000, 2, genes=GENES[:4]), _frame(2500, 3, genes=GENES[1:]), _frame(700, 4)]
    frames[3]["feature_name"] = frames[3]["feature_name"].to_numpy()[::-1]  # another order of first appearance
    path = tmp_path / "transcripts.parquet"
    df = _write(path, frames)
    md = pq.ParquetFile(path).metadata
    assert md.num_row_groups == 4
    return path, df


def _sdata(points, *, scale: float | None = None) -> SpatialData:
    img = Image2DModel.parse(da.full((3, W, W), 200, dtype=np.uint8, chunks=(3, 128, 128)), dims=("c", "y", "x"),
                             transformations={"global": Identity()})
    tr = {"global": Identity()} if scale is None else {"global": Scale([1 / scale, 1 / scale], axes=("x", "y"))}
    if not isinstance(points, dd.DataFrame) or "transform" not in points.attrs:
        points = PointsModel.parse(points, transformations=tr, sort=True)
    sdata = SpatialData(images={"he": img}, points={"transcripts": points})
    dbk.io.set_pixel_size(sdata, "he", pixel_size_um=0.5, elements=["transcripts"])
    dbk.pp.make_tiles(sdata, tile_size_um=None, tile_size_px=TILE, min_tissue_fraction=0.0)
    return sdata


def _read(path, **kw) -> dd.DataFrame:
    ddf = dd.read_parquet(path, columns=["he_x", "he_y", "feature_name", "qv"], **kw)
    return ddf.rename(columns={"he_x": "x", "he_y": "y"})


def _brute(df: pd.DataFrame, bounds, genes, min_qv=20.0) -> np.ndarray:
    x, y = df["he_x"].to_numpy(np.float64), df["he_y"].to_numpy(np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if min_qv is not None:
        ok &= df["qv"].to_numpy(np.float64) >= min_qv  # the threshold is exact: compared in float64
    g = df["feature_name"].to_numpy()
    out = np.zeros((len(bounds), len(genes)), np.int64)
    for t, (x0, y0, x1, y1) in enumerate(bounds):
        inside = ok & (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
        for j, gene in enumerate(genes):
            out[t, j] = int((inside & (g == gene)).sum())
    return out


def _both(sdata, monkeypatch, **kw):
    """(direct-parquet table, dask table) for the same call."""
    out = []
    for reader in ("auto", "dask"):
        dbk.pp.pseudobulk(sdata, reader=reader, **kw)
        out.append(sdata.tables["dbk_table"])
    return out


def _assert_same(a, b):
    assert list(a.var_names) == list(b.var_names)
    np.testing.assert_array_equal(a.layers["counts"].toarray(), b.layers["counts"].toarray())
    assert a.layers["counts"].dtype == np.int64
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(a.obs["n_transcripts"].to_numpy(), b.obs["n_transcripts"].to_numpy())


@pytest.mark.parametrize("kw", [
    {},
    {"min_qv": None},
    {"keep_controls": True},
    {"min_qv": 30.0, "keep_controls": True},
    {"genes": ["G4", "G0", "NOPE", "BLANK_0001"]},
])
@pytest.mark.parametrize("split", [True, False])
def test_direct_parquet_equals_dask_and_brute_force(transcripts, monkeypatch, kw, split):
    path, df = transcripts
    sdata = _sdata(_read(path, split_row_groups=split))
    fast, slow = _both(sdata, monkeypatch, **kw)
    assert fast.uns["dbk"]["pseudobulk"]["reader"] == "parquet"
    assert slow.uns["dbk"]["pseudobulk"]["reader"] == "dask"
    _assert_same(fast, slow)
    if "genes" in kw:
        assert list(fast.var_names) == kw["genes"]
    else:
        want = GENES + (CONTROLS if kw.get("keep_controls") else [])
        assert list(fast.var_names) == sorted(want)
    expected = _brute(df, dbk.pp.tile_bounds(sdata), list(fast.var_names), kw.get("min_qv", 20.0))
    np.testing.assert_array_equal(fast.layers["counts"].toarray(), expected)


def test_quality_threshold_is_exact(tmp_path, monkeypatch):
    """qv >= min_qv in exact arithmetic: a float32 qv just below a threshold that float32 cannot hold is dropped."""
    f = _frame(3000, 11)
    q = np.float32(20.3)  # 20.2999992...
    assert float(q) < 20.3 and q >= np.float32(20.3)
    f.loc[:999, "qv"] = q
    f.loc[1000:1499, "qv"] = np.nextafter(q, np.float32(99))  # 20.3000011...: kept
    path = tmp_path / "q.parquet"
    _write(path, [f])
    sdata = _sdata(_read(path))
    fast, slow = _both(sdata, monkeypatch, min_qv=20.3)
    _assert_same(fast, slow)
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(f, dbk.pp.tile_bounds(sdata), list(fast.var_names), 20.3))


def test_integer_coordinates_and_nulls(tmp_path, monkeypatch):
    """Integer pixel coordinates (nullable: a null becomes NaN, as in pandas) and null genes / qualities."""
    f = _frame(3000, 12)
    table = pa.Table.from_pandas(f.assign(he_x=np.floor(f["he_x"].fillna(-1)).astype(np.int32),
                                          he_y=np.floor(f["he_y"].replace(np.inf, -1)).astype(np.int64)),
                                 preserve_index=False)
    mask = np.zeros(len(f), bool)
    mask[100:110] = True
    cols = {n: table.column(n) for n in table.column_names}
    cols["he_x"] = pa.array(np.where(mask, 0, table.column("he_x").to_numpy()), mask=mask, type=pa.int32())
    cols["feature_name"] = pa.array(np.where(np.roll(mask, 20), None, f["feature_name"].to_numpy()), pa.string())
    cols["qv"] = pa.array(f["qv"].to_numpy(), mask=np.roll(mask, 40) | f["qv"].isna().to_numpy())
    path = tmp_path / "int.parquet"
    pq.write_table(pa.table(cols), path, row_group_size=1000)
    sdata = _sdata(_read(path))
    fast, slow = _both(sdata, monkeypatch, min_qv=None)
    assert fast.uns["dbk"]["pseudobulk"]["reader"] == "parquet"
    _assert_same(fast, slow)
    back = pd.read_parquet(path)
    back["feature_name"] = back["feature_name"].fillna("<null>")
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(back, dbk.pp.tile_bounds(sdata), list(fast.var_names), None))
    fast, slow = _both(sdata, monkeypatch)
    _assert_same(fast, slow)


def test_direct_parquet_warns_nonfinite_like_dask(transcripts, monkeypatch, caplog):
    path, _ = transcripts
    sdata = _sdata(_read(path))
    logger = logging.getLogger("dbk")
    logger.addHandler(caplog.handler)
    try:
        for reader in ("auto", "dask"):
            caplog.clear()
            dbk.pp.pseudobulk(sdata, reader=reader)
            assert "16 transcripts of 'transcripts' have NaN/infinite coordinates" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)


def test_direct_parquet_multi_file_and_plain_encoding(tmp_path, monkeypatch):
    folder = tmp_path / "points.parquet"
    folder.mkdir()
    a = _write(folder / "part.0.parquet", [_frame(1500, 5), _frame(800, 6, genes=GENES[2:])])
    b = _write(folder / "part.1.parquet", [_frame(1200, 7)], use_dictionary=False)  # no parquet dictionary at all
    df = pd.concat([a, b], ignore_index=True)
    sdata = _sdata(_read(folder))
    fast, slow = _both(sdata, monkeypatch)
    assert fast.uns["dbk"]["pseudobulk"]["reader"] == "parquet"
    _assert_same(fast, slow)
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(df, dbk.pp.tile_bounds(sdata), list(fast.var_names)))


def test_direct_parquet_applies_the_points_transformation(tmp_path, monkeypatch):
    """Points stored in µm with a scale to the image's pixels: still read directly, mapped exactly as by dask."""
    frames = [_frame(2000, 8), _frame(1000, 9)]
    px = pd.concat(frames, ignore_index=True)
    for f in frames:
        f["he_x"] = f["he_x"].astype(np.float64) * 0.5
        f["he_y"] = f["he_y"].astype(np.float64) * 0.5
    path = tmp_path / "um.parquet"
    _write(path, frames)
    sdata = _sdata(_read(path), scale=0.5)
    fast, slow = _both(sdata, monkeypatch)
    assert fast.uns["dbk"]["pseudobulk"]["reader"] == "parquet"
    _assert_same(fast, slow)
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(px, dbk.pp.tile_bounds(sdata), list(fast.var_names)))


def test_reader_dask_is_the_general_path(transcripts):
    path, _ = transcripts
    sdata = _sdata(_read(path))
    dbk.pp.pseudobulk(sdata, reader="dask")
    assert sdata.tables["dbk_table"].uns["dbk"]["pseudobulk"]["reader"] == "dask"
    with pytest.raises(ValueError, match="reader must be 'auto' or 'dask'"):
        dbk.pp.pseudobulk(sdata, reader="arrow")


def test_computed_or_filtered_points_fall_back_to_dask(transcripts, monkeypatch):
    path, df = transcripts
    expected = None
    cases = {
        "computed column": lambda: _read(path).assign(x=lambda d: d["x"] + 0.0),
        "parquet filters": lambda: _read(path, filters=[("qv", ">=", 0.0)]),
        "map_partitions": lambda: _read(path).map_partitions(lambda d: d),
        "in memory": lambda: dd.from_pandas(_read(path).compute(), npartitions=3),
        "row subset": lambda: _read(path, split_row_groups=True).partitions[:2],
    }
    for name, make in cases.items():
        sdata = _sdata(make())
        dbk.pp.pseudobulk(sdata)
        table = sdata.tables["dbk_table"]
        assert table.uns["dbk"]["pseudobulk"]["reader"] == "dask", name
        if name == "row subset":
            continue
        if name == "parquet filters":  # NaN quality is filtered out by the parquet filter (not counted either way)
            pass
        if expected is None:
            expected = _brute(df, dbk.pp.tile_bounds(sdata), list(table.var_names))
        np.testing.assert_array_equal(table.layers["counts"].toarray(), expected, err_msg=name)


def test_casts_traced_categorical_restricts_genes(transcripts, monkeypatch):
    path, df = transcripts
    ddf = _read(path)
    ddf["feature_name"] = ddf["feature_name"].astype(pd.CategoricalDtype(["G1", "G3", "BLANK_0001"]))
    ddf["x"] = ddf["x"].astype(np.float64)
    sdata = _sdata(ddf)
    fast, slow = _both(sdata, monkeypatch, keep_controls=True)
    assert fast.uns["dbk"]["pseudobulk"]["reader"] == "parquet"
    _assert_same(fast, slow)
    assert list(fast.var_names) == ["BLANK_0001", "G1", "G3"]
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(df, dbk.pp.tile_bounds(sdata), list(fast.var_names)))


def test_hest_reader_points_read_directly(transcripts, monkeypatch):
    from dbk.io._hest import read_transcripts_parquet

    path, df = transcripts
    sdata = _sdata(read_transcripts_parquet(path))
    fast, slow = _both(sdata, monkeypatch)
    assert fast.uns["dbk"]["pseudobulk"]["reader"] == "parquet"
    _assert_same(fast, slow)
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(df, dbk.pp.tile_bounds(sdata), list(fast.var_names)))


def test_spatialdata_zarr_points_read_directly(transcripts, tmp_path, monkeypatch):
    from spatialdata import read_zarr

    path, df = transcripts
    sdata = _sdata(_read(path))
    sdata.write(tmp_path / "s.zarr")
    back = read_zarr(tmp_path / "s.zarr")
    fast, slow = _both(back, monkeypatch)
    assert fast.uns["dbk"]["pseudobulk"]["reader"] == "parquet"
    _assert_same(fast, slow)
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(df, dbk.pp.tile_bounds(back), list(fast.var_names)))


def test_huge_row_groups_are_streamed_in_batches(transcripts, monkeypatch):
    path, df = transcripts
    sdata = _sdata(_read(path))
    monkeypatch.setattr(_parquet, "_BIG_ROW_GROUP", 1000)
    monkeypatch.setattr(_parquet, "_BATCH_ROWS", 333)
    monkeypatch.setattr(_pseudobulk, "_CHUNK", 100)
    fast, slow = _both(sdata, monkeypatch)
    _assert_same(fast, slow)
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(df, dbk.pp.tile_bounds(sdata), list(fast.var_names)))


def test_overlapping_tiles_count_in_each(transcripts, monkeypatch):
    path, df = transcripts
    sdata = _sdata(_read(path))
    dbk.pp.make_tiles(sdata, tile_size_um=None, tile_size_px=TILE, stride_um=TILE // 4, min_tissue_fraction=0.0)
    fast, slow = _both(sdata, monkeypatch)
    _assert_same(fast, slow)
    np.testing.assert_array_equal(fast.layers["counts"].toarray(),
                                  _brute(df, dbk.pp.tile_bounds(sdata), list(fast.var_names)))


def test_x_matches_normalize(transcripts):
    path, _ = transcripts
    sdata = _sdata(_read(path))
    for target_sum in (1e4, None):
        dbk.pp.pseudobulk(sdata, target_sum=target_sum)
        table = sdata.tables["dbk_table"]
        ref = dbk.pp.normalize(table, target_sum=target_sum, copy=True)
        assert table.X.dtype == ref.X.dtype == np.float32
        np.testing.assert_array_equal(table.X.toarray(), ref.X.toarray())


def test_sample_name_from_the_reader(transcripts):
    path, _ = transcripts
    sdata = _sdata(_read(path))
    dbk.pp.pseudobulk(sdata)
    assert list(sdata.tables["dbk_table"].obs["sample"].unique()) == ["sample"]
    sdata.attrs["hest_metadata"] = {"id": "TENX99"}
    dbk.pp.pseudobulk(sdata)
    assert list(sdata.tables["dbk_table"].obs["sample"].unique()) == ["TENX99"]
    # a reader's table (read_hest / read_st write obs["sample"]) names the sample
    import anndata as ad

    spots = ad.AnnData(np.zeros((3, 2), np.float32), obs=pd.DataFrame({"sample": pd.Categorical(["S1"] * 3)},
                                                                       index=["a", "b", "c"]))
    sdata.tables["table"] = TableModel.parse(spots)
    dbk.pp.pseudobulk(sdata)
    assert list(sdata.tables["dbk_table"].obs["sample"].unique()) == ["S1"]
    dbk.pp.pseudobulk(sdata, key_added="again")  # the earlier dbk table names the same sample: still S1
    assert list(sdata.tables["again"].obs["sample"].unique()) == ["S1"]
    sdata.attrs["sample"] = "from_attrs"
    dbk.pp.pseudobulk(sdata)
    assert list(sdata.tables["dbk_table"].obs["sample"].unique()) == ["from_attrs"]
    dbk.pp.pseudobulk(sdata, sample="given")
    assert list(sdata.tables["dbk_table"].obs["sample"].unique()) == ["given"]


def test_both_readers_count_the_transcripts_in_tiles_the_tissue_filter_dropped(transcripts, monkeypatch):
    """The dropped tiles' transcripts are counted in pseudobulk's own pass, the same by both readers, exactly."""
    from spatialdata.models import Labels2DModel

    path, df = transcripts
    sdata = _sdata(_read(path))
    mask = np.zeros((W, W), np.uint8)
    mask[:, : 3 * TILE + TILE // 3] = 1  # columns 0-2 of tiles are tissue; column 3 a third, 4 and 5 none
    sdata.labels["my_tissue"] = Labels2DModel.parse(mask, dims=("y", "x"), transformations={"global": Identity()})
    dbk.pp.make_tiles(sdata, tile_size_um=None, tile_size_px=TILE, tissue_key="my_tissue")
    assert len(sdata.shapes["dbk_tiles"]) == 3 * SIDE
    fast, slow = _both(sdata, monkeypatch)
    assert fast.uns["dbk"]["pseudobulk"]["reader"] == "parquet"
    rec = fast.uns["dbk"]["pseudobulk"]["tissue_filter"]
    assert rec == slow.uns["dbk"]["pseudobulk"]["tissue_filter"]
    x, y = df["he_x"].to_numpy(np.float64), df["he_y"].to_numpy(np.float64)
    ok = (df["qv"].to_numpy(np.float64) >= 20) & df["feature_name"].isin(GENES).to_numpy()  # NaN qv, NaN x fail
    in_grid = ok & (x >= 0) & (x < W) & (y >= 0) & (y < W)
    in_kept = in_grid & (x < 3 * TILE)
    assert rec["n_tiles_dropped"] == 3 * SIDE
    assert rec["n_in_grid"] == in_grid.sum() and rec["n_dropped"] == (in_grid & ~in_kept).sum()
    assert int(fast.layers["counts"].sum()) == in_kept.sum()
