"""``dbk.datasets.hest``: fetch HEST-1k samples from the Hugging Face hub (``huggingface_hub``), then read them."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from spatialdata import SpatialData

from .._logging import logger
from .._settings import settings

HEST_REPO = "MahmoodLab/hest"
HEST_URL = f"https://huggingface.co/datasets/{HEST_REPO}/resolve/main"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "DBK_OFFLINE")
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# other names of the H&E that dbk.io.read_hest reads (converted slides): any of them makes the download unnecessary
_WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".jpg", ".jpeg", ".png")


def hest(
    sample_id: str | Sequence[str],
    *,
    root: str | os.PathLike | None = None,
    load_transcripts: bool = True,
    load_cells: bool = True,
    token: str | None = None,
    timeout: float = 30.0,
) -> SpatialData | dict[str, SpatialData]:
    """Download HEST-1k samples (Jaume et al. 2024) if needed and read them with :func:`dbk.io.read_hest`.

    Files come from the Hugging Face dataset ``MahmoodLab/hest`` into ``root`` in HEST's layout, through
    :func:`huggingface_hub.hf_hub_download` (``local_dir=root``: tokens, resumed downloads and ``HF_HUB_OFFLINE``
    as ``huggingface_hub`` handles them). Files already in ``root`` are never fetched again (nothing is checked
    online then, so a complete folder works offline); files that the Hugging Face cache holds (e.g. from an earlier
    ``snapshot_download`` without ``local_dir``) are linked into ``root`` (copied where links fail), without network:

    - ``metadata/{sample_id}.json``, ``wsis/{sample_id}.tif`` (a ``.jpg`` / ``.png`` / other TIFF of that name in
      ``wsis/`` will do), ``st/{sample_id}.h5ad``;
    - for Xenium samples (``st_technology`` in the metadata): ``transcripts/{sample_id}_transcripts.parquet`` and,
      if published, ``xenium_seg/{sample_id}_xenium_cell_seg.parquet``.

    HEST is a gated dataset: accept its terms on https://huggingface.co/datasets/MahmoodLab/hest and pass a token
    (``token=``, the environment variable ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``, or ``hf auth login``).

    The six public her2st sections are HEST samples SPA137-SPA145 (B4 = SPA145, C2 = SPA141, C3 = SPA140,
    C4 = SPA139, C5 = SPA138, C6 = SPA137). Without the hub, :func:`dbk.datasets.hest_from_her2st` writes them into
    ``root`` from the her2st files; this function then reads them as it reads the hub's. It does not build them by
    itself: files built locally are not the hub's (see that function), so building them is a step you take.

    Parameters
    ----------
    sample_id
        HEST sample id, e.g. ``"TENX95"`` (Xenium, breast) or ``"MEND139"``; or a list of ids.
    root
        Folder of the HEST download; default ``dbk.settings.datasetdir / "hest"``.
    load_transcripts
        Fetch and read the transcripts of Xenium samples.
    load_cells
        Fetch and read the Xenium cell segmentation where published.
    token
        Hugging Face access token; default from the environment (or the token ``huggingface_hub`` has stored).
    timeout
        Seconds to wait for the hub to answer a file's metadata request (``etag_timeout`` of ``hf_hub_download``).

    Returns
    -------
    The sample as read by :func:`dbk.io.read_hest` (H&E image, spots table, transcripts and cells where present;
    ``attrs["patient"]`` from the metadata's ``patient`` field where it has one); for a list of ids,
    ``{sample_id: SpatialData}`` in the order given (as :func:`dbk.datasets.her2st` returns its sections).

    Raises
    ------
    FileNotFoundError
        If files are missing and downloads are off (``HF_HUB_OFFLINE`` or ``DBK_OFFLINE`` set), at once, without
        network; the message lists each missing file, where to put it and its URL (and, for the her2st samples,
        how to build them with :func:`dbk.datasets.hest_from_her2st`).
    ConnectionError
        If the hub cannot be reached or refuses the download (the same listing, plus the reason).
    ValueError
        If an id is not a HEST name, or the list is empty.

    Examples
    --------
    >>> import dbk
    >>> slides = dbk.datasets.hest(["SPA145", "SPA141"])  # doctest: +SKIP
    >>> {sid: s.attrs["patient"] for sid, s in slides.items()}  # doctest: +SKIP
    {'SPA145': 'Patient B', 'SPA141': 'Patient C'}
    """
    from ..io._hest import check_hest_id

    single = isinstance(sample_id, str)
    ids = [sample_id] if single else list(dict.fromkeys(sample_id))
    if not ids:
        raise ValueError("hest() needs at least one HEST sample id, e.g. dbk.datasets.hest(['SPA145', 'SPA141']).")
    for sid in ids:
        check_hest_id(sid)
    root = Path(root).expanduser() if root is not None else settings.datasetdir / "hest"
    kw = {"load_transcripts": load_transcripts, "load_cells": load_cells}

    missing = {sid: [f for f in _wanted_files(root, sid, **kw) if not f.present(root)] for sid in ids}
    if any(missing.values()) and _link_from_cache(root, [f for files in missing.values() for f in files]):
        missing = {sid: [f for f in _wanted_files(root, sid, **kw) if not f.present(root)] for sid in ids}
    wanting = [sid for sid in ids if missing[sid]]
    hint = _builder_hint(wanting, root)
    var = _offline()
    if wanting and var is not None:  # one error for all samples, before any network call
        files = [f for sid in wanting for f in missing[sid]]
        which = f"HEST sample {wanting[0]!r}" if len(wanting) == 1 else f"HEST samples {wanting}"
        raise FileNotFoundError(
            f"{which}: {len(files)} file(s) missing in {root} and downloads are off ({var}={os.environ[var]!r}); "
            f"nor does the Hugging Face cache hold them. Put these files into that folder, or unset {var}:\n"
            + _listing(root, files) + hint
        )
    for sid in wanting:
        _fetch(root, sid, missing[sid], token=token, timeout=timeout, hint=hint)

    from ..io import read_hest

    slides = {sid: read_hest(root, sid, **_what_to_read(root, sid, **kw)) for sid in ids}
    return slides[ids[0]] if single else slides


def _what_to_read(root: Path, sample_id: str, *, load_transcripts: bool, load_cells: bool) -> dict[str, bool]:
    """Transcripts and cells are read for Xenium samples; for others only if such a file is there anyway."""
    if _is_xenium(root / "metadata" / f"{sample_id}.json") is False:
        tx, cells = _layout(sample_id, load_transcripts=True, load_cells=True)[3:]
        load_transcripts = load_transcripts and tx.present(root)
        load_cells = load_cells and cells.present(root)
    return {"load_transcripts": load_transcripts, "load_cells": load_cells}


def _builder_hint(sample_ids: list[str], root: Path) -> str:
    """For the her2st samples among ``sample_ids``: how to build them without the hub (else an empty string)."""
    from ._hest_local import HER2ST_HEST_IDS

    section_of = {sid: section for section, sid in HER2ST_HEST_IDS.items()}
    ours = [sid for sid in sample_ids if sid in section_of]
    if not ours:
        return ""
    sections = [section_of[sid] for sid in ours]
    where = "" if root == settings.datasetdir / "hest" else f", root={str(root)!r}"
    return (
        f"\n{', '.join(f'{sid} = her2st {section_of[sid]}' for sid in ours)}: without the hub, "
        f"dbk.datasets.hest_from_her2st({sections}{where}) writes these samples in HEST's layout from the her2st "
        "files (path=, $DBK_HER2ST, or the copy dbk.datasets.fetch('her2st') keeps); then call this again. Its "
        "docstring says what differs from the hub's files."
    )


class _File:
    """A file of the HEST layout: path relative to the download folder, and whether a sample may lack it."""

    def __init__(self, path: str, *, optional: bool = False, xenium_only: bool = False, alternatives=()) -> None:
        self.path = path
        self.optional = optional
        self.xenium_only = xenium_only
        self.alternatives = tuple(alternatives)  # other local paths that stand for this file

    @property
    def url(self) -> str:
        return f"{HEST_URL}/{self.path}"

    def present(self, root: Path) -> bool:
        return any((root / p).is_file() for p in (self.path, *self.alternatives))


def _layout(sample_id: str, *, load_transcripts: bool, load_cells: bool) -> list[_File]:
    wsi = [f"wsis/{sample_id}{s}" for s in _WSI_SUFFIXES]
    files = [_File(f"metadata/{sample_id}.json"), _File(wsi[0], alternatives=wsi[1:]), _File(f"st/{sample_id}.h5ad")]
    if load_transcripts:
        files.append(_File(f"transcripts/{sample_id}_transcripts.parquet", xenium_only=True))
    if load_cells:
        files.append(_File(f"xenium_seg/{sample_id}_xenium_cell_seg.parquet", xenium_only=True, optional=True))
    return files


def _wanted_files(root: Path, sample_id: str, *, load_transcripts: bool, load_cells: bool) -> list[_File]:
    """The files to have locally; Xenium-only ones are dropped when the local metadata says another technology."""
    files = _layout(sample_id, load_transcripts=load_transcripts, load_cells=load_cells)
    xenium = _is_xenium(root / files[0].path)
    return [f for f in files if not (f.xenium_only and xenium is False)]


def _is_xenium(metadata_path: Path) -> bool | None:
    """``True``/``False`` from the metadata's ``st_technology``; ``None`` if the metadata is not there (yet)."""
    if not metadata_path.is_file():
        return None
    try:
        with open(metadata_path) as f:
            tech = json.load(f).get("st_technology", "")
    except (OSError, ValueError):
        return None
    return "xenium" in str(tech).lower()


def _offline() -> str | None:
    """Name of the environment variable that turns downloads off, if one is set."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return var
    return None


def _link_from_cache(root: Path, missing: list[_File]) -> bool:
    """Link (else copy) into ``root`` the missing files the Hugging Face cache holds; whether any was."""
    from huggingface_hub import try_to_load_from_cache

    found = False
    for f in missing:
        cached = try_to_load_from_cache(HEST_REPO, f.path, repo_type="dataset")
        if not isinstance(cached, str) or not Path(cached).is_file():
            continue
        dest = root / f.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            dest.symlink_to(Path(cached).resolve())
        except OSError:
            shutil.copyfile(cached, dest)
        logger.info(f"HEST: {f.path} from the Hugging Face cache ({cached}) -> {dest}.")
        found = True
    return found


def _listing(root: Path, files: list[_File]) -> str:
    lines = []
    for f in files:
        note = " (Xenium samples only)" if f.xenium_only else ""
        note += ", optional" if f.optional else ""
        lines.append(f"  {root / f.path}{note}\n      <- {f.url}")
    patterns = [f.path for f in files]
    return (
        "\n".join(lines)
        + f"\nFor example, in Python: huggingface_hub.snapshot_download({HEST_REPO!r}, repo_type='dataset', "
        + f"allow_patterns={patterns}, local_dir={str(root)!r})"
        + f"\n(HEST is gated: accept its terms on https://huggingface.co/datasets/{HEST_REPO} and set HF_TOKEN.)"
    )


def _fetch(root: Path, sample_id: str, missing: list[_File], *, token: str | None, timeout: float,
           hint: str = "") -> None:
    token = token or next((os.environ[v] for v in _TOKEN_VARS if os.environ.get(v)), None)
    pending = list(missing)
    while pending:
        f = pending.pop(0)
        try:
            _download(f.path, root, token=token, timeout=timeout)
        except Exception as err:  # classified below and re-raised with the listing
            kind = _failure(err)
            if kind == "missing" and (f.optional or f.xenium_only):
                logger.info(f"HEST sample {sample_id!r} has no {f.path} on the hub; reading without it.")
                continue
            if kind == "refused":
                reason = (
                    f"the hub refused the download ({type(err).__name__}): HEST is gated; accept its terms on "
                    f"https://huggingface.co/datasets/{HEST_REPO} and pass token= or set HF_TOKEN"
                    + ("" if token else " (no token was found)")
                )
            elif kind == "missing":
                reason = f"{f.url} does not exist (HTTP 404): is {sample_id!r} a HEST-1k sample id?"
            elif kind == "unreachable":
                reason = f"the hub cannot be reached and the file is not cached ({type(err).__name__}: {err})"
            else:
                reason = f"{type(err).__name__}: {err}"
            raise ConnectionError(
                f"HEST sample {sample_id!r}: could not download {f.path} ({reason}). "
                f"Fetch these files into {root} by hand, or retry:\n" + _listing(root, [f, *pending]) + hint
            ) from err
        if f.path.startswith("metadata/") and _is_xenium(root / f.path) is False:
            pending = [p for p in pending if not p.xenium_only]


def _failure(err: Exception) -> str:
    """``"unreachable"``, ``"refused"`` (gated, no or a bad token), ``"missing"`` (404) or ``"other"``."""
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(err, LocalEntryNotFoundError):  # no connection (or the hub offline) and nothing cached
        return "unreachable"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, RepositoryNotFoundError) or status in (401, 403):  # GatedRepoError is one; so is a 401
        return "refused"
    if isinstance(err, EntryNotFoundError) or status == 404:
        return "missing"
    return "other"


def _download(path: str, root: Path, *, token: str | None, timeout: float) -> Path:
    """Fetch ``path`` of the HEST dataset into ``root / path`` with :func:`huggingface_hub.hf_hub_download`."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(HEST_REPO, path, repo_type="dataset", local_dir=root, token=token,
                                etag_timeout=timeout))
