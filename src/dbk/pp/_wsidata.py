"""A LazySlide ``WSIData`` as a dbk slide: its H&E (through its own reader), its tiles, their expression.

The reading itself (the image through the WSIData's reader, the tiles' boxes, the tables written back) is
:mod:`dbk.io._wsidata`; this module makes the tile table, which is preprocessing (counts, normalisation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import COUNTS_LAYER, IMAGE_KEY, SAMPLE_COL, TILES_KEY, TILES_TABLE_KEY
from .._logging import logger
from ..io._wsidata import LAZYSLIDE_TILES_KEY, wsidata_name, wsidata_table_rows

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    from spatialdata import SpatialData


def from_wsidata(
    wsi,
    *,
    tiles_key: str = LAZYSLIDE_TILES_KEY,
    table_key: str | None = None,
    layer: str | None = None,
    image_key: str = IMAGE_KEY,
    sample: str | None = None,
) -> SpatialData:
    """A LazySlide ``WSIData`` as a dbk slide: its H&E, its tiles and (optionally) their expression.

    Nothing is copied from the slide file: the image is read lazily through the WSIData's own reader (dask, one array
    per pyramid level of the file, from :func:`wsidata.reader.to_datatree`; dbk's tile reader asks the reader for
    each tile's region directly). The tiles become ``"dbk_tiles"`` (their level-0 pixel boxes, indexed by LazySlide's
    ``tile_id``), the pixel size is the WSIData's (``wsi.properties.mpp``). The WSIData is not changed.

    Parameters
    ----------
    wsi
        A ``wsidata.WSIData`` (``wsidata.open_wsi(path)``, LazySlide's slides) with a pixel size.
    tiles_key
        Its shapes element with the tiles (``zs.pp.tile_tissues``'s ``"tiles"`` by default); square tiles only.
    table_key
        A table of the WSIData with expression per tile (raw counts, tiles x genes) annotating ``tiles_key``
        (spatialdata's ``region`` / ``instance_key`` = the tiles' ``tile_id``, as LazySlide's tables do): it becomes
        the tile table ``"dbk_table"`` (counts in ``layers["counts"]``, ``X`` their log1p-normalised values, as
        :func:`dbk.pp.pseudobulk` writes), so the slide can train :func:`dbk.tl.fit_diffbulk`. ``None``: no table
        (a slide to predict on).
    layer
        Layer of that table with the raw counts (``None``: its ``X``).
    image_key
        Name of the H&E image in the returned SpatialData.
    sample
        The slide's name (``attrs["sample"]``); ``None``: the slide file's name without its extension.

    Returns
    -------
    SpatialData
        ``images[image_key]`` (lazy, the WSIData's reader), ``shapes["dbk_tiles"]``, ``tables["dbk_table"]`` when
        ``table_key`` is given, ``attrs["sample"]`` and ``attrs["wsidata"]`` (the slide file, reader and tiles
        read).

    Raises
    ------
    TypeError
        If ``wsi`` is not a WSIData.
    ValueError
        If the WSIData has no pixel size, its tiles are not square, or the expression table does not annotate the
        tiles or has negative or non-finite counts.
    KeyError
        If ``tiles_key`` or ``table_key`` is not in the WSIData.

    Examples
    --------
    >>> import lazyslide as zs, wsidata  # doctest: +SKIP
    >>> wsi = wsidata.open_wsi("slide.svs", store=None)  # doctest: +SKIP
    >>> zs.pp.find_tissues(wsi); zs.pp.tile_tissues(wsi, 224, mpp=0.5)  # doctest: +SKIP
    >>> sdata = dbk.pp.from_wsidata(wsi)  # doctest: +SKIP
    """
    import geopandas as gpd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    from .._image import set_pixel_size
    from ..io._wsidata import is_wsidata, wsidata_image, wsidata_pixel_size, wsidata_tiles

    if not is_wsidata(wsi):
        raise TypeError(f"from_wsidata expects a wsidata.WSIData (LazySlide's slide), got {type(wsi).__name__}.")
    name = wsidata_name(wsi) if sample is None else str(sample)
    px = wsidata_pixel_size(wsi)
    bounds = wsidata_tiles(wsi, tiles_key)
    element = wsidata_image(wsi, source=f"WSIData {name!r}")
    sdata = SpatialData(images={image_key: element})
    set_pixel_size(sdata, image_key, pixel_size_um=px)
    b = bounds.to_numpy()
    gdf = gpd.GeoDataFrame(bounds.copy(), geometry=shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3]),
                           index=bounds.index.copy())
    transforms = get_transformation(sdata.images[image_key], get_all=True)
    sdata.shapes[TILES_KEY] = ShapesModel.parse(gdf, transformations=dict(transforms))
    side = int(np.median(b[:, 2] - b[:, 0])) if len(b) else 0
    sdata.shapes[TILES_KEY].attrs["dbk"] = {"image_key": image_key, "tile_size_px": side, "mode": "wsidata",
                                            "wsidata_tiles_key": tiles_key}
    sdata.attrs[SAMPLE_COL] = name
    sdata.attrs["wsidata"] = {"file": str(getattr(wsi.reader, "file", "")), "reader": str(wsi.reader.name),
                              "tiles_key": tiles_key, "table_key": table_key, "um_per_px": px}
    if table_key is not None:
        _expression_table(wsi, sdata, table_key=table_key, tiles_key=tiles_key, layer=layer, name=name)
    logger.info(f"from_wsidata: WSIData {name!r}: {len(b)} tiles {tiles_key!r} of {side} px ({side * px:.1f} µm at "
                f"{px:g} µm/px) read through its {wsi.reader.name} reader"
                + (f"; expression table {table_key!r} -> {TILES_TABLE_KEY!r}." if table_key is not None else "."))
    return sdata




def _expression_table(wsi, sdata, *, table_key: str, tiles_key: str, layer: str | None, name: str) -> None:
    """The WSIData's expression table ``table_key`` as the slide's ``"dbk_table"`` (counts, log1p-normalised X)."""
    import scipy.sparse as sp

    from ._normalize import normalize
    from ._tile_table import tile_table, write_tile_table

    if table_key not in wsi.tables:
        raise KeyError(f"No table {table_key!r} in WSIData {name!r} (tables: {list(wsi.tables)}).")
    src = wsi.tables[table_key]
    tiles = sdata.shapes[TILES_KEY]
    rows = wsidata_table_rows(wsi, table_key, tiles_key, tiles.index, what="Table",
                              remedy="dbk needs one row per tile, linked by tile_id: "
                                     f"spatialdata.models.TableModel.parse(adata, region={tiles_key!r}, "
                                     "region_key=..., instance_key='tile_id').")
    x = src.layers[layer] if layer is not None else src.X
    x = x[rows]
    values = x.data if sp.issparse(x) else np.asarray(x)
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"Table {table_key!r} of WSIData {name!r} ({'layer ' + repr(layer) if layer else 'X'}) has "
                         "negative or non-finite values; dbk needs raw counts per tile.")
    counts = x.astype(np.float32) if sp.issparse(x) else np.asarray(x, dtype=np.float32)
    var = pd.DataFrame(index=pd.Index([str(g) for g in src.var_names]))
    n = np.asarray(counts.sum(axis=1)).ravel()
    adata: ad.AnnData = tile_table(sdata, TILES_KEY, counts.copy(), obs={SAMPLE_COL: [name] * len(tiles),
                                                                          "n_transcripts": n}, var=var)
    adata.layers[COUNTS_LAYER] = counts
    normalize(adata)
    write_tile_table(sdata, adata, TILES_KEY, TILES_TABLE_KEY)
