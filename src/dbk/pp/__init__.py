"""Preprocessing: tissue, tiles, pseudo-bulk, gene panels, normalisation, tile images."""

from ._concat import concat, measured_mask, select_genes
from ._dataset import TileDataset, export_tiles, read_tile
from ._normalize import normalize
from ._pseudobulk import is_control_probe, pseudobulk
from ._tiles import make_tiles, tile_bounds
from ._tissue import tissue_mask

__all__ = [
    "TileDataset",
    "concat",
    "export_tiles",
    "is_control_probe",
    "make_tiles",
    "measured_mask",
    "normalize",
    "pseudobulk",
    "read_tile",
    "select_genes",
    "tile_bounds",
    "tissue_mask",
]
