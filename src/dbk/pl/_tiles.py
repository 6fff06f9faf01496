"""Tiles over the H&E, coloured by any column of the tile table."""

from __future__ import annotations

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import TILES_KEY, TILES_TABLE_KEY
from .._image import thumbnail
from ..pp._tiles import tile_bounds
from ._utils import finish, new_axes, plot_docs, zoom_to_tiles


@plot_docs
def tiles(
    sdata: SpatialData,
    color: str | None = None,
    *,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    image_key: str | None = None,
    layer: str | None = None,
    cmap: str = "viridis",
    alpha: float = 0.6,
    ax=None,
    show: bool | None = None,
    return_fig: bool = False,
    save: str | None = None,
):
    """Draw the tiles over the H&E, filled by an ``obs`` column or a gene of the tile table, or as outlines.

    Parameters
    ----------
    sdata
        SpatialData with the image and tiles.
    color
        An ``obs`` column (numeric or categorical) or a gene of ``sdata.tables[table_key]``; outlines only when
        ``None``.
    tiles_key
        Shapes element with the tiles.
    table_key
        Tile table (for ``color``).
    image_key
        The H&E image; the only image when ``None``.
    layer
        Layer to read gene values from (``X`` when ``None``).
    cmap
        Colour map for numeric values.
    alpha
        Opacity of the tile fill.
    {plot_params}

    {plot_returns}
    """
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    img, ds = thumbnail(sdata, image_key)
    b = tile_bounds(sdata, tiles_key) / ds
    fig, (axis,) = new_axes(ax, 1, size=6)
    axis.imshow(img)
    rects = [Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in b]
    if color is None:
        pc = PatchCollection(rects, facecolor="none", edgecolor="black", linewidth=0.5)
        axis.add_collection(pc)
        axis.set_title(f"{len(rects)} tiles")
    else:
        values, label = _tile_values(sdata, color, table_key, tiles_key, layer)
        if isinstance(values.dtype, pd.CategoricalDtype) or values.dtype == object:
            from matplotlib.patches import Patch

            cat = pd.Categorical(values)
            palette = _palette(len(cat.categories))
            colors = [palette[i] if i >= 0 else _NA_COLOR for i in cat.codes]
            pc = PatchCollection(rects, facecolor=colors, edgecolor="none", alpha=alpha)
            axis.add_collection(pc)
            handles = [Patch(color=palette[i], label=str(c)) for i, c in enumerate(cat.categories)]
            if (cat.codes < 0).any():
                handles.append(Patch(color=_NA_COLOR, label="NA"))
            axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        else:
            pc = PatchCollection(rects, cmap=cmap, edgecolor="none", alpha=alpha)
            pc.set_array(np.asarray(values, dtype=float))
            axis.add_collection(pc)
            fig.colorbar(pc, ax=axis, shrink=0.7, label=label)
        axis.set_title(label)
    zoom_to_tiles(axis, b, img.shape[:2])
    axis.set_axis_off()
    return finish(fig, [axis], name="tiles", ax=ax, show=show, return_fig=return_fig, save=save)


_NA_COLOR = "lightgray"


def _palette(n: int) -> list:
    """Distinct colours that stand out on pink and purple H&E: tab10, then tab20, then a resampled rainbow."""
    import matplotlib as mpl

    if n <= 10:
        return [mpl.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [mpl.colormaps["tab20"](i) for i in range(n)]
    cmap = mpl.colormaps["gist_rainbow"].resampled(n)
    return [cmap(i) for i in range(n)]


def _tile_values(sdata, color, table_key, tiles_key, layer):
    if table_key in sdata.tables:
        adata = sdata.tables[table_key]
        if color in adata.obs.columns:
            return _align(adata, adata.obs[color], tiles_key, sdata), color
        if color in adata.var_names:
            x = adata[:, color].layers[layer] if layer else adata[:, color].X
            x = np.asarray(x.toarray() if hasattr(x, "toarray") else x).ravel()
            return _align(adata, pd.Series(x, index=adata.obs_names), tiles_key, sdata), color
    gdf = sdata.shapes[tiles_key]
    if color in gdf.columns:
        return gdf[color], color
    raise KeyError(f"{color!r} is neither a column of the tiles {tiles_key!r}, nor an obs column or gene of "
                   f"table {table_key!r}.")


def _align(adata, series: pd.Series, tiles_key, sdata) -> pd.Series:
    """Values in the order of the tiles (the table may hold a subset or another order)."""
    inst = adata.obs["instance_id"].to_numpy() if "instance_id" in adata.obs else np.arange(adata.n_obs)
    s = pd.Series(series.to_numpy(), index=inst)
    out = s.reindex(sdata.shapes[tiles_key].index)
    if isinstance(series.dtype, pd.CategoricalDtype):
        out = out.astype(series.dtype)
    return out
