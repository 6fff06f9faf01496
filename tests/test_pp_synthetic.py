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
