"""Spatial context of tile features: each tile's features beside their mean over the tiles around it."""

from __future__ import annotations

import numbers

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._constants import SAMPLE_COL, SPATIAL_KEY, UM_PER_PX_KEY, UNS_KEY
from .._logging import logger
from .._utils import renamed_kwargs


def neighbor_mean(coords: np.ndarray, x: np.ndarray, radius: float, groups: np.ndarray | None = None) -> np.ndarray:
    """Mean of ``x`` over the tiles whose centre lies within ``radius`` of each tile's (itself included).

    Parameters
    ----------
    coords
        Tile centres, (n, 2), in the unit of ``radius``.
    x
        Features, (n, d).
    radius
        Neighbourhood radius (a tile always counts itself, so ``radius=0`` returns ``x``).
    groups
        Slide of each tile: neighbours are only taken within the same slide.

    Returns
    -------
    (n, d) float64 array.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, np.float64)
    x = np.asarray(x, np.float64)
    n = len(x)
    if coords.shape != (n, 2):
        raise ValueError(f"coords must be (n_tiles, 2) = ({n}, 2), got {coords.shape}.")
    if not np.isfinite(coords).all():
        raise ValueError("Tile coordinates have non-finite values.")
    if not (np.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be a number >= 0, got {radius!r}.")
    groups = np.zeros(n, int) if groups is None else np.asarray(groups)
    out = np.empty_like(x)
    for g in pd.unique(groups):
        idx = np.flatnonzero(groups == g)
        pairs = cKDTree(coords[idx]).query_pairs(float(radius), output_type="ndarray")
        i = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(len(idx))])
        j = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(len(idx))])
        adj = sp.csr_matrix((np.ones(len(i)), (i, j)), shape=(len(idx), len(idx)))
        out[idx] = (adj @ x[idx]) / np.asarray(adj.sum(axis=1))
    return out


#: ``obsm`` key of tile centres in µm that a tile table may carry itself (where its image is not the tissue's layout,
#: e.g. HEST-Benchmark patches laid out in a mosaic: :meth:`dbk.datasets.HestBenchTask.to_spatialdata`)
SPATIAL_UM_KEY = "spatial_um"


def tile_coords_um(adata: ad.AnnData, pixel_size_um: float | None = None) -> np.ndarray:
    """Tile centres in µm: ``obsm["spatial"]`` (level-0 pixels) times the pixel size (given, or ``uns["dbk"]``).

    A table with its own centres in µm, ``obsm["spatial_um"]``, gives those instead (every spatial-context
    computation of dbk goes through here); NaN there means the positions are unknown, a ``ValueError``.
    """
    if SPATIAL_UM_KEY in adata.obsm:
        xy = np.asarray(adata.obsm[SPATIAL_UM_KEY], np.float64)
        if xy.shape != (adata.n_obs, 2):
            raise ValueError(f"obsm[{SPATIAL_UM_KEY!r}] must be (n_tiles, 2) = ({adata.n_obs}, 2), got {xy.shape}.")
        bad = ~np.isfinite(xy).all(axis=1)
        if bad.any():
            raise ValueError(f"The positions in µm of {int(bad.sum())} of the {adata.n_obs} tiles are unknown (NaN in "
                             f"obsm[{SPATIAL_UM_KEY!r}], e.g. patches whose slide's pixel size is unknown): no "
                             "spatial context for them.")
        return xy
    if SPATIAL_KEY not in adata.obsm:
        raise KeyError(f"The tile table has no obsm[{SPATIAL_KEY!r}] (tile centres); it comes from dbk.pp.pseudobulk "
                       "or DiffBulk.predict.")
    if pixel_size_um is None:
        pixel_size_um = adata.uns.get(UNS_KEY, {}).get(UM_PER_PX_KEY)
    if pixel_size_um is None:
        raise ValueError(f"The pixel size of the tile table is unknown: pass pixel_size_um, or set "
                         f"adata.uns[{UNS_KEY!r}][{UM_PER_PX_KEY!r}] (DiffBulk.predict on a SpatialData writes it).")
    pixel_size_um = float(pixel_size_um)
    if not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}.")
    return np.asarray(adata.obsm[SPATIAL_KEY], np.float64) * pixel_size_um


def _groups(adata: ad.AnnData, groups: str | None) -> np.ndarray | None:
    """Each tile's slide from ``obs[groups]``; ``None`` (one slide) when there is no such column."""
    return adata.obs[groups].astype(str).to_numpy() if groups is not None and groups in adata.obs else None


def with_context(adata: ad.AnnData, x: np.ndarray, context_um: float, *, pixel_size_um: float | None = None,
                 groups: str | None = SAMPLE_COL) -> np.ndarray:
    """``[x, neighbour mean of x]`` for the tiles of ``adata`` (the mean within ``context_um``, per slide)."""
    return context_features(tile_coords_um(adata, pixel_size_um), x, context_um, _groups(adata, groups))


def context_features(coords_um: np.ndarray, x: np.ndarray, context_um: float,
                     groups: np.ndarray | None = None) -> np.ndarray:
    """``[x, neighbour mean of x within context_um]`` (float64) for tiles centred at ``coords_um`` (µm), per group.

    The one computation of spatial context, at fit (:func:`dbk.tl.fit_diffbulk` on its training table) and at
    predict (:meth:`dbk.tl.DiffBulk.predict`, :func:`spatial_context`).
    """
    return np.hstack([np.asarray(x, np.float64), neighbor_mean(coords_um, x, context_um, groups)])


@renamed_kwargs(radius_um="context_um", um_per_px="pixel_size_um")
def spatial_context(
    adata: ad.AnnData,
    *,
    use_rep: str,
    context_um: float = 300.0,
    pixel_size_um: float | None = None,
    groups: str | None = SAMPLE_COL,
    key_added: str | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Add spatial context to tile features: each tile's features, then their mean over the tiles around it.

    Expression is spatially smooth and one tile's image is a noisy view of its tissue; the mean of the features
    over the neighbouring tiles (a disc of radius ``context_um`` around the tile centre, the tile itself included,
    within the same slide) gives a regressor the neighbourhood too. On her2st (spots on a 200 µm pitch) 300 µm is the
    tile and its 8 nearest spots. ``DiffBulk`` does the same to its FM and diffusion features with
    ``fit_diffbulk(..., context_um=...)``.

    Parameters
    ----------
    adata
        Tile table with the features ``obsm[use_rep]`` and tile centres ``obsm["spatial"]`` (level-0 pixels).
    use_rep
        The features' ``obsm`` key.
    context_um
        Radius of the neighbourhood in µm (as ``fit_diffbulk(..., context_um=)``).
    pixel_size_um
        Pixel size (µm) of ``obsm["spatial"]``; default ``adata.uns["dbk"]["um_per_px"]``.
    groups
        ``obs`` column naming each tile's slide (neighbours never cross slides); ``None`` or a missing column: one
        slide.
    key_added
        ``obsm`` key of the result; default ``f"{use_rep}_ctx"``.
    copy
        Return a modified copy instead of changing ``adata`` in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``obsm[key_added]``: (tiles, 2 x features), the features then
    their neighbourhood mean.

    Examples
    --------
    >>> dbk.tl.spatial_context(adata, use_rep="X_efficientnet_lite0", context_um=300)  # doctest: +SKIP
    >>> dbk.tl.fit_baseline(adata, "ridge_cv", use_rep="X_efficientnet_lite0_ctx", rank="auto")  # doctest: +SKIP
    """
    if use_rep not in adata.obsm:
        raise KeyError(f"No features adata.obsm[{use_rep!r}] (obsm keys: {list(adata.obsm)}).")
    if not (isinstance(context_um, numbers.Real) and np.isfinite(context_um) and context_um >= 0):
        raise ValueError(f"context_um must be a radius in µm >= 0, got {context_um!r}.")
    x = adata.obsm[use_rep]
    x = np.asarray(x.to_numpy() if isinstance(x, pd.DataFrame) else x, np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"obsm[{use_rep!r}] must be a finite 2-D array, got shape {x.shape}.")
    out = with_context(adata, x, context_um, pixel_size_um=pixel_size_um, groups=groups)
    if copy:
        adata = adata.copy()
    key = key_added or f"{use_rep}_ctx"
    adata.obsm[key] = out.astype(np.float32)
    logger.info(f"spatial_context: {adata.n_obs} tiles x {out.shape[1]} ({use_rep} and its mean within "
                f"{context_um:g} µm) -> obsm[{key!r}].")
    return adata if copy else None


def tile_spacing_um(coords_um: np.ndarray, groups: np.ndarray | None = None) -> float | None:
    """Median distance (µm) from each tile centre to its nearest neighbour on the same slide (``groups``).

    ``None`` when no slide has two tiles with finite, distinct centres.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(coords_um, np.float64)
    groups = np.zeros(len(xy), int) if groups is None else np.asarray(groups)
    dists = []
    for g in pd.unique(groups):
        pts = xy[groups == g]
        pts = pts[np.isfinite(pts).all(axis=1)]
        if len(pts) >= 2:
            d, _ = cKDTree(pts).query(pts, k=2)
            dists.append(d[:, 1])
    d = np.concatenate(dists) if dists else np.zeros(0)
    d = d[np.isfinite(d) & (d > 0)]
    return float(np.median(d)) if len(d) else None
