"""Inner cross-validation of the stage-2 head on the training slides: the per-gene trust score and ``fusion="auto"``.

:func:`fit_diffbulk` runs it between the training table and the head fit. Each candidate head (fusion, spatial
context radius, head options) is fitted on all but one group of training slides and predicts the held-out group; the
Pearson r of each gene over the held-out tiles, averaged over the groups, is the gene's *CV score*. The test slides of a
benchmark are never involved: only the slides given to the fit are. With ``fusion="auto"`` the candidate with the
highest mean CV score is the one fitted on all training slides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import SAMPLE_COL, SPATIAL_KEY
from .._logging import logger

AUTO = "auto"
#: Neural fusions ``fusion="auto"`` tries beside the ridge head (the strongest neural head on her2st).
AUTO_NEURAL = ("gated",)
#: Context radii ``fusion="auto"`` tries, in multiples of the median distance between neighbouring tile centres:
#: 1.5 takes the 8 nearest tiles of a square grid (and the 6 of a hexagonal one), 2.5 the next ring.
AUTO_CONTEXT_STEPS = (1.5, 2.5)


@dataclass(frozen=True)
class HeadCandidate:
    """One head setting the inner cross-validation scores."""

    fusion: str
    context_um: float | None = None
    options: tuple = ()  # sorted (name, value) pairs of head options

    @property
    def name(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options)
        ctx = "" if self.context_um is None else f", context {self.context_um:g} µm"
        return f"{self.fusion}{f' ({opts})' if opts else ''}{ctx}"

    @property
    def head_kwargs(self) -> dict:
        return dict(self.options)


@dataclass
class HeadSelection:
    """What :func:`cross_validate_heads` found: each candidate's CV scores and the chosen one."""

    candidates: list[HeadCandidate]
    scores: pd.DataFrame  # candidates x genes: mean over held-out groups of the per-gene Pearson r
    seconds: list[float]
    scheme: str
    chosen: int
    folds: list[list[str]] = field(default_factory=list)

    @property
    def best(self) -> HeadCandidate:
        return self.candidates[self.chosen]

    @property
    def cv_pearson(self) -> pd.Series:
        """Per-gene CV score of the chosen candidate."""
        return self.scores.iloc[self.chosen]

    def record(self) -> dict:
        """Summary for ``uns`` and the model's config, as columns (h5ad stores lists, not lists of dicts).

        ``candidates`` has one entry per candidate in each column: ``name``, ``fusion``, ``context_um`` (NaN: none),
        ``options`` (as text), ``cv_pearson_mean``, ``n_genes_scored`` and ``seconds``. The per-gene scores are kept
        by the model (:attr:`DiffBulk.cv_pearson`).
        """
        mean = self.scores.mean(axis=1, skipna=True).to_numpy(np.float64)
        cands = self.candidates
        return {
            "scheme": self.scheme,
            "held_out": ["+".join(f) for f in self.folds],
            "chosen": self.best.name,
            "candidates": {
                "name": [c.name for c in cands],
                "fusion": [c.fusion for c in cands],
                "context_um": [np.nan if c.context_um is None else float(c.context_um) for c in cands],
                "options": [", ".join(f"{k}={v!r}" for k, v in c.options) for c in cands],
                "cv_pearson_mean": [float(v) for v in mean],
                "n_genes_scored": [int(self.scores.iloc[i].notna().sum()) for i in range(len(cands))],
                "seconds": [round(float(t), 3) for t in self.seconds],
            },
            "score_definition": "Pearson r per gene over the tiles of each held-out group of training slides "
                                "(spatial stripes with one slide), averaged over the groups; a candidate's score is "
                                "the mean over genes",
        }


def neighbour_spacing_um(slides: list, table_key: str) -> float | None:
    """Median distance (µm) between each tile centre and its nearest neighbour on the same slide."""
    from ._context import tile_coords_um, tile_spacing_um

    coords, groups = [], []
    for i, sd in enumerate(slides):
        try:
            xy = tile_coords_um(sd.tables[table_key])
        except (KeyError, ValueError):  # no centres or no pixel size: this slide says nothing about the spacing
            continue
        coords.append(xy)
        groups.append(np.full(len(xy), i))
    if not coords:
        return None
    return tile_spacing_um(np.vstack(coords), np.concatenate(groups))


def head_candidates(fusion: str, *, context_um: float | None, head_kwargs: dict,
                    spacing_um: float | None) -> list[HeadCandidate]:
    """The heads to score: the one asked for, or with ``fusion="auto"`` the ridge and neural heads and radii.

    ``fusion="auto"``: reduced-rank ridge (``rank="auto"``: the rank by the ridge's own inner CV, full rank included),
    early-fused (one ridge on both feature sets) and late-fused (``blend="late"``: one ridge per feature set, blended
    by inner CV, which keeps a diffusion block the one penalty of an early fusion would shrink away), each without
    context and, unless ``context_um`` is given, with context radii of :data:`AUTO_CONTEXT_STEPS` times the tile
    spacing; and each neural fusion of :data:`AUTO_NEURAL` without context (or with the given ``context_um``).
    """
    def opts(d: dict) -> tuple:
        return tuple(sorted(d.items()))

    if fusion != AUTO:
        return [HeadCandidate(fusion, context_um, opts(head_kwargs))]
    if context_um is not None:
        radii = [float(context_um)]
    else:
        radii = [None]
        if spacing_um is not None:
            radii += [round(float(s * spacing_um), 1) for s in AUTO_CONTEXT_STEPS]
    out = [HeadCandidate("ridge", r, opts({"rank": "auto", **blend})) for r in radii
           for blend in ({}, {"blend": "late"})]
    out += [HeadCandidate(f, context_um, ()) for f in AUTO_NEURAL]
    return out


def _fit_predict(train: ad.AnnData, test: ad.AnnData, genes: list[str], keys: list[str], cand: HeadCandidate, *,
                 random_state: int, accelerator: str) -> pd.DataFrame:
    """Fit ``cand`` on ``train`` (inputs scaled on it) and predict ``test``."""
    from ..core._scaler import InputScaler
    from ._fit_steps import scaled_table
    from ._fusion import fit_head

    kwargs = {"random_state": random_state, **cand.head_kwargs}
    if cand.fusion != "ridge":
        kwargs.setdefault("accelerator", accelerator)
        kwargs.setdefault("scale_inputs", False)
    scalers = [InputScaler.fit(np.asarray(train.obsm[k])) for k in keys]
    head = fit_head(scaled_table(train, keys, scalers), use_rep=keys[0], diff_key=keys[1], genes=genes,
                    fusion=cand.fusion, **kwargs)
    return head.predict(scaled_table(test, keys, scalers))


def gene_pearson(y: np.ndarray, measured: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pearson r of each gene (column) over the tiles where it was measured (NaN where undefined)."""
    from ._evaluate import nan_pearson

    return nan_pearson(np.where(measured, y, np.nan), np.asarray(pred, np.float64), axis=0)


def cross_validate_heads(tables: dict[float | None, ad.AnnData], genes: list[str], keys: list[str],
                         candidates: list[HeadCandidate], *, n_splits: int, random_state: int,
                         accelerator: str) -> HeadSelection:
    """Score each candidate by inner cross-validation over the training slides (see the module docstring).

    ``tables`` maps each candidate's ``context_um`` to the training table with that context (:func:`training_table`).
    The folds hold out groups of slides (``GroupKFold``, at most ``n_splits``), or spatial stripes of a single slide.
    """
    from ._head_base import targets
    from ._ridge import cv_folds

    base = next(iter(tables.values()))
    groups = base.obs[SAMPLE_COL].astype(str).to_numpy()
    spatial = np.asarray(base.obsm[SPATIAL_KEY], np.float64) if SPATIAL_KEY in base.obsm else None
    folds, scheme = cv_folds(groups, spatial, base.n_obs, n_splits, random_state)
    y, m = targets(base, genes, None)
    held_out = [sorted(set(groups[va])) for _, va in folds]
    rows, seconds = [], []
    for cand in candidates:
        table = tables[cand.context_um]
        t0 = time.perf_counter()
        per_fold = []
        for tr, va in folds:
            pred = _fit_predict(table[tr], table[va], genes, keys, cand, random_state=random_state,
                                accelerator=accelerator)
            per_fold.append(gene_pearson(y[va], m[va], pred.reindex(columns=genes).to_numpy()))
        with np.errstate(invalid="ignore"):
            stack = np.vstack(per_fold)
            ok = np.isfinite(stack)
            score = np.where(ok.any(axis=0), np.nansum(stack, axis=0) / np.maximum(ok.sum(axis=0), 1), np.nan)
        rows.append(score)
        seconds.append(time.perf_counter() - t0)
        logger.info(f"fit_diffbulk: head CV ({scheme}) {cand.name}: mean Pearson {np.nanmean(score):.4f} over "
                    f"{int(np.isfinite(score).sum())} genes ({seconds[-1]:.1f} s).")
    scores = pd.DataFrame(np.vstack(rows), index=[c.name for c in candidates], columns=list(genes))
    mean = scores.mean(axis=1, skipna=True).to_numpy()
    chosen = int(np.nanargmax(np.where(np.isfinite(mean), mean, -np.inf))) if np.isfinite(mean).any() else 0
    sel = HeadSelection(candidates=list(candidates), scores=scores, seconds=seconds, scheme=scheme, chosen=chosen,
                        folds=held_out)
    if len(candidates) > 1:
        logger.info(f"fit_diffbulk: fusion='auto' chose {sel.best.name} (CV mean Pearson {mean[chosen]:.4f}; "
                    + ", ".join(f"{c.name} {s:.4f}" for c, s in zip(candidates, mean, strict=True)) + ").")
    return sel
