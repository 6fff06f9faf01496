"""Datasets: synthetic slides, HEST-1k samples and HEST-Benchmark tasks (Hugging Face hub), registered public data.

Synthetic slides are made offline and seeded; :func:`hest_bench` finds or fetches a HEST-Benchmark task (its split
files, genes, patches and expression) for :func:`dbk.tl.benchmark`.

:func:`hest_from_her2st` writes the her2st sections as HEST-1k samples (SPA137-SPA145) from the her2st files, for
:func:`hest` to read without the hub.

The registry (:func:`available`, :func:`fetch`) lists public files with their sha256; :func:`her2st` reads the six
public her2st sections from it.

``import dbk.datasets`` stays light: the SpatialData stack loads on the first call that needs it.
"""

from .._lazy import lazy_exports
from ._her2st import her2st, her2st_genes
from ._registry import available, fetch

# loaded on first attribute access (all but _hest_bench import spatialdata at import time)
_EXPORTS = {"hest": "._hest", "hest_from_her2st": "._hest_local", "synthetic": "._synthetic",
            "hest_bench": "._hest_bench", "HestBenchTask": "._hest_bench"}

__all__ = ["HestBenchTask", "available", "fetch", "her2st", "her2st_genes", "hest", "hest_bench", "hest_from_her2st",
           "synthetic"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
