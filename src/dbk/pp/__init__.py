"""Preprocessing: tissue, tiles, pseudo-bulk, gene panels and names, normalisation, train/test blocks, tile images.

The functions load on first use (most need the SpatialData stack; ``measured_mask`` and friends do not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "concat": "._concat",
    "measured_mask": "._concat",
    "select_genes": "._concat",
    # a deprecated alias of dbk.tl.prepare_corpus (preparing a corpus runs a foundation model), defined there: the one
    # name of dbk.pp that loads dbk.tl, and no code of dbk.pp calls it (tests/test_layers.py: DEPRECATED_ALIASES)
    "prepare": "..tl._corpus",
    "TileDataset": "._dataset",
    "export_tiles": "._dataset",
    "read_tile": "._dataset",
    "map_gene_names": "._genes",
    "normalize": "._normalize",
    "prepare_slide": "._prepare",
    "prepare_slides": "._prepare",
    "is_control_probe": "._pseudobulk",
    "pseudobulk": "._pseudobulk",
    "spatial_blocks": "._split",
    "make_tiles": "._tiles",
    "tile_bounds": "._tiles",
    "tissue_mask": "._tissue",
    "from_wsidata": "._wsidata",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._concat import concat, measured_mask, select_genes
    from ._dataset import TileDataset, export_tiles, read_tile
    from ._genes import map_gene_names
    from ._normalize import normalize
    from ._prepare import prepare_slide, prepare_slides
    from ._pseudobulk import is_control_probe, pseudobulk
    from ._split import spatial_blocks
    from ._tiles import make_tiles, tile_bounds
    from ._tissue import tissue_mask
    from ._wsidata import from_wsidata


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
