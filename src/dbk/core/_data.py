"""Stage-1 training data in the torch core: tiles as arrays, batches over several slides, step-seeded samplers.

Slides held as :class:`TileArrays` become :class:`_Source` objects here. Any other slide (a SpatialData) is read by the
:class:`~dbk.core._slides.SlideReader` that a layer above registered for its kind (:mod:`dbk.tl` registers the
SpatialData reader of :mod:`dbk.pp._tile_sources` when it is imported): the core imports no such layer, so training
from arrays never loads the SpatialData stack.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from .._logging import logger
from ._slides import slide_reader
from ._vocab import GeneVocab

PRELOAD_MAX_BYTES = 2 * 1024**3
"""Default budget (bytes at the model's image size) below which the tiles of SpatialData slides are read into memory
once; above it they are streamed by DataLoader workers. :class:`TileArrays` are always in memory."""


@dataclass
class _Source:
    """The tiles of one slide (one tiles element), with or without profiles."""

    name: str
    n: int
    tile_size_um: float | None
    images: np.ndarray | None = None  # (n, S, S, 3) uint8, when read into memory
    reader: object = None  # otherwise: has .size_px and .read(i) -> (S, S, 3) uint8 (a dbk.pp.TileDataset)
    ids: np.ndarray | None = None  # (G,) vocabulary ids of the table columns used; None: no profiles
    x: np.ndarray | sp.csr_matrix | None = None  # (n, G) values
    measured: np.ndarray | None = None  # (n, G) bool; None: all measured


def _rows(mat, rows: np.ndarray) -> np.ndarray:
    out = mat[rows]
    return out.toarray() if sp.issparse(out) else np.asarray(out)


class _TileBatches(torch.utils.data.Dataset):
    """Batches of tiles from several sources: ``dataset[indices]`` -> a dict of tensors (one item per batch)."""

    def __init__(self, sources: list[_Source]) -> None:
        self.sources = sources
        self.offsets = np.cumsum([0] + [s.n for s in sources])
        self.n = int(self.offsets[-1])
        self.length = max([len(s.ids) for s in sources if s.ids is not None] + [1])
        self.n_labeled = sum(s.n for s in sources if s.ids is not None)

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.sources:
            h.update(json.dumps([s.name, s.n, None if s.ids is None else s.ids.tolist()]).encode())
        return h.hexdigest()[:16]

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        src = np.searchsorted(self.offsets, indices, side="right") - 1
        b = len(indices)
        first = self.sources[src[0]]
        size = first.images.shape[1] if first.images is not None else first.reader.size_px
        images = np.empty((b, size, size, 3), np.uint8)
        ids = np.zeros((b, self.length), np.int64)
        values = np.zeros((b, self.length), np.float32)
        mask = np.zeros((b, self.length), bool)
        for k in np.unique(src):
            pos = np.flatnonzero(src == k)
            s = self.sources[k]
            local = indices[pos] - self.offsets[k]
            if s.images is not None:
                images[pos] = s.images[local]
            else:
                images[pos] = np.stack([s.reader.read(int(i)) for i in local])
            if s.ids is not None:
                g = len(s.ids)
                ids[pos, :g] = s.ids
                values[pos, :g] = _rows(s.x, local)
                mask[pos, :g] = True if s.measured is None else s.measured[local]
        return {
            "image": torch.from_numpy(images).permute(0, 3, 1, 2),
            "ids": torch.from_numpy(ids),
            "values": torch.from_numpy(np.nan_to_num(values)),
            "mask": torch.from_numpy(mask & np.isfinite(values)),
        }

    def value_stats(self, n_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-vocabulary-gene mean and std over the tiles where the gene was measured, and the count."""
        s1, s2, cnt = np.zeros(n_vocab), np.zeros(n_vocab), np.zeros(n_vocab)
        for s in self.sources:
            if s.ids is None:
                continue
            x = s.x.toarray() if sp.issparse(s.x) else np.asarray(s.x, dtype=np.float64)
            m = np.ones(x.shape, bool) if s.measured is None else s.measured
            m = m & np.isfinite(x)
            x = np.where(m, x, 0.0)
            np.add.at(s1, s.ids, x.sum(0))
            np.add.at(s2, s.ids, (x**2).sum(0))
            np.add.at(cnt, s.ids, m.sum(0))
        mean = np.divide(s1, cnt, out=np.zeros(n_vocab), where=cnt > 0)
        var = np.divide(s2, cnt, out=np.ones(n_vocab), where=cnt > 0) - mean**2
        return mean, np.sqrt(np.maximum(var, 0.0)), cnt


class _StepSampler(torch.utils.data.Sampler):
    """Index batches for steps ``start .. stop - 1``: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Batch contents depend only on the step number, so a resumed run sees exactly the batches it would have seen.
    With several processes each takes its slice of the global batch.
    """

    def __init__(self, n: int, batch_size: int, start: int, stop: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.b, self.start, self.stop, self.seed = n, batch_size, start, stop, seed
        self.rank, self.world = rank, world
        self.per_epoch = max(1, n // (batch_size * world))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        perm, epoch = None, None
        gb = self.b * self.world
        for step in range(self.start, self.stop):
            e, j = divmod(step, self.per_epoch)
            if e != epoch:
                perm, epoch = np.random.default_rng([self.seed, e]).permutation(self.n), e
            glob = perm[j * gb : (j + 1) * gb]
            if len(glob) < gb:  # fewer tiles than one global batch: cycle
                glob = np.resize(perm, gb)
            yield glob[self.rank * self.b : (self.rank + 1) * self.b]


@dataclass
class TileArrays:
    """Tiles of one slide held as arrays: what the torch core trains on where no SpatialData is at hand.

    :func:`fit_pretrainer`, :meth:`DiffusionPretrainer.fit` and :meth:`DiffusionPretrainer.evaluate` take these
    (alone, in a list, or mixed with SpatialData objects), so stage 1 trains on a bare GPU node from exported tiles
    (``dbk.pp.export_tiles``) without spatialdata, geopandas or dask installed.

    Parameters
    ----------
    images
        (n, S, S, 3) uint8 RGB tiles; resampled (bilinear, antialiased) to the model's ``image_size`` when S differs.
    X
        (n, G) profiles (log1p-normalised, like ``X`` of the tile table), dense or scipy sparse; ``None`` for tiles
        without expression (trained unconditionally).
    genes
        The G gene symbols of the columns of ``X``.
    measured
        (n, G) bool: which genes were measured on each tile (``None``: all).
    name
        Slide name (in logs).
    tile_size_um
        Side of the tiles in µm (recorded by the model; ``None``: unknown).
    """

    images: np.ndarray
    X: np.ndarray | sp.spmatrix | None = None
    genes: Sequence[str] | None = None
    measured: np.ndarray | None = None
    name: str = "arrays"
    tile_size_um: float | None = None

    def __post_init__(self) -> None:
        im = self.images
        if not isinstance(im, np.ndarray) or im.ndim != 4 or im.shape[-1] != 3 or im.shape[1] != im.shape[2]:
            raise ValueError(f"TileArrays {self.name!r}: images must be an (n, S, S, 3) array, got "
                             f"{getattr(im, 'shape', type(im).__name__)}.")
        if im.dtype != np.uint8:
            raise ValueError(f"TileArrays {self.name!r}: images must be uint8 (0-255), got {im.dtype}.")
        n = im.shape[0]
        if self.X is None:
            if self.genes is not None or self.measured is not None:
                raise ValueError(f"TileArrays {self.name!r}: genes / measured given without X.")
            return
        if self.genes is None:
            raise ValueError(f"TileArrays {self.name!r}: X needs genes (its column names).")
        self.genes = [str(g) for g in self.genes]
        if self.X.ndim != 2 or self.X.shape != (n, len(self.genes)):
            raise ValueError(f"TileArrays {self.name!r}: X must be (n_tiles, n_genes) = ({n}, {len(self.genes)}), "
                             f"got {self.X.shape}.")
        if len(set(self.genes)) != len(self.genes):
            raise ValueError(f"TileArrays {self.name!r}: gene names are not unique.")
        if self.measured is not None:
            self.measured = np.asarray(self.measured, bool)
            if self.measured.shape != self.X.shape:
                raise ValueError(f"TileArrays {self.name!r}: measured must have the shape of X {self.X.shape}, got "
                                 f"{self.measured.shape}.")
        if self.tile_size_um is not None and not (np.isfinite(self.tile_size_um) and self.tile_size_um > 0):
            raise ValueError(f"TileArrays {self.name!r}: tile_size_um must be positive, got {self.tile_size_um!r}.")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @classmethod
    def read(cls, path) -> TileArrays:
        """The tiles of a file written by :func:`dbk.pp.export_tiles` (``.h5`` with h5py, else a zarr folder).

        Reads ``images`` and, when the file has them, ``X`` with ``genes`` (the training targets), ``measured``,
        ``tile_size_um`` and the slide ``name``: what the core trains on, with no SpatialData stack installed.

        Parameters
        ----------
        path
            The exported file: ``.h5`` / ``.hdf5`` (read with h5py), anything else a zarr store.

        Returns
        -------
        TileArrays
            The slide's tiles (and targets, when the export had a table), in memory.

        Raises
        ------
        FileNotFoundError
            If nothing is at ``path``.
        ValueError
            If the file holds no ``images`` dataset.
        """
        from pathlib import Path

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No exported tiles at {path} (write them with dbk.pp.export_tiles).")
        if path.suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                data = {k: f[k][()] for k in f}
                attrs = dict(f.attrs)
        else:
            import zarr

            g = zarr.open_group(str(path), mode="r")
            data = {k: np.asarray(g[k][...]) for k in g.array_keys()}
            attrs = dict(g.attrs)
        if "images" not in data:
            raise ValueError(f"{path} holds no 'images' dataset; is it a dbk.pp.export_tiles file?")

        def text(v):
            return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(v).ravel()]

        size = data.get("tile_size_um", attrs.get("tile_size_um"))
        size = None if size is None else float(np.asarray(size, np.float64).ravel()[0])
        return cls(images=np.asarray(data["images"], np.uint8),
                   X=np.asarray(data["X"], np.float32) if "X" in data and "genes" in data else None,
                   genes=text(data["genes"]) if "X" in data and "genes" in data else None,
                   measured=np.asarray(data["measured"], bool) if "measured" in data and "X" in data else None,
                   name=str(attrs.get("name", path.stem)),
                   tile_size_um=None if size is None or not np.isfinite(size) else size)


class _BalancedStepSampler(torch.utils.data.Sampler):
    """Like :class:`_StepSampler`, with a fixed share of each batch drawn from the tiles that have a profile.

    Labelled and unlabelled tiles run through their own seeded permutations (epochs counted per pool), so the
    labelled tiles, often a few percent of a dense grid, fill ``n_labeled`` places of every batch instead of their
    share of the data. Batch contents depend only on the step number (exact resume).
    """

    def __init__(self, labeled: np.ndarray, unlabeled: np.ndarray, batch_size: int, n_labeled: int, start: int,
                 stop: int, seed: int, rank: int = 0, world: int = 1):
        self.pools = [(np.asarray(labeled), int(n_labeled)), (np.asarray(unlabeled), int(batch_size - n_labeled))]
        self.start, self.stop, self.seed, self.rank, self.world = start, stop, seed, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def _draw(self, pool: int, step: int) -> np.ndarray:
        idx, k = self.pools[pool]
        if k == 0:
            return idx[:0]
        gk = k * self.world
        per_epoch = max(1, len(idx) // gk)
        e, j = divmod(step, per_epoch)
        perm = idx[np.random.default_rng([self.seed, 7 + pool, e]).permutation(len(idx))]
        glob = perm[j * gk : (j + 1) * gk]
        if len(glob) < gk:
            glob = np.resize(perm, gk)
        return glob[self.rank * k : (self.rank + 1) * k]

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield np.concatenate([self._draw(0, step), self._draw(1, step)])


def _is_slide(data) -> bool:
    return isinstance(data, TileArrays) or slide_reader(data) is not None


def _not_a_slide(data, i: int) -> str:
    from .._utils import is_sdata

    if is_sdata(data):
        return (f"slide {i} is a SpatialData, which the torch core does not read itself: a layer above registers its "
                "reader. Import dbk.tl first (dbk.tl.fit_pretrainer and dbk.tl.DiffusionPretrainer are the core's own "
                "objects, with the SpatialData reader registered), or export the tiles with dbk.pp.export_tiles and "
                "pass dbk.core.TileArrays.read(path).")
    return (f"slide {i} is a {type(data).__name__}; data must be a dbk.tl.TileArrays or a SpatialData (with dbk.tl "
            "imported), or a non-empty list (or dict) of them.")


def _as_list(data) -> list:
    """The slides of ``data`` (one, or a list / tuple / dict of them): TileArrays, or of a kind a reader reads."""
    if _is_slide(data):
        return [data]
    if isinstance(data, dict):
        data = list(data.values())
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise TypeError("data must be a dbk.tl.TileArrays or a SpatialData, or a non-empty list of them; got an empty "
                        f"{type(data).__name__}.")
    for i, d in enumerate(items):
        if not _is_slide(d):
            raise TypeError(_not_a_slide(d, i))
    return items


def _resample(images: np.ndarray, size: int) -> np.ndarray:
    """(n, S, S, 3) uint8 -> (n, size, size, 3) uint8 (bilinear, antialiased; unchanged when S == size)."""
    if images.shape[1] == size:
        return images
    out = np.empty((images.shape[0], size, size, 3), np.uint8)
    for s in range(0, len(images), 256):
        t = torch.from_numpy(np.ascontiguousarray(images[s : s + 256])).permute(0, 3, 1, 2).float()
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out[s : s + 256] = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _panel(data, table_key: str, genes: Sequence[str] | None) -> list[str]:
    """The genes of ``data`` (a slide) to condition on: its profile columns, restricted to ``genes`` when given."""
    if not isinstance(data, TileArrays):
        reader = slide_reader(data)
        if reader is None:
            raise TypeError(_not_a_slide(data, 0))
        return reader.panel(data, table_key, genes)
    names = [] if data.genes is None else list(data.genes)
    if genes is None:
        return names
    keep = set(names)
    return [g for g in genes if g in keep]


def _build_sources(datas, *, vocab: GeneVocab, image_size: int, genes, table_key, tiles_key, unlabeled_tiles_key,
                   labeled_only: bool = False, preload_max_bytes: int | None = None) -> list[_Source]:
    """One source per (slide, tiles element): the :class:`TileArrays` first, then the other slides, by their readers.

    ``datas`` as :func:`_as_list` returns them. ``preload_max_bytes`` (default :data:`PRELOAD_MAX_BYTES`) goes to the
    readers: the SpatialData reader reads the tiles into memory when they total at most this many bytes, and leaves
    them to DataLoader workers otherwise (0: always streamed).
    """
    arrays = []
    for a in datas:
        if not isinstance(a, TileArrays):
            continue
        panel = _panel(a, table_key, genes)
        if a.X is not None and not panel:
            logger.warning(f"Slide {a.name!r}: none of the chosen genes is in its profiles; its tiles train "
                           "unconditioned.")
        if panel or not labeled_only:
            arrays.append((a, panel))
    by_reader = [None if isinstance(d, TileArrays) else slide_reader(d) for d in datas]
    for i, (d, reader) in enumerate(zip(datas, by_reader, strict=True)):
        if reader is None and not isinstance(d, TileArrays):
            raise TypeError(_not_a_slide(d, i))
    readers = []  # each reader once, in the order of the first slide it reads
    for reader in by_reader:
        if reader is not None and all(r is not reader for r in readers):
            readers.append(reader)
    slides = []
    for reader in readers:  # its slides, None elsewhere: positions are kept (they name unnamed slides)
        slides += reader.sources(
            [d if r is reader else None for d, r in zip(datas, by_reader, strict=True)], vocab=vocab,
            image_size=image_size, genes=genes, table_key=table_key, tiles_key=tiles_key,
            unlabeled_tiles_key=unlabeled_tiles_key, labeled_only=labeled_only,
            preload_max_bytes=PRELOAD_MAX_BYTES if preload_max_bytes is None else int(preload_max_bytes))
    if not slides and not arrays:
        raise ValueError(f"No tiles with a profile in table {table_key!r} found in the data.")
    return [_array_source(a, panel, vocab, image_size) for a, panel in arrays] + slides


def _array_source(a: TileArrays, panel: list[str], vocab: GeneVocab, image_size: int) -> _Source:
    src = _Source(name=a.name, n=len(a), tile_size_um=a.tile_size_um, images=_resample(a.images, image_size))
    if panel:
        cols = [a.genes.index(g) for g in panel]
        src.ids = vocab.ids(panel)
        x = a.X[:, cols]
        src.x = x.tocsr() if sp.issparse(x) else np.asarray(x, np.float32)
        if a.measured is not None and not a.measured[:, cols].all():
            src.measured = a.measured[:, cols]
    return src

