"""pseudobulk's int32 binning of grid tiles and its sorted batches count exactly what the general path counts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from _builders import make_sdata

import dbk
from dbk.pp import _pseudobulk
from dbk.pp._binning import TileLookup
from dbk.pp._coverage import Coverage

SIZE = 112


def _grid(ox: int, oy: int, n_cols: int, n_rows: int) -> np.ndarray:
    return np.array([(ox + c * SIZE, oy + r * SIZE, ox + (c + 1) * SIZE, oy + (r + 1) * SIZE)
                     for r in range(n_rows) for c in range(n_cols)], dtype=np.int64)


def _hard_points(dtype, ox: int, oy: int, n_cols: int, n_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points on every tile edge, one step of ``dtype`` either side of it, outside the grid, huge, inf and NaN."""
    rng = np.random.default_rng(seed)
    ex = np.arange(n_cols + 1) * SIZE + ox
    ey = np.arange(n_rows + 1) * SIZE + oy
    xs = [ex, np.nextafter(ex.astype(dtype), dtype(-np.inf)), np.nextafter(ex.astype(dtype), dtype(np.inf)),
          rng.uniform(ox - 50, ex[-1] + 50, 400), [-1e-30, -0.0, 0.0, -5.0, 3e9, -3e9, 1e30, np.inf, -np.inf, np.nan]]
    ys = [ey, np.nextafter(ey.astype(dtype), dtype(-np.inf)), np.nextafter(ey.astype(dtype), dtype(np.inf)),
          rng.uniform(oy - 50, ey[-1] + 50, 400), [oy + 1.5, 2e9, np.nan]]
    x = np.concatenate([np.asarray(v, dtype=np.float64) for v in xs]).astype(dtype)
    y = np.concatenate([np.asarray(v, dtype=np.float64) for v in ys]).astype(dtype)
    xx, yy = np.meshgrid(x, y)  # every x with every y
    return xx.ravel(), yy.ravel()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("origin", [(0, 0), (224, 336)])
@pytest.mark.parametrize("with_dropped", [False, True])
def test_grid_assign_equals_tile_lookup(dtype, origin, with_dropped):
    ox, oy = origin
    every = _grid(ox, oy, 7, 5)
    rng = np.random.default_rng(1)
    out = rng.permutation(len(every))
    kept, dropped = every[np.sort(out[10:])], every[np.sort(out[:6])]  # 4 tiles in neither: holes in the grid
    x, y = _hard_points(dtype, ox, oy, 7, 5)
    lookup = TileLookup.build(kept)
    assert lookup.aligned
    grid = _pseudobulk._Grid.build(lookup, dropped if with_dropped else None)
    assert grid is not None and grid.takes(x, y)
    extent = Coverage().add(x, y, 0.0, None)
    assert np.isnan(extent).all()  # NaN points: every point is tested against the grid's edges
    t, pid, n_kept, n_dropped = grid.assign(x, y, np.arange(len(x), dtype=np.int32), extent)
    got = sorted(zip(pid.tolist(), t.tolist(), strict=True))
    # exact: half-open bounds compared in float64 (exact for float32 and float64 points and integer bounds)
    xd, yd = x.astype(np.float64), y.astype(np.float64)

    def brute(bounds):
        return sorted((int(i), j) for j, (x0, y0, x1, y1) in enumerate(bounds)
                      for i in np.flatnonzero((xd >= x0) & (xd < x1) & (yd >= y0) & (yd < y1)))

    want = brute(kept)
    assert len(want) > 1000 and got == want
    assert n_kept == len(want)
    n_in_dropped = len(brute(dropped)) if with_dropped else 0
    assert n_dropped == n_in_dropped and (n_in_dropped > 0) == with_dropped
    # the general path agrees, but for float64 points in (-size * 2**-1074, 0): its float64 division underflows to
    # -0.0, whose floor puts them in the tile at 0 (float32 points never underflow there)
    p, t_ref = lookup.assign(x, y)
    ref = sorted(zip(p.tolist(), t_ref.tolist(), strict=True))
    tiny = (xd < 0) & (xd > -1e-300) | (yd < 0) & (yd > -1e-300)
    assert [pt for pt in ref if not tiny[pt[0]]] == got
    assert (ref == got) == (dtype is np.float32 or (ox, oy) != (0, 0))


def test_grid_is_used_for_grid_tiles_only():
    assert _pseudobulk._Grid.build(TileLookup.build(_grid(0, 0, 3, 3)), None) is not None
    overlapping = np.array([(0, 0, 112, 112), (56, 0, 168, 112)])
    assert _pseudobulk._Grid.build(TileLookup.build(overlapping), None) is None
    negative = _grid(-112, 0, 3, 3)
    assert _pseudobulk._Grid.build(TileLookup.build(negative), None) is None
    grid = _pseudobulk._Grid.build(TileLookup.build(_grid(0, 0, 3, 3)), None)
    assert not grid.takes(np.zeros(3, np.int32), np.zeros(3, np.int32))  # integers: the general path
    assert not grid.takes(np.zeros(3, np.float32), np.zeros(3, np.float64))


def _table(sdata):
    dbk.pp.pseudobulk(sdata)
    return sdata.tables["dbk_table"]


def _assert_same_tables(a, b):
    assert list(a.var_names) == list(b.var_names)
    ca, cb = a.layers["counts"], b.layers["counts"]
    assert sp.isspmatrix_csr(ca) and ca.dtype == cb.dtype == np.int64
    np.testing.assert_array_equal(ca.indptr, cb.indptr)
    np.testing.assert_array_equal(ca.indices, cb.indices)
    np.testing.assert_array_equal(ca.data, cb.data)
    assert (ca.data != 0).all()  # no explicit zeros
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert a.X.dtype == b.X.dtype == np.float32
    np.testing.assert_array_equal(a.obs["n_transcripts"].to_numpy(), b.obs["n_transcripts"].to_numpy())
    assert a.uns["dbk"]["pseudobulk"] == b.uns["dbk"]["pseudobulk"]  # coverage and tissue-filter records too


@pytest.mark.parametrize("case", ["dropped", "float64", "scaled", "subset", "small batches"])
def test_pseudobulk_grid_path_equals_general_path(case, monkeypatch):
    from test_pp import brute_counts

    sdata, df = make_sdata(30_000, points_scale=0.5 if case == "scaled" else None)
    if case == "float64":
        from spatialdata.models import PointsModel
        from spatialdata.transformations import get_transformation

        pts = sdata.points["transcripts"]
        sdata.points["transcripts"] = PointsModel.parse(
            pts.assign(x=pts["x"].astype(np.float64), y=pts["y"].astype(np.float64)), feature_key="feature_name",
            transformations=dict(get_transformation(pts, get_all=True)))
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=0.5 if case != "subset" else 0.0)
    if case == "subset":  # tiles taken out by hand: a grid with holes that starts away from 0
        tiles = sdata.shapes["dbk_tiles"]
        b = dbk.pp.tile_bounds(sdata)
        keep = (b[:, 0] > 0) & (b[:, 1] > 0) & (np.arange(len(b)) % 7 > 0)
        sdata.shapes["dbk_tiles"] = tiles.iloc[np.flatnonzero(keep)]
        assert dbk.pp.tile_bounds(sdata)[:, :2].min() > 0
    if case == "small batches":  # several sorted batches per thread, of several chunks each
        monkeypatch.setattr(_pseudobulk, "_CHUNK", 1000)
        monkeypatch.setattr(_pseudobulk, "_BATCH", 2500)
        monkeypatch.setattr(_pseudobulk, "_SORT_ABOVE", 0)
    used = []
    real = _pseudobulk._Grid.assign

    def spy(self, *a, **k):
        used.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(_pseudobulk._Grid, "assign", spy)
    fast = _table(sdata)
    assert used, "the grid path was not taken"
    monkeypatch.setattr(_pseudobulk, "_FAST_GRID", False)
    used.clear()
    slow = _table(sdata)
    assert not used
    _assert_same_tables(fast, slow)
    if case == "dropped":
        assert fast.uns["dbk"]["pseudobulk"]["tissue_filter"]["n_dropped"] > 0
    expected = brute_counts(df, dbk.pp.tile_bounds(sdata), list(fast.var_names))
    np.testing.assert_array_equal(fast.layers["counts"].toarray(), expected)


def test_batches_added_after_the_table_widened():
    """Cells binned before another dictionary widened the table are re-based to the new width when added."""
    bounds = _grid(0, 0, 4, 4)
    counter = _pseudobulk._Counter(bounds, np.eye(3)[:2], None, False, 20.0, (448, 448))
    rng = np.random.default_rng(3)
    first = tuple(f"A{i}" for i in range(10))
    second = tuple(f"B{i}" for i in range(40))  # 40 new genes: the 16-wide table grows to 64
    brute = {}
    for names in (first, second, first):
        n = 5000
        x, y = rng.uniform(-20, 470, n).astype(np.float32), rng.uniform(-20, 470, n).astype(np.float32)
        qv = rng.uniform(0, 40, n).astype(np.float32)
        codes = rng.integers(-1, len(names), n).astype(np.int32)
        width = counter.counts.shape[1]
        counter.count(x, y, qv, codes, names)
        if names is second:
            assert counter.counts.shape[1] > width  # widened, while the first batch is still unsorted
        ok = (qv >= 20) & (codes >= 0) & (x >= 0) & (x < 448) & (y >= 0) & (y < 448)
        tile = (y[ok] // SIZE).astype(int) * 4 + (x[ok] // SIZE).astype(int)
        for t, c in zip(tile, codes[ok], strict=True):
            brute[(int(t), names[c])] = brute.get((int(t), names[c]), 0) + 1
    assert counter.n_counted == 0  # nothing added yet: all in the thread's batch
    counter.finish()
    names = sorted(counter.index)
    got = counter.result(names).toarray()
    want = np.zeros_like(got)
    for (t, g), v in brute.items():
        want[t, names.index(g)] = v
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("min_qv", [20.0, 20.3, -1.5, 0.0, 1e-45, 1e37, -1e37, 3.4e38, 1e39, -np.inf])
def test_quality_filter_in_float32_is_the_float64_comparison(min_qv):
    counter = _pseudobulk._Counter(_grid(0, 0, 1, 1), np.eye(3)[:2], None, False, min_qv)
    t = np.float32(min_qv) if abs(min_qv) < 3e38 else np.float32(3e38)
    near = [np.nextafter(t, np.float32(-np.inf)), t, np.nextafter(t, np.float32(np.inf))]
    qv = np.array([*near, 0, -0.0, 1e-45, 20, 40, np.inf, -np.inf, np.nan, 3.4e38], dtype=np.float32)
    np.testing.assert_array_equal(counter._qv_ok(qv), qv.astype(np.float64) >= np.float64(min_qv))
    for other in (np.float64, np.int16):
        q = np.arange(-3, 50).astype(other)
        np.testing.assert_array_equal(counter._qv_ok(q), q.astype(np.float64) >= np.float64(min_qv))


@pytest.mark.parametrize("block", [1 << 20, 7, 1])  # one block; blocks shorter than some rows; one value each
@pytest.mark.parametrize("scipy_rows", [True, False])
@pytest.mark.parametrize("target_sum", [1e4, None])
def test_x_by_blocks_equals_the_whole_matrix_at_once(block, scipy_rows, target_sum, monkeypatch):
    import anndata as ad

    rng = np.random.default_rng(4)
    dense = rng.poisson(1.0, (300, 40)).astype(np.int64)
    dense[[0, 5, 6, 299]] = 0  # empty rows, the first and the last among them
    dense[7] = rng.integers(1, 9, 40)  # a full row, longer than the small blocks
    counts = sp.csr_matrix(dense)
    monkeypatch.setattr(_pseudobulk, "_NORM_VALUES", block)
    if not scipy_rows:
        monkeypatch.setattr(_pseudobulk, "_csr_scale_rows", None)
    x = _pseudobulk._log1p_normalized(counts, target_sum)
    ref = dbk.pp.normalize(ad.AnnData(counts.astype(np.float32), layers={"counts": counts}), target_sum=target_sum,
                           copy=True).X
    assert x.dtype == np.float32 and sp.isspmatrix_csr(x)
    np.testing.assert_array_equal(x.toarray(), ref.toarray())
    data = counts.data.astype(np.float64)  # the whole matrix at once, as before the blocks
    if target_sum is not None:
        totals = dense.sum(axis=1).astype(np.float64)
        data *= np.repeat(np.divide(target_sum, totals, out=np.zeros(300), where=totals > 0), np.diff(counts.indptr))
    np.testing.assert_array_equal(x.data, np.log1p(data).astype(np.float32))
    np.testing.assert_array_equal(x.indices, counts.indices)
    np.testing.assert_array_equal(x.indptr, counts.indptr)
    assert not np.shares_memory(x.indices, counts.indices) and not np.shares_memory(x.indptr, counts.indptr)


@pytest.mark.parametrize("n_jobs", [1, 3])
def test_reading_threads_follow_settings_n_jobs(n_jobs, monkeypatch):
    import threading

    from dbk.io import _parquet

    sdata, _ = make_sdata(20_000, npartitions=6)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=0.0)
    ref = _table(sdata).layers["counts"].toarray()
    monkeypatch.setattr(dbk.settings, "_n_jobs", n_jobs)  # as dbk.settings.n_jobs = n_jobs, without touching torch
    assert _parquet.n_threads() == n_jobs
    seen = set()
    real = _pseudobulk._Counter.count

    def spy(self, *a):
        seen.add(threading.get_ident())
        return real(self, *a)

    monkeypatch.setattr(_pseudobulk._Counter, "count", spy)
    np.testing.assert_array_equal(_table(sdata).layers["counts"].toarray(), ref)
    assert 1 <= len(seen) <= n_jobs
