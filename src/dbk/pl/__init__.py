"""Plots: tiles over the H&E, spatial maps of measured vs predicted expression, metrics, training curves."""

from ._metrics import benchmark, gene_metrics, training_history
from ._scatter import scatter
from ._spatial import spatial
from ._tiles import tiles

__all__ = ["benchmark", "gene_metrics", "scatter", "spatial", "tiles", "training_history"]
