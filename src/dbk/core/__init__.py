"""The torch core: networks, training loop and datasets over arrays, without the SpatialData stack.

It imports torch, diffusers, accelerate, numpy and scipy only, so stage 1 trains on a bare GPU node from exported
tiles (:class:`TileArrays`). The scverse layer (:mod:`dbk.tl`) turns SpatialData into what the core eats and
re-exports these names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "GeneVocab": "._vocab",
    "GeneEncoder": "._gene_encoder",
    "EDM": "._edm",
    "heun_sample": "._edm",
    "fit_pretrainer": "._fit_pretrainer",
    "DiffusionPretrainer": "._pretrainer",
    "GeneToImageNet": "._network",
    "latest_checkpoint": "._checkpoint",
    "TileArrays": "._data",
    "PretrainerPreset": "._presets",
    "PRESETS": "._presets",
    "auto_preset": "._presets",
    "get_preset": "._presets",
    "InputScaler": "._scaler",
    "FusionHead": "._heads",
    "MLPNet": "._heads",
    "masked_mse": "._head_training",
    "train_network": "._head_training",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._checkpoint import latest_checkpoint
    from ._data import TileArrays
    from ._edm import EDM, heun_sample
    from ._fit_pretrainer import fit_pretrainer
    from ._gene_encoder import GeneEncoder
    from ._head_training import masked_mse, train_network
    from ._heads import FusionHead, MLPNet
    from ._network import GeneToImageNet
    from ._presets import PRESETS, PretrainerPreset, auto_preset, get_preset
    from ._pretrainer import DiffusionPretrainer
    from ._scaler import InputScaler
    from ._vocab import GeneVocab

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
