"""Spot data as users bring it (issue 14): legacy ST 2k arrays, plausibility of the pixel size, bad counts values,
an optional pixel size, STUtility folders and 3 x 3 alignment matrices. Every test writes its own tiny data."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dbk

GENES = ["A", "B", "C"]


def _grid(array: str, xs: range, ys: range) -> np.ndarray:
    """Integer array positions of an array's spots in a window: all for 1k, x + y even for 2k and Visium."""
    pos = np.array([(x, y) for x in xs for y in ys], dtype=np.int64)
    if array in ("2k", "visium"):
        pos = pos[(pos.sum(axis=1) % 2) == 0]
    return pos


def _spot_table(
    pos: np.ndarray,
    *,
    step_um: tuple[float, float],
    pixel_size_um: float,
    angle_deg: float = 1.5,
    stretch_y: float = 1.0,
    offset: tuple[float, float] = (60.0, 40.0),
    seed: int = 0,
) -> pd.DataFrame:
    """A spot-detector table: pixel centres of ``pos`` at ``step_um`` per index step, slightly rotated and jittered."""
    rng = np.random.default_rng(seed)
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    detected = pos + rng.normal(0.0, 0.01, pos.shape)  # the spot detector's new_x, new_y
    um = detected * np.asarray(step_um) * np.array([1.0, stretch_y])
    um = um - um.min(axis=0)
    pixel = um @ rot.T / pixel_size_um + np.asarray(offset) + 30.0
    return pd.DataFrame(
        {
            "x": pos[:, 0],
            "y": pos[:, 1],
            "new_x": detected[:, 0],
            "new_y": detected[:, 1],
            "pixel_x": pixel[:, 0],
            "pixel_y": pixel[:, 1],
            "selected": 1,
        }
    )


def _counts_for(spots: pd.DataFrame) -> pd.DataFrame:
    keys = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    values = (np.arange(len(keys) * len(GENES)).reshape(len(keys), len(GENES)) % 7).astype(np.int64)
    return pd.DataFrame(values, index=keys, columns=GENES)


def _image_for(spots: pd.DataFrame, path: Path, margin: int = 150) -> None:
    w = int(spots["pixel_x"].max()) + margin
    h = int(spots["pixel_y"].max()) + margin
    Image.fromarray(np.full((h, w, 3), 225, np.uint8)).save(path)


def _write_her2st_folder(folder: Path, spots: pd.DataFrame) -> pd.DataFrame:
    folder.mkdir(parents=True)
    spots.to_csv(folder / "spot_selection.tsv", sep="\t", index=False)
    counts = _counts_for(spots)
    counts.to_csv(folder / "counts.tsv", sep="\t")
    _image_for(spots, folder / "he.jpg")
    return counts


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


# ---- 1. the array and the pixel size -----------------------------------------------------------------------------


def test_2k_array_gets_the_right_pixel_size_and_1k_reading_is_refused(tmp_path):
    """A whole legacy ST 2k array (x + y even on 67 x 64, 100 µm per step) at 4.4 µm/px, as in the issue."""
    spots = _spot_table(_grid("2k", range(1, 68), range(1, 65)), step_um=(100.0, 100.0), pixel_size_um=4.4)
    _write_her2st_folder(tmp_path / "brain", spots)

    with pytest.warns(UserWarning, match=r"112 µm tile .* is only 25 px across") as record:
        sdata = dbk.io.read_st_folder(tmp_path / "brain")
    ours = [w for w in record if issubclass(w.category, UserWarning)
            and not issubclass(w.category, (DeprecationWarning, FutureWarning))]  # not pandas' / anndata's notices
    assert len(ours) == 1, [str(w.message) for w in ours]  # the coarse image is flagged; nothing else is
    ps = dbk.io.get_pixel_size(sdata)
    assert ps == pytest.approx(4.4, rel=0.02)  # not 8.8, the 200 µm pitch of a 1k array
    fit = sdata.attrs["dbk_pixel_size_fit"]
    assert fit["array"] == "2k" and fit["step_um_x"] == fit["step_um_y"] == 100.0
    assert "checkerboard" in fit["array_reason"]
    assert fit["span_mm"] == pytest.approx([6.6, 6.3], rel=0.02)
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 50.0 / ps)

    # told it is a 1k array, the estimate (8.8 µm/px) would put the spots over 13 x 13 mm: refused, with numbers
    with (
        pytest.warns(UserWarning, match="look like a 2k array"),
        pytest.raises(ValueError, match=r"span 13\.\d+ x 12\.\d+ mm, more than the 6\.5 x 6\.9 mm capture area"),
    ):
        dbk.io.read_st_folder(tmp_path / "brain", array="1k")
    # ... and a spot pitch given by hand is honoured (a warning, not an error: the array may be one dbk lacks)
    with pytest.warns(UserWarning, match="more than the 6.5 x 6.9 mm capture area"):
        fit200 = dbk.io.estimate_pixel_size(spots, spot_pitch_um=200.0)
    assert fit200["pixel_size_um"] == pytest.approx(8.8, rel=0.02)


def test_2k_array_at_fine_resolution_reads_without_warnings(tmp_path, no_warnings):
    spots = _spot_table(_grid("2k", range(20, 41), range(15, 36)), step_um=(100.0, 100.0), pixel_size_um=1.5)
    counts = _write_her2st_folder(tmp_path / "S2k", spots)
    sdata = dbk.io.read_st_folder(tmp_path / "S2k")
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(1.5, rel=0.02)
    assert sdata.attrs["dbk_pixel_size_fit"]["array"] == "2k"
    table = sdata.tables["table"]
    assert table.n_obs == len(spots)
    np.testing.assert_array_equal(table.X.toarray(), counts.loc[table.obs_names].to_numpy())
    # array="2k" or spot_pitch_um=100 say the same thing
    for kwargs in ({"array": "2k"}, {"spot_pitch_um": 100.0}):
        assert dbk.io.estimate_pixel_size(spots, **kwargs)["pixel_size_um"] == pytest.approx(1.5, rel=0.02)


def test_1k_estimate_is_unchanged(tmp_path, no_warnings):
    """On a 1k array the estimate is what it always was: 200 µm / sqrt(|det A|) of the affine fit."""
    spots = _spot_table(_grid("1k", range(3, 12), range(5, 13)), step_um=(200.0, 200.0), pixel_size_um=1.5)
    _write_her2st_folder(tmp_path / "S1k", spots)
    sdata = dbk.io.read_st_folder(tmp_path / "S1k")
    design = np.column_stack([spots[["new_x", "new_y"]].to_numpy(), np.ones(len(spots))])
    coef, *_ = np.linalg.lstsq(design, spots[["pixel_x", "pixel_y"]].to_numpy(), rcond=None)
    before = 200.0 / np.sqrt(abs(np.linalg.det(coef[:2])))  # the formula of the reader before 2k arrays
    ps = dbk.io.get_pixel_size(sdata)
    assert ps == pytest.approx(before, rel=1e-12)
    assert ps == pytest.approx(1.5, rel=0.02)
    fit = sdata.attrs["dbk_pixel_size_fit"]
    assert fit["array"] == "1k" and fit["spot_pitch_um"] == 200.0 and "both parities" in fit["array_reason"]
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 50.0 / ps)


@pytest.mark.parametrize("x_is_row", [False, True])
def test_visium_indices_are_detected_with_their_axes(x_is_row, no_warnings):
    pos = _grid("visium", range(10, 60), range(5, 30))  # x = array column (50 µm), y = array row (86.6 µm)
    step = (50.0, 50.0 * np.sqrt(3.0))
    if x_is_row:
        pos, step = pos[:, ::-1].copy(), step[::-1]
    spots = _spot_table(pos, step_um=step, pixel_size_um=0.5, angle_deg=-0.7)
    fit = dbk.io.estimate_pixel_size(spots)
    assert fit["array"] == "visium"
    assert fit["pixel_size_um"] == pytest.approx(0.5, rel=0.02)
    assert fit["pixel_size_um_x"] == pytest.approx(fit["pixel_size_um_y"], rel=0.02)


def test_x_and_y_pitch_disagreeing_is_a_warning_with_numbers():
    spots = _spot_table(_grid("1k", range(1, 15), range(1, 15)), step_um=(200, 200), pixel_size_um=2.0, stretch_y=1.1)
    with pytest.warns(UserWarning, match=r"x axis \(2\.0\d+ µm/px\) and y axis \(1\.8\d+ µm/px\) differ by 10\.0%"):
        fit = dbk.io.estimate_pixel_size(spots, name="stretched")
    assert fit["pixel_size_um"] == pytest.approx(2.0 / np.sqrt(1.1), rel=0.01)


def test_a_given_pixel_size_too_large_for_any_slide_is_flagged(tmp_path):
    spots = _spot_table(_grid("1k", range(1, 20), range(1, 20)), step_um=(200, 200), pixel_size_um=1.5)
    _write_her2st_folder(tmp_path / "S", spots)
    with pytest.warns(UserWarning) as record:
        sdata = dbk.io.read_st_folder(tmp_path / "S", pixel_size_um=4.0)  # the truth is 1.5
    messages = [str(w.message) for w in record]
    assert any(
        re.search(r"given 4 µm/px the spots span 9\.\d+ x 9\.\d+ mm, more than any ST/Visium", m) for m in messages
    )
    assert any("is only 28 px across" in m for m in messages)
    assert dbk.io.get_pixel_size(sdata) == 4.0  # a given pixel size is kept


def test_array_arguments_are_checked_and_few_spots_warn():
    spots = _spot_table(_grid("2k", range(1, 5), range(1, 3)), step_um=(100, 100), pixel_size_um=1.0)
    assert len(spots) == 4
    with pytest.warns(UserWarning, match="too few to tell the array"):
        assert dbk.io.estimate_pixel_size(spots)["array"] == "1k"
    with pytest.raises(ValueError, match="array must be one of"):
        dbk.io.estimate_pixel_size(spots, array="3k")
    with pytest.raises(ValueError, match="spot_pitch_um must be a positive number"):
        dbk.io.estimate_pixel_size(spots, spot_pitch_um=-1.0)


# ---- 2. counts values, and pseudobulk(genes=[]) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "what"),
    [("", "NaN or infinite"), ("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("-2", "negative")],
)
def test_nan_or_negative_counts_are_refused_naming_file_spot_and_gene(tmp_path, value, what):
    spots = _spot_table(_grid("1k", range(1, 5), range(1, 5)), step_um=(200, 200), pixel_size_um=1.5)
    _write_her2st_folder(tmp_path / "S", spots)
    path = tmp_path / "S" / "counts.tsv"
    lines = path.read_text().splitlines()
    fields = lines[3].split("\t")  # the third spot
    fields[2] = value  # gene "B"
    lines[3] = "\t".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=what) as err:
        dbk.io.read_st_folder(tmp_path / "S")
    message = str(err.value)
    assert str(path) in message and f"spot '{fields[0]}'" in message and "gene 'B'" in message


def test_bad_counts_in_a_dataframe_and_non_numeric_counts(tmp_path):
    spots = _spot_table(_grid("1k", range(1, 5), range(1, 5)), step_um=(200, 200), pixel_size_um=1.5)
    _write_her2st_folder(tmp_path / "S", spots)
    counts = _counts_for(spots).astype(float)
    counts.iloc[5, 0] = np.nan
    f = tmp_path / "S"
    with pytest.raises(ValueError, match=r"the counts DataFrame: .*NaN.* at spot '2x2', gene 'A'"):
        dbk.io.read_st(counts, f / "spot_selection.tsv", f / "he.jpg")
    words = _counts_for(spots).astype(object)
    words.iloc[2, 1] = "many"
    with pytest.raises(ValueError, match=r"non-numeric values, e\.g\. spot '1x3', gene 'B' holds 'many'"):
        dbk.io.read_st(words, f / "spot_selection.tsv", f / "he.jpg")


def test_pseudobulk_refuses_an_empty_gene_list(tmp_path):
    spots = _spot_table(_grid("1k", range(1, 5), range(1, 5)), step_um=(200, 200), pixel_size_um=1.5)
    _write_her2st_folder(tmp_path / "S", spots)
    sdata = dbk.io.read_st_folder(tmp_path / "S")
    dbk.pp.make_tiles(sdata, tile_size_um=100.0, mode="spots", spots_key="spots")
    with pytest.raises(ValueError, match=r"genes=\[\] selects no gene"):
        dbk.pp.pseudobulk(sdata, source="spots", genes=[])
    assert "dbk_table" not in sdata.tables
    dbk.pp.pseudobulk(sdata, source="spots", genes=["B"])
    assert list(sdata.tables["dbk_table"].var_names) == ["B"]


# ---- 3. an optional pixel size, STUtility folders, 3 x 3 alignment matrices ------------------------------------------


def test_read_st_pixel_size_is_optional(tmp_path, no_warnings):
    spots = _spot_table(_grid("1k", range(1, 6), range(1, 6)), step_um=(200, 200), pixel_size_um=1.5)
    _write_her2st_folder(tmp_path / "S", spots)
    f = tmp_path / "S"
    sdata = dbk.io.read_st(f / "counts.tsv", f / "spot_selection.tsv", f / "he.jpg")
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(1.5, rel=0.02)
    assert "dbk_pixel_size_fit" in sdata.attrs


def _write_stutility(folder: Path, name: str, spots: pd.DataFrame, *, gz: bool = False) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".tsv.gz" if gz else ".tsv"
    spots.to_csv(folder / f"alignment_table_{name}{suffix}", sep="\t", index=False)
    counts = _counts_for(spots[spots["selected"] == 1])
    counts.to_csv(folder / f"{name}{suffix}", sep="\t")
    _image_for(spots, folder / f"{name}.jpg")
    return counts


def test_read_st_folder_finds_stutility_sections(tmp_path, no_warnings):
    folder = tmp_path / "counts"
    mob1 = _spot_table(_grid("2k", range(10, 31), range(10, 31)), step_um=(100, 100), pixel_size_um=1.5)
    mob1.loc[mob1.index[:5], "selected"] = 0  # the spot detector lists spots outside the tissue too
    counts1 = _write_stutility(folder, "MOB1", mob1)
    sdata = dbk.io.read_st_folder(folder)
    table = sdata.tables["table"]
    assert table.n_obs == len(mob1) - 5 and (table.obs["sample"] == "MOB1").all()
    np.testing.assert_array_equal(table.X.toarray(), counts1.loc[table.obs_names].to_numpy())
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(1.5, rel=0.02)
    assert sdata.attrs["dbk_pixel_size_fit"]["array"] == "2k"

    hippo = _spot_table(_grid("1k", range(2, 9), range(2, 9)), step_um=(200, 200), pixel_size_um=1.2, seed=1)
    _write_stutility(folder, "Hippo2", hippo, gz=True)
    with pytest.raises(ValueError, match=r"several STUtility sections \['Hippo2', 'MOB1'\]; pass section="):
        dbk.io.read_st_folder(folder)
    sdata = dbk.io.read_st_folder(folder, section="Hippo2")
    assert (sdata.tables["table"].obs["sample"] == "Hippo2").all()
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(1.2, rel=0.02)
    with pytest.raises(FileNotFoundError, match="'MOB9' not found"):
        dbk.io.read_st_folder(folder, section="MOB9")
    (folder / "MOB1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="H&E image of section 'MOB1' not found"):
        dbk.io.read_st_folder(folder, section="MOB1")


@pytest.mark.parametrize("order", ["columns", "rows"])
def test_a_3x3_alignment_matrix_places_every_counts_row(tmp_path, order, no_warnings):
    # pixel = A @ [x, y, 1]: 1k array (200 µm per step) at 1.6 µm/px -> 125 px per step, slightly rotated
    a = np.deg2rad(2.0)
    linear = 125.0 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    matrix = np.array([[*linear[0], 80.0], [*linear[1], 50.0], [0.0, 0.0, 1.0]])
    folder = tmp_path / "sec"
    folder.mkdir()
    pos = _grid("1k", range(1, 9), range(1, 8))
    keys = [f"{x}x{y}" for x, y in pos]
    counts = pd.DataFrame(np.ones((len(keys), 3), np.int64), index=keys, columns=GENES)
    counts.to_csv(folder / "sec.tsv", sep="\t")
    numbers = matrix.ravel(order="F" if order == "columns" else "C")
    sep = " " if order == "columns" else "\t"
    (folder / "alignment_table_sec.tsv").write_text(sep.join(f"{v:.10g}" for v in numbers) + "\n")
    pixel = pos @ linear.T + matrix[:2, 2]
    Image.fromarray(np.full((int(pixel[:, 1].max()) + 100, int(pixel[:, 0].max()) + 100, 3), 200, np.uint8)).save(
        folder / "sec.jpg"
    )
    sdata = dbk.io.read_st_folder(folder)
    table = sdata.tables["table"]
    assert list(table.obs_names) == keys
    np.testing.assert_allclose(table.obsm["spatial"], pixel, atol=1e-6)
    assert dbk.io.get_pixel_size(sdata) == pytest.approx(1.6, rel=1e-6)
    # the same matrix given to read_st as an array
    sdata2 = dbk.io.read_st(folder / "sec.tsv", matrix, folder / "sec.jpg")
    np.testing.assert_allclose(sdata2.tables["table"].obsm["spatial"], pixel, atol=1e-6)
    # 9 numbers that are no affine matrix
    (folder / "alignment_table_sec.tsv").write_text("1 2 3 4 5 6 7 8 9\n")
    with pytest.raises(ValueError, match="are not a 3 x 3 affine alignment matrix"):
        dbk.io.read_st_folder(folder)
