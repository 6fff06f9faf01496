"""Data laid out as spatialdata_io.xenium gives it: a morphology image and transcripts in "global" (morphology
pixels), the post-Xenium H&E as a second image with an alignment affine into "global"."""

from __future__ import annotations

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from _builders import tissue_image
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel
from spatialdata.transformations import Affine, Identity

import dbk


@pytest.fixture
def xenium_like():
    rng = np.random.default_rng(0)
    # H&E pixels -> morphology pixels: rotate 5°, scale 1.3, shift; (x, y, 1) convention
    th = np.deg2rad(5.0)
    a = np.array([[1.3 * np.cos(th), -1.3 * np.sin(th), 40.0], [1.3 * np.sin(th), 1.3 * np.cos(th), -25.0], [0, 0, 1]])
    he = Image2DModel.parse(da.from_array(tissue_image(1000, 1400), chunks=(3, 256, 256)), dims=("c", "y", "x"),
                            transformations={"global": Affine(a, input_axes=("x", "y"), output_axes=("x", "y"))})
    morph = Image2DModel.parse(da.zeros((1, 2000, 2000), dtype=np.uint16), dims=("c", "y", "x"),
                               transformations={"global": Identity()})
    n = 100_000
    # transcripts in morphology pixels, over the H&E footprint
    hx, hy = rng.uniform(0, 1400, n), rng.uniform(0, 1000, n)
    mx = a[0, 0] * hx + a[0, 1] * hy + a[0, 2]
    my = a[1, 0] * hx + a[1, 1] * hy + a[1, 2]
    df = pd.DataFrame({"x": mx, "y": my, "feature_name": pd.Categorical(rng.choice(["A", "B", "BLANK_0001"], n)),
                       "qv": rng.uniform(10, 40, n)})
    pts = PointsModel.parse(dd.from_pandas(df, npartitions=4), feature_key="feature_name",
                            transformations={"global": Identity()})
    sdata = SpatialData(images={"he": he, "morphology_focus": morph}, points={"transcripts": pts})
    return sdata, df, a


def test_pseudobulk_through_alignment_affine(xenium_like):
    sdata, df, a = xenium_like
    # the H&E pixel size: morphology 0.2125 µm/px times the affine's scale (1.3)
    dbk.io.set_pixel_size(sdata, "he", pixel_size_um=0.2125 * 1.3)
    with pytest.raises(ValueError, match="several images"):
        dbk.pp.make_tiles(sdata, tile_size_um=30.0)
    dbk.pp.make_tiles(sdata, image_key="he", tile_size_um=30.0)
    dbk.pp.pseudobulk(sdata)
    table = sdata.tables["dbk_table"]
    # brute force in H&E pixels, through the inverse alignment
    inv = np.linalg.inv(a)
    hx = inv[0, 0] * df.x + inv[0, 1] * df.y + inv[0, 2]
    hy = inv[1, 0] * df.x + inv[1, 1] * df.y + inv[1, 2]
    ok = (df.qv >= 20) & (df.feature_name != "BLANK_0001")
    b = dbk.pp.tile_bounds(sdata)
    want = np.array([[int((ok & (df.feature_name == g) & (hx >= x0) & (hx < x1) & (hy >= y0) & (hy < y1)).sum())
                      for g in ["A", "B"]] for x0, y0, x1, y1 in b])
    got = table[:, ["A", "B"]].layers["counts"].toarray()
    # a point within float rounding of an edge may fall either side; allow no more than a handful
    assert np.abs(got - want).sum() <= 4
    assert got.sum() == pytest.approx(want.sum(), abs=2)
