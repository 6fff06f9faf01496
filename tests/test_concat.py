"""pp.concat keeps the obsm entries every input has: arrays stacked, prediction frames on the union of genes."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import dbk


def _table(genes, counts, sample):
    n = len(counts)
    a = ad.AnnData(X=sp.csr_matrix(np.log1p(counts).astype(np.float32)), var=pd.DataFrame(index=genes),
                   obs=pd.DataFrame({"sample": sample}, index=[f"t{i}" for i in range(n)]))
    a.layers["counts"] = sp.csr_matrix(counts)
    a.obsm["spatial"] = np.arange(2 * n, dtype=float).reshape(n, 2) + (100 if sample == "s2" else 0)
    return a


def test_concat_stacks_arrays_and_prediction_frames():
    a = _table(["A", "B", "C"], np.array([[1, 0, 2], [3, 4, 0]]), "s1")
    b = _table(["B", "D"], np.array([[5, 6], [0, 7], [8, 0]]), "s2")
    a.obsm["X_fm"] = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b.obsm["X_fm"] = np.array([[7.0, 8.0, 9.0], [10.0, 11.0, 12.0], [13.0, 14.0, 15.0]])
    a.obsm["X_sparse"] = sp.csr_matrix(np.eye(2, 4))
    b.obsm["X_sparse"] = sp.csr_matrix(np.eye(3, 4))
    # the two models predicted different genes (A, B vs B, D)
    a.obsm["dbk_pred"] = pd.DataFrame({"A": [0.1, 0.2], "B": [0.3, 0.4]}, index=a.obs_names)
    b.obsm["dbk_pred"] = pd.DataFrame({"B": [1.0, 2.0, 3.0], "D": [4.0, 5.0, 6.0]}, index=b.obs_names)
    a.obsm["only_in_a"] = np.ones((2, 1))

    out = dbk.pp.concat({"s1": a, "s2": b})

    assert set(out.obsm) == {"spatial", "X_fm", "X_sparse", "dbk_pred"}  # only_in_a is not in every input
    np.testing.assert_array_equal(out.obsm["spatial"], np.vstack([a.obsm["spatial"], b.obsm["spatial"]]))
    np.testing.assert_array_equal(out.obsm["X_fm"], np.arange(1, 16).reshape(5, 3))
    assert sp.issparse(out.obsm["X_sparse"])
    np.testing.assert_array_equal(out.obsm["X_sparse"].toarray(), np.vstack([np.eye(2, 4), np.eye(3, 4)]))
    pred = out.obsm["dbk_pred"]
    assert isinstance(pred, pd.DataFrame)
    assert list(pred.index) == list(out.obs_names) == ["s1:t0", "s1:t1", "s2:t0", "s2:t1", "s2:t2"]
    assert list(pred.columns) == ["A", "B", "D"]  # union, in order of first appearance
    np.testing.assert_array_equal(pred.to_numpy(), [[0.1, 0.3, np.nan], [0.2, 0.4, np.nan], [np.nan, 1.0, 4.0],
                                                    [np.nan, 2.0, 5.0], [np.nan, 3.0, 6.0]])
    # inputs untouched
    assert list(a.obsm["dbk_pred"].columns) == ["A", "B"] and list(a.obsm["dbk_pred"].index) == ["t0", "t1"]
    # the result writes to h5ad-compatible slots and slices like any AnnData
    sub = out[out.obs["sample"] == "s2"]
    assert sub.obsm["dbk_pred"].loc["s2:t1", "D"] == 5.0


def test_concat_leaves_out_mismatched_arrays_with_a_warning(caplog):
    a = _table(["A"], np.array([[1], [2]]), "s1")
    b = _table(["A"], np.array([[3]]), "s2")
    a.obsm["X_fm"] = np.zeros((2, 3))
    b.obsm["X_fm"] = np.zeros((1, 5))  # embeddings of another model width
    a.obsm["mixed"] = np.zeros((2, 1))
    b.obsm["mixed"] = pd.DataFrame({"x": [1.0]}, index=b.obs_names)
    with caplog.at_level(logging.WARNING, logger="dbk"):
        out = dbk.pp.concat([a, b])
    assert set(out.obsm) == {"spatial"}
    assert "obsm['X_fm'] has different shapes" in caplog.text
    assert "obsm['mixed'] is a DataFrame in some tables" in caplog.text


def test_concat_carries_the_slides_patients_into_obs():
    from spatialdata import SpatialData

    slides = {}
    for name, patient in (("s1", "P1"), ("s2", "P2"), ("s3", None)):
        sd = SpatialData(tables={"dbk_table": _table(["A", "B"], np.array([[1, 2], [3, 4]]), name)})
        if patient is not None:
            sd.attrs["patient"] = patient
        slides[name] = sd
    out = dbk.pp.concat(slides)
    assert isinstance(out.obs["patient"].dtype, pd.CategoricalDtype)
    assert out.obs["patient"].tolist()[:4] == ["P1", "P1", "P2", "P2"]
    assert out.obs["patient"].iloc[4:].isna().all()  # unknown stays missing, not the string "nan"
    assert "patient" not in slides["s1"].tables["dbk_table"].obs  # the inputs are not modified
    # a table's own obs["patient"] wins over the slide's attrs; AnnData inputs have no attrs to read
    own = _table(["A"], np.array([[1]]), "s4")
    own.obs["patient"] = "tableP"
    sd = SpatialData(tables={"dbk_table": own})
    sd.attrs["patient"] = "attrsP"
    assert dbk.pp.concat({"s4": sd}).obs["patient"].tolist() == ["tableP"]
    assert "patient" not in dbk.pp.concat({"s1": _table(["A"], np.array([[1]]), "s1")}).obs
