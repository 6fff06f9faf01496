"""Effective rank of predictions: defined on the centred matrix, recorded for every fit and prediction, said aloud."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import dbk
from dbk.tl._effective_rank import REL_TOL, is_low


def test_effective_rank_counts_patterns_not_genes():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(80, 3))
    x = maps @ rng.normal(size=(3, 40)) + 5.0  # 40 genes mixing 3 maps, offset: centring removes it
    assert dbk.tl.effective_rank(x) == 3
    assert dbk.tl.effective_rank(maps[:, :1] @ rng.normal(size=(1, 40))) == 1
    assert dbk.tl.effective_rank(rng.normal(size=(30, 50))) == 29  # centring costs one dimension
    assert dbk.tl.effective_rank(np.ones((10, 4))) == 0
    # a pattern below the threshold does not count; just above it does
    small = maps[:, :2] @ np.diag([1.0, 0.5 * REL_TOL]) @ rng.normal(size=(2, 40))
    assert dbk.tl.effective_rank(small) == 1
    # unmeasured entries (NaN) take the gene's mean (which perturbs one gene: at most one more pattern)
    y = x.copy()
    y[::7, 2] = np.nan
    assert dbk.tl.effective_rank(pd.DataFrame(y)) in (3, 4)
    assert dbk.tl.effective_rank(pd.DataFrame(x)) == 3
    with pytest.raises(ValueError, match="2-d"):
        dbk.tl.effective_rank(np.ones(5))


def test_low_means_far_fewer_than_the_targets():
    assert is_low(1, 40, 60) and is_low(3, 40, 60)
    assert not is_low(10, 40, 60) and not is_low(2, 3, 60) and not is_low(2, 2, 60)
    assert is_low(2, None, 60)  # without the targets' rank: against the genes


def _table(pred: np.ndarray, target_rank: int) -> ad.AnnData:
    n, g = pred.shape
    genes = [f"g{j}" for j in range(g)]
    a = ad.AnnData(np.zeros((n, 0), np.float32))
    a.obs_names = [f"t{i}" for i in range(n)]
    a.obsm["dbk_pred"] = pd.DataFrame(pred, index=a.obs_names, columns=genes)
    a.uns["dbk"] = {"predict": {"pred_key": "dbk_pred", "effective_rank": {"predictions": 0, "targets": target_rank,
                                                                            "n_genes": g}}}
    return a


def test_predictions_to_adata_records_and_warns_about_collapsed_predictions(caplog):
    rng = np.random.default_rng(1)
    one = rng.normal(size=(48, 1)) @ rng.normal(size=(1, 60))
    with caplog.at_level(logging.WARNING, logger="dbk"):
        out = dbk.tl.predictions_to_adata(_table(one, 40))
    rank = out.uns["dbk"]["predictions"]["effective_rank"]
    assert rank["predictions"] == 1 and rank["targets"] == 40 and rank["low"]
    msg = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("span only 1 independent pattern" in m and "spatially variable genes" in m for m in msg)
    # every pair of genes of a rank-1 prediction correlates at |r| = 1: what the warning is about
    c = np.corrcoef(out.X.T)
    assert np.allclose(np.abs(c), 1.0, atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dbk"):
        full = dbk.tl.predictions_to_adata(_table(rng.normal(size=(48, 60)), 40))
    assert not full.uns["dbk"]["predictions"]["effective_rank"]["low"]
    assert not [r for r in caplog.records if "independent pattern" in r.getMessage()]


def test_spatial_plot_notes_collapsed_predictions():
    rng = np.random.default_rng(2)
    a = _table(rng.normal(size=(36, 1)) @ rng.normal(size=(1, 20)), 30)
    a.obsm["spatial"] = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2) * 10.0
    a.uns["dbk"]["predict"]["effective_rank"] = dbk.tl._effective_rank.rank_record(
        a.obsm["dbk_pred"].to_numpy(), 30, what="test", warn=False)
    fig = dbk.pl.spatial(a, ["g0"], kinds=("predicted",), show=False, return_fig=True)
    texts = [t.get_text() for t in fig.texts]
    assert any("span only 1 independent pattern" in t for t in texts)
    a.uns["dbk"]["predict"]["effective_rank"]["predictions"] = 25
    fig = dbk.pl.spatial(a, ["g0"], kinds=("predicted",), show=False, return_fig=True)
    assert not any("independent pattern" in t.get_text() for t in fig.texts)
