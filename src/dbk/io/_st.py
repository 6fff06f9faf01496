"""Readers for spot-based data with a counts table and a spot file (legacy ST, Visium-style): :func:`read_st`."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from anndata import AnnData
from anndata.utils import make_index_unique
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

from .._constants import (
    COUNTS_LAYER,
    IMAGE_KEY,
    INSTANCE_COL,
    PIXEL_CS,
    REGION_COL,
    SAMPLE_COL,
    SPATIAL_KEY,
    SPOTS_KEY,
    TABLE_KEY,
)
from .._image import set_pixel_size
from ._image import open_he_image, require_file

logger = logging.getLogger("dbk")

PIXEL_SIZE_FIT_KEY = "dbk_pixel_size_fit"  # sdata.attrs entry describing an estimated pixel size

_COUNTS_NAMES = ("counts.tsv.gz", "counts.tsv", "*counts*.tsv*", "*cnt*.tsv*", "*stdata*.tsv*")
_SPOTS_NAMES = ("spot_selection.tsv", "spot_selection.tsv.gz", "*selection*.tsv*", "*spot*.tsv*")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def read_st(
    counts: str | os.PathLike | pd.DataFrame,
    spots: str | os.PathLike | pd.DataFrame,
    image: str | os.PathLike,
    *,
    pixel_size_um: float | None,
    spot_diameter_um: float = 100.0,
    spot_pitch_um: float = 200.0,
    sample: str | None = None,
) -> SpatialData:
    """Read a legacy Spatial Transcriptomics (ST) section: counts table, spot file and H&E image.

    The layout is the one of the ST pipeline as published for her2st (Andersson et al. 2021): a counts table of
    spots x genes whose row index is ``"{x}x{y}"`` (the spot's array position) and whose columns are gene symbols,
    and a spot file with columns ``x, y, pixel_x, pixel_y`` (optionally ``new_x, new_y, selected``) giving each
    spot's centre in the image's pixels. Spots are joined on ``f"{x}x{y}"``; only ``selected == 1`` spots are kept
    (all spots if there is no ``selected`` column); selected spots without a counts row are skipped and counted in
    the log, as are counts rows without a selected spot.

    For her2st the pixel size is about 0.688 µm/px (from the 200 µm spot pitch; HEST-1k's estimates are
    0.67–0.70).

    Parameters
    ----------
    counts
        Counts table (tab-separated, may be gzipped), or the table itself as a DataFrame (spots x genes).
    spots
        Spot file (tab-separated), or the table itself as a DataFrame.
    image
        The H&E image (JPEG/PNG, decoded into memory; or a TIFF, read lazily).
    pixel_size_um
        Micrometres per image pixel. ``None`` estimates it from the spot pitch: a least-squares affine fit of the
        spots' pixel centres on their array positions (``new_x, new_y`` when present, else ``x, y``) gives the
        pitch in pixels; the pixel size is ``spot_pitch_um`` divided by it (geometric mean of the two axes).
        The fit is recorded in ``sdata.attrs["dbk_pixel_size_fit"]``.
    spot_diameter_um
        Spot diameter in µm (100 for legacy ST, 55 for Visium); sets the circles' radius.
    spot_pitch_um
        Centre-to-centre distance of neighbouring array positions in µm (200 for legacy ST, 100 for Visium),
        used only to estimate the pixel size.
    sample
        Sample name written to ``obs["sample"]``; by default the name of the folder holding ``counts``.

    Returns
    -------
    A SpatialData object with

    - ``images["he"]``: the H&E image, identity to ``"global"`` (image pixels) and ``Scale`` to ``"um"``;
    - ``shapes["spots"]``: circles at the spot centres (image pixels), radius ``spot_diameter_um / 2`` in pixels,
      index ``0..n-1``;
    - ``tables["table"]``: spots x genes annotating ``spots`` (``obs["region"]``, ``obs["instance_id"]``), raw
      counts as sparse CSR in ``X`` and ``layers["counts"]`` (int32 when the counts are whole numbers),
      ``obs``: ``sample``, ``array_x``, ``array_y``; ``obsm["spatial"]``: spot centres ``(x, y)`` in image pixels;
      ``obs_names`` ``"{x}x{y}"``, ``var_names`` the gene symbols (made unique with a warning if duplicated).

    Raises
    ------
    FileNotFoundError
        If a file does not exist.
    ValueError
        If the spot file lacks a required column, spot keys are duplicated, no spot has counts, or the pixel size
        cannot be estimated.
    """
    if pixel_size_um is not None and not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number or None (estimate it), got {pixel_size_um!r}.")
    counts_df = _read_counts(counts)
    spots_df = _read_spots(spots)
    for what, index in (("counts table rows", counts_df.index), ("selected spots", spots_df.index)):
        if index.has_duplicates:
            raise ValueError(f"Duplicated spot keys among the {what}: {list(index[index.duplicated()].unique()[:5])}.")
    if sample is None:
        sample = Path(counts).parent.name if not isinstance(counts, pd.DataFrame) else "sample"

    fit = None
    if pixel_size_um is None:
        fit = estimate_pixel_size(spots_df, spot_pitch_um=spot_pitch_um)
        pixel_size_um = fit["pixel_size_um"]
        logger.info(
            f"{sample}: estimated pixel size {pixel_size_um:.4f} µm/px from {fit['n_spots']} spots on a "
            f"{spot_pitch_um:g} µm pitch (x {fit['pixel_size_um_x']:.4f}, y {fit['pixel_size_um_y']:.4f}; "
            f"rms residual {fit['rms_residual_px']:.2f} px, array coordinates {fit['array_columns']})."
        )

    has_counts = spots_df.index.isin(counts_df.index)
    if not has_counts.any():
        raise ValueError(
            f"{sample}: no selected spot matches a counts row; counts rows look like {list(counts_df.index[:3])}, "
            f"spot keys like {list(spots_df.index[:3])}."
        )
    if (~has_counts).any():
        logger.info(f"{sample}: skipped {int((~has_counts).sum())} selected spot(s) without a row in the counts table.")
    spots_df = spots_df.loc[has_counts]
    n_unmatched = int((~counts_df.index.isin(spots_df.index)).sum())
    if n_unmatched:
        logger.info(f"{sample}: dropped {n_unmatched} counts row(s) without a selected spot.")
    counts_df = counts_df.loc[spots_df.index]

    xy = spots_df[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    radius_px = spot_diameter_um / 2.0 / pixel_size_um
    obs = pd.DataFrame(
        {
            SAMPLE_COL: pd.Categorical([sample] * len(spots_df)),
            "array_x": spots_df["x"].to_numpy(),
            "array_y": spots_df["y"].to_numpy(),
        },
        index=spots_df.index.astype(str),
    )
    var = pd.DataFrame(index=_unique_gene_names(counts_df.columns, sample))
    adata = AnnData(X=_counts_matrix(counts_df, sample), obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = xy
    adata.layers[COUNTS_LAYER] = adata.X.copy()

    sdata = SpatialData(
        images={IMAGE_KEY: open_he_image(image, what="H&E image")},
        shapes={SPOTS_KEY: spot_circles(xy, radius_px)},
        tables={TABLE_KEY: spot_table(adata, region=SPOTS_KEY)},
    )
    set_pixel_size(sdata, IMAGE_KEY, pixel_size_um=pixel_size_um, elements=[SPOTS_KEY])
    if fit is not None:
        sdata.attrs[PIXEL_SIZE_FIT_KEY] = fit
    return sdata


def read_st_folder(
    folder: str | os.PathLike,
    *,
    pixel_size_um: float | None = None,
    spot_diameter_um: float = 100.0,
    spot_pitch_um: float = 200.0,
    sample: str | None = None,
) -> SpatialData:
    """Read a legacy ST section from one folder holding its counts table, spot file and H&E image.

    The folder holds ``counts.tsv.gz`` (or a ``*counts*.tsv*`` / ``*cnt*.tsv*`` file), ``spot_selection.tsv``
    (or ``*selection*.tsv*``) and exactly one image (``.jpg``, ``.jpeg``, ``.png``, ``.tif``, ``.tiff``), as in
    the her2st folders. See :func:`read_st` for the format and the result.

    Parameters
    ----------
    folder
        The section's folder.
    pixel_size_um
        Micrometres per image pixel; ``None`` (default) estimates it from the spot pitch (see :func:`read_st`).
        For her2st the estimate is about 0.688 µm/px.
    spot_diameter_um
        Spot diameter in µm (100 for legacy ST, 55 for Visium).
    spot_pitch_um
        Centre-to-centre distance of neighbouring array positions in µm (200 for legacy ST, 100 for Visium).
    sample
        Sample name written to ``obs["sample"]``; by default the folder's name.

    Returns
    -------
    A SpatialData object with ``images["he"]``, ``shapes["spots"]`` and ``tables["table"]`` (see :func:`read_st`).

    Raises
    ------
    FileNotFoundError
        If the folder, its counts table, spot file or image is missing.
    ValueError
        If the folder holds several candidate files of one kind.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ST section folder not found: {folder}")
    counts = _find_one(folder, _COUNTS_NAMES, "ST counts table (spots x genes, e.g. counts.tsv.gz)")
    spots = _find_one(folder, _SPOTS_NAMES, "ST spot file (e.g. spot_selection.tsv)")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"H&E image ({', '.join(_IMAGE_SUFFIXES)}) not found in {folder}")
    if len(images) > 1:
        raise ValueError(f"Several images in {folder}: {[p.name for p in images]}; use read_st(...) to pick one.")
    return read_st(
        counts,
        spots,
        images[0],
        pixel_size_um=pixel_size_um,
        spot_diameter_um=spot_diameter_um,
        spot_pitch_um=spot_pitch_um,
        sample=sample if sample is not None else folder.name,
    )


def estimate_pixel_size(spots: pd.DataFrame, *, spot_pitch_um: float = 200.0) -> dict:
    """Estimate µm per pixel from spot centres in pixels and their array positions on a known pitch.

    Fits ``[pixel_x, pixel_y] = A @ [array_x, array_y] + t`` by least squares; the columns of ``A`` are the pitch
    in pixels along the two array axes (rotation allowed).

    Parameters
    ----------
    spots
        Spot table with ``pixel_x, pixel_y`` and ``new_x, new_y`` (detected array positions; preferred) or ``x, y``.
    spot_pitch_um
        Centre-to-centre distance of neighbouring array positions in µm.

    Returns
    -------
    A dict of plain numbers: ``pixel_size_um`` (geometric mean of the two axes), ``pixel_size_um_x``,
    ``pixel_size_um_y``, ``rms_residual_px``, ``n_spots``, ``spot_pitch_um`` and ``array_columns``.
    """
    cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(spots.columns) else ["x", "y"]
    design = np.column_stack([spots[cols].to_numpy(dtype=np.float64), np.ones(len(spots))])
    target = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    if len(spots) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ValueError(
            f"Cannot estimate the pixel size from {len(spots)} spot(s) (need 3 or more, not on one line); pass "
            "pixel_size_um=..."
        )
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    linear = coef[:2].T  # pixel = linear @ array + offset
    pitch_px = np.linalg.norm(linear, axis=0)
    residual = target - design @ coef
    return {
        "pixel_size_um": float(spot_pitch_um / np.sqrt(abs(np.linalg.det(linear)))),
        "pixel_size_um_x": float(spot_pitch_um / pitch_px[0]),
        "pixel_size_um_y": float(spot_pitch_um / pitch_px[1]),
        "rms_residual_px": float(np.sqrt((residual**2).sum(axis=1).mean())),
        "n_spots": len(spots),
        "spot_pitch_um": float(spot_pitch_um),
        "array_columns": cols,
    }


def spot_circles(xy: np.ndarray, radius_px: float) -> gpd.GeoDataFrame:
    """Circles (``ShapesModel``, identity to ``"global"``) at ``xy`` (n x 2, pixels), index ``0..n-1``."""
    gdf = gpd.GeoDataFrame(
        {ShapesModel.RADIUS_KEY: np.full(len(xy), float(radius_px))},
        geometry=gpd.points_from_xy(xy[:, 0], xy[:, 1]),
        index=pd.RangeIndex(len(xy)),
    )
    return ShapesModel.parse(gdf, transformations={PIXEL_CS: Identity()})


def spot_table(adata: AnnData, *, region: str) -> AnnData:
    """Make ``adata`` (rows in the order of the shapes ``region``, index ``0..n-1``) a table annotating them."""
    adata.obs[REGION_COL] = pd.Categorical([region] * adata.n_obs, categories=[region])
    adata.obs[INSTANCE_COL] = np.arange(adata.n_obs)
    return TableModel.parse(adata, region=region, region_key=REGION_COL, instance_key=INSTANCE_COL)


def _read_counts(counts: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    if isinstance(counts, pd.DataFrame):
        df = counts.copy()
    else:
        path = require_file(counts, "ST counts table (spots x genes)")
        df = pd.read_csv(path, sep="\t", index_col=0)
        # pandas renames duplicated column names ("GENE", "GENE.1"); take the header as written
        header = pd.read_csv(path, sep="\t", header=None, nrows=1, dtype=str, keep_default_na=False)
        df.columns = header.iloc[0, 1:].to_numpy()
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    return df


def _read_spots(spots: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    if isinstance(spots, pd.DataFrame):
        df = spots.copy()
        source = "spot table"
    else:
        path = require_file(spots, "ST spot file (x, y, pixel_x, pixel_y)")
        df = pd.read_csv(path, sep="\t")
        source = str(path)
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise ValueError(f"{source} lacks column(s) {missing}; it has {list(df.columns)}.")
    df["x"] = df["x"].round().astype(int)
    df["y"] = df["y"].round().astype(int)
    df.index = pd.Index([f"{x}x{y}" for x, y in zip(df["x"], df["y"], strict=True)])
    return _selected(df)


def _selected(df: pd.DataFrame) -> pd.DataFrame:
    return df.loc[df["selected"] == 1] if "selected" in df.columns else df


def _counts_matrix(counts: pd.DataFrame, sample: str) -> sparse.csr_matrix:
    values = counts.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{sample}: the counts table holds non-numeric values.")
    if np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
        if values.size and values.max() > np.iinfo(np.int32).max:
            return sparse.csr_matrix(values.astype(np.int64))
        return sparse.csr_matrix(values.astype(np.int32))
    logger.warning(f"{sample}: counts are not whole numbers; kept as float32.")
    return sparse.csr_matrix(values.astype(np.float32))


def _unique_gene_names(genes: pd.Index, sample: str) -> pd.Index:
    dup = genes[genes.duplicated()].unique()
    if len(dup):
        warnings.warn(
            f"{sample}: {len(dup)} gene symbol(s) occur more than once in the counts table (e.g. {list(dup[:5])}); "
            "made unique by appending '-1', '-2', ...",
            UserWarning,
            stacklevel=3,
        )
        genes = make_index_unique(genes)
    return genes


def _find_one(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    for pattern in patterns:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"Several files for the {what} in {folder}: {[p.name for p in found]}.")
    raise FileNotFoundError(f"{what} not found in {folder} (looked for {', '.join(patterns)})")
