"""The fixed biology of synthetic slides: cell types (morphology) and genes (expression), independent of any seed.

A gene's expression is a function of its *name* (and the cell type's name), never of its position in a panel or of
the slide's ``random_state``: the same gene behaves the same on every synthetic slide, whatever the panel, so a
model trained on several slides has one gene–morphology link to learn. Slides made for a patient
(``synthetic(patient=..., patient_shift=...)``) are the exception: there some genes follow a patient-specific link
(:func:`patient_rates`), a function of the gene, type and patient names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from ._fields import stable_seed

N_PROGRAMS = 3  # smooth spatial programs that scale some genes up or down


@dataclass(frozen=True)
class CellType:
    """Morphology of one cell type. Lengths in µm; stain amounts are optical-density concentrations."""

    name: str
    density: float  # relative cell density (cells per area), normalised over the slide's types
    bias: float  # prevalence: offset added to the type's region field before the softmax
    region_scale_um: float  # correlation length of the type's region field
    cell_radius: float
    cell_radius_cv: float
    nucleus_radius: float  # radius of the circle of the same area as the nucleus ellipse
    nucleus_cv: float
    elongation: float  # nucleus major / minor axis
    aligned: bool  # nucleus long axis follows the local fibre direction (spindle cells)
    nucleus_h: float  # haematoxylin in the nucleus
    nucleus_h_cv: float
    rim: float  # 0 solid nucleus, 1 pale centre with dark membrane (vesicular)
    nucleolus_prob: float
    texture: float  # chromatin granularity
    cyto_e: float  # eosin in the cytoplasm
    cyto_h: float  # haematoxylin in the cytoplasm (purple tint)
    cyto_opacity: float  # how much the cytoplasm hides the extracellular matrix (0: spindle cells lie in the fibres)
    foamy: float  # cytoplasm texture (macrophage foam)
    eccentric: float  # nucleus offset from the cell centre, as a fraction of the cell radius
    rbc_per_cell: float  # red blood cells drawn next to the cell (vessels)
    stroma_e: float  # eosin of the extracellular matrix where this type dominates
    fibre: float  # contrast of collagen fibres where this type dominates


# fmt: off
BASE_CELL_TYPES: tuple[CellType, ...] = (
    # large pleomorphic vesicular nuclei with nucleoli, purple-pink cytoplasm, dense sheets, little stroma
    CellType(
        name="tumor", density=1.5, bias=0.5, region_scale_um=160.0, cell_radius=8.5, cell_radius_cv=0.15,
        nucleus_radius=4.1, nucleus_cv=0.2, elongation=1.35, aligned=False, nucleus_h=0.75, nucleus_h_cv=0.25,
        rim=0.5, nucleolus_prob=0.6, texture=0.45, cyto_e=0.30, cyto_h=0.12, cyto_opacity=1.0, foamy=0.0,
        eccentric=0.1, rbc_per_cell=0.0, stroma_e=0.10, fibre=0.15,
    ),
    # lymphocytes: small, round, very dark nuclei, scant cytoplasm, packed in aggregates
    CellType(
        name="immune", density=1.9, bias=-0.1, region_scale_um=70.0, cell_radius=4.2, cell_radius_cv=0.08,
        nucleus_radius=3.1, nucleus_cv=0.08, elongation=1.08, aligned=False, nucleus_h=1.3, nucleus_h_cv=0.10,
        rim=0.0, nucleolus_prob=0.0, texture=0.15, cyto_e=0.05, cyto_h=0.04, cyto_opacity=0.7, foamy=0.0,
        eccentric=0.0, rbc_per_cell=0.0, stroma_e=0.16, fibre=0.3,
    ),
    # spindle nuclei along the collagen fibres, sparse, in pink fibrous stroma
    CellType(
        name="fibroblast", density=0.45, bias=0.4, region_scale_um=160.0, cell_radius=6.0, cell_radius_cv=0.15,
        nucleus_radius=2.7, nucleus_cv=0.12, elongation=3.6, aligned=True, nucleus_h=1.05, nucleus_h_cv=0.15,
        rim=0.05, nucleolus_prob=0.0, texture=0.2, cyto_e=0.03, cyto_h=0.02, cyto_opacity=0.0, foamy=0.0,
        eccentric=0.0, rbc_per_cell=0.0, stroma_e=0.40, fibre=1.0,
    ),
    # flat elongated nuclei lining pale vessel lumens, with red blood cells beside them
    CellType(
        name="endothelial", density=0.55, bias=-0.6, region_scale_um=60.0, cell_radius=6.5, cell_radius_cv=0.12,
        nucleus_radius=2.5, nucleus_cv=0.10, elongation=2.6, aligned=True, nucleus_h=0.85, nucleus_h_cv=0.15,
        rim=0.05, nucleolus_prob=0.0, texture=0.2, cyto_e=0.06, cyto_h=0.02, cyto_opacity=0.8, foamy=0.0,
        eccentric=0.0, rbc_per_cell=2.0, stroma_e=0.30, fibre=0.5,
    ),
    # big cells with pale foamy cytoplasm and an eccentric oval nucleus
    CellType(
        name="macrophage", density=0.75, bias=-0.4, region_scale_um=80.0, cell_radius=9.0, cell_radius_cv=0.15,
        nucleus_radius=3.6, nucleus_cv=0.12, elongation=1.5, aligned=False, nucleus_h=0.85, nucleus_h_cv=0.15,
        rim=0.15, nucleolus_prob=0.1, texture=0.3, cyto_e=0.20, cyto_h=0.07, cyto_opacity=1.0, foamy=0.6,
        eccentric=0.35, rbc_per_cell=0.0, stroma_e=0.25, fibre=0.4,
    ),
)
# fmt: on


def cell_types(n: int) -> list[CellType]:
    """The first ``n`` cell types: the five base types, then ``type_5``, ``type_6``, ... (variants of the base ones)."""
    if n < 1:
        raise ValueError(f"n_cell_types must be at least 1, got {n}.")
    out = list(BASE_CELL_TYPES[:n])
    for k in range(len(BASE_CELL_TYPES), n):
        rng = np.random.default_rng(stable_seed("cell_type", k))
        base = BASE_CELL_TYPES[k % len(BASE_CELL_TYPES)]
        names = ("cell_radius", "nucleus_radius", "elongation", "nucleus_h", "cyto_e", "stroma_e")
        jittered = {n: float(getattr(base, n) * rng.uniform(0.7, 1.3)) for n in names}
        jittered["elongation"] = max(1.0, jittered["elongation"])
        out.append(replace(base, name=f"type_{k}", bias=0.0, **jittered))
    return out


def morphology_table(types: list[CellType]) -> dict[str, dict]:
    """Plain-dict morphology per type (for ``uns`` / ``attrs``)."""
    plain = lambda v: float(v) if isinstance(v, float | int) and not isinstance(v, bool) else v  # noqa: E731
    return {t.name: {k: plain(v) for k, v in asdict(t).items() if k != "name"} for t in types}


# Marker genes: name -> {cell type: log2 fold over the gene's baseline}. The first 40 of the gene universe.
MARKERS: dict[str, dict[str, float]] = {
    "ERBB2": {"tumor": 4.5},
    "KRT5": {"tumor": 2.5},
    "ESR1": {"tumor": 4.0},
    "PGR": {"tumor": 3.5},
    "EPCAM": {"tumor": 4.5},
    "PTPRC": {"immune": 4.5, "macrophage": 3.0},
    "CD3E": {"immune": 5.0},
    "CD68": {"macrophage": 5.0},
    "COL1A1": {"fibroblast": 5.0, "endothelial": 1.0},
    "ACTA2": {"fibroblast": 3.5, "endothelial": 3.0},
    "PECAM1": {"endothelial": 5.0, "immune": 1.0},
    "VIM": {"fibroblast": 3.5, "endothelial": 3.0, "macrophage": 3.0, "immune": 2.0},
    "KRT8": {"tumor": 4.5},
    "KRT18": {"tumor": 4.5},
    "MKI67": {"tumor": 3.0, "immune": 1.5},
    "KRT19": {"tumor": 4.0},
    "KRT7": {"tumor": 3.5},
    "CDH1": {"tumor": 4.0},
    "FOXA1": {"tumor": 3.5},
    "GATA3": {"tumor": 3.5, "immune": 1.5},
    "TOP2A": {"tumor": 3.0, "immune": 1.0},
    "CD8A": {"immune": 4.5},
    "CD4": {"immune": 3.5, "macrophage": 2.5},
    "MS4A1": {"immune": 4.0},
    "CD79A": {"immune": 4.0},
    "GZMB": {"immune": 3.5},
    "LYZ": {"macrophage": 5.0},
    "CD163": {"macrophage": 4.5},
    "CSF1R": {"macrophage": 4.0},
    "C1QA": {"macrophage": 4.5},
    "COL1A2": {"fibroblast": 5.0},
    "COL3A1": {"fibroblast": 4.5, "endothelial": 1.0},
    "DCN": {"fibroblast": 4.5},
    "LUM": {"fibroblast": 4.5},
    "POSTN": {"fibroblast": 4.0},
    "PDGFRB": {"fibroblast": 3.5, "endothelial": 2.0},
    "VWF": {"endothelial": 5.0},
    "CDH5": {"endothelial": 4.5},
    "KDR": {"endothelial": 4.0},
    "CLDN5": {"endothelial": 4.0},
}
MARKER_GENES: tuple[str, ...] = tuple(MARKERS)


def gene_universe(n: int) -> list[str]:
    """The first ``n`` genes of the synthetic universe: 40 real marker symbols, then ``SYN0001``, ``SYN0002``, ..."""
    if n < 1:
        raise ValueError(f"n_genes must be at least 1, got {n}.")
    return list(MARKER_GENES[:n]) + [f"SYN{i:04d}" for i in range(1, n - len(MARKER_GENES) + 1)]


def gene_rates(genes: list[str], types: list[CellType]) -> np.ndarray:
    """Relative expression rate of each gene in each type, ``(n_types, n_genes)``; a function of names only."""
    out = np.empty((len(types), len(genes)))
    for j, gene in enumerate(genes):
        rng = np.random.default_rng(stable_seed("gene", gene))
        base = float(np.exp(rng.normal(0.0, 0.6)))
        markers = MARKERS.get(gene)
        for k, t in enumerate(types):
            trng = np.random.default_rng(stable_seed("gene", gene, "type", t.name))
            if markers is not None and t.name in {b.name for b in BASE_CELL_TYPES}:
                log2fc = markers.get(t.name, 0.0) + trng.normal(0.0, 0.2)
                out[k, j] = 0.15 * base * 2.0**log2fc
            else:
                out[k, j] = base * float(np.exp(trng.normal(0.0, 1.1)))
    return out


def program_loadings(genes: list[str]) -> np.ndarray:
    """``(n_genes, N_PROGRAMS)`` loadings of genes on the smooth spatial programs; ~1/3 of genes respond to one."""
    out = np.zeros((len(genes), N_PROGRAMS))
    for j, gene in enumerate(genes):
        rng = np.random.default_rng(stable_seed("program", gene))
        if rng.uniform() < 0.35:
            out[j, rng.integers(N_PROGRAMS)] = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.6)
    return out


PATIENT_PROFILE_MIN_SD = 1.0  # least spread (natural log) of a patient's random type profile of a shifted gene


def shifted_gene_names(genes: list[str], fraction: float) -> list[str]:
    """The genes of ``genes`` (in their order) whose name-seeded uniform number is below ``fraction``.

    A gene is in or out by its name alone, so the same genes are shifted on every slide, panel and patient, and a
    larger ``fraction`` adds genes without removing any.
    """
    return [g for g in genes if np.random.default_rng(stable_seed("patient-shift", g)).uniform() < fraction]


def patient_rates(
    rates: np.ndarray, genes: list[str], types: list[CellType], patient: str, shift: float, shifted: list[str]
) -> np.ndarray:
    """``rates`` (``(n_types, n_genes)``) with the columns of the ``shifted`` genes changed for ``patient``.

    For a shifted gene with log-rates ``l_k`` over the types ``k``, the patient's profile is the geometric
    interpolation ``(1 - shift) * l_k + shift * (mean(l) + sd * z_k)`` towards a random profile, ``z_k ~ N(0, 1)``
    seeded by the patient, gene and type names and ``sd = max(std(l), 1)``; the result is rescaled so that the gene's
    mean rate over the types is unchanged. So the gene keeps its level but, at ``shift=1``, which cell types express
    it is drawn anew for every patient. With a single cell type nothing changes. The other columns are returned
    unchanged (the same floats).
    """
    out = rates.copy()
    index = {g: j for j, g in enumerate(genes)}
    for gene in shifted:
        j = index[gene]
        log_rate = np.log(rates[:, j])
        z = np.array([
            np.random.default_rng(stable_seed("patient", patient, "gene", gene, "type", t.name)).standard_normal()
            for t in types
        ])
        target = log_rate.mean() + max(float(log_rate.std()), PATIENT_PROFILE_MIN_SD) * z
        new = np.exp((1.0 - shift) * log_rate + shift * target)
        out[:, j] = new * rates[:, j].mean() / new.mean()
    return out


CONTROL_PREFIXES_SYNTHETIC = ("NegControlProbe_", "BLANK_", "UnassignedCodeword_")


def control_probe_names(n: int) -> list[str]:
    """``n`` control probe names, cycling over ``NegControlProbe_``, ``BLANK_`` and ``UnassignedCodeword_``."""
    counts = dict.fromkeys(CONTROL_PREFIXES_SYNTHETIC, 0)
    names = []
    for i in range(n):
        prefix = CONTROL_PREFIXES_SYNTHETIC[i % len(CONTROL_PREFIXES_SYNTHETIC)]
        counts[prefix] += 1
        width = 5 if prefix == "NegControlProbe_" else 4  # Xenium's numbering: NegControlProbe_00042, BLANK_0006
        names.append(f"{prefix}{counts[prefix]:0{width}d}")
    return names
