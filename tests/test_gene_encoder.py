from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from dbk.tl import GeneEncoder, GeneVocab

ATOL = 1e-5


def _encoder(genes, seed=0, **kw) -> GeneEncoder:
    torch.manual_seed(seed)
    enc = GeneEncoder(GeneVocab(genes), dim=32, n_layers=2, n_heads=4, **kw)
    # random (not zero-initialised) value MLP so that values matter from the start
    return enc.eval()



GENES = [f"G{i}" for i in range(30)]


def test_vocab_grows_and_roundtrips():
    v = GeneVocab(["A", "B"])
    assert v.add(["B", "C", "A", "D"]) == ["C", "D"]
    assert v.genes == ["A", "B", "C", "D"]
    assert list(v.ids(["D", "X", "A"])) == [3, -1, 0]
    w = GeneVocab.from_dict(v.to_dict())
    assert w == v and w.genes == v.genes
    with pytest.raises(ValueError, match="duplicate"):
        GeneVocab.from_dict({"genes": ["A", "A"]})
    with pytest.raises(TypeError):
        v.add("ABC")


def test_permutation_invariant():
    enc = _encoder(GENES)
    rng = np.random.default_rng(0)
    genes = list(rng.choice(GENES, 20, replace=False))
    vals = rng.uniform(0, 5, 20).astype(np.float32)
    with torch.no_grad():
        ref = enc.encode(genes, vals)
        for seed in range(3):
            p = np.random.default_rng(seed + 1).permutation(20)
            out = enc.encode([genes[i] for i in p], vals[p])
            torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # and it is not trivially constant: other values give another vector
    with torch.no_grad():
        other = enc.encode(genes, vals[::-1].copy())
    assert (other - ref).abs().max() > 1e-3


def test_same_gene_same_embedding_row_across_panels():
    panel_a = ["KRT5", "ERBB2", "CD3E", "EPCAM"]
    panel_b = ["PTPRC", "ERBB2", "MS4A1"]  # another size; ERBB2 at another position
    vocab = GeneVocab(panel_a)
    vocab.add(panel_b)
    enc = GeneEncoder(vocab, dim=16, n_layers=1, n_heads=2).eval()
    row = vocab.ids(["ERBB2"])[0]
    grads = []
    for panel in (panel_a, panel_b):
        tok = enc.tokenize((panel, np.ones(len(panel), np.float32)))
        pos = panel.index("ERBB2")
        assert tok["ids"][0, pos] == row
        enc.zero_grad()
        enc(tok["ids"], tok["values"], tok["mask"]).pow(2).sum().backward()
        g = enc.embedding.weight.grad.abs().sum(1)
        grads.append(g[row].item())
        assert set(torch.nonzero(g).flatten().tolist()) == set(vocab.ids(panel).tolist())
    assert all(g > 0 for g in grads)
    # a one-gene profile is the same vector whichever panel it came from
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(["ERBB2"], [2.0]), enc.encode(["ERBB2"], [2.0]))


def test_subset_panel_encodes():
    enc = _encoder(GENES)
    with torch.no_grad():
        full = enc.encode(GENES, np.arange(30, dtype=np.float32))
        sub = enc.encode(GENES[5:12], np.arange(5, 12, dtype=np.float32))
    assert full.shape == sub.shape == (32,)
    assert torch.isfinite(sub).all()


def test_padding_does_not_change_the_result():
    enc = _encoder(GENES)
    short = pd.Series([1.0, 2.0, 0.5], index=["G3", "G7", "G1"])
    long = pd.Series(np.linspace(0, 3, 25), index=GENES[:25])
    with torch.no_grad():
        alone = enc.encode(list(short.index), short.to_numpy())
        tok = enc.tokenize([long, short, None])
        assert tok["ids"].shape == (3, 25)
        assert tok["has_genes"].tolist() == [True, True, False]
        batch = enc(tok["ids"], tok["values"], tok["mask"])
    torch.testing.assert_close(batch[1], alone, atol=ATOL, rtol=0)
    assert torch.equal(batch[2], torch.zeros(32))  # no genes -> zeros (the caller substitutes its null vector)


def test_gradients_reach_present_genes_only():
    enc = _encoder(GENES).train()
    tok = enc.tokenize([{"G5": 1.0, "G9": 2.0}, {"G9": 0.3, "G20": 1.0, "G21": 4.0, "G22": 0.0}])
    out = enc(tok["ids"], tok["values"], tok["mask"])
    out.pow(2).sum().backward()
    g = enc.embedding.weight.grad
    present = {5, 9, 20, 21, 22}
    for i in range(len(GENES)):
        if i in present:
            assert g[i].abs().sum() > 0, i
        else:
            assert torch.equal(g[i], torch.zeros_like(g[i])), i  # row 0 is the padding id: still exactly zero


def test_vocab_growth_keeps_old_embeddings_and_outputs():
    enc = _encoder(GENES[:10])
    before = enc.embedding.weight.detach().clone()
    with torch.no_grad():
        ref = enc.encode(GENES[:4], [1.0, 2.0, 3.0, 4.0])
    new = enc.add_genes(["G3", "NEW1", "NEW2"])
    assert new == ["NEW1", "NEW2"]
    assert enc.embedding.num_embeddings == 12 and len(enc.value_mean) == 12
    torch.testing.assert_close(enc.embedding.weight[:10], before, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode(GENES[:4], [1.0, 2.0, 3.0, 4.0]), ref, atol=ATOL, rtol=0)
        assert torch.isfinite(enc.encode(["NEW2", "G1"], [1.0, 1.0])).all()
    # a vocabulary grown elsewhere is picked up when tokenizing
    enc.vocab.add(["NEW3"])
    tok = enc.tokenize({"NEW3": 1.0})
    assert enc.embedding.num_embeddings == 13 and tok["ids"][0, 0] == 12


def test_unknown_genes_dropped_with_warning_and_none_known_raises(dbk_log):
    enc = _encoder(GENES)
    with dbk_log.at_level(logging.WARNING, logger="dbk"), torch.no_grad():
        out = enc.encode(["G1", "FOO", "G2", "BAR"], [1.0, 9.0, 2.0, 9.0])
        ref = enc.encode(["G1", "G2"], [1.0, 2.0])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    text = dbk_log.text
    assert "FOO" in text and "BAR" in text
    with pytest.raises(ValueError, match="no gene of the model's vocabulary"):
        enc.encode(["FOO", "BAR"], [1.0, 2.0])


def test_zscore_uses_stored_training_statistics():
    genes = GENES[:6]
    mean = np.linspace(1, 3, 6)
    std = np.linspace(0.5, 2, 6)
    z = _encoder(genes, seed=3, zscore=True)
    z.set_value_stats(genes, mean, std)
    raw = _encoder(genes, seed=3, zscore=False)
    vals = np.array([2.0, 0.0, 5.0, 1.0, 3.0, 2.5], np.float32)
    with torch.no_grad():
        a = z.encode(genes, vals)
        b = raw.encode(genes, ((vals - mean) / std).astype(np.float32))
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert torch.equal(z.value_mean[:6], torch.as_tensor(mean, dtype=torch.float32))  # a buffer: saved with weights
    assert "value_mean" in z.state_dict()


def test_profiles_from_anndata_and_dataframe_respect_the_measured_mask():
    enc = _encoder(GENES)
    x = np.array([[1.0, 0.0, 3.0], [0.0, 2.0, 0.0]], np.float32)
    a = ad.AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=["G1", "G2", "G3"]))
    a.layers["measured"] = sp.csr_matrix(np.array([[1, 1, 1], [0, 1, 1]], np.uint8))
    df = pd.DataFrame([[1.0, 0.0, 3.0], [np.nan, 2.0, 0.0]], columns=["G1", "G2", "G3"])
    with torch.no_grad():
        for obj in (a, df):
            tok = enc.tokenize(obj)
            assert tok["mask"].sum(1).tolist() == [3, 2]
            out = enc(tok["ids"], tok["values"], tok["mask"])
            torch.testing.assert_close(out[1], enc.encode(["G2", "G3"], [2.0, 0.0]), atol=ATOL, rtol=0)
            torch.testing.assert_close(out[0], enc.encode(["G1", "G2", "G3"], x[0]), atol=ATOL, rtol=0)


def test_return_tokens_for_cross_attention():
    enc = _encoder(GENES)
    tok = enc.tokenize([{"G1": 1.0, "G2": 2.0}, {"G3": 1.0}])
    cond, tokens, mask = enc(tok["ids"], tok["values"], tok["mask"], return_tokens=True)
    assert cond.shape == (2, 32) and tokens.shape == (2, 2, 32) and mask.tolist() == [[True, True], [True, False]]
