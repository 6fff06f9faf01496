from __future__ import annotations

import pytest
from _builders import make_sdata
from spatialdata import read_zarr

import dbk


def test_write_zarr_roundtrip_and_atomic(tmp_path, monkeypatch):
    sdata, _ = make_sdata(2000)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    path = dbk.io.write_zarr(sdata, tmp_path / "x.zarr")
    back = read_zarr(path)
    assert dbk.io.get_pixel_size(back) == pytest.approx(0.5)
    assert (back.tables["dbk_table"].layers["counts"] != sdata.tables["dbk_table"].layers["counts"]).nnz == 0
    with pytest.raises(FileExistsError):
        dbk.io.write_zarr(sdata, path, overwrite=False)

    # an interrupted write leaves the previous store intact and no temporary folder behind
    other, _ = make_sdata(100)

    def broken_write(self, target, *a, **k):
        (target / "partial").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(other), "write", broken_write)
    with pytest.raises(KeyboardInterrupt):
        dbk.io.write_zarr(other, path, overwrite=True)
    monkeypatch.undo()
    again = read_zarr(path)
    assert again.tables["dbk_table"].n_obs == sdata.tables["dbk_table"].n_obs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr"]
