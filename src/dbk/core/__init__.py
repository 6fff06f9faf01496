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
    "DiffusionPretrainer": "._pretrainer",
    "GeneToImageNet": "._pretrainer",
    "latest_checkpoint": "._pretrainer",
    "TileArrays": "._pretrainer",
    "PretrainerPreset": "._presets",
    "PRESETS": "._presets",
    "auto_preset": "._presets",
    "get_preset": "._presets",
    "InputScaler": "._scaler",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._edm import EDM, heun_sample
    from ._gene_encoder import GeneEncoder
    from ._presets import PRESETS, PretrainerPreset, auto_preset, get_preset
    from ._pretrainer import DiffusionPretrainer, GeneToImageNet, TileArrays, latest_checkpoint
    from ._scaler import InputScaler
    from ._vocab import GeneVocab

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
