"""A registry of public data files (URL, sha256, size) and their download into ``dbk.settings.datasetdir``.

Each dataset is a list of :class:`RemoteFile` entries. :func:`fetch` puts them into
``dbk.settings.datasetdir / <dataset>`` with :meth:`pooch.Pooch.fetch` (a temporary file beside the final one,
checked against the registered sha256, then moved into place: a failed or corrupt download never leaves a file under
its final name), or checks a folder that already holds them (``path=``). What pooch does not do is here: the
offline / ``download=False`` error that lists every missing file with its folder and URL before any network access,
the check of a ``path=`` copy (never modified), and a content check for files without a registered hash.
Nothing here imports more than the standard library at import time (pooch is imported when needed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .._logging import logger
from .._settings import settings

OFFLINE_VARS = ("HF_HUB_OFFLINE", "DBK_OFFLINE")
TIMEOUT_S = 60.0  # seconds to wait for a server's answer (per request, not per file)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset.

    ``path`` is relative to the dataset's folder; ``sha256`` / ``size`` (bytes) are ``None`` where unknown, and such a
    file is not checksum-verified: ``check`` (a callable that raises :class:`ValueError` on a bad file) validates its
    content instead.
    """

    path: str
    url: str
    sha256: str | None
    size: int | None
    check: Callable[[Path], object] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_relative_path(self.path, f"file {self.path!r} of the registry (<- {self.url})")


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: its files and what to say about it."""

    name: str
    description: str
    source: str
    licence: str
    files: tuple[RemoteFile, ...]

    def __post_init__(self) -> None:
        check_relative_path(self.name, f"dataset name {self.name!r} (its folder in dbk.settings.datasetdir)")
        if "/" in self.name:
            raise ValueError(f"Invalid dataset name {self.name!r}: one folder name, without '/'.")


def check_relative_path(path: object, what: str) -> str:
    r"""Return ``path`` if it is a plain relative path (``"B4/counts.tsv.gz"``) that stays inside its folder.

    Refused (``ValueError`` naming ``what``): not a string, empty, absolute (``/x``, ``C:\x``), ``~``, ``\``, NUL,
    or a ``.`` / ``..`` / empty component, any of which would read or write outside the data folder.
    """
    from pathlib import PurePosixPath, PureWindowsPath

    if not isinstance(path, str) or not path:
        raise ValueError(f"Invalid {what}: a path must be a non-empty string, got {path!r}.")
    parts = path.split("/")
    if (any(ch in path for ch in ("\x00", "\\", "~")) or PurePosixPath(path).is_absolute()
            or PureWindowsPath(path).drive or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"Invalid {what}: {path!r} would point outside the data folder; registry paths are relative "
                         "('B4/counts.tsv.gz'), without '..', '.', '~', '\\', NUL or a leading '/'.")
    return path


class ChecksumError(ValueError):
    """A file's bytes are not the registered ones."""


# ---- the registry --------------------------------------------------------------------------------------------------

HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
HER2ST_RAW = f"https://raw.githubusercontent.com/almaan/her2st/{HER2ST_COMMIT}/data"
HIST2ST_COMMIT = "7480e5d1f7712282e6c96d8430684e7830517769"
HER2ST_GENES_FILE = "her_hvg_cut_1000.npy"
HER2ST_GENES_URL = f"https://raw.githubusercontent.com/biomed-AI/Hist2ST/{HIST2ST_COMMIT}/data/{HER2ST_GENES_FILE}"

# section: (H&E JPEG name, (sha256, bytes) of the JPEG, of counts.tsv.gz, of spot_selection.tsv)
_HER2ST_SECTIONS = {
    "B4": (
        "BT10737_D2_HE.jpg",
        ("3cb165614ce2a13426381e450220dccac980cc9bda6a90fb041c28ca0e2c753d", 4076552),
        ("e38231c2a38c9bc7e6d550eec0e527c1869ee0e525fc913e708d1323c34f5ebb", 563881),
        ("192b46f3ca414c85753a01a4fb5760a697ca6c0a1aadb949c4687cc6efa9faa0", 10560),
    ),
    "C2": (
        "5714_HE_BT_C2.jpg",
        ("26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e", 3990230),
        ("c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d", 821408),
        ("235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c", 7053),
    ),
    "C3": (
        "5714_HE_BT_D1.jpg",
        ("0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568", 3915842),
        ("e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a", 847901),
        ("7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755", 6728),
    ),
    "C4": (
        "5714_HE_BT_D2.jpg",
        ("f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2", 3806070),
        ("33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da", 886246),
        ("47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c", 6960),
    ),
    "C5": (
        "5714_HE_BT_E1.jpg",
        ("34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65", 3719130),
        ("c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338", 845308),
        ("2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c", 6802),
    ),
    "C6": (
        "5714_HE_BT_E2.jpg",
        ("dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263", 3941039),
        ("60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8", 892853),
        ("efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117", 6655),
    ),
}


def _her2st_files() -> tuple[RemoteFile, ...]:
    files = []
    for s, (jpg, image, counts, spots) in _HER2ST_SECTIONS.items():
        files += [
            RemoteFile(f"{s}/{jpg}", f"{HER2ST_RAW}/ST-imgs/{s[0]}/{s}/{jpg}", *image),
            RemoteFile(f"{s}/counts.tsv.gz", f"{HER2ST_RAW}/ST-cnts/{s}.tsv.gz", *counts),
            RemoteFile(f"{s}/spot_selection.tsv", f"{HER2ST_RAW}/ST-spotfiles/{s}_selection.tsv", *spots),
        ]
    return tuple(files)


def _check_her2st_genes(local: Path) -> None:
    from ._her2st import read_gene_file

    read_gene_file(local, suffix=".npy")


REGISTRY: dict[str, Dataset] = {
    "her2st": Dataset(
        name="her2st",
        description=(
            "HER2+ breast cancer, legacy Spatial Transcriptomics (100 µm spots, 200 µm pitch): six sections "
            "(B4; C2-C6) with H&E JPEG, raw counts and spot files (Andersson et al. 2021, Nat Commun 12:6012)"
        ),
        source=f"https://github.com/almaan/her2st/tree/{HER2ST_COMMIT}/data",
        licence="CC BY 4.0",
        files=_her2st_files(),
    ),
    "her2st_genes": Dataset(
        name="her2st_genes",
        description=(
            "The 785 genes that HisToGene / Hist2ST / THItoGene evaluate her2st on (numpy array of gene symbols)"
        ),
        source=f"https://github.com/biomed-AI/Hist2ST/blob/{HIST2ST_COMMIT}/data/{HER2ST_GENES_FILE}",
        licence="not stated (a list of gene symbols)",
        files=(RemoteFile(HER2ST_GENES_FILE, HER2ST_GENES_URL, None, None, check=_check_her2st_genes),),
    ),
}


# ---- public functions ----------------------------------------------------------------------------------------------


def available():
    """The datasets that :func:`dbk.datasets.fetch` can download, and whether each is complete locally.

    Returns
    -------
    :class:`pandas.DataFrame`
        One row per registered dataset, columns ``name``, ``description``, ``n_files``, ``MiB`` (total size; NaN
        where a file's size is not registered), ``source``, ``licence``, ``folder`` (where :func:`fetch` puts it:
        ``dbk.settings.datasetdir / name``) and ``complete`` (every file is in that folder with its registered size;
        :func:`fetch` checks the hashes).

    Examples
    --------
    >>> import dbk
    >>> table = dbk.datasets.available()
    >>> "her2st" in set(table["name"])
    True
    """
    import pandas as pd

    rows = []
    for ds in REGISTRY.values():
        root = settings.datasetdir / ds.name
        sizes = [f.size for f in ds.files]
        rows.append(
            {
                "name": ds.name,
                "description": ds.description,
                "n_files": len(ds.files),
                "MiB": round(sum(sizes) / 2**20, 2) if None not in sizes else float("nan"),
                "source": ds.source,
                "licence": ds.licence,
                "folder": str(root),
                "complete": all(_looks_present(root / f.path, f) for f in ds.files),
            }
        )
    return pd.DataFrame(rows)


def fetch(name: str, *, path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Make sure a registered dataset's files are on disk, downloading the missing ones; return their folder.

    Files go to ``dbk.settings.datasetdir / name`` (``$DBK_DATASETDIR``, default ``~/.cache/dbk``), downloaded by
    :meth:`pooch.Pooch.fetch`: to a temporary file in that folder, checked against its registered sha256, then moved
    to its final name; a file already there with the right size and hash is not downloaded again. Files without a
    registered sha256 are not checksum-verified: their content is checked instead, and a warning says so.

    Parameters
    ----------
    name
        A dataset of :func:`available`, e.g. ``"her2st"``.
    path
        A local folder that already holds the files, laid out as in the registry (e.g. ``B4/counts.tsv.gz``); they
        are checked against their hashes and nothing is downloaded.
    download
        Download missing files; with ``False`` a missing file is an error (as it is when the environment variable
        ``DBK_OFFLINE`` or ``HF_HUB_OFFLINE`` is set).

    Returns
    -------
    The folder that holds the dataset's files.

    Raises
    ------
    KeyError
        If ``name`` is not a registered dataset.
    FileNotFoundError
        If files are missing and cannot be downloaded (``download=False``, offline, or a ``path=`` lacking them),
        at once and without network access; the message lists each missing file, its URL and the folder to put it in.
    ConnectionError
        If a download fails (no network, server error); the message lists the files still missing, as above.
    ValueError
        If a file's bytes differ from the registered ones (the message names the file and both hashes); a
        download that fails this check leaves nothing under the file's final name.

    Examples
    --------
    >>> import dbk
    >>> folder = dbk.datasets.fetch("her2st")  # doctest: +SKIP
    >>> sorted(p.name for p in (folder / "B4").iterdir())  # doctest: +SKIP
    ['BT10737_D2_HE.jpg', 'counts.tsv.gz', 'spot_selection.tsv']
    """
    return ensure(name, path=path, download=download)


# ---- internals -----------------------------------------------------------------------------------------------------


def get(name: str) -> Dataset:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"Unknown dataset {name!r}; registered: {sorted(REGISTRY)} (see dbk.datasets.available())."
        ) from None


def ensure(
    name: str,
    files: Iterable[RemoteFile] | None = None,
    *,
    path: str | os.PathLike | None = None,
    download: bool = True,
    path_env: str | None = None,
) -> Path:
    """:func:`fetch` for some of a dataset's files (all by default).

    ``path_env``: the environment variable ``path`` was read from, named in the messages instead of ``path=``.
    """
    ds = get(name)
    files = list(ds.files if files is None else files)
    if path is not None:
        return _check_folder(ds, files, Path(path).expanduser(), path_env=path_env)
    root = settings.datasetdir / ds.name
    todo, wrong = [], []
    for f in files:
        problem = _problem(root / f.path, f)
        if problem is not None:
            todo.append(f)
        if problem not in (None, "missing"):
            wrong.append(f"{root / f.path} {problem}")
    if not todo:
        return root
    var = offline()
    if var is not None or not download:
        why = f"{var}={os.environ[var]!r}" if var is not None else "download=False"
        undo = f"unset {var}" if var is not None else "pass download=True"
        state = "missing or not the registered ones" if wrong else "missing"
        details = "".join(f"\n  {w}" for w in wrong)
        raise FileNotFoundError(
            f"Dataset {name!r}: {len(todo)} file(s) {state} in {root} and downloads are off ({why}).{details}\n"
            f"Copy these files into that folder by hand, or {undo}, or pass path= a folder that holds them:\n"
            + _listing(root, todo)
        )
    for line in wrong:
        logger.warning(f"Dataset {name!r}: {line}; downloading it again.")
    for i, f in enumerate(todo):
        try:
            _download(f, root)
        except ChecksumError:
            raise
        except Exception as err:  # network and HTTP errors of requests, disk errors
            raise ConnectionError(
                f"Dataset {name!r}: could not download {f.path} ({type(err).__name__}: {err}). Retry, or copy the "
                f"{len(todo) - i} file(s) still missing into {root} by hand:\n" + _listing(root, todo[i:])
            ) from err
    return root


def offline() -> str | None:
    """Name of the environment variable that turns downloads off, if one is set."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return var
    return None


def _looks_present(local: Path, f: RemoteFile) -> bool:
    """Is there, with its registered size (no hashing)."""
    try:
        return local.is_file() and (f.size is None or local.stat().st_size == f.size)
    except OSError:
        return False


def _problem(local: Path, f: RemoteFile) -> str | None:
    """``None`` if ``local`` is ``f``'s file, ``"missing"``, or what differs."""
    if not local.is_file():
        return "missing"
    size = local.stat().st_size
    if f.size is not None and size != f.size:
        return f"differs from the registered file (size {size} bytes, expected {f.size})"
    if f.sha256 is not None:
        import pooch

        digest = pooch.file_hash(str(local))
        if digest != f.sha256:
            return f"differs from the registered file (sha256 {digest}, expected {f.sha256})"
    elif f.check is not None:
        try:
            f.check(local)
        except ValueError as err:
            return f"is not the expected file ({err})"
    return None


def _check_folder(ds: Dataset, files: list[RemoteFile], root: Path, *, path_env: str | None = None) -> Path:
    given = f"${path_env}=" if path_env else "path="
    instead = (f"unset {path_env}" if path_env else "pass path=None") + " to download them into"
    if not root.is_dir():
        raise FileNotFoundError(
            f"Dataset {ds.name!r}: {given}{str(root)!r} is not a folder. "
            f"{'Point it at' if path_env else 'Pass'} the folder that holds these files, or {instead} "
            f"{settings.datasetdir / ds.name}:\n" + _listing(root, files)
        )
    problems = [(f, _problem(root / f.path, f)) for f in files]
    missing = [f for f, p in problems if p == "missing"]
    wrong = [(f, p) for f, p in problems if p not in (None, "missing")]
    if not missing and not wrong:
        return root
    text = f"Dataset {ds.name!r} in {root}" + (f" (${path_env})" if path_env else "") + ":"
    if wrong:
        text += "".join(f"\n  {root / f.path} {p}" for f, p in wrong)
    if missing:
        text += (
            f"\n{len(missing)} file(s) missing; copy them there (or {instead} "
            f"{settings.datasetdir / ds.name}):\n" + _listing(root, missing)
        )
    if wrong:
        text += "\nReplace the differing file(s) with the originals:\n" + _listing(root, [f for f, _ in wrong])
    raise (FileNotFoundError if missing else ValueError)(text)


def _listing(root: Path, files: list[RemoteFile]) -> str:
    lines = []
    for f in files:
        size = f"{f.size / 2**20:.2f} MiB" if f.size is not None else "size not registered"
        digest = f"sha256 {f.sha256}" if f.sha256 is not None else "not checksum-verified"
        lines.append(f"  {root / f.path}  ({size}, {digest})\n      <- {f.url}")
    return "\n".join(lines)


def _download(f: RemoteFile, root: Path) -> None:
    """Download ``f`` into ``root`` with :meth:`pooch.Pooch.fetch` (temporary file, sha256 check, move into place)."""
    import pooch
    from tqdm.auto import tqdm

    dest = root / f.path
    size = f"{f.size / 2**20:.2f} MiB" if f.size is not None else "size not registered"
    logger.info(f"Downloading {f.url} -> {dest} ({size}).")
    downloaded = False

    def download(url: str, tmp: str, pup: pooch.Pooch) -> None:  # pooch checks the hash, then moves tmp into place
        nonlocal downloaded
        # a total > 0: pooch tests the bar's truth, which tqdm refuses for total=None (it sets the real total)
        bar = tqdm(total=f.size or 1, desc=f.path, unit="B", unit_scale=True) if settings.progress else False
        try:
            pooch.HTTPDownloader(progressbar=bar, timeout=TIMEOUT_S)(url, tmp, pup)
        finally:
            if bar is not False:
                bar.close()
        if f.sha256 is None:
            problem = _problem(Path(tmp), f)
            if problem is not None:
                raise ChecksumError(f"{f.path}: the file downloaded from {f.url} {problem}; it was not written to "
                                    f"{dest}. Retry; if this persists, the file at that URL has changed.")
            logger.warning(f"{f.path} is not checksum-verified (no sha256 is registered for it); its content was "
                           f"checked instead (sha256 of the downloaded file: {pooch.file_hash(tmp)}).")
        downloaded = True

    pup = pooch.create(path=root, base_url="", registry={f.path: f.sha256}, urls={f.path: f.url})
    log, level = pooch.get_logger(), pooch.get_logger().level
    log.setLevel("WARNING")  # pooch prints its own INFO lines to stderr whatever dbk's verbosity; dbk logs instead
    try:
        pup.fetch(f.path, downloader=download)
    except ValueError as err:
        if not downloaded:
            raise
        raise ChecksumError(  # pooch's sha256 check of a complete download failed; it deleted the temporary file
            f"{f.path}: the file downloaded from {f.url} differs from the registered file, so nothing was written "
            f"to {dest} ({err})"
        ) from err
    finally:
        log.setLevel(level)
    logger.info(f"{dest} is in place.")
