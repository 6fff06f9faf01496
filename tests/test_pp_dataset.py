from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _builders import make_sdata

import dbk
from dbk.io import image_levels


@pytest.fixture
def tiled():
    rng = np.random.default_rng(0)
    sdata, _ = make_sdata(20_000)
    # random texture so crops are distinguishable
    lvl0 = rng.integers(0, 256, (3, 1000, 1400), dtype=np.uint8)
    import dask.array as da
    from spatialdata.models import Image2DModel

    sdata.images["he"] = Image2DModel.parse(da.from_array(lvl0, chunks=(3, 300, 300)), dims=("c", "y", "x"),
                                            scale_factors=[2], c_coords=["r", "g", "b"])
    dbk._image.set_pixel_size(sdata, "he", pixel_size_um=0.5, elements=["transcripts"])
    dbk.pp.make_tiles(sdata, tile_size_um=56.0, min_tissue_fraction=0.0)
    dbk.pp.pseudobulk(sdata)
    return sdata, lvl0


def test_tile_dataset_exact_crop_level0(tiled):
    sdata, lvl0 = tiled
    ds = dbk.pp.TileDataset(sdata, size_px=112)
    assert ds.level_index == 0
    b = dbk.pp.tile_bounds(sdata)
    for i in (0, 5, len(ds) - 1):
        x0, y0, x1, y1 = b[i]
        np.testing.assert_array_equal(ds[i]["image"].numpy(), lvl0[:, y0:y1, x0:x1])


def test_tile_dataset_uses_coarser_level(tiled):
    sdata, _ = tiled
    ds = dbk.pp.TileDataset(sdata, size_px=56)
    assert ds.level_index == 1  # 112 px tiles at 56 px: level 1 (2x) holds exactly that resolution
    lvl1 = np.asarray(image_levels(sdata)[1].data)
    x0, y0, x1, y1 = dbk.pp.tile_bounds(sdata)[3] // 2
    np.testing.assert_array_equal(ds[3]["image"].numpy(), lvl1[:, y0:y1, x0:x1])


def test_tile_dataset_context_window_and_padding(tiled):
    sdata, lvl0 = tiled
    ds = dbk.pp.TileDataset(sdata, size_px=224, target_pixel_size_um=0.5)  # 224 px = 112 µm around each tile centre
    img = ds[0]["image"].numpy()  # tile 0 is at the corner: the context reaches outside -> white
    assert img.shape == (3, 224, 224)
    assert (img[:, :56, :56] == 255).all()
    np.testing.assert_array_equal(img[:, 56:168, 56:168], lvl0[:, 0:112, 0:112])


def test_tile_dataset_expression_and_loader(tiled):
    import torch

    sdata, _ = tiled
    ds = dbk.pp.TileDataset(sdata, size_px=64, table_key="dbk_table", genes=["B", "A"], dtype="float32")
    item = ds[7]
    table = sdata.tables["dbk_table"]
    np.testing.assert_allclose(item["expr"].numpy(), table[7, ["B", "A"]].X.toarray().ravel(), rtol=1e-6)
    assert item["image"].dtype == torch.float32 and float(item["image"].max()) <= 1.0
    a = torch.cat([b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=16, num_workers=0)])
    b = torch.cat([b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)])
    assert torch.equal(a, b) and len(a) == len(ds)


def test_tile_dataset_augment_is_dihedral(tiled):
    sdata, _ = tiled
    plain = dbk.pp.TileDataset(sdata, size_px=112)
    aug = dbk.pp.TileDataset(sdata, size_px=112, augment=True, random_state=1)
    ref = plain[2]["image"].numpy()
    variants = [np.rot90(ref, k, axes=(1, 2)) for k in range(4)]
    variants += [v[:, :, ::-1] for v in variants]
    seen = set()
    for _ in range(12):
        out = aug[2]["image"].numpy()
        match = [j for j, v in enumerate(variants) if np.array_equal(out, v)]
        assert match, "augmented tile is not a flip/rotation of the tile"
        seen.add(match[0])
    assert len(seen) > 1


def test_tile_dataset_cache(tiled, tmp_path, monkeypatch):
    sdata, _ = tiled
    ds = dbk.pp.TileDataset(sdata, size_px=32, cache=tmp_path / "cache.zarr")
    ref = [ds[i]["image"].numpy() for i in range(len(ds))]
    import dbk.pp._dataset as mod

    monkeypatch.setattr(mod, "read_tile", lambda *a, **k: (_ for _ in ()).throw(AssertionError("slide read")))
    ds2 = dbk.pp.TileDataset(sdata, size_px=32, cache=tmp_path / "cache.zarr")
    for i in range(len(ds2)):
        np.testing.assert_array_equal(ds2[i]["image"].numpy(), ref[i])


def test_tile_dataset_errors(tiled):
    sdata, _ = tiled
    with pytest.raises(ValueError, match="size_px"):
        dbk.pp.TileDataset(sdata, size_px=0)
    with pytest.raises(KeyError, match="Genes not in table"):
        dbk.pp.TileDataset(sdata, table_key="dbk_table", genes=["nope"])
    with pytest.raises(IndexError):
        dbk.pp.TileDataset(sdata)[10_000]


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_export_tiles(tiled, tmp_path, suffix):
    sdata, lvl0 = tiled
    path = dbk.pp.export_tiles(sdata, tmp_path / f"tiles{suffix}", size_px=112)
    if suffix == ".h5":
        import h5py

        f = h5py.File(path, "r")
        images, counts, genes = f["images"][:], f["counts"][:], [g.decode() for g in f["genes"][:]]
    else:
        import zarr

        f = zarr.open_group(str(path), mode="r")
        images, counts, genes = f["images"][:], f["counts"][:], list(f["genes"][:])
    x0, y0, x1, y1 = dbk.pp.tile_bounds(sdata)[0]
    np.testing.assert_array_equal(images[0], lvl0[:, y0:y1, x0:x1].transpose(1, 2, 0))
    np.testing.assert_array_equal(counts, sdata.tables["dbk_table"].layers["counts"].toarray())
    assert genes == list(sdata.tables["dbk_table"].var_names)


def _table(genes, counts, sample):
    a = ad.AnnData(X=sp.csr_matrix(np.log1p(counts).astype(np.float32)), var=pd.DataFrame(index=genes))
    a.layers["counts"] = sp.csr_matrix(counts)
    a.obs["sample"] = sample
    a.obsm["spatial"] = np.zeros((len(counts), 2))
    return a


def test_concat_two_panels_mask():
    a = _table(["A", "B", "C"], np.array([[1, 0, 2], [3, 4, 0]]), "s1")
    b = _table(["B", "D"], np.array([[5, 6], [0, 7], [8, 0]]), "s2")
    out = dbk.pp.concat([a, b])
    assert list(out.var_names) == ["A", "B", "C", "D"]
    assert list(out.obs["sample"]) == ["s1", "s1", "s2", "s2", "s2"]
    np.testing.assert_array_equal(
        out.layers["counts"].toarray(), [[1, 0, 2, 0], [3, 4, 0, 0], [0, 5, 0, 6], [0, 0, 0, 7], [0, 8, 0, 0]]
    )
    m = dbk.pp.measured_mask(out)
    np.testing.assert_array_equal(m, [[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0, 1]])
    assert out.obs_names.is_unique
    inter = dbk.pp.concat({"x": a, "y": b}, genes="intersection")
    assert list(inter.var_names) == ["B"] and dbk.pp.measured_mask(inter).all()
    assert list(a.var_names) == ["A", "B", "C"]  # inputs untouched
    # a gene measured on one slide only is never picked as a common variable gene
    assert dbk.pp.select_genes([a, b], n_top_genes=5) == ["B"]
    with pytest.raises(ValueError, match="unique"):
        dbk.pp.concat([a, a])


def test_select_genes_variance_and_mean():
    counts = np.array([[0, 10, 5], [0, 0, 5], [0, 10, 6]])
    a = _table(["flat", "var", "high"], counts, "s")
    assert dbk.pp.select_genes(a, n_top_genes=1) == ["var"]
    assert dbk.pp.select_genes(a, n_top_genes=2, flavor="mean") == ["high", "var"]


def test_tile_dataset_tiff_workers_match(tmp_path):
    """Forked DataLoader workers read a (JPEG-tiled, pyramidal) TIFF correctly: same tiles as in-process."""
    import tifffile
    import torch

    rng = np.random.default_rng(0)
    img = (rng.integers(0, 60, (1024, 1024, 3)) + np.linspace(0, 190, 1024)[None, :, None]).astype(np.uint8)
    path = tmp_path / "slide.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(128, 128), compression="jpeg", photometric="rgb", subifds=1)
        tw.write(img[::2, ::2], tile=(128, 128), compression="jpeg", photometric="rgb", subfiletype=1)
    sdata = dbk.io.read_image(path, pixel_size_um=0.5)
    dbk.pp.make_tiles(sdata, tile_size_um=32.0, min_tissue_fraction=0.0)
    ds = dbk.pp.TileDataset(sdata, size_px=64)
    a = torch.cat([b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0)])
    b = torch.cat([b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)])
    assert len(a) == len(ds) == 256 and torch.equal(a, b)
    x0, y0, x1, y1 = dbk.pp.tile_bounds(sdata)[5]
    ref = tifffile.imread(path)[y0:y1, x0:x1].transpose(2, 0, 1)
    np.testing.assert_array_equal(a[5].numpy(), ref)
