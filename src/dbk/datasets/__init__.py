"""Datasets: synthetic slides (offline, seeded), HEST-1k samples (Hugging Face hub) and registered public data.

The registry (:func:`available`, :func:`fetch`) lists public files with their sha256; :func:`her2st` reads the six
public her2st sections from it.

``import dbk.datasets`` stays light: the SpatialData stack loads on the first call that needs it.
"""

from .._lazy import lazy_exports
from ._her2st import her2st, her2st_genes
from ._registry import available, fetch

# these modules import spatialdata at import time: loaded on first attribute access
_EXPORTS = {"hest": "._hest", "synthetic": "._synthetic"}

__all__ = ["available", "fetch", "her2st", "her2st_genes", "hest", "synthetic"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
