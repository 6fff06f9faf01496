"""Slides ready for a model: tiles and the pseudo-bulk table made where missing, checked, pixel size recorded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .._constants import SPOTS_KEY, TILES_KEY, TILES_TABLE_KEY, TRANSCRIPTS_KEY, UM_PER_PX_KEY, UNS_KEY
from .._logging import logger
from .._utils import is_sdata


def as_slides(data) -> tuple[list, list[str]]:
    """``(slides, names)`` of a SpatialData, a list of them or a ``{name: sdata}`` dict.

    Names come from the dict keys, else from ``sdata.attrs["sample"]``, else from a one-valued ``obs["sample"]`` of
    the tile table, else ``slide<i>``; repeated names get their position appended.
    """
    if is_sdata(data):
        return [data], slide_names([data])
    if isinstance(data, Mapping):
        slides = list(data.values())
        names = [str(k) for k in data]
    elif isinstance(data, Sequence) and not isinstance(data, str):
        slides, names = list(data), None
    else:
        slides, names = [], None
    if not slides or not all(is_sdata(d) for d in slides):
        raise TypeError("data must be a SpatialData or a non-empty list (or {name: sdata} dict) of SpatialData objects "
                        "(slides with the H&E image and expression).")
    return slides, names if names is not None else slide_names(slides)


def slide_names(slides: list, table_key: str = TILES_TABLE_KEY) -> list[str]:
    """One distinct name per slide (see :func:`as_slides`)."""
    names = []
    for i, sd in enumerate(slides):
        name = sd.attrs.get("sample")
        if name is None and table_key in sd.tables and "sample" in sd.tables[table_key].obs:
            u = sd.tables[table_key].obs["sample"].astype(str).unique()
            name = u[0] if len(u) == 1 else None
        names.append(str(name) if name is not None else f"slide{i}")
    if len(set(names)) != len(names):  # e.g. two synthetic slides both called "sample"
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    return names


def expression_source(sdata, tiles_key: str = TILES_KEY) -> str:
    """Where :func:`dbk.pp.pseudobulk` finds a slide's expression: ``"spots"``, ``"transcripts"`` or ``"cells"``."""
    mode = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("mode")
    if mode == "spots":
        return "spots"
    if TRANSCRIPTS_KEY in sdata.points:
        return "transcripts"
    if "cells" in sdata.shapes and sdata.tables:
        return "cells"
    raise ValueError(f"No expression to sum into tiles: no table {TILES_TABLE_KEY!r}, no points "
                     f"{TRANSCRIPTS_KEY!r}, no cells and no spot tiles. Run dbk.pp.pseudobulk yourself, or use "
                     "model.predict for an H&E-only slide.")


def prepare_slide(
    sdata,
    *,
    tile_size_um: float,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    need_table: bool = True,
    name: str = "slide",
) -> list[str]:
    """Make a slide's tiles and, with ``need_table``, its pseudo-bulk table where they are missing.

    Tiles: a grid over tissue (:func:`dbk.pp.make_tiles`), or one tile per spot when the slide has spots and no
    transcripts. Expression (:func:`dbk.pp.pseudobulk`): from the transcripts, else the spots, else the cells.

    Parameters
    ----------
    sdata
        The slide (changed in place).
    tile_size_um
        Side of the tiles to make, in µm.
    tiles_key, table_key
        The tiles and their table.
    need_table
        Also make the pseudo-bulk table (``False`` for an H&E-only slide to predict on).
    name
        The slide's name, for the log.

    Returns
    -------
    One line per step done (empty when the slide had everything).
    """
    from ._pseudobulk import pseudobulk
    from ._tiles import make_tiles

    done = []
    if tiles_key not in sdata.shapes:
        spots = need_table and SPOTS_KEY in sdata.shapes and TRANSCRIPTS_KEY not in sdata.points
        mode = "spots" if spots else "grid"
        make_tiles(sdata, tile_size_um=tile_size_um, mode=mode, key_added=tiles_key)
        done.append(f"make_tiles({tile_size_um:g} µm, mode={mode!r}): {len(sdata.shapes[tiles_key])} tiles")
    if need_table and table_key not in sdata.tables:
        source = expression_source(sdata, tiles_key)
        pseudobulk(sdata, tiles_key=tiles_key, source=source, key_added=table_key)
        t = sdata.tables[table_key]
        done.append(f"pseudobulk(source={source!r}): {t.n_obs} tiles x {t.n_vars} genes")
    for d in done:
        logger.info(f"slide {name!r}: {d}.")
    return done


def tile_size_um(sdata, tiles_key: str = TILES_KEY) -> float | None:
    """Median side of a slide's tiles in µm (``None`` when the image has no pixel size)."""
    from .._image import get_pixel_size
    from ._tiles import tile_bounds

    image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key")
    try:
        px = get_pixel_size(sdata, image_key)
    except (ValueError, KeyError):
        return None
    b = tile_bounds(sdata, tiles_key)
    return float(np.median(b[:, 2] - b[:, 0])) * px if len(b) else None


def record_pixel_size(sdata, tiles_key: str = TILES_KEY, table_key: str = TILES_TABLE_KEY) -> float | None:
    """Write the tiles' level-0 pixel size (µm) into ``tables[table_key].uns["dbk"]["um_per_px"]``; return it.

    ``None`` (nothing written) when the image has no pixel size.
    """
    from .._image import get_pixel_size

    image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key")
    try:
        px = float(get_pixel_size(sdata, image_key))
    except (ValueError, KeyError):
        return None
    sdata.tables[table_key].uns.setdefault(UNS_KEY, {})[UM_PER_PX_KEY] = px
    return px


def check_training_table(sdata, name: str, tiles_key: str = TILES_KEY, table_key: str = TILES_TABLE_KEY) -> None:
    """Clear errors, before any training, for a tile table a model cannot learn from as it is.

    Gene names must be distinct strings, ``X`` finite, and every row must annotate one of the tiles.
    """
    import scipy.sparse as sp

    from .._genes import check_gene_names
    from ._tiles import table_rows_to_tiles

    a = sdata.tables[table_key]
    if a.n_vars == 0:
        raise ValueError(f"Slide {name!r} has no genes in table {table_key!r}; fit needs measured expression.")
    check_gene_names(a.var_names, f"table {table_key!r} of slide {name!r}")
    x = a.X.data if sp.issparse(a.X) else np.asarray(a.X)
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"Table {table_key!r} of slide {name!r}: X (the training targets) has "
                         f"{int((~np.isfinite(x)).sum())} NaN or infinite values; recompute it from finite counts "
                         "with dbk.pp.normalize.")
    table_rows_to_tiles(sdata, table_key, tiles_key, np.asarray(sdata.shapes[tiles_key].index))


def prepare_slides(
    data,
    *,
    tile_size_um: float,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    copy: bool = False,
) -> tuple[list, list[str]]:
    """Training slides for a model: ``(slides, names)``, each with tiles and a checked pseudo-bulk table.

    The first step of :func:`dbk.tl.fit_diffbulk`: :func:`prepare_slide` on each slide (tiles and the pseudo-bulk
    table where missing), then checks that each table can be learnt from (distinct gene names, finite ``X``, every
    row on a tile; a clear error naming the slide otherwise).

    Parameters
    ----------
    data
        A SpatialData, a non-empty list of them, or a ``{name: sdata}`` dict.
    tile_size_um
        Side in µm of the tiles made on slides without ``tiles_key``.
    tiles_key
        Shapes element with the tiles (made where missing).
    table_key
        The tile table (made by :func:`dbk.pp.pseudobulk` where missing).
    copy
        Work on copies of the slides and leave ``data`` untouched.

    Returns
    -------
    tuple[list, list[str]]
        The slides (``data``'s own, or their copies with ``copy=True``) and their names: the dict keys, else each
        slide's ``attrs["sample"]``, else a one-valued ``obs["sample"]`` of its table, else ``slide<i>`` (repeated
        names get their position appended).
    """
    from .._utils import copy_sdata

    slides, names = as_slides(data)
    if copy:
        slides = [copy_sdata(s) for s in slides]
    for sd, name in zip(slides, names, strict=True):
        prepare_slide(sd, tile_size_um=tile_size_um, tiles_key=tiles_key, table_key=table_key, name=name)
        check_training_table(sd, name, tiles_key, table_key)
    return slides, names


def train_view(sdata, split_key: str, tiles_key: str = TILES_KEY, table_key: str = TILES_TABLE_KEY):
    """A SpatialData of the slide's training tiles only; the slide is untouched.

    Its images, the tiles whose ``obs[split_key]`` is ``"train"`` (:func:`dbk.pp.spatial_blocks`) and their rows of
    the tile table (a copy).
    """
    import copy as _copy

    from spatialdata import SpatialData

    from .._utils import split_mask
    from ._tiles import table_rows_to_tiles

    table = sdata.tables[table_key]
    keep = split_mask(table, split_key, "train")
    tiles = sdata.shapes[tiles_key]
    pos = table_rows_to_tiles(sdata, table_key, tiles_key, np.asarray(tiles.index))
    sub_tiles = tiles.iloc[pos[keep]].copy()
    sub_tiles.attrs = _copy.deepcopy(tiles.attrs)  # the transformations and dbk's tile geometry
    return SpatialData(images=dict(sdata.images), shapes={tiles_key: sub_tiles}, tables={table_key: table[keep].copy()},
                       attrs=dict(sdata.attrs))
