"""Gene names: checks shared by every layer (readers, pre-processing, models)."""

from __future__ import annotations

from collections.abc import Iterable


def check_gene_names(names: Iterable, what: str) -> list[str]:
    """Raise a clear error unless ``names`` are distinct, non-empty strings (gene symbols); return them as a list.

    ``what`` names where they come from (e.g. ``"table 'dbk_table' of slide 'A1'"``) for the message.
    """
    names = list(names)
    bad = [g for g in names if not isinstance(g, str) or not g]
    if bad:
        kinds = sorted({type(g).__name__ for g in bad})
        raise TypeError(f"The {what} has {len(bad)} gene name(s) that are not non-empty strings (e.g. {bad[:5]}, "
                        f"{'/'.join(kinds)}); genes are matched by symbol. Set string names first, e.g. "
                        "adata.var_names = adata.var['gene_symbol'] or adata.var_names.astype(str).")
    seen: set[str] = set()
    dup = sorted({g for g in names if g in seen or seen.add(g)})
    if dup:
        raise ValueError(f"The {what} has duplicate gene names {dup[:10]}; make them unique first (e.g. sum the "
                         "duplicated columns, or adata.var_names_make_unique()).")
    return names
