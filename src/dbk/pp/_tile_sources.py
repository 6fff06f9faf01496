"""SpatialData slides as stage-1 training sources: the scverse half of what the torch core trains on.

The core (:mod:`dbk.core._data`) turns :class:`~dbk.tl.TileArrays` into sources itself and reads any other slide
through the reader registered for its kind (:mod:`dbk.core._slides`); :class:`SpatialDataReader` is that reader for
SpatialData, registered by :mod:`dbk.tl` when it is imported. The core never imports this module, so training from
arrays never loads the SpatialData stack. Importing it loads nothing heavy (not even numpy): ``dbk.tl`` imports it to
register the reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._logging import logger
from .._settings import settings

if TYPE_CHECKING:  # pragma: no cover
    from ..core._data import _Source
    from ..core._vocab import GeneVocab


class SpatialDataReader:
    """The :class:`~dbk.core._slides.SlideReader` of SpatialData slides (tiles, their table and its ``measured`` layer).

    ``dbk.tl`` registers one with :func:`dbk.core._slides.register_slide_reader`; the core then reads every SpatialData
    it is handed through :meth:`panel` and :meth:`sources`.
    """

    def accepts(self, slide) -> bool:
        """Whether ``slide`` is a SpatialData."""
        from .._utils import is_sdata

        return is_sdata(slide)

    def panel(self, slide, table_key: str, genes: Sequence[str] | None) -> list[str]:
        """:func:`slide_panel`."""
        return slide_panel(slide, table_key, genes)

    def sources(self, slides: list, **kwargs) -> list[_Source]:
        """:func:`spatialdata_sources` of the SpatialData slides of ``slides`` (keywords as there)."""
        return spatialdata_sources(slides, **kwargs)


def slide_panel(sdata, table_key: str, genes: Sequence[str] | None) -> list[str]:
    """The genes of a slide's tile table ``table_key`` (restricted to ``genes`` when given); ``[]`` without it."""
    if table_key not in sdata.tables:
        return []
    names = [str(g) for g in sdata.tables[table_key].var_names]
    if genes is None:
        return names
    keep = set(names)
    return [g for g in genes if g in keep]


def _tile_size_um(sdata, tiles_key: str, image_key: str | None) -> float | None:
    import numpy as np

    from .._image import get_pixel_size
    from ._tiles import tile_bounds

    b = tile_bounds(sdata, tiles_key)
    try:
        px = get_pixel_size(sdata, image_key)
    except ValueError:
        return None
    return float(np.median(b[:, 2] - b[:, 0])) * px


def spatialdata_sources(datas, *, vocab: GeneVocab, image_size: int, genes, table_key: str, tiles_key: str,
                        unlabeled_tiles_key: str | None, labeled_only: bool, preload_max_bytes: int) -> list[_Source]:
    """One source per (SpatialData slide, tiles element) of ``datas`` (anything else in it, e.g. None, is skipped).

    Tiles are read through :class:`dbk.pp.TileDataset` at ``image_size`` px: into memory when all of them together
    take at most ``preload_max_bytes``, otherwise the sources keep the readers and DataLoader workers stream them.
    A slide is named by ``sdata.attrs["sample"]`` (else ``"slide{i}"``, ``i`` its position in ``datas``); its
    ``unlabeled_tiles_key`` tiles (when present and not ``labeled_only``) are a source ``"{name}:{key}"`` without
    profiles.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from .._utils import is_sdata
    from ..core._data import _Source
    from ._dataset import TileDataset

    plan = []
    for i, sdata in enumerate(datas):
        if not is_sdata(sdata):
            continue
        name = str(sdata.attrs.get("sample", f"slide{i}"))
        image_key = None
        if tiles_key in sdata.shapes:
            image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key")
            panel = slide_panel(sdata, table_key, genes)
            if table_key in sdata.tables and not panel:
                logger.warning(f"Slide {name!r}: none of the chosen genes is in its table; its tiles train "
                               "unconditioned.")
            if panel or not labeled_only:
                plan.append((sdata, name, tiles_key, image_key, panel))
        elif unlabeled_tiles_key is None or unlabeled_tiles_key not in sdata.shapes:
            raise KeyError(f"Slide {name!r} has no tiles {tiles_key!r} (run dbk.pp.make_tiles) and no "
                           f"unlabeled tiles {unlabeled_tiles_key!r}.")
        if not labeled_only and unlabeled_tiles_key is not None and unlabeled_tiles_key in sdata.shapes:
            ukey = sdata.shapes[unlabeled_tiles_key].attrs.get("dbk", {}).get("image_key", image_key)
            plan.append((sdata, f"{name}:{unlabeled_tiles_key}", unlabeled_tiles_key, ukey, []))
    if not plan:
        return []
    readers = [TileDataset(sd, key, image_key=ik, size_px=image_size) for sd, _, key, ik, _ in plan]
    total = sum(len(r) for r in readers) * image_size * image_size * 3
    preload = total <= preload_max_bytes
    sources = []
    for (sdata, name, key, image_key, panel), reader in zip(plan, readers, strict=True):
        src = _Source(name=name, n=len(reader), tile_size_um=_tile_size_um(sdata, key, reader.image_key))
        if preload:
            it = tqdm(range(len(reader)), desc=f"reading tiles of {name}", disable=not settings.progress,
                      leave=False)
            src.images = np.stack([reader.read(i) for i in it]) if len(reader) else np.zeros(
                (0, image_size, image_size, 3), np.uint8)
        else:
            src.reader = reader
        if panel:
            rows_ds = TileDataset(sdata, key, image_key=image_key, size_px=image_size, table_key=table_key,
                                  genes=panel)
            src.ids = vocab.ids(panel)
            src.x = rows_ds.expr
            m = rows_ds.mask > 0
            src.measured = None if m.all() else m
        sources.append(src)
    if not preload:
        logger.info(f"{total / 1024**3:.1f} GiB of tiles: streaming them with DataLoader workers instead of "
                    "reading them into memory.")
    return sources
