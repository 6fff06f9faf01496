"""Readers for spot-based data with a counts table and a spot file (legacy ST, Visium-style): :func:`read_st`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import ShapesModel, TableModel
from spatialdata.transformations import Identity

from .._constants import (
    COUNTS_LAYER,
    IMAGE_KEY,
    INSTANCE_COL,
    PIXEL_CS,
    PIXEL_SIZE_FIT_KEY,
    REGION_COL,
    SAMPLE_COL,
    SPATIAL_KEY,
    SPOTS_KEY,
    TABLE_KEY,
)
from .._genes import rename_genes, warn_if_ensembl
from .._image import set_pixel_size
from ._image import open_he_image
from ._st_arrays import (
    ARRAYS,
    ArrayName,
    check_array_args,
    check_given_pixel_size,
    check_tile_pixels,
    estimate_pixel_size,
)
from ._st_files import (
    ALIGNMENT_PREFIX,
    COUNTS_NAMES,
    IMAGE_SUFFIXES,
    SPOTS_NAMES,
    checked_counts,
    counts_matrix,
    find_one,
    find_stutility,
    images_in,
    read_counts,
    read_spots,
    unique_gene_names,
)

logger = logging.getLogger("dbk")


def read_st(
    counts: str | os.PathLike | pd.DataFrame,
    spots: str | os.PathLike | pd.DataFrame | np.ndarray,
    image: str | os.PathLike,
    *,
    pixel_size_um: float | None = None,
    array: ArrayName | None = None,
    spot_pitch_um: float | None = None,
    spot_diameter_um: float | None = None,
    sample: str | None = None,
    gene_symbols: Mapping | pd.Series | None = None,
) -> SpatialData:
    """Read a legacy Spatial Transcriptomics (ST) section: counts table, spot file and H&E image.

    The layout is the one of the ST pipeline as published for her2st (Andersson et al. 2021): a counts table of
    spots x genes whose row index is ``"{x}x{y}"`` (the spot's array position) and whose columns are gene symbols,
    and a spot file with columns ``x, y, pixel_x, pixel_y`` (optionally ``new_x, new_y, selected``) giving each
    spot's centre in the image's pixels, as the ST Spot Detector writes it (STUtility calls this file
    ``alignment_table_<name>.tsv``). Spots are joined on ``f"{x}x{y}"``; only ``selected == 1`` spots are kept
    (all spots if there is no ``selected`` column); selected spots without a counts row are skipped and counted in
    the log, as are counts rows without a selected spot.

    Instead of a spot file, ``spots`` may be a 3 x 3 affine alignment matrix that maps array positions to image
    pixels: a file holding exactly 9 numbers (whitespace- or tab-separated, on one line or several) in the order the
    ST Spot Detector and ST Analysis write them, column by column ``a11 a21 a31 a12 a22 a32 a13 a23 a33``, so that
    ``pixel_x = a11 * x + a12 * y + a13`` and ``pixel_y = a21 * x + a22 * y + a23`` (the last row must be
    ``0 0 1``; a file written row by row, ``a11 a12 a13 a21 ... 0 0 1``, is recognised by its last three numbers
    and read as such), or that matrix as a 3 x 3 array. Every counts row is then a spot (there is no selection), at
    the array position parsed from its ``"{x}x{y}"`` key (decimals allowed).

    For her2st the pixel size is about 0.688 µm/px (from the 200 µm spot pitch; HEST-1k's estimates are
    0.67–0.70).

    Parameters
    ----------
    counts
        Counts table (tab-separated, may be gzipped), or the table itself as a DataFrame (spots x genes). Counts
        must be non-negative numbers: a NaN, infinite or negative value is refused.
    spots
        Spot file (tab-separated) or 3 x 3 alignment file (see above), or the spot table as a DataFrame, or the
        alignment matrix as a 3 x 3 array.
    image
        The H&E image (JPEG/PNG, decoded into memory; or a TIFF, read lazily).
    pixel_size_um
        Micrometres per image pixel. ``None`` (default) estimates it from the spots (see
        :func:`estimate_pixel_size`): the array is detected from the pattern of the spots' array indices (or
        taken from ``array``), a least-squares affine fit of the spots' pixel centres on their array positions gives
        the pitch in pixels, and the pixel size is the array's µm per index step divided by it. The estimate is
        checked (x and y agree, the spots fit in an ST/Visium capture area, a 112 µm tile is not a few dozen pixels)
        and recorded in ``sdata.attrs["dbk_pixel_size_fit"]``. A given pixel size is checked for the capture area
        and the tile size (warnings only).
    array
        The spot array: ``"1k"`` (legacy ST, 1007 spots on a 33 x 35 grid, 200 µm per index step), ``"2k"``
        (legacy ST, spots on a checkerboard of indices, x + y of one parity, on a 67 x 64 grid, 100 µm per index
        step) or ``"visium"`` (x = array column, y = array row, 50 µm per column and 86.6 µm per row step; the axes
        are told apart from the fit). ``None`` detects it: both parities of x + y -> ``"1k"``; one parity
        (checkerboard) -> ``"2k"`` or ``"visium"``, whichever matches the ratio of the fitted y and x pitch (1 or
        1.73). Used for the pixel-size estimate, the capture-area check and the default spot diameter.
    spot_pitch_um
        µm per array index step on both axes, instead of the array's (e.g. for another array); the array, detected
        or given, then only sets the capture-area check and the spot diameter.
    spot_diameter_um
        Spot diameter in µm; sets the circles' radius. ``None``: 55 for Visium, else 100 (legacy ST).
    sample
        Sample name written to ``obs["sample"]``; by default the name of the folder holding ``counts``.
    gene_symbols
        Gene id -> symbol (a dict or Series) for counts tables whose columns are Ensembl ids (dbk matches genes by
        symbol; a warning says when they look like ids). Genes of one symbol are summed; genes without one keep
        their name (warned). The counts table has no gene annotation columns, so a column name is not accepted
        here (as :func:`dbk.io.read_hest` does). See :func:`dbk.pp.map_gene_names`.

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

    Warns
    -----
    UserWarning
        When the x and y pixel sizes of the estimate differ by more than 3%, when the spots span more than an
        ST/Visium capture area at a given pixel size, when a 112 µm tile would be narrower than 64 pixels, or when
        the given ``array`` does not match the pattern of the spots' indices.

    Raises
    ------
    FileNotFoundError
        If a file does not exist.
    ValueError
        If the spot file lacks a required column, spot keys are duplicated, no spot has counts, the counts table
        holds NaN, infinite, negative or non-numeric values (naming the file, a spot and a gene), or the pixel size
        cannot be estimated or its estimate puts the spots over more than an ST/Visium capture area.
    """
    if pixel_size_um is not None and not (np.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a positive number or None (estimate it), got {pixel_size_um!r}.")
    check_array_args(array, spot_pitch_um)
    counts_df = read_counts(counts)
    counts_source = "the counts DataFrame" if isinstance(counts, pd.DataFrame) else str(counts)
    counts_df = checked_counts(counts_df, counts_source)
    if sample is None:
        sample = Path(counts).parent.name if not isinstance(counts, pd.DataFrame) else "sample"
    spots_df = read_spots(spots, counts_df.index, sample)
    for what, index in (("counts table rows", counts_df.index), ("selected spots", spots_df.index)):
        if index.has_duplicates:
            raise ValueError(f"Duplicated spot keys among the {what}: {list(index[index.duplicated()].unique()[:5])}.")

    fit = None
    if pixel_size_um is None:
        fit = estimate_pixel_size(spots_df, array=array, spot_pitch_um=spot_pitch_um, name=sample)
        pixel_size_um = fit["pixel_size_um"]
        array = fit["array"]
        logger.info(
            f"{sample}: estimated pixel size {pixel_size_um:.4f} µm/px from {fit['n_spots']} spots on the "
            f"{fit['array']} array ({fit['array_reason']}; {fit['step_um_x']:g} x {fit['step_um_y']:g} µm per index "
            f"step): x {fit['pixel_size_um_x']:.4f}, y {fit['pixel_size_um_y']:.4f}; rms residual "
            f"{fit['rms_residual_px']:.2f} px; the spots span {fit['span_mm'][0]:.2f} x {fit['span_mm'][1]:.2f} mm; "
            f"array coordinates {fit['array_columns']}."
        )
    else:
        check_given_pixel_size(spots_df, pixel_size_um, sample)
    check_tile_pixels(pixel_size_um, sample)
    if spot_diameter_um is None:
        spot_diameter_um = ARRAYS[array]["spot_diameter_um"] if array is not None else 100.0

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
    var = pd.DataFrame(index=unique_gene_names(counts_df.columns, sample))
    adata = AnnData(X=counts_matrix(counts_df, sample), obs=obs, var=var)
    adata.obsm[SPATIAL_KEY] = xy
    adata.layers[COUNTS_LAYER] = adata.X.copy()
    if gene_symbols is not None:
        if isinstance(gene_symbols, str):
            raise TypeError(f"gene_symbols={gene_symbols!r}: the ST counts table has no gene annotation columns to "
                            "name; pass a dict or pandas Series id -> symbol.")
        adata = rename_genes(adata, gene_symbols, what=f"counts table {counts_source}")
    warn_if_ensembl(adata.var_names, f"counts table {counts_source}", how_to_map=(
        "read it with gene_symbols={id: symbol} (a dict or Series), or map them with "
        "dbk.pp.map_gene_names(sdata, mapping)"))

    sdata = SpatialData(
        images={IMAGE_KEY: open_he_image(image, what="H&E image")},
        shapes={SPOTS_KEY: spot_circles(xy, radius_px)},
        tables={TABLE_KEY: spot_table(adata, region=SPOTS_KEY)},
    )
    set_pixel_size(sdata, IMAGE_KEY, pixel_size_um=pixel_size_um, elements=[SPOTS_KEY])
    if fit is not None:
        sdata.attrs[PIXEL_SIZE_FIT_KEY] = fit
    sdata.attrs["sample"] = str(sample)  # the slide's name in logs and in fit_diffbulk / predict records
    return sdata


def read_st_folder(
    folder: str | os.PathLike,
    *,
    pixel_size_um: float | None = None,
    array: ArrayName | None = None,
    spot_pitch_um: float | None = None,
    spot_diameter_um: float | None = None,
    sample: str | None = None,
    section: str | None = None,
    gene_symbols: Mapping | pd.Series | None = None,
) -> SpatialData:
    """Read a legacy ST section from one folder holding its counts table, spot file and H&E image.

    Two layouts are found:

    - her2st (ST pipeline): ``counts.tsv.gz`` (or a ``*counts*.tsv*`` / ``*cnt*.tsv*`` / ``*stdata*.tsv*`` file),
      ``spot_selection.tsv`` (or ``*selection*.tsv*`` / ``*spot*.tsv*``) and exactly one image (``.jpg``,
      ``.jpeg``, ``.png``, ``.tif``, ``.tiff``);
    - STUtility: ``<name>.tsv`` (or ``.tsv.gz``; spots x genes, rows ``"{x}x{y}"``), ``alignment_table_<name>.tsv``
      (or ``.tsv.gz``; the ST Spot Detector's spot table ``x, y, new_x, new_y, pixel_x, pixel_y, selected``, or a
      3 x 3 alignment matrix of 9 numbers, see :func:`read_st`) and ``<name>.jpg`` (or another image suffix; the
      folder's only image when there is no ``<name>.*`` image and one section). A folder may hold several sections
      (as STUtility's example data does); ``section`` picks one. Used whenever an ``alignment_table_*`` file is
      present.

    See :func:`read_st` for the format, the pixel-size estimate and the result.

    Parameters
    ----------
    folder
        The section's folder.
    pixel_size_um
        Micrometres per image pixel; ``None`` (default) estimates it from the spots (see :func:`read_st`).
        For her2st the estimate is about 0.688 µm/px.
    array
        ``"1k"``, ``"2k"`` or ``"visium"``; ``None`` detects it (see :func:`read_st`).
    spot_pitch_um
        µm per array index step on both axes, instead of the array's (see :func:`read_st`).
    spot_diameter_um
        Spot diameter in µm; ``None``: 55 for Visium, else 100 (legacy ST).
    sample
        Sample name written to ``obs["sample"]``; by default the folder's name (her2st layout) or the section's
        ``<name>`` (STUtility layout).
    section
        The ``<name>`` of the section to read from a STUtility folder holding several.
    gene_symbols
        Gene id -> symbol (a dict or Series) for Ensembl-keyed counts (see :func:`read_st`).

    Returns
    -------
    A SpatialData object with ``images["he"]``, ``shapes["spots"]`` and ``tables["table"]`` (see :func:`read_st`).

    Raises
    ------
    FileNotFoundError
        If the folder, its counts table, spot file or image is missing, or ``section`` is not in the folder.
    ValueError
        If the folder holds several candidate files of one kind, or several STUtility sections and no ``section``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ST section folder not found: {folder}")
    stutility = find_stutility(folder, section)
    if stutility is not None:
        name, counts, spots, image = stutility
        default_sample = name
    else:
        if section is not None:
            raise FileNotFoundError(
                f"section={section!r} was given, but {folder} holds no STUtility alignment table "
                f"({ALIGNMENT_PREFIX}{section}.tsv)."
            )
        counts = find_one(folder, COUNTS_NAMES, "ST counts table (spots x genes, e.g. counts.tsv.gz)")
        spots = find_one(folder, SPOTS_NAMES, "ST spot file (e.g. spot_selection.tsv)")
        images = images_in(folder)
        if not images:
            raise FileNotFoundError(f"H&E image ({', '.join(IMAGE_SUFFIXES)}) not found in {folder}")
        if len(images) > 1:
            raise ValueError(f"Several images in {folder}: {[p.name for p in images]}; use read_st(...) to pick one.")
        image, default_sample = images[0], folder.name
    return read_st(
        counts,
        spots,
        image,
        pixel_size_um=pixel_size_um,
        array=array,
        spot_pitch_um=spot_pitch_um,
        spot_diameter_um=spot_diameter_um,
        sample=sample if sample is not None else default_sample,
        gene_symbols=gene_symbols,
    )


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
