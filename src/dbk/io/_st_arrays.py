"""Spot arrays of legacy ST and Visium: detect the array from the spots, estimate and check the pixel size.

:func:`estimate_pixel_size` fits the spots' pixel centres on their array positions; the checks here warn (or raise)
when a pixel size cannot be right for an ST/Visium capture area or makes a default tile a few dozen pixels.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

ArrayName = Literal["1k", "2k", "visium"]

# The spot arrays dbk knows. ``step_um``: µm per array index step along (x, y) (Visium: x = array column,
# y = array row); ``checkerboard``: spots only where x + y has one parity; ``capture_mm``: the capture area's sides;
# ``spot_diameter_um``: the default spot diameter.
ARRAYS: dict[str, dict] = {
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
    check_array_args(array, spot_pitch_um)
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
    capture = ARRAYS[chosen]["capture_mm"] if spot_pitch_um is None else _LARGEST_CAPTURE_MM
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


def check_array_args(array, spot_pitch_um) -> None:
    if array is not None and array not in ARRAYS:
        raise ValueError(f"array must be one of {list(ARRAYS)} or None (detect it), got {array!r}.")
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
    if n >= _MIN_SPOTS_FOR_PATTERN and ARRAYS[array]["checkerboard"] != (ARRAYS[detected]["checkerboard"]):
        _warn(
            f"{name}: array={array!r} was given, but the spots' indices look like a {detected} array ({pattern}; "
            f"{grid})."
        )
    return array, f"array={array!r} given; {grid}"


def _array_step(array: str, pitch_px: np.ndarray) -> tuple[float, float]:
    step_x, step_y = ARRAYS[array]["step_um"]
    if array == "visium" and pitch_px[1] < pitch_px[0]:  # x is the array row, y the column
        step_x, step_y = step_y, step_x
    return float(step_x), float(step_y)


def _span_mm(positions: np.ndarray, pitch_px: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Extent of the spot centres along the two array axes, in mm."""
    return np.ptp(positions, axis=0) * pitch_px * pixel_size_um / 1000.0


def _exceeds(span_mm, capture_mm) -> bool:
    return bool(np.any(np.sort(span_mm) > np.sort(capture_mm) * _CAPTURE_MARGIN))


def check_given_pixel_size(spots: pd.DataFrame, pixel_size_um: float, name: str) -> None:
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


def check_tile_pixels(pixel_size_um: float, name: str) -> None:
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
