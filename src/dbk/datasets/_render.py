"""Render one chunk of a synthetic H&E image from the slide model.

The image is made in optical-density space with the two stains of H&E: each pixel has a haematoxylin and an eosin
concentration, and its colour is ``255 * 10 ** -(H * h_vector + E * e_vector + glass)`` (Beer–Lambert), with the
reference stain vectors of Macenko et al. (2009). That gives H&E's palette for free: eosin pink stroma, purple
nuclei, white glass where there is no tissue.

Layers, all functions of global pixel coordinates so chunks join without seams:

- extracellular matrix: eosin whose level and fibre contrast follow the local cell-type mix; collagen fibres are
  streaky noise along three orientations blended by a smooth field, bent by a low-frequency warp;
- cytoplasm (and red blood cells): soft discs composited over the matrix, per-type colour and opacity;
- nuclei: soft ellipses of haematoxylin with type-specific size, elongation, darkness, chromatin texture,
  vesicular rim and nucleoli, splatted in batches with ``np.bincount``.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ._fields import hash_uniform, interp_grid, oriented_noise, value_noise
from ._slide import Cells, SlideModel

# reference H&E stain vectors (optical density per unit stain, RGB), Macenko et al. 2009
_H_VEC = np.array([0.5626, 0.7201, 0.4062])
_E_VEC = np.array([0.2159, 0.8012, 0.5581])
_H_VEC, _E_VEC = _H_VEC / np.linalg.norm(_H_VEC), _E_VEC / np.linalg.norm(_E_VEC)
_GLASS_OD = np.array([0.025, 0.028, 0.022])
_RBC_E = 0.8
_FIBRE_MEAN = 0.40  # mean of the fibre texture, used where fibres are far below a pixel
_NUCLEOLUS_H = 0.9
_COARSE_STEP_UM = 8.0  # the smooth region fields are evaluated on this grid and upsampled
_BATCH_ELEMENTS = 1_500_000  # cells x patch pixels per splatting batch (bounds memory)


def level_shape(model: SlideModel, level: int) -> tuple[int, int]:
    """``(height, width)`` of pyramid level ``level`` (factor ``2 ** level``, trimmed like xarray's coarsen)."""
    f = 2**level
    return model.height // f, model.width // f


def render_chunk(model: SlideModel, chunk: int, by: int, bx: int, level: int = 0) -> np.ndarray:
    """The ``(3, h, w)`` uint8 RGB image of chunk ``(by, bx)`` (``chunk`` px squares) of pyramid level ``level``.

    A level is rendered directly at its resolution (same cells, same fields, sizes divided by ``2 ** level``), so a
    thumbnail of a whole slide costs about one pass over its cells instead of rendering level 0.
    """
    f = 2**level
    height, width = level_shape(model, level)
    y0, y1, x0, x1 = by * chunk, min((by + 1) * chunk, height), bx * chunk, min((bx + 1) * chunk, width)
    h, w = y1 - y0, x1 - x0
    seed = model.fields["seed"]
    ys = (y0 + np.arange(h) + 0.5) * f  # level-0 coordinates of the pixel centres
    xs = (x0 + np.arange(w) + 0.5) * f

    tissue = model.tissue_grid(xs, ys, soft_px=f)
    e_matrix, h_matrix = _matrix(model, ys, xs, f, seed)
    e_matrix *= tissue
    h_matrix *= tissue

    # cells: drawn on a canvas with a margin, so cells of neighbouring blocks reach in
    margin = int(np.ceil(model.max_reach_px / f)) + 2
    cy0, cx0 = y0 - margin, x0 - margin  # canvas origin, in this level's pixels
    shape = (h + 2 * margin, w + 2 * margin)
    cells = _gather_cells(model, ys[0] - f / 2, ys[-1] + f / 2, xs[0] - f / 2, xs[-1] + f / 2, margin * f)
    canvas_ys = (cy0 + np.arange(shape[0]) + 0.5) * f
    canvas_xs = (cx0 + np.arange(shape[1]) + 0.5) * f
    chromatin = _texture(canvas_ys, canvas_xs, 0.9 / model.pixel_size_um, f, seed + 2)
    foam = _texture(canvas_ys, canvas_xs, 1.6 / model.pixel_size_um, f, seed + 3)
    cover, cyto_e, cyto_h = _splat_cytoplasm(model, cells, f, cy0, cx0, shape, foam)
    nuc_h, nuc_alpha = _splat_nuclei(model, cells, f, cy0, cx0, shape, chromatin)
    crop = (slice(margin, margin + h), slice(margin, margin + w))
    cover, cyto_e, cyto_h = cover[crop], cyto_e[crop], cyto_h[crop]
    nuc_h, nuc_alpha = nuc_h[crop], nuc_alpha[crop]

    e = (1 - cover) * e_matrix + cyto_e
    hh = (1 - cover) * h_matrix + cyto_h
    e *= 1 - 0.65 * np.minimum(nuc_alpha, 1.0)
    hh += nuc_h
    # slow variations of staining strength over the slide
    strength = 0.9 + 0.2 * value_noise(ys, xs, 250.0 / model.pixel_size_um, seed + 4)
    e *= strength
    hh *= strength

    # sensor noise, hashed from the pixel's position so that it does not depend on the chunking
    grain = (hash_uniform(np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :], seed + 100 + level) - 0.5) * 6.0
    out = np.empty((3, h, w), dtype=np.uint8)
    for c in range(3):
        od = hh * _H_VEC[c] + e * _E_VEC[c] + _GLASS_OD[c]
        val = 255.0 * np.exp(-np.log(10.0) * od) + grain
        np.clip(np.rint(val), 0, 255, out=val)
        out[c] = val
    return out


def _texture(ys: np.ndarray, xs: np.ndarray, spacing: float, f: int, seed: int) -> np.ndarray | None:
    """Flat value noise with lattice ``spacing`` (level-0 px), or ``None`` where it is finer than a pixel."""
    if spacing < 1.5 * f:
        return None
    return value_noise(ys, xs, spacing, seed).ravel()


def _noise_or_mean(ys: np.ndarray, xs: np.ndarray, spacing: float, f: int, seed: int) -> np.ndarray | float:
    """Value noise on the grid, or its mean (0.5) where its lattice is finer than this level's pixels."""
    return value_noise(ys, xs, spacing, seed) if spacing >= 1.5 * f else np.float32(0.5)


def _matrix(model: SlideModel, ys: np.ndarray, xs: np.ndarray, f: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Eosin and haematoxylin of the extracellular matrix (before the tissue mask)."""
    s0 = model.pixel_size_um
    h, w = ys.size, xs.size
    step = max(2.0, _COARSE_STEP_UM / (s0 * f))  # in pixels of this level
    g = step * f  # the coarse grid sits at multiples of g (level-0 px), whatever the chunk
    cys = (np.floor(ys[0] / g) + np.arange(int(np.ceil(h / step)) + 3)) * g
    cxs = (np.floor(xs[0] / g) + np.arange(int(np.ceil(w / step)) + 3)) * g
    probs = model.type_probabilities(cxs, cys, grid=True)  # (K, ny, nx)
    level = np.tensordot([t.stroma_e for t in model.types], probs, axes=1)
    contrast = np.tensordot([t.fibre for t in model.types], probs, axes=1)
    weights = model.fibre_weights(cxs, cys, grid=True)
    coarse = np.concatenate([level[None], contrast[None], weights]).astype(np.float32)
    level, contrast, *weights = interp_grid(coarse, step, (ys[0] - cys[0]) / f, (xs[0] - cxs[0]) / f, h, w)

    natural = max(1.5 / s0, 1.2)  # fibre width (level-0 px)
    if 1.5 * f > 4 * natural:  # fibres far below a pixel: their mean
        fibres = np.float32(_FIBRE_MEAN)
    else:
        warp = (value_noise(ys, xs, 35.0 / s0, seed + 5) - 0.5) * np.float32(10.0 / s0)
        across = max(natural, 1.5 * f)  # blurred, not aliased, on coarser levels
        fibres = np.zeros((h, w), dtype=np.float32)
        for k, (angle, wk) in enumerate(zip(model.fibre_angles, weights, strict=True)):
            fibres += wk * oriented_noise(ys, xs, angle, 22.0 / s0, across, seed + 10 + k, warp)
        bundles = _noise_or_mean(ys, xs, 10.0 / s0, f, seed + 6)
        fibres = np.clip((fibres - 0.28) / 0.45, 0, 1) ** 1.3 * (0.6 + 0.6 * bundles)
    e = level * ((1 - contrast) * 0.9 + contrast * (0.3 + 1.1 * fibres))
    hm = 0.05 + 0.04 * _noise_or_mean(ys, xs, 4.0 / s0, f, seed + 7)
    return e.astype(np.float32), hm.astype(np.float32)


def _gather_cells(model: SlideModel, gy0: float, gy1: float, gx0: float, gx1: float, rbc_margin: float) -> dict:
    """Cells whose drawing can reach into the level-0 box ``[gy0, gy1) x [gx0, gx1)``, from every block near it."""
    reach = model.max_reach_px
    pad = reach + model.lattice_spacing
    b = model.block
    j0, j1 = max(0, int((gy0 - pad) // b)), min(model.n_blocks_y - 1, int((gy1 + pad) // b))
    i0, i1 = max(0, int((gx0 - pad) // b)), min(model.n_blocks_x - 1, int((gx1 + pad) // b))
    parts: list[Cells] = [model.cells(j, i) for j in range(j0, j1 + 1) for i in range(i0, i1 + 1)]
    keys = [k for k in Cells.__dataclass_fields__ if not k.startswith("rbc_")]
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in keys}
    near = (cat["x"] > gx0 - reach) & (cat["x"] < gx1 + reach) & (cat["y"] > gy0 - reach) & (cat["y"] < gy1 + reach)
    out = {k: v[near] for k, v in cat.items()}
    rbc = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("rbc_x", "rbc_y", "rbc_r")}
    near = (rbc["rbc_x"] > gx0 - rbc_margin) & (rbc["rbc_x"] < gx1 + rbc_margin)
    near &= (rbc["rbc_y"] > gy0 - rbc_margin) & (rbc["rbc_y"] < gy1 + rbc_margin)
    out.update({k: v[near] for k, v in rbc.items()})
    return out


def _batches(extent: np.ndarray):
    """Batches of item indices (sorted by extent) and their patch radius, each under ``_BATCH_ELEMENTS``."""
    order = np.argsort(extent, kind="stable")
    radius = np.ceil(extent[order]).astype(np.int64) + 2
    start = 0
    while start < order.size:
        cost = np.arange(1, order.size - start + 1) * (2 * radius[start:] + 1) ** 2
        stop = start + max(1, int(np.searchsorted(cost, _BATCH_ELEMENTS, side="right")))
        yield order[start:stop], int(radius[stop - 1])
        start = stop


def _patch(cy: np.ndarray, cx: np.ndarray, radius: int, shape: tuple[int, int]):
    """Flat canvas indices and pixel-centre offsets ``(dy, dx)`` of square patches around canvas points."""
    off = np.arange(-radius, radius + 1)
    iy = np.floor(cy).astype(np.intp)[:, None, None] + off[None, :, None]
    ix = np.floor(cx).astype(np.intp)[:, None, None] + off[None, None, :]
    dy = (iy + 0.5 - cy[:, None, None]).astype(np.float32)
    dx = (ix + 0.5 - cx[:, None, None]).astype(np.float32)
    iy = np.clip(iy, 0, shape[0] - 1)
    ix = np.clip(ix, 0, shape[1] - 1)
    return iy * shape[1] + ix, dy, dx


def _coverage(edge_px: np.ndarray, dy: np.ndarray, dx: np.ndarray, area: np.ndarray, soft: float) -> np.ndarray:
    """Coverage in [0, 1] of each patch pixel.

    A soft edge where a shape spans pixels; an area-preserving blob where it is smaller than a couple of pixels
    (coarse pyramid levels), so that it is neither lost nor inflated.
    """
    alpha = np.clip(edge_px / soft + 0.5, 0, 1)
    tiny = area < 2.0
    if tiny.any():
        blob = np.exp(-(dy[tiny] ** 2 + dx[tiny] ** 2) / np.float32(2 * 0.6**2))
        blob *= (area[tiny] / blob.sum(axis=(1, 2)))[:, None, None]
        alpha[tiny] = np.minimum(blob, 1.0)
    return alpha


def _column(index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values[index]`` shaped ``(n, 1, 1)`` to broadcast over patches."""
    return values[index][:, None, None]


def _per_type(model: SlideModel, name: str, types: np.ndarray) -> np.ndarray:
    return np.array([getattr(t, name) for t in model.types], dtype=np.float32)[types]


def _splat_cytoplasm(model: SlideModel, cells: dict, f: int, cy0: int, cx0: int, shape, foam):
    """Coverage, eosin and haematoxylin of cytoplasm and red blood cells (composited over the matrix)."""
    t = cells["type"]
    n_rbc = cells["rbc_x"].size
    cy = np.concatenate([cells["y"], cells["rbc_y"]]) / f - cy0
    cx = np.concatenate([cells["x"], cells["rbc_x"]]) / f - cx0
    r = (np.concatenate([cells["radius"], cells["rbc_r"]]) / f).astype(np.float32)
    stain = np.concatenate([cells["stain"], np.ones(n_rbc)]).astype(np.float32)
    e = np.concatenate([_per_type(model, "cyto_e", t), np.full(n_rbc, _RBC_E, np.float32)]) * stain
    hcy = np.concatenate([_per_type(model, "cyto_h", t), np.zeros(n_rbc, np.float32)]) * stain
    opacity = np.concatenate([_per_type(model, "cyto_opacity", t), np.ones(n_rbc, np.float32)])
    foamy = np.concatenate([_per_type(model, "foamy", t), np.zeros(n_rbc, np.float32)])
    pallor = np.concatenate([np.zeros(len(t), np.float32), np.full(n_rbc, 0.35, np.float32)])
    soft = max(0.8, 1.2 / (model.pixel_size_um * f))
    size = shape[0] * shape[1]
    a_sum = np.zeros(size)
    e_sum = np.zeros(size)
    h_sum = np.zeros(size)
    sel = np.flatnonzero(opacity > 0)
    for batch, rad in _batches(r[sel]):
        i = sel[batch]
        col = partial(_column, i)
        flat, dy, dx = _patch(cy[i], cx[i], rad, shape)
        flat = flat.ravel()
        d = np.sqrt(dy * dy + dx * dx)
        alpha = _coverage(col(r) - d, dy, dx, np.pi * r[i] ** 2, soft) * col(opacity)
        ee = alpha * col(e) * (1 - col(pallor) * np.clip(1 - (d / col(r)) ** 2, 0, 1))
        if foam is not None:
            ee *= 1 + col(foamy) * 2.2 * (foam[flat].reshape(alpha.shape) - 0.5)
        a_sum += np.bincount(flat, alpha.ravel(), size)
        e_sum += np.bincount(flat, ee.ravel(), size)
        h_sum += np.bincount(flat, (alpha * col(hcy)).ravel(), size)
    a_sum = a_sum.reshape(shape)
    norm = np.minimum(a_sum, 1.0) / np.maximum(a_sum, 1e-6)  # overlapping cells average, coverage saturates at 1
    return (
        np.minimum(a_sum, 1.0).astype(np.float32),
        (e_sum.reshape(shape) * norm).astype(np.float32),
        (h_sum.reshape(shape) * norm).astype(np.float32),
    )


def _splat_nuclei(model: SlideModel, cells: dict, f: int, cy0: int, cx0: int, shape, chromatin):
    """Haematoxylin and coverage of the nuclei."""
    t = cells["type"]
    cy = (cells["y"] + cells["nuc_dy"]) / f - cy0
    cx = (cells["x"] + cells["nuc_dx"]) / f - cx0
    a = (cells["nuc_a"] / f).astype(np.float32)
    b = (cells["nuc_b"] / f).astype(np.float32)
    cos, sin = np.cos(cells["nuc_theta"]).astype(np.float32), np.sin(cells["nuc_theta"]).astype(np.float32)
    hn = (cells["nuc_h"] * cells["stain"]).astype(np.float32)
    rim, texture = _per_type(model, "rim", t), _per_type(model, "texture", t)
    has_nl = cells["nucleolus"].astype(np.float32)
    nlx = (cells["nucleolus_dx"] / f).astype(np.float32)
    nly = (cells["nucleolus_dy"] / f).astype(np.float32)
    s = model.pixel_size_um * f
    soft = max(0.7, 0.4 / s)
    nucleolus_sigma = 0.5 / s  # 0.5 µm; below a pixel the nucleolus is part of the nucleus' mean darkness
    size = shape[0] * shape[1]
    h_sum = np.zeros(size)
    a_sum = np.zeros(size)
    for i, rad in _batches(a):
        col = partial(_column, i)
        flat, dy, dx = _patch(cy[i], cx[i], rad, shape)
        flat = flat.ravel()
        p = dx * col(cos) + dy * col(sin)
        q = -dx * col(sin) + dy * col(cos)
        rho = np.sqrt((p / col(a)) ** 2 + (q / col(b)) ** 2)
        alpha = _coverage((1 - rho) * col(b), dy, dx, np.pi * a[i] * b[i], soft)
        interior = (1 - col(rim)) + col(rim) * 1.8 * np.minimum(rho, 1) ** 4
        val = alpha * col(hn) * interior
        if chromatin is not None:
            val *= 1 + col(texture) * 3.0 * (chromatin[flat].reshape(alpha.shape) - 0.5)
        if nucleolus_sigma >= 0.8:
            d2 = (dx - col(nlx)) ** 2 + (dy - col(nly)) ** 2
            val += alpha * col(has_nl) * _NUCLEOLUS_H * np.exp(-d2 / np.float32(2 * nucleolus_sigma**2))
        h_sum += np.bincount(flat, val.ravel(), size)
        a_sum += np.bincount(flat, alpha.ravel(), size)
    return h_sum.reshape(shape).astype(np.float32), a_sum.reshape(shape).astype(np.float32)
