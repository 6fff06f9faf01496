from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


@pytest.fixture(autouse=True)
def _quiet_progress():
    import dbk

    old = dbk.settings.progress
    dbk.settings.progress = False
    yield
    dbk.settings.progress = old


@pytest.fixture
def her2st_dir() -> Path:
    if not HER2ST.is_dir():
        pytest.skip(f"real her2st data not found at {HER2ST} (the shared/ folder beside the checkout)")
    return HER2ST


# ---- dbk.io: a tiny HEST-1k sample folder whose content is known -------------------------------------------------


def _io_write_hest_sample(root: Path, sample_id: str = "TINY1"):
    """Write wsis/, metadata/, st/, transcripts/ and xenium_seg/ for one tiny HEST sample; return what was written.

    wsis/, st/ and metadata/ go through dbk's HEST writer (the one dbk.datasets.hest_from_her2st uses), with the
    levels as given (level 1 is not a downsampled level 0: a reader that recomputes it is caught) and no
    compression; transcripts/ and xenium_seg/ are written here.
    """
    from types import SimpleNamespace

    import anndata as ad
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp
    import shapely

    from dbk.datasets._hest_local import write_hest_files

    h, w = 768, 1024
    yy, xx = np.mgrid[0:h, 0:w]
    level0 = np.stack([(xx // 4) % 256, (yy // 3) % 256, np.full_like(xx, 7)], axis=-1).astype(np.uint8)
    yy1, xx1 = np.mgrid[0 : h // 2, 0 : w // 2]
    level1 = np.stack([(xx1 * 7) % 256, (yy1 * 5) % 256, np.full_like(xx1, 200)], axis=-1).astype(np.uint8)
    for sub in ("transcripts", "xenium_seg"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    metadata = {
        "pixel_size_um_estimated": 0.5,
        "pixel_size_um_embedded": 0.2625,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "st_technology": "Xenium",
        "not_a_number": float("nan"),
    }

    spots_xy = np.array([[100.0, 120.0], [300.5, 120.0], [500.0, 400.25], [900.0, 700.0], [50.0, 600.0]])
    counts = np.array([[1, 0, 3, 0], [0, 2, 0, 0], [5, 5, 5, 5], [0, 0, 0, 9], [4, 0, 1, 0]], dtype=np.int64)
    genes = ["ERBB2", "KRT5", "CD3E", "EPCAM"]
    barcodes = [f"spot{i}-1" for i in range(len(spots_xy))]
    st = ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=genes))
    st.obsm["spatial"] = spots_xy
    write_hest_files(root, sample_id, levels=[level0, level1], spots=st, metadata=metadata, pixel_size_um=0.5,
                     record={"builder": "tests/conftest.py"}, compression=None)

    rng = np.random.default_rng(0)
    n = 1000
    transcripts = pd.DataFrame(
        {
            "transcript_id": np.arange(n, dtype=np.uint64),
            "cell_id": rng.choice(["aaaa-1", "bbbb-1", "UNASSIGNED"], n),
            "feature_name": rng.choice([*genes, "NegControlProbe_00001"], n),
            "x_location": rng.uniform(0, 500, n),
            "y_location": rng.uniform(0, 400, n),
            "qv": rng.uniform(0, 40, n).astype(np.float32),
            "he_x": rng.uniform(0, w, n),
            "he_y": rng.uniform(0, h, n),
        }
    )
    pq.write_table(
        pa.Table.from_pandas(transcripts, preserve_index=False),
        root / "transcripts" / f"{sample_id}_transcripts.parquet",
        row_group_size=300,
    )

    cells = {
        "aaaa-1": shapely.Polygon([(10, 10), (40, 10), (40, 30), (10, 30)]),
        "bbbb-1": shapely.Polygon([(200, 200), (260, 210), (230, 260)]),
        "cccc-1": shapely.Polygon([(600, 500), (650, 500), (650, 560), (600, 560)]),
    }
    seg = pd.DataFrame(
        {"geometry": shapely.to_wkb(list(cells.values())), "area": [600.0, 1500.0, 3000.0]},
        index=pd.Index(list(cells), name="cell_id"),
    )
    seg.to_parquet(root / "xenium_seg" / f"{sample_id}_xenium_cell_seg.parquet")  # plain parquet, WKB geometries
    return SimpleNamespace(
        root=root,
        sample_id=sample_id,
        level0=level0,
        level1=level1,
        metadata=metadata,
        spots_xy=spots_xy,
        counts=counts,
        genes=genes,
        barcodes=barcodes,
        transcripts=transcripts,
        cells=cells,
    )


@pytest.fixture
def io_hest_sample(tmp_path):
    """A tiny HEST-1k layout in ``tmp_path/hest`` (1024 x 768 two-level TIFF, 5 spots, 1000 transcripts, 3 cells)."""
    return _io_write_hest_sample(tmp_path / "hest")


@pytest.fixture
def dbk_log(caplog):
    """caplog that also sees the "dbk" logger (it does not propagate to the root logger)."""
    import logging

    logger = logging.getLogger("dbk")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (2 shared cores: one thread is as fast and steadier)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
