"""The trust score sees patients: genes whose link to the image changes between patients are not trusted."""

from __future__ import annotations

import numpy as np
import pytest

import dbk
from dbk.pp._prepare import prepare_slides

TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
        "log_every": 5}
FIT = {"fusion": "ridge", "fm_size_px": 64, "tile_size_um": 56.0, "random_state": 0, "accelerator": "cpu"}


@pytest.fixture(scope="module")
def two_patients():
    """Four slides, two per patient; a fifth of the genes follow other cell types in patient P2."""
    raw = {f"{p}_{s}": dbk.datasets.synthetic(shape=(896, 896), random_state=s, patient=p, patient_shift=1.0)
           for p, s in (("P1", 0), ("P1", 1), ("P2", 2), ("P2", 3))}
    slides, _ = prepare_slides(raw, tile_size_um=56.0)
    shifted = list(slides[0].attrs["dbk_synthetic"]["shifted_genes"])
    assert shifted and shifted == list(slides[2].attrs["dbk_synthetic"]["shifted_genes"])
    pre = dbk.tl.fit_pretrainer(slides, preset="tiny", max_steps=3, random_state=0, **TINY)
    return slides, shifted, pre


def test_patient_folds_untrust_the_shifted_genes(two_patients):
    slides, shifted, pre = two_patients
    assert [sd.attrs["patient"] for sd in slides] == ["P1", "P1", "P2", "P2"]
    by_patient = dbk.tl.fit_diffbulk(slides, pretrainer=pre, key_added="dbk_pat", **FIT)
    trust = slides[0].tables["dbk_table"].uns["dbk_pat"]["head_selection"]["trust"]
    assert trust["scheme"] == "2-fold by patient" and trust["can_see"] == "shifts between patients"
    # the same slides, patients unknown: slides are held out, and two of them share each patient
    for sd in slides:
        sd.attrs["patient_backup"] = sd.attrs.pop("patient")
    try:
        by_slide = dbk.tl.fit_diffbulk(slides, pretrainer=pre, key_added="dbk_sl", **FIT)
    finally:
        for sd in slides:
            sd.attrs["patient"] = sd.attrs.pop("patient_backup")
    assert "by slide" in slides[0].tables["dbk_table"].uns["dbk_sl"]["head_selection"]["trust"]["scheme"]
    genes = by_patient.genes
    is_shifted = np.array([g in set(shifted) for g in genes])
    t_pat = by_patient.cv_trusted.to_numpy()
    # patient folds: shifted genes are trusted far less often than the others (a shifted gene whose random new
    # profile happens to resemble its old one can still be predicted across patients)
    assert t_pat[is_shifted].mean() <= t_pat[~is_shifted].mean() - 0.4
    assert t_pat[~is_shifted].mean() >= 0.6
    # slide folds train on both patients and hide the shift: holding out a patient instead lowers a shifted gene's
    # score relative to the unshifted genes' (whose scores move only with the fold sizes)
    s_pat, s_sl = by_patient.cv_pearson.to_numpy(), by_slide.cv_pearson.to_numpy()
    drop = s_sl - s_pat
    assert np.nanmedian(drop[is_shifted]) > np.nanmedian(drop[~is_shifted]) + 0.1
