"""Tiny SpatialData objects whose answers are known, for pp/pl tests."""

from __future__ import annotations

import anndata as ad
import dask.array as da
import dask.dataframe as dd
import geopandas as gpd
import numpy as np
import pandas as pd
import scipy.sparse as sp
import shapely
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel

from dbk._image import set_pixel_size


def tissue_image(h: int = 1000, w: int = 1400, tissue=(100, 900, 150, 1250)) -> np.ndarray:
    """White glass with one pink rectangle of tissue [y0:y1, x0:x1]."""
    img = np.full((3, h, w), 245, dtype=np.uint8)
    y0, y1, x0, x1 = tissue
    img[0, y0:y1, x0:x1], img[1, y0:y1, x0:x1], img[2, y0:y1, x0:x1] = 220, 120, 190
    return img


def make_sdata(
    n_points: int = 200_000,
    *,
    h: int = 1000,
    w: int = 1400,
    pixel_size_um: float = 0.5,
    seed: int = 0,
    npartitions: int = 5,
    genes=("A", "B", "C", "D"),
    points_scale: float | None = None,
) -> tuple[SpatialData, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    img = Image2DModel.parse(da.from_array(tissue_image(h, w), chunks=(3, 256, 256)), dims=("c", "y", "x"),
                             scale_factors=[2], c_coords=["r", "g", "b"])
    names = [*genes, "BLANK_0001", "NegControlProbe_00001"]
    df = pd.DataFrame({
        "x": rng.uniform(0, w, n_points).astype(np.float32),
        "y": rng.uniform(0, h, n_points).astype(np.float32),
        "feature_name": pd.Categorical(rng.choice(names, n_points, p=[0.9 / len(genes)] * len(genes) + [0.05, 0.05]),
                                       categories=names),
        "qv": rng.uniform(5, 40, n_points).astype(np.float32),
    })
    # points exactly on tile edges (multiples of 112 px at 0.5 µm/px and 56 µm tiles)
    k = min(2000, n_points // 10)
    df.loc[: k - 1, "x"] = (rng.integers(1, w // 112, k) * 112).astype(np.float32)
    df.loc[: k - 1, "y"] = (rng.integers(1, h // 112, k) * 112).astype(np.float32)
    pts_df = df.copy()
    transformations = None
    if points_scale is not None:  # points in µm in the "um" system only
        from spatialdata.transformations import Scale

        pts_df["x"] = (pts_df["x"] * points_scale).astype(np.float64)
        pts_df["y"] = (pts_df["y"] * points_scale).astype(np.float64)
        transformations = {"um": Scale([1.0, 1.0], axes=("y", "x"))}
    pts = PointsModel.parse(dd.from_pandas(pts_df, npartitions=npartitions), feature_key="feature_name",
                            transformations=transformations)
    sdata = SpatialData(images={"he": img}, points={"transcripts": pts})
    set_pixel_size(sdata, "he", pixel_size_um=pixel_size_um, elements=[] if points_scale else ["transcripts"])
    return sdata, df


def add_cells(sdata: SpatialData, n: int = 300, seed: int = 1, genes=("A", "B", "C")) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    _, h, w = sdata.images["he"]["scale0"]["image"].shape
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    gdf = gpd.GeoDataFrame({"radius": np.full(n, 5.0)}, geometry=shapely.points(cx, cy),
                           index=pd.Index(np.arange(n) + 1000))
    from spatialdata.transformations import get_transformation

    sdata.shapes["cells"] = ShapesModel.parse(gdf, transformations=dict(get_transformation(sdata.images["he"],
                                                                                          get_all=True)))
    X = sp.csr_matrix(rng.poisson(3, (n, len(genes))).astype(np.int64))
    obs = pd.DataFrame({"region": pd.Categorical(["cells"] * n), "cell_id": np.arange(n) + 1000},
                       index=[f"c{i}" for i in range(n)])
    table = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)))
    sdata.tables["table"] = TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")
    return pd.DataFrame({"x": cx, "y": cy})
