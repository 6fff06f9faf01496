"""Train and test on one slide: whole spatial blocks of tiles, with a buffer so neighbours do not leak."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .._constants import SAMPLE_COL, SPATIAL_KEY, TILES_TABLE_KEY, UM_PER_PX_KEY, UNS_KEY
from .._image import get_pixel_size
from .._logging import logger
from .._utils import check_random_state, copy_sdata, is_sdata

SPLIT_KEY = "dbk_split"
LABELS = ("train", "test", "buffer")


def spatial_blocks(
    data,
    *,
    n_blocks: int | tuple[int, int] = 16,
    test_fraction: float = 0.2,
    buffer_um: float = 0.0,
    random_state: int | None = None,
    key_added: str = SPLIT_KEY,
    table_key: str = TILES_TABLE_KEY,
    groupby: str | None = SAMPLE_COL,
    copy: bool = False,
):
    """Split the tiles of one slide into spatial blocks, whole blocks to ``"train"`` or ``"test"``.

    Neighbouring tiles look alike and share expression, so a random split of one slide's tiles leaks: a test tile's
    neighbours are in the training set. Here a grid of ``n_blocks`` rectangular blocks is laid over the tile centres;
    every tile takes its block's label, blocks are drawn at random (seeded) for ``"test"`` until their tiles come
    closest to ``test_fraction`` of the tiles, and the others are ``"train"``. With ``buffer_um``, training tiles
    whose centre lies within that distance of a test tile's centre become ``"buffer"`` (used for neither), so no
    training tile touches the test blocks. Each slide (``obs[groupby]``) is split on its own.

    Parameters
    ----------
    data
        SpatialData with the tile table ``table_key`` (:func:`dbk.pp.pseudobulk` or any table with
        ``obsm["spatial"]`` tile centres in level-0 pixels), or that AnnData.
    n_blocks
        Number of blocks: an int (laid out as a grid shaped like the tiles' extent, e.g. 16 -> 4 x 4 on a square
        slide) or ``(n_rows, n_cols)``. At least two blocks must hold tiles.
    test_fraction
        Share of the tiles wanted in ``"test"``, in ``(0, 1)``; the actual share depends on the blocks' sizes (at
        least one block is test and one train) and is logged and recorded.
    buffer_um
        Training tiles with a centre within this distance (µm, inclusive) of a test tile's centre become
        ``"buffer"``. On a grid of tiles of side ``s``: ``s`` drops the training tiles sharing an edge with a test
        tile, ``1.5 * s`` those sharing a corner too; for spatial context features use at least their radius
        (``context_um``) plus a tile. Needs the pixel size: ``uns["dbk"]["um_per_px"]`` of the table (written by
        :func:`dbk.pp.pseudobulk`), else the image's.
    random_state
        Seed of the block draw; ``dbk.settings.seed`` when ``None``.
    key_added
        ``obs`` column written: categorical ``"train"`` / ``"test"`` / ``"buffer"``; the block of each tile goes to
        ``obs[f"{key_added}_block"]`` (an int, unique over the slides: e.g. for grouped cross-validation).
    table_key
        The tile table of a SpatialData.
    groupby
        ``obs`` column naming the slide (tiles of several slides are split slide by slide); ``None`` or a missing
        column: all tiles together.
    copy
        Return a modified copy instead of changing ``data`` in place.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``obs[key_added]``, ``obs[f"{key_added}_block"]`` and
    ``uns["dbk"]["spatial_blocks"]`` (the parameters, the grid and the shares of train / test / buffer tiles).

    Examples
    --------
    >>> import dbk
    >>> sdata = dbk.datasets.synthetic(shape=(1024, 1024))
    >>> dbk.pp.make_tiles(sdata, tile_size_um=56)
    >>> dbk.pp.pseudobulk(sdata, source="cells")
    >>> dbk.pp.spatial_blocks(sdata, n_blocks=9, test_fraction=0.25, buffer_um=56, random_state=0)
    >>> table = sdata.tables["dbk_table"]
    >>> train = table[table.obs["dbk_split"] == "train"]
    >>> test = table[table.obs["dbk_split"] == "test"]
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    if not (np.isfinite(buffer_um) and buffer_um >= 0):
        raise ValueError(f"buffer_um must be a number >= 0, got {buffer_um!r}.")
    grid = _grid_arg(n_blocks)
    if isinstance(data, ad.AnnData):
        adata, sdata = (data.copy() if copy else data), None
    elif is_sdata(data):
        sdata = copy_sdata(data) if copy else data
        if table_key not in sdata.tables:
            raise KeyError(f"No table {table_key!r} in sdata.tables (available: {list(sdata.tables)}); run "
                           "dbk.pp.pseudobulk first or pass table_key=.")
        adata = sdata.tables[table_key]
    else:
        raise TypeError(f"data must be a SpatialData or an AnnData, got {type(data).__name__}.")
    if SPATIAL_KEY not in adata.obsm:
        raise KeyError(f"The tile table has no obsm[{SPATIAL_KEY!r}] (tile centres); make it with dbk.pp.pseudobulk.")
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    if not np.isfinite(xy).all():
        raise ValueError(f"obsm[{SPATIAL_KEY!r}] of the tile table holds NaN or infinite centres.")
    buffer_px = buffer_um / _um_per_px(adata, sdata) if buffer_um > 0 else 0.0

    rng = check_random_state(random_state)
    groups = (adata.obs[groupby].astype(str).to_numpy() if groupby is not None and groupby in adata.obs
              else np.zeros(adata.n_obs, dtype=object).astype(str))
    labels = np.empty(adata.n_obs, dtype=object)
    blocks = np.full(adata.n_obs, -1, dtype=np.int64)
    shapes, offset = {}, 0
    for g in sorted(set(groups)):
        rows = np.flatnonzero(groups == g)
        lab, blk, shape = _split_one(xy[rows], grid, float(test_fraction), buffer_px, rng, str(g))
        labels[rows], blocks[rows] = lab, blk + offset
        shapes[str(g)] = list(shape)
        offset += shape[0] * shape[1]

    adata.obs[key_added] = pd.Categorical(labels, categories=list(LABELS))
    adata.obs[f"{key_added}_block"] = blocks
    share = {lab: float(np.mean(labels == lab)) for lab in LABELS}
    adata.uns.setdefault(UNS_KEY, {})["spatial_blocks"] = {
        "key_added": key_added, "n_blocks": list(grid) if isinstance(grid, tuple) else int(grid),
        "test_fraction": float(test_fraction), "buffer_um": float(buffer_um),
        "random_state": "None" if random_state is None else int(random_state),
        "fraction_train": share["train"], "fraction_test": share["test"], "fraction_buffer": share["buffer"],
        "grid": shapes,
    }
    logger.info(f"spatial_blocks: {adata.n_obs:,} tiles -> train {share['train']:.1%}, test {share['test']:.1%}, "
                f"buffer {share['buffer']:.1%} (obs[{key_added!r}]).")
    if sdata is None:
        return adata if copy else None
    return sdata if copy else None


def _grid_arg(n_blocks) -> int | tuple[int, int]:
    if isinstance(n_blocks, (tuple, list)):
        if len(n_blocks) != 2 or any(int(n) != n or n < 1 for n in n_blocks) or n_blocks[0] * n_blocks[1] < 2:
            raise ValueError(f"n_blocks must be an int >= 2 or (n_rows, n_cols) of positive ints, got {n_blocks!r}.")
        return int(n_blocks[0]), int(n_blocks[1])
    if int(n_blocks) != n_blocks or n_blocks < 2:
        raise ValueError(f"n_blocks must be an int >= 2 or (n_rows, n_cols), got {n_blocks!r}.")
    return int(n_blocks)


def _um_per_px(adata: ad.AnnData, sdata) -> float:
    value = adata.uns.get(UNS_KEY, {}).get(UM_PER_PX_KEY)
    if value is None and sdata is not None:
        try:
            value = get_pixel_size(sdata, None)
        except (KeyError, ValueError):
            value = None
    if value is None:
        raise ValueError(f"buffer_um needs the pixel size of the tile table, which is unknown: set "
                         f"adata.uns[{UNS_KEY!r}][{UM_PER_PX_KEY!r}] (dbk.pp.pseudobulk writes it from the image).")
    return float(value)


def _split_one(xy: np.ndarray, grid, test_fraction: float, buffer_px: float, rng: np.random.Generator, name: str):
    """Labels and block ids of one slide's tiles; the grid's ``(n_rows, n_cols)``."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.maximum(hi - lo, 0.0)
    if isinstance(grid, tuple):
        ny, nx = grid
    else:  # a grid shaped like the extent: nx / ny close to width / height
        aspect = (span[0] + 1.0) / (span[1] + 1.0)
        nx = int(np.clip(round(np.sqrt(grid * aspect)), 1, grid))
        ny = max(1, int(round(grid / nx)))
    block = _bin(xy[:, 1], lo[1], span[1], ny) * nx + _bin(xy[:, 0], lo[0], span[0], nx)
    used, sizes = np.unique(block, return_counts=True)
    if len(used) < 2:
        raise ValueError(f"spatial_blocks: the {len(xy)} tiles of {name!r} fall in {len(used)} block of the "
                         f"{ny} x {nx} grid; at least two blocks need tiles (more tiles, or more blocks).")
    order = rng.permutation(len(used))
    cum = np.cumsum(sizes[order])[:-1]  # at least one block stays train
    k = int(np.argmin(np.abs(cum - test_fraction * len(xy)))) + 1
    test_blocks = used[order[:k]]
    test = np.isin(block, test_blocks)
    labels = np.where(test, "test", "train").astype(object)
    if buffer_px > 0:
        tree = cKDTree(xy[test])
        train = np.flatnonzero(~test)
        d, _ = tree.query(xy[train], k=1, distance_upper_bound=buffer_px * (1 + 1e-9))
        labels[train[np.isfinite(d)]] = "buffer"
    return labels, block, (ny, nx)


def _bin(v: np.ndarray, lo: float, span: float, n: int) -> np.ndarray:
    """Which of ``n`` equal bins over ``[lo, lo + span]`` each value falls in (the last bin closed)."""
    if span <= 0:
        return np.zeros(len(v), dtype=np.int64)
    return np.clip(np.floor((v - lo) / (span / n)), 0, n - 1).astype(np.int64)
