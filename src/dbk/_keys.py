"""Element keys the user names: a named ``tiles_key`` / ``table_key`` must exist; only the defaults are made.

dbk makes the tiles (``"dbk_tiles"``) and the tile table (``"dbk_table"``) of a slide on demand. A key the user
types is taken to name something that exists: a typo (``table_key="dbk_tabel"``) would otherwise make a second
table silently and train, predict or write to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._constants import TILES_KEY, TILES_TABLE_KEY


def check_named_keys(
    sdata,
    name: str,
    *,
    tiles_key: str | None = TILES_KEY,
    table_key: str | None = TILES_TABLE_KEY,
    where: str = "dbk",
) -> None:
    """Raise ``KeyError`` when a non-default ``tiles_key`` or ``table_key`` names no element of the slide.

    Parameters
    ----------
    sdata
        The slide (a SpatialData).
    name
        The slide's name, for the message.
    tiles_key
        Shapes element with the tiles; the default ``"dbk_tiles"`` (or ``None``) is not checked: it is made when
        missing.
    table_key
        The tile table; the default ``"dbk_table"`` (or ``None``) is not checked.
    where
        The function the keys were given to, for the message.

    Raises
    ------
    KeyError
        Naming the key, the slide and the keys the slide has.
    """
    if tiles_key is not None and tiles_key != TILES_KEY and tiles_key not in sdata.shapes:
        raise KeyError(
            f"{where}: tiles_key={tiles_key!r} names no shapes element of slide {name!r} (its shapes: "
            f"{sorted(sdata.shapes)}); only the default {TILES_KEY!r} is made when missing. Check the spelling, or "
            f"make the tiles first with dbk.pp.make_tiles(sdata, key_added={tiles_key!r})."
        )
    if table_key is not None and table_key != TILES_TABLE_KEY and table_key not in sdata.tables:
        raise KeyError(
            f"{where}: table_key={table_key!r} names no table of slide {name!r} (its tables: "
            f"{sorted(sdata.tables)}); only the default {TILES_TABLE_KEY!r} is made when missing. Check the "
            f"spelling, or make the table first with dbk.pp.pseudobulk(sdata, key_added={table_key!r})."
        )


def check_named_keys_of_slides(
    slides: Sequence, names: Sequence[str], *, tiles_key: str | None, table_key: str | None, where: str
) -> None:
    """:func:`check_named_keys` on every slide (``slides`` and their ``names`` as :func:`dbk.pp.prepare_slides`)."""
    for sdata, name in zip(slides, names, strict=True):
        check_named_keys(sdata, name, tiles_key=tiles_key, table_key=table_key, where=where)
