"""Tile images for torch: crop each tile from the best pyramid level, resample, augment, optionally cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from spatialdata import SpatialData

from .._constants import TILES_KEY, TILES_TABLE_KEY
from .._image import ImageLevel, get_pixel_size, image_levels, resolve_image_key
from .._logging import logger
from .._settings import settings
from .._utils import renamed_kwargs, resolve_seed
from ._tiles import tile_bounds


def _level_for(levels: list[ImageLevel], downsample: float) -> int:
    """Coarsest level that is still at least as fine as the wanted downsampling (never upsample a coarse level)."""
    best = 0
    for i, lvl in enumerate(levels):
        if max(lvl.downsample_x, lvl.downsample_y) <= downsample * (1 + 1e-6):
            best = i
    return best


def _to_uint8_rgb(arr: np.ndarray, what: str) -> np.ndarray:
    """(c, y, x) -> (y, x, 3) uint8; grayscale is repeated, alpha dropped, other dtypes rescaled explicitly."""
    if arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    elif arr.shape[0] == 4:
        arr = arr[:3]
    elif arr.shape[0] != 3:
        raise ValueError(f"{what} has {arr.shape[0]} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA).")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = (arr // 257).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        out = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    else:
        raise ValueError(f"{what} has dtype {arr.dtype}; expected uint8, uint16 or float in [0, 1].")
    return np.ascontiguousarray(out.transpose(1, 2, 0))


class ChunkCache:
    """A small LRU cache of computed image chunks (per process).

    Neighbouring tiles then don't decode or render a chunk twice. Bounded by ``max_bytes``.
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        from collections import OrderedDict

        self.max_bytes, self.nbytes, self.items = max_bytes, 0, OrderedDict()

    def region(self, data, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """``data[:, y0:y1, x0:x1]`` of a (c, y, x) dask array, assembled from cached chunks."""
        cy, cx = np.cumsum((0, *data.chunks[1])), np.cumsum((0, *data.chunks[2]))
        by0, by1 = np.searchsorted(cy, y0, "right") - 1, np.searchsorted(cy, y1, "left")
        bx0, bx1 = np.searchsorted(cx, x0, "right") - 1, np.searchsorted(cx, x1, "left")
        out = np.empty((data.shape[0], y1 - y0, x1 - x0), dtype=data.dtype)
        for by in range(by0, by1):
            for bx in range(bx0, bx1):
                block = self._block(data, by, bx)
                ys, ye = max(y0, cy[by]), min(y1, cy[by + 1])
                xs, xe = max(x0, cx[bx]), min(x1, cx[bx + 1])
                src = block[:, ys - cy[by] : ye - cy[by], xs - cx[bx] : xe - cx[bx]]
                out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = src
        return out

    def _block(self, data, by: int, bx: int) -> np.ndarray:
        key = (data.name, by, bx)
        hit = self.items.get(key)
        if hit is not None:
            self.items.move_to_end(key)
            return hit
        block = np.asarray(data.blocks[0, by, bx].compute(scheduler="synchronous"))  # one channel chunk (checked)
        self.items[key] = block
        self.nbytes += block.nbytes
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes
        return block


def read_tile(
    level: ImageLevel,
    box0: tuple[float, float, float, float],
    size_px: int,
    *,
    what: str = "image",
    cache: ChunkCache | None = None,
    direct=None,
) -> np.ndarray:
    """Read the level-0 box ``(x0, y0, x1, y1)`` from a pyramid level and resample it to ``size_px`` (uint8 RGB).

    Parts of the box outside the image are filled with white (glass). With a :class:`ChunkCache`, image chunks are
    computed once and reused by neighbouring tiles.

    Parameters
    ----------
    level
        The pyramid level to read from (:func:`dbk.io.image_levels`); its downsample factors map level-0 pixels to
        its own.
    box0
        ``(x0, y0, x1, y1)`` in level-0 pixels, half-open (as :func:`tile_bounds`); may extend past the image.
    size_px
        Side of the returned square in pixels (bilinear resampling of the box).
    what
        Name of the image, used in error messages (an image that is not grey, RGB or RGBA, or of another dtype).
    cache
        A :class:`ChunkCache` of decoded chunks shared by neighbouring tiles (``None``: read the region directly).
    direct
        A direct TIFF region reader of the level (``dbk.io._tiff.direct_reader``), which bypasses dask; ``None``:
        read through dask.

    Returns
    -------
    numpy.ndarray
        ``(size_px, size_px, 3)`` uint8 RGB (grey repeated, alpha dropped, uint16 and float in [0, 1] rescaled).
    """
    from PIL import Image

    dx, dy = level.downsample_x, level.downsample_y
    fx0, fy0, fx1, fy1 = box0[0] / dx, box0[1] / dy, box0[2] / dx, box0[3] / dy
    h, w = level.shape_yx
    ix0, iy0 = int(np.floor(fx0)), int(np.floor(fy0))
    ix1, iy1 = int(np.ceil(fx1)), int(np.ceil(fy1))
    cx0, cy0, cx1, cy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
    data = level.data.data
    if direct is not None:
        crop = direct.region(cy0, cy1, cx0, cx1)
    elif cache is not None and hasattr(data, "blocks") and len(data.chunks[0]) == 1:
        crop = cache.region(data, cy0, cy1, cx0, cx1)
    else:
        crop = data[:, cy0:cy1, cx0:cx1]
        crop = np.asarray(crop.compute(scheduler="synchronous") if hasattr(crop, "compute") else crop)
    rgb = _to_uint8_rgb(crop, what)
    if (cx0, cy0, cx1, cy1) != (ix0, iy0, ix1, iy1):
        full = np.full((iy1 - iy0, ix1 - ix0, 3), 255, dtype=np.uint8)
        full[cy0 - iy0 : cy1 - iy0, cx0 - ix0 : cx1 - ix0] = rgb
        rgb = full
    box = (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0)
    if rgb.shape[:2] == (size_px, size_px) and box == (0.0, 0.0, float(size_px), float(size_px)):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size_px, size_px), Image.Resampling.BILINEAR, box=box,
                                                   reducing_gap=None))


class TileDataset:
    """A map-style torch dataset of tile images (and optionally their expression).

    Each item crops a tile from the pyramid level closest to (but not coarser than) the wanted resolution, reads
    only that region through dask, and resamples it to ``size_px``. Works with ``torch.utils.data.DataLoader`` and
    ``num_workers > 0``.

    Parameters
    ----------
    sdata
        SpatialData with the image and tiles.
    tiles_key
        Shapes element with the tiles.
    image_key
        The H&E image; the only image when ``None``.
    size_px
        Output side in pixels.
    target_pixel_size_um
        Output resolution in µm per pixel. ``None``: the tile itself is resampled to ``size_px`` (so the resolution
        is tile side / ``size_px``). Otherwise a square of ``size_px * target_pixel_size_um`` µm centred on the tile
        is read (more or less context than the tile).
    table_key
        Tile table to return expression from (``None``: images only). Rows are matched to tiles by instance id.
    genes
        Genes to return (all of the table when ``None``).
    layer
        Table layer for the expression (``X`` when ``None``).
    augment
        Random flips and 90° rotations (the dihedral group) per item.
    color_jitter
        Strength of random brightness / contrast / per-channel gain jitter (0 disables).
    dtype
        ``"uint8"`` tensors in [0, 255] or ``"float32"`` in [0, 1].
    chunk_cache_mb
        Memory (per process) for recently read image chunks, reused by neighbouring tiles; 0 disables.
    cache
        Folder of a zarr cache of the (un-augmented) resampled tiles; built on first use and reused when it matches
        the tiles and settings, so repeated epochs never touch the slide again.
    random_state
        Seed of the augmentation (``None``: ``dbk.settings.seed``).

    Notes
    -----
    Each item is a dict with ``"image"`` (3, size_px, size_px), ``"index"`` and, with a table, ``"expr"``
    (float32, genes) and ``"mask"`` (1 where the gene was measured).
    """

    @renamed_kwargs(target_um_per_px="target_pixel_size_um")
    def __init__(
        self,
        sdata: SpatialData,
        tiles_key: str = TILES_KEY,
        *,
        image_key: str | None = None,
        size_px: int = 224,
        target_pixel_size_um: float | None = None,
        table_key: str | None = None,
        genes: list[str] | None = None,
        layer: str | None = None,
        augment: bool = False,
        color_jitter: float = 0.0,
        dtype: str = "uint8",
        cache: str | Path | None = None,
        chunk_cache_mb: float = 256,
        random_state: int | None = None,
    ) -> None:
        if int(size_px) != size_px or size_px <= 0:
            raise ValueError(f"size_px must be a positive integer, got {size_px!r}.")
        if dtype not in ("uint8", "float32"):
            raise ValueError(f"dtype must be 'uint8' or 'float32', got {dtype!r}.")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter!r}.")
        self.image_key = resolve_image_key(sdata, image_key)
        self.size_px = int(size_px)
        self.bounds = tile_bounds(sdata, tiles_key)
        self.tile_ids = np.asarray(sdata.shapes[tiles_key].index)
        self.levels = image_levels(sdata, self.image_key)
        side0 = float(np.median(self.bounds[:, 2] - self.bounds[:, 0]))
        if target_pixel_size_um is None:
            self.boxes = self.bounds.astype(np.float64)
            downsample = side0 / self.size_px
        else:
            if target_pixel_size_um <= 0:
                raise ValueError(f"target_pixel_size_um must be positive, got {target_pixel_size_um!r}.")
            px = get_pixel_size(sdata, self.image_key)
            half = self.size_px * target_pixel_size_um / px / 2
            cx = (self.bounds[:, 0] + self.bounds[:, 2]) / 2
            cy = (self.bounds[:, 1] + self.bounds[:, 3]) / 2
            self.boxes = np.column_stack([cx - half, cy - half, cx + half, cy + half])
            downsample = target_pixel_size_um / px
        self.level_index = _level_for(self.levels, downsample)
        from ..io._tiff import direct_reader

        self._direct = direct_reader(self.levels[self.level_index].data.data)
        self.chunk_cache_mb = float(chunk_cache_mb)
        self._chunks: ChunkCache | None = None
        self.augment = bool(augment)
        self.color_jitter = float(color_jitter)
        self.dtype = dtype
        self.random_state = resolve_seed(random_state)
        self.expr = self.mask = None
        self.genes: list[str] | None = None
        if table_key is not None:
            self._attach_table(sdata, table_key, tiles_key, genes, layer)
        self._cache = None
        if cache is not None:
            self._cache = self._open_or_build_cache(Path(cache))

    def _attach_table(self, sdata, table_key, tiles_key, genes, layer):
        from ._concat import measured_mask

        if table_key not in sdata.tables:
            raise KeyError(f"No table {table_key!r} in sdata.tables; available: {list(sdata.tables)}.")
        adata = sdata.tables[table_key]
        inst = adata.obs["instance_id"].to_numpy() if "instance_id" in adata.obs else np.arange(adata.n_obs)
        import pandas as pd

        if pd.Index(inst).has_duplicates:
            dup = pd.Index(inst)[pd.Index(inst).duplicated()].unique()[:5].tolist()
            raise ValueError(f"Table {table_key!r} has several rows for one tile of {tiles_key!r} (instance ids "
                             f"{dup} repeat); each tile needs at most one row.")
        rows = pd.Index(inst).get_indexer(self.tile_ids)
        if (rows < 0).any():
            raise ValueError(f"{int((rows < 0).sum())} tiles of {tiles_key!r} have no row in table {table_key!r}.")
        genes = list(adata.var_names) if genes is None else list(genes)
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise KeyError(f"Genes not in table {table_key!r}: {missing[:10]}.")
        sub = adata[rows, genes]
        x = sub.layers[layer] if layer is not None else sub.X
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        self.expr = np.asarray(x, dtype=np.float32)
        self.mask = measured_mask(sub).astype(np.float32)
        self.genes = genes

    def __len__(self) -> int:
        return len(self.bounds)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_chunks"] = None  # each DataLoader worker builds its own chunk cache
        return state

    def read(self, i: int) -> np.ndarray:
        """The un-augmented tile ``i`` as (size_px, size_px, 3) uint8.

        Parameters
        ----------
        i
            Position of the tile in the dataset (``0 <= i < len(self)``, the order of ``tiles_key``).

        Returns
        -------
        numpy.ndarray
            ``(size_px, size_px, 3)`` uint8, from the tile cache when there is one, else read from the slide.
        """
        if self._cache is not None:
            return np.asarray(self._cache[i])
        if self._chunks is None and self.chunk_cache_mb > 0:
            self._chunks = ChunkCache(int(self.chunk_cache_mb * 2**20))
        return read_tile(self.levels[self.level_index], tuple(self.boxes[i]), self.size_px, what=self.image_key,
                         cache=self._chunks, direct=self._direct)

    def __getitem__(self, i: int) -> dict:
        import torch

        if not -len(self) <= i < len(self):
            raise IndexError(f"tile index {i} out of range for {len(self)} tiles")
        i = int(i) % len(self)
        img = self.read(i)
        if self.augment or self.color_jitter > 0:
            info = torch.utils.data.get_worker_info()
            base = torch.initial_seed() if info is not None else 0
            rng = np.random.default_rng([self.random_state, i, int(base) % (2**32), self._draws()])
            img = self._augment(img, rng)
        t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        if self.dtype == "float32":
            t = t.float().div_(255.0)
        item = {"image": t, "index": i}
        if self.expr is not None:
            item["expr"] = torch.from_numpy(self.expr[i])
            item["mask"] = torch.from_numpy(self.mask[i])
        return item

    def _draws(self) -> int:
        self.__dict__["_n_draws"] = self.__dict__.get("_n_draws", 0) + 1
        return self.__dict__["_n_draws"]

    def _augment(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.augment:
            img = np.rot90(img, k=int(rng.integers(4)))
            if rng.random() < 0.5:
                img = img[:, ::-1]
        if self.color_jitter > 0:
            s = self.color_jitter
            f = img.astype(np.float32)
            mean = f.mean()
            f = (f - mean) * (1 + rng.uniform(-s, s)) + mean * (1 + rng.uniform(-s, s))
            f *= 1 + rng.uniform(-s / 2, s / 2, size=3)
            img = np.clip(f, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(img)

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.boxes).tobytes())
        h.update(json.dumps([self.size_px, self.level_index, self.image_key]).encode())
        return h.hexdigest()[:16]

    def _open_or_build_cache(self, path: Path):
        import zarr
        from tqdm.auto import tqdm

        from .._utils import atomic_path

        fp = self._fingerprint()
        if path.exists():
            try:
                arr = zarr.open_array(str(path), mode="r")
                if arr.attrs.get("fingerprint") == fp and arr.shape == (len(self), self.size_px, self.size_px, 3):
                    logger.info(f"TileDataset: using tile cache {path}.")
                    return arr
            except Exception as err:
                logger.warning(f"TileDataset: cache {path} unreadable ({err}); rebuilding it.")
            logger.info(f"TileDataset: cache {path} does not match these tiles; rebuilding it.")
        with atomic_path(path) as tmp:
            arr = zarr.open_array(str(tmp), mode="w", shape=(len(self), self.size_px, self.size_px, 3),
                                  chunks=(1, self.size_px, self.size_px, 3), dtype="uint8")
            step = 64  # one chunk per tile: random access reads exactly one tile
            for s in tqdm(range(0, len(self), step), desc="tile cache", disable=not settings.progress):
                arr[s : s + step] = np.stack([self.read(i) for i in range(s, min(s + step, len(self)))])
            arr.attrs["fingerprint"] = fp
        return zarr.open_array(str(path), mode="r")


@renamed_kwargs(target_um_per_px="target_pixel_size_um")
def export_tiles(
    sdata: SpatialData,
    path: str | Path,
    *,
    tiles_key: str = TILES_KEY,
    table_key: str | None = TILES_TABLE_KEY,
    size_px: int = 224,
    target_pixel_size_um: float | None = None,
    image_key: str | None = None,
) -> Path:
    """Write tiles and their pseudo-bulk to one file for other tools (``.h5``/``.hdf5`` with h5py, else zarr).

    Datasets: ``images`` (n, size_px, size_px, 3) uint8, ``tile_id``, ``bounds`` (x0, y0, x1, y1 level-0 px),
    ``tile_size_um`` (NaN when the image has no pixel size), and with a table ``counts`` (n, genes; raw counts when
    present, else ``X``), ``X``, ``genes`` and ``measured`` (which genes each tile's slide measured); the slide's
    name in the attribute ``name``. Written to a temporary file and renamed, so an interrupted export leaves no
    partial file. The torch core reads it back with :meth:`dbk.tl.TileArrays.read`, so a GPU node trains stage 1 on
    it without the SpatialData stack.

    Parameters
    ----------
    sdata
        SpatialData with the image and the tiles.
    path
        File to write: ``.h5`` / ``.hdf5`` for HDF5 (needs h5py), anything else for a zarr store.
    tiles_key
        Shapes element with the tiles.
    table_key
        Tile table whose expression is written beside the images; ``None``, or a key that is not in
        ``sdata.tables``: images only.
    size_px
        Side of the exported tile images in pixels (as in :class:`TileDataset`).
    target_pixel_size_um
        Resolution of the exported images in µm per pixel (as in :class:`TileDataset`); ``None``: each tile
        resampled to ``size_px``.
    image_key
        The H&E image; the only image when ``None``.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from .._utils import atomic_path

    table_key = table_key if table_key is not None and table_key in sdata.tables else None
    ds = TileDataset(sdata, tiles_key, image_key=image_key, size_px=size_px,
                     target_pixel_size_um=target_pixel_size_um, table_key=table_key)
    images = np.stack([ds.read(i) for i in range(len(ds))])
    from ._prepare import slide_names, tile_size_um

    size_um = tile_size_um(sdata, tiles_key)
    out = {"images": images, "tile_id": np.asarray(ds.tile_ids).astype(str).astype("S"), "bounds": ds.bounds,
           "tile_size_um": np.asarray([np.nan if size_um is None else size_um], np.float64)}
    if table_key is not None:
        adata = sdata.tables[table_key]
        import pandas as pd

        rows = pd.Index(adata.obs["instance_id"].to_numpy()).get_indexer(ds.tile_ids)
        c = adata.layers["counts"] if "counts" in adata.layers else adata.X
        c = c[rows]
        out["counts"] = c.toarray() if hasattr(c, "toarray") else np.asarray(c)
        out["X"] = ds.expr
        out["genes"] = np.asarray(ds.genes).astype("S")
        out["measured"] = np.asarray(ds.mask > 0)
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(tmp, "w") as f:
                f.attrs["name"] = slide_names([sdata], table_key or TILES_TABLE_KEY)[0]
                for k, v in out.items():
                    f.create_dataset(k, data=v, compression="gzip" if k == "images" else None)
        else:
            import zarr

            g = zarr.open_group(str(tmp), mode="w")
            g.attrs["name"] = slide_names([sdata], table_key or TILES_TABLE_KEY)[0]
            for k, v in out.items():
                if v.dtype.kind == "S":  # variable-length UTF-8, the string type zarr v3 specifies
                    v = v.astype(str).astype(np.dtypes.StringDType())
                g.create_array(k, data=v) if hasattr(g, "create_array") else g.array(k, v)
    logger.info(f"export_tiles: {len(ds)} tiles -> {path}")
    return path
