"""Slides the torch core does not read itself, and the readers that a layer above it registers for them.

The core trains on :class:`~dbk.core.TileArrays`. Any other kind of slide (a SpatialData) reaches it through a
:class:`SlideReader` registered here by the layer that knows that kind: importing :mod:`dbk.tl` registers
:mod:`dbk.pp`'s SpatialData reader (:class:`dbk.pp._tile_sources.SpatialDataReader`). The core names no such layer,
and this module imports nothing (no torch), so registering one costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class SlideReader(Protocol):
    """What the core asks of a reader: which slides it reads, their gene panel, and their tiles as sources."""

    def accepts(self, slide: Any) -> bool:
        """Whether ``slide`` is of the kind this reader reads."""

    def panel(self, slide: Any, table_key: str, genes: Sequence[str] | None) -> list[str]:
        """The genes of ``slide`` to condition on (restricted to ``genes`` when given); ``[]`` without profiles."""

    def sources(self, slides: list, *, vocab, image_size: int, genes: Sequence[str] | None, table_key: str,
                tiles_key: str, unlabeled_tiles_key: str | None, labeled_only: bool,
                preload_max_bytes: int) -> list:
        """One ``dbk.core._data._Source`` per tiles element of the slides in ``slides``.

        ``slides`` is the core's list of slides with ``None`` in place of those that are not this reader's (TileArrays,
        other kinds): a slide's position in it may name it.
        """


_READERS: list[SlideReader] = []


def register_slide_reader(reader: SlideReader) -> None:
    """Let the core read the slides that ``reader.accepts``; one of the same class registered before is replaced."""
    for i, known in enumerate(_READERS):
        if type(known) is type(reader):
            _READERS[i] = reader
            return
    _READERS.append(reader)


def slide_reader(slide: Any) -> SlideReader | None:
    """The first registered reader that accepts ``slide`` (``None``: no reader does)."""
    return next((r for r in _READERS if r.accepts(slide)), None)
