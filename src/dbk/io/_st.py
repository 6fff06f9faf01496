"""Readers for spot-based data with a counts table and a spot file (legacy ST, Visium-style): :func:`read_st`."""

from __future__ import annotations

import gzip
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Literal

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
_ALIGNMENT_PREFIX = "alignment_table_"  # STUtility: <name>.tsv, alignment_table_<name>.tsv, <name>.jpg
_TABLE_SUFFIXES = (".tsv.gz", ".tsv")

ArrayName = Literal["1k", "2k", "visium"]

# The spot arrays dbk knows. ``step_um``: µm per array index step along (x, y) (Visium: x = array column,
# y = array row); ``checkerboard``: spots only where x + y has one parity; ``capture_mm``: the capture area's sides;
# ``spot_diameter_um``: the default spot diameter.
_ARRAYS: dict[str, dict] = {
    "1k": {"step_um": (200.0, 200.0), "checkerboard": False, "capture_mm": (6.5, 6.9), "spot_diameter_um": 100.0},
    "2k": {"step_um": (100.0, 100.0), "checkerboard": True, "capture_mm": (6.5, 6.9), "spot_diameter_um": 100.0},
    "visium": {
        "step_um": (50.0, 50.0 * np.sqrt(3.0)),
        "checkerboard": True,
        "capture_mm": (6.5, 6.5),
        "spot_diameter_um": 55.0,
    },
}
_LARGEST_CAPTURE_MM = (6.5, 6.9)  # no ST or Visium capture area is larger
_CAPTURE_MARGIN = 1.10  # spots may span up to 10% more than the capture area before the pixel size is doubted
_PITCH_TOLERANCE = 0.03  # x and y pixel sizes may differ by 3% before a warning
_MIN_SPOTS_FOR_PATTERN = 10  # fewer spots on one parity of x + y may be a 1k array by chance
_TILE_UM = 112.0  # make_tiles' default tile side
_MIN_TILE_PX = 64  # a default tile narrower than this many pixels is flagged


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
    _check_array_args(array, spot_pitch_um)
    counts_df = _read_counts(counts)
    counts_source = "the counts DataFrame" if isinstance(counts, pd.DataFrame) else str(counts)
    counts_df = _checked_counts(counts_df, counts_source)
    if sample is None:
        sample = Path(counts).parent.name if not isinstance(counts, pd.DataFrame) else "sample"
    spots_df = _read_spots(spots, counts_df.index, sample)
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
        _check_given_pixel_size(spots_df, pixel_size_um, sample)
    _check_tile_pixels(pixel_size_um, sample)
    if spot_diameter_um is None:
        spot_diameter_um = _ARRAYS[array]["spot_diameter_um"] if array is not None else 100.0

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
    array: ArrayName | None = None,
    spot_pitch_um: float | None = None,
    spot_diameter_um: float | None = None,
    sample: str | None = None,
    section: str | None = None,
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
    stutility = _find_stutility(folder, section)
    if stutility is not None:
        name, counts, spots, image = stutility
        default_sample = name
    else:
        if section is not None:
            raise FileNotFoundError(
                f"section={section!r} was given, but {folder} holds no STUtility alignment table "
                f"({_ALIGNMENT_PREFIX}{section}.tsv)."
            )
        counts = _find_one(folder, _COUNTS_NAMES, "ST counts table (spots x genes, e.g. counts.tsv.gz)")
        spots = _find_one(folder, _SPOTS_NAMES, "ST spot file (e.g. spot_selection.tsv)")
        images = _images(folder)
        if not images:
            raise FileNotFoundError(f"H&E image ({', '.join(_IMAGE_SUFFIXES)}) not found in {folder}")
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
    )


def estimate_pixel_size(
    spots: pd.DataFrame,
    *,
    array: ArrayName | None = None,
    spot_pitch_um: float | None = None,
    name: str = "spots",
) -> dict:
    """Estimate µm per pixel from spot centres in pixels and their array positions, and check the estimate.

    Fits ``[pixel_x, pixel_y] = A @ [array_x, array_y] + t`` by least squares; the columns of ``A`` are the pitch
    in pixels along the two array axes (rotation allowed). The array (and so the µm per index step) is detected from
    the integer positions ``x, y`` unless given: both parities of ``x + y`` -> legacy ST ``"1k"`` (200 µm per
    step); one parity (a checkerboard, needing at least 10 spots) -> legacy ST ``"2k"`` (100 µm per step) or
    ``"visium"`` (50 µm per column, 86.6 µm per row), whichever matches the ratio of the fitted pitches along y and
    x. The pixel size along each axis is the step in µm divided by the pitch in pixels; the pixel size is
    ``sqrt(step_x * step_y / |det A|)``.

    Checks: x and y pixel sizes differing by more than 3% -> ``UserWarning`` with both numbers (a wrong array, or a
    stretched image); spots spanning more than the array's capture area (legacy ST 6.5 x 6.9 mm, Visium 6.5 x 6.5
    mm) plus 10% -> ``ValueError`` (``UserWarning`` with a custom ``spot_pitch_um``); ``array`` given against the
    pattern of the indices -> ``UserWarning``.

    Parameters
    ----------
    spots
        Spot table with ``x, y`` (integer array positions), ``pixel_x, pixel_y`` and optionally ``new_x, new_y``
        (detected array positions; preferred for the fit).
    array
        ``"1k"``, ``"2k"`` or ``"visium"``; ``None`` detects it.
    spot_pitch_um
        µm per array index step on both axes, instead of the array's.
    name
        What to call the spots in messages (the sample).

    Returns
    -------
    A dict of plain numbers and strings: ``pixel_size_um``, ``pixel_size_um_x``, ``pixel_size_um_y``,
    ``rms_residual_px``, ``n_spots``, ``array``, ``array_reason`` (how the array was chosen), ``step_um_x``,
    ``step_um_y``, ``spot_pitch_um`` (``sqrt(step_x * step_y)``), ``span_mm`` (the spots' extent along the two
    array axes) and ``array_columns``.

    Raises
    ------
    ValueError
        If there are fewer than 3 spots or they lie on one line, or the estimate puts them over more than an
        ST/Visium capture area.
    """
    _check_array_args(array, spot_pitch_um)
    linear, rms, cols, positions = _fit_array(spots)
    pitch_px = np.linalg.norm(linear, axis=0)
    chosen, reason = _choose_array(spots, pitch_px, array, name)
    if spot_pitch_um is not None:
        step = (float(spot_pitch_um), float(spot_pitch_um))
        reason += f"; spot_pitch_um={spot_pitch_um:g} given"
    else:
        step = _array_step(chosen, pitch_px)
    ps_x, ps_y = step[0] / pitch_px[0], step[1] / pitch_px[1]
    ps = float(np.sqrt(step[0] * step[1] / abs(np.linalg.det(linear))))
    span_mm = _span_mm(positions, pitch_px, ps)
    fit = {
        "pixel_size_um": ps,
        "pixel_size_um_x": float(ps_x),
        "pixel_size_um_y": float(ps_y),
        "rms_residual_px": rms,
        "n_spots": len(spots),
        "array": chosen,
        "array_reason": reason,
        "step_um_x": float(step[0]),
        "step_um_y": float(step[1]),
        "spot_pitch_um": float(np.sqrt(step[0] * step[1])),
        "span_mm": [float(v) for v in span_mm],
        "array_columns": cols,
    }
    remedy = "pass array='1k'|'2k'|'visium', spot_pitch_um=<µm per index step> or pixel_size_um=<µm per pixel>"
    if abs(ps_x / ps_y - 1.0) > _PITCH_TOLERANCE:
        _warn(
            f"{name}: the pixel size estimated along the array's x axis ({ps_x:.4f} µm/px) and y axis "
            f"({ps_y:.4f} µm/px) differ by {abs(ps_x / ps_y - 1.0):.1%} on the {chosen} array ({reason}; "
            f"{step[0]:g} x {step[1]:g} µm per index step, {pitch_px[0]:.2f} x {pitch_px[1]:.2f} px per step); "
            f"the array or its step may be wrong, or the image is stretched. Using their geometric mean "
            f"{ps:.4f} µm/px; {remedy} if you know better."
        )
    capture = _ARRAYS[chosen]["capture_mm"] if spot_pitch_um is None else _LARGEST_CAPTURE_MM
    if _exceeds(span_mm, capture):
        message = (
            f"{name}: at the estimated {ps:.4f} µm/px the spots span {span_mm[0]:.2f} x {span_mm[1]:.2f} mm, more "
            f"than the {capture[0]:g} x {capture[1]:g} mm capture area of the {chosen} array ({reason}; "
            f"{step[0]:g} x {step[1]:g} µm per index step), so the estimate cannot be right. Legacy ST '2k' arrays "
            f"(spots where x + y is even, 100 µm per step) read as '1k' (200 µm) come out twice too large; {remedy}."
        )
        if spot_pitch_um is None:
            raise ValueError(message)
        _warn(message)
    return fit


# ---- array detection and plausibility checks ---------------------------------------------------------------------


def _check_array_args(array, spot_pitch_um) -> None:
    if array is not None and array not in _ARRAYS:
        raise ValueError(f"array must be one of {list(_ARRAYS)} or None (detect it), got {array!r}.")
    if spot_pitch_um is not None and not (np.isfinite(spot_pitch_um) and spot_pitch_um > 0):
        raise ValueError(f"spot_pitch_um must be a positive number or None, got {spot_pitch_um!r}.")


def _fit_array(spots: pd.DataFrame) -> tuple[np.ndarray, float, list[str], np.ndarray]:
    """Least-squares affine fit of pixel centres on array positions: (2 x 2 linear part, rms px, columns, positions)."""
    cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(spots.columns) else ["x", "y"]
    positions = spots[cols].to_numpy(dtype=np.float64)
    design = np.column_stack([positions, np.ones(len(spots))])
    target = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    if len(spots) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ValueError(
            f"Cannot estimate the pixel size from {len(spots)} spot(s) (need 3 or more, not on one line); pass "
            "pixel_size_um=..."
        )
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ coef
    return coef[:2].T, float(np.sqrt((residual**2).sum(axis=1).mean())), cols, positions


def _choose_array(spots: pd.DataFrame, pitch_px: np.ndarray, array: str | None, name: str) -> tuple[str, str]:
    """The array (given or detected from the parity of x + y and the fitted pitch ratio) and why, in words."""
    ix, iy = spots["x"].to_numpy(dtype=np.int64), spots["y"].to_numpy(dtype=np.int64)
    n = len(ix)
    one_parity = bool(np.all((ix + iy) % 2 == (ix[0] + iy[0]) % 2))
    grid = f"{n} spots, x {ix.min()}..{ix.max()}, y {iy.min()}..{iy.max()}"
    ratio = float(pitch_px[1] / pitch_px[0])
    if one_parity and n >= _MIN_SPOTS_FOR_PATTERN:
        # 2k: equal steps (ratio 1); Visium: a row step is sqrt(3) column steps (ratio 1.73, or 0.58 if x is the row)
        visium = min(abs(np.log(ratio / np.sqrt(3.0))), abs(np.log(ratio * np.sqrt(3.0)))) < abs(np.log(ratio))
        detected = "visium" if visium else "2k"
        pattern = f"x + y always {'even' if (ix[0] + iy[0]) % 2 == 0 else 'odd'} (checkerboard), y/x pitch {ratio:.2f}"
    elif one_parity:
        detected, pattern = "1k", "too few spots to tell a checkerboard, assumed 1k"
    else:
        detected, pattern = "1k", "x + y of both parities"
    if array is None:
        if one_parity and n < _MIN_SPOTS_FOR_PATTERN:
            _warn(
                f"{name}: {n} spot(s) are too few to tell the array from the pattern of their indices; assuming a "
                "legacy ST 1k array (200 µm per index step). Pass array='1k'|'2k'|'visium' or pixel_size_um=..."
            )
        return detected, f"detected: {pattern}; {grid}"
    if n >= _MIN_SPOTS_FOR_PATTERN and _ARRAYS[array]["checkerboard"] != (_ARRAYS[detected]["checkerboard"]):
        _warn(
            f"{name}: array={array!r} was given, but the spots' indices look like a {detected} array ({pattern}; "
            f"{grid})."
        )
    return array, f"array={array!r} given; {grid}"


def _array_step(array: str, pitch_px: np.ndarray) -> tuple[float, float]:
    step_x, step_y = _ARRAYS[array]["step_um"]
    if array == "visium" and pitch_px[1] < pitch_px[0]:  # x is the array row, y the column
        step_x, step_y = step_y, step_x
    return float(step_x), float(step_y)


def _span_mm(positions: np.ndarray, pitch_px: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Extent of the spot centres along the two array axes, in mm."""
    return np.ptp(positions, axis=0) * pitch_px * pixel_size_um / 1000.0


def _exceeds(span_mm, capture_mm) -> bool:
    return bool(np.any(np.sort(span_mm) > np.sort(capture_mm) * _CAPTURE_MARGIN))


def _check_given_pixel_size(spots: pd.DataFrame, pixel_size_um: float, name: str) -> None:
    """Warn when the spots, at a given pixel size, span more than any ST/Visium capture area."""
    try:
        linear, _, _, positions = _fit_array(spots)
    except ValueError:
        return
    span_mm = _span_mm(positions, np.linalg.norm(linear, axis=0), pixel_size_um)
    if _exceeds(span_mm, _LARGEST_CAPTURE_MM):
        _warn(
            f"{name}: at the given {pixel_size_um:g} µm/px the spots span {span_mm[0]:.2f} x {span_mm[1]:.2f} mm, "
            f"more than any ST/Visium capture area ({_LARGEST_CAPTURE_MM[0]:g} x {_LARGEST_CAPTURE_MM[1]:g} mm); "
            "is pixel_size_um right?"
        )


def _check_tile_pixels(pixel_size_um: float, name: str) -> None:
    """Warn when a default 112 µm tile would be a few dozen pixels: a wrong pixel size or a downsampled image."""
    tile_px = _TILE_UM / pixel_size_um
    if tile_px < _MIN_TILE_PX:
        _warn(
            f"{name}: at {pixel_size_um:.4g} µm/px a {_TILE_UM:g} µm tile (make_tiles' default) is only "
            f"{tile_px:.0f} px across (pathology models take 224 px tiles at about 0.5 µm/px); check the pixel size, "
            "and whether this is the full-resolution image."
        )


def _warn(message: str) -> None:
    """``UserWarning`` attributed to the first caller outside the dbk package."""
    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


# ---- the files -------------------------------------------------------------------------------------------------------


def _find_stutility(folder: Path, section: str | None) -> tuple[str, Path, Path, Path] | None:
    """``(name, counts, alignment, image)`` of the STUtility section in ``folder``; ``None`` if it has none."""
    tables = {}
    for path in sorted(folder.glob(f"{_ALIGNMENT_PREFIX}*")):
        for suffix in _TABLE_SUFFIXES:
            if path.is_file() and path.name.endswith(suffix):
                tables[path.name[len(_ALIGNMENT_PREFIX) : -len(suffix)]] = path
                break
    if not tables:
        return None
    if section is None:
        if len(tables) > 1:
            raise ValueError(f"{folder} holds several STUtility sections {sorted(tables)}; pass section=... .")
        section = next(iter(tables))
    elif section not in tables:
        raise FileNotFoundError(
            f"STUtility section {section!r} not found in {folder} (no {_ALIGNMENT_PREFIX}{section}.tsv); it holds "
            f"{sorted(tables)}."
        )
    counts = [folder / f"{section}{suffix}" for suffix in _TABLE_SUFFIXES if (folder / f"{section}{suffix}").is_file()]
    if not counts:
        raise FileNotFoundError(f"ST counts table of section {section!r} not found: {folder / (section + '.tsv')}")
    if len(counts) > 1:
        raise ValueError(f"Several counts tables for section {section!r} in {folder}: {[p.name for p in counts]}.")
    images = [p for p in _images(folder) if p.stem == section]
    if not images and len(tables) == 1 and len(_images(folder)) == 1:
        images = _images(folder)
    if not images:
        raise FileNotFoundError(
            f"H&E image of section {section!r} not found in {folder} (looked for {section}.jpg and the other "
            f"suffixes {', '.join(_IMAGE_SUFFIXES)})"
        )
    if len(images) > 1:
        raise ValueError(f"Several images for section {section!r} in {folder}: {[p.name for p in images]}.")
    return section, counts[0], tables[section], images[0]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


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


def _read_spots(spots, counts_index: pd.Index, sample: str) -> pd.DataFrame:
    """The selected spots (``x, y`` integer, ``pixel_x, pixel_y``, ...) indexed by their ``"{x}x{y}"`` key."""
    matrix, source = None, "spot table"
    if isinstance(spots, np.ndarray):
        source = "the alignment matrix"
        matrix = _affine_matrix(np.asarray(spots, dtype=np.float64).ravel(order="F"), source)
    elif not isinstance(spots, pd.DataFrame):
        path = require_file(spots, "ST spot file (x, y, pixel_x, pixel_y) or 3 x 3 alignment matrix")
        source = str(path)
        numbers = _nine_numbers(path)
        if numbers is not None:
            matrix = _affine_matrix(numbers, source)
    if matrix is not None:
        return _spots_from_matrix(matrix, counts_index, source, sample)
    df = spots.copy() if isinstance(spots, pd.DataFrame) else pd.read_csv(path, sep="\t")
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise ValueError(f"{source} lacks column(s) {missing}; it has {list(df.columns)}.")
    df["x"] = df["x"].round().astype(int)
    df["y"] = df["y"].round().astype(int)
    df.index = pd.Index([f"{x}x{y}" for x, y in zip(df["x"], df["y"], strict=True)])
    return _selected(df)


def _nine_numbers(path: Path) -> np.ndarray | None:
    """The 9 numbers of a 3 x 3 alignment file, in file order; ``None`` if the file is not just 9 numbers."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt") as fh:
        head = fh.read(4096)
    tokens = head.replace(",", " ").split()
    if len(tokens) != 9 or len(head) == 4096:
        return None
    try:
        return np.array([float(t) for t in tokens])
    except ValueError:
        return None


def _affine_matrix(numbers: np.ndarray, source: str) -> np.ndarray:
    """3 x 3 matrix from 9 numbers written column by column (ST Spot Detector, ST Analysis) or row by row."""
    column_major = numbers.reshape(3, 3, order="F")
    row_major = numbers.reshape(3, 3, order="C")
    for matrix in (column_major, row_major):
        if np.allclose(matrix[2], [0.0, 0.0, 1.0]) and abs(np.linalg.det(matrix[:2, :2])) > 1e-12:
            return matrix
    raise ValueError(
        f"{source}: 9 numbers {numbers.tolist()} are not a 3 x 3 affine alignment matrix (written column by column, "
        "a11 a21 a31 a12 a22 a32 a13 a23 a33, so that the last row a31 a32 a33 is 0 0 1, with an invertible 2 x 2 "
        "part)."
    )


_KEY = re.compile(r"\s*(-?\d+(?:\.\d*)?)\s*x\s*(-?\d+(?:\.\d*)?)\s*")


def _spots_from_matrix(matrix: np.ndarray, counts_index: pd.Index, source: str, sample: str) -> pd.DataFrame:
    """Every counts row as a spot, at its ``"{x}x{y}"`` array position mapped through the alignment matrix."""
    parsed = [_KEY.fullmatch(str(key)) for key in counts_index]
    bad = [key for key, m in zip(counts_index, parsed, strict=True) if m is None]
    if bad:
        raise ValueError(
            f"{sample}: with an alignment matrix ({source}) the spots' array positions come from the counts rows, "
            f"which must look like '12x7' (or '12.03x6.98'); {len(bad)} do not, e.g. {bad[:3]}."
        )
    pos = np.array([[float(m.group(1)), float(m.group(2))] for m in parsed]).reshape(-1, 2)
    pixel = pos @ matrix[:2, :2].T + matrix[:2, 2]
    logger.info(
        f"{sample}: spot centres from the 3 x 3 alignment matrix in {source} (pixel = A @ [x, y, 1]); all "
        f"{len(pos)} counts rows are spots (no selection)."
    )
    return pd.DataFrame(
        {
            "x": np.round(pos[:, 0]).astype(int),
            "y": np.round(pos[:, 1]).astype(int),
            "new_x": pos[:, 0],
            "new_y": pos[:, 1],
            "pixel_x": pixel[:, 0],
            "pixel_y": pixel[:, 1],
        },
        index=pd.Index(counts_index.astype(str)),
    )


def _selected(df: pd.DataFrame) -> pd.DataFrame:
    return df.loc[df["selected"] == 1] if "selected" in df.columns else df


def _checked_counts(counts: pd.DataFrame, source: str) -> pd.DataFrame:
    """``counts`` with numeric columns; non-numeric, NaN, infinite or negative counts raise, naming spot and gene."""
    columns = {}
    for j in range(counts.shape[1]):
        column = counts.iloc[:, j]
        if pd.api.types.is_numeric_dtype(column.dtype):
            continue
        numbers = pd.to_numeric(column, errors="coerce")
        failed = column.index[(numbers.isna() & column.notna()).to_numpy()]
        if len(failed):
            raise ValueError(
                f"{source}: the counts table holds non-numeric values, e.g. spot {failed[0]!r}, gene "
                f"{counts.columns[j]!r} holds {column[failed[0]]!r}."
            )
        columns[j] = numbers
    if columns:
        counts = counts.copy()
        for j, numbers in columns.items():
            counts.isetitem(j, numbers)
    values = counts.to_numpy()
    if values.dtype.kind not in "iuf":  # nullable or boolean columns
        values = counts.to_numpy(dtype=np.float64, na_value=np.nan)
        counts = pd.DataFrame(values, index=counts.index, columns=counts.columns)
    for what, bad in (
        (
            "NaN or infinite value(s) (an empty field reads as NaN)",
            ~np.isfinite(values) if values.dtype.kind == "f" else None,
        ),
        ("negative value(s)", values < 0),
    ):
        if bad is None or not bad.any():
            continue
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"{source}: the counts table holds {int(bad.sum())} {what}; the first is {float(values[i, j]):g}, at "
            f"spot {counts.index[i]!r}, gene {counts.columns[j]!r}. Counts must be non-negative numbers (write 0 "
            "for no counts)."
        )
    return counts


def _counts_matrix(counts: pd.DataFrame, sample: str) -> sparse.csr_matrix:
    values = counts.to_numpy()
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
