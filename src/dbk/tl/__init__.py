"""Tools: stage 1 (gene encoder, diffusion pretrainer), stage 2 (features, heads, DiffBulk), baselines, metrics.

The submodules import torch; they are loaded on first attribute access so that ``import dbk`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "GeneVocab": "..core._vocab",
    "GeneEncoder": "..core._gene_encoder",
    "EDM": "..core._edm",
    "heun_sample": "..core._edm",
    "DiffusionPretrainer": "..core._pretrainer",
    "GeneToImageNet": "..core._network",
    "fit_pretrainer": "..core._fit_pretrainer",
    "latest_checkpoint": "..core._checkpoint",
    "PretrainerPreset": "..core._presets",
    "PRESETS": "..core._presets",
    "TileArrays": "..core._data",
    "auto_preset": "..core._presets",
    "get_preset": "..core._presets",
    "embed_tiles": "._embed",
    "prepare_corpus": "._corpus",
    "load_foundation_model": "._embed",
    "list_fms": "._fm_zoo",
    "wrap_fm": "._fm_zoo",
    "fit_baseline": "._baselines",
    "MeanPredictor": "._baselines",
    "RidgeBaseline": "._ridge",
    "MLPBaseline": "._baselines",
    "evaluate": "._evaluate",
    "FusionHead": "..core._heads",
    "FusionRegressor": "._fusion",
    "fit_head": "._fusion",
    "masked_mse": "..core._head_training",
    "fit_diffbulk": "._fit",
    "DiffBulk": "._model",
    "diffusion_features": "._diffusion_features",
    "predictions_to_adata": "._predictions",
    "cv_pearson": "._predictions",
    "cv_trusted": "._predictions",
    "effective_rank": "._effective_rank",
    "spatial_context": "._context",
    "neighbor_mean": "._context",
    "model_key": "._embed",
    "nan_pearson": "._evaluate",
    "RidgeFusionRegressor": "._fusion",
    "benchmark": "._benchmark",
    "benchmark_summary": "._benchmark_results",
    "hest_summary": "._benchmark_hest",
    "paired_differences": "._benchmark_results",
    "BenchmarkFold": "._benchmark_methods",
    "register_method": "._benchmark_methods",
    "benchmark_methods": "._benchmark_methods",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ..core._checkpoint import latest_checkpoint
    from ..core._data import TileArrays
    from ..core._edm import EDM, heun_sample
    from ..core._fit_pretrainer import fit_pretrainer
    from ..core._gene_encoder import GeneEncoder
    from ..core._head_training import masked_mse
    from ..core._heads import FusionHead
    from ..core._network import GeneToImageNet
    from ..core._presets import PRESETS, PretrainerPreset, auto_preset, get_preset
    from ..core._pretrainer import DiffusionPretrainer
    from ..core._vocab import GeneVocab
    from ._baselines import MeanPredictor, MLPBaseline, fit_baseline
    from ._benchmark import benchmark
    from ._benchmark_hest import hest_summary
    from ._benchmark_methods import BenchmarkFold, benchmark_methods, register_method
    from ._benchmark_results import benchmark_summary, paired_differences
    from ._context import neighbor_mean, spatial_context
    from ._corpus import prepare_corpus
    from ._diffusion_features import diffusion_features
    from ._effective_rank import effective_rank
    from ._embed import embed_tiles, load_foundation_model, model_key
    from ._evaluate import evaluate, nan_pearson
    from ._fit import fit_diffbulk
    from ._fm_zoo import list_fms, wrap_fm
    from ._fusion import FusionRegressor, RidgeFusionRegressor, fit_head
    from ._model import DiffBulk
    from ._predictions import cv_pearson, cv_trusted, predictions_to_adata
    from ._ridge import RidgeBaseline


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def _register_spatialdata_reader() -> None:
    """Register :mod:`dbk.pp`'s SpatialData reader with the torch core (neither module loads torch).

    The core reads SpatialData slides (``fit_pretrainer``, ``DiffusionPretrainer.fit`` / ``evaluate``) through it; the
    core itself imports no layer above it.
    """
    from ..core._slides import register_slide_reader
    from ..pp._tile_sources import SpatialDataReader

    register_slide_reader(SpatialDataReader())


_register_spatialdata_reader()
