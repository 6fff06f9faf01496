"""Preprocessing: tissue, tiles, pseudo-bulk, normalisation."""

from ._normalize import normalize
from ._pseudobulk import is_control_probe, pseudobulk
from ._tiles import make_tiles, tile_bounds
from ._tissue import tissue_mask

__all__ = ["is_control_probe", "make_tiles", "normalize", "pseudobulk", "tile_bounds", "tissue_mask"]
