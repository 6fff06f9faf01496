"""Square tiles over tissue (grid) or centred on spots, sized in µm."""

from __future__ import annotations

from typing import Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from spatialdata import SpatialData
from spatialdata.models import ShapesModel
from spatialdata.transformations import get_transformation

from .._constants import INSTANCE_COL, PIXEL_CS, REGION_COL, SPOTS_KEY, TILES_KEY, TISSUE_FRACTION_COL, TISSUE_KEY
from .._image import affine_to_image_pixels, get_pixel_size, image_shape, resolve_image_key
from .._logging import logger
from .._utils import copy_sdata

# Why not squidpy.experimental.im.make_tiles / make_tiles_from_spots: they take sizes in pixels and their spot
# tiles use floor/ceil bounds (so tiles differ by a pixel); dbk needs µm-based sizes, tiles of exactly equal integer
# size and half-open pixel bounds [x0, x1) x [y0, y1), which the exact pseudo-bulk binning relies on.

TILE_COLUMNS = ("x0", "y0", "x1", "y1")


def tile_size_in_px(sdata: SpatialData, image_key: str, tile_size_um: float | None, tile_size_px: int | None) -> int:
    """Integer tile side in level-0 pixels from a size in µm (rounded) or in pixels."""
    if (tile_size_um is None) == (tile_size_px is None):
        raise ValueError("Give exactly one of tile_size_um and tile_size_px.")
    if tile_size_px is not None:
        if int(tile_size_px) != tile_size_px or tile_size_px <= 0:
            raise ValueError(f"tile_size_px must be a positive integer, got {tile_size_px!r}.")
        return int(tile_size_px)
    if not np.isfinite(tile_size_um) or tile_size_um <= 0:
        raise ValueError(f"tile_size_um must be a positive number, got {tile_size_um!r}.")
    px = get_pixel_size(sdata, image_key)
    size = int(round(tile_size_um / px))
    if size < 1:
        raise ValueError(f"tile_size_um={tile_size_um} is smaller than one pixel ({px} µm) of image {image_key!r}.")
    return size


def make_tiles(
    sdata: SpatialData,
    *,
    tile_size_um: float | None = 112.0,
    tile_size_px: int | None = None,
    image_key: str | None = None,
    mode: Literal["grid", "spots"] = "grid",
    stride_um: float | None = None,
    spots_key: str | None = None,
    tissue_key: str = TISSUE_KEY,
    min_tissue_fraction: float = 0.5,
    key_added: str = TILES_KEY,
    copy: bool = False,
) -> SpatialData | None:
    """Lay square tiles over the tissue (``"grid"``) or centre one tile on each spot (``"spots"``).

    Tiles have integer, half-open pixel bounds ``[x0, x1) x [y0, y1)`` in the image's level-0 pixels and all have
    the same side ``round(tile_size_um / pixel_size)`` (so 112 µm at 0.5 µm/px is 224 px). Tiles not entirely
    inside the image are dropped.

    Parameters
    ----------
    sdata
        SpatialData with the H&E image (and the spots for ``mode="spots"``).
    tile_size_um
        Tile side in µm (converted with the image's pixel size, see :func:`dbk.io.set_pixel_size`).
    tile_size_px
        Tile side in level-0 pixels, instead of ``tile_size_um`` (set ``tile_size_um=None``).
    image_key
        The H&E image; the only image when ``None``.
    mode
        ``"grid"``: a regular grid over the image, kept where tissue covers at least ``min_tissue_fraction``.
        ``"spots"``: one tile centred on each spot (circles or points of ``sdata.shapes[spots_key]``).
    stride_um
        Grid step in µm; the tile size when ``None`` (non-overlapping). A smaller stride gives dense, overlapping
        tiles (e.g. for unconditional diffusion pre-training on all tissue).
    spots_key
        Shapes with the spots (``mode="spots"``); ``"spots"`` when ``None``.
    tissue_key
        Labels element with the tissue mask; computed with :func:`dbk.pp.tissue_mask` when absent (grid mode).
    min_tissue_fraction
        Keep grid tiles whose tissue fraction is at least this; ignored in spots mode (all spot tiles kept).
    key_added
        Name of the shapes element written.
    copy
        Return a modified copy instead of changing ``sdata`` in place.

    Returns
    -------
    ``None``, or the modified copy when ``copy=True``. Writes ``sdata.shapes[key_added]``: square polygons indexed by
    tile id (0..n-1) with columns ``x0, y0, x1, y1`` (pixel bounds), ``row``, ``col`` (grid) or ``spot_id``
    (spots), and ``tissue_fraction``; with the image's transformations. Its ``attrs["dbk"]`` holds ``image_key``,
    ``tile_size_px``, ``mode`` (and ``spots_key``), and in grid mode ``grid`` (``stride_px``, ``n_rows``,
    ``n_cols``: the full grid, from pixel (0, 0)) and ``tissue_filter``: what the tissue filter dropped, with
    ``min_tissue_fraction``, ``n_tiles_in_grid`` and ``n_tiles_dropped``. When it dropped tiles and the slide has
    cells (``sdata.shapes["cells"]``, their centroids) or spots (``spots_key``), it also holds ``objects`` (which),
    ``n_in_grid`` (how many lie in a tile of the full grid), ``n_dropped`` and ``fraction_dropped`` (how many of those
    lie in no kept tile); it is logged, and a warning (``"dbk"`` logger) says when more than 25% were dropped: the
    tissue mask may miss tissue, or the points are not aligned. The transcripts are not read here:
    :func:`dbk.pp.pseudobulk` counts those in the dropped tiles exactly, in its own pass over them, and says so the
    same way (``uns["dbk"]["pseudobulk"]["tissue_filter"]``). When no tile was dropped, nothing was lost and nothing
    is read: ``n_dropped`` is 0.
    """
    key = resolve_image_key(sdata, image_key)
    if mode not in ("grid", "spots"):
        raise ValueError(f"mode must be 'grid' or 'spots', got {mode!r}.")
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction must be in [0, 1], got {min_tissue_fraction!r}.")
    if copy:
        sdata = copy_sdata(sdata)
    size = tile_size_in_px(sdata, key, tile_size_um, tile_size_px)
    _, h, w = image_shape(sdata, key)
    if size > min(h, w):
        raise ValueError(f"Tiles of {size} px do not fit in image {key!r} of {h} x {w} px.")

    if mode == "grid":
        if stride_um is None:
            stride = size
        else:
            if stride_um <= 0:
                raise ValueError(f"stride_um must be positive, got {stride_um!r}.")
            stride = max(1, int(round(stride_um / get_pixel_size(sdata, key))))
        xs = np.arange(0, w - size + 1, stride)
        ys = np.arange(0, h - size + 1, stride)
        gy, gx = np.meshgrid(ys, xs, indexing="ij")
        rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
        x0, y0 = gx.ravel(), gy.ravel()
        extra = {"row": rows.ravel(), "col": cols.ravel()}
        if tissue_key not in sdata.labels:
            from ._tissue import tissue_mask

            tissue_mask(sdata, image_key=key, key_added=tissue_key)
        frac = _tissue_fraction(sdata, tissue_key, x0, y0, size)
        keep = frac >= min_tissue_fraction
        if not keep.any():
            raise ValueError(
                f"No tile of {size} px has tissue fraction >= {min_tissue_fraction} in image {key!r} "
                f"(max {frac.max() if frac.size else 0:.2f}); check sdata.labels[{tissue_key!r}] or lower "
                "min_tissue_fraction."
            )
        n_tiles_dropped = int(len(keep) - np.count_nonzero(keep))
        loss = {"min_tissue_fraction": float(min_tissue_fraction), "n_tiles_in_grid": int(len(keep)),
                "n_tiles_dropped": n_tiles_dropped}
        if n_tiles_dropped:  # cells / spots (shapes in memory) here; transcripts by pseudobulk, in its own pass
            from ._coverage import tissue_filter_loss

            shapes_loss = tissue_filter_loss(sdata, key, x0, y0, size, keep, min_tissue_fraction, spots_key)
            loss.update(shapes_loss or {})
            if shapes_loss is None:
                logger.info(f"make_tiles: {n_tiles_dropped:,} of the {len(keep):,} grid tiles have tissue fraction < "
                            f"{min_tissue_fraction:g} and were dropped; dbk.pp.pseudobulk counts the transcripts in "
                            "them.")
        else:  # no tile dropped: nothing lost, nothing to read
            loss.update(n_dropped=0, fraction_dropped=0.0)
        grid = {"stride_px": int(stride), "n_rows": int(len(ys)), "n_cols": int(len(xs))}
        x0, y0, frac = x0[keep], y0[keep], frac[keep]
        extra = {k: v[keep] for k, v in extra.items()}
    else:
        skey = SPOTS_KEY if spots_key is None else spots_key
        if skey not in sdata.shapes:
            raise KeyError(f"No shapes {skey!r} with spots in sdata.shapes; available: {list(sdata.shapes)}.")
        spots = sdata.shapes[skey]
        centres = np.column_stack([spots.geometry.centroid.x.to_numpy(), spots.geometry.centroid.y.to_numpy()])
        m = affine_to_image_pixels(sdata, skey, key)
        centres = centres @ m[:2, :2].T + m[:2, 2]
        x0 = np.floor(centres[:, 0] - size / 2).astype(np.int64)
        y0 = np.floor(centres[:, 1] - size / 2).astype(np.int64)
        inside = (x0 >= 0) & (y0 >= 0) & (x0 + size <= w) & (y0 + size <= h)
        if not inside.all():
            logger.warning(f"make_tiles: {int((~inside).sum())} spot tiles extend past image {key!r}; dropped.")
        x0, y0 = x0[inside], y0[inside]
        extra = {"spot_id": np.asarray(spots.index)[inside]}
        if tissue_key in sdata.labels:
            frac = _tissue_fraction(sdata, tissue_key, x0, y0, size)
        else:
            frac = np.full(len(x0), np.nan)
        if len(x0) == 0:
            raise ValueError(f"No spot of {skey!r} gives a tile inside image {key!r}.")

    x0 = np.asarray(x0, dtype=np.int64)
    y0 = np.asarray(y0, dtype=np.int64)
    polys = shapely.box(x0, y0, x0 + size, y0 + size)
    gdf = gpd.GeoDataFrame(
        {"x0": x0, "y0": y0, "x1": x0 + size, "y1": y0 + size, **extra, TISSUE_FRACTION_COL: frac},
        geometry=polys,
        index=pd.RangeIndex(len(x0)),
    )
    transforms = get_transformation(sdata.images[key], get_all=True)
    sdata.shapes[key_added] = ShapesModel.parse(gdf, transformations=dict(transforms))
    meta = {"image_key": key, "tile_size_px": size, "mode": mode}
    if mode == "spots":
        meta["spots_key"] = skey
    else:
        meta["grid"] = grid
        meta["tissue_filter"] = loss
    sdata.shapes[key_added].attrs["dbk"] = meta
    logger.info(f"make_tiles: {len(gdf)} tiles of {size} px over image {key!r} -> sdata.shapes[{key_added!r}].")
    return sdata if copy else None


def tile_bounds(sdata: SpatialData, tiles_key: str = TILES_KEY) -> np.ndarray:
    """``(n, 4)`` int64 array of ``x0, y0, x1, y1`` pixel bounds of the tiles (from their columns or polygons).

    Parameters
    ----------
    sdata
        SpatialData with the tiles.
    tiles_key
        Shapes element with the tiles: their ``x0, y0, x1, y1`` columns (as :func:`make_tiles` writes them), else
        the bounds of their polygons.

    Returns
    -------
    numpy.ndarray
        ``(n, 4)`` int64, one row per tile in the element's order: half-open level-0 pixel bounds ``x0, y0, x1,
        y1`` of the image the tiles were laid on.

    Raises
    ------
    KeyError
        If there are no tiles ``tiles_key``.
    ValueError
        If a tile's bounds are NaN or infinite, empty or inverted (``x1 <= x0`` or ``y1 <= y0``), or lie wholly
        outside the image the tiles were laid on, naming the tiles.

    Warns
    -----
    Through the ``"dbk"`` logger, when tiles extend past the image (read as white glass, no expression there), with
    their number and the fraction of their pixels outside.
    """
    if tiles_key not in sdata.shapes:
        raise KeyError(
            f"No tiles {tiles_key!r} in sdata.shapes (available: {list(sdata.shapes)}); run dbk.pp.make_tiles first."
        )
    gdf = sdata.shapes[tiles_key]
    if all(c in gdf.columns for c in TILE_COLUMNS):
        raw = gdf[list(TILE_COLUMNS)].to_numpy(dtype=np.float64)
        where = f"columns {list(TILE_COLUMNS)}"
    else:
        raw = gdf.geometry.bounds.to_numpy(dtype=np.float64)
        where = "polygon bounds"
    ids = np.asarray(gdf.index)
    bad = ~np.isfinite(raw).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of the {len(raw)} tiles of {tiles_key!r} have NaN or infinite bounds "
                         f"({where}), e.g. tiles {ids[bad][:5].tolist()}; drop or recompute them (dbk.pp.make_tiles).")
    if all(c in gdf.columns for c in TILE_COLUMNS):
        b = raw.astype(np.int64)
    else:
        b = np.rint(raw).astype(np.int64)
    inverted = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
    if inverted.any():
        i = int(np.flatnonzero(inverted)[0])
        first = ids[i : i + 1].tolist()[0]
        raise ValueError(f"{int(inverted.sum())} of the {len(b)} tiles of {tiles_key!r} are empty or inverted (x1 <= "
                         f"x0 or y1 <= y0 in {where}), e.g. tiles {ids[inverted][:5].tolist()}; tile {first!r} has "
                         f"(x0, y0, x1, y1) = {tuple(int(v) for v in b[i])}.")
    _check_tiles_in_image(sdata, gdf, tiles_key, b, ids)
    return b


_WARNED_OUTSIDE: set[tuple] = set()  # tiles past the image, warned about once per session (tile_bounds runs often)


def _check_tiles_in_image(sdata: SpatialData, gdf, tiles_key: str, b: np.ndarray, ids: np.ndarray) -> None:
    """Refuse tiles wholly outside the image they were laid on; warn (once) about tiles partly outside it."""
    key = gdf.attrs.get("dbk", {}).get("image_key")
    if key not in sdata.images:
        key = next(iter(sdata.images)) if len(sdata.images) == 1 else None
    if key is None or not len(b):
        return
    try:
        _, h, w = image_shape(sdata, key)
    except (KeyError, TypeError, ValueError):  # an image dbk cannot read says so where it is read
        return
    cx = np.clip(b[:, [0, 2]], 0, w)
    cy = np.clip(b[:, [1, 3]], 0, h)
    inside = (cx[:, 1] - cx[:, 0]) * (cy[:, 1] - cy[:, 0])
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    gone = inside == 0
    if gone.any():
        raise ValueError(f"{int(gone.sum())} of the {len(b)} tiles of {tiles_key!r} lie wholly outside image {key!r} "
                         f"({h} x {w} px), e.g. tiles {ids[gone][:5].tolist()} (first bounds x0, y0, x1, y1 = "
                         f"{tuple(int(v) for v in b[gone][0])}); are the tiles in the image's level-0 pixels?")
    part = inside < area
    if part.any():
        frac = 1.0 - float(inside[part].sum()) / float(area[part].sum())
        seen = (tiles_key, key, h, w, int(part.sum()), round(frac, 6), len(b))
        if seen not in _WARNED_OUTSIDE:
            _WARNED_OUTSIDE.add(seen)
            logger.warning(f"{int(part.sum())} of the {len(b)} tiles of {tiles_key!r} extend past image {key!r} "
                           f"({h} x {w} px): {frac:.1%} of their pixels lie outside it (read as white glass, with no "
                           f"expression), e.g. tiles {ids[part][:5].tolist()}. dbk.pp.make_tiles lays tiles inside "
                           "the image only.")


def _tissue_fraction(sdata: SpatialData, tissue_key: str, x0: np.ndarray, y0: np.ndarray, size: int) -> np.ndarray:
    """Fraction of tissue under each tile, from the (low-resolution) mask through an integral image."""
    labels = sdata.labels[tissue_key]
    mask = np.asarray(labels.data.compute() if hasattr(labels.data, "compute") else labels.data) > 0
    t = get_transformation(labels, PIXEL_CS)
    m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")))
    sx, sy = m[0, 0], m[1, 1]  # level-0 pixels per mask pixel
    dtype = np.int32 if mask.size < 2**31 else np.int64  # no sum can exceed the mask's size: half the memory traffic
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=dtype)
    inner = integral[1:, 1:]
    # along rows first (the bool -> int cast runs on contiguous rows), then down the columns, in place: several
    # times faster than the other order, no temporary the size of the mask
    np.cumsum(mask, axis=1, dtype=dtype, out=inner)
    np.cumsum(inner, axis=0, out=inner)

    def clip(v, n):
        return np.clip(np.rint(v).astype(np.int64), 0, n)

    mx0, mx1 = clip((x0 - m[0, 2]) / sx, mask.shape[1]), clip((x0 + size - m[0, 2]) / sx, mask.shape[1])
    my0, my1 = clip((y0 - m[1, 2]) / sy, mask.shape[0]), clip((y0 + size - m[1, 2]) / sy, mask.shape[0])
    area = np.maximum((mx1 - mx0) * (my1 - my0), 1)
    inside = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
    return inside / area


def table_rows_to_tiles(sdata: SpatialData, table_key: str, tiles_key: str, tile_ids: np.ndarray) -> np.ndarray:
    """Position in ``tile_ids`` of each row of the table, matched by instance id.

    Raises a clear error when the table is not linked to the tiles: it annotates another element, its instance ids
    (or, without spatialdata attributes, its ``obs_names``) match no tile, or two rows claim the same tile.
    """
    if table_key not in sdata.tables:
        raise KeyError(f"No table {table_key!r} in sdata.tables; available: {list(sdata.tables)}.")
    adata = sdata.tables[table_key]
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()
        slide = f" of slide {sdata.attrs['sample']!r}" if sdata.attrs.get("sample") is not None else ""
        raise ValueError(f"Table {table_key!r}{slide} has duplicate obs_names: {len(dup)} names are used by several "
                         f"rows (e.g. {dup[:5].tolist()}); each tile needs its own row name (predictions and metrics "
                         "are indexed by them). Make them unique first, e.g. table.obs_names_make_unique(), or "
                         f"table.obs_names = table.obs[{INSTANCE_COL!r}].astype(str).")
    attrs = adata.uns.get("spatialdata_attrs", {})
    inst_col = attrs.get("instance_key", INSTANCE_COL)
    region_col = attrs.get("region_key", REGION_COL)
    link = (f"Link it with spatialdata.models.TableModel.parse(adata, region={tiles_key!r}, "
            f"region_key={REGION_COL!r}, instance_key={INSTANCE_COL!r}), obs[{INSTANCE_COL!r}] holding the tile ids.")
    if region_col in adata.obs:
        regions = set(adata.obs[region_col].astype(str))
        if tiles_key not in regions:
            raise ValueError(f"Table {table_key!r} is not linked to the tiles {tiles_key!r}: it annotates "
                             f"{sorted(regions)} (obs[{region_col!r}]). {link}")
        other = regions - {tiles_key}
        if other:
            raise ValueError(f"Table {table_key!r} annotates {sorted(other)} besides {tiles_key!r}; embeddings need "
                             f"a table of the tiles only.")
    inst = adata.obs[inst_col].to_numpy() if inst_col in adata.obs else np.asarray(adata.obs_names)
    by = f"obs[{inst_col!r}]" if inst_col in adata.obs else "obs_names (the table has no instance key)"
    pos = pd.Index(tile_ids).get_indexer(inst)
    if pos.size and (pos < 0).all() and inst_col not in adata.obs:
        pos = pd.Index(np.asarray(tile_ids).astype(str)).get_indexer(np.asarray(inst).astype(str))
    if (pos < 0).any():
        bad = np.asarray(inst)[pos < 0][:5].tolist()
        raise ValueError(f"{int((pos < 0).sum())} of {len(pos)} rows of table {table_key!r} match no tile of "
                         f"{tiles_key!r} by {by} (e.g. {bad}); the table is not linked to these tiles. {link}")
    dup = pd.Index(pos).duplicated()
    if dup.any():
        bad = np.asarray(inst)[dup][:5].tolist()
        raise ValueError(f"{int(dup.sum())} rows of table {table_key!r} point to a tile of {tiles_key!r} that an "
                         f"earlier row already has (by {by}, e.g. {bad}); each tile needs one row.")
    return pos
