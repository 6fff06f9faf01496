"""The tile table: a tiles x genes AnnData annotating the tiles (``sdata.tables["dbk_table"]``), one row per tile.

:func:`dbk.pp.pseudobulk` fills it with the expression summed into each tile; :func:`empty_tile_table` makes one
with no genes for a slide without expression (H&E only), so that embeddings and predictions have rows to go to.
"""

from __future__ import annotations

from collections.abc import Mapping

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import TableModel

from .._constants import INSTANCE_COL, REGION_COL, SPATIAL_KEY, TILES_KEY, TILES_TABLE_KEY
from ._tiles import tile_bounds


def tile_table(
    sdata: SpatialData,
    tiles_key: str,
    X,
    *,
    obs: Mapping[str, object] | None = None,
    var: pd.DataFrame | None = None,
    bounds: np.ndarray | None = None,
) -> ad.AnnData:
    """An AnnData with one row per tile of ``sdata.shapes[tiles_key]``, in their order, ready to annotate them.

    Parameters
    ----------
    sdata
        SpatialData with the tiles.
    tiles_key
        Shapes element with the tiles.
    X
        ``(n_tiles, n_genes)`` matrix.
    obs
        ``obs`` columns (name -> values, one per tile), written in this order before ``region`` and
        ``instance_id``.
    var
        ``var`` of the table (its index: the gene names); ``None``: AnnData's default.
    bounds
        The tiles' pixel bounds (:func:`dbk.pp.tile_bounds`), when already computed.

    Returns
    -------
    The AnnData (not yet a parsed table; see :func:`write_tile_table`): ``obs_names`` the tile ids as strings, ``obs``
    the given columns then ``region`` (``tiles_key``) and ``instance_id`` (the tile ids), ``obsm["spatial"]`` the
    tile centres in level-0 pixels.
    """
    tiles = sdata.shapes[tiles_key]
    if bounds is None:
        bounds = tile_bounds(sdata, tiles_key)
    frame = pd.DataFrame(index=pd.Index(np.asarray(tiles.index.astype(str), dtype=object)))
    for name, values in (obs or {}).items():
        frame[name] = values
    frame[REGION_COL] = pd.Categorical([tiles_key] * len(frame))
    frame[INSTANCE_COL] = np.asarray(tiles.index)
    adata = ad.AnnData(X=X, obs=frame, var=var)
    adata.obsm[SPATIAL_KEY] = np.column_stack(
        [(bounds[:, 0] + bounds[:, 2]) / 2.0, (bounds[:, 1] + bounds[:, 3]) / 2.0]
    )
    return adata


def write_tile_table(sdata: SpatialData, adata: ad.AnnData, tiles_key: str, table_key: str) -> None:
    """Write ``adata`` (from :func:`tile_table`) to ``sdata.tables[table_key]`` as a table annotating the tiles."""
    if table_key in sdata.tables:
        del sdata.tables[table_key]
    sdata.tables[table_key] = TableModel.parse(
        adata, region=tiles_key, region_key=REGION_COL, instance_key=INSTANCE_COL
    )


def empty_tile_table(
    sdata: SpatialData, tiles_key: str = TILES_KEY, table_key: str = TILES_TABLE_KEY
) -> ad.AnnData:
    """Write a tile table with no genes (tiles x 0, float32) for a slide without expression (H&E only).

    Parameters
    ----------
    sdata
        SpatialData with the tiles (:func:`dbk.pp.make_tiles`); changed in place.
    tiles_key
        Shapes element with the tiles.
    table_key
        Name of the table written (replaced if present).

    Returns
    -------
    The table written, ``sdata.tables[table_key]``: ``obs`` ``region`` and ``instance_id``, ``obsm["spatial"]`` the
    tile centres in level-0 pixels, no ``var``.
    """
    n = len(sdata.shapes[tiles_key])
    write_tile_table(sdata, tile_table(sdata, tiles_key, np.zeros((n, 0), dtype=np.float32)), tiles_key, table_key)
    return sdata.tables[table_key]
