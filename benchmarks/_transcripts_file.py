"""Write a Xenium/HEST-like ``transcripts.parquet`` of a given size, streaming (never all rows in memory).

Columns as Xenium ships them (``transcript_id, cell_id, overlaps_nucleus, feature_name, x_location, y_location,
z_location, qv``) plus HEST's ``he_x, he_y`` (H&E pixels). Coordinates are uniform over a square whose side is a
whole number of 224-px tiles, with 1 in 50 points snapped onto tile edges; 2% control probes; qv ~ U(0, 40).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TILE_PX = 224  # 112 µm at 0.5 µm / px
PIXEL_SIZE_UM = 0.5
N_GENES = 300
CONTROLS = [f"NegControlProbe_{i:05d}" for i in range(10)] + [f"BLANK_{i:04d}" for i in range(10)] + [
    f"UnassignedCodeword_{i:04d}" for i in range(5)
]


def layout(n_transcripts: int) -> tuple[int, int]:
    """(tiles per side, image side in px) so that tiles are 2.5k at 1 M ... 40k at 50 M (~1,250 per tile)."""
    n_tiles = {1_000_000: 2_500, 10_000_000: 10_000, 50_000_000: 40_000}.get(n_transcripts, n_transcripts // 1250)
    side = max(2, math.isqrt(max(n_tiles, 4)))
    return side, side * TILE_PX


def write(path: Path, n_transcripts: int, *, seed: int = 0, row_group: int = 1_000_000) -> dict:
    side, w = layout(n_transcripts)
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i:04d}" for i in range(N_GENES)] + CONTROLS
    p = np.r_[np.full(N_GENES, 0.98 / N_GENES), np.full(len(CONTROLS), 0.02 / len(CONTROLS))]
    schema = pa.schema([
        ("transcript_id", pa.uint64()), ("cell_id", pa.string()), ("overlaps_nucleus", pa.uint8()),
        ("feature_name", pa.string()), ("x_location", pa.float32()), ("y_location", pa.float32()),
        ("z_location", pa.float32()), ("qv", pa.float32()), ("he_x", pa.float32()), ("he_y", pa.float32()),
    ])
    genes_arr = pa.array(genes)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        done = 0
        while done < n_transcripts:
            n = min(row_group, n_transcripts - done)
            x = rng.uniform(0, w, n).astype(np.float32)
            y = rng.uniform(0, w, n).astype(np.float32)
            snap = rng.random(n) < 0.02
            x[snap] = (rng.integers(0, side, snap.sum()) * TILE_PX).astype(np.float32)
            g = rng.choice(len(genes), n, p=p)
            qv = rng.uniform(0, 40, n).astype(np.float32)
            batch = pa.record_batch([
                pa.array(np.arange(done, done + n, dtype=np.uint64)),
                pa.array(np.full(n, "UNASSIGNED")).dictionary_encode().cast(pa.string()),
                pa.array(rng.integers(0, 2, n).astype(np.uint8)),
                genes_arr.take(pa.array(g)),
                pa.array(x * PIXEL_SIZE_UM), pa.array(y * PIXEL_SIZE_UM), pa.array(np.zeros(n, np.float32)),
                pa.array(qv), pa.array(x), pa.array(y),
            ], schema=schema)
            writer.write_batch(batch, row_group_size=row_group)
            done += n
    tmp.replace(path)
    return {"side_tiles": side, "width_px": w, "genes": genes}
