"""The folds of :func:`dbk.tl.benchmark`: leave one slide out, by patient, given test sets, or spatial blocks."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .._constants import SPATIAL_KEY, UM_PER_PX_KEY, UNS_KEY

SPLITS = ("loso", "patient", "blocks")
BLOCK_OPTIONS = {"n_folds": 5, "n_blocks": 16, "buffer_um": 0.0}


def _positive_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value) and value > 0


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


# ---- folds ----------------------------------------------------------------------------------------------------------


def _plan_folds(split, names: list[str], slides: list, *, patients, split_kwargs):
    """``(split name, [(fold, {slide: None}, {slide: None})])``; for ``"blocks"`` the block options (drawn later)."""
    if patients is not None and not (isinstance(split, str) and split == "patient"):
        raise ValueError("patients= is for split='patient'.")
    if split_kwargs and not (isinstance(split, str) and split == "blocks"):
        raise ValueError("split_kwargs= is for split='blocks'.")
    if isinstance(split, str):
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; use one of {list(SPLITS)}, a dict {{fold: [test slides]}} or "
                             "a list of test-slide lists.")
        if split == "blocks":
            opts = dict(BLOCK_OPTIONS)
            unknown = set(split_kwargs or {}) - set(BLOCK_OPTIONS)
            if unknown:
                raise ValueError(f"Unknown split_kwargs {sorted(unknown)}; split='blocks' takes {list(BLOCK_OPTIONS)}.")
            opts.update(split_kwargs or {})
            if not (_positive_int(opts["n_folds"]) and opts["n_folds"] >= 2):
                raise ValueError(f"split_kwargs['n_folds'] must be an integer >= 2, got {opts['n_folds']!r}.")
            if not (isinstance(opts["buffer_um"], numbers.Real) and np.isfinite(opts["buffer_um"])
                    and opts["buffer_um"] >= 0):
                raise ValueError(f"split_kwargs['buffer_um'] must be a number >= 0, got {opts['buffer_um']!r}.")
            return "blocks", opts
        if len(names) < 2:
            raise ValueError(f"split={split!r} needs at least two slides, got {len(names)} ({names}); use "
                             "split='blocks' to train and test on one slide.")
        if split == "loso":
            return "loso", [(n, [m for m in names if m != n], [n]) for n in names]
        return "patient", _patient_folds(names, slides, patients)
    if isinstance(split, Mapping):
        plan = []
        for fold, value in split.items():
            if isinstance(value, Mapping):
                extra = set(value) - {"train", "test"}
                if extra or "test" not in value:
                    raise ValueError(f"Fold {fold!r}: give {{'train': [...], 'test': [...]}} or a list of test slides.")
                test = _slide_list(value["test"], f"fold {fold!r} test")
                train = (_slide_list(value["train"], f"fold {fold!r} train") if value.get("train") is not None
                         else [n for n in names if n not in test])
            else:
                test = _slide_list(value, f"fold {fold!r}")
                train = [n for n in names if n not in test]
            plan.append((str(fold), train, test))
    elif isinstance(split, Sequence):
        plan = []
        for i, value in enumerate(split):
            test = _slide_list(value, f"split[{i}]")
            plan.append(("+".join(test), [n for n in names if n not in test], test))
    else:
        raise TypeError(f"split must be 'loso', 'patient', 'blocks', a dict or a list, got {type(split).__name__}.")
    _check_plan(plan, names)
    return "custom", plan


def _slide_list(value, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"{what}: expected a non-empty list of slide names, got {value!r}.")
    return [str(v) for v in value]


def _check_plan(plan: list, names: list[str]) -> None:
    if not plan:
        raise ValueError("The split has no folds.")
    folds = [f for f, _, _ in plan]
    if len(set(folds)) != len(folds):
        raise ValueError(f"Fold names must be unique, got {folds}.")
    tested: dict[str, str] = {}
    for fold, train, test in plan:
        unknown = [s for s in (*train, *test) if s not in names]
        if unknown:
            raise ValueError(f"Fold {fold!r} names slides {unknown} that are not in the data (slides: {names}).")
        both = sorted(set(train) & set(test))
        if both:
            raise ValueError(f"Fold {fold!r}: slides {both} are both training and test slides.")
        if not train:
            raise ValueError(f"Fold {fold!r} has no training slides.")
        for s in test:
            if s in tested:
                raise ValueError(f"Slide {s!r} is a test slide of folds {tested[s]!r} and {fold!r}; each slide is "
                                 "tested in one fold at most (its predictions go to one obsm key per method). Run "
                                 "dbk.tl.benchmark once per split instead.")
            tested[s] = fold


def _patient_folds(names: list[str], slides: list, patients) -> list:
    from ._fit_steps import known_patients

    of = known_patients(names, slides, patients)
    missing = [n for n in names if n not in of]
    if missing:
        raise ValueError(f"split='patient' needs the patient of every slide: set sdata.attrs['patient'] or pass "
                         f"patients={{slide: patient}}; missing for {missing}.")
    groups = list(dict.fromkeys(of[n] for n in names))
    if len(groups) < 2:
        raise ValueError(f"split='patient' needs slides of at least two patients, got {groups}.")
    return [(p, [n for n in names if of[n] != p], [n for n in names if of[n] == p]) for p in groups]


def _block_folds(by_name: dict, table_key: str, *, seed: int, n_folds: int, n_blocks, buffer_um: float) -> list:
    """Spatial blocks of each slide (:func:`dbk.pp.spatial_blocks`) dealt into ``n_folds`` folds of test tiles."""
    from scipy.spatial import cKDTree

    from ..pp import spatial_blocks

    rng = np.random.default_rng(seed)
    fold_of: dict[str, np.ndarray] = {}
    coords: dict[str, np.ndarray] = {}
    for name, sd in by_name.items():
        table = sd.tables[table_key]
        px = _pixel_size(sd, table_key)
        light = ad.AnnData(obs=pd.DataFrame(index=table.obs_names.copy()),
                           obsm={SPATIAL_KEY: np.asarray(table.obsm[SPATIAL_KEY], np.float64)[:, :2]})
        if px is not None:
            light.uns[UNS_KEY] = {UM_PER_PX_KEY: px}
        blocks = spatial_blocks(light, n_blocks=n_blocks, test_fraction=0.5, random_state=seed, groupby=None,
                                copy=True).obs["dbk_split_block"].to_numpy()
        ids = np.unique(blocks)
        if len(ids) < n_folds:
            raise ValueError(f"Slide {name!r} has tiles in {len(ids)} of its {n_blocks} blocks, fewer than n_folds="
                             f"{n_folds}; raise split_kwargs['n_blocks'] or lower 'n_folds'.")
        deal = dict(zip(rng.permutation(ids).tolist(), np.arange(len(ids)) % n_folds, strict=True))
        fold_of[name] = np.array([deal[b] for b in blocks])
        if buffer_um > 0:
            if px is None:
                raise ValueError(f"split_kwargs['buffer_um'] needs the pixel size of slide {name!r}, which is unknown.")
            coords[name] = np.asarray(table.obsm[SPATIAL_KEY], np.float64)[:, :2] * px
    plan = []
    for k in range(n_folds):
        train, test = {}, {}
        for name in by_name:
            t = fold_of[name] == k
            tr = ~t
            if buffer_um > 0 and t.any():
                d, _ = cKDTree(coords[name][t]).query(coords[name][tr])
                keep = np.ones(int(tr.sum()), bool) & (d > buffer_um)
                tr[np.flatnonzero(tr)[~keep]] = False
            if t.any():
                test[name] = t
            if tr.any():
                train[name] = tr
        plan.append((f"fold{k}", train, test))
    return plan


def _pixel_size(sd, table_key: str) -> float | None:
    px = sd.tables[table_key].uns.get(UNS_KEY, {}).get(UM_PER_PX_KEY)
    if px is None:
        from .._image import get_pixel_size

        try:
            px = get_pixel_size(sd)
        except (ValueError, KeyError):
            return None
    return float(px)
