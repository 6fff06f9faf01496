"""Targets: log1p of (optionally library-size normalised) counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .._constants import COUNTS_LAYER


def normalize(
    adata: ad.AnnData,
    *,
    target_sum: float | None = 1e4,
    log1p: bool = True,
    layer: str = COUNTS_LAYER,
    copy: bool = False,
) -> ad.AnnData | None:
    """Write ``X`` = log1p(counts / total * target_sum) from raw counts.

    Parameters
    ----------
    adata
        Tiles x genes with raw counts in ``layers[layer]`` (or in ``X`` when that layer is absent).
    target_sum
        Library size each tile is scaled to; ``None`` skips scaling (log1p of raw counts). Tiles with no counts
        stay all zero.
    log1p
        Apply ``log1p`` after scaling.
    layer
        Layer with raw counts.
    copy
        Return a modified copy instead of changing ``adata`` in place.

    Returns
    -------
    ``None`` or the copy; writes ``X`` (float32, sparse if the counts are) and ``uns["dbk"]["normalize"]``.
    """
    if copy:
        adata = adata.copy()
    counts = adata.layers[layer] if layer in adata.layers else adata.X
    X = sp.csr_matrix(counts, dtype=np.float64) if sp.issparse(counts) else np.asarray(counts, dtype=np.float64)
    values = X.data if sp.issparse(X) else X
    if values.size and (not np.isfinite(values).all() or (values < 0).any()):
        where = f"layers[{layer!r}]" if layer in adata.layers else f"X (no layers[{layer!r}])"
        raise ValueError(f"{where} has NaN, infinite or negative counts ({int((~np.isfinite(values)).sum())} "
                         f"non-finite, {int((values < 0).sum())} negative); counts must be finite and >= 0.")
    if target_sum is not None:
        if target_sum <= 0:
            raise ValueError(f"target_sum must be positive, got {target_sum!r}.")
        totals = np.asarray(X.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        X = sp.diags(scale) @ X if sp.issparse(X) else X * scale[:, None]
    if log1p:
        X = X.log1p() if sp.issparse(X) else np.log1p(X)
    adata.X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else X.astype(np.float32)
    adata.uns.setdefault("dbk", {})["normalize"] = {
        "target_sum": "None" if target_sum is None else float(target_sum),
        "log1p": bool(log1p),
    }
    return adata if copy else None
