"""``dbk.datasets.synthetic``: a seeded, Xenium-like slide (H&E + transcripts + cells), lazy and offline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Literal

import anndata as ad
import dask.array as da
import dask.dataframe as dd
import geopandas as gpd
import numpy as np
import pandas as pd
from dask.base import tokenize
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
from spatialdata.transformations import Identity

from .._constants import (
    CELL_TYPE_COL,
    CELLS_KEY,
    GENE_COL,
    IMAGE_KEY,
    INSTANCE_COL,
    PIXEL_CS,
    REGION_COL,
    SPATIAL_KEY,
    TABLE_KEY,
    TRANSCRIPTS_KEY,
)
from .._image import set_pixel_size
from .._logging import logger
from .._settings import settings
from ._biology import cell_types, control_probe_names, gene_universe, morphology_table, shifted_gene_names
from ._render import level_shape, render_chunk
from ._slide import _INSIDE_FRACTION, SlideModel

SYNTHETIC_ATTRS_KEY = "dbk_synthetic"  # sdata.attrs[...] and sdata.tables["table"].uns["synthetic"]
AUTO_MAX_CELLS = 500_000  # include_cells="auto" builds cells and table up to this many expected cells
PATIENT_KEY = "patient"  # sdata.attrs[...]: the slide's patient, as dbk.tl.benchmark(split="patient") reads it
_MIN_PYRAMID_SIDE = 256


def synthetic(
    *,
    shape: tuple[int, int] = (2048, 2048),
    pixel_size_um: float = 0.5,
    genes: Sequence[str] | None = None,
    n_genes: int = 60,
    n_cell_types: int = 5,
    cell_density: float = 4000.0,
    transcripts_per_cell: float = 50.0,
    background_fraction: float = 0.03,
    n_control_probes: int = 30,
    control_probe_fraction: float = 0.01,
    tissue_fraction: float = 0.6,
    include_cells: bool | Literal["auto"] = "auto",
    chunk_size: int = 1024,
    random_state: int | None = 0,
    patient: str | None = None,
    patient_shift: float = 0.0,
    shifted_genes: float | Sequence[str] = 0.2,
) -> SpatialData:
    """A synthetic Xenium-like slide: H&E image, transcripts, cells and a cell x gene table, from one seed.

    Cells of a few types (tumour, immune, fibroblast, endothelial, macrophage, ...) fill an irregular piece of
    tissue in regions drawn from smooth random fields. The H&E shows each type with its own morphology (nuclear
    size, shape, darkness, texture, cytoplasm, red blood cells next to vessel cells, fibrous stroma), and the
    transcripts of a cell follow its type's expression profile, modulated by a few smooth spatial programs. So
    expression can be learned from the image, and the ground truth is known.

    Everything is generated in blocks of 512 px from generators seeded by ``(random_state, block)``, and every
    image chunk, pyramid level and transcript partition is computed on its own from the blocks around it, so the
    image and the transcripts are lazy (dask) and a whole slide (e.g. ``shape=(40000, 40000)``, ~55 M
    transcripts) is built in about a second with little memory. The chunking never changes the data.

    The biology does not depend on ``random_state``: a cell type looks the same and a gene (identified by its name)
    has the same expression in every synthetic slide and every panel; the seed only changes the tissue. Slides can
    belong to patients who differ in a way the H&E does not show (``patient``, ``patient_shift``): some genes are
    expressed by other cell types in each patient, so a model trained on one patient predicts them well on new
    slides of that patient and badly on another patient's.

    Parameters
    ----------
    shape
        ``(height, width)`` of the image in pixels.
    pixel_size_um
        Micrometres per pixel; morphology and densities are physical, so a smaller pixel size draws larger cells.
    genes
        The gene panel, any names: the first 40 genes of the universe are real marker symbols (``ERBB2``, ``KRT5``,
        ``ESR1``, ``PTPRC``, ``CD3E``, ``CD68``, ``COL1A1``, ``PECAM1``, ...), then ``SYN0001``, ``SYN0002``, ...;
        other names get a profile seeded by the name. Default: the first ``n_genes`` of the universe.
    n_genes
        Panel size when ``genes`` is not given.
    n_cell_types
        Number of cell types: the five base types, then variants named ``type_5``, ...
    cell_density
        Cells per mm² of tissue, averaged over types (types differ: tumour and immune cells are packed densely).
    transcripts_per_cell
        Expected transcripts per cell over the panel, averaged over types.
    background_fraction
        Ambient transcripts scattered over the tissue (``cell_id`` -1), as a fraction of the cells' transcripts.
    n_control_probes
        Number of control probe names (``NegControlProbe_*``, ``BLANK_*``, ``UnassignedCodeword_*``, in turn).
    control_probe_fraction
        Expected share of control probes among all transcripts.
    tissue_fraction
        Share of the slide covered by tissue (irregular outline, a few holes); ``1.0`` fills the slide.
    include_cells
        Build ``shapes["cells"]`` and ``tables["table"]`` (eager: every cell's counts are drawn). ``"auto"``: only
        when at most 500 000 cells are expected.
    chunk_size
        Image chunk size in pixels (every pyramid level), and the square of one transcript partition (it holds the
        transcripts of the cells centred in it, so a few lie just outside).
    random_state
        Seed of the tissue (outline, regions, cells, transcripts, pixels); ``None`` uses ``dbk.settings.seed``.
    patient
        The patient the slide comes from, any name (e.g. ``"P1"``); stored in ``sdata.attrs["patient"]``, where
        :func:`dbk.tl.benchmark` (``split="patient"``) reads it. With ``patient_shift=0`` it is only a label.
    patient_shift
        How far the ``shifted_genes`` depart from the shared biology in this patient, in ``[0, 1]``. A shifted gene's
        log expression rate over the cell types moves this share of the way from its shared profile towards a random
        profile drawn for the (patient, gene) pair (normal per type, seeded by the patient, gene and type names, as
        wide as the shared profile and at least 1 in natural log), then is rescaled to keep the gene's mean rate
        over the types. So at ``1`` which cell types express the gene is drawn anew for every patient, and two
        patients' profiles are unrelated; the cells, the image and the spatial programs do not change. Slides of
        the same patient share the shift, whatever their ``random_state``. Needs ``patient``; with a single cell type
        nothing can shift. ``0`` (default): no gene is shifted.
    shifted_genes
        Which genes a patient shifts: a fraction in ``[0, 1]`` (default ``0.2``), each gene of the panel being in
        when a uniform number seeded by its name alone is below it (so the same genes on every slide, patient and
        panel, whatever ``random_state``; a larger fraction only adds genes), or a list of names from the panel.
        The genes shifted are listed in ``attrs["dbk_synthetic"]["shifted_genes"]``.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with

    - ``images["he"]``: RGB uint8 ``(c, y, x)``, multiscale where the image is large enough, dask-backed;
    - ``points["transcripts"]``: dask DataFrame, one partition per block, columns ``x``, ``y`` (float32, image
      pixels), ``feature_name`` (categorical: panel genes then control probes), ``qv`` (float32, ~6% below 20),
      ``cell_id`` (int64, -1 outside cells);
    - ``shapes["cells"]``: circles (``radius`` in pixels) indexed by cell id (int64), if cells are included;
    - ``tables["table"]``: cells x panel genes, counts of the transcripts assigned to each cell (sparse float32),
      ``obs``: ``cell_type`` (categorical), ``region``/``instance_id`` annotating ``"cells"``, ``cell_area``,
      ``nucleus_area`` (µm²); ``obsm["spatial"]``: centres in pixels; ``uns["synthetic"]``: the ground truth;
    - ``attrs["dbk_synthetic"]``: the ground truth, always: ``genes``, ``cell_types``, ``expression`` (types x genes
      expected counts per cell), ``gene_rates`` (the same before scaling to ``transcripts_per_cell``; depends only on
      gene and type names), ``scale``, ``program_loadings`` (genes x programs), ``morphology``, the parameters, and
      ``expected_n_cells`` / ``expected_n_transcripts`` (estimated from the fields, without drawing); with a
      ``patient`` also ``patient``, ``patient_shift`` and ``shifted_genes`` (the panel's genes whose type profile is
      the patient's, panel order; empty when ``patient_shift=0``), and ``expression`` is the patient's;
    - ``attrs["patient"]``: the ``patient``, when given.

    Without a ``patient`` the slide is the same as before these options existed. With one, the image, the cells and
    the counts of every gene that is not shifted are exactly those of the same slide without a patient (the shifted
    genes are drawn from a stream of their own); the transcripts' positions differ.

    All elements are in image pixels (coordinate system ``"global"``, identity) and have a ``Scale`` to ``"um"``.

    Examples
    --------
    >>> sdata = dbk.datasets.synthetic()  # 2048 x 2048 px at 0.5 µm/px, ~2 k cells, ~130 k transcripts
    >>> big = dbk.datasets.synthetic(shape=(40000, 40000))  # lazy: ~1 M cells, ~55 M transcripts

    Two patients whose slides look alike but differ in about a fifth of the genes:

    >>> p1 = [dbk.datasets.synthetic(random_state=s, patient="P1", patient_shift=1.0) for s in (0, 1)]
    >>> p2 = dbk.datasets.synthetic(random_state=2, patient="P2", patient_shift=1.0)
    >>> p2.attrs["patient"], p2.attrs["dbk_synthetic"]["shifted_genes"][:3]
    ('P2', ['PGR', 'EPCAM', 'ACTA2'])
    """
    model = _slide_model(
        shape=shape,
        pixel_size_um=pixel_size_um,
        genes=genes,
        n_genes=n_genes,
        n_cell_types=n_cell_types,
        cell_density=cell_density,
        transcripts_per_cell=transcripts_per_cell,
        background_fraction=background_fraction,
        n_control_probes=n_control_probes,
        control_probe_fraction=control_probe_fraction,
        tissue_fraction=tissue_fraction,
        random_state=random_state,
        patient=patient,
        patient_shift=patient_shift,
        shifted_genes=shifted_genes,
    )
    if chunk_size < 64:
        raise ValueError(f"chunk_size must be at least 64 px, got {chunk_size!r}.")
    if include_cells not in (True, False, "auto"):
        raise ValueError(f"include_cells must be True, False or 'auto', got {include_cells!r}.")
    n_cells, _ = model.expected_counts
    if include_cells == "auto":
        include_cells = n_cells <= AUTO_MAX_CELLS
        if not include_cells:
            logger.info(
                f"synthetic: ~{n_cells:,.0f} cells expected (> {AUTO_MAX_CELLS:,}); skipping shapes[{CELLS_KEY!r}] "
                f"and tables[{TABLE_KEY!r}] (pass include_cells=True to build them). Image and transcripts stay lazy."
            )
    truth = ground_truth(model)

    images = {IMAGE_KEY: _image(model, chunk_size)}
    points = {TRANSCRIPTS_KEY: _transcripts(model, chunk_size)}
    shapes, tables = {}, {}
    if include_cells:
        start = time.perf_counter()
        shapes[CELLS_KEY], tables[TABLE_KEY] = _cells_and_table(model, truth)
        logger.debug(f"synthetic: {len(shapes[CELLS_KEY]):,} cells in {time.perf_counter() - start:.1f} s")
    sdata = SpatialData(images=images, points=points, shapes=shapes, tables=tables)
    set_pixel_size(sdata, IMAGE_KEY, pixel_size_um=pixel_size_um, elements=[TRANSCRIPTS_KEY, *shapes])
    sdata.attrs[SYNTHETIC_ATTRS_KEY] = truth
    if model.patient is not None:
        sdata.attrs[PATIENT_KEY] = model.patient
    return sdata


def _slide_model(
    *,
    shape,
    pixel_size_um,
    genes,
    n_genes,
    n_cell_types,
    cell_density,
    transcripts_per_cell,
    background_fraction,
    n_control_probes,
    control_probe_fraction,
    tissue_fraction,
    random_state,
    patient=None,
    patient_shift=0.0,
    shifted_genes=0.2,
) -> SlideModel:
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"shape must be (height, width) of at least 16 px each, got {shape!r}.")
    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}.")
    if genes is None:
        genes = gene_universe(n_genes)
    else:
        genes = [str(g) for g in genes]
        if not genes:
            raise ValueError("genes must name at least one gene.")
        if len(set(genes)) != len(genes):
            raise ValueError("genes has duplicates.")
    controls = control_probe_names(n_control_probes)
    if clash := set(genes) & set(controls):
        raise ValueError(f"genes and control probe names overlap: {sorted(clash)}.")
    for name, value in {"cell_density": cell_density, "transcripts_per_cell": transcripts_per_cell}.items():
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}.")
    if not 0 <= background_fraction < 10:
        raise ValueError(f"background_fraction must be in [0, 10), got {background_fraction!r}.")
    if not 0 <= control_probe_fraction < 1:
        raise ValueError(f"control_probe_fraction must be in [0, 1), got {control_probe_fraction!r}.")
    if not 0 < tissue_fraction <= 1:
        raise ValueError(f"tissue_fraction must be in (0, 1], got {tissue_fraction!r}.")
    seed = settings.seed if random_state is None else int(random_state)
    if seed < 0:
        raise ValueError(f"random_state must be a non-negative integer, got {random_state!r}.")
    patient, patient_shift, shifted = _patient_options(patient, patient_shift, shifted_genes, genes)
    return SlideModel(
        height=int(shape[0]),
        width=int(shape[1]),
        pixel_size_um=float(pixel_size_um),
        random_state=seed,
        types=tuple(cell_types(int(n_cell_types))),
        genes=tuple(genes),
        control_probes=tuple(controls),
        cell_density=float(cell_density),
        transcripts_per_cell=float(transcripts_per_cell),
        background_fraction=float(background_fraction),
        control_probe_fraction=float(control_probe_fraction),
        tissue_fraction=float(tissue_fraction),
        patient=patient,
        patient_shift=patient_shift,
        shifted_genes=tuple(shifted),
    )


def _patient_options(patient, patient_shift, shifted_genes, genes: list[str]) -> tuple[str | None, float, list[str]]:
    """Checked ``(patient, patient_shift, shifted genes in panel order)``; no gene is shifted at ``patient_shift=0``."""
    if patient is not None:
        patient = str(patient)
        if not patient:
            raise ValueError("patient must be a non-empty name (or None).")
    try:
        patient_shift = float(patient_shift)
    except (TypeError, ValueError):
        raise ValueError(f"patient_shift must be a number in [0, 1], got {patient_shift!r}.") from None
    if not 0.0 <= patient_shift <= 1.0:
        raise ValueError(f"patient_shift must be in [0, 1], got {patient_shift!r}.")
    if patient_shift > 0 and patient is None:
        raise ValueError("patient_shift needs a patient: pass synthetic(patient='P1', patient_shift=...).")
    if isinstance(shifted_genes, int | float | np.number) and not isinstance(shifted_genes, bool):
        if not 0.0 <= float(shifted_genes) <= 1.0:
            raise ValueError(f"shifted_genes must be a fraction in [0, 1] (or a list of genes), got {shifted_genes!r}.")
        shifted = shifted_gene_names(genes, float(shifted_genes))
    elif isinstance(shifted_genes, str) or not isinstance(shifted_genes, Sequence | np.ndarray | pd.Index):
        raise ValueError(f"shifted_genes must be a fraction in [0, 1] or a list of genes, got {shifted_genes!r}.")
    else:
        names = {str(g) for g in shifted_genes}
        if unknown := sorted(names - set(genes)):
            raise ValueError(f"shifted_genes {unknown[:10]} are not in the panel (genes / n_genes).")
        shifted = [g for g in genes if g in names]
    if patient_shift == 0:
        return patient, patient_shift, []
    if not shifted:
        logger.warning(f"synthetic: patient {patient!r}: no gene of the panel is shifted (shifted_genes="
                       f"{shifted_genes!r}); pass a larger fraction or a list of genes.")
    return patient, patient_shift, shifted


def ground_truth(model: SlideModel) -> dict:
    """The generative parameters as plain lists and numbers (for ``attrs`` and ``uns``)."""
    n_cells, n_tx = model.expected_counts
    truth = {
        "random_state": int(model.random_state),
        "shape": [int(model.height), int(model.width)],
        "pixel_size_um": float(model.pixel_size_um),
        "generation_block": int(model.block),
        "cell_types": [t.name for t in model.types],
        "genes": list(model.genes),
        "control_probes": list(model.control_probes),
        "expression": model.expression.tolist(),
        "gene_rates": model.rates.tolist(),
        "scale": float(model.scale),
        "program_loadings": model.loadings.tolist(),
        "type_density_mm2": [float(v) for v in model.type_density_mm2],
        "morphology": morphology_table(list(model.types)),
        "cell_density": float(model.cell_density),
        "transcripts_per_cell": float(model.transcripts_per_cell),
        "background_fraction": float(model.background_fraction),
        "control_probe_fraction": float(model.control_probe_fraction),
        "tissue_fraction": float(model.tissue_fraction),
        "inside_fraction": float(_INSIDE_FRACTION),
        "expected_n_cells": float(n_cells),
        "expected_n_transcripts": float(n_tx),
    }
    if model.patient is not None:
        truth |= {
            "patient": model.patient,
            "patient_shift": float(model.patient_shift),
            "shifted_genes": list(model.shifted_genes),
        }
    return truth


def _chunks(total: int, size: int) -> tuple[int, ...]:
    return (size,) * (total // size) + ((total % size,) if total % size else ())


def _render(model: SlideModel, chunk: int, level: int, block_id=None) -> np.ndarray:
    return render_chunk(model, chunk, block_id[1], block_id[2], level)


def _level_array(model: SlideModel, level: int, chunk: int) -> da.Array:
    height, width = level_shape(model, level)
    b = chunk
    return da.map_blocks(
        partial(_render, model, chunk, level),
        chunks=((3,), _chunks(height, b), _chunks(width, b)),
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
        name=f"dbk-synthetic-he-{level}-{chunk}-{tokenize(model)}",
    )


def _image(model: SlideModel, chunk: int):
    """The H&E element; every pyramid level is rendered at its own resolution, none is computed from another."""
    scale_factors = []
    side = min(model.height, model.width)
    while side // 2 >= _MIN_PYRAMID_SIDE:
        scale_factors.append(2)
        side //= 2
    b = chunk
    element = Image2DModel.parse(
        _level_array(model, 0, chunk),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors or None,
        chunks=(3, b, b),
        transformations={PIXEL_CS: Identity()},
    )
    if scale_factors:
        # the parser builds the coarser levels by averaging level 0, which would render the whole slide to get a
        # thumbnail: put the directly rendered levels in their place
        for level in range(len(scale_factors) + 1):
            node = f"scale{level}"
            old = element[node]["image"]
            new = _level_array(model, level, chunk)
            if new.shape != old.shape:  # pragma: no cover - level_shape follows xarray's coarsen
                raise RuntimeError(f"synthetic level {level}: shape {new.shape} != expected {old.shape}")
            element[node]["image"] = old.copy(data=new)
        Image2DModel().validate(element)
    return element


def _transcripts_partition(model: SlideModel, chunk: int, index: tuple[int, int, int]) -> pd.DataFrame:
    partition, j, i = index
    y0, x0 = j * chunk, i * chunk
    return model.transcripts(y0, min(y0 + chunk, model.height), x0, min(x0 + chunk, model.width), partition)


def _transcripts(model: SlideModel, chunk: int):
    """Lazy transcripts, one partition per ``chunk`` x ``chunk`` square (row-major)."""
    ny, nx = -(-model.height // chunk), -(-model.width // chunk)
    parts = [(j * nx + i, j, i) for j in range(ny) for i in range(nx)]
    empty = np.zeros(0)
    meta = model.frame(empty, empty, empty, empty, empty, 0)
    # partition k holds index k * 2**32 + i: known divisions, a monotonic index and no compute to find either
    divisions = [k << 32 for k, _, _ in parts] + [(len(parts) << 32) - 1]
    ddf = dd.from_map(
        partial(_transcripts_partition, model, chunk),
        parts,
        meta=meta,
        divisions=divisions,
        label="dbk-synthetic-transcripts",
        enforce_metadata=False,
    )
    return PointsModel.parse(
        ddf,
        coordinates={"x": "x", "y": "y"},
        feature_key=GENE_COL,
        transformations={PIXEL_CS: Identity()},
        sort=True,
    )


def _cells_and_table(model: SlideModel, truth: dict):
    """``shapes["cells"]`` and ``tables["table"]``, drawing every block's cells and counts (no transcripts)."""
    s = model.pixel_size_um
    parts: dict[str, list] = {k: [] for k in ("id", "x", "y", "type", "radius", "nuc_area")}
    mats = []
    for j in range(model.n_blocks_y):
        for i in range(model.n_blocks_x):
            cells = model.cells(j, i)
            inside, _ = model.counts(j, i, cells)
            for k in ("id", "x", "y", "type", "radius"):
                parts[k].append(getattr(cells, k))
            parts["nuc_area"].append(np.pi * cells.nuc_a * cells.nuc_b * s * s)
            mats.append(sparse.csr_matrix(inside.astype(np.float32)))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    ids = cat["id"].astype(np.int64)
    x = sparse.vstack(mats, format="csr") if mats else sparse.csr_matrix((0, len(model.genes)), dtype=np.float32)

    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": cat["radius"]},
            geometry=gpd.points_from_xy(cat["x"], cat["y"]),
            index=pd.Index(ids, name="cell_id"),
        ),
        transformations={PIXEL_CS: Identity()},
    )
    type_names = [t.name for t in model.types]
    obs = pd.DataFrame(
        {
            CELL_TYPE_COL: pd.Categorical.from_codes(cat["type"], categories=type_names),
            REGION_COL: pd.Categorical([CELLS_KEY] * len(ids)),
            INSTANCE_COL: ids,
            "cell_area": np.pi * (cat["radius"] * s) ** 2,
            "nucleus_area": cat["nuc_area"],
        },
        index=pd.Index(ids.astype(str)),
    )
    adata = ad.AnnData(
        X=x,
        obs=obs,
        var=pd.DataFrame(index=pd.Index(list(model.genes))),
        obsm={SPATIAL_KEY: np.column_stack([cat["x"], cat["y"]])},
        uns={"synthetic": truth},
    )
    table = TableModel.parse(adata, region=CELLS_KEY, region_key=REGION_COL, instance_key=INSTANCE_COL)
    return shapes, table
