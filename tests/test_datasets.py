"""dbk.datasets: synthetic slides (ground truth, laziness, reproducibility) and the HEST downloader (offline)."""

from __future__ import annotations

import json
import logging

import dask.array as da
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import spatialdata as sd
import xarray as xr

import dbk
from dbk._constants import (
    CELL_ID_COL,
    CELL_TYPE_COL,
    CELLS_KEY,
    CONTROL_PREFIXES,
    GENE_COL,
    IMAGE_KEY,
    INSTANCE_COL,
    QV_COL,
    REGION_COL,
    TABLE_KEY,
    TRANSCRIPTS_KEY,
)
from dbk._image import get_pixel_size
from dbk.datasets import _hest, _synthetic
from dbk.datasets._slide import SlideModel

SHAPE = (1536, 1536)
CHUNK = 512  # 3 x 3 chunks: seams between chunks are exercised


@pytest.fixture(scope="module")
def slide():
    return dbk.datasets.synthetic(shape=SHAPE, chunk_size=CHUNK, random_state=0)


@pytest.fixture(scope="module")
def pixels(slide):
    return slide.images[IMAGE_KEY]["scale0"]["image"].data.compute()


@pytest.fixture(scope="module")
def transcripts(slide):
    return slide.points[TRANSCRIPTS_KEY].compute()


def _is_control(names: pd.Series) -> np.ndarray:
    return names.astype(str).str.startswith(CONTROL_PREFIXES).to_numpy()


# ---------------------------------------------------------------------------------------------------------- structure
def test_elements_and_coordinates(slide):
    image = slide.images[IMAGE_KEY]
    assert isinstance(image, xr.DataTree)
    level0 = image["scale0"]["image"]
    assert level0.dims == ("c", "y", "x")
    assert level0.shape == (3, *SHAPE)
    assert level0.dtype == np.uint8
    assert list(level0.coords["c"].values) == ["r", "g", "b"]
    assert isinstance(level0.data, da.Array)
    assert level0.data.chunksize == (3, CHUNK, CHUNK)
    assert [image[k]["image"].shape[1] for k in image.children] == [1536, 768, 384]
    assert get_pixel_size(slide, IMAGE_KEY) == pytest.approx(0.5)

    points = slide.points[TRANSCRIPTS_KEY]
    assert isinstance(points, dd.DataFrame)
    assert points.npartitions == 9
    assert points.known_divisions
    assert list(points.columns) == ["x", "y", GENE_COL, QV_COL, CELL_ID_COL]
    assert points[GENE_COL].cat.known
    truth = slide.attrs["dbk_synthetic"]
    assert list(points[GENE_COL].cat.categories) == truth["genes"] + truth["control_probes"]

    cells, table = slide.shapes[CELLS_KEY], slide.tables[TABLE_KEY]
    assert "radius" in cells.columns and cells.index.dtype == np.int64
    assert table.n_obs == len(cells) > 500
    assert list(table.var_names) == truth["genes"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == CELLS_KEY and attrs["region_key"] == REGION_COL
    assert attrs["instance_key"] == INSTANCE_COL
    np.testing.assert_array_equal(table.obs[INSTANCE_COL].to_numpy(), cells.index.to_numpy())
    assert isinstance(table.obs[CELL_TYPE_COL].dtype, pd.CategoricalDtype)
    np.testing.assert_allclose(table.obsm["spatial"][:, 0], cells.geometry.x)
    assert table.uns["synthetic"]["genes"] == truth["genes"]
    for element in (CELLS_KEY, TRANSCRIPTS_KEY):  # every element in image pixels with the same µm scale
        assert set(sd.transformations.get_transformation(slide[element], get_all=True)) == {"global", "um"}


def test_building_computes_nothing(monkeypatch):
    calls = {"render": 0, "transcripts": 0}
    render, transcripts = _synthetic.render_chunk, SlideModel.transcripts

    def counting_render(*args, **kwargs):
        calls["render"] += 1
        return render(*args, **kwargs)

    def counting_transcripts(self, *args, **kwargs):
        calls["transcripts"] += 1
        return transcripts(self, *args, **kwargs)

    monkeypatch.setattr(_synthetic, "render_chunk", counting_render)
    monkeypatch.setattr(SlideModel, "transcripts", counting_transcripts)
    sdata = dbk.datasets.synthetic(shape=(1024, 1024), chunk_size=256, include_cells=False)
    assert calls == {"render": 0, "transcripts": 0}
    sdata.images[IMAGE_KEY]["scale0"]["image"].data.blocks[0, 1, 2].compute()
    sdata.points[TRANSCRIPTS_KEY].partitions[5].compute()
    assert calls == {"render": 1, "transcripts": 1}


def test_huge_slide_skips_cells(monkeypatch, caplog):
    monkeypatch.setattr(_synthetic, "AUTO_MAX_CELLS", 100)
    with caplog.at_level(logging.INFO, logger="dbk"):
        dbk._logging.logger.propagate = True
        try:
            sdata = dbk.datasets.synthetic(shape=(1024, 1024))
        finally:
            dbk._logging.logger.propagate = False
    assert not sdata.shapes and not sdata.tables
    assert "skipping" in caplog.text
    assert sdata.attrs["dbk_synthetic"]["expected_n_cells"] > 100


# ---------------------------------------------------------------------------------------------------- reproducibility
def test_same_seed_same_data_whatever_the_chunking(pixels, transcripts):
    again = dbk.datasets.synthetic(shape=SHAPE, chunk_size=CHUNK, random_state=0)
    np.testing.assert_array_equal(again.images[IMAGE_KEY]["scale0"]["image"].data.compute(), pixels)
    pd.testing.assert_frame_equal(again.points[TRANSCRIPTS_KEY].compute(), transcripts)

    rechunked = dbk.datasets.synthetic(shape=SHAPE, chunk_size=1024, random_state=0)
    np.testing.assert_array_equal(rechunked.images[IMAGE_KEY]["scale0"]["image"].data.compute(), pixels)
    cols = ["x", "y", QV_COL, CELL_ID_COL]
    a = rechunked.points[TRANSCRIPTS_KEY].compute().sort_values(cols).reset_index(drop=True)
    b = transcripts.sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_other_seed_other_data(slide, pixels, transcripts):
    other = dbk.datasets.synthetic(shape=SHAPE, chunk_size=CHUNK, random_state=1)
    other_pixels = other.images[IMAGE_KEY]["scale0"]["image"].data.compute()
    assert np.mean(other_pixels != pixels) > 0.5
    other_tx = other.points[TRANSCRIPTS_KEY].partitions[4].compute()
    assert not np.array_equal(other_tx["x"].to_numpy()[:100], transcripts.loc[other_tx.index[:100], "x"].to_numpy())
    # the biology is the same on every slide: only the tissue changes
    truth, other_truth = slide.attrs["dbk_synthetic"], other.attrs["dbk_synthetic"]
    assert truth["gene_rates"] == other_truth["gene_rates"]
    assert truth["morphology"] == other_truth["morphology"]


def test_pyramid_levels_render_the_same_slide(slide, pixels):
    """Coarser levels are rendered directly, not averaged from level 0, but show the same tissue."""
    level2 = slide.images[IMAGE_KEY]["scale2"]["image"].data.compute().astype(float)
    binned = pixels.astype(float).reshape(3, SHAPE[0] // 4, 4, SHAPE[1] // 4, 4).mean(axis=(2, 4))
    assert np.corrcoef(level2.ravel(), binned.ravel())[0, 1] > 0.9
    assert np.abs(level2.mean(axis=(1, 2)) - binned.mean(axis=(1, 2))).max() < 5


# ------------------------------------------------------------------------------------------------ what the data says
def test_transcripts_in_image_and_tissue(pixels, transcripts):
    x, y = transcripts["x"].to_numpy(), transcripts["y"].to_numpy()
    assert transcripts["x"].dtype == np.float32 and transcripts[CELL_ID_COL].dtype == np.int64
    assert (x >= 0).all() and (x < SHAPE[1]).all() and (y >= 0).all() and (y < SHAPE[0]).all()
    # glass is near-white; tissue is stained
    brightness = pixels.astype(float).mean(axis=0)
    assert (brightness > 228).mean() > 0.2  # there is background around the tissue
    on_tissue = brightness[y.astype(int), x.astype(int)] < 228
    assert on_tissue.mean() > 0.97
    qv = transcripts[QV_COL].to_numpy()
    assert 0.02 < (qv < 20).mean() < 0.2 and qv.max() <= 40
    unassigned = (transcripts[CELL_ID_COL] == -1).mean()
    assert 0.05 < unassigned < 0.3


def test_table_counts_the_assigned_transcripts(slide, transcripts):
    table = slide.tables[TABLE_KEY]
    genes = transcripts[~_is_control(transcripts[GENE_COL]) & (transcripts[CELL_ID_COL] >= 0)]
    counts = genes.groupby([CELL_ID_COL, GENE_COL], observed=True).size().unstack(fill_value=0)
    counts = counts.reindex(index=table.obs[INSTANCE_COL].to_numpy(), columns=table.var_names, fill_value=0)
    np.testing.assert_array_equal(counts.to_numpy(), table.X.toarray())
    # assigned transcripts lie inside their cell's circle
    cells = slide.shapes[CELLS_KEY]
    assigned = transcripts[transcripts[CELL_ID_COL] >= 0]
    centre = cells.loc[assigned[CELL_ID_COL].to_numpy()]
    dist = np.hypot(assigned["x"].to_numpy() - centre.geometry.x.to_numpy(),
                    assigned["y"].to_numpy() - centre.geometry.y.to_numpy())  # fmt: skip
    assert (dist <= centre["radius"].to_numpy() + 1e-3).all()


def test_gene_mix_of_each_type_matches_ground_truth(slide, transcripts):
    truth = slide.attrs["dbk_synthetic"]
    expression = np.asarray(truth["expression"])
    table = slide.tables[TABLE_KEY]
    cell_type = pd.Series(table.obs[CELL_TYPE_COL].to_numpy(), index=table.obs[INSTANCE_COL].to_numpy())
    tx = transcripts[(transcripts[CELL_ID_COL] >= 0) & ~_is_control(transcripts[GENE_COL])]
    tx = tx.assign(cell_type=cell_type.loc[tx[CELL_ID_COL].to_numpy()].to_numpy())
    mix = tx.groupby(["cell_type", GENE_COL], observed=True).size().unstack(fill_value=0)
    checked = 0
    for k, name in enumerate(truth["cell_types"]):
        if name not in mix.index or (cell_type == name).sum() < 30:
            continue
        observed = mix.loc[name].reindex(truth["genes"], fill_value=0).to_numpy(float)
        assert np.corrcoef(observed, expression[k])[0, 1] > 0.9, name
        # and the mean count per cell is the ground truth's (inside fraction, programs average out)
        per_cell = observed.sum() / (cell_type == name).sum()
        assert per_cell == pytest.approx(truth["inside_fraction"] * expression[k].sum(), rel=0.2), name
        checked += 1
    assert checked >= 4
    # marker genes point at their type
    assert truth["cell_types"][int(np.argmax(expression[:, truth["genes"].index("CD3E")]))] == "immune"
    assert truth["cell_types"][int(np.argmax(expression[:, truth["genes"].index("PECAM1")]))] == "endothelial"


def test_control_probes_at_the_stated_rate(slide, transcripts):
    truth = slide.attrs["dbk_synthetic"]
    is_control = _is_control(transcripts[GENE_COL])
    assert is_control.mean() == pytest.approx(truth["control_probe_fraction"], rel=0.2)
    seen = set(transcripts.loc[is_control, GENE_COL].astype(str))
    assert {n.split("_")[0] for n in seen} == {"NegControlProbe", "BLANK", "UnassignedCodeword"}
    assert set(truth["control_probes"]) >= seen
    total = len(transcripts)
    assert total == pytest.approx(truth["expected_n_transcripts"], rel=0.2)


def _cell_features(pixels: np.ndarray, xy: np.ndarray, radius: np.ndarray) -> pd.DataFrame:
    """Per cell, from the image around it: mean colour, share of dark (nuclear) pixels, texture, elongation."""
    img = pixels.astype(np.float32)
    lum = img.mean(axis=0)
    rows = []
    for (x, y), r in zip(xy, radius, strict=True):
        r = int(np.ceil(r))
        y0, y1, x0, x1 = max(0, int(y) - r), int(y) + r + 1, max(0, int(x) - r), int(x) + r + 1
        patch, lpatch = img[:, y0:y1, x0:x1], lum[y0:y1, x0:x1]
        yy, xx = np.nonzero(lpatch < 130)
        elong = 0.0
        if yy.size > 3:
            ev = np.linalg.eigvalsh(np.cov(np.stack([yy, xx])) + 1e-3 * np.eye(2))
            elong = float(np.log(ev[1] / ev[0]))
        rows.append([*patch.reshape(3, -1).mean(axis=1), (lpatch < 130).mean(), lpatch.std(), elong])
    return pd.DataFrame(rows, columns=["r", "g", "b", "dark", "texture", "elongation"])


def test_morphology_shows_the_cell_type(slide, pixels):
    """Colour, darkness, texture and nuclear shape around each cell, from the rendered image, tell types apart."""
    table = slide.tables[TABLE_KEY]
    radius = slide.shapes[CELLS_KEY].loc[table.obs[INSTANCE_COL].to_numpy(), "radius"].to_numpy()
    types = table.obs[CELL_TYPE_COL].to_numpy()
    feats = _cell_features(pixels, table.obsm["spatial"], radius)
    z = (feats - feats.mean()) / feats.std()
    centroids = z.groupby(types).mean()
    assert len(centroids) == 5
    for a in centroids.index:  # every pair of types differs clearly in at least one of these
        for b in centroids.index:
            if a < b:
                assert np.abs(centroids.loc[a] - centroids.loc[b]).max() > 0.4, (a, b)
    assert centroids["dark"].idxmax() == "immune"  # small, packed, very dark nuclei
    assert centroids["elongation"].idxmax() == "fibroblast"  # spindle nuclei
    assert centroids["r"].idxmax() == "endothelial"  # pale lumens and red blood cells
    # a nearest-centroid classifier on these six numbers beats chance (0.2) by far
    dist = ((z.to_numpy()[:, None, :] - centroids.to_numpy()[None]) ** 2).sum(axis=2)
    predicted = centroids.index.to_numpy()[dist.argmin(axis=1)]
    balanced_accuracy = np.mean([(predicted[types == k] == k).mean() for k in centroids.index])
    assert balanced_accuracy > 0.5


# ------------------------------------------------------------------------------------------------------------- panels
def test_panels_share_gene_parameters():
    a = dbk.datasets.synthetic(shape=(256, 256), n_genes=45, random_state=3, include_cells=False)
    b = dbk.datasets.synthetic(
        shape=(256, 256), genes=["SYN0004", "CD3E", "MYGENE", "ERBB2"], random_state=4, include_cells=False
    )
    ta, tb = a.attrs["dbk_synthetic"], b.attrs["dbk_synthetic"]
    assert ta["genes"][:3] == ["ERBB2", "KRT5", "ESR1"] and ta["genes"][40] == "SYN0001"
    assert list(b.points[TRANSCRIPTS_KEY][GENE_COL].cat.categories[:4]) == ["SYN0004", "CD3E", "MYGENE", "ERBB2"]
    for gene in ("SYN0004", "CD3E", "ERBB2"):
        ia, ib = ta["genes"].index(gene), tb["genes"].index(gene)
        assert [row[ia] for row in ta["gene_rates"]] == [row[ib] for row in tb["gene_rates"]]
        assert ta["program_loadings"][ia] == tb["program_loadings"][ib]
    with pytest.raises(ValueError, match="duplicates"):
        dbk.datasets.synthetic(genes=["A", "A"])


# ----------------------------------------------------------------------------------------------------------- patients
PATIENT_KW = {"shape": (1024, 1024), "transcripts_per_cell": 200.0, "patient_shift": 1.0}


@pytest.fixture(scope="module")
def patients():
    """P1 on two tissues (seeds 0, 1), P2 on the tissue of seed 1, and that tissue without a patient."""
    return {
        "p1_s0": dbk.datasets.synthetic(random_state=0, patient="P1", **PATIENT_KW),
        "p1_s1": dbk.datasets.synthetic(random_state=1, patient="P1", **PATIENT_KW),
        "p2_s1": dbk.datasets.synthetic(random_state=1, patient="P2", **PATIENT_KW),
        "none_s1": dbk.datasets.synthetic(random_state=1, shape=(1024, 1024), transcripts_per_cell=200.0),
    }


def test_patient_attrs_and_shifted_genes(patients):
    p1, p2, none = patients["p1_s0"], patients["p2_s1"], patients["none_s1"]
    assert (p1.attrs["patient"], p2.attrs["patient"]) == ("P1", "P2")
    assert "patient" not in none.attrs and "shifted_genes" not in none.attrs["dbk_synthetic"]
    t1, t2 = p1.attrs["dbk_synthetic"], p2.attrs["dbk_synthetic"]
    assert (t1["patient"], t1["patient_shift"]) == ("P1", 1.0)
    shifted = t1["shifted_genes"]
    # the same genes for every slide and patient, in panel order, picked by name: about a fifth of the panel
    assert shifted == t2["shifted_genes"] == patients["p1_s1"].attrs["dbk_synthetic"]["shifted_genes"]
    assert shifted == [g for g in t1["genes"] if g in shifted] and 6 <= len(shifted) <= 20
    other_panel = dbk.datasets.synthetic(shape=(256, 256), n_genes=45, random_state=9, patient="P3", patient_shift=0.5,
                                         include_cells=False)
    assert other_panel.attrs["dbk_synthetic"]["shifted_genes"] == [g for g in shifted if g in t1["genes"][:45]]
    # a larger fraction adds genes without removing any; a list names them; shift 0 shifts none (only a label)
    more = _synthetic._patient_options("P1", 1.0, 0.5, t1["genes"])[2]
    assert set(shifted) < set(more)
    assert _synthetic._patient_options("P1", 0.5, ["CD3E", "ERBB2"], t1["genes"]) == ("P1", 0.5, ["ERBB2", "CD3E"])
    assert _synthetic._patient_options("P1", 0.0, 0.2, t1["genes"]) == ("P1", 0.0, [])
    # the table's ground truth says the same
    assert p1.tables[TABLE_KEY].uns["synthetic"]["shifted_genes"] == shifted


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patient_shift": 0.5}, "needs a patient"),
        ({"patient": "P1", "patient_shift": 1.5}, r"patient_shift must be in \[0, 1\]"),
        ({"patient": "P1", "patient_shift": float("nan")}, "patient_shift"),
        ({"patient": "", "patient_shift": 0.5}, "non-empty"),
        ({"patient": "P1", "patient_shift": 0.5, "shifted_genes": 2.0}, "fraction"),
        ({"patient": "P1", "patient_shift": 0.5, "shifted_genes": "ERBB2"}, "list of genes"),
        ({"patient": "P1", "patient_shift": 0.5, "shifted_genes": ["ERBB2", "NOPE"]}, "NOPE"),
    ],
)
def test_patient_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dbk.datasets.synthetic(shape=(256, 256), include_cells=False, **kwargs)


def test_patient_without_shift_is_the_same_slide(slide, pixels, transcripts):
    labelled = dbk.datasets.synthetic(shape=SHAPE, chunk_size=CHUNK, random_state=0, patient="P1")
    assert labelled.attrs["patient"] == "P1"
    assert labelled.attrs["dbk_synthetic"]["shifted_genes"] == []
    truth = {k: v for k, v in labelled.attrs["dbk_synthetic"].items() if k not in ("patient", "patient_shift",
                                                                                  "shifted_genes")}
    assert truth == slide.attrs["dbk_synthetic"]
    np.testing.assert_array_equal(labelled.images[IMAGE_KEY]["scale0"]["image"].data.compute(), pixels)
    pd.testing.assert_frame_equal(labelled.points[TRANSCRIPTS_KEY].compute(), transcripts)
    assert (labelled.tables[TABLE_KEY].X != slide.tables[TABLE_KEY].X).nnz == 0


def test_patient_shift_changes_only_the_shifted_genes(patients):
    p1, p2, none = patients["p1_s1"], patients["p2_s1"], patients["none_s1"]
    truth = p1.attrs["dbk_synthetic"]
    genes, shifted = truth["genes"], truth["shifted_genes"]
    is_shifted = np.isin(genes, shifted)
    # the H&E does not show the patient: same tissue, same pixels and cells
    np.testing.assert_array_equal(p1.images[IMAGE_KEY]["scale0"]["image"].data.compute(),
                                  p2.images[IMAGE_KEY]["scale0"]["image"].data.compute())
    assert p1.tables[TABLE_KEY].obs[CELL_TYPE_COL].equals(p2.tables[TABLE_KEY].obs[CELL_TYPE_COL])
    # the other genes' counts are exactly those of the slide without a patient
    x = {k: s.tables[TABLE_KEY].X.toarray() for k, s in (("p1", p1), ("p2", p2), ("none", none))}
    np.testing.assert_array_equal(x["p1"][:, ~is_shifted], x["none"][:, ~is_shifted])
    np.testing.assert_array_equal(x["p2"][:, ~is_shifted], x["none"][:, ~is_shifted])
    assert (x["p1"][:, is_shifted] != x["p2"][:, is_shifted]).any(axis=0).all()
    # ground truth: the shifted genes keep their mean rate over the types, but not the types that express them
    e1, e2, e0 = (np.array(s.attrs["dbk_synthetic"]["expression"]) for s in (p1, p2, none))
    np.testing.assert_array_equal(e1[:, ~is_shifted], e0[:, ~is_shifted])
    np.testing.assert_allclose(e1.mean(axis=0), e0.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(e2.mean(axis=0), e0.mean(axis=0), rtol=1e-12)
    log_corr = [np.corrcoef(np.log(e1[:, j]), np.log(e2[:, j]))[0, 1] for j in np.flatnonzero(is_shifted)]
    assert np.median(log_corr) < 0.3


def test_a_model_of_one_patient_fails_on_the_shifted_genes_of_another(patients):
    """Cell type (what the H&E shows) -> mean counts, learnt on P1; scored on a new P1 tissue and on P2's."""

    def table(s):
        t = s.tables[TABLE_KEY]
        return t.X.toarray(), t.obs[CELL_TYPE_COL].cat.codes.to_numpy()

    x_train, types_train = table(patients["p1_s0"])
    type_means = np.array([x_train[types_train == k].mean(axis=0) for k in range(types_train.max() + 1)])

    def per_gene_r(s):
        x, types = table(s)
        pred = type_means[types]
        return np.array([np.corrcoef(pred[:, j], x[:, j])[0, 1] for j in range(x.shape[1])])

    same, other = per_gene_r(patients["p1_s1"]), per_gene_r(patients["p2_s1"])
    genes = patients["p1_s0"].attrs["dbk_synthetic"]["genes"]
    is_shifted = np.isin(genes, patients["p1_s0"].attrs["dbk_synthetic"]["shifted_genes"])
    np.testing.assert_array_equal(same[~is_shifted], other[~is_shifted])  # same tissue, same counts
    assert np.median(same[~is_shifted]) > 0.5
    assert np.median(same[is_shifted]) > 0.4  # within the patient the shifted genes are learnt too
    assert np.median(other[is_shifted]) < 0.1  # across patients they are not
    assert (other[is_shifted] < same[is_shifted] - 0.1).all()


@pytest.mark.slow
@pytest.mark.her2st
def test_her2st_sections_carry_their_patient(her2st_dir):
    slides = dbk.datasets.her2st(["B4", "C2"], path=her2st_dir, download=False)
    assert {k: (s.attrs["sample"], s.attrs["patient"]) for k, s in slides.items()} == {
        "B4": ("B4", "B"),
        "C2": ("C2", "C"),
    }
    # the published design: patient B's one section, patient C's five serial sections
    from dbk.datasets._her2st import HER2ST_PATIENTS, HER2ST_SECTIONS

    assert HER2ST_PATIENTS == {s: s[0] for s in HER2ST_SECTIONS}


# --------------------------------------------------------------------------------------------------------------- io
def test_write_and_read_back(tmp_path):
    sdata = dbk.datasets.synthetic(shape=(512, 512), chunk_size=256, random_state=5)
    path = tmp_path / "synthetic.zarr"
    sdata.write(path)
    back = sd.read_zarr(path)
    assert back.attrs["dbk_synthetic"] == sdata.attrs["dbk_synthetic"]
    np.testing.assert_array_equal(
        back.images[IMAGE_KEY]["scale0"]["image"].data.compute(),
        sdata.images[IMAGE_KEY]["scale0"]["image"].data.compute(),
    )
    pd.testing.assert_frame_equal(
        back.points[TRANSCRIPTS_KEY].compute().reset_index(drop=True),
        sdata.points[TRANSCRIPTS_KEY].compute().reset_index(drop=True),
        check_categorical=False,
    )
    assert (back.tables[TABLE_KEY].X != sdata.tables[TABLE_KEY].X).nnz == 0
    assert back.tables[TABLE_KEY].uns["synthetic"]["genes"].tolist() == sdata.attrs["dbk_synthetic"]["genes"]
    assert get_pixel_size(back, IMAGE_KEY) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------------- HEST
# Downloads go through huggingface_hub.hf_hub_download (dbk.datasets._hest._download); no test touches the network.


def _never_download(*args, **kwargs):
    raise AssertionError("no download expected")


@pytest.fixture(autouse=True)
def _empty_hf_cache(tmp_path_factory, monkeypatch):
    """An empty Hugging Face cache: what the machine's own cache holds must not leak into the tests."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


def test_hest_offline_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(_hest, "_download", _never_download)
    (tmp_path / "wsis").mkdir()
    (tmp_path / "wsis" / "TENX95.tif").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as err:
        dbk.datasets.hest("TENX95", root=tmp_path)
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and str(tmp_path) in msg and "Put these files into that folder" in msg
    for path in ("metadata/TENX95.json", "st/TENX95.h5ad", "transcripts/TENX95_transcripts.parquet"):
        assert str(tmp_path / path) in msg
        assert f"https://huggingface.co/datasets/MahmoodLab/hest/resolve/main/{path}" in msg
    assert "wsis/TENX95.tif" not in msg  # present: not asked for
    assert "snapshot_download('MahmoodLab/hest', repo_type='dataset'" in msg


def test_hest_offline_fails_fast_without_any_network_call(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE=1 and nothing local or cached, hest() raises before huggingface_hub is asked anything."""
    import time

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _never_download)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"3 file\(s\) missing in .* downloads are off \(HF_HUB_OFFLINE='1'\)"):
        dbk.datasets.hest("MEND139", root=tmp_path, load_transcripts=False, load_cells=False)
    assert time.perf_counter() - t0 < 5


def test_hest_offline_with_dbk_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("DBK_OFFLINE", "1")
    monkeypatch.setattr(_hest, "_download", _never_download)
    with pytest.raises(FileNotFoundError, match="DBK_OFFLINE"):
        dbk.datasets.hest("MEND139", root=tmp_path)


def _fake_reader(calls):
    def read_hest(root, sample_id, **kwargs):
        calls.append((root, sample_id, kwargs))
        return "sdata"

    return read_hest


_PATHS = {
    "metadata": "metadata/{}.json",
    "wsis": "wsis/{}.tif",
    "st": "st/{}.h5ad",
    "transcripts": "transcripts/{}_transcripts.parquet",
    "xenium_seg": "xenium_seg/{}_xenium_cell_seg.parquet",
}


def _write_sample(root, sample_id, tech="Xenium", files=("metadata", "wsis", "st", "transcripts", "xenium_seg")):
    for key in files:
        path = root / _PATHS[key].format(sample_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"st_technology": tech}) if key == "metadata" else "x")


def test_hest_present_files_are_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DBK_OFFLINE", raising=False)
    monkeypatch.setattr(_hest, "_download", _never_download)
    calls = []
    monkeypatch.setattr(dbk.io, "read_hest", _fake_reader(calls))
    _write_sample(tmp_path, "TENX95")
    assert dbk.datasets.hest("TENX95", root=tmp_path) == "sdata"
    assert calls == [(tmp_path, "TENX95", {"load_transcripts": True, "load_cells": True})]
    # a Visium sample needs no transcripts, and HF_HUB_OFFLINE does not matter when all is there
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _write_sample(tmp_path, "MEND139", tech="Visium", files=("metadata", "wsis", "st"))
    assert dbk.datasets.hest("MEND139", root=tmp_path) == "sdata"
    # a slide converted to JPEG stands for the TIFF
    _write_sample(tmp_path, "MEND140", tech="Visium", files=("metadata", "st"))
    (tmp_path / "wsis" / "MEND140.jpg").write_bytes(b"x")
    assert dbk.datasets.hest("MEND140", root=tmp_path) == "sdata"


def test_hest_files_in_the_hugging_face_cache_are_found_offline(tmp_path, monkeypatch):
    """A snapshot in the HF cache layout (datasets--MahmoodLab--hest/snapshots/<rev>/...) is used without network."""
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "datasets--MahmoodLab--hest"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    _write_sample(repo / "snapshots" / "0123abcd", "MEND139", tech="Visium", files=("metadata", "wsis", "st"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(_hest, "_download", _never_download)
    calls = []
    monkeypatch.setattr(dbk.io, "read_hest", _fake_reader(calls))
    root = tmp_path / "hest"
    assert dbk.datasets.hest("MEND139", root=root) == "sdata"
    assert calls[0][:2] == (root, "MEND139")
    for key in ("metadata", "wsis", "st"):
        assert (root / _PATHS[key].format("MEND139")).is_file()  # linked into the HEST layout
    assert json.loads((root / "metadata" / "MEND139.json").read_text()) == {"st_technology": "Visium"}


def test_hest_downloads_only_what_is_missing(tmp_path, monkeypatch):
    from huggingface_hub.utils import EntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DBK_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "secret")
    fetched = []

    def fake_download(path, root, *, token, timeout):  # what hf_hub_download(..., local_dir=root) does
        fetched.append(path)
        assert token == "secret" and timeout == 30.0
        if "xenium_seg" in path:
            raise EntryNotFoundError("404 Client Error: Entry Not Found")
        dest = root / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps({"st_technology": "Xenium"}) if dest.suffix == ".json" else "x")
        return dest

    monkeypatch.setattr(_hest, "_download", fake_download)
    monkeypatch.setattr(dbk.io, "read_hest", _fake_reader([]))
    _write_sample(tmp_path, "TENX95", files=("wsis",))
    dbk.datasets.hest("TENX95", root=tmp_path)
    assert fetched == [
        "metadata/TENX95.json",
        "st/TENX95.h5ad",
        "transcripts/TENX95_transcripts.parquet",
        "xenium_seg/TENX95_xenium_cell_seg.parquet",  # optional: its 404 is not an error
    ]


def test_hest_refused_or_unreachable_download_says_why(tmp_path, monkeypatch):
    from huggingface_hub.utils import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DBK_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

    class Refused(Exception):  # as huggingface_hub's HTTP errors: the response's status code
        response = type("Response", (), {"status_code": 401})()

    def refuse(path, root, *, token, timeout):
        raise Refused("401 Client Error")

    monkeypatch.setattr(_hest, "_download", refuse)
    with pytest.raises(ConnectionError, match="gated.*no token was found") as err:
        dbk.datasets.hest("NCBI783", root=tmp_path)
    assert str(tmp_path / "wsis" / "NCBI783.tif") in str(err.value)

    def unreachable(path, root, *, token, timeout):
        raise LocalEntryNotFoundError("Cannot reach the hub")

    monkeypatch.setattr(_hest, "_download", unreachable)
    with pytest.raises(ConnectionError, match="the hub cannot be reached and the file is not cached"):
        dbk.datasets.hest("NCBI783", root=tmp_path)


def test_hest_download_calls_hf_hub_download_into_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        seen.update(repo_id=repo_id, filename=filename, **kwargs)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    out = _hest._download("st/X.h5ad", tmp_path, token="t", timeout=7.0)
    assert out == tmp_path / "st/X.h5ad"
    assert seen == {"repo_id": "MahmoodLab/hest", "filename": "st/X.h5ad", "repo_type": "dataset",
                    "local_dir": tmp_path, "token": "t", "etag_timeout": 7.0}
