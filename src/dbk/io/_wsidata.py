"""LazySlide's slides: a ``wsidata.WSIData`` read as a dbk slide, and dbk's results written back as its tables.

LazySlide (scverse) opens a whole-slide image as a :class:`wsidata.WSIData`, a SpatialData whose pixels stay in the
slide file and are read through the WSIData's reader; ``zs.pp.tile_tissues`` lays its tiles (``wsi["tiles"]``,
square polygons in level-0 pixels, one ``tile_id`` each) and ``zs.tl.feature_extraction`` writes feature tables
``wsi["{model}_{tiles}"]`` (tiles x features, annotating the tiles). :func:`dbk.pp.from_wsidata` gives dbk's
view of such a slide from the pieces here (the H&E read lazily through the same reader, the tiles' boxes);
:func:`wsidata_table` writes dbk's predictions back as a table of the same form as LazySlide's, so
``zs.pl.tiles(wsi, feature_key="dbk_pred", color=gene)`` and spatialdata-plot draw them. The ``lazyslide`` extra
installs both packages; nothing here imports them before a WSIData is handed over.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import UNS_KEY

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

LAZYSLIDE_TILES_KEY = "tiles"  # zs.pp.tile_tissues' default key_added
WRITTEN_BY = "written_by"  # table.uns["dbk"][...]: "dbk" on the tables dbk wrote into a WSIData


def is_wsidata(obj: Any) -> bool:
    """Whether ``obj`` is a ``wsidata.WSIData`` (LazySlide's slide), without importing wsidata."""
    return any(c.__name__ == "WSIData" and c.__module__.split(".")[0] == "wsidata" for c in type(obj).__mro__)


def wsidata_name(wsi) -> str:
    """The slide's name: its file name without the extension (LazySlide's ``wsi.name`` keeps it)."""
    try:
        return Path(str(wsi.reader.file)).stem or "slide"
    except Exception:  # a WSIData without a reader file (e.g. opened from a SpatialData image)
        return "slide"


def wsidata_pixel_size(wsi) -> float:
    """The level-0 pixel size of a WSIData in µm, or a ValueError saying how to set it."""
    mpp = getattr(wsi.properties, "mpp", None)
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"WSIData {wsidata_name(wsi)!r} has no pixel size (wsi.properties.mpp is {mpp!r}); dbk "
                         "needs it to size tiles in µm. Set it with wsi.set_mpp(<µm per pixel>) if you know it.")
    return value


def wsidata_tiles(wsi, tiles_key: str) -> pd.DataFrame:
    """The tiles of ``wsi.shapes[tiles_key]`` as level-0 pixel bounds ``x0, y0, x1, y1``, indexed by their ``tile_id``.

    Refuses tiles that are not squares (more than a pixel apart) or whose ids repeat, naming them.
    """
    if tiles_key not in wsi.shapes:
        raise KeyError(f"No tiles {tiles_key!r} in WSIData {wsidata_name(wsi)!r} (shapes: {list(wsi.shapes)}); lay "
                       "them with LazySlide first: zs.pp.find_tissues(wsi); zs.pp.tile_tissues(wsi, 224, mpp=0.5).")
    gdf = wsi.shapes[tiles_key]
    ids = pd.Index(gdf["tile_id"].to_numpy() if "tile_id" in gdf.columns else np.asarray(gdf.index), name=None)
    if ids.has_duplicates:
        raise ValueError(f"Tiles {tiles_key!r} of WSIData {wsidata_name(wsi)!r} repeat tile ids "
                         f"{ids[ids.duplicated()].unique()[:5].tolist()}; each tile needs its own id.")
    b = np.rint(gdf.geometry.bounds.to_numpy(dtype=np.float64))
    if not np.isfinite(b).all():
        raise ValueError(f"Tiles {tiles_key!r} of WSIData {wsidata_name(wsi)!r} have empty or non-finite geometries.")
    b = b.astype(np.int64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    bad = np.abs(w - h) > 1
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{int(bad.sum())} of the {len(b)} tiles {tiles_key!r} of WSIData {wsidata_name(wsi)!r} are "
                         f"not square (tile {ids[i]!r}: {int(w[i])} x {int(h[i])} px); dbk reads square tiles: tile "
                         "again with zs.pp.tile_tissues(wsi, tile_px, mpp=...) (one tile_px is a square).")
    return pd.DataFrame(b, columns=["x0", "y0", "x1", "y1"], index=ids)


def wsidata_table_rows(wsi, key: str, tiles_key: str, tile_ids, *, what: str, remedy: str) -> np.ndarray:
    """For each of ``tile_ids``, its row in the WSIData's table ``key``, which must annotate the tiles ``tiles_key``.

    As LazySlide's tables do: spatialdata's ``region`` names the tiles and the ``instance_key`` column holds their
    ``tile_id``. A table that does not, repeats a tile or lacks one is refused (ValueError naming ``what`` and
    ``key``, then ``remedy``).
    """
    name = wsidata_name(wsi)
    table = wsi.tables[key]
    attrs = table.uns.get("spatialdata_attrs", {})
    region, inst_key = attrs.get("region"), attrs.get("instance_key")
    regions = [region] if isinstance(region, str) else list(region or [])
    if tiles_key not in regions or inst_key not in table.obs:
        raise ValueError(f"{what} {key!r} of WSIData {name!r} does not annotate the tiles {tiles_key!r} (its region: "
                         f"{regions}, instance key: {inst_key!r}); {remedy}")
    pos = np.arange(table.n_obs)
    if len(regions) > 1:
        pos = np.flatnonzero((table.obs[attrs["region_key"]].astype(str) == tiles_key).to_numpy())
    inst = pd.Index(table.obs[inst_key].to_numpy()[pos])
    if inst.has_duplicates:
        raise ValueError(f"{what} {key!r} of WSIData {name!r} has several rows for tiles "
                         f"{inst[inst.duplicated()].unique()[:5].tolist()}; each tile needs one.")
    found = inst.get_indexer(pd.Index(tile_ids))
    if (found < 0).any():
        missing = pd.Index(tile_ids)[found < 0]
        raise ValueError(f"{len(missing)} of the {len(found)} tiles {tiles_key!r} have no row in {what.lower()} "
                         f"{key!r} of WSIData {name!r} (e.g. tile ids {missing[:5].tolist()}); {remedy}")
    return pos[found]


class WSIRegion:
    """Read a ``(c, y, x)`` region of one pyramid level straight from a WSIData's reader (dbk's direct tile reads).

    The reader pickles without its open file and reopens it where it is unpickled (DataLoader workers).
    """

    def __init__(self, reader, level: int) -> None:
        self.reader, self.level = reader, int(level)
        self.downsample = float(reader.properties.level_downsample[self.level])

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The level's pixels ``[y0:y1, x0:x1]`` (level coordinates, inside the level) as ``(c, y, x)`` uint8."""
        if y1 <= y0 or x1 <= x0:
            return np.zeros((3, max(y1 - y0, 0), max(x1 - x0, 0)), dtype=np.uint8)
        ds = self.downsample  # readers take level-0 offsets; ceil lands on the first level-0 pixel of the region
        img = self.reader.get_region(math.ceil(x0 * ds), math.ceil(y0 * ds), x1 - x0, y1 - y0, level=self.level)
        return np.asarray(img).transpose(2, 0, 1)


def wsidata_image(wsi, *, source: str = "WSIData"):
    """The WSIData's slide as a lazy dbk image element (:func:`dbk.io.image_element`), read through its reader."""
    from wsidata.reader import to_datatree

    from ._image import image_element
    from ._tiff import register_direct

    tree = to_datatree(wsi.reader)
    names = sorted(tree.children, key=lambda s: int(s.removeprefix("scale")))
    levels = [tree[n]["image"].data for n in names]
    element = image_element(levels, source=source)
    kept = [element] if not hasattr(element, "children") else [element[f"scale{i}"]["image"]
                                                                for i in range(len(element.children))]
    for i, (arr, level) in enumerate(zip(kept, levels, strict=False)):
        if getattr(arr.data, "name", None) == level.name:  # the reader's own level (not resampled nor padded)
            # held weakly: the level's dask graph reads through wsi.reader, so it lives as long as the level
            register_direct(level.name, wsi.reader, partial(WSIRegion, level=i))
    return element


def wsidata_table(wsi, values: pd.DataFrame, *, tiles_key: str, key: str, tile_ids, uns: dict | None = None,
                  var: pd.DataFrame | None = None) -> ad.AnnData:
    """Write ``values`` (one row per tile, in ``tile_ids`` order) into ``wsi.tables[key]`` as LazySlide writes features.

    The table annotates ``tiles_key`` exactly as ``zs.tl.feature_extraction``'s (``wsidata.io.add_features``:
    ``obs`` ``tile_id`` and ``library_id``), so LazySlide and spatialdata-plot draw its columns. It carries
    ``uns["dbk"]["written_by"] = "dbk"``; a table of that name that dbk did not write is never replaced (ValueError).
    """
    from wsidata.io import add_features

    if key in wsi.tables and (wsi.tables[key].uns.get(UNS_KEY) or {}).get(WRITTEN_BY) != "dbk":
        raise ValueError(f"WSIData {wsidata_name(wsi)!r} already has a table {key!r} that dbk did not write; dbk "
                         "does not replace it: pass another key_added.")
    gdf = wsi.shapes[tiles_key]
    ids = gdf["tile_id"].to_numpy() if "tile_id" in gdf.columns else np.asarray(gdf.index)
    pos = pd.Index(np.asarray(tile_ids)).get_indexer(ids)
    if (pos < 0).any():
        raise ValueError(f"{int((pos < 0).sum())} tiles of {tiles_key!r} have no value to write into {key!r}.")
    x = np.asarray(values.to_numpy()[pos], dtype=np.float32)
    add_features(wsi, key=key, tile_key=tiles_key, features=x,
                 var=var if var is not None else pd.DataFrame(index=pd.Index([str(c) for c in values.columns])))
    table = wsi.tables[key]
    table.uns[UNS_KEY] = {**(uns or {}), WRITTEN_BY: "dbk"}
    return table
