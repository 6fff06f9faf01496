"""Reader for one sample of a HEST-1k download (Jaume et al. 2024): :func:`read_hest`."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anndata as ad
import dask.dataframe as dd
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import PointsModel, ShapesModel
from spatialdata.transformations import Identity

from .._constants import (
    CELL_ID_COL,
    CELLS_KEY,
    COUNTS_LAYER,
    GENE_COL,
    IMAGE_KEY,
    PIXEL_CS,
    QV_COL,
    SAMPLE_COL,
    SPATIAL_KEY,
    SPOTS_KEY,
    TABLE_KEY,
    TRANSCRIPTS_KEY,
)
from .._genes import rename_genes, warn_if_ensembl
from .._image import set_pixel_size
from ._image import PLAIN_SUFFIXES, TIFF_SUFFIXES, open_he_image, require_file
from ._spot_positions import spot_positions
from ._st import spot_circles, spot_table

logger = logging.getLogger("dbk")

HEST_METADATA_KEY = "hest_metadata"  # sdata.attrs entry holding the sample's metadata json
HEST_PATIENT_KEY = "patient"  # the metadata json's patient field (e.g. "Patient 1"), copied to sdata.attrs["patient"]
VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_DIAMETER_PER_PITCH = 0.55  # Visium: 55 µm spots on a 100 µm pitch
_PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
_TRANSCRIPT_XY = ("he_x", "he_y")  # HEST: transcript positions in H&E level-0 pixels


_HEST_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_hest_id(name: object, what: str = "HEST sample id") -> str:
    r"""Return ``name`` if it is a safe HEST name (a sample id such as ``"TENX95"``, a task such as ``"IDC"``).

    Every HEST name dbk turns into a path goes through here: letters, digits, ``_``, ``-`` and ``.``, not starting
    with ``.``; no ``/``, ``\``, ``~``, NUL or ``..``, so a name never leaves the folder it is looked up in.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If it is empty or holds other characters, naming it and the rule.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string such as 'TENX95', got {type(name).__name__} {name!r}.")
    if not _HEST_ID.fullmatch(name) or ".." in name:
        raise ValueError(f"Invalid {what} {name!r}: HEST names (e.g. 'TENX95', 'NCBI783', 'LYMPH_IDC') are letters, "
                         "digits, '_', '-' and '.', not starting with '.', without '..', '/', '\\', '~' or NUL; "
                         "a name is never a path.")
    return name


def read_hest(
    root: str | os.PathLike,
    sample_id: str,
    *,
    load_transcripts: bool = True,
    load_cells: bool = True,
    pixel_size_um: float | None = None,
    gene_symbols: str | Mapping | pd.Series | None = None,
) -> SpatialData:
    """Read one HEST-1k sample (H&E, spots, and for Xenium samples transcripts and cells) into SpatialData.

    Expects the layout of a HEST-1k download under ``root`` (also as other tools pass HEST-derived data around):

    - ``wsis/{sample_id}.tif`` — pyramidal H&E (required), read lazily level by level; or any other TIFF
      (``.tiff``, ``.svs``, ...), or a ``.jpg`` / ``.jpeg`` / ``.png``, decoded into memory with Pillow (a warning
      gives the memory needed for a very large one);
    - ``metadata/{sample_id}.json`` — for the pixel size (``pixel_size_um_estimated``, else
      ``pixel_size_um_embedded``) and the spot size (``spot_diameter``, ``inter_spot_dist``, in µm); required
      unless ``pixel_size_um`` is given;
    - ``st/{sample_id}.h5ad`` — spots or pseudo-spots (optional), centres in H&E level-0 pixels in
      ``obsm["spatial"]``, else in ``obs`` columns (``pxl_col_in_fullres`` / ``pxl_row_in_fullres``,
      ``imagecol`` / ``imagerow``, ``x_pixel`` / ``y_pixel``, ``pixel_x`` / ``pixel_y``); the axis order is checked
      against the image (see Warns);
    - ``transcripts/{sample_id}_transcripts.parquet`` — columns ``he_x, he_y, feature_name`` and optionally
      ``qv, cell_id`` (optional; read lazily);
    - ``xenium_seg/{sample_id}_xenium_cell_seg.parquet`` — cell polygons in a ``geometry`` column (GeoParquet or
      WKB), cell ids in a ``cell_id`` column or the index (optional).

    Missing optional files are skipped with an info message of the ``"dbk"`` logger.

    Parameters
    ----------
    root
        The HEST download folder (holding ``wsis/``, ``metadata/``, ...).
    sample_id
        HEST sample id, e.g. ``"TENX95"``.
    load_transcripts
        Read the transcripts (lazily) when present.
    load_cells
        Read the cell segmentation when present.
    pixel_size_um
        µm per level-0 pixel of the H&E, for samples whose metadata json lacks it (or has none); it wins over the
        json's (a warning says when they differ by more than 5%).
    gene_symbols
        The genes of the spot table by symbol (dbk matches genes by symbol): the name of a ``var`` column holding
        the symbols (as scanpy's ``gene_symbols``, e.g. ``"gene_symbols"``), or a dict / Series id -> symbol. Genes
        of one symbol are summed; genes without one keep their name (warned). See :func:`dbk.pp.map_gene_names`.

    Returns
    -------
    A SpatialData object, everything in H&E level-0 pixels (coordinate system ``"global"``) with a ``Scale`` to
    ``"um"`` holding the pixel size:

    - ``images["he"]``: uint8 RGB ``(c, y, x)``, one scale per pyramid level of the file;
    - ``shapes["spots"]`` and ``tables["table"]``: spot circles (radius ``spot_diameter / 2``, else
      ``0.55 * inter_spot_dist / 2``, else 55 µm Visium spots) and the spots x genes table annotating them, raw
      counts in ``X`` (sparse CSR) and ``layers["counts"]``, ``obs["sample"]``, ``obsm["spatial"]``;
    - ``points["transcripts"]``: columns ``x, y, feature_name`` (categorical), ``qv``, ``cell_id`` where present;
    - ``shapes["cells"]``: cell polygons indexed by cell id;
    - ``attrs["hest_metadata"]``: the metadata json (non-finite numbers replaced by ``None``);
    - ``attrs["patient"]``: the metadata's ``patient`` field as a string (e.g. ``"Patient 1"``), where it has a
      non-empty one (else no ``"patient"`` entry); :func:`dbk.tl.benchmark` reads it for ``split="patient"``, and a
      value set afterwards (``sdata.attrs["patient"] = ...``) is what dbk uses;
    - ``attrs["sample"]``: ``sample_id``.

    Warns
    -----
    Through the ``"dbk"`` logger: when the spot centres fit the image (or, when both orders fit it, the tissue)
    clearly better with x and y swapped, they are read swapped, with the numbers; when the spot table's genes look
    like Ensembl ids (pass ``gene_symbols``).

    Raises
    ------
    FileNotFoundError
        If the H&E image is missing, or the metadata json and ``pixel_size_um`` are.
    ValueError
        If ``sample_id`` is not a HEST name (see :func:`check_hest_id`: a name is never a path), if neither the
        metadata nor ``pixel_size_um`` gives a usable pixel size (naming the file and the keys), a
        present file lacks required columns, or the spot centres fit the image in neither axis order (naming the
        file, the columns and the image's extent).
    """
    check_hest_id(sample_id)
    root = Path(root)
    wsi_path = _find_wsi(root, sample_id)
    if pixel_size_um is not None and not (isinstance(pixel_size_um, (int, float)) and math.isfinite(pixel_size_um)
                                          and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number (µm per pixel), got {pixel_size_um!r}.")
    meta_path = root / "metadata" / f"{sample_id}.json"
    if pixel_size_um is None or meta_path.is_file():
        meta_path = require_file(meta_path, f"HEST metadata json of sample {sample_id!r} (needed for the pixel "
                                 "size; or pass read_hest(..., pixel_size_um=))")
        with _reading(meta_path, "HEST metadata json"), open(meta_path) as f:
            metadata = _json_safe(json.load(f))
    else:
        logger.info(f"{sample_id}: no metadata json ({meta_path}); pixel size {pixel_size_um} µm/px as given.")
        metadata = {}
    pixel_size_um = _pixel_size(metadata, meta_path, pixel_size_um, wsi_path)

    images = {IMAGE_KEY: open_he_image(wsi_path, what=f"HEST H&E image of sample {sample_id!r}")}
    shapes: dict[str, Any] = {}
    points: dict[str, Any] = {}
    tables: dict[str, Any] = {}

    st_path = root / "st" / f"{sample_id}.h5ad"
    if st_path.is_file():
        radius_px = _spot_radius_um(metadata) / pixel_size_um
        with _reading(st_path, "HEST spot table", "Delete or re-download it (without it the sample is read "
                      "without spots)."):
            adata = _read_spot_table(st_path, sample_id)
        adata.obsm[SPATIAL_KEY] = spot_positions(adata, images[IMAGE_KEY], st_path)
        adata = _gene_names(adata, st_path, gene_symbols)
        shapes[SPOTS_KEY] = spot_circles(np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64), radius_px)
        tables[TABLE_KEY] = spot_table(adata, region=SPOTS_KEY)
    else:
        logger.info(f"{sample_id}: no spot table ({st_path}); reading without spots.")

    tx_path = root / "transcripts" / f"{sample_id}_transcripts.parquet"
    if not load_transcripts:
        pass
    elif tx_path.is_file():
        with _reading(tx_path, "HEST transcripts parquet", "Re-download it, or pass load_transcripts=False."):
            points[TRANSCRIPTS_KEY] = read_transcripts_parquet(tx_path)
    else:
        logger.info(f"{sample_id}: no transcripts ({tx_path}); reading without transcripts.")

    cells_path = root / "xenium_seg" / f"{sample_id}_xenium_cell_seg.parquet"
    if not load_cells:
        pass
    elif cells_path.is_file():
        with _reading(cells_path, "HEST cell segmentation parquet", "Re-download it, or pass load_cells=False."):
            shapes[CELLS_KEY] = read_cell_polygons(cells_path)
    else:
        logger.info(f"{sample_id}: no cell segmentation ({cells_path}); reading without cells.")

    sdata = SpatialData(images=images, shapes=shapes, points=points, tables=tables)
    set_pixel_size(sdata, IMAGE_KEY, pixel_size_um=pixel_size_um, elements=[*shapes, *points])
    sdata.attrs[HEST_METADATA_KEY] = metadata
    sdata.attrs["sample"] = str(sample_id)  # the slide's name in logs and in fit_diffbulk / predict records
    if (patient := _patient(metadata)) is not None:
        sdata.attrs["patient"] = patient  # patient-wise splits (benchmark(split="patient"), the head's inner CV)
    return sdata


def read_transcripts_parquet(path: str | os.PathLike) -> Any:
    """Read HEST transcripts lazily as a ``PointsModel`` element in H&E pixels.

    Only the needed columns are read (``he_x, he_y, feature_name`` and, where present, ``qv, cell_id``), with
    ``dask.dataframe.read_parquet``. The gene categories are collected in one streaming pass over the
    ``feature_name`` column (row group by row group), so the categorical is known without loading the points.

    Parameters
    ----------
    path
        The ``*_transcripts.parquet`` file.

    Returns
    -------
    A dask DataFrame with columns ``x, y`` (from ``he_x, he_y``), ``feature_name`` (categorical), and ``qv``,
    ``cell_id`` where present; identity transform to ``"global"``.
    """
    path = require_file(path, "HEST transcripts parquet")
    schema = pq.read_schema(path)
    missing = [c for c in (*_TRANSCRIPT_XY, GENE_COL) if c not in schema.names]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {missing} (has {schema.names}); HEST transcripts need he_x, he_y (H&E pixels) "
            "and feature_name. Pass load_transcripts=False to read the sample without them."
        )
    columns = [*_TRANSCRIPT_XY, GENE_COL, *(c for c in (QV_COL, CELL_ID_COL) if c in schema.names)]
    is_binary = pa.types.is_binary(schema.field(GENE_COL).type) or pa.types.is_large_binary(schema.field(GENE_COL).type)
    categories = _parquet_unique(path, GENE_COL, decode=is_binary)

    # one partition per row group: bounded memory when the points are streamed
    ddf = dd.read_parquet(path, columns=columns, split_row_groups=True)
    ddf = ddf.rename(columns={_TRANSCRIPT_XY[0]: "x", _TRANSCRIPT_XY[1]: "y"})
    genes = ddf[GENE_COL]
    if is_binary:
        genes = genes.map_partitions(lambda s: s.str.decode("utf-8"), meta=(GENE_COL, "object"))
    ddf[GENE_COL] = genes.astype(pd.CategoricalDtype(categories))
    for col in ("x", "y"):
        if not np.issubdtype(ddf[col].dtype, np.floating):
            ddf[col] = ddf[col].astype(np.float64)
    # sort=True: the index is not used and checking its order would read every partition
    return PointsModel.parse(ddf, feature_key=GENE_COL, transformations={PIXEL_CS: Identity()}, sort=True)


def read_cell_polygons(path: str | os.PathLike) -> gpd.GeoDataFrame:
    """Read a HEST cell segmentation parquet (polygons in H&E pixels) as a ``ShapesModel`` element.

    Accepts a GeoParquet file or a plain parquet whose ``geometry`` column holds WKB (or WKT); cell ids are taken
    from a ``cell_id`` column if there is one, else from the stored index. Empty geometries are dropped (logged).

    Parameters
    ----------
    path
        The ``*_xenium_cell_seg.parquet`` file.

    Returns
    -------
    A GeoDataFrame of polygons indexed by cell id (as strings), identity transform to ``"global"``.
    """
    path = require_file(path, "HEST cell segmentation parquet")
    if "geometry" not in pq.read_schema(path).names:
        raise ValueError(f"{path} has no 'geometry' column; expected cell polygons (GeoParquet or WKB).")
    try:
        gdf = gpd.read_parquet(path)
    except ValueError:  # no GeoParquet metadata: a plain parquet with WKB/WKT geometries
        df = pd.read_parquet(path)
        raw = df.pop("geometry").to_numpy()
        first = next((g for g in raw if g is not None), None)
        geometry = shapely.from_wkt(raw) if isinstance(first, str) else shapely.from_wkb(raw)
        gdf = gpd.GeoDataFrame(df, geometry=geometry)
    if CELL_ID_COL in gdf.columns:
        gdf = gdf.set_index(CELL_ID_COL)
    gdf.index = gdf.index.astype(str)
    gdf.index.name = None
    empty = gdf.geometry.isna() | gdf.geometry.is_empty
    if empty.any():
        logger.info(f"{path}: dropped {int(empty.sum())} empty cell geometries.")
        gdf = gdf.loc[~empty]
    return ShapesModel.parse(gdf, transformations={PIXEL_CS: Identity()})


@contextmanager
def _reading(path: Path, what: str, hint: str = ""):
    """Turn a parser's error on a corrupt or truncated file into a ValueError naming the file.

    Errors that already name the file pass through unchanged.
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as err:  # json, h5py, pyarrow (ArrowInvalid is a ValueError) errors
        if str(path) in str(err):
            raise
        raise ValueError(f"Cannot read {what} {path}: the file is corrupt or truncated ({type(err).__name__}: "
                         f"{err}). {hint}".rstrip()) from err


def _find_wsi(root: Path, sample_id: str) -> Path:
    """``wsis/{sample_id}.tif``, else the same name with another TIFF suffix or ``.jpg`` / ``.jpeg`` / ``.png``."""
    folder = root / "wsis"
    suffixes = (".tif", *(s for s in TIFF_SUFFIXES if s != ".tif"), *PLAIN_SUFFIXES)
    for suffix in suffixes:
        for name in (f"{sample_id}{suffix}", f"{sample_id}{suffix.upper()}"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"HEST H&E image of sample {sample_id!r} not found: {folder / f'{sample_id}.tif'} (nor "
                            f"{sample_id} with suffix {', '.join(suffixes[1:])})")


def _read_spot_table(path: Path, sample_id: str) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    adata.obs_names = adata.obs_names.astype(str)
    if not (sparse.issparse(adata.X) and adata.X.format == "csr"):
        adata.X = sparse.csr_matrix(adata.X)
    adata.layers[COUNTS_LAYER] = adata.X.copy()
    adata.obs[SAMPLE_COL] = pd.Categorical([sample_id] * adata.n_obs)
    return adata


def _gene_names(adata: ad.AnnData, path: Path, gene_symbols) -> ad.AnnData:
    """Rename the genes by ``gene_symbols`` when given, else warn when they look like Ensembl ids."""
    if gene_symbols is not None:
        adata = rename_genes(adata, gene_symbols, what=f"spot table {path}")
    warn_if_ensembl(adata.var_names, f"spot table {path}", how_to_map=(
        f"read it with dbk.io.read_hest(..., gene_symbols=<the var column of the symbols>) (its var columns: "
        f"{list(adata.var.columns)}) or a dict id -> symbol, or map them with dbk.pp.map_gene_names(sdata, mapping)"))
    return adata


def _pixel_size(metadata: dict, meta_path: Path, given: float | None, wsi_path: Path) -> float:
    found = next(((k, v) for k in _PIXEL_SIZE_KEYS if (v := _positive_number(metadata.get(k))) is not None), None)
    if given is not None:
        if found is not None and abs(found[1] - given) > 0.05 * given:
            logger.warning(f"pixel_size_um={given} differs from {found[0]}={found[1]} in {meta_path}; using "
                           f"{given} µm/px as given.")
        return float(given)
    if found is not None:
        logger.debug(f"Pixel size {found[1]} µm/px from {found[0]!r} in {meta_path}.")
        return found[1]
    raise ValueError(
        f"No usable pixel size in {meta_path}: keys {list(_PIXEL_SIZE_KEYS)} are missing or not positive numbers "
        f"({ {k: metadata.get(k) for k in _PIXEL_SIZE_KEYS} }). Pass read_hest(..., pixel_size_um=) with the µm per "
        f"level-0 pixel of {wsi_path}."
    )


def _patient(metadata: dict) -> str | None:
    """The metadata's patient as a string; ``None`` when absent, null or blank."""
    value = metadata.get(HEST_PATIENT_KEY)
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a numeric id read as 3.0 by a CSV-to-json round trip names patient "3"
    value = str(value).strip()
    return value or None


def _spot_radius_um(metadata: dict) -> float:
    diameter = _positive_number(metadata.get("spot_diameter"))
    if diameter is not None:
        return diameter / 2.0
    pitch = _positive_number(metadata.get("inter_spot_dist"))
    if pitch is not None:
        logger.info(
            f"No spot_diameter in the HEST metadata; assuming Visium geometry, diameter = {VISIUM_DIAMETER_PER_PITCH}"
            f" x inter_spot_dist = {VISIUM_DIAMETER_PER_PITCH * pitch:g} µm."
        )
        return VISIUM_DIAMETER_PER_PITCH * pitch / 2.0
    logger.info(f"No spot size in the HEST metadata; assuming Visium spots of {VISIUM_SPOT_DIAMETER_UM:g} µm.")
    return VISIUM_SPOT_DIAMETER_UM / 2.0


def _positive_number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (json NaN/Infinity) by None so the dict writes to zarr attributes."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _parquet_unique(path: Path, column: str, *, decode: bool) -> list[str]:
    """Sorted unique values of one parquet column, streamed row group by row group."""
    uniques: set = set()
    for batch in pq.ParquetFile(path).iter_batches(columns=[column]):
        values = batch.column(0)
        if pa.types.is_dictionary(values.type):
            values = values.dictionary_decode()
        uniques.update(pc.unique(values).to_pylist())
    uniques.discard(None)
    if decode:
        uniques = {v.decode("utf-8") for v in uniques}
    return sorted(uniques)
