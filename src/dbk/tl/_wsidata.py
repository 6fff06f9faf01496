"""DiffBulk on LazySlide's slides: predictions on a ``wsidata.WSIData`` and fits on WSIData with expression.

The WSIData is read as a dbk slide by :func:`dbk.pp.from_wsidata` (pixels through its own reader, nothing copied from
the file); dbk works on that view, and what it writes back into the WSIData is one table per call, in LazySlide's
form (:func:`dbk.io._wsidata.wsidata_table`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from .._constants import CV_PEARSON_KEY, CV_TRUSTED_KEY, TILES_KEY, TILES_TABLE_KEY, UNS_KEY
from .._logging import logger
from ..io._wsidata import (
    LAZYSLIDE_TILES_KEY,
    is_wsidata,
    wsidata_name,
    wsidata_table,
    wsidata_table_rows,
)
from ..pp._wsidata import from_wsidata

TILE_SIZE_TOLERANCE = 0.02  # tiles more than 2% off the model's tile side are refused


def wsidata_tiles_key(wsi, tiles_key: str) -> str:
    """``tiles_key``, or LazySlide's ``"tiles"`` when dbk's default was left and the WSIData has no such element."""
    if tiles_key == TILES_KEY and TILES_KEY not in wsi.shapes and LAZYSLIDE_TILES_KEY in wsi.shapes:
        return LAZYSLIDE_TILES_KEY
    return tiles_key


def check_wsidata_tile_size(view, tiles_key: str, tile_size_um: float) -> None:
    """Refuse tiles whose side is not ``tile_size_um`` (within 2%), with the LazySlide call that makes matching ones.

    ``view`` is the WSIData's :func:`from_wsidata` view; ``tiles_key`` names the WSIData's tiles in the message.
    """
    px = float(view.attrs["wsidata"]["um_per_px"])
    side = view.shapes[TILES_KEY].attrs["dbk"]["tile_size_px"]  # the median side, as from_wsidata measured it
    if not len(view.shapes[TILES_KEY]):
        raise ValueError(f"WSIData {view.attrs['sample']!r} has no tiles in {tiles_key!r}.")
    um = side * px
    if abs(um / tile_size_um - 1) > TILE_SIZE_TOLERANCE:
        tile_px = round(tile_size_um / px)
        raise ValueError(
            f"The tiles {tiles_key!r} of WSIData {view.attrs['sample']!r} are {um:.1f} µm ({side:g} px at {px:g} "
            f"µm/px); the model was trained on {tile_size_um:g} µm tiles and learned nothing about other sizes. Tile "
            f"again at its size: zs.pp.tile_tissues(wsi, {tile_px}, mpp={px:g}, key_added='tiles_{tile_size_um:g}um'"
            f"), then pass tiles_key='tiles_{tile_size_um:g}um'.")


def feature_table(wsi, features_key: str, tiles_key: str, tile_ids: pd.Index, width: int) -> tuple[np.ndarray, str]:
    """The rows of LazySlide feature table ``features_key`` for ``tile_ids``, and the table's name.

    Checked: the table annotates the tiles and has ``width`` columns.
    """
    names = [features_key, f"{features_key}_{tiles_key}"]
    key = next((k for k in names if k in wsi.tables), None)
    if key is None:
        raise KeyError(f"No feature table {names[1]!r} (or {names[0]!r}) in WSIData {wsidata_name(wsi)!r}; tables: "
                       f"{list(wsi.tables)}. Make one with zs.tl.feature_extraction(wsi, {features_key!r}).")
    table = wsi.tables[key]
    rows = wsidata_table_rows(wsi, key, tiles_key, tile_ids, what="Feature table",
                              remedy=f"extract features on these tiles: zs.tl.feature_extraction(wsi, ..., "
                                     f"tile_key={tiles_key!r}).")
    x = table.X[rows]
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
    if x.shape[1] != width:
        raise ValueError(f"Feature table {key!r} has {x.shape[1]} features per tile; the model's foundation model "
                         f"gives {width}: these are another model's features.")
    return x, key


def predict_wsidata(model, wsi, *, tiles_key: str, key_added: str, features_key: str | None, batch_size: int,
                    copy: bool):
    """:meth:`DiffBulk.predict` on a WSIData (see there): the predictions written as ``f"{key_added}_{tiles_key}"``."""
    from ..pp._tile_table import empty_tile_table

    tiles_key = wsidata_tiles_key(wsi, tiles_key)
    view = from_wsidata(wsi, tiles_key=tiles_key)  # reads nothing yet; the WSIData is not changed
    check_wsidata_tile_size(view, tiles_key, model.tile_size_um)
    target = copy_wsidata(wsi) if copy else wsi  # where the table goes; the view reads through the same reader
    out_key = f"{key_added}_{tiles_key}"
    name = str(view.attrs["sample"])
    adata = empty_tile_table(view, TILES_KEY, TILES_TABLE_KEY)
    fm_source = None
    if features_key is not None:
        width = int(model.config["fm"]["dim"])
        x, key = feature_table(wsi, features_key, tiles_key, pd.Index(adata.obs["instance_id"]), width)
        adata.obsm[model.fm_key] = x
        fm_source = {"source": "user-supplied", "table": key, "note": "a LazySlide feature table: its model and "
                     "preprocessing are taken to be the model's foundation model's (dbk checked the width only)"}
        logger.info(f"predict: FM embeddings from WSIData table {key!r} ({x.shape[1]} features per tile), taken as "
                    f"the model's {model.fm_id!r} features: dbk cannot check their weights or preprocessing.")
    df = model._predict_slide(view, name, tiles_key=TILES_KEY, table_key=TILES_TABLE_KEY, key_added=key_added,
                              batch_size=batch_size, fm_source=fm_source)
    adata = view.tables[TILES_TABLE_KEY]
    tile_ids = pd.Index(adata.obs["instance_id"].to_numpy())
    record = dict(adata.uns[UNS_KEY]["predict"]) | {"wsidata_tiles_key": tiles_key}
    wsidata_table(target, df, tiles_key=tiles_key, key=out_key, tile_ids=tile_ids, uns={"predict": record},
                  var=gene_var(model))
    df.index = pd.Index([str(i) for i in tile_ids])  # LazySlide's tables name their rows by tile_id
    logger.info(f"predict: {df.shape[0]} tiles x {df.shape[1]} genes -> WSIData table {out_key!r} (draw one with "
                f"zs.pl.tiles(wsi, feature_key={key_added!r}, tile_key={tiles_key!r}, color=gene)).")
    return target if copy else df


def gene_var(model) -> pd.DataFrame:
    """``var`` of a predictions table: the genes, with the model's CV score and trust flag when it has them."""
    var = pd.DataFrame(index=pd.Index([str(g) for g in model.genes]))
    cv = model.cv_pearson
    if cv is not None:
        var[CV_PEARSON_KEY] = np.asarray(cv.to_numpy(), dtype=np.float64)
        trusted = model.cv_trusted
        if trusted is not None:
            var[CV_TRUSTED_KEY] = np.asarray(trusted.to_numpy(), dtype=bool)
    return var


def copy_wsidata(wsi):
    """A copy of a WSIData for ``copy=True``.

    Its elements are copied as :func:`dbk._utils.copy_sdata` does; its reader is shared (dbk only reads through it).
    """
    from wsidata import WSIData

    from .._utils import copy_sdata

    return WSIData.from_spatialdata(copy_sdata(wsi), reader=wsi.reader)


def wsidata_views(data, *, tiles_key: str, table_key: str):
    """The slides of ``fit_diffbulk``'s ``data`` with each WSIData replaced by its :func:`from_wsidata` view.

    Returns ``(data, back)``: ``data`` of the same shape (one slide, a list, a dict), and ``back``: ``[(view, wsi,
    tiles_key), ...]`` for writing the fit's predictions into the WSIData. SpatialData and WSIData cannot be mixed in
    one call (their tiles and tables are named differently).
    """
    if is_wsidata(data):
        items, shape = [(None, data)], "one"
    elif isinstance(data, Mapping):
        items, shape = list(data.items()), "dict"
    elif isinstance(data, (list, tuple)):
        items, shape = list(enumerate(data)), "list"
    else:
        return data, []
    kinds = {is_wsidata(v) for _, v in items}
    if kinds == {False}:
        return data, []
    if len(kinds) > 1:
        raise TypeError("fit_diffbulk takes SpatialData slides or LazySlide WSIData slides, not both in one call "
                        "(their tiles and tables are named differently): read the WSIData with "
                        "dbk.io.from_wsidata(wsi, table_key=...) to mix them.")
    back, views = [], []
    for name, wsi in items:
        tk = wsidata_tiles_key(wsi, tiles_key)
        if table_key not in wsi.tables:
            raise KeyError(f"WSIData {wsidata_name(wsi)!r} has no expression table {table_key!r} (tables: "
                           f"{list(wsi.tables)}); fitting needs one: pass table_key= the table of raw counts per tile "
                           f"(tiles x genes) annotating {tk!r}.")
        view = from_wsidata(wsi, tiles_key=tk, table_key=table_key,
                            sample=None if name is None or isinstance(name, int) else str(name))
        views.append((name, view))
        back.append((view, wsi, tk))
    if shape == "one":
        return views[0][1], back
    if shape == "dict":
        return {k: v for k, v in views}, back
    return [v for _, v in views], back


def write_fit_back(back, *, key_added: str, model) -> None:
    """Write the fit's predictions of each WSIData's tiles as its table ``f"{key_added}_{tiles_key}"``.

    They are ``obsm[key_added]`` of its view; the table gets the fit's record.
    """
    from .._utils import jsonable

    for view, wsi, tk in back:
        adata = view.tables[TILES_TABLE_KEY]
        if key_added not in adata.obsm:
            continue
        tile_ids = pd.Index(adata.obs["instance_id"].to_numpy())
        record = jsonable({k: v for k, v in (adata.uns.get(key_added) or {}).items() if k in ("params", "fit_id")})
        wsidata_table(wsi, adata.obsm[key_added], tiles_key=tk, key=f"{key_added}_{tk}", tile_ids=tile_ids,
                      uns={"fit": record, "in_sample": True}, var=gene_var(model))
        logger.info(f"fit_diffbulk: training predictions of WSIData {wsidata_name(wsi)!r} -> table "
                    f"{key_added}_{tk!s} (in-sample).")
