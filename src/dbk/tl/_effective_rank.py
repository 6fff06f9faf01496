"""How many independent patterns a prediction matrix carries: its effective rank, and a warning when it is few.

A head can predict hundreds of genes from a handful of latent patterns (a reduced-rank ridge of target rank 2, or a
network that learned only the main axes). Each gene's map may still correlate with the truth, but gene-gene
correlations, clusters and spatially variable genes computed on such predictions only restate those few patterns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._logging import logger

#: A singular value of the centred matrix counts when it is above this fraction of the largest.
REL_TOL = 0.01
#: Predictions are called low-dimensional when their effective rank is below this fraction of the targets'.
LOW_FRACTION = 0.25
DEFINITION = (f"number of singular values of the centred matrix (tiles x genes, each gene minus its mean) above "
              f"{REL_TOL:g} x the largest")


def effective_rank(x: np.ndarray | pd.DataFrame, *, rel_tol: float = REL_TOL) -> int:
    """The effective rank of a tiles x genes matrix: singular values of the centred matrix above ``rel_tol`` x max.

    Parameters
    ----------
    x
        Tiles x genes (predictions or measured values). NaN entries (unmeasured) are set to the gene's mean.
    rel_tol
        Relative threshold on the singular values.

    Returns
    -------
    The number of patterns (0 for a constant matrix). A matrix whose genes all follow one map has rank 1, whatever
    the number of genes.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> dbk.tl.effective_rank(rng.normal(size=(50, 1)) @ rng.normal(size=(1, 30)))  # doctest: +SKIP
    1
    """
    a = np.asarray(x.to_numpy() if isinstance(x, pd.DataFrame) else x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"effective_rank needs a 2-d matrix (tiles x genes), got shape {a.shape}.")
    if a.size == 0:
        return 0
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(np.where(np.isfinite(a), a, np.nan), axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    c = np.where(np.isfinite(a), a, mean) - mean
    s = np.linalg.svd(c, compute_uv=False)
    if not len(s) or s[0] <= 1e-12 * max(1.0, float(np.abs(a).max())):
        return 0
    return int((s > float(rel_tol) * s[0]).sum())


def is_low(pred_rank: int, target_rank: int | None, n_genes: int) -> bool:
    """Whether ``pred_rank`` patterns are far fewer than the targets carry (``target_rank``, or the genes)."""
    ref = target_rank if target_rank else n_genes
    ref = min(ref, n_genes)
    return ref >= 4 and pred_rank < LOW_FRACTION * ref


def rank_message(what: str, pred_rank: int, target_rank: int | None, n_genes: int) -> str:
    ref = f"the training targets carry {target_rank}" if target_rank else f"{n_genes} genes"
    return (f"{what}: the predictions of {n_genes} genes span only {pred_rank} independent pattern"
            f"{'s' if pred_rank != 1 else ''} (effective rank {pred_rank}; {ref}). Gene-gene correlations, clusters "
            f"and spatially variable genes computed on these predictions are not meaningful beyond {pred_rank} "
            f"pattern{'s' if pred_rank != 1 else ''}: each predicted map is a mix of the same few maps. For such "
            f"analyses fit a full-rank head (fit_diffbulk(..., fusion='ridge')), which keeps more of the targets' "
            f"patterns, usually at some cost in per-gene Pearson.")


def rank_record(pred, target_rank: int | None, *, what: str, warn: bool = True) -> dict:
    """``{"predictions": k, "targets": K, "low": bool, "definition": ...}``; warns (``what`` names the caller)."""
    k = effective_rank(pred)
    n_genes = int(np.shape(pred)[1])
    low = is_low(k, target_rank, n_genes)
    if low and warn:
        logger.warning(rank_message(what, k, target_rank, n_genes))
    return {"predictions": k, "targets": None if target_rank is None else int(target_rank), "low": bool(low),
            "n_genes": n_genes, "definition": DEFINITION}
