"""Plots: tiles over the H&E, spatial maps of measured vs predicted expression, metrics."""

from ._scatter import scatter
from ._spatial import spatial
from ._tiles import tiles

__all__ = ["scatter", "spatial", "tiles"]
