"""Gene names: map Ensembl ids (or any other names) to the gene symbols dbk matches genes by."""

from __future__ import annotations

from collections.abc import Mapping

import anndata as ad
import pandas as pd

from .._constants import TABLE_KEY, UNS_KEY
from .._genes import rename_genes
from .._logging import logger
from .._utils import copy_sdata, is_sdata


def map_gene_names(
    data,
    mapping: Mapping | pd.Series | str,
    *,
    table_key: str | None = None,
    keep_unmapped: bool = True,
    copy: bool = False,
):
    """Rename a table's genes, e.g. Ensembl ids to the gene symbols dbk matches genes by.

    dbk's gene encoder, panels and models are keyed by gene symbol (``ERBB2``, ``KRT5``, ...); a table whose
    ``var_names`` are Ensembl ids (``ENSG00000141736``, ...) matches none of them. Genes that map to one symbol
    are summed (``X`` and every layer, e.g. two Ensembl ids of one symbol); genes without a symbol in the mapping
    are kept under their old name or dropped, with a warning giving their number.

    Parameters
    ----------
    data
        A SpatialData object (its table ``table_key`` is renamed) or an AnnData.
    mapping
        Old name -> new name: a dict or a :class:`pandas.Series` indexed by the old names, or the name of a ``var``
        column holding the new names (as scanpy's ``gene_symbols``, e.g. ``"gene_symbols"``, ``"feature_name"``).
        Missing, NaN or empty new names leave a gene unmapped. Ensembl ids match with or without their version
        suffix (``ENSG00000141510.1`` in the table finds ``ENSG00000141510`` in the mapping; logged with the count).
    table_key
        The table of a SpatialData to rename; ``None``: ``"table"`` (the readers' table) if present, else the only
        table.
    keep_unmapped
        Keep genes without a new name under their old one (``True``) or drop them.
    copy
        SpatialData: return a modified copy instead of changing ``data`` in place.

    Returns
    -------
    SpatialData: ``None`` (or the copy with ``copy=True``), ``sdata.tables[table_key]`` replaced. AnnData: the
    renamed AnnData (a new object: an AnnData cannot change its genes in place). ``var`` keeps the first renamed
    gene's row and gains ``original_name`` (the old names, ``";"``-joined where genes were summed). The counts are
    summed exactly; a dbk tile table's ``X`` (``log1p`` of counts normalised per tile) is merged exactly as
    ``log1p(expm1(a) + expm1(b))``; any other non-integer matrix cannot be summed and raises ``ValueError`` when
    genes would merge.

    Examples
    --------
    >>> import dbk
    >>> sdata = dbk.io.read_hest("hest", "NCBI783")  # doctest: +SKIP
    >>> dbk.pp.map_gene_names(sdata, "gene_symbols")  # a var column of the table  # doctest: +SKIP
    >>> dbk.pp.map_gene_names(sdata, {"ENSG00000141736": "ERBB2"}, keep_unmapped=False)  # doctest: +SKIP
    """
    if isinstance(data, ad.AnnData):
        return _rename(data, mapping, keep_unmapped, "AnnData")
    if not is_sdata(data):
        raise TypeError(f"data must be a SpatialData or an AnnData, got {type(data).__name__}.")
    sdata = copy_sdata(data) if copy else data
    key = _table_key(sdata, table_key)
    sdata.tables[key] = _rename(sdata.tables[key], mapping, keep_unmapped, f"table {key!r}")
    return sdata if copy else None


def _rename(adata: ad.AnnData, mapping, keep_unmapped: bool, what: str) -> ad.AnnData:
    log1p_x = "pseudobulk" in adata.uns.get(UNS_KEY, {})  # a dbk tile table: X is log1p of normalised counts
    out = rename_genes(adata, mapping, keep_unmapped=keep_unmapped, what=what, log1p_x=log1p_x)
    logger.info(f"map_gene_names: {adata.n_vars:,} genes of the {what} -> {out.n_vars:,}.")
    return out


def _table_key(sdata, table_key: str | None) -> str:
    if table_key is not None:
        if table_key not in sdata.tables:
            raise KeyError(f"No table {table_key!r} in sdata.tables; available: {list(sdata.tables)}.")
        return table_key
    if TABLE_KEY in sdata.tables:
        return TABLE_KEY
    if len(sdata.tables) == 1:
        return next(iter(sdata.tables))
    raise ValueError(f"sdata has tables {list(sdata.tables)}; pass table_key= to say which to rename.")
