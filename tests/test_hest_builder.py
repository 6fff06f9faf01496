"""HEST samples built from ST sections (dbk.datasets.hest_from_her2st) read back as what they were built from.

The first tests need no data: a tiny ST section in her2st's layout, written as a HEST sample by the builder's own
writer, and the builder's rules on files that are there already (never replace what dbk did not write, leave a
complete sample as it is, finish an interrupted build). The last test builds real her2st sections (skipped without
the local copy beside the checkout).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

import dbk
from dbk.datasets import _hest_local
from dbk.datasets._hest_local import HER2ST_HEST_IDS, file_owners, her2st_hest_metadata, write_st_as_hest

PIXEL_SIZE = 1.5  # µm/px of the tiny section: 200 µm pitch = 133.3 px
PITCH_PX = 200.0 / PIXEL_SIZE
HEST_KEYS = ("id", "patient", "st_technology", "pixel_size_um_estimated", "spot_diameter", "inter_spot_dist",
             "species", "organ", "oncotree_code", "license", "dataset_title")


def _write_st_section(folder, *, nx=7, ny=6, seed=0):
    """A legacy ST section in her2st's layout: 1k array, spots on a 200 µm pitch, a PNG (lossless) H&E."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows = [{"x": x, "y": y, "new_x": x + 0.01, "new_y": y - 0.01, "pixel_x": 60 + PITCH_PX * (x + 0.01),
             "pixel_y": 40 + PITCH_PX * (y - 0.01), "selected": 1} for x in range(1, nx + 1) for y in range(1, ny + 1)]
    spots = pd.DataFrame(rows)
    spots.to_csv(folder / "spot_selection.tsv", sep="\t", index=False)
    keys = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    counts = pd.DataFrame(rng.poisson(3.0, (len(keys), 5)), index=keys, columns=["ERBB2", "KRT5", "CD3E", "A", "B"])
    counts.to_csv(folder / "counts.tsv", sep="\t")
    h, w = int(spots["pixel_y"].max()) + 90, int(spots["pixel_x"].max()) + 110
    yy, xx = np.mgrid[0:h, 0:w]
    he = np.stack([200 - (xx % 37), 120 + (yy % 53), 180 + ((xx + yy) % 29)], axis=-1).astype(np.uint8)
    Image.fromarray(he).save(folder / "he.png")
    return he


def _metadata(sample_id="TINYST1", patient="Patient Z"):
    return {"id": sample_id, "patient": patient, "st_technology": "Spatial Transcriptomics",
            "pixel_size_um_estimated": PIXEL_SIZE, "spot_diameter": 100.0, "inter_spot_dist": 200.0,
            "species": "Homo sapiens", "organ": "Breast", "oncotree_code": "IDC", "license": "CC BY 4.0",
            "dataset_title": "a tiny section"}


def _record():
    return {"builder": "tests/test_hest_builder.py", "dbk_version": "test"}


@pytest.fixture
def section(tmp_path):
    he = _write_st_section(tmp_path / "S1")
    sdata = dbk.io.read_st_folder(tmp_path / "S1", pixel_size_um=PIXEL_SIZE)
    return sdata, he


def _level0(sdata):
    import xarray as xr
    from spatialdata import get_pyramid_levels

    image = sdata.images["he"]
    image = image if isinstance(image, xr.DataArray) else get_pyramid_levels(image, n=0)
    return np.moveaxis(np.asarray(image.transpose("c", "y", "x")), 0, -1)


def _assert_same_spots(hest, st, *, atol_px=1e-6):
    """Spots, counts and genes of read_hest's table are those of read_st's; pixel positions within atol_px."""
    a, b = hest.tables["table"], st.tables["table"]
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    assert (a.layers["counts"] != b.layers["counts"]).nnz == 0
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"], atol=atol_px, rtol=0)
    centres = np.column_stack([hest.shapes["spots"].geometry.x, hest.shapes["spots"].geometry.y])
    np.testing.assert_allclose(centres, b.obsm["spatial"], atol=atol_px, rtol=0)


# ---- the writer on a tiny section ----------------------------------------------------------------------------------


def test_a_written_st_section_reads_back_as_the_st_folder(section, tmp_path):
    st, he = section
    root = tmp_path / "hest"
    write_st_as_hest(st, root, "TINYST1", metadata=_metadata(), record=_record())

    hest = dbk.io.read_hest(root, "TINYST1")
    _assert_same_spots(hest, st)
    assert hest.attrs["patient"] == "Patient Z" and hest.attrs["sample"] == "TINYST1"
    assert dbk.io.get_pixel_size(hest) == pytest.approx(PIXEL_SIZE)
    # spot circles of 100 µm
    assert float(hest.shapes["spots"]["radius"].iloc[0]) == pytest.approx(50.0 / PIXEL_SIZE)
    # the image, lossless, with its halving as a second level
    np.testing.assert_array_equal(_level0(hest), he)
    assert list(hest.images["he"].children) == ["scale0", "scale1"]

    # HEST's layout and names
    adata = __import__("anndata").read_h5ad(root / "st" / "TINYST1.h5ad")
    assert {"in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"} <= set(adata.obs)
    b = st.tables["table"]
    np.testing.assert_array_equal(adata.obs["array_col"], b.obs["array_x"])
    np.testing.assert_array_equal(adata.obs["array_row"], b.obs["array_y"])
    np.testing.assert_allclose(adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]], b.obsm["spatial"])
    assert adata.uns["spatial"]["ST"]["images"]["downscaled_fullres"].shape[:2] == (
        round(he.shape[0] * 1000 / max(he.shape[:2])), 1000)
    meta = json.loads((root / "metadata" / "TINYST1.json").read_text())
    assert {k: meta[k] for k in HEST_KEYS} == _metadata()
    assert meta["dbk_built_from"]["builder"] == "tests/test_hest_builder.py"
    with tifffile.TiffFile(root / "wsis" / "TINYST1.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert page.resolution[0] == pytest.approx(1e4 / PIXEL_SIZE)  # pixels per cm, as HEST writes them
        assert page.software.startswith("dbk ")
        # the halved level is a reduced-resolution page (libvips' pyramid layout), one series with two levels
        assert len(tif.pages) == 2 and tif.pages[1].is_reduced and tif.pages[1].is_tiled
        assert [lvl.shape[:2] for lvl in tif.series[0].levels] == [he.shape[:2], (he.shape[0] // 2, he.shape[1] // 2)]
    openslide = pytest.importorskip("openslide", reason="OpenSlide (the lazyslide extra) reads the pyramid")
    with openslide.OpenSlide(root / "wsis" / "TINYST1.tif") as slide:  # as LazySlide and HEST's readers open it
        assert slide.level_count == 2 and slide.level_downsamples[1] == pytest.approx(2, rel=0.01)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(PIXEL_SIZE)


def test_the_writer_never_replaces_a_file_it_did_not_write(section, tmp_path):
    st, _ = section
    root = tmp_path / "hest"
    (root / "st").mkdir(parents=True)
    foreign = root / "st" / "TINYST1.h5ad"
    foreign.write_bytes(b"someone else's file")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"TINYST1\.h5ad exists and was not written by dbk"):
            write_st_as_hest(st, root, "TINYST1", metadata=_metadata(), record=_record(), overwrite=overwrite)
    assert foreign.read_bytes() == b"someone else's file"
    assert not (root / "wsis").exists() and not (root / "metadata").exists()

    write_st_as_hest(st, root, "TINYST2", metadata=_metadata("TINYST2"), record=_record())
    with pytest.raises(FileExistsError, match="written by dbk.*overwrite=True"):
        write_st_as_hest(st, root, "TINYST2", metadata=_metadata("TINYST2"), record=_record())
    write_st_as_hest(st, root, "TINYST2", metadata=_metadata("TINYST2", patient="P2"), record=_record(),
                     overwrite=True)
    assert dbk.io.read_hest(root, "TINYST2").attrs["patient"] == "P2"
    assert sorted(p.name for p in root.rglob("*") if p.name.startswith(".")) == []  # no temporary file left


# ---- the builder's rules on what is there (no her2st data needed) ----------------------------------------------------


@pytest.fixture
def fake_her2st(section, monkeypatch):
    """dbk.datasets.her2st returning the tiny section for any section name (counts the calls)."""
    st, _ = section
    calls = []

    def her2st(names, path=None, **kwargs):
        calls.append((list(names), path))
        return {n: st for n in names}

    monkeypatch.setattr(dbk.datasets._her2st, "her2st", her2st)
    return calls


def _hub_like_sample(root, sid):
    """Three files as a download from the hub would put them (no dbk record)."""
    for rel, content in ((f"st/{sid}.h5ad", b"hub h5ad"), (f"wsis/{sid}.tif", b"hub tif"),
                         (f"metadata/{sid}.json", json.dumps({"id": sid}).encode())):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)


def test_builder_writes_reads_back_and_then_leaves_the_sample_alone(fake_her2st, section, tmp_path, monkeypatch,
                                                                   dbk_log):
    dbk_log.set_level(logging.INFO, logger="dbk")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DBK_HER2ST", str(tmp_path / "her2st_copy"))
    root = tmp_path / "hest"
    built = dbk.datasets.hest_from_her2st(["B4", "SPA141"], root=root)  # a section name or its HEST id
    assert list(built.index) == ["SPA145", "SPA141"] and list(built["section"]) == ["B4", "C2"]
    assert list(built["status"]) == ["built", "built"]
    assert list(built["patient"]) == ["Patient B", "Patient C"]
    assert built.loc["SPA145", "pixel_size_um"] == pytest.approx(0.6888828977730672)  # HEST's, not the file's
    # path=None: dbk.datasets.her2st itself reads $DBK_HER2ST (tests/test_datasets_registry.py)
    assert fake_her2st == [(["B4"], None), (["C2"], None)]
    # (the tiny section is not B4: the builder says its spots, genes and size differ from HEST's table)
    assert any("HEST's table says 283 for SPA145" in r.getMessage() for r in dbk_log.records)

    slides = dbk.datasets.hest(["SPA145", "SPA141"], root=root)  # offline: the files are there
    assert list(slides) == ["SPA145", "SPA141"]
    assert slides["SPA145"].attrs["patient"] == "Patient B"
    assert slides["SPA141"].attrs["hest_metadata"]["subseries"] == "C2"
    assert dbk.io.get_pixel_size(slides["SPA141"]) == pytest.approx(0.6961064252183218)
    _assert_same_spots(slides["SPA145"], section[0])
    assert all(o == "dbk" for o in file_owners(root, "SPA145").values())

    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = dbk.datasets.hest_from_her2st(["B4", "C2"], root=root)
    assert list(again["status"]) == ["present", "present"] and again["pixel_size_um_dbk"].isna().all()
    assert len(fake_her2st) == 2  # nothing read
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes

    rebuilt = dbk.datasets.hest_from_her2st("B4", root=root, overwrite=True)  # dbk's own files: replaced
    assert list(rebuilt["status"]) == ["built"] and len(fake_her2st) == 3


def test_builder_leaves_hub_files_alone_and_will_not_mix_them(fake_her2st, tmp_path):
    root = tmp_path / "hest"
    _hub_like_sample(root, "SPA145")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    kept = dbk.datasets.hest_from_her2st(["B4"], root=root)  # complete: left as it is, nothing read
    assert list(kept["status"]) == ["present"] and fake_her2st == []
    with pytest.raises(FileExistsError, match=r"metadata/SPA145\.json, which dbk did not write.*overwrite=True"):
        dbk.datasets.hest_from_her2st(["B4"], root=root, overwrite=True)
    (root / "wsis" / "SPA145.tif").rename(tmp_path / "moved.tif")  # an incomplete download
    del before[root / "wsis" / "SPA145.tif"]
    with pytest.raises(FileExistsError, match=r"incomplete \(no wsis/SPA145\.tif\).*neither replaces"):
        dbk.datasets.hest_from_her2st(["B4"], root=root)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before and fake_her2st == []


def test_an_interrupted_build_leaves_no_temporary_file_and_is_finished_next_time(fake_her2st, tmp_path,
                                                                                 monkeypatch):
    root = tmp_path / "hest"

    def broken(*args, **kwargs):
        raise OSError("disk full")

    real = _hest_local.write_pyramid_tiff
    monkeypatch.setattr(_hest_local, "write_pyramid_tiff", broken)
    with pytest.raises(OSError, match="disk full"):
        dbk.datasets.hest_from_her2st(["C6"], root=root)
    assert file_owners(root, "SPA137") == {"st/SPA137.h5ad": "dbk", "wsis/SPA137.tif": None,
                                           "metadata/SPA137.json": None}
    assert [p.name for p in root.rglob(".*")] == []

    monkeypatch.setattr(_hest_local, "write_pyramid_tiff", real)
    done = dbk.datasets.hest_from_her2st(["C6"], root=root)  # dbk's own partial files: written again
    assert list(done["status"]) == ["built"]
    assert set(file_owners(root, "SPA137").values()) == {"dbk"}


def test_unknown_sections_are_named():
    with pytest.raises(ValueError, match=r"Unknown her2st section\(s\) \['A1'\].*B4 \(SPA145\)"):
        dbk.datasets.hest_from_her2st(["A1"])


# ---- dbk.datasets.hest: lists, and what it says offline ------------------------------------------------------------


def test_hest_offline_names_the_builder_for_her2st_samples_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        dbk.datasets.hest(["SPA145", "SPA141"], root=tmp_path)
    msg = str(err.value)
    assert "HEST samples ['SPA145', 'SPA141']: 10 file(s) missing" in msg  # 2 x 3, + 2 x 2 of Xenium samples
    assert f"dbk.datasets.hest_from_her2st(['B4', 'C2'], root={str(tmp_path)!r})" in msg
    assert "SPA145 = her2st B4, SPA141 = her2st C2" in msg
    with pytest.raises(FileNotFoundError) as err:
        dbk.datasets.hest(["MEND139"], root=tmp_path)
    assert "hest_from_her2st" not in str(err.value)
    with pytest.raises(ValueError, match="at least one HEST sample id"):
        dbk.datasets.hest([], root=tmp_path)


def test_hest_of_a_st_sample_does_not_look_for_transcripts(section, tmp_path, monkeypatch, dbk_log):
    """No info line naming the missing transcripts file (a machine path) for a sample that cannot have one."""
    dbk_log.set_level(logging.INFO, logger="dbk")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st, _ = section
    write_st_as_hest(st, tmp_path, "TINYST1", metadata=_metadata(), record=_record())
    one = dbk.datasets.hest("TINYST1", root=tmp_path)
    assert one.tables["table"].n_obs == st.tables["table"].n_obs and "transcripts" not in one.points
    assert not [r for r in dbk_log.records if "transcripts" in r.getMessage() or "cell segmentation" in
                r.getMessage()]


# ---- the real her2st sections --------------------------------------------------------------------------------------


@pytest.mark.her2st
@pytest.mark.slow
def test_built_her2st_samples_are_the_her2st_sections(her2st_dir, tmp_path):
    """B4 and C3 (the section whose HEST pixel size differs most from dbk's): spots, counts, positions, image."""
    root = tmp_path / "hest"
    built = dbk.datasets.hest_from_her2st(["B4", "C3"], path=her2st_dir, root=root)
    slides = dbk.datasets.hest(["SPA145", "SPA140"], root=root)
    sections = dbk.datasets.her2st(["B4", "C3"], path=her2st_dir)
    for sid, name in (("SPA145", "B4"), ("SPA140", "C3")):
        hest, st, meta = slides[sid], sections[name], her2st_hest_metadata(name)
        _assert_same_spots(hest, st)
        assert hest.attrs["patient"] == meta["patient"] == f"Patient {st.attrs['patient']}"
        t = hest.tables["table"]
        assert (t.n_obs, t.n_vars) == (meta["spots_under_tissue"], meta["nb_genes"])  # HEST's table agrees
        assert _level0(hest).shape == (meta["fullres_px_height"], meta["fullres_px_width"], 3)
        crop = (slice(4000, 4600), slice(3000, 3700))
        np.testing.assert_array_equal(_level0(hest)[crop], _level0(st)[crop])  # lossless
        assert dbk.io.get_pixel_size(hest) == pytest.approx(meta["pixel_size_um_estimated"])
        # HEST's estimate and dbk's from the spot pitch agree within 3%
        assert built.loc[sid, "pixel_size_um_dbk"] == pytest.approx(dbk.io.get_pixel_size(st))
        assert abs(built.loc[sid, "pixel_size_um"] / built.loc[sid, "pixel_size_um_dbk"] - 1) < 0.03
    assert set(HER2ST_HEST_IDS.values()) == {"SPA137", "SPA138", "SPA139", "SPA140", "SPA141", "SPA145"}
