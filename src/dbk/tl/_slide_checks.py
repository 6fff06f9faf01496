"""Is a slide like the training slides? Pixel size and tile colours, recorded at fit, compared at predict.

A model is trained at one scale and on one look of H&E. A slide whose pixel size is declared wrongly (0.25 µm/px
for a 0.5 µm/px scan) gets tiles of another physical size in pixels; a slide stained or scanned very differently
(or an inverted, grey or channel-swapped image) gives features the head never saw. Both give flat or wrong maps
without an error, so :func:`dbk.tl.fit_diffbulk` records the training slides' pixel sizes and the colours of their
tiles in the model's config (``config["train"]``) and :meth:`dbk.tl.DiffBulk.predict` compares each slide with them,
warning with the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._constants import TILES_KEY
from .._logging import logger

# a slide whose pixel size is this far (relative) from the training slides' median is warned about. Scanners of
# one magnification differ by up to ~15% (0.2125 Xenium vs 0.25 µm/px at 40x; 0.46 vs 0.50 at 20x); a magnification
# declared wrongly is a factor 2 (-50% or +100%). 25% lies between the two.
PIXEL_SIZE_TOLERANCE = 0.25
# tile colours: tiles read at COLOUR_SIZE_PX x COLOUR_SIZE_PX px, at most COLOUR_MAX_TILES per slide (evenly spaced)
COLOUR_SIZE_PX = 16
COLOUR_MAX_TILES = 64
# a slide's per-channel mean (0-255) is far from the training slides' when it is further than
# max(COLOUR_MIN_LEVELS, COLOUR_K_SLIDE_STD x between-slide std) from their mean in some channel. 40 levels is four
# times the spread of one lab's H&E (the six her2st sections, two patients, span at most 10 levels per channel; dbk's
# synthetic slides sit 38 levels from them in R), so ordinary stain and scanner differences pass, while an inverted
# image (~ 100 levels or more) or a strong tint (halving a channel: ~ 60-90 levels) does not; with several training
# slides, a slide within 3 of their between-slide standard deviations is as alike as they are to each other.
COLOUR_MIN_LEVELS = 40.0
COLOUR_K_SLIDE_STD = 3.0
CHANNELS = ("R", "G", "B")


def tile_colour_stats(sdata, tiles_key: str = TILES_KEY, *, max_tiles: int = COLOUR_MAX_TILES,
                      size_px: int = COLOUR_SIZE_PX) -> dict | None:
    """Per-channel RGB mean and standard deviation (0-255) of a slide's tiles, read small.

    At most ``max_tiles`` tiles, evenly spaced over the tile list (deterministic), each read with
    :class:`dbk.pp.TileDataset` at ``size_px`` px (from the coarsest pyramid level fine enough for it), so a slide
    costs a few coarse image chunks. The tiles are the tissue tiles :func:`dbk.pp.make_tiles` laid.

    Parameters
    ----------
    sdata
        The slide with its image and tiles.
    tiles_key
        The tiles.
    max_tiles
        Tiles read at most.
    size_px
        Side each tile is resampled to.

    Returns
    -------
    ``{"mean": [r, g, b], "std": [r, g, b], "n_tiles": n}`` over all pixels of the tiles read, or ``None`` when the
    slide has no tiles or its image cannot be read (logged).
    """
    from ..pp._dataset import TileDataset

    if tiles_key not in sdata.shapes or len(sdata.shapes[tiles_key]) == 0:
        return None
    image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key")
    try:
        ds = TileDataset(sdata, tiles_key, image_key=image_key, size_px=size_px, chunk_cache_mb=64)
        idx = np.unique(np.linspace(0, len(ds) - 1, min(max_tiles, len(ds))).round().astype(int))
        px = np.concatenate([ds.read(int(i)).reshape(-1, 3) for i in idx]).astype(np.float64)
    except (ValueError, KeyError, OSError) as err:
        logger.info(f"tile colours not measured ({type(err).__name__}: {err}).")
        return None
    return {"mean": [round(float(v), 3) for v in px.mean(axis=0)],
            "std": [round(float(v), 3) for v in px.std(axis=0)], "n_tiles": len(idx)}


def slide_pixel_size(sdata, tiles_key: str = TILES_KEY) -> float | None:
    """Level-0 pixel size (µm) of the image the tiles were laid on; ``None`` when it has none."""
    from .._image import get_pixel_size

    image_key = sdata.shapes[tiles_key].attrs.get("dbk", {}).get("image_key") if tiles_key in sdata.shapes else None
    try:
        return float(get_pixel_size(sdata, image_key))
    except (ValueError, KeyError):
        return None


def training_record(slides: Sequence, names: Sequence[str], *, tiles_key: str = TILES_KEY) -> dict:
    """What :meth:`DiffBulk.predict` compares new slides with, for ``config["train"]`` (plain JSON).

    ``pixel_size_um`` (slide name -> µm/px, ``None`` where unknown), ``pixel_size_um_median`` and ``tile_rgb``:
    each slide's :func:`tile_colour_stats` (``per_slide``), the mean over slides of their per-channel means and
    standard deviations (``mean``, ``std``), the standard deviation between the slides' means (``between_slide_std``,
    0 with one slide) and the reading settings (``size_px``, ``max_tiles``).
    """
    px = {str(n): slide_pixel_size(sd, tiles_key) for sd, n in zip(slides, names, strict=True)}
    known = [v for v in px.values() if v is not None]
    per_slide = {str(n): tile_colour_stats(sd, tiles_key) for sd, n in zip(slides, names, strict=True)}
    stats = [s for s in per_slide.values() if s is not None]
    rgb = None
    if stats:
        means, stds = np.array([s["mean"] for s in stats]), np.array([s["std"] for s in stats])
        rgb = {"mean": _r(means.mean(axis=0)), "std": _r(stds.mean(axis=0)), "between_slide_std": _r(means.std(axis=0)),
               "per_slide": {n: s for n, s in per_slide.items() if s is not None}, "size_px": COLOUR_SIZE_PX,
               "max_tiles": COLOUR_MAX_TILES}
    return {"pixel_size_um": px, "pixel_size_um_median": float(np.median(known)) if known else None, "tile_rgb": rgb}


def _r(a) -> list[float]:
    return [round(float(v), 3) for v in np.asarray(a)]


def check_pixel_size(px: float | None, train: dict, *, name: str, tile_size_um: float) -> dict | None:
    """Compare a slide's pixel size with the training slides' median; warn when it is more than 25% off.

    Returns the check's record (``{"pixel_size_um", "training_median_um", "relative_difference", "ok"}``), or
    ``None`` when either pixel size is unknown.
    """
    median = train.get("pixel_size_um_median")
    if px is None or median is None:
        return None
    rel = px / median - 1
    ok = abs(rel) <= PIXEL_SIZE_TOLERANCE
    if not ok:
        per = ", ".join(f"{n}: {v:.3g}" for n, v in list((train.get("pixel_size_um") or {}).items())[:6]
                        if v is not None)
        more = len(train.get("pixel_size_um") or {}) - 6
        per += f", ... {more} more" if more > 0 else ""
        logger.warning(
            f"predict: slide {name!r} has a pixel size of {px:.3g} µm/px, {100 * abs(rel):.0f}% "
            f"{'below' if rel < 0 else 'above'} the training slides' {median:.3g} µm/px ({per}): tiles of "
            f"{tile_size_um:g} µm cover {tile_size_um / px:.0f} px of this image, {tile_size_um / median:.0f} px of "
            "the training images. If the pixel size is wrong, the tiles and so the predictions are wrong: check "
            "dbk.io.get_pixel_size(sdata) against the scanner's metadata and fix it with dbk.io.set_pixel_size.")
    return {"pixel_size_um": float(px), "training_median_um": float(median), "relative_difference": round(rel, 4),
            "tolerance": PIXEL_SIZE_TOLERANCE, "ok": bool(ok)}


def check_colours(stats: dict | None, train: dict, *, name: str) -> dict | None:
    """Compare a slide's tile colours with the training slides'; warn when a channel's mean is far off.

    Far: more than ``max(40, 3 x between-slide std)`` intensity levels (0-255) from the training slides' mean in
    some channel (see ``COLOUR_MIN_LEVELS`` for why). Returns the check's record, or ``None`` when either side has
    no colour statistics.
    """
    rgb = train.get("tile_rgb")
    if stats is None or not rgb:
        return None
    mean, ref = np.asarray(stats["mean"], float), np.asarray(rgb["mean"], float)
    limit = np.maximum(COLOUR_MIN_LEVELS, COLOUR_K_SLIDE_STD * np.asarray(rgb["between_slide_std"], float))
    diff = mean - ref
    far = np.abs(diff) > limit
    if far.any():
        logger.warning(
            f"predict: the tiles of slide {name!r} have colours unlike the training slides': RGB mean "
            f"({_fmt(mean)}) vs ({_fmt(ref)}) in training, off by ({_fmt(diff, sign=True)}) levels of 255 where "
            f"{_fmt(limit)} is the limit ({', '.join(c for c, f in zip(CHANNELS, far, strict=True) if f)} beyond it). "
            "Another stain, scanner or an inverted / grey / channel-swapped image gives features the model never "
            "saw; the predictions are not to be trusted. Check the image (dbk.pl or a thumbnail), or normalise its "
            "stain to the training slides.")
    return {"rgb_mean": _r(mean), "rgb_std": _r(stats["std"]), "training_rgb_mean": _r(ref),
            "difference": _r(diff), "limit": _r(limit), "ok": bool(not far.any())}


def _fmt(a, sign: bool = False) -> str:
    return ", ".join(f"{v:+.0f}" if sign else f"{v:.0f}" for v in np.asarray(a))
