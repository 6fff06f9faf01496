"""Plots: tiles over the H&E, spatial maps of measured vs predicted expression, metrics, training curves."""

from ._generated import generated
from ._metrics import benchmark, gene_metrics, training_history
from ._scatter import scatter
from ._spatial import spatial
from ._tiles import tiles

__all__ = ["benchmark", "gene_metrics", "generated", "scatter", "spatial", "tiles", "training_history"]
