"""The generative model of a synthetic slide, evaluated one spatial block at a time.

The slide is cut into square generation blocks of ``GEN_BLOCK`` pixels. Everything random about a block comes from
generators seeded by ``(random_state, stream, by, bx)``, and the smooth fields (tissue outline, cell type regions,
gene programs, fibre direction) can be evaluated at any point, so:

- the cells of a block are the same whichever image chunk or transcript partition asks for them;
- an image chunk renders the cells of the blocks within reach of it;
- a transcript partition holds the transcripts of the cells centred in its rectangle (plus the background that
  falls in it), gathered from the blocks around it.

The image chunk size and the transcript partitioning are views: they never change the data.

Cells sit on a jittered lattice (one candidate per lattice cell, a little more regular than a Poisson process, as
cells in tissue are); each candidate inside the tissue draws a type from the local type probabilities and is kept
with probability ``density(type) / max density``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from .._constants import CELL_ID_COL, GENE_COL, QV_COL
from ._biology import N_PROGRAMS, CellType, gene_rates, patient_rates, program_loadings
from ._fields import SmoothField, stable_seed

GEN_BLOCK = 512  # generation block (px): the unit of seeding, independent of the chunking of the outputs

# generator streams per block
_CELLS, _COUNTS, _TRANSCRIPTS, _SHIFTED_COUNTS = 1, 2, 3, 4

_TYPE_SHARPNESS = 2.5  # softmax temperature of the cell-type region fields
_PROGRAM_SCALE_UM = 250.0
_FIBRE_SCALE_UM = 150.0
_HOLE_SCALE_UM = 45.0
_HOLE_LEVEL = 2.3  # a hole (fat, lumen) where the hole field exceeds this (a few % of the tissue)
_OUTLINE_SCALE = 0.2  # correlation length of the outline's wobble, as a fraction of the slide
_OUTLINE_AMPLITUDE = 0.35
_INSIDE_FRACTION = 0.9  # share of a cell's transcripts that land inside its circle (assigned to the cell)
_RING = 1.25  # the others land in a ring out to this many cell radii (cell_id -1)
_RBC_RADIUS_UM = 3.6
_CLIP_Z = 3.0  # per-cell lognormal draws are clipped at 3 sd, which bounds the reach of a cell


@dataclass(frozen=True)
class Cells:
    """Cells of one block (pixel units)."""

    id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    type: np.ndarray
    radius: np.ndarray
    nuc_a: np.ndarray  # semi-axes of the nucleus ellipse
    nuc_b: np.ndarray
    nuc_theta: np.ndarray
    nuc_dx: np.ndarray  # nucleus centre offset from the cell centre
    nuc_dy: np.ndarray
    nuc_h: np.ndarray
    nucleolus: np.ndarray  # bool
    nucleolus_dx: np.ndarray  # offset from the nucleus centre
    nucleolus_dy: np.ndarray
    stain: np.ndarray  # per-cell multiplicative stain variation
    size_factor: np.ndarray  # transcript abundance factor (mean 1)
    rbc_x: np.ndarray  # red blood cells drawn with the block's cells
    rbc_y: np.ndarray
    rbc_r: np.ndarray

    def __len__(self) -> int:
        return int(self.x.size)


@dataclass(frozen=True, eq=False)
class SlideModel:
    """All parameters of one synthetic slide, and the per-block generators."""

    height: int
    width: int
    pixel_size_um: float
    random_state: int
    types: tuple[CellType, ...]
    genes: tuple[str, ...]
    control_probes: tuple[str, ...]
    cell_density: float  # cells / mm² of tissue, averaged over types
    transcripts_per_cell: float
    background_fraction: float
    control_probe_fraction: float
    tissue_fraction: float
    patient: str | None = None
    patient_shift: float = 0.0  # 0: every gene follows the shared biology
    shifted_genes: tuple[str, ...] = ()  # genes whose type profile is the patient's (empty unless patient_shift > 0)
    fields: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(stable_seed("slide-fields", self.random_state))
        fields = {
            "outline": SmoothField.random(rng, _OUTLINE_SCALE),
            "holes": SmoothField.random(rng, _HOLE_SCALE_UM),
            "types": [SmoothField.random(rng, t.region_scale_um) for t in self.types],
            "programs": [SmoothField.random(rng, _PROGRAM_SCALE_UM) for _ in range(N_PROGRAMS)],
            "fibre": [SmoothField.random(rng, _FIBRE_SCALE_UM) for _ in range(3)],
            "fibre_angle0": float(rng.uniform(0, np.pi)),
            "seed": int(rng.integers(2**62)),
        }
        object.__setattr__(self, "fields", fields)

    def __dask_tokenize__(self):
        token = (
            "dbk-synthetic-slide", self.height, self.width, self.pixel_size_um, GEN_BLOCK, self.random_state,
            tuple(t.name for t in self.types), self.genes, self.control_probes, self.cell_density,
            self.transcripts_per_cell, self.background_fraction, self.control_probe_fraction, self.tissue_fraction,
        )  # fmt: skip
        if self.patient is not None:
            token += (self.patient, self.patient_shift, self.shifted_genes)
        return token

    # ----- geometry -----
    @property
    def block(self) -> int:
        return GEN_BLOCK

    @property
    def n_blocks_y(self) -> int:
        return -(-self.height // self.block)

    @property
    def n_blocks_x(self) -> int:
        return -(-self.width // self.block)

    def block_bounds(self, by: int, bx: int) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)`` pixel bounds of a block."""
        b = self.block
        return by * b, min((by + 1) * b, self.height), bx * b, min((bx + 1) * b, self.width)

    def block_index(self, by: int, bx: int) -> int:
        return by * self.n_blocks_x + bx

    @cached_property
    def um_per_px(self) -> float:
        return float(self.pixel_size_um)

    @cached_property
    def type_density_mm2(self) -> np.ndarray:
        """Cells / mm² where each type lives."""
        rel = np.array([t.density for t in self.types])
        return self.cell_density * rel / rel.mean()

    @cached_property
    def lattice_spacing(self) -> float:
        """Spacing (px) of the candidate lattice: one candidate per cell at the densest type."""
        per_px2 = self.type_density_mm2.max() * (self.pixel_size_um / 1000.0) ** 2
        return float(1.0 / np.sqrt(per_px2))

    @cached_property
    def cell_id_stride(self) -> int:
        """Cell ids are ``block_index * stride + i`` (unique, and each block names its own cells)."""
        per_block = (self.block / self.lattice_spacing + 2) ** 2
        return int(10 ** np.ceil(np.log10(per_block + 1)))

    @cached_property
    def max_reach_px(self) -> float:
        """Upper bound of how far anything a cell draws reaches from its centre."""
        reach_um = 0.0
        for t in self.types:
            r = t.cell_radius * np.exp(_CLIP_Z * t.cell_radius_cv)
            extra = 1.8 * r + _RBC_RADIUS_UM * 1.2 if t.rbc_per_cell > 0 else 0.0
            nuc = t.eccentric * r + t.nucleus_radius * np.exp(_CLIP_Z * t.nucleus_cv) * np.sqrt(t.elongation * 1.5)
            reach_um = max(reach_um, r * _RING, extra, nuc)
        return reach_um / self.pixel_size_um + 2.0

    # ----- smooth fields -----
    def _outline_value(self, x: np.ndarray, y: np.ndarray, grid: bool) -> np.ndarray:
        """Larger inside the tissue: a radial falloff to the slide's edges plus a low-frequency wobble."""
        f = self.fields["outline"]
        if grid:
            u, v = x / self.width, y / self.height
            wobble = f.grid(u, v)
            r2 = (2 * v[:, None] - 1) ** 2 + (2 * u[None, :] - 1) ** 2
        else:
            u, v = x / self.width, y / self.height
            wobble = f.at(u, v)
            r2 = (2 * v - 1) ** 2 + (2 * u - 1) ** 2
        return (1.0 - r2 + _OUTLINE_AMPLITUDE * wobble).astype(np.float32)

    def _hole_value(self, x: np.ndarray, y: np.ndarray, grid: bool) -> np.ndarray:
        f = self.fields["holes"]
        s = self.pixel_size_um
        return f.grid(x * s, y * s) if grid else f.at(x * s, y * s)

    @cached_property
    def outline_threshold(self) -> float:
        """Outline level chosen so that about ``tissue_fraction`` of the slide is tissue (on a 256 x 256 grid)."""
        if self.tissue_fraction >= 1.0:
            return -np.inf
        ys = (np.arange(256) + 0.5) * self.height / 256
        xs = (np.arange(256) + 0.5) * self.width / 256
        g = self._outline_value(xs, ys, grid=True)
        g = np.where(self._hole_value(xs, ys, grid=True) > _HOLE_LEVEL, -np.inf, g)
        return float(np.quantile(g, 1.0 - self.tissue_fraction))

    def tissue_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether each point is inside the tissue (boolean array)."""
        if self.tissue_fraction >= 1.0:
            return np.ones(np.shape(x), dtype=bool)
        inside = self._outline_value(x, y, grid=False) > self.outline_threshold
        return inside & (self._hole_value(x, y, grid=False) <= _HOLE_LEVEL)

    def tissue_grid(self, xs: np.ndarray, ys: np.ndarray, soft_px: float = 1.0) -> np.ndarray:
        """Soft tissue mask in [0, 1] on the grid ``ys x xs`` (pixel centres), ~``soft_px`` wide edges."""
        if self.tissue_fraction >= 1.0:
            return np.ones((len(ys), len(xs)), dtype=np.float32)
        g = self._outline_value(xs, ys, grid=True) - np.float32(self.outline_threshold)
        edge_g = 4.0 / max(self.height, self.width) * soft_px  # the outline changes ~4 per slide width
        m = np.clip(g / edge_g + 0.5, 0, 1)
        h = np.float32(_HOLE_LEVEL) - self._hole_value(xs, ys, grid=True)
        edge_h = self.pixel_size_um / _HOLE_SCALE_UM * soft_px * 1.5
        return m * np.clip(h / edge_h + 0.5, 0, 1)

    def type_probabilities(self, x: np.ndarray, y: np.ndarray, grid: bool = False) -> np.ndarray:
        """Probability of each type at points (``(n, K)``) or on a grid (``(K, ny, nx)``)."""
        s = self.pixel_size_um
        logits = []
        for f, t in zip(self.fields["types"], self.types, strict=True):
            v = f.grid(x * s, y * s) if grid else f.at(x * s, y * s)
            logits.append(_TYPE_SHARPNESS * v + t.bias)
        logits = np.stack(logits, axis=0)
        logits -= logits.max(axis=0, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=0, keepdims=True)
        return p.astype(np.float32) if grid else p.T

    def fibre_weights(self, x: np.ndarray, y: np.ndarray, grid: bool = False) -> np.ndarray:
        """Weights of the three fibre orientations (``(3, ...)``), smooth over the slide."""
        s = self.pixel_size_um
        z = np.stack([f.grid(x * s, y * s) if grid else f.at(x * s, y * s) for f in self.fields["fibre"]])
        z = 3.0 * (z - z.max(axis=0, keepdims=True))
        w = np.exp(z)
        return w / w.sum(axis=0, keepdims=True)

    @cached_property
    def fibre_angles(self) -> np.ndarray:
        return self.fields["fibre_angle0"] + np.arange(3) * np.pi / 3

    def fibre_direction(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Local fibre angle (radians) at points: the weighted circular mean of the three orientations."""
        w = self.fibre_weights(x, y)
        a = 2 * self.fibre_angles[:, None]
        return 0.5 * np.arctan2((w * np.sin(a)).sum(0), (w * np.cos(a)).sum(0))

    def programs(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Gene program activities at points, ``(n, N_PROGRAMS)``, each ~N(0, 1) over the slide."""
        s = self.pixel_size_um
        return np.stack([f.at(x * s, y * s) for f in self.fields["programs"]], axis=1)

    # ----- expression model -----
    @cached_property
    def rates(self) -> np.ndarray:
        """Relative gene rates per type ``(K, G)``, a function of gene and type names only."""
        return gene_rates(list(self.genes), list(self.types))

    @cached_property
    def loadings(self) -> np.ndarray:
        return program_loadings(list(self.genes))

    @cached_property
    def scale(self) -> float:
        """Counts per unit rate, so that a cell has ``transcripts_per_cell`` on average over types."""
        return float(self.transcripts_per_cell / self.rates.sum(axis=1).mean())

    @cached_property
    def base_expression(self) -> np.ndarray:
        """Expected counts per cell of each gene in each type (program-neutral) without the patient, ``(K, G)``."""
        return self.scale * self.rates

    @cached_property
    def shifted_index(self) -> np.ndarray:
        """Panel positions of the genes whose type profile is the patient's."""
        return np.array([self.genes.index(g) for g in self.shifted_genes], dtype=np.intp)

    @cached_property
    def expression(self) -> np.ndarray:
        """Expected counts per cell of each gene in each type (program-neutral), the patient's, ``(K, G)``.

        The same as :attr:`base_expression` but in the columns of the shifted genes (see
        :func:`~dbk.datasets._biology.patient_rates`); ``scale`` comes from the shared rates, which the shift leaves
        unchanged on average.
        """
        if not self.shifted_index.size:
            return self.base_expression
        rates = patient_rates(
            self.rates, list(self.genes), list(self.types), self.patient, self.patient_shift, list(self.shifted_genes)
        )
        return self.scale * rates

    @cached_property
    def background_per_px2(self) -> float:
        per_px2 = self.cell_density * (self.pixel_size_um / 1000.0) ** 2
        return self.background_fraction * per_px2 * self.transcripts_per_cell

    # ----- per-block generation -----
    def cells(self, by: int, bx: int) -> Cells:
        """The cells whose lattice candidate lies in block ``(by, bx)``."""
        rng = np.random.default_rng([self.random_state, _CELLS, by, bx])
        y0, y1, x0, x1 = self.block_bounds(by, bx)
        d = self.lattice_spacing
        iy = np.arange(int(np.ceil(y0 / d)), int(np.ceil(y1 / d)))
        ix = np.arange(int(np.ceil(x0 / d)), int(np.ceil(x1 / d)))
        gy, gx = np.meshgrid(iy, ix, indexing="ij")
        n = gy.size
        jitter = rng.random((2, n))
        y = (gy.ravel() + jitter[0]) * d
        x = (gx.ravel() + jitter[1]) * d
        u_type, u_keep = rng.random((2, n))
        local = np.arange(n)
        ok = (y < self.height) & (x < self.width)
        ok[ok] = self.tissue_at(x[ok], y[ok])
        types = np.zeros(n, dtype=np.int64)
        if ok.any():
            cum = np.cumsum(self.type_probabilities(x[ok], y[ok]), axis=1)
            types[ok] = np.minimum((u_type[ok, None] > cum).sum(axis=1), len(self.types) - 1)
        keep_p = self.type_density_mm2 / self.type_density_mm2.max()
        ok &= u_keep < keep_p[types]
        x, y, types, local = x[ok], y[ok], types[ok], local[ok]
        return self._cell_details(rng, by, bx, x, y, types, local)

    def _cell_details(self, rng, by, bx, x, y, types, local) -> Cells:
        m = x.size
        s = self.pixel_size_um
        tp = {name: np.array([getattr(t, name) for t in self.types], dtype=float)[types] for name in (
            "cell_radius", "cell_radius_cv", "nucleus_radius", "nucleus_cv", "elongation", "nucleus_h",
            "nucleus_h_cv", "nucleolus_prob", "eccentric", "rbc_per_cell",
        )}  # fmt: skip
        aligned = np.array([t.aligned for t in self.types], dtype=bool)[types]
        z = np.clip(rng.standard_normal((6, m)), -_CLIP_Z, _CLIP_Z)
        u = rng.random((6, m))
        radius_um = tp["cell_radius"] * np.exp(tp["cell_radius_cv"] * z[0])
        nuc_r = tp["nucleus_radius"] * np.exp(tp["nucleus_cv"] * z[1])
        elong = np.maximum(1.0, tp["elongation"] * np.exp(0.1 * z[2]))
        nuc_a = np.minimum(nuc_r * np.sqrt(elong), 0.95 * radius_um * np.sqrt(1.5))
        nuc_b = nuc_r / np.sqrt(elong)
        theta = u[0] * np.pi
        if aligned.any():
            theta[aligned] = self.fibre_direction(x[aligned], y[aligned]) + 0.2 * z[3, aligned]
        off = tp["eccentric"] * radius_um * np.sqrt(u[1])
        off_angle = u[2] * 2 * np.pi
        nuc_h = tp["nucleus_h"] * np.exp(tp["nucleus_h_cv"] * z[4])
        nucleolus = u[3] < tp["nucleolus_prob"]
        nl_r = 0.35 * np.sqrt(u[4]) * nuc_b
        nl_angle = u[5] * 2 * np.pi
        stain = np.exp(0.12 * z[5])
        z_sf = np.clip(rng.standard_normal(m), -_CLIP_Z, _CLIP_Z)
        cv = tp["cell_radius_cv"]
        size_factor = np.exp(2 * cv * z[0] - 2 * cv**2) * np.exp(0.25 * z_sf - 0.25**2 / 2)
        # red blood cells next to vessel cells
        n_rbc = rng.poisson(tp["rbc_per_cell"])
        owner = np.repeat(np.arange(m), n_rbc)
        k = owner.size
        ang = rng.uniform(0, 2 * np.pi, k)
        dist = radius_um[owner] * rng.uniform(0.9, 1.8, k)
        rbc_r = _RBC_RADIUS_UM * rng.uniform(0.9, 1.1, k) / s
        return Cells(
            id=self.block_index(by, bx) * self.cell_id_stride + local.astype(np.int64),
            x=x,
            y=y,
            type=types,
            radius=radius_um / s,
            nuc_a=nuc_a / s,
            nuc_b=nuc_b / s,
            nuc_theta=theta,
            nuc_dx=off * np.cos(off_angle) / s,
            nuc_dy=off * np.sin(off_angle) / s,
            nuc_h=nuc_h,
            nucleolus=nucleolus,
            nucleolus_dx=nl_r * np.cos(nl_angle) / s,
            nucleolus_dy=nl_r * np.sin(nl_angle) / s,
            stain=stain,
            size_factor=size_factor,
            rbc_x=x[owner] + dist * np.cos(ang) / s,
            rbc_y=y[owner] + dist * np.sin(ang) / s,
            rbc_r=rbc_r,
        )

    def counts(self, by: int, bx: int, cells: Cells) -> tuple[np.ndarray, np.ndarray]:
        """Counts per cell and gene: ``(inside, outside)`` the cell's circle, each ``(n_cells, n_genes)`` int."""
        rng = np.random.default_rng([self.random_state, _COUNTS, by, bx])
        if len(cells) == 0:
            empty = np.zeros((0, len(self.genes)), dtype=np.int64)
            return empty, empty
        mod = self.programs(cells.x, cells.y) @ self.loadings.T - 0.5 * (self.loadings**2).sum(axis=1)
        mean = self.base_expression[cells.type] * cells.size_factor[:, None] * np.exp(mod)
        total = rng.poisson(mean)
        inside = rng.binomial(total, _INSIDE_FRACTION)
        cols = self.shifted_index
        if cols.size:
            # the shifted genes are drawn again from a stream of their own, so that every other gene's counts are
            # those of the same slide without a patient
            srng = np.random.default_rng([self.random_state, _SHIFTED_COUNTS, by, bx])
            shifted_mean = self.expression[cells.type][:, cols] * cells.size_factor[:, None] * np.exp(mod[:, cols])
            shifted_total = srng.poisson(shifted_mean)
            total[:, cols] = shifted_total
            inside[:, cols] = srng.binomial(shifted_total, _INSIDE_FRACTION)
        return inside, total - inside

    def block_transcripts(self, by: int, bx: int) -> tuple[np.ndarray, ...]:
        """Transcripts of the cells of block ``(by, bx)``, its background and control probes.

        Returns ``(x, y, codes, qv, cell_id, owner_x, owner_y)``: the owner is the position that decides the
        partition (the cell's centre for the transcripts of a cell, the transcript itself for the background).
        """
        cells = self.cells(by, bx)
        inside, outside = self.counts(by, bx, cells)
        rng = np.random.default_rng([self.random_state, _TRANSCRIPTS, by, bx])
        n_genes = len(self.genes)
        y0, y1, x0, x1 = self.block_bounds(by, bx)

        # cell transcripts: uniform in the cell's disc (assigned) or in a thin ring around it (unassigned)
        m = len(cells)
        both = np.stack([inside, outside], axis=-1).reshape(-1)  # (cell, gene, in/out)
        slot = np.repeat(np.arange(both.size), both)
        cell = slot // (2 * n_genes)
        gene = (slot // 2) % n_genes
        is_out = (slot % 2).astype(bool)
        r = cells.radius[cell]
        frac = rng.random(slot.size)
        rad = np.where(is_out, r * np.sqrt(1 + frac * (_RING**2 - 1)), r * np.sqrt(frac) * 0.999)
        ang = rng.uniform(0, 2 * np.pi, slot.size)
        tx = cells.x[cell] + rad * np.cos(ang)
        ty = cells.y[cell] + rad * np.sin(ang)
        cell_id = np.where(is_out, -1, cells.id[cell])

        # ambient background: uniform over the block's tissue, genes in the slide's mean proportions
        n_bg = rng.poisson(self.background_per_px2 * (y1 - y0) * (x1 - x0))
        by_ = rng.uniform(y0, y1, n_bg)
        bx_ = rng.uniform(x0, x1, n_bg)
        mean_expr = self.expression.mean(axis=0)
        bg_gene = rng.choice(n_genes, size=n_bg, p=mean_expr / mean_expr.sum())
        keep = self.tissue_at(bx_, by_) if n_bg else np.zeros(0, bool)
        by_, bx_, bg_gene = by_[keep], bx_[keep], bg_gene[keep]

        # control probes: a fixed share of all transcripts, near the block's cells
        n_real = slot.size + by_.size
        f = self.control_probe_fraction
        n_ctrl = rng.poisson(f / (1 - f) * n_real) if (m and f > 0 and self.control_probes) else 0
        host = rng.integers(0, max(m, 1), n_ctrl)
        c_rad = cells.radius[host] * 1.5 * np.sqrt(rng.random(n_ctrl))
        c_ang = rng.uniform(0, 2 * np.pi, n_ctrl)
        cx_ = cells.x[host] + c_rad * np.cos(c_ang)
        cy_ = cells.y[host] + c_rad * np.sin(c_ang)
        c_id = np.where(c_rad <= cells.radius[host], cells.id[host], -1)
        c_code = n_genes + rng.integers(0, max(len(self.control_probes), 1), n_ctrl)

        n_gene_tx = slot.size + by_.size
        qv = np.empty(n_gene_tx + n_ctrl, dtype=np.float32)
        qv[:n_gene_tx] = 40.0 - rng.gamma(2.0, 4.5, n_gene_tx)
        qv[n_gene_tx:] = 40.0 - rng.gamma(2.0, 10.0, n_ctrl)
        np.clip(qv, 0.0, 40.0, out=qv)

        eps = 1e-3
        x = np.clip(np.concatenate([tx, bx_, cx_]), 0, self.width - eps).astype(np.float32)
        y = np.clip(np.concatenate([ty, by_, cy_]), 0, self.height - eps).astype(np.float32)
        codes = np.concatenate([gene, bg_gene, c_code]).astype(np.int32)
        ids = np.concatenate([cell_id, np.full(by_.size, -1), c_id]).astype(np.int64)
        owner_x = np.concatenate([cells.x[cell], bx_, cells.x[host]])
        owner_y = np.concatenate([cells.y[cell], by_, cells.y[host]])
        return x, y, codes, qv, ids, owner_x, owner_y

    def transcripts(self, y0: int, y1: int, x0: int, x1: int, partition: int = 0) -> pd.DataFrame:
        """The transcripts partition of the rectangle ``[y0, y1) x [x0, x1)`` (pixels).

        It holds the transcripts of the cells centred in the rectangle (wherever each transcript landed) and the
        background and control probes that belong to it; the index starts at ``partition * 2**32``.
        """
        b, slack = self.block, self.lattice_spacing  # a block's cells spill past its end by < one lattice step
        parts = []
        for j in range(max(0, int((y0 - slack) // b)), min(self.n_blocks_y, -(-y1 // b))):
            for i in range(max(0, int((x0 - slack) // b)), min(self.n_blocks_x, -(-x1 // b))):
                *cols, ox, oy = self.block_transcripts(j, i)
                mine = (oy >= y0) & (oy < y1) & (ox >= x0) & (ox < x1)
                parts.append([c[mine] for c in cols])
        cols = [np.concatenate(c) for c in zip(*parts, strict=True)] if parts else [np.zeros(0)] * 5
        return self.frame(*cols, partition)

    @cached_property
    def categories(self) -> list[str]:
        return [*self.genes, *self.control_probes]

    def frame(self, x, y, codes, qv, ids, partition: int) -> pd.DataFrame:
        """A transcripts DataFrame (one partition); its index starts at ``partition * 2**32``."""
        index = pd.RangeIndex(partition << 32, (partition << 32) + len(x))
        return pd.DataFrame(
            {
                "x": np.asarray(x, dtype=np.float32),
                "y": np.asarray(y, dtype=np.float32),
                GENE_COL: pd.Categorical.from_codes(np.asarray(codes, dtype=np.int32), categories=self.categories),
                QV_COL: np.asarray(qv, dtype=np.float32),
                CELL_ID_COL: np.asarray(ids, dtype=np.int64),
            },
            index=index,
        )

    # ----- slide-level summaries -----
    @cached_property
    def expected_counts(self) -> tuple[float, float]:
        """Expected number of cells and of transcripts on the slide, from a 256 x 256 grid of the fields."""
        ny = nx = 256
        ys = (np.arange(ny) + 0.5) * self.height / ny
        xs = (np.arange(nx) + 0.5) * self.width / nx
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        tissue = self.tissue_at(xx.ravel(), yy.ravel())
        p = self.type_probabilities(xx.ravel()[tissue], yy.ravel()[tissue])
        dens_px = self.type_density_mm2 * (self.pixel_size_um / 1000.0) ** 2
        px_per_sample = self.height * self.width / (ny * nx)
        per_type_cells = (p * dens_px).sum(axis=0) * px_per_sample  # cells of each type
        n_cells = float(per_type_cells.sum())
        tissue_px = tissue.sum() * px_per_sample
        n_tx = float(per_type_cells @ self.expression.sum(axis=1)) + self.background_per_px2 * tissue_px
        n_tx /= 1 - self.control_probe_fraction
        return n_cells, n_tx
