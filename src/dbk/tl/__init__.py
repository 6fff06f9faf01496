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
    "GeneToImageNet": "..core._pretrainer",
    "fit_pretrainer": "..core._pretrainer",
    "latest_checkpoint": "..core._pretrainer",
    "PretrainerPreset": "..core._presets",
    "PRESETS": "..core._presets",
    "TileArrays": "..core._pretrainer",
    "auto_preset": "..core._presets",
    "get_preset": "..core._presets",
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
    from ..core._edm import EDM, heun_sample
    from ..core._gene_encoder import GeneEncoder
    from ..core._presets import PRESETS, PretrainerPreset, auto_preset, get_preset
    from ..core._pretrainer import DiffusionPretrainer, GeneToImageNet, TileArrays, fit_pretrainer, latest_checkpoint
    from ..core._vocab import GeneVocab
    from ._baselines import MeanPredictor, MLPBaseline, RidgeBaseline, fit_baseline
    from ._context import spatial_context
    from ._diffbulk import DiffBulk, fit_diffbulk
    from ._diffusion_features import diffusion_features
    from ._embed import embed_tiles, load_foundation_model
    from ._evaluate import evaluate
    from ._fusion import FusionHead, FusionRegressor, RidgeFusionRegressor, fit_head, masked_mse
    from ._predictions import predictions_to_adata


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
