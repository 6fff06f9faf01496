"""Plots: tiles over the H&E, spatial maps, metrics."""

from ._tiles import tiles

__all__ = ["tiles"]
