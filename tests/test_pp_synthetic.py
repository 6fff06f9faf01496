"""pp on synthetic slides: two slides with different, overlapping panels concatenated with the measured mask."""

from __future__ import annotations

import numpy as np

import dbk


def _slide(genes, seed):
    sdata = dbk.datasets.synthetic(shape=(1024, 1024), genes=genes, random_state=seed)
    dbk.pp.make_tiles(sdata, tile_size_um=56.0)
    dbk.pp.pseudobulk(sdata)
    return sdata


def test_two_panels_concat_mask_and_counts():
    panel_a = ["ERBB2", "KRT5", "ESR1", "PTPRC", "CD68"]
    panel_b = ["KRT5", "PTPRC", "COL1A1", "EPCAM"]
    a, b = _slide(panel_a, 0), _slide(panel_b, 1)
    ta, tb = a.tables["dbk_table"], b.tables["dbk_table"]
    assert set(ta.var_names) == set(panel_a) and set(tb.var_names) == set(panel_b)
    out = dbk.pp.concat({"a": a, "b": b})
    assert set(out.var_names) == set(panel_a) | set(panel_b)
    mask = dbk.pp.measured_mask(out)
    is_a = (out.obs["sample"] == "a").to_numpy()
    for j, g in enumerate(out.var_names):
        assert mask[is_a, j].all() == (g in panel_a) and not mask[is_a, j].any() == (g not in panel_a)
        assert mask[~is_a, j].all() == (g in panel_b) and not mask[~is_a, j].any() == (g not in panel_b)
    counts = out.layers["counts"].toarray()
    for g in panel_a:
        np.testing.assert_array_equal(counts[is_a, list(out.var_names).index(g)],
                                      ta[:, g].layers["counts"].toarray().ravel())
    # a gene not in b's panel holds zeros there, flagged as not measured
    j = list(out.var_names).index("ERBB2")
    assert counts[~is_a, j].sum() == 0 and not mask[~is_a, j].any()
    # the variable genes come only from genes both slides measured
    assert set(dbk.pp.select_genes([a, b], n_top_genes=10)) <= set(panel_a) & set(panel_b)


def test_patient_survives_preparing_and_splitting_slides():
    """attrs["patient"] (what the patient-wise splits read) stays on the copies that dbk.pp makes of a slide."""
    from dbk.pp._prepare import train_view
    from dbk.pp._split import SPLIT_KEY

    slides = {f"s{seed}": dbk.datasets.synthetic(shape=(512, 512), n_genes=8, random_state=seed, patient=patient,
                                                 patient_shift=1.0)
              for seed, patient in ((0, "P1"), (1, "P2"))}
    prepared, names = dbk.pp.prepare_slides(slides, tile_size_um=56.0, copy=True)
    assert names == ["s0", "s1"] and [s.attrs["patient"] for s in prepared] == ["P1", "P2"]
    assert [s.attrs["dbk_synthetic"]["shifted_genes"] for s in prepared] == [
        s.attrs["dbk_synthetic"]["shifted_genes"] for s in slides.values()
    ]
    dbk.pp.spatial_blocks(prepared[0])
    assert train_view(prepared[0], SPLIT_KEY).attrs["patient"] == "P1"
