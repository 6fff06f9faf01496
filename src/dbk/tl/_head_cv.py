"""Inner cross-validation of the stage-2 head on the training slides: ``fusion="auto"`` and the per-gene trust score.

:func:`fit_diffbulk` runs it between the training table and the head fit. Two things come out of it.

**The head** (``fusion="auto"``). Every candidate (fusion, spatial context radius, head options) is fitted on all but
one fold of the training tiles and predicts the held-out fold; a candidate's score in a fold is the mean over genes of
each gene's Pearson r over the fold's tiles. One rule chooses: the *reference* is the full-rank, early-fused ridge
head without spatial context (:data:`REFERENCE`); any departure from it (a reduced rank, spatial context, a late
blend, a neural head) is chosen only when its mean paired difference over the folds beats the reference by more than
one standard error of that difference (:func:`choose_head`). With few folds a lucky candidate no longer wins on noise.

The folds: groups of training slides held out (``GroupKFold``) when there are at least three slides; with fewer,
spatial blocks of each slide with a buffer of training tiles dropped around each held-out block (neighbouring tiles
share expression: without the buffer, the score rewards copying neighbours).

**The trust score** of every gene (:attr:`DiffBulk.cv_pearson`): the chosen head's per-gene Pearson r averaged over
held-out groups. When the training slides come from at least two patients (``patients=`` or
``sdata.attrs["patient"]``), whole patients are held out, so a gene whose relation to the image changes between
patients scores low. With one patient the score cannot see a shift between patients, and the record says so. A gene is
*trusted* when the mean of its held-out r minus one standard error over the held-out groups is above chance (one
standard deviation of a Pearson r over the held-out tiles, ``1 / sqrt(n)``) and its r is positive in every held-out
group (:func:`trusted_genes`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import SAMPLE_COL
from .._logging import inner_fits, logger

AUTO = "auto"
#: Neural fusions ``fusion="auto"`` tries beside the ridge heads (the strongest neural head on her2st).
AUTO_NEURAL = ("gated",)
#: Context radii ``fusion="auto"`` tries, in multiples of the median distance between neighbouring tile centres:
#: 1.5 takes the 8 nearest tiles of a square grid (and the 6 of a hexagonal one), 2.5 the next ring.
AUTO_CONTEXT_STEPS = (1.5, 2.5)
#: Spatial-block folds (fewer than three training slides): blocks per fold and slide, and the buffer around a
#: held-out block in multiples of the tile spacing (1.5: the training tiles sharing an edge or a corner with it).
BLOCKS_PER_FOLD = 2
BUFFER_STEPS = 1.5
#: How many standard errors of the paired fold difference a departure from the reference must win by.
SE_MARGIN = 1.0
SELECTION_RULE = ("the reference (full-rank early ridge, no spatial context) unless another candidate's mean paired "
                  "difference over the folds exceeds {margin:g} standard error (std / sqrt(folds), ddof 1); among "
                  "those, the highest mean")
TRUST_RULE = ("trusted: mean held-out r minus one standard error over the held-out groups above 1 / sqrt(held-out "
              "tiles) (chance), and r > 0 in every held-out group")


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


#: The reference head of the selection rule: full-rank ridge on [FM; diffusion] features, no spatial context.
REFERENCE = HeadCandidate("ridge", None, ())


@dataclass
class CVFolds:
    """Folds of the inner cross-validation: ``(train rows, held-out rows)`` pairs and how they were made."""

    folds: list[tuple[np.ndarray, np.ndarray]]
    scheme: str
    held_out: list[str]  # a label per fold: the slides / patients / blocks held out
    can_see: str  # which shift a score on these folds can see

    def __len__(self) -> int:
        return len(self.folds)


@dataclass
class HeadSelection:
    """What :func:`cross_validate_heads` found: each candidate's CV scores, the rule's verdict, the trust score."""

    candidates: list[HeadCandidate]
    scores: pd.DataFrame  # candidates x genes: mean over held-out folds of the per-gene Pearson r
    fold_scores: pd.DataFrame  # candidates x folds: mean over genes of the per-gene r of each held-out fold
    seconds: list[float]
    folds: CVFolds
    chosen: int
    rule: dict = field(default_factory=dict)
    trust: dict = field(default_factory=dict)  # per-gene trust score of the chosen head (see trust_scores)

    @property
    def scheme(self) -> str:
        return self.folds.scheme

    @property
    def best(self) -> HeadCandidate:
        return self.candidates[self.chosen]

    @property
    def cv_pearson(self) -> pd.Series:
        """Per-gene trust score of the chosen candidate (patient-held-out where the patients allow)."""
        if self.trust:
            return self.trust["mean"]
        return self.scores.iloc[self.chosen]

    def record(self) -> dict:
        """Summary for ``uns`` and the model's config, as columns (h5ad stores lists, not lists of dicts).

        ``candidates`` has one entry per candidate in each column: ``name``, ``fusion``, ``context_um`` (NaN: none),
        ``options`` (as text), ``cv_pearson_mean``, ``fold_scores`` (a list per candidate: mean r of each fold),
        ``difference`` / ``se`` (paired difference to the reference over the folds and its standard error),
        ``eligible`` (beats the reference by the rule's margin), ``n_genes_scored`` and ``seconds``. The per-gene
        scores are kept by the model (:attr:`DiffBulk.cv_pearson`).
        """
        mean = self.scores.mean(axis=1, skipna=True).to_numpy(np.float64)
        cands = self.candidates
        r = self.rule
        out = {
            "scheme": self.scheme,
            "held_out": list(self.folds.held_out),
            "chosen": self.best.name,
            "rule": r.get("text", ""),
            "reference": r.get("reference", ""),
            "se_margin": float(r.get("margin", SE_MARGIN)),
            "candidates": {
                "name": [c.name for c in cands],
                "fusion": [c.fusion for c in cands],
                "context_um": [np.nan if c.context_um is None else float(c.context_um) for c in cands],
                "options": [", ".join(f"{k}={v!r}" for k, v in c.options) for c in cands],
                "cv_pearson_mean": [float(v) for v in mean],
                "fold_scores": [[float(v) for v in row] for row in self.fold_scores.to_numpy(np.float64)],
                "difference": [float(v) for v in r.get("difference", [np.nan] * len(cands))],
                "se": [float(v) for v in r.get("se", [np.nan] * len(cands))],
                "eligible": [bool(v) for v in r.get("eligible", [False] * len(cands))],
                "n_genes_scored": [int(self.scores.iloc[i].notna().sum()) for i in range(len(cands))],
                "seconds": [round(float(t), 3) for t in self.seconds],
            },
            "score_definition": "Pearson r per gene over the tiles of each held-out fold of the training tiles, "
                                "averaged over the folds; a candidate's fold score is the mean over genes",
        }
        if self.trust:
            t = self.trust
            out["trust"] = {"scheme": t["scheme"], "held_out": list(t["held_out"]), "can_see": t["can_see"],
                            "rule": TRUST_RULE, "chance": float(t["chance"]),
                            "n_trusted": int(np.asarray(t["trusted"]).sum()), "n_genes": int(len(t["trusted"]))}
        return out


def _coords_um(slides: list, table_key: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Tile centres in µm of all slides stacked (``None`` when a slide has no centres or pixel size)."""
    from ._context import tile_coords_um

    coords, groups = [], []
    for i, sd in enumerate(slides):
        try:
            xy = tile_coords_um(sd.tables[table_key])
        except (KeyError, ValueError):  # no centres or no pixel size
            return None, None
        coords.append(xy)
        groups.append(np.full(len(xy), i))
    return np.vstack(coords), np.concatenate(groups)


def head_candidates(fusion: str, *, context_um: float | None, head_kwargs: dict,
                    spacing_um: float | None) -> list[HeadCandidate]:
    """The heads to score: the one asked for, or with ``fusion="auto"`` the reference and its departures.

    ``fusion="auto"``: first the reference (:data:`REFERENCE`: full-rank early ridge, no context), then
    reduced-rank ridge (``rank="auto"``: the rank by the ridge's own inner CV, full rank included), early-fused (one
    ridge on both feature sets) and late-fused (``blend="late"``: one ridge per feature set, blended by inner CV),
    without context and, unless ``context_um`` is given, with context radii of :data:`AUTO_CONTEXT_STEPS` times the
    tile spacing (there also full rank); and each neural fusion of :data:`AUTO_NEURAL` without context (or with the
    given ``context_um``).
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
    out = [HeadCandidate("ridge", radii[0], ())]  # the reference (or, with a given context_um, its context twin)
    for r in radii:
        if r is not None and r != radii[0]:
            out.append(HeadCandidate("ridge", r, ()))
        out += [HeadCandidate("ridge", r, opts({"rank": "auto", **blend})) for blend in ({}, {"blend": "late"})]
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


# ---- folds ----------------------------------------------------------------------------------------------------------

def group_folds(groups: np.ndarray, n_splits: int, what: str) -> CVFolds:
    """Hold out groups (slides or patients): ``GroupKFold`` with at most ``n_splits`` folds."""
    from sklearn.model_selection import GroupKFold

    names = np.asarray(groups).astype(str)
    k = min(int(n_splits), len(np.unique(names)))
    idx = np.arange(len(names))
    folds = list(GroupKFold(n_splits=k).split(idx, groups=names))
    held = ["+".join(sorted(set(names[va]))) for _, va in folds]
    see = ("shifts between patients" if what == "patient"
           else "shifts between slides of the training patients, not between patients")
    return CVFolds(folds, f"{k}-fold by {what}", held, see)


def block_folds(slides_of_tile: np.ndarray, coords_um: np.ndarray | None, spatial_px: np.ndarray | None,
                n_splits: int, spacing: float | None, random_state: int) -> CVFolds:
    """Spatial blocks of every slide, ``n_splits`` folds, a buffer of training tiles dropped around held-out ones.

    Each slide's tiles are binned into ``BLOCKS_PER_FOLD * n_splits`` blocks along a grid shaped like the slide;
    blocks go to folds at random (seeded), so every fold holds out blocks of every slide. Training tiles within
    ``BUFFER_STEPS`` tile spacings of a held-out tile of the same slide are left out of that fold's training set.
    Without µm centres the pixel centres are used (the buffer then in pixels of the median spacing).
    """
    from scipy.spatial import cKDTree

    from ..pp._split import _bin
    from ._context import tile_spacing_um

    xy = coords_um if coords_um is not None else spatial_px
    if xy is None or not np.isfinite(xy).all():
        raise ValueError("The head's inner cross-validation needs tile centres (obsm['spatial']) to make spatial "
                         "folds when there are fewer than three training slides.")
    xy = np.asarray(xy, np.float64)[:, :2]
    slides = np.asarray(slides_of_tile).astype(str)
    rng = np.random.default_rng(random_state)
    n_blocks = BLOCKS_PER_FOLD * int(n_splits)
    fold_of = np.full(len(xy), -1)
    for s in pd.unique(slides):
        rows = np.flatnonzero(slides == s)
        lo, span = xy[rows].min(axis=0), np.ptp(xy[rows], axis=0)
        aspect = (span[0] + 1.0) / (span[1] + 1.0)
        nx = int(np.clip(round(np.sqrt(n_blocks * aspect)), 1, n_blocks))
        ny = max(1, int(round(n_blocks / nx)))
        block = _bin(xy[rows, 1], lo[1], span[1], ny) * nx + _bin(xy[rows, 0], lo[0], span[0], nx)
        used = np.unique(block)
        assign = rng.permutation(len(used)) % int(n_splits)
        fold_of[rows] = assign[np.searchsorted(used, block)]
    space = spacing if spacing is not None else tile_spacing_um(xy, slides)
    buffer = BUFFER_STEPS * space if space else 0.0
    folds, dropped = [], []
    for k in range(int(n_splits)):
        va = np.flatnonzero(fold_of == k)
        tr = np.flatnonzero(fold_of != k)
        if len(va) == 0 or len(tr) == 0:
            continue
        keep = np.ones(len(tr), bool)
        if buffer > 0:
            for s in pd.unique(slides[va]):
                t_s, v_s = tr[slides[tr] == s], va[slides[va] == s]
                d, _ = cKDTree(xy[v_s]).query(xy[t_s], k=1, distance_upper_bound=buffer * (1 + 1e-9))
                keep[np.isin(tr, t_s[np.isfinite(d)])] = False
        folds.append((tr[keep], va))
        dropped.append(int((~keep).sum()))
    if len(folds) < 2:
        raise ValueError("The training tiles are too few to make two spatial folds for the head's inner "
                         "cross-validation; pass head_cv=0 and one fusion (e.g. fusion='ridge').")
    unit = "µm" if coords_um is not None else "px"
    scheme = (f"{len(folds)}-fold by spatial block ({n_blocks} blocks per slide, buffer {buffer:.0f} {unit}: "
              f"{int(np.mean(dropped))} training tiles dropped per fold on average)")
    held = [f"blocks {k}" for k in range(len(folds))]
    return CVFolds(folds, scheme, held, "within-slide variation only (no shift between slides or patients)")


def selection_folds(slides_of_tile: np.ndarray, coords_um, spatial_px, n_splits: int, spacing: float | None,
                    random_state: int) -> CVFolds:
    """The folds that choose the head: by slide with >= 3 slides, else spatial blocks with a buffer."""
    if len(np.unique(np.asarray(slides_of_tile).astype(str))) >= 3:
        return group_folds(slides_of_tile, n_splits, "slide")
    return block_folds(slides_of_tile, coords_um, spatial_px, n_splits, spacing, random_state)


# ---- the rule -------------------------------------------------------------------------------------------------------

def choose_head(fold_scores: np.ndarray, reference: int = 0, margin: float = SE_MARGIN) -> dict:
    """The selection rule over ``fold_scores`` (candidates x folds; mean r over genes per fold).

    Returns ``chosen`` (index), per-candidate ``difference`` (mean over folds of candidate - reference), ``se``
    (std of the paired differences, ddof 1, over sqrt(folds)), ``eligible`` (difference > margin * se, all folds
    finite) and ``text`` (the rule in words).
    """
    s = np.asarray(fold_scores, np.float64)
    n_folds = s.shape[1]
    diff = s - s[reference]
    ok = np.isfinite(diff).all(axis=1)
    mean = np.where(ok, np.nanmean(np.where(np.isfinite(diff), diff, 0.0), axis=1), np.nan)
    se = (np.nanstd(diff, axis=1, ddof=1) / np.sqrt(n_folds)) if n_folds >= 2 else np.full(len(s), np.inf)
    eligible = ok & (mean > margin * se)
    eligible[reference] = False
    chosen = reference
    if eligible.any():
        cand_mean = np.where(eligible, np.nanmean(s, axis=1), -np.inf)
        chosen = int(np.argmax(cand_mean))
    if not np.isfinite(s[reference]).all():  # the reference failed a fold: fall back to the best mean
        means = np.nanmean(np.where(np.isfinite(s), s, np.nan), axis=1)
        chosen = int(np.nanargmax(np.where(np.isfinite(means), means, -np.inf)))
    return {"chosen": chosen, "difference": mean, "se": se, "eligible": eligible, "margin": float(margin),
            "text": SELECTION_RULE.format(margin=margin)}


# ---- scoring --------------------------------------------------------------------------------------------------------

def _score_folds(table: ad.AnnData, y: np.ndarray, m: np.ndarray, genes: list[str], keys: list[str],
                 cand: HeadCandidate, folds: CVFolds, *, random_state: int, accelerator: str) -> np.ndarray:
    """Per-fold, per-gene held-out Pearson r of ``cand`` (folds x genes)."""
    out = []
    for tr, va in folds.folds:
        with inner_fits():  # each fold's head fit logs its details at DEBUG; the candidate's score line says enough
            pred = _fit_predict(table[tr], table[va], genes, keys, cand, random_state=random_state,
                                accelerator=accelerator)
        out.append(gene_pearson(y[va], m[va], pred.reindex(columns=genes).to_numpy()))
    return np.vstack(out)


def _mean_over_folds(stack: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(stack)
        return np.where(ok.any(axis=0), np.nansum(stack, axis=0) / np.maximum(ok.sum(axis=0), 1), np.nan)


def trust_scores(per_fold: np.ndarray, n_held_out: list[int], genes: list[str], folds: CVFolds) -> dict:
    """Each gene's trust score from its held-out r per fold (folds x genes), and which genes are trusted."""
    with np.errstate(invalid="ignore"):
        mean = _mean_over_folds(per_fold)
        n_ok = np.isfinite(per_fold).sum(axis=0)
        sd = np.nanstd(np.where(np.isfinite(per_fold), per_fold, np.nan), axis=0, ddof=1) if len(per_fold) > 1 \
            else np.full(per_fold.shape[1], np.nan)
        se = np.where(n_ok >= 2, sd / np.sqrt(np.maximum(n_ok, 1)), np.nan)
        lowest = np.nanmin(np.where(np.isfinite(per_fold), per_fold, np.inf), axis=0)
    chance = 1.0 / np.sqrt(max(1.0, float(np.median(n_held_out))))
    lower = mean - np.where(np.isfinite(se), se, 0.0)
    trusted = np.isfinite(mean) & (lower > chance) & (lowest > 0) & (n_ok == len(per_fold))
    idx = pd.Index(genes)
    return {"mean": pd.Series(mean, index=idx, name="cv_pearson"), "se": pd.Series(se, index=idx, name="cv_se"),
            "trusted": pd.Series(trusted, index=idx, name="cv_trusted"), "chance": chance,
            "scheme": folds.scheme, "held_out": list(folds.held_out), "can_see": folds.can_see,
            "per_fold": per_fold}


def cross_validate_heads(tables: dict[float | None, ad.AnnData], genes: list[str], keys: list[str],
                         candidates: list[HeadCandidate], *, n_splits: int, random_state: int,
                         accelerator: str, coords_um: np.ndarray | None = None, spacing_um: float | None = None,
                         patients: np.ndarray | None = None) -> HeadSelection:
    """Score each candidate by inner cross-validation over the training tiles and apply the rule (module docstring).

    ``tables`` maps each candidate's ``context_um`` to the training table with that context (:func:`training_table`);
    ``coords_um`` are the tile centres in µm (rows of the tables), ``patients`` the patient of each tile (``None``:
    unknown). The first candidate is the rule's reference.
    """
    from .._constants import SPATIAL_KEY
    from ._head_base import targets

    base = next(iter(tables.values()))
    slides = base.obs[SAMPLE_COL].astype(str).to_numpy()
    spatial = np.asarray(base.obsm[SPATIAL_KEY], np.float64) if SPATIAL_KEY in base.obsm else None
    folds = selection_folds(slides, coords_um, spatial, n_splits, spacing_um, random_state)
    y, m = targets(base, genes, None)
    rows, fold_rows, per_fold_all, seconds = [], [], [], []
    for cand in candidates:
        t0 = time.perf_counter()
        stack = _score_folds(tables[cand.context_um], y, m, genes, keys, cand, folds, random_state=random_state,
                             accelerator=accelerator)
        per_fold_all.append(stack)
        rows.append(_mean_over_folds(stack))
        with np.errstate(invalid="ignore"):
            fold_rows.append(np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in stack]))
        seconds.append(time.perf_counter() - t0)
        logger.info(f"fit_diffbulk: head CV ({folds.scheme}) {cand.name}: mean Pearson {np.nanmean(rows[-1]):.4f} "
                    f"over {int(np.isfinite(rows[-1]).sum())} genes, per fold "
                    f"[{', '.join(f'{v:.3f}' for v in fold_rows[-1])}] ({seconds[-1]:.1f} s).")
    scores = pd.DataFrame(np.vstack(rows), index=[c.name for c in candidates], columns=list(genes))
    fold_scores = pd.DataFrame(np.vstack(fold_rows), index=[c.name for c in candidates], columns=folds.held_out)
    rule = choose_head(fold_scores.to_numpy(), reference=0)
    rule["reference"] = candidates[0].name
    if len(candidates) == 1:
        rule["text"] = "one head asked for: no selection"
    chosen = int(rule["chosen"]) if len(candidates) > 1 else 0
    sel = HeadSelection(candidates=list(candidates), scores=scores, fold_scores=fold_scores, seconds=seconds,
                        folds=folds, chosen=chosen, rule=rule)
    if len(candidates) > 1:
        d, se = rule["difference"], rule["se"]
        logger.info(f"fit_diffbulk: fusion='auto' chose {sel.best.name} (rule: {rule['text']}). Against the "
                    f"reference {candidates[0].name}: "
                    + ", ".join(f"{c.name} {d[i]:+.4f} ± {se[i]:.4f}{' *' if rule['eligible'][i] else ''}"
                                for i, c in enumerate(candidates) if i) + " (* beats it).")
    sel.trust = _trust(sel, tables, y, m, genes, keys, slides, patients, n_splits, per_fold_all[chosen],
                       random_state=random_state, accelerator=accelerator)
    return sel


def _trust(sel: HeadSelection, tables, y, m, genes, keys, slides, patients, n_splits, per_fold_chosen, *,
           random_state: int, accelerator: str) -> dict:
    """The chosen head's trust score: on patient folds when >= 2 patients, else on the selection folds."""
    folds = sel.folds
    per_fold = per_fold_chosen
    if patients is not None:
        pats = np.asarray(patients).astype(str)
        if len(np.unique(pats)) >= 2:
            pf = group_folds(pats, max(n_splits, 2), "patient")
            t0 = time.perf_counter()
            per_fold = _score_folds(tables[sel.best.context_um], y, m, genes, keys, sel.best, pf,
                                    random_state=random_state, accelerator=accelerator)
            folds = pf
            logger.info(f"fit_diffbulk: trust scores on {pf.scheme} ({', '.join(pf.held_out)} held out; "
                        f"{time.perf_counter() - t0:.1f} s).")
    n_held = [len(va) for _, va in folds.folds]
    trust = trust_scores(per_fold, n_held, genes, folds)
    one_patient = patients is None or len(np.unique(np.asarray(patients).astype(str))) < 2
    if one_patient:
        logger.warning(
            f"fit_diffbulk: the trust scores (model.cv_pearson) come from {folds.scheme} of "
            + ("one patient's slides" if patients is not None else "slides whose patients are unknown")
            + ": they cannot see a shift between patients. Genes trusted here may fail on another patient; set "
            "sdata.attrs['patient'] (or patients=) on slides from two or more patients to score that.")
    n_tr = int(trust["trusted"].sum())
    logger.info(f"fit_diffbulk: {n_tr} of {len(genes)} genes trusted ({TRUST_RULE}; chance "
                f"{trust['chance']:.3f}).")
    return trust
