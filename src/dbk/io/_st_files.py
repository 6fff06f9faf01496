"""The files of a legacy ST section: find them in a folder, parse the counts table, spot file or alignment matrix."""

from __future__ import annotations

import gzip
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from anndata.utils import make_index_unique
from scipy import sparse

from ._image import require_file

logger = logging.getLogger("dbk")

COUNTS_NAMES = ("counts.tsv.gz", "counts.tsv", "*counts*.tsv*", "*cnt*.tsv*", "*stdata*.tsv*")
SPOTS_NAMES = ("spot_selection.tsv", "spot_selection.tsv.gz", "*selection*.tsv*", "*spot*.tsv*")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
ALIGNMENT_PREFIX = "alignment_table_"  # STUtility: <name>.tsv, alignment_table_<name>.tsv, <name>.jpg
_TABLE_SUFFIXES = (".tsv.gz", ".tsv")


def find_stutility(folder: Path, section: str | None) -> tuple[str, Path, Path, Path] | None:
    """``(name, counts, alignment, image)`` of the STUtility section in ``folder``; ``None`` if it has none."""
    tables = {}
    for path in sorted(folder.glob(f"{ALIGNMENT_PREFIX}*")):
        for suffix in _TABLE_SUFFIXES:
            if path.is_file() and path.name.endswith(suffix):
                tables[path.name[len(ALIGNMENT_PREFIX) : -len(suffix)]] = path
                break
    if not tables:
        return None
    if section is None:
        if len(tables) > 1:
            raise ValueError(f"{folder} holds several STUtility sections {sorted(tables)}; pass section=... .")
        section = next(iter(tables))
    elif section not in tables:
        raise FileNotFoundError(
            f"STUtility section {section!r} not found in {folder} (no {ALIGNMENT_PREFIX}{section}.tsv); it holds "
            f"{sorted(tables)}."
        )
    counts = [folder / f"{section}{suffix}" for suffix in _TABLE_SUFFIXES if (folder / f"{section}{suffix}").is_file()]
    if not counts:
        raise FileNotFoundError(f"ST counts table of section {section!r} not found: {folder / (section + '.tsv')}")
    if len(counts) > 1:
        raise ValueError(f"Several counts tables for section {section!r} in {folder}: {[p.name for p in counts]}.")
    images = [p for p in images_in(folder) if p.stem == section]
    if not images and len(tables) == 1 and len(images_in(folder)) == 1:
        images = images_in(folder)
    if not images:
        raise FileNotFoundError(
            f"H&E image of section {section!r} not found in {folder} (looked for {section}.jpg and the other "
            f"suffixes {', '.join(IMAGE_SUFFIXES)})"
        )
    if len(images) > 1:
        raise ValueError(f"Several images for section {section!r} in {folder}: {[p.name for p in images]}.")
    return section, counts[0], tables[section], images[0]


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_counts(counts: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    if isinstance(counts, pd.DataFrame):
        df = counts.copy()
    else:
        path = require_file(counts, "ST counts table (spots x genes)")
        df = pd.read_csv(path, sep="\t", index_col=0)
        # pandas renames duplicated column names ("GENE", "GENE.1"); take the header as written
        header = pd.read_csv(path, sep="\t", header=None, nrows=1, dtype=str, keep_default_na=False)
        df.columns = header.iloc[0, 1:].to_numpy()
    df.index = df.index.astype(str)
    df.columns = df.columns.astype(str)
    return df


def read_spots(spots, counts_index: pd.Index, sample: str) -> pd.DataFrame:
    """The selected spots (``x, y`` integer, ``pixel_x, pixel_y``, ...) indexed by their ``"{x}x{y}"`` key."""
    matrix, source = None, "spot table"
    if isinstance(spots, np.ndarray):
        source = "the alignment matrix"
        matrix = _affine_matrix(np.asarray(spots, dtype=np.float64).ravel(order="F"), source)
    elif not isinstance(spots, pd.DataFrame):
        path = require_file(spots, "ST spot file (x, y, pixel_x, pixel_y) or 3 x 3 alignment matrix")
        source = str(path)
        numbers = _nine_numbers(path)
        if numbers is not None:
            matrix = _affine_matrix(numbers, source)
    if matrix is not None:
        return _spots_from_matrix(matrix, counts_index, source, sample)
    df = spots.copy() if isinstance(spots, pd.DataFrame) else pd.read_csv(path, sep="\t")
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise ValueError(f"{source} lacks column(s) {missing}; it has {list(df.columns)}.")
    df["x"] = df["x"].round().astype(int)
    df["y"] = df["y"].round().astype(int)
    df.index = pd.Index([f"{x}x{y}" for x, y in zip(df["x"], df["y"], strict=True)])
    return _selected(df)


def _nine_numbers(path: Path) -> np.ndarray | None:
    """The 9 numbers of a 3 x 3 alignment file, in file order; ``None`` if the file is not just 9 numbers."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt") as fh:
        head = fh.read(4096)
    tokens = head.replace(",", " ").split()
    if len(tokens) != 9 or len(head) == 4096:
        return None
    try:
        return np.array([float(t) for t in tokens])
    except ValueError:
        return None


def _affine_matrix(numbers: np.ndarray, source: str) -> np.ndarray:
    """3 x 3 matrix from 9 numbers written column by column (ST Spot Detector, ST Analysis) or row by row."""
    column_major = numbers.reshape(3, 3, order="F")
    row_major = numbers.reshape(3, 3, order="C")
    for matrix in (column_major, row_major):
        if np.allclose(matrix[2], [0.0, 0.0, 1.0]) and abs(np.linalg.det(matrix[:2, :2])) > 1e-12:
            return matrix
    raise ValueError(
        f"{source}: 9 numbers {numbers.tolist()} are not a 3 x 3 affine alignment matrix (written column by column, "
        "a11 a21 a31 a12 a22 a32 a13 a23 a33, so that the last row a31 a32 a33 is 0 0 1, with an invertible 2 x 2 "
        "part)."
    )


_KEY = re.compile(r"\s*(-?\d+(?:\.\d*)?)\s*x\s*(-?\d+(?:\.\d*)?)\s*")


def _spots_from_matrix(matrix: np.ndarray, counts_index: pd.Index, source: str, sample: str) -> pd.DataFrame:
    """Every counts row as a spot, at its ``"{x}x{y}"`` array position mapped through the alignment matrix."""
    parsed = [_KEY.fullmatch(str(key)) for key in counts_index]
    bad = [key for key, m in zip(counts_index, parsed, strict=True) if m is None]
    if bad:
        raise ValueError(
            f"{sample}: with an alignment matrix ({source}) the spots' array positions come from the counts rows, "
            f"which must look like '12x7' (or '12.03x6.98'); {len(bad)} do not, e.g. {bad[:3]}."
        )
    pos = np.array([[float(m.group(1)), float(m.group(2))] for m in parsed]).reshape(-1, 2)
    pixel = pos @ matrix[:2, :2].T + matrix[:2, 2]
    logger.info(
        f"{sample}: spot centres from the 3 x 3 alignment matrix in {source} (pixel = A @ [x, y, 1]); all "
        f"{len(pos)} counts rows are spots (no selection)."
    )
    return pd.DataFrame(
        {
            "x": np.round(pos[:, 0]).astype(int),
            "y": np.round(pos[:, 1]).astype(int),
            "new_x": pos[:, 0],
            "new_y": pos[:, 1],
            "pixel_x": pixel[:, 0],
            "pixel_y": pixel[:, 1],
        },
        index=pd.Index(counts_index.astype(str)),
    )


def _selected(df: pd.DataFrame) -> pd.DataFrame:
    return df.loc[df["selected"] == 1] if "selected" in df.columns else df


def checked_counts(counts: pd.DataFrame, source: str) -> pd.DataFrame:
    """``counts`` with numeric columns; non-numeric, NaN, infinite or negative counts raise, naming spot and gene."""
    columns = {}
    for j in range(counts.shape[1]):
        column = counts.iloc[:, j]
        if pd.api.types.is_numeric_dtype(column.dtype):
            continue
        numbers = pd.to_numeric(column, errors="coerce")
        failed = column.index[(numbers.isna() & column.notna()).to_numpy()]
        if len(failed):
            raise ValueError(
                f"{source}: the counts table holds non-numeric values, e.g. spot {failed[0]!r}, gene "
                f"{counts.columns[j]!r} holds {column[failed[0]]!r}."
            )
        columns[j] = numbers
    if columns:
        counts = counts.copy()
        for j, numbers in columns.items():
            counts.isetitem(j, numbers)
    values = counts.to_numpy()
    if values.dtype.kind not in "iuf":  # nullable or boolean columns
        values = counts.to_numpy(dtype=np.float64, na_value=np.nan)
        counts = pd.DataFrame(values, index=counts.index, columns=counts.columns)
    for what, bad in (
        (
            "NaN or infinite value(s) (an empty field reads as NaN)",
            ~np.isfinite(values) if values.dtype.kind == "f" else None,
        ),
        ("negative value(s)", values < 0),
    ):
        if bad is None or not bad.any():
            continue
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"{source}: the counts table holds {int(bad.sum())} {what}; the first is {float(values[i, j]):g}, at "
            f"spot {counts.index[i]!r}, gene {counts.columns[j]!r}. Counts must be non-negative numbers (write 0 "
            "for no counts)."
        )
    return counts


def counts_matrix(counts: pd.DataFrame, sample: str) -> sparse.csr_matrix:
    values = counts.to_numpy()
    if np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
        if values.size and values.max() > np.iinfo(np.int32).max:
            return sparse.csr_matrix(values.astype(np.int64))
        return sparse.csr_matrix(values.astype(np.int32))
    logger.warning(f"{sample}: counts are not whole numbers; kept as float32.")
    return sparse.csr_matrix(values.astype(np.float32))


def unique_gene_names(genes: pd.Index, sample: str) -> pd.Index:
    dup = genes[genes.duplicated()].unique()
    if len(dup):
        warnings.warn(
            f"{sample}: {len(dup)} gene symbol(s) occur more than once in the counts table (e.g. {list(dup[:5])}); "
            "made unique by appending '-1', '-2', ...",
            UserWarning,
            stacklevel=3,
        )
        genes = make_index_unique(genes)
    return genes


def find_one(folder: Path, patterns: tuple[str, ...], what: str) -> Path:
    for pattern in patterns:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"Several files for the {what} in {folder}: {[p.name for p in found]}.")
    raise FileNotFoundError(f"{what} not found in {folder} (looked for {', '.join(patterns)})")
