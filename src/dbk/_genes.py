"""Gene names: checks shared by every layer (readers, pre-processing, models)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ._logging import logger


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


# -- Ensembl gene ids -------------------------------------------------------------------------------------------------

# ENSG00000141736 (human), ENSMUSG00000020122 (mouse), ENSDARG..., ENSRNOG...; an optional version suffix ".12"
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")
ENSEMBL_MAJORITY = 0.5  # warn when at least this share of the gene names are Ensembl ids
_WARNED: set[int] = set()  # fingerprints of the id sets warned about: one warning per set (reader, then pseudobulk)


def ensembl_like(names: Iterable) -> list[str]:
    """The names among ``names`` that look like Ensembl gene ids (``ENSG00000141736``, ``ENSMUSG…``, ``….12``)."""
    return [str(n) for n in names if isinstance(n, str) and ENSEMBL_ID.match(n)]


def warn_if_ensembl(names: Iterable, what: str, *, how_to_map: str | None = None) -> bool:
    """Warn (one message, with examples) when most of ``names`` look like Ensembl gene ids; return whether they do.

    The same set of ids is warned about once per session (e.g. by the reader, then not again by pseudobulk).

    dbk matches genes by symbol (the gene encoder's vocabulary, panels, model genes), so a table keyed by Ensembl
    ids matches nothing. Below :data:`ENSEMBL_MAJORITY` (a few ids among symbols: genes without a symbol) an info
    message only.
    """
    names = list(names)
    ids = ensembl_like(names)
    if not ids:
        return False
    share = len(ids) / len(names)
    hint = how_to_map or ("map them to symbols with dbk.pp.map_gene_names(data, mapping) (a dict id -> symbol, or "
                          "the name of a var column holding the symbols)")
    fingerprint = hash(frozenset(ids))
    if share >= ENSEMBL_MAJORITY and fingerprint in _WARNED:
        logger.info(f"The {what} names its genes by Ensembl id ({len(ids):,} of {len(names):,}; warned before).")
        return True
    if share < ENSEMBL_MAJORITY:
        logger.info(f"The {what} has {len(ids):,} gene name(s) that look like Ensembl ids among {len(names):,} "
                    f"(e.g. {ids[:3]}); they will match no gene symbol.")
        return False
    _WARNED.add(fingerprint)
    logger.warning(
        f"The {what} names its genes by Ensembl id ({len(ids):,} of {len(names):,}, e.g. {ids[:3]}), but dbk matches "
        f"genes by symbol (ERBB2, KRT5, ...: the gene encoder's vocabulary, panels, model genes), so these genes "
        f"will match no model gene. To fix, {hint}."
    )
    return True


def symbol_mapping(
    names: Sequence[str], new: Sequence, *, keep_unmapped: bool = True
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The new name of each of ``names`` (``new``: one value per name; ``None``, NaN or empty: unmapped).

    Returns ``(columns, new_names, unmapped)``: the positions in ``names`` of the kept columns, their new names (with
    duplicates where several old names map to one), and the positions of the names without a new one (kept under
    their old name when ``keep_unmapped``, else left out of ``columns``).
    """
    new = np.asarray(new, dtype=object)
    mapped = np.array([isinstance(v, str) and bool(v.strip()) for v in new], dtype=bool)
    unmapped = np.flatnonzero(~mapped)
    if keep_unmapped:
        cols = np.arange(len(names))
        out = [str(v).strip() if ok else str(n) for n, v, ok in zip(names, new, mapped, strict=True)]
    else:
        cols = np.flatnonzero(mapped)
        out = [str(new[i]).strip() for i in cols]
    return cols, out, unmapped


def merge_columns(X, columns: np.ndarray, new_names: list[str], *, log1p: bool = False):
    """``X[:, columns]`` with the columns of equal ``new_names`` summed; return ``(matrix, unique names)``.

    Sparse stays sparse (CSR), dense stays dense; the dtype is kept. ``log1p=True`` merges ``log1p`` values exactly
    (``log1p(expm1(a) + expm1(b))``: the log of the summed, identically scaled counts).
    """
    import scipy.sparse as sp

    codes, uniques = pd.factorize(pd.Index(new_names))
    if len(uniques) == len(columns):  # nothing to merge: a plain selection, exact
        return X[:, columns], [str(n) for n in new_names]
    sub = X[:, columns]
    if log1p:
        sub = sub.expm1() if sp.issparse(sub) else np.expm1(sub)
    agg = sp.csr_matrix((np.ones(len(columns), dtype=sub.dtype), (np.arange(len(columns)), codes)),
                        shape=(len(columns), len(uniques)))
    out = (sp.csr_matrix(sub) @ agg).tocsr() if sp.issparse(sub) else np.asarray(sub @ agg)
    if log1p:
        out = out.log1p() if sp.issparse(out) else np.log1p(out)
    return out.astype(X.dtype, copy=False), [str(u) for u in uniques]


def rename_genes(adata, mapping: Mapping | pd.Series | str, *, keep_unmapped: bool = True, what: str = "table",
                 log1p_x: bool = False):
    """A new AnnData with ``adata``'s genes renamed by ``mapping`` (see :func:`dbk.pp.map_gene_names`).

    ``mapping``: old name -> new name (a dict or Series), or the name of a ``var`` column holding the new names.
    Genes that map to one name are summed (``X`` and every layer; ``log1p_x``: ``X`` holds log1p values, merged
    exactly); genes without a new name are kept (or dropped), both logged with counts. ``var`` keeps the first
    gene's row and gains ``original_name`` (the old names, ``";"``-joined where merged).
    """
    import anndata as ad
    import scipy.sparse as sp

    old = [str(n) for n in adata.var_names]
    if isinstance(mapping, str):
        if mapping not in adata.var.columns:
            raise KeyError(f"No var column {mapping!r} in the {what} (var columns: {list(adata.var.columns)}); "
                           "gene_symbols / mapping names the var column holding the gene symbols.")
        new = adata.var[mapping].to_numpy(dtype=object)
        source = f"var[{mapping!r}]"
    elif isinstance(mapping, (Mapping, pd.Series)):
        lookup = mapping if isinstance(mapping, pd.Series) else pd.Series(dict(mapping), dtype=object)
        if lookup.index.has_duplicates:
            dup = lookup.index[lookup.index.duplicated()].unique()[:5].tolist()
            raise ValueError(f"The gene mapping lists some names several times (e.g. {dup}); give one new name each.")
        lookup.index = lookup.index.astype(str)
        new = lookup.reindex(pd.Index(old)).to_numpy(dtype=object)
        source = "the mapping"
        new = _match_without_versions(old, new, lookup, what)
    else:
        raise TypeError(f"mapping must be a dict, a pandas Series or a var column name, got {type(mapping).__name__}.")
    cols, names, unmapped = symbol_mapping(old, new, keep_unmapped=keep_unmapped)
    if len(unmapped):
        fate = "kept under their old names" if keep_unmapped else "dropped (keep_unmapped=False)"
        logger.warning(f"{len(unmapped):,} of the {len(old):,} genes of the {what} have no new name in {source} "
                       f"(e.g. {[old[i] for i in unmapped[:5]]}); {fate}.")
    if not len(cols):
        raise ValueError(f"No gene of the {what} has a new name in {source}; nothing would be left.")
    codes, uniques = pd.factorize(pd.Index(names))
    merged = len(uniques) < len(cols)
    if merged:
        counts = np.bincount(codes)
        shared = [str(u) for u, c in zip(uniques, counts, strict=True) if c > 1]
        logger.info(f"{int(counts[counts > 1].sum()):,} genes of the {what} map to {len(shared):,} shared names "
                    f"(e.g. {shared[:5]}); their columns were summed.")

    def merge(X, name: str, log1p: bool = False):
        if merged and not log1p and not _whole_numbers(X):
            raise ValueError(f"{name} of the {what} holds non-integer values, which cannot be summed over the genes "
                             "that map to one name; map the gene names on raw counts (before normalising).")
        out, _ = merge_columns(X, cols, names, log1p=log1p)
        if merged and name == "layers['measured']":
            out = out.minimum(1) if sp.issparse(out) else np.minimum(out, 1)
        return out

    X = merge(adata.X, "X", log1p_x) if adata.X is not None else None
    # anndata >= 0.13 lists X as layers[None]; passing it back beside X raises, so the named layers only
    layers = {k: merge(v, f"layers[{k!r}]") for k, v in adata.layers.items() if k is not None}
    first = np.unique(codes, return_index=True)[1]  # factorize numbers names in order of first appearance
    var = adata.var.iloc[cols[first]].copy()
    joined = pd.Series([old[i] for i in cols]).groupby(codes).agg(";".join)
    var["original_name"] = joined.to_numpy(dtype=object)
    var.index = pd.Index([str(u) for u in uniques], dtype=object)
    out = ad.AnnData(X=X, obs=adata.obs.copy(), var=var, uns=copy.deepcopy(dict(adata.uns)), obsm=dict(adata.obsm),
                     obsp=dict(adata.obsp), layers=layers)
    if not merged:
        for k, v in adata.varm.items():
            out.varm[k] = v[cols]
    return out


def strip_version(name: str) -> str:
    """An Ensembl id without its version suffix (``ENSG00000141510.16`` -> ``ENSG00000141510``); others unchanged."""
    return name.split(".", 1)[0] if ENSEMBL_ID.match(name) else name


def _match_without_versions(old: list[str], new: np.ndarray, lookup: pd.Series, what: str) -> np.ndarray:
    """``new`` with the Ensembl ids that the mapping has only with another (or no) version suffix mapped too.

    ``ENSG00000141510.1`` in the table matches ``ENSG00000141510`` (or ``ENSG00000141510.16``) in the mapping when
    that unversioned id has one new name there; logged with the count.
    """
    unmatched = [i for i, v in enumerate(new) if not (isinstance(v, str) and v.strip()) and ENSEMBL_ID.match(old[i])]
    if not unmatched:
        return new
    keys = [str(k) for k in lookup.index]
    by_base: dict[str, set] = {}
    for k, v in zip(keys, lookup.to_numpy(dtype=object), strict=True):
        if ENSEMBL_ID.match(k) and isinstance(v, str) and v.strip():
            by_base.setdefault(strip_version(k), set()).add(v.strip())
    new = new.copy()
    matched = []
    for i in unmatched:
        names = by_base.get(strip_version(old[i]), set())
        if len(names) == 1:
            new[i] = next(iter(names))
            matched.append(i)
    if matched:
        first = old[matched[0]]
        logger.info(f"{len(matched):,} Ensembl ids of the {what} matched the mapping only without their version "
                    f"suffix (e.g. {first!r} as {strip_version(first)!r}); mapped by the unversioned id.")
    return new


def _whole_numbers(X) -> bool:
    import scipy.sparse as sp

    data = X.data if sp.issparse(X) else np.asarray(X)
    if data.dtype.kind in "biu":
        return True
    return bool(np.all(np.isfinite(data)) and np.all(data == np.round(data)))
