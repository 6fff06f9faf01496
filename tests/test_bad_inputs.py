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
    with pytest.raises(ValueError, match="target_um_per_px must be positive"):
        dbk.pp.TileDataset(sdata, target_um_per_px=0)
