"""Tools: stage 1 (gene encoder, diffusion pretrainer), stage 2 (features, heads, DiffBulk), baselines, metrics.

The submodules import torch; they are loaded on first attribute access so that ``import dbk`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "GeneVocab": "._vocab",
    "GeneEncoder": "._gene_encoder",
    "EDM": "._edm",
    "heun_sample": "._edm",
    "DiffusionPretrainer": "._pretrainer",
    "GeneToImageNet": "._pretrainer",
    "fit_pretrainer": "._pretrainer",
    "latest_checkpoint": "._pretrainer",
    "PretrainerPreset": "._presets",
    "PRESETS": "._presets",
    "TileArrays": "._pretrainer",
    "auto_preset": "._presets",
    "get_preset": "._presets",
    "embed_tiles": "._embed",
    "load_foundation_model": "._embed",
    "fit_baseline": "._baselines",
    "MeanPredictor": "._baselines",
    "RidgeBaseline": "._baselines",
    "MLPBaseline": "._baselines",
    "evaluate": "._evaluate",
    "FusionHead": "._fusion",
    "FusionRegressor": "._fusion",
    "fit_head": "._fusion",
    "masked_mse": "._fusion",
    "fit_diffbulk": "._diffbulk",
    "DiffBulk": "._diffbulk",
    "diffusion_features": "._diffusion_features",
    "predictions_to_adata": "._predictions",
    "spatial_context": "._context",
    "RidgeFusionRegressor": "._fusion",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._baselines import MeanPredictor, MLPBaseline, RidgeBaseline, fit_baseline
    from ._context import spatial_context
    from ._diffbulk import DiffBulk, fit_diffbulk
    from ._diffusion_features import diffusion_features
    from ._edm import EDM, heun_sample
    from ._embed import embed_tiles, load_foundation_model
    from ._evaluate import evaluate
    from ._fusion import FusionHead, FusionRegressor, RidgeFusionRegressor, fit_head, masked_mse
    from ._gene_encoder import GeneEncoder
    from ._predictions import predictions_to_adata
    from ._presets import PRESETS, PretrainerPreset, auto_preset, get_preset
    from ._pretrainer import DiffusionPretrainer, GeneToImageNet, TileArrays, fit_pretrainer, latest_checkpoint
    from ._vocab import GeneVocab


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
