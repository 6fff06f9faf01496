"""``dbk.datasets.hest_from_her2st``: the six public her2st sections as HEST-1k samples, built from the her2st files.

The six her2st sections of github.com/almaan/her2st are HEST-1k samples (Jaume et al. 2024): B4 = SPA145,
C2 = SPA141, C3 = SPA140, C4 = SPA139, C5 = SPA138, C6 = SPA137 in HEST's metadata table
(``assets/HEST_v1_1_0.csv`` of github.com/mahmoodlab/HEST). :func:`hest_from_her2st` writes them in HEST's layout
(``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``) from the her2st files, so that code written for HEST
samples (:func:`dbk.datasets.hest`, :func:`dbk.io.read_hest`) runs on them without the Hugging Face hub.

The writer underneath (:func:`write_hest_files`) writes any sample: the files go in atomically (a temporary file
beside the final one, then renamed), each carries a record that dbk wrote it (``dbk_built_from``: a key of the
metadata json, an ``uns`` entry of the h5ad, the TIFF's ``Software`` tag), and a file without that record (a
download from the hub, a user's file) is never replaced. Nothing is ever deleted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._logging import logger
from .._settings import settings
from .._utils import atomic_path

if TYPE_CHECKING:
    import anndata as ad

BUILT_KEY = "dbk_built_from"  # metadata json key / h5ad uns key recording that dbk wrote the file, and from what
SOFTWARE_PREFIX = "dbk "  # the TIFF Software tag of files dbk writes starts with this
TIFF_TILE = 256  # HEST's pyramidal TIFFs (pyvips tiffsave) use 256 px tiles too
PYRAMID_MAX_SIDE = 1024  # halve the image until its longer side is at most this
THUMBNAIL_SIDE = 1000  # HEST's downscaled_fullres in uns["spatial"]["ST"]: longer side 1000 px

# ---- HEST's metadata table, the rows of the six her2st sections --------------------------------------------------
# From assets/HEST_v1_1_0.csv of github.com/mahmoodlab/HEST (its columns are the keys of HEST's metadata json). Empty
# cells of the table (treatment_comment, pixel_size_um_embedded) are left out.
_HER2ST_COMMON: dict[str, Any] = {
    "dataset_title": "Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated cell type "
                     "interactions",
    "organ": "Breast",
    "disease_state": "Cancer",
    "oncotree_code": "IDC",
    "species": "Homo sapiens",
    "st_technology": "Spatial Transcriptomics",
    "data_publication_date": "16-Sep-21",
    "license": "Creative Commons Attribution 4.0 International",
    "study_link": "https://pubmed.ncbi.nlm.nih.gov/34650042/",
    "download_page_link1": "https://zenodo.org/records/4751624",
    "inter_spot_dist": 200.0,
    "spot_diameter": 100.0,
    "preservation_method": "Fresh Frozen",
    "magnification": "20x",
    "tissue": "Breast",
    "disease_comment": "HER2-positive breast cancer",
    "hest_version_added": "v1_0_0",
}
# section: (id, patient, spots_under_tissue, nb_genes, pixel_size_um_estimated, fullres_px_width, fullres_px_height)
_HER2ST_ROWS: dict[str, tuple] = {
    "B4": ("SPA145", "Patient B", 283, 15289, 0.6888828977730672, 9272, 9923),
    "C2": ("SPA141", "Patient C", 187, 15706, 0.6961064252183218, 9274, 9911),
    "C3": ("SPA140", "Patient C", 180, 15821, 0.6690534212479609, 9270, 9936),
    "C4": ("SPA139", "Patient C", 184, 15842, 0.6900578857770314, 9278, 9916),
    "C5": ("SPA138", "Patient C", 181, 15721, 0.6907169913592274, 9272, 9901),
    "C6": ("SPA137", "Patient C", 178, 15772, 0.6982306588663388, 9288, 9907),
}
HER2ST_HEST_IDS: dict[str, str] = {section: row[0] for section, row in _HER2ST_ROWS.items()}  # section -> HEST id
_SECTION_OF_ID = {sid: section for section, sid in HER2ST_HEST_IDS.items()}


def her2st_hest_metadata(section: str) -> dict[str, Any]:
    """HEST's metadata of a her2st section (``"B4"`` or its HEST id ``"SPA145"``), as in HEST's metadata table."""
    section = _SECTION_OF_ID.get(section, section)
    sid, patient, n_spots, n_genes, pixel_size, width, height = _HER2ST_ROWS[section]
    return {
        "dataset_title": _HER2ST_COMMON["dataset_title"],
        "id": sid,
        "image_filename": f"{sid}.tif",
        **{k: v for k, v in _HER2ST_COMMON.items() if k != "dataset_title"},
        "patient": patient,
        "spots_under_tissue": n_spots,
        "nb_genes": n_genes,
        "pixel_size_um_estimated": pixel_size,
        "fullres_px_width": width,
        "fullres_px_height": height,
        "subseries": section,
    }


# ---- the public builder ------------------------------------------------------------------------------------------


def hest_from_her2st(
    sections: str | Iterable[str] | None = None,
    *,
    path: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write the public her2st sections as HEST-1k samples (SPA137-SPA145), in HEST's layout, from the her2st files.

    For machines without access to the HEST hub (offline, or without a Hugging Face token for the gated dataset):
    afterwards ``dbk.datasets.hest(["SPA145", ...])`` and :func:`dbk.io.read_hest` read these samples as they read
    the hub's. Per section (B4 = SPA145, C2 = SPA141, C3 = SPA140, C4 = SPA139, C5 = SPA138, C6 = SPA137), into
    ``root``:

    - ``st/<id>.h5ad``: the spots with counts (the her2st spot file's selected spots that have a counts row; 283,
      187, 180, 184, 181 and 178 spots, as HEST's ``spots_under_tissue``) x the section's genes (symbols as
      ``var_names``), raw counts in ``X`` (sparse CSR); ``obs`` ``in_tissue`` (1), ``array_row`` / ``array_col``
      (the ST array's y / x), ``pxl_row_in_fullres`` / ``pxl_col_in_fullres`` (the spot centre in image pixels,
      from the spot file's ``pixel_y`` / ``pixel_x``), the same centres ``(x, y)`` in ``obsm["spatial"]``, and
      ``uns["spatial"]["ST"]`` with a 1000 px thumbnail and its scale factors (as HEST's files have);
    - ``wsis/<id>.tif``: the her2st H&E JPEG, decoded, as a pyramidal tiled TIFF (256 px tiles, lossless deflate,
      each halved level a reduced-resolution page after level 0, the pyramid OpenSlide and tifffile read) whose
      resolution tags hold HEST's pixel size;
    - ``metadata/<id>.json``: HEST's metadata of the sample, the values of its row in HEST's metadata table
      (``id``, ``patient`` "Patient B" / "Patient C", ``st_technology`` "Spatial Transcriptomics",
      ``pixel_size_um_estimated``, ``spot_diameter`` 100, ``inter_spot_dist`` 200, ``species``, ``organ``,
      ``oncotree_code``, ``license``, ``dataset_title``, ...), plus ``dbk_built_from``, the record of this build.

    Not reproduced from the hub's files: HEST's own processing of the spots (the hub's spot table may differ in
    spot positions, barcodes, ``obs`` / ``var`` columns such as QC metrics, and count dtype), HEST's image file
    (written by HEST's pipeline with pyvips, LZW-compressed; here the JPEG of github.com/almaan/her2st, of the same
    pixel dimensions as the table's ``fullres_px_width`` / ``fullres_px_height``), metadata keys that
    are not columns of the table (and its two empty cells, ``treatment_comment`` and ``pixel_size_um_embedded``),
    and the hub's other folders (``thumbnails/``, ``patches/``, ``tissue_seg/``, ``cellvit_seg/``, ...). The pixel
    size is HEST's estimate; dbk's own estimate from the 200 µm spot pitch (:func:`dbk.io.read_st`) differs from it
    by up to 3% (C3: 0.669 vs 0.687 µm/px): both are in the returned table.

    A sample whose three files are all in ``root`` already is left as it is (nothing is read or written for it), be
    they a download from the hub or an earlier build. Files are written atomically; a file that dbk did not write
    is never replaced, and nothing is deleted.

    Parameters
    ----------
    sections
        her2st sections (``"B4"``, ``"C2"``, ...) or their HEST ids (``"SPA145"``, ...); ``None``: all six.
    path
        A folder holding the her2st sections (``B4/counts.tsv.gz``, ...; checked against the registry's hashes by
        :func:`dbk.datasets.her2st`); default: the folder in the environment variable ``DBK_HER2ST`` if set, else
        the registry's copy in ``dbk.settings.datasetdir / "her2st"`` (downloaded when missing and downloads are on).
        Read only for the samples to write.
    root
        The HEST folder to write into; default ``dbk.settings.datasetdir / "hest"``, where
        :func:`dbk.datasets.hest` looks.
    overwrite
        Write the samples again even if their files are there; only files that dbk wrote are replaced.

    Returns
    -------
    :class:`pandas.DataFrame`
        One row per sample, indexed by HEST id: ``section``, ``patient`` (HEST's), ``status`` (``"built"``, or
        ``"present"`` for a sample left as it was), ``n_spots`` and ``n_genes`` written (``<NA>`` for a sample not
        built now), ``pixel_size_um`` (HEST's estimate, written to the metadata) and ``pixel_size_um_dbk`` (dbk's
        estimate from the spots; NaN for a sample not built now). ``attrs["root"]`` is the folder.

    Raises
    ------
    ValueError
        If a section is not one of the six, or a her2st file differs from the registered one.
    FileExistsError
        If a sample's folder holds files that dbk did not write and the sample is incomplete or ``overwrite=True``
        (naming the files; they are left untouched).
    FileNotFoundError, ConnectionError
        If the her2st files are needed, missing and cannot be downloaded (see :func:`dbk.datasets.fetch`).

    Examples
    --------
    >>> import dbk
    >>> built = dbk.datasets.hest_from_her2st(["B4", "C2"])  # doctest: +SKIP
    >>> slides = dbk.datasets.hest(["SPA145", "SPA141"])  # doctest: +SKIP
    >>> slides["SPA145"].attrs["patient"]  # doctest: +SKIP
    'Patient B'
    """
    names = _sections(sections)
    root = Path(root).expanduser() if root is not None else settings.datasetdir / "hest"
    where = _where(root)
    todo = []
    rows = {}
    for name in names:
        sid = HER2ST_HEST_IDS[name]
        owners = file_owners(root, sid)
        present = [p for p, owner in owners.items() if owner is not None]
        foreign = [p for p, owner in owners.items() if owner == "other"]
        if foreign and (overwrite or len(present) < len(owners)):
            why = "overwrite=True" if overwrite else f"the sample is incomplete (no {_missing(owners)})"
            raise FileExistsError(
                f"HEST sample {sid} (her2st {name}): {root} holds {', '.join(foreign)}, which dbk did not write (a "
                f"download from the HEST hub?), and {why}. dbk neither replaces such files nor mixes them with files "
                "it builds: complete the download with dbk.datasets.hest, or move these files away."
            )
        meta = her2st_hest_metadata(name)
        rows[sid] = {"section": name, "patient": meta["patient"], "status": "present", "n_spots": np.nan,
                     "n_genes": np.nan, "pixel_size_um": meta["pixel_size_um_estimated"],
                     "pixel_size_um_dbk": np.nan}
        if len(present) == len(owners) and not overwrite:
            logger.info(f"hest_from_her2st: {sid} (her2st {name}) is in {where} already; left as it is.")
        else:
            todo.append(name)

    if todo:
        from ._her2st import her2st

        for name in todo:  # one section at a time: a decoded H&E is about 280 MB
            sdata = her2st([name], path=path)[name]  # path=None: $DBK_HER2ST if set, as her2st reads it
            # files of an interrupted earlier build are dbk's own (others raised above): written again
            info = _build_section(sdata, name, root, overwrite=True)
            rows[HER2ST_HEST_IDS[name]].update(status="built", **info)
            logger.info(f"hest_from_her2st: {HER2ST_HEST_IDS[name]} (her2st {name}) -> {where}: "
                        f"st/, wsis/, metadata/ ({info['n_spots']} spots x {info['n_genes']} genes; pixel size "
                        f"{info['pixel_size_um']:.4f} µm/px as HEST's estimate, dbk's from the spots "
                        f"{info['pixel_size_um_dbk']:.4f}).")
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "id"
    for col in ("n_spots", "n_genes"):
        table[col] = table[col].astype("Int64")  # <NA> for a sample left as it was
    table.attrs["root"] = str(root)
    return table


def _build_section(sdata, name: str, root: Path, *, overwrite: bool) -> dict[str, Any]:
    """Write one her2st section read by :func:`dbk.datasets.her2st` as a HEST sample; what was written."""
    from .._constants import PIXEL_SIZE_FIT_KEY

    meta = her2st_hest_metadata(name)
    sid = meta["id"]
    dbk_pixel_size = float(sdata.attrs.get(PIXEL_SIZE_FIT_KEY, {}).get("pixel_size_um", np.nan))
    record = {
        "builder": "dbk.datasets.hest_from_her2st",
        "source": f"her2st section {name} (github.com/almaan/her2st, read by dbk.datasets.her2st)",
        "dbk_version": _dbk_version(),
        "pixel_size_um_dbk_estimate": dbk_pixel_size,
        "note": "built locally from the her2st files, not downloaded from the HEST hub: see the docstring of "
                "dbk.datasets.hest_from_her2st for what differs",
    }
    spots, level0 = write_st_as_hest(sdata, root, sid, metadata=meta, record=record, overwrite=overwrite)
    h, w = level0.shape[:2]
    for what, got, want in (("image width (px)", w, meta["fullres_px_width"]),
                            ("image height (px)", h, meta["fullres_px_height"]),
                            ("spots", spots.n_obs, meta["spots_under_tissue"]),
                            ("genes", spots.n_vars, meta["nb_genes"])):
        if got != want:
            logger.warning(f"hest_from_her2st: her2st {name} has {got} {what}, HEST's table says {want} for {sid}.")
    return {"n_spots": int(spots.n_obs), "n_genes": int(spots.n_vars),
            "pixel_size_um": float(meta["pixel_size_um_estimated"]), "pixel_size_um_dbk": dbk_pixel_size}


def write_st_as_hest(
    sdata,
    root: str | os.PathLike,
    sample_id: str,
    *,
    metadata: Mapping[str, Any],
    record: Mapping[str, Any],
    overwrite: bool = False,
) -> tuple[ad.AnnData, np.ndarray]:
    """Write a spot-based slide read by dbk (:func:`dbk.io.read_st`) as a HEST sample; the spot table and level 0.

    The spot table gets HEST's ``obs`` columns (``in_tissue``, ``array_row`` / ``array_col`` from ``array_y`` /
    ``array_x``, ``pxl_row_in_fullres`` / ``pxl_col_in_fullres`` from ``obsm["spatial"]``), raw counts in ``X``
    and the thumbnail of ``uns["spatial"]["ST"]``; the H&E's level 0 is written with its halvings
    (:func:`pyramid_levels`), at ``metadata["pixel_size_um_estimated"]`` µm/px. See :func:`write_hest_files`.
    """
    import anndata as ad
    import xarray as xr
    from scipy import sparse
    from spatialdata import get_pyramid_levels

    from .._constants import COUNTS_LAYER, IMAGE_KEY, SPATIAL_KEY, TABLE_KEY

    table = sdata.tables[TABLE_KEY]
    counts = table.layers[COUNTS_LAYER] if COUNTS_LAYER in table.layers else table.X
    xy = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(table.n_obs, dtype=np.int64),
            "array_row": table.obs["array_y"].to_numpy(),
            "array_col": table.obs["array_x"].to_numpy(),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        },
        index=pd.Index(table.obs_names.astype(str)),
    )
    spots = ad.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=table.var_names.astype(str)))
    spots.obsm[SPATIAL_KEY] = xy
    image = sdata.images[IMAGE_KEY]
    image = image if isinstance(image, xr.DataArray) else get_pyramid_levels(image, n=0)  # a DataTree: level 0
    level0 = np.ascontiguousarray(np.moveaxis(np.asarray(image.transpose("c", "y", "x")), 0, -1))
    levels = pyramid_levels(level0)
    pixel_size = float(metadata["pixel_size_um_estimated"])
    spots.uns["spatial"] = {"ST": thumbnail_uns(levels, pixel_size, float(metadata.get("spot_diameter", 100.0)))}
    write_hest_files(root, sample_id, levels=levels, spots=spots, metadata=metadata, pixel_size_um=pixel_size,
                     record=record, overwrite=overwrite)
    return spots, level0


# ---- the writer ----------------------------------------------------------------------------------------------------


def hest_paths(root: Path, sample_id: str) -> dict[str, Path]:
    """The three files of a HEST sample that dbk writes: ``{"st": ..., "wsis": ..., "metadata": ...}``."""
    return {"st": root / "st" / f"{sample_id}.h5ad", "wsis": root / "wsis" / f"{sample_id}.tif",
            "metadata": root / "metadata" / f"{sample_id}.json"}


def file_owners(root: Path, sample_id: str) -> dict[str, str | None]:
    """``{relative path: "dbk" | "other" | None}`` for the three files: written by dbk, by someone else, absent."""
    return {f"{kind}/{path.name}": (_owner(path) if path.exists() else None)
            for kind, path in hest_paths(root, sample_id).items()}


def write_hest_files(
    root: str | os.PathLike,
    sample_id: str,
    *,
    levels: list[np.ndarray],
    spots: ad.AnnData,
    metadata: Mapping[str, Any],
    pixel_size_um: float,
    record: Mapping[str, Any],
    overwrite: bool = False,
    compression: str | None = "zlib",
) -> dict[str, Path]:
    """Write one HEST sample: ``st/<id>.h5ad``, ``wsis/<id>.tif`` (pyramidal, tiled) and ``metadata/<id>.json``.

    Each file is written to a temporary file beside its final name and renamed into place, in this order (the
    metadata last). ``record`` (what the sample was built from) goes into the metadata json and the h5ad's ``uns``
    under ``"dbk_built_from"``, and the TIFF's ``Software`` tag names dbk: so dbk knows the files as its own.

    Parameters
    ----------
    root
        The HEST folder.
    sample_id
        The sample's id (a HEST name, see :func:`dbk.io._hest.check_hest_id`).
    levels
        The H&E's pyramid, finest first: ``(h, w, 3)`` uint8 arrays, each level a page of the file.
    spots
        The spot table, written as it is (plus the record in ``uns``).
    metadata
        The metadata json's content (plus the record).
    pixel_size_um
        µm per level-0 pixel, for the TIFF's resolution tags (pixels per centimetre, as HEST writes them).
    record
        What dbk built the sample from (json-serialisable).
    overwrite
        Replace files of this sample that dbk wrote before; without it an existing file is an error.
    compression
        TIFF compression of the tiles (``"zlib"``: lossless deflate; ``None``: none).

    Returns
    -------
    The three paths.

    Raises
    ------
    FileExistsError
        If a target file exists and was not written by dbk, or exists and ``overwrite`` is false.
    """
    from ..io._hest import check_hest_id

    check_hest_id(sample_id)
    root = Path(root)
    paths = hest_paths(root, sample_id)
    for path in paths.values():
        if not path.exists():
            continue
        if _owner(path) != "dbk":
            raise FileExistsError(f"{path} exists and was not written by dbk: dbk does not replace it. Move it away "
                                  f"to write HEST sample {sample_id!r} there.")
        if not overwrite:
            raise FileExistsError(f"{path} exists (written by dbk); pass overwrite=True to write it again.")
    record = dict(record)
    spots = spots.copy()
    spots.uns[BUILT_KEY] = {k: v for k, v in _json_clean(record, nan=True).items() if v is not None}
    with atomic_path(paths["st"]) as tmp:
        spots.write_h5ad(tmp, compression="gzip")
    with atomic_path(paths["wsis"]) as tmp:
        write_pyramid_tiff(tmp, levels, pixel_size_um=pixel_size_um, software=_software(record),
                           compression=compression)
    with atomic_path(paths["metadata"]) as tmp:
        tmp.write_text(json.dumps({**metadata, BUILT_KEY: _json_clean(record)}, indent=2))
    return paths


def write_pyramid_tiff(
    path: str | os.PathLike,
    levels: list[np.ndarray],
    *,
    pixel_size_um: float,
    software: str,
    compression: str | None = "zlib",
) -> None:
    """A tiled RGB TIFF pyramid: level 0, then each halved level as a reduced-resolution page (NewSubfileType 1).

    The layout of libvips' ``tiffsave(pyramid=True)``, which OpenSlide reads as a generic tiled TIFF with all its
    levels (LazySlide, HEST's readers) and tifffile as one series with ``levels``; SubIFDs (the OME layout) would be
    seen by tifffile only. Resolution tags in pixels per centimetre.
    """
    import tifffile

    ppcm = 1e4 / pixel_size_um
    big = sum(level.nbytes for level in levels) > 2**32 - 2**28  # BigTIFF past ~3.7 GB (before compression)
    options = {"photometric": "rgb", "tile": (TIFF_TILE, TIFF_TILE), "compression": compression,
               "resolutionunit": "CENTIMETER", "metadata": None, "maxworkers": settings.n_jobs}
    if compression == "zlib":
        options["predictor"] = True  # horizontal differencing: level 0 of C3 35 MiB instead of 46
    with tifffile.TiffWriter(path, bigtiff=big) as tif:
        for i, level in enumerate(levels):
            scale = level.shape[1] / levels[0].shape[1]
            extra = {"software": software} if i == 0 else {"subfiletype": 1}
            tif.write(level, resolution=(ppcm * scale, ppcm * scale), **options, **extra)


def pyramid_levels(level0: np.ndarray, max_side: int = PYRAMID_MAX_SIDE) -> list[np.ndarray]:
    """``level0`` and its halvings (means of 2 x 2 pixels, odd last rows and columns dropped) down to ``max_side``."""
    levels = [level0]
    while max(levels[-1].shape[:2]) > max_side and min(levels[-1].shape[:2]) >= 2:
        img = levels[-1]
        h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
        acc = img[:h:2, :w:2].astype(np.uint16)
        acc += img[1:h:2, :w:2]
        acc += img[:h:2, 1:w:2]
        acc += img[1:h:2, 1:w:2]
        levels.append(((acc + 2) >> 2).astype(np.uint8))
    return levels


def thumbnail_uns(levels: list[np.ndarray], pixel_size_um: float, spot_diameter_um: float) -> dict[str, Any]:
    """HEST's ``uns["spatial"]["ST"]``: a thumbnail of longer side 1000 px and its scale factors."""
    from PIL import Image

    h, w = levels[0].shape[:2]
    factor = THUMBNAIL_SIDE / max(h, w)
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    source = next((lvl for lvl in reversed(levels) if max(lvl.shape[:2]) >= THUMBNAIL_SIDE), levels[0])
    thumb = np.asarray(Image.fromarray(source).resize(size, Image.Resampling.BOX))
    return {"images": {"downscaled_fullres": thumb},
            "scalefactors": {"spot_diameter_fullres": spot_diameter_um / pixel_size_um,
                             "tissue_downscaled_fullres_scalef": factor}}


# ---- internals -----------------------------------------------------------------------------------------------------


def _sections(sections: str | Iterable[str] | None) -> list[str]:
    if sections is None:
        return list(HER2ST_HEST_IDS)
    names = [sections] if isinstance(sections, str) else list(sections)
    unknown = [s for s in names if s not in HER2ST_HEST_IDS and s not in _SECTION_OF_ID]
    if unknown or not names:
        raise ValueError(
            f"Unknown her2st section(s) {unknown if unknown else names}; the public ones and their HEST ids are "
            + ", ".join(f"{s} ({i})" for s, i in HER2ST_HEST_IDS.items()) + "."
        )
    return list(dict.fromkeys(_SECTION_OF_ID.get(s, s) for s in names))


def _missing(owners: Mapping[str, str | None]) -> str:
    return ", ".join(p for p, owner in owners.items() if owner is None)


def _where(root: Path) -> str:
    """How to name ``root`` in messages: relative to the data folder when it is the default (no machine path)."""
    return "dbk.settings.datasetdir / 'hest'" if root == settings.datasetdir / "hest" else str(root)


def _owner(path: Path) -> str:
    """``"dbk"`` when ``path`` carries dbk's record of writing it, else ``"other"`` (also when unreadable)."""
    try:
        if path.suffix == ".json":
            with open(path) as f:
                content = json.load(f)
            return "dbk" if isinstance(content, dict) and BUILT_KEY in content else "other"
        if path.suffix == ".h5ad":
            import h5py

            with h5py.File(path, "r") as f:
                return "dbk" if f"uns/{BUILT_KEY}" in f else "other"
        if path.suffix == ".tif":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return "dbk" if str(tif.pages[0].software or "").startswith(SOFTWARE_PREFIX) else "other"
    except (OSError, ValueError, KeyError, IndexError):
        return "other"
    return "other"


def _software(record: Mapping[str, Any]) -> str:
    return f"{SOFTWARE_PREFIX}{record.get('dbk_version', '')} {record.get('builder', 'dbk')}".strip()


def _json_clean(value: Any, *, nan: bool = False) -> Any:
    """Plain json types: numpy scalars to Python, non-finite floats to None (kept with ``nan=True``, for h5ad)."""
    if isinstance(value, Mapping):
        return {str(k): _json_clean(v, nan=nan) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_clean(v, nan=nan) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value) and not nan:
        return None
    return value


def _dbk_version() -> str:
    from .. import __version__

    return str(__version__)
