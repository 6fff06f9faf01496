"""``dbk.datasets.her2st``: the six public her2st sections (Andersson et al. 2021) and the 785-gene list."""

from __future__ import annotations

import importlib
import logging
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .._settings import settings
from . import _registry

if TYPE_CHECKING:
    from spatialdata import SpatialData

HER2ST_SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
HER2ST_PATIENTS = {"B4": "B", "C2": "C", "C3": "C", "C4": "C", "C5": "C", "C6": "C"}  # Andersson et al.'s patient ids
N_HER2ST_GENES = 785
logger = logging.getLogger("dbk")
GENES_TXT = "genes_785.txt"


def her2st(
    sections: str | Iterable[str] | None = None,
    *,
    path: str | os.PathLike | None = None,
    download: bool = True,
    pixel_size_um: float | None = None,
) -> dict[str, SpatialData]:
    """The six public her2st sections: HER2-positive breast cancer, legacy Spatial Transcriptomics.

    Andersson et al. 2021, *Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated cell
    type interactions*, Nat Commun 12:6012 (CC BY 4.0). Sections ``B4`` (patient B) and ``C2``-``C6`` (serial
    sections of patient C): an H&E JPEG of about 9,300 x 9,900 px (about 0.688 µm/px), raw counts (about 15k genes)
    and the spot file; 100 µm spots on a 200 µm pitch, 178-283 spots per section. The files come from
    github.com/almaan/her2st (commit ``85df741``) through :func:`dbk.datasets.fetch` (about 28 MiB for all six,
    checked against their sha256) into ``dbk.settings.datasetdir / "her2st" / <section>``; each section is read
    with :func:`dbk.io.read_st_folder`.

    Parameters
    ----------
    sections
        Which sections, e.g. ``["B4", "C3"]`` or ``"B4"``; ``None`` (default): all six, in the order above.
    path
        A folder that already holds the sections, one subfolder each (``B4/counts.tsv.gz``,
        ``B4/spot_selection.tsv``, ``B4/BT10737_D2_HE.jpg``, ...): checked against the registry's hashes, nothing is
        downloaded. Default: the folder in the environment variable ``DBK_HER2ST`` if set (as
        :func:`dbk.datasets.hest_from_her2st` reads it), else ``dbk.settings.datasetdir / "her2st"``, downloading
        what is missing there.
    download
        Download missing files (see :func:`dbk.datasets.fetch`; ``DBK_OFFLINE`` / ``HF_HUB_OFFLINE`` turn
        downloads off too).
    pixel_size_um
        Micrometres per image pixel; ``None`` (default) estimates it from the spots (see :func:`dbk.io.read_st`).

    Returns
    -------
    ``{section: SpatialData}`` in the order asked, each as read by :func:`dbk.io.read_st_folder`
    (``images["he"]``, ``shapes["spots"]``, ``tables["table"]`` with raw counts), with
    ``sdata.attrs["sample"] = section`` and ``sdata.attrs["patient"]``, the section's patient (``"B"`` for B4,
    ``"C"`` for C2-C6), which :func:`dbk.tl.benchmark` reads for ``split="patient"``.

    Raises
    ------
    ValueError
        If a section is not one of B4, C2, C3, C4, C5, C6, or a file differs from the registered one.
    FileNotFoundError, ConnectionError
        If files are missing and cannot be downloaded (see :func:`dbk.datasets.fetch`).

    Examples
    --------
    Offline, from a local copy of the data if there is one:

    >>> from pathlib import Path
    >>> import dbk
    >>> local = Path("../shared/data/her2st")
    >>> slides = dbk.datasets.her2st(["B4", "C3"], path=local if local.exists() else None)  # doctest: +SKIP
    >>> slides["B4"].tables["table"].n_obs  # doctest: +SKIP
    283
    """
    names = _sections(sections)
    path_env = None
    if path is None and os.environ.get("DBK_HER2ST"):
        path, path_env = os.environ["DBK_HER2ST"], "DBK_HER2ST"
        logger.info(f"her2st: reading the sections from $DBK_HER2ST ({path}); nothing is downloaded.")
    files = [f for f in _registry.get("her2st").files if f.path.split("/", 1)[0] in names]
    root = _registry.ensure("her2st", files, path=path, download=download, path_env=path_env)

    from ..io import read_st_folder

    slides = {}
    for name in names:
        sdata = read_st_folder(root / name, pixel_size_um=pixel_size_um, sample=name)
        sdata.attrs["sample"] = name
        sdata.attrs["patient"] = HER2ST_PATIENTS[name]
        slides[name] = sdata
    return slides


def her2st_genes(*, path: str | os.PathLike | None = None, download: bool = True) -> list[str]:
    """The 785 genes that the HisToGene / Hist2ST / THItoGene line of work evaluates her2st on.

    The list is ``data/her_hvg_cut_1000.npy`` of github.com/biomed-AI/Hist2ST (commit ``7480e5d``), fetched with
    :func:`dbk.datasets.fetch` into ``dbk.settings.datasetdir / "her2st_genes"``. No sha256 is registered for that
    file, so it is not checksum-verified (a warning says so at download): its content is checked instead, 785
    unique gene symbols. It is read without unpickling anything but plain numpy arrays and strings.

    Parameters
    ----------
    path
        A folder holding ``genes_785.txt`` (one symbol per line) or ``her_hvg_cut_1000.npy``, or one of these files;
        nothing is downloaded then.
    download
        Download the file if missing (see :func:`dbk.datasets.fetch`).

    Returns
    -------
    The 785 gene symbols, in the file's order.

    Raises
    ------
    ValueError
        If the file does not hold 785 unique gene symbols.
    FileNotFoundError, ConnectionError
        If the file is missing and cannot be downloaded (see :func:`dbk.datasets.fetch`).

    Examples
    --------
    >>> from pathlib import Path
    >>> import dbk
    >>> local = Path("../shared/data/her2st")
    >>> genes = dbk.datasets.her2st_genes(path=local if local.exists() else None)  # doctest: +SKIP
    >>> len(genes), "GNAS" in genes  # doctest: +SKIP
    (785, True)
    """
    if path is None:
        root = _registry.ensure("her2st_genes", download=download)
        return read_gene_file(root / _registry.HER2ST_GENES_FILE)
    path = Path(path).expanduser()
    if path.is_file():
        return read_gene_file(path)
    candidates = [path / GENES_TXT, path / _registry.HER2ST_GENES_FILE]
    for file in candidates:
        if file.is_file():
            return read_gene_file(file)
    raise FileNotFoundError(
        f"her2st genes: neither {candidates[0]} nor {candidates[1]} exists. Put one of them there (the .npy is "
        f"{_registry.HER2ST_GENES_URL}), or pass path=None to download it into "
        f"{settings.datasetdir / 'her2st_genes'}."
    )


# ---- internals -----------------------------------------------------------------------------------------------------


def _sections(sections: str | Iterable[str] | None) -> list[str]:
    if sections is None:
        return list(HER2ST_SECTIONS)
    names = [sections] if isinstance(sections, str) else list(sections)
    unknown = [s for s in names if s not in HER2ST_SECTIONS]
    if unknown or not names:
        raise ValueError(
            f"Unknown her2st section(s) {unknown if unknown else names}; the public ones are "
            f"{', '.join(HER2ST_SECTIONS)}."
        )
    return list(dict.fromkeys(names))


def read_gene_file(file: Path, *, suffix: str | None = None) -> list[str]:
    """The gene symbols of a ``.txt`` (one per line) or ``.npy`` file; ValueError unless 785 unique ones.

    ``suffix`` (``".npy"`` / ``".txt"``) stands for the file name's suffix (a download's temporary file has none).
    """
    file = Path(file)
    if (suffix or file.suffix) == ".npy":
        genes = _read_npy_strings(file)
    else:
        genes = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    empty = sum(not g for g in genes)
    dupes = sorted({g for g in genes if genes.count(g) > 1}) if len(set(genes)) != len(genes) else []
    if len(genes) != N_HER2ST_GENES or empty or dupes:
        raise ValueError(
            f"{file} should hold {N_HER2ST_GENES} unique gene symbols, found {len(genes)} entries"
            + (f", {empty} empty" if empty else "")
            + (f", duplicates {dupes[:10]}" if dupes else "")
            + "."
        )
    return genes


_MAX_GENES = 1_000_000  # a gene list longer than this is no gene list


def _read_npy_strings(file: Path) -> list[str]:
    """A 1-D ``.npy`` array of strings, read without running arbitrary pickled code.

    A string (``<U`` / ``S``) array is read with ``allow_pickle=False``; an object array (what ``np.save`` writes for
    a list of Python strings) is unpickled with only the numpy classes needed to rebuild an array allowed.
    """
    import numpy as np
    from numpy.lib import format as npformat

    with open(file, "rb") as fh:
        try:
            version = npformat.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npformat.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = npformat.read_array_header_2_0(fh)
            else:
                shape, _, dtype = npformat._read_array_header(fh, version)  # no public reader for version 3.0
        except (ValueError, OSError) as err:
            raise ValueError(f"{file} is not a readable .npy file ({err}).") from err
        # the header is checked before anything is allocated: a header may declare any size
        if len(shape) != 1 or shape[0] > _MAX_GENES:
            raise ValueError(f"{file} declares an array of shape {shape}; expected a 1-D array of at most "
                             f"{_MAX_GENES:,} gene symbols.")
        size = os.fstat(fh.fileno()).st_size
        if not dtype.hasobject and shape[0] * dtype.itemsize > size:
            raise ValueError(f"{file} declares {shape[0]:,} entries of {dtype.itemsize} bytes "
                             f"({shape[0] * dtype.itemsize:,} bytes) but holds {size:,} bytes: truncated or corrupt.")
        if dtype.hasobject:
            try:
                array = _SafeUnpickler(fh).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as err:
                raise ValueError(f"{file}: could not read its object array safely ({err}).") from err
        else:
            fh.seek(0)
            array = np.load(fh, allow_pickle=False)
    array = np.asarray(array)
    if array.ndim != 1:
        raise ValueError(f"{file} should hold a 1-D array of gene symbols, found shape {array.shape}.")
    if array.dtype.kind == "S":
        return [x.decode("utf-8").strip() for x in array.tolist()]
    bad = [x for x in array.tolist() if not isinstance(x, str)]
    if bad:
        raise ValueError(f"{file} should hold gene symbols (strings), found {type(bad[0]).__name__} {bad[0]!r}.")
    return [x.strip() for x in array.tolist()]


def _multiarray():
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays of Python / numpy strings and refuses every other global."""

    _MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")

    def find_class(self, module: str, name: str):
        import numpy as np

        if module in self._MULTIARRAY and name in ("_reconstruct", "scalar"):
            return getattr(_multiarray(), name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays of strings are read)")
