"""``dbk.datasets.hest``: fetch one HEST-1k sample from Hugging Face with pooch, then read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from spatialdata import SpatialData

from .._logging import logger
from .._settings import settings

HEST_REPO = "MahmoodLab/hest"
HEST_URL = f"https://huggingface.co/datasets/{HEST_REPO}/resolve/main"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "DBK_OFFLINE")
_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def hest(
    sample_id: str,
    *,
    root: str | os.PathLike | None = None,
    load_transcripts: bool = True,
    load_cells: bool = True,
    token: str | None = None,
    timeout: float = 30.0,
) -> SpatialData:
    """Download one HEST-1k sample (Jaume et al. 2024) if needed and read it with :func:`dbk.io.read_hest`.

    Files are fetched with pooch from the Hugging Face dataset ``MahmoodLab/hest`` into ``root`` in HEST's layout;
    files already there are never fetched again (nothing is checked online then, so a complete folder works
    offline):

    - ``metadata/{sample_id}.json``, ``wsis/{sample_id}.tif``, ``st/{sample_id}.h5ad``;
    - for Xenium samples (``st_technology`` in the metadata): ``transcripts/{sample_id}_transcripts.parquet`` and,
      if published, ``xenium_seg/{sample_id}_xenium_cell_seg.parquet``.

    HEST is a gated dataset: accept its terms on https://huggingface.co/datasets/MahmoodLab/hest and pass a token
    (``token=`` or the environment variable ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``).

    Parameters
    ----------
    sample_id
        HEST sample id, e.g. ``"TENX95"`` (Xenium, breast) or ``"MEND139"``.
    root
        Folder of the HEST download; default ``dbk.settings.datasetdir / "hest"``.
    load_transcripts
        Fetch and read the transcripts of Xenium samples.
    load_cells
        Fetch and read the Xenium cell segmentation where published.
    token
        Hugging Face access token; default from the environment.
    timeout
        Seconds to wait for the server to answer (connect and each read); there are no retries.

    Returns
    -------
    The sample as read by :func:`dbk.io.read_hest` (H&E image, spots table, transcripts and cells where present).

    Raises
    ------
    FileNotFoundError
        If files are missing and downloads are off (``HF_HUB_OFFLINE`` or ``DBK_OFFLINE`` set); the message lists
        each missing file, its URL and where to put it.
    ConnectionError
        If the server cannot be reached or refuses the download (the same listing, plus the reason).
    """
    if not sample_id or any(ch in str(sample_id) for ch in "/\\"):
        raise ValueError(f"Invalid HEST sample id {sample_id!r}.")
    root = Path(root).expanduser() if root is not None else settings.datasetdir / "hest"
    wanted = _wanted_files(root, sample_id, load_transcripts=load_transcripts, load_cells=load_cells)
    missing = [f for f in wanted if not (root / f.path).is_file()]
    if missing:
        _fetch(root, sample_id, missing, token=token, timeout=timeout)

    from ..io import read_hest

    return read_hest(root, sample_id, load_transcripts=load_transcripts, load_cells=load_cells)


class _File:
    """A file of the HEST layout: path relative to the download folder, and whether a sample may lack it."""

    def __init__(self, path: str, *, optional: bool = False, xenium_only: bool = False) -> None:
        self.path = path
        self.optional = optional
        self.xenium_only = xenium_only

    @property
    def url(self) -> str:
        return f"{HEST_URL}/{self.path}"


def _layout(sample_id: str, *, load_transcripts: bool, load_cells: bool) -> list[_File]:
    files = [_File(f"metadata/{sample_id}.json"), _File(f"wsis/{sample_id}.tif"), _File(f"st/{sample_id}.h5ad")]
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


def _listing(root: Path, files: list[_File]) -> str:
    lines = []
    for f in files:
        note = " (Xenium samples only)" if f.xenium_only else ""
        note += ", optional" if f.optional else ""
        lines.append(f"  {root / f.path}{note}\n      <- {f.url}")
    include = " ".join(f"--include {f.path!r}" for f in files)
    return (
        "\n".join(lines)
        + f"\nFor example: huggingface-cli download {HEST_REPO} --repo-type dataset {include} --local-dir {str(root)!r}"
        + f"\n(HEST is gated: accept its terms on https://huggingface.co/datasets/{HEST_REPO} and set HF_TOKEN.)"
    )


def _fetch(root: Path, sample_id: str, missing: list[_File], *, token: str | None, timeout: float) -> None:
    var = _offline()
    if var is not None:
        raise FileNotFoundError(
            f"HEST sample {sample_id!r}: {len(missing)} file(s) missing in {root} and downloads are off "
            f"({var}={os.environ[var]!r}). Fetch these files into that folder, or unset {var}:\n"
            + _listing(root, missing)
        )
    token = token or next((os.environ[v] for v in _TOKEN_VARS if os.environ.get(v)), None)
    pending = list(missing)
    while pending:
        f = pending.pop(0)
        try:
            _download(f.url, root / f.path, token=token, timeout=timeout)
        except Exception as err:  # classified below and re-raised with the listing
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status == 404 and (f.optional or f.xenium_only):
                logger.info(f"HEST sample {sample_id!r} has no {f.path} on the hub; reading without it.")
                continue
            if status in (401, 403):
                reason = (
                    f"the hub refused the download (HTTP {status}): HEST is gated; accept its terms on "
                    f"https://huggingface.co/datasets/{HEST_REPO} and pass token= or set HF_TOKEN"
                    + ("" if token else " (no token was found)")
                )
            elif status == 404:
                reason = f"{f.url} does not exist (HTTP 404): is {sample_id!r} a HEST-1k sample id?"
            else:
                reason = f"{type(err).__name__}: {err}"
            raise ConnectionError(
                f"HEST sample {sample_id!r}: could not download {f.path} ({reason}). "
                f"Fetch these files into {root} by hand, or retry:\n" + _listing(root, [f, *pending])
            ) from err
        if f.path.startswith("metadata/") and _is_xenium(root / f.path) is False:
            pending = [p for p in pending if not p.xenium_only]


def _download(url: str, dest: Path, *, token: str | None, timeout: float) -> None:
    """Fetch ``url`` to ``dest`` with pooch (one attempt, written atomically)."""
    import pooch

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    downloader = pooch.HTTPDownloader(progressbar=settings.progress, headers=headers, timeout=timeout)
    dest.parent.mkdir(parents=True, exist_ok=True)
    pooch.retrieve(url, known_hash=None, fname=dest.name, path=dest.parent, downloader=downloader)
