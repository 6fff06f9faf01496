"""LazySlide's WSIData into dbk and back: tiles read through its reader, predictions as its table, one figure.

A small synthetic slide is written as a pyramidal TIFF, opened with ``wsidata.open_wsi`` and tiled by LazySlide
(``zs.pp.find_tissues``, ``zs.pp.tile_tissues``) exactly as a LazySlide user does. The tiles dbk reads through the
WSIData's reader must be LazySlide's own tile pixels, and a model's predictions on the WSIData must equal its
predictions on the same slide read by dbk from the synthetic SpatialData with the same tile boxes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

wsidata = pytest.importorskip("wsidata", reason="the 'lazyslide' extra (wsidata, lazyslide) is not installed")
zs = pytest.importorskip("lazyslide", reason="the 'lazyslide' extra (wsidata, lazyslide) is not installed")

import dbk  # noqa: E402

PX_UM = 0.5
TILE_UM = 56.0  # the tiny model's tiles: 112 px at 0.5 µm/px
TILE_PX = int(TILE_UM / PX_UM)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """The synthetic SpatialData and its H&E written as a pyramidal TIFF with its pixel size."""
    from dbk.datasets._hest_local import pyramid_levels, write_pyramid_tiff

    sd = dbk.datasets.synthetic(shape=(1024, 1024), pixel_size_um=PX_UM, n_genes=12, random_state=3)
    key = next(iter(sd.images))
    img = sd.images[key]
    arr = img["scale0"]["image"].values if hasattr(img, "children") else img.values
    level0 = np.ascontiguousarray(np.moveaxis(np.asarray(arr), 0, -1))
    path = tmp_path_factory.mktemp("lazyslide") / "slide.tif"
    write_pyramid_tiff(path, pyramid_levels(level0, 256), pixel_size_um=PX_UM, software="dbk test")
    return sd, key, path


def _open(path, tile_px=TILE_PX, key_added="tiles"):
    wsi = wsidata.open_wsi(path, store=None)
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, tile_px, mpp=PX_UM, key_added=key_added)
    return wsi


@pytest.fixture(scope="module")
def model(slide):
    from dbk._utils import copy_sdata

    sd, _, _ = slide
    return dbk.tl.fit_diffbulk(copy_sdata(sd), preset="tiny", pretrain_steps=3, fusion="ridge", head_cv=0,
                               tile_size_um=TILE_UM, random_state=0)


def _tiles_on_sdata(sd, image_key, view, path):
    """``sd`` with the TIFF's pyramid (its own levels, as OpenSlide sees them) as its H&E and the WSIData's tile boxes
    (from its dbk view) as ``"ls_tiles"``: the same pixels, tiles and transcripts, read by dbk without the WSIData's
    reader."""
    import dask.array as da
    import tifffile

    from dbk._utils import copy_sdata

    out = copy_sdata(sd)
    with tifffile.TiffFile(path) as tif:
        levels = [np.moveaxis(level.asarray(), -1, 0) for level in tif.series[0].levels]
    assert len(levels) == 3  # 1024, 512, 256 px: the pages OpenSlide reads as the slide's levels
    out.images[image_key] = dbk.io.image_element([da.from_array(level, chunks=(3, 512, 512)) for level in levels])
    dbk.io.set_pixel_size(out, image_key, pixel_size_um=PX_UM)
    tiles = view.shapes["dbk_tiles"].copy()
    tiles.attrs = {**view.shapes["dbk_tiles"].attrs, "dbk": {**view.shapes["dbk_tiles"].attrs["dbk"],
                                                              "image_key": image_key}}
    out.shapes["ls_tiles"] = tiles
    return out


def test_tiles_read_through_the_reader_are_lazyslides_pixels(slide):
    _, _, path = slide
    wsi = _open(path)
    view = dbk.pp.from_wsidata(wsi)
    assert dbk.io.get_pixel_size(view) == pytest.approx(PX_UM)
    gdf = wsi["tiles"]
    assert list(view.shapes["dbk_tiles"].index) == list(gdf["tile_id"])
    ds = dbk.pp.TileDataset(view, size_px=TILE_PX)
    assert ds._direct is not None  # tiles are asked of the WSIData's reader, not of a dask graph
    theirs = wsi.ds.tile_images(tile_key="tiles")
    for i in (0, len(gdf) // 2, len(gdf) - 1):
        np.testing.assert_array_equal(ds.read(i), np.asarray(theirs[i]["image"]))
    assert set(wsi.tables) == set()  # the WSIData gained nothing
    assert view.attrs["sample"] == "slide"


def test_dbk_keeps_no_wsidata_reader_alive(slide):
    """dbk's direct tile reads hold a WSIData's reader weakly: once the WSIData and dbk's view of it are gone, the
    reader (and its open slide file) is freed, and dbk's registry forgets it."""
    import gc
    import weakref

    from dbk.io._tiff import _DIRECT

    _, _, path = slide
    wsi = _open(path)
    view = dbk.pp.from_wsidata(wsi)
    ds = dbk.pp.TileDataset(view, size_px=TILE_PX)
    assert ds._direct is not None
    ds.read(0)
    reader = weakref.ref(wsi.reader)
    names = [n for n, (ref, _) in _DIRECT.items() if ref() is wsi.reader]
    assert names  # registered while the slide is used
    del wsi, view, ds
    gc.collect()
    assert reader() is None
    assert not [n for n in names if n in _DIRECT and _DIRECT[n][0]() is not None]


def test_predict_on_wsidata_equals_predict_on_the_same_tiles(slide, model):
    sd, image_key, path = slide
    wsi = _open(path)
    df = model.predict(wsi)
    table = wsi.tables["dbk_pred_tiles"]
    # LazySlide's form: one row per tile, annotating the tiles by tile_id (as zs.tl.feature_extraction writes)
    assert table.uns["spatialdata_attrs"] == {"region": "tiles", "region_key": "library_id", "instance_key": "tile_id"}
    np.testing.assert_array_equal(table.obs["tile_id"].to_numpy(), wsi["tiles"]["tile_id"].to_numpy())
    assert list(table.var_names) == list(model.genes)
    assert table.uns["dbk"]["written_by"] == "dbk"
    assert table.uns["dbk"]["predict"]["features"][model.fm_key]["source"] == "dbk"
    np.testing.assert_allclose(table.X, df.to_numpy(), rtol=0, atol=0)
    # the same boxes read by dbk from the synthetic SpatialData's own image: the same predictions
    from dbk.pp._tile_table import empty_tile_table

    ref = _tiles_on_sdata(sd, image_key, dbk.pp.from_wsidata(wsi), path)
    empty_tile_table(ref, "ls_tiles", "ls_table")
    expected = model.predict(ref, tiles_key="ls_tiles", table_key="ls_table")
    assert df.shape == expected.shape == (len(wsi["tiles"]), len(model.genes))
    np.testing.assert_allclose(df.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-5)
    assert np.ptp(df.to_numpy(), axis=0).min() > 0  # not a constant answer


def test_wrong_tile_size_is_refused_with_the_call_that_fixes_it(slide, model):
    _, _, path = slide
    wsi = _open(path, tile_px=2 * TILE_PX)
    with pytest.raises(ValueError, match=r"are 112\.0 µm .* trained on 56 µm tiles.*"
                                         r"zs\.pp\.tile_tissues\(wsi, 112, mpp=0\.5, key_added='tiles_56um'\)"):
        model.predict(wsi)
    assert "dbk_pred_tiles" not in wsi.tables
    zs.pp.tile_tissues(wsi, TILE_PX, mpp=PX_UM, key_added="tiles_56um")  # the call the message gives
    df = model.predict(wsi, tiles_key="tiles_56um")
    assert "dbk_pred_tiles_56um" in wsi.tables and len(df) == len(wsi["tiles_56um"])


def test_lazyslide_feature_table_as_fm_features(slide, model):
    from wsidata.io import add_features

    _, _, path = slide
    wsi = _open(path)
    df = model.predict(wsi)
    view = dbk.pp.from_wsidata(wsi)
    model.features(view)  # dbk's own FM embeddings of these tiles, written as LazySlide writes a feature table
    add_features(wsi, key="effnet_tiles", tile_key="tiles", features=np.asarray(view.tables["dbk_table"].obsm[
        model.fm_key]))
    got = model.predict(wsi, features_key="effnet", key_added="from_table")
    np.testing.assert_allclose(got.to_numpy(), df.to_numpy(), rtol=1e-5, atol=1e-5)
    rec = wsi.tables["from_table_tiles"].uns["dbk"]["predict"]["features"][model.fm_key]
    assert rec["source"] == "user-supplied" and rec["table"] == "effnet_tiles"

    import torch

    class Tiny(torch.nn.Module):  # a model LazySlide runs itself: its table has 8 features per tile
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 16, 16)

        def forward(self, x):
            return self.conv(x.permute(0, 3, 1, 2).float() / 255).mean((2, 3))

    zs.tl.feature_extraction(wsi, Tiny(), model_name="tiny", pbar=False)
    with pytest.raises(ValueError, match="'tiny_tiles' has 8 features per tile; the model's foundation model gives "
                                         r"1280: these are another model's features"):
        model.predict(wsi, features_key="tiny")
    with pytest.raises(KeyError, match=r"No feature table 'uni_tiles' .* zs\.tl\.feature_extraction\(wsi, 'uni'\)"):
        model.predict(wsi, features_key="uni")
    with pytest.raises(ValueError, match="features_key names a LazySlide feature table"):
        model.predict(view, features_key="effnet")


def test_foreign_table_is_never_replaced_and_copy_leaves_the_wsidata(slide, model):
    import anndata as ad

    _, _, path = slide
    wsi = _open(path)
    n = len(wsi["tiles"])
    wsi.tables["dbk_pred_tiles"] = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="already has a table 'dbk_pred_tiles' that dbk did not write"):
        model.predict(wsi)
    assert wsi.tables["dbk_pred_tiles"].n_vars == 1
    del wsi.tables["dbk_pred_tiles"]
    first = model.predict(wsi)
    again = model.predict(wsi)  # dbk's own table is replaced by the same predictions
    pd.testing.assert_frame_equal(first, again)
    before = set(wsi.tables)
    out = model.predict(wsi, key_added="copied", copy=True)
    assert type(out).__name__ == "WSIData" and "copied_tiles" in out.tables
    assert set(wsi.tables) == before


def test_figure_lazyslide_and_spatialdata_plot_draw_the_predictions(slide, model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, path = slide
    wsi = _open(path)
    model.predict(wsi)
    gene = model.genes[0]
    fig, ax = plt.subplots()
    zs.pl.tiles(wsi, feature_key="dbk_pred", color=gene, ax=ax)
    drawn = [c for c in ax.collections] + list(ax.images)
    assert drawn, "LazySlide drew nothing"
    plt.close(fig)
    pytest.importorskip("spatialdata_plot")
    fig, ax = plt.subplots()
    wsi.pl.render_shapes("tiles", color=gene, table_name="dbk_pred_tiles").pl.show(ax=ax)
    assert ax.collections, "spatialdata-plot drew nothing"
    plt.close(fig)


def test_fit_on_wsidata_with_an_expression_table(slide):
    from spatialdata.models import TableModel

    sd, image_key, path = slide
    wsi = _open(path)
    ref = _tiles_on_sdata(sd, image_key, dbk.pp.from_wsidata(wsi), path)
    dbk.pp.pseudobulk(ref, tiles_key="ls_tiles", key_added="ls_table")
    counts = ref.tables["ls_table"].layers["counts"]
    table = ad_table(counts, ref.tables["ls_table"].var_names, wsi["tiles"]["tile_id"].to_numpy())
    wsi.tables["counts"] = TableModel.parse(table, region="tiles", region_key="library_id", instance_key="tile_id")
    kw = dict(preset="tiny", pretrain_steps=3, fusion="ridge", head_cv=0, tile_size_um=TILE_UM, random_state=0)
    with pytest.raises(KeyError, match="has no expression table 'dbk_table'"):
        dbk.tl.fit_diffbulk(wsi, **kw)
    model = dbk.tl.fit_diffbulk(wsi, table_key="counts", **kw)
    got = wsi.tables["dbk_pred_tiles"]
    assert got.uns["dbk"]["in_sample"] is True and list(got.var_names) == list(model.genes)
    # the same fit on the same tiles, counts and pixels read by dbk from the SpatialData: the same model
    ref_model = dbk.tl.fit_diffbulk(ref, tiles_key="ls_tiles", table_key="ls_table", **kw)
    assert model.genes == ref_model.genes
    np.testing.assert_allclose(got.X, ref.tables["ls_table"].obsm["dbk_pred"].to_numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="not both in one call"):
        dbk.tl.fit_diffbulk([wsi, ref], table_key="counts", **kw)


def ad_table(counts, genes, tile_ids):
    import anndata as ad

    obs = pd.DataFrame({"tile_id": tile_ids, "library_id": pd.Categorical(["tiles"] * len(tile_ids))},
                       index=[str(i) for i in tile_ids])
    return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=list(genes)))


def test_bad_wsidata_inputs_are_named(slide):
    import anndata as ad
    from spatialdata.models import TableModel

    _, _, path = slide
    wsi = _open(path)
    with pytest.raises(KeyError, match=r"No tiles 'nope' in WSIData 'slide'.*zs\.pp\.tile_tissues"):
        dbk.pp.from_wsidata(wsi, tiles_key="nope")
    n = len(wsi["tiles"])
    ids = wsi["tiles"]["tile_id"].to_numpy()
    bad = ad_table(-np.ones((n, 2), dtype=np.float32), ["A", "B"], ids)
    wsi.tables["neg"] = TableModel.parse(bad, region="tiles", region_key="library_id", instance_key="tile_id")
    with pytest.raises(ValueError, match="'neg' of WSIData 'slide' .* negative or non-finite"):
        dbk.pp.from_wsidata(wsi, table_key="neg")
    wsi.tables["loose"] = ad.AnnData(np.ones((n, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="'loose' of WSIData 'slide' does not annotate the tiles 'tiles'"):
        dbk.pp.from_wsidata(wsi, table_key="loose")
    with pytest.raises(TypeError, match="expects a wsidata.WSIData"):
        dbk.pp.from_wsidata(dbk.datasets.synthetic(shape=(256, 256)))
    old = wsi.properties.mpp
    try:
        wsi.properties.mpp = None
        with pytest.raises(ValueError, match=r"has no pixel size .* wsi\.set_mpp"):
            dbk.pp.from_wsidata(wsi)
    finally:
        wsi.properties.mpp = old


def test_pyramid_levels_of_the_file_are_read_through_the_reader(slide, tmp_path):
    """A file whose pyramid the reader sees (levels as TIFF pages): dbk keeps the reader's levels and reads a coarse
    tile from the right level straight from the reader, pixel-identical to wsidata's own (dask) reading of it."""
    import tifffile

    from dbk.datasets._hest_local import pyramid_levels

    _, _, path = slide
    levels = pyramid_levels(tifffile.imread(path), 128)
    pages = tmp_path / "pages.tif"
    ppcm = 1e4 / PX_UM
    with tifffile.TiffWriter(pages) as tif:
        for i, level in enumerate(levels):
            s = level.shape[1] / levels[0].shape[1]
            tif.write(level, photometric="rgb", tile=(128, 128), resolution=(ppcm * s, ppcm * s),
                      resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1, metadata=None)
    wsi = _open(pages, tile_px=2 * TILE_PX)
    assert wsi.properties.n_level == len(levels) >= 3
    view = dbk.pp.from_wsidata(wsi)
    tree = view.images["he"]
    assert [tree[f"scale{i}"]["image"].shape[1:] for i in range(len(tree.children))] == [lv.shape[:2] for lv in levels]
    ds = dbk.pp.TileDataset(view, size_px=TILE_PX // 2)  # 224 px tiles read at 56 px: the level downsampled 4x
    assert ds.level_index == 2 and ds._direct is not None
    assert len(ds) >= 4 and (ds.bounds[:, :2] > 0).all(axis=1).any()  # tiles away from the origin
    direct = [ds.read(i) for i in range(len(ds))]
    ds._direct = None  # the same level through wsidata's dask graph
    for i, tile in enumerate(direct):
        np.testing.assert_array_equal(tile, ds.read(i))
