"""``dbk.datasets.hest_bench``: a HEST-Benchmark task (Jaume et al. 2024), found locally or fetched from the hub.

HEST-Benchmark is the leaderboard of ``mahmoodlab/HEST`` (``src/hest/bench/benchmark.py``, configured by
``bench_config/bench_config.yaml``); its data is the Hugging Face dataset ``MahmoodLab/hest-bench``, one folder per
task. What this module relies on, each point from HEST's code or the hub's files:

- a task folder ``<root>/<TASK>/`` holds ``var_50genes.json`` (``{"genes": [...]}``: the 50 genes predicted, the
  ``--gene_list`` default of ``benchmark.py``), ``splits/train_{i}.csv`` and ``splits/test_{i}.csv`` (columns
  ``sample_id, patches_path, expr_path``, paths relative to the task folder; ``predict_folds`` reads fold ``i``
  from them), ``patches/<sample>.h5`` and ``adata/<sample>.h5ad``; there is no whole-slide image;
- a patches file holds ``img`` (n, 224, 224, 3) uint8 (112 µm at 0.5 µm/px: HEST README and
  ``HESTData.dump_patches``' defaults ``target_patch_size=224, target_pixel_size=0.5``), ``barcode`` (n, 1) bytes and
  ``coords`` (n, 2): each patch's top-left corner in the source slide's level-0 pixels (hestcore's patcher); the
  source pixel size is in the datasets' attributes (``pixel_size``) only where HEST's patcher wrote it;
- the targets are the ``.h5ad``'s values of the 50 genes at the patches' barcodes, log1p-transformed and nothing
  else: ``load_adata(expr_path, genes, barcodes, normalize=True)`` in ``src/hest/bench/st_dataset.py`` calls
  ``normalize_adata``, which (whatever its docstring says) only applies ``sc.pp.log1p`` to the counts.

The folder names are not the README's labels: ``LUNG`` is the README's LUAD, ``CCRCC`` its ccRCC, ``LYMPH_IDC`` its
"LYMPH IDC".
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from .._logging import logger

HEST_BENCH_REPO = "MahmoodLab/hest-bench"
HEST_BENCH_URL = f"https://huggingface.co/datasets/{HEST_BENCH_REPO}/resolve/main"
#: the tasks of ``bench_config/bench_config.yaml`` (``datasets``), as folders of ``MahmoodLab/hest-bench``
HEST_BENCH_TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC")
#: a task folder of the hub dataset that ``bench_config.yaml`` does not list (in the README's 2024-06 table)
HEST_BENCH_OTHER_TASKS = ("HCC",)
#: the README's labels (upper-cased, spaces as ``_``) that differ from the folder names
HEST_BENCH_ALIASES = {"LUAD": "LUNG", "LYMPH": "LYMPH_IDC", "LYMPHIDC": "LYMPH_IDC", "LYMPH-IDC": "LYMPH_IDC"}
#: side of a HEST-Benchmark patch in µm (README: "112 x 112 um regions at 0.5 um/px")
PATCH_SIZE_UM = 112.0
GENES_FILE = "var_50genes.json"
SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")
# dataset names HEST's readers accept (st_dataset.H5PatchDataset: "img" / "imgs" / "images", "barcode(s)")
_IMG_KEYS = ("img", "imgs", "images")
_BARCODE_KEYS = ("barcode", "barcodes")
_PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")  # HEST-1k metadata/<id>.json


class HestBenchTask:
    """One HEST-Benchmark task on disk: its genes, its split files and its samples, read lazily.

    Made by :func:`dbk.datasets.hest_bench`; :func:`dbk.tl.benchmark` takes it as its data and runs HEST's protocol
    (the task's folds, genes and targets; its metric ``pearson_mean_hest``). Nothing but the gene list and the split
    files is read when it is made.

    How a task becomes dbk input (:meth:`to_spatialdata`): the patches *are* the tiles. Each sample becomes a
    SpatialData whose image ``"he"`` is a mosaic of its patches (patch ``i`` at row ``i // n_cols``, column
    ``i % n_cols`` of a grid; read from the ``.h5`` on demand, one patch per dask chunk, never all at once), with
    pixel size ``112 µm / patch side`` (0.5 µm/px for HEST's 224 px patches), one tile per patch over exactly its
    pixels (``shapes["dbk_tiles"]``), and a tile table whose ``X`` is HEST's target: ``log1p`` of the raw counts of
    the task's genes at the patch's barcode. A mosaic is no tissue: neighbouring tiles in it are not neighbours on
    the slide, so the tables carry the patches' own positions in µm in ``obsm["spatial_um"]`` (the patch centre:
    ``coords * pixel size + 56 µm``), which every spatial-context computation of dbk uses where a table has them.
    That needs the source slide's pixel size, which the task folder does not hold: it comes from ``pixel_size_um=``,
    else the patches file's attributes (``pixel_size``, where HEST's patcher wrote it), else HEST-1k's metadata
    (``metadata/<sample>.json``, ``pixel_size_um_estimated``) in a local HEST download; where none has it the
    sample's positions are NaN and a run on it uses no spatial context (:func:`dbk.tl.benchmark` says so).

    Parameters
    ----------
    name
        The task's folder name (``"IDC"``, ``"LUNG"`` ...).
    path
        The task folder.
    pixel_size_um
        ``{sample: µm per source-slide pixel}`` given by the user (they win over the files').
    hest_root
        A HEST-1k download whose ``metadata/<sample>.json`` give source pixel sizes.

    Attributes
    ----------
    genes
        The task's genes, in the order of ``var_50genes.json``.
    splits
        ``[(train sample ids, test sample ids)]``, fold ``i`` from ``splits/train_{i}.csv`` / ``test_{i}.csv``, each
        list in the file's row order.
    samples
        ``DataFrame`` indexed by ``sample_id`` with the absolute ``patches_path`` and ``expr_path``.
    pixel_size_um
        ``{sample: source-slide µm per pixel or None}``.
    pixel_size_source
        ``{sample: where that pixel size came from}`` (``"pixel_size_um="``, the patches file, the metadata file, or
        ``"unknown"``).
    """

    def __init__(self, name: str, path: str | os.PathLike, *, pixel_size_um: Mapping[str, float] | None = None,
                 hest_root: str | os.PathLike | None = None) -> None:
        self.name = str(name)
        self.path = Path(path)
        self.genes = read_genes(self.path)
        self.splits, self.samples = read_splits(self.path)
        self.hest_root = None if hest_root is None else Path(hest_root)
        self._given = dict(pixel_size_um or {})
        unknown = sorted(set(self._given) - set(self.samples.index))
        if unknown:
            raise KeyError(f"pixel_size_um names samples {unknown} that are not in task {self.name!r} (samples: "
                           f"{list(self.samples.index)}).")
        self._pixel_sizes: dict[str, tuple[float | None, str]] | None = None
        self._slides: dict | None = None

    def __repr__(self) -> str:
        return (f"HestBenchTask({self.name!r}: {len(self.samples)} samples, {len(self.splits)} folds, "
                f"{len(self.genes)} genes, {self.path})")

    # ---- what the folder says -----------------------------------------------------------------------------------

    def folds(self) -> dict[str, dict[str, list[str]]]:
        """The shipped splits as :func:`dbk.tl.benchmark` folds.

        Returns
        -------
        dict
            ``{"split{i}": {"train": [...], "test": [...]}}`` (HEST's ``split{i}`` result folders), in file order.
        """
        return {f"split{i}": {"train": list(tr), "test": list(te)} for i, (tr, te) in enumerate(self.splits)}

    @property
    def pixel_size_um(self) -> dict[str, float | None]:
        """``{sample: source-slide µm per pixel, or None where no file says it}``."""
        return {s: v for s, (v, _) in self._resolve_pixel_sizes().items()}

    @property
    def pixel_size_source(self) -> dict[str, str]:
        """``{sample: where its source pixel size came from}``."""
        return {s: src for s, (_, src) in self._resolve_pixel_sizes().items()}

    def _resolve_pixel_sizes(self) -> dict[str, tuple[float | None, str]]:
        if self._pixel_sizes is None:
            out = {}
            for sid in self.samples.index:
                if sid in self._given:
                    out[sid] = (_positive(self._given[sid], f"pixel_size_um[{sid!r}]"), "pixel_size_um=")
                    continue
                px, src = _h5_pixel_size(self.samples.loc[sid, "patches_path"])
                if px is None:
                    px, src = _metadata_pixel_size(self.hest_root, sid)
                out[sid] = (px, src)
            self._pixel_sizes = out
        return self._pixel_sizes

    # ---- one sample -------------------------------------------------------------------------------------------

    def _sample(self, sample_id: str) -> pd.Series:
        if sample_id not in self.samples.index:
            raise KeyError(f"No sample {sample_id!r} in HEST-Benchmark task {self.name!r} (samples: "
                           f"{list(self.samples.index)}).")
        return self.samples.loc[sample_id]

    def patches(self, sample_id: str) -> dict[str, np.ndarray]:
        """The patches file of a sample, read into memory.

        Parameters
        ----------
        sample_id
            A sample of the task.

        Returns
        -------
        dict
            ``"img"``: (n, S, S, 3) uint8; ``"barcode"``: (n,) str; ``"coords"``: (n, 2) as stored (top-left corner
            in source-slide level-0 pixels).
        """
        import h5py

        path = self._sample(sample_id)["patches_path"]
        meta = _patch_meta(path)
        with h5py.File(path, "r") as f:
            img = np.asarray(f[meta["img_key"]][()])
        return {"img": img, "barcode": meta["barcode"], "coords": meta["coords"]}

    def counts(self, sample_id: str) -> pd.DataFrame:
        """The ``.h5ad``'s values of the task's genes at the patches' barcodes, in the patches' order.

        The alignment of HEST's ``load_adata(expr_path, genes, barcodes)`` (``src/hest/bench/st_dataset.py``): rows
        by barcode (the ``.h5ad``'s own row order does not matter), columns by gene name.

        Parameters
        ----------
        sample_id
            A sample of the task.

        Returns
        -------
        pandas.DataFrame
            Patches x genes (float64), index the barcodes of the patches file.

        Raises
        ------
        KeyError
            If a barcode of the patches or a gene of the task is not in the ``.h5ad`` (naming them and the file).
        """
        import anndata as ad
        import scipy.sparse as sp

        row = self._sample(sample_id)
        barcodes = _patch_meta(row["patches_path"])["barcode"]
        adata = ad.read_h5ad(row["expr_path"], backed="r")
        try:
            obs = pd.Index(adata.obs_names.astype(str))
            if obs.has_duplicates:
                raise ValueError(f"{row['expr_path']} has duplicated barcodes (obs_names), e.g. "
                                 f"{list(obs[obs.duplicated()][:3])}; they cannot be matched to patches.")
            missing = pd.Index(barcodes).difference(obs)
            if len(missing):
                raise KeyError(f"Sample {sample_id!r}: {len(missing)} of the {len(barcodes)} patch barcodes of "
                               f"{row['patches_path']} are not in {row['expr_path']} (e.g. {list(missing[:3])}).")
            var = pd.Index(adata.var_names.astype(str))
            absent = [g for g in self.genes if g not in var]
            if absent:
                raise KeyError(f"Sample {sample_id!r}: {len(absent)} of the task's genes are not in "
                               f"{row['expr_path']}: {absent[:10]}.")
            rows = obs.get_indexer(barcodes)
            cols = var.get_indexer(self.genes)
            order = np.argsort(rows)  # backed reads want increasing indices
            x = adata.X[np.sort(rows)]
            x = x.tocsc()[:, cols].toarray() if sp.issparse(x) else np.asarray(x)[:, cols]
            x = np.asarray(x, dtype=np.float64)
            out = np.empty_like(x)
            out[order] = x
        finally:
            adata.file.close()
        return pd.DataFrame(out, index=pd.Index(barcodes, name="barcode"), columns=list(self.genes))

    def targets(self, sample_id: str) -> pd.DataFrame:
        """HEST's targets of a sample: ``log1p`` of :meth:`counts` (no library-size normalisation).

        Parameters
        ----------
        sample_id
            A sample of the task.

        Returns
        -------
        pandas.DataFrame
            Patches x genes (float64), index the barcodes of the patches file.
        """
        return np.log1p(self.counts(sample_id))

    def to_spatialdata(self, sample_id: str):
        """A sample as a dbk slide: the patches as tiles of a mosaic image, HEST's targets in the tile table.

        See the class docstring for the layout. Nothing of the patches is read until a tile is.

        Parameters
        ----------
        sample_id
            A sample of the task.

        Returns
        -------
        spatialdata.SpatialData
            ``images["he"]`` (the mosaic, lazy), ``shapes["dbk_tiles"]`` (one tile per patch, in the patches file's
            order; column ``barcode``) and ``tables["dbk_table"]``: ``X`` the targets (float32), ``layers["counts"]``
            the values of the ``.h5ad``, ``obs`` ``sample``, ``barcode``, ``n_transcripts`` (the spot's total over
            all genes of the ``.h5ad``) and ``tissue_fraction`` (NaN), ``obsm["spatial"]`` the tile centres in mosaic
            pixels, ``obsm["spatial_um"]`` the patch centres on the slide in µm (NaN when the pixel size is unknown)
            and ``obsm["hest_coords"]`` the stored ``coords``; ``attrs`` ``sample`` and ``hest_bench`` (task,
            source pixel size and where it came from).
        """
        return _to_spatialdata(self, sample_id)

    def slides(self) -> dict:
        """Every sample as :meth:`to_spatialdata` makes it, made once and kept.

        :func:`dbk.tl.benchmark` writes its held-out predictions into these slides' tables.

        Returns
        -------
        dict
            ``{sample_id: SpatialData}`` in the order of :attr:`samples`.
        """
        if self._slides is None:
            self._slides = {sid: self.to_spatialdata(sid) for sid in self.samples.index}
        return self._slides


# ---- reading the task folder ----------------------------------------------------------------------------------------


def read_genes(folder: Path) -> list[str]:
    """The genes of ``var_50genes.json`` (``{"genes": [...]}``)."""
    path = folder / GENES_FILE
    try:
        with open(path) as f:
            genes = json.load(f)["genes"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected a JSON object {{\"genes\": [...]}} (HEST-Benchmark's gene list), could not "
                         f"read it ({type(err).__name__}: {err}).") from err
    genes = [str(g) for g in genes]
    if not genes or len(set(genes)) != len(genes):
        raise ValueError(f"{path}: the gene list is empty or has duplicates.")
    return genes


def split_files(folder: Path) -> list[tuple[Path, Path]]:
    """``[(train_i.csv, test_i.csv)]`` for i = 0, 1, ... in ``folder/splits`` (every pair; none missing)."""
    d = folder / "splits"
    if not d.is_dir():
        return []
    nums = set()
    for p in d.glob("*_*.csv"):
        kind, _, num = p.stem.partition("_")
        if kind in ("train", "test") and num.isdigit():
            nums.add(int(num))
    out = []
    for i in range(max(nums) + 1 if nums else 0):
        tr, te = d / f"train_{i}.csv", d / f"test_{i}.csv"
        if not (tr.is_file() and te.is_file()):
            missing = [str(p) for p in (tr, te) if not p.is_file()]
            raise FileNotFoundError(f"HEST-Benchmark splits in {d} are incomplete: {missing} missing (HEST reads fold "
                                    "i from train_{i}.csv and test_{i}.csv, i = 0, 1, ...).")
        out.append((tr, te))
    return out


def read_splits(folder: Path) -> tuple[list[tuple[list[str], list[str]]], pd.DataFrame]:
    """The folds of ``folder/splits`` and the samples they name (absolute paths)."""
    from ..io._hest import check_hest_id

    pairs = split_files(folder)
    if not pairs:
        raise FileNotFoundError(f"No HEST-Benchmark splits in {folder / 'splits'} (train_0.csv, test_0.csv ...).")
    rows: dict[str, tuple[str, str]] = {}
    folds = []
    for tr, te in pairs:
        ids = []
        for path in (tr, te):
            df = pd.read_csv(path, dtype=str)
            missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
            if missing:
                raise ValueError(f"{path} lacks the columns {missing} (HEST's split files have {list(SPLIT_COLUMNS)}).")
            names = []
            for sid, patches, expr in df[list(SPLIT_COLUMNS)].itertuples(index=False):
                sid = check_hest_id(str(sid).strip())
                paths = (str(folder / str(patches).strip()), str(folder / str(expr).strip()))
                if rows.setdefault(sid, paths) != paths:
                    raise ValueError(f"Sample {sid!r} has other files in {path} ({paths}) than in another split file "
                                     f"({rows[sid]}).")
                names.append(sid)
            ids.append(names)
        train, test = ids
        both = sorted(set(train) & set(test))
        if both:
            raise ValueError(f"{tr.name} and {te.name} both list {both}: a fold cannot train on its test samples.")
        if not train or not test:
            raise ValueError(f"{tr.name} / {te.name}: a fold needs training and test samples.")
        folds.append((train, test))
    samples = pd.DataFrame.from_dict(rows, orient="index", columns=["patches_path", "expr_path"])
    samples.index.name = "sample_id"
    return folds, samples


def _positive(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{what} must be a positive number of µm per pixel, got {value!r}.")
    return float(value)


def _patch_meta(path) -> dict:
    """Names, shape, barcodes, coords and attributes of a HEST patches ``.h5`` (the images are not read)."""
    import h5py

    with h5py.File(path, "r") as f:
        img_key = next((k for k in _IMG_KEYS if k in f), None)
        bc_key = next((k for k in _BARCODE_KEYS if k in f), None)
        if img_key is None or bc_key is None or "coords" not in f:
            raise ValueError(f"{path}: a HEST patches file holds 'img', 'barcode' and 'coords'; found {list(f)}.")
        shape = tuple(f[img_key].shape)
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or f[img_key].dtype != np.uint8:
            raise ValueError(f"{path}: {img_key!r} must be (n, S, S, 3) uint8 patches, got {shape} "
                             f"{f[img_key].dtype}.")
        raw = np.asarray(f[bc_key][()]).reshape(len(f[bc_key]), -1)[:, 0]
        barcode = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in raw], dtype=object)
        coords = np.asarray(f["coords"][()])
        attrs = {k: dict(f[k].attrs) for k in (img_key, "coords")}
    if len(barcode) != shape[0] or coords.shape != (shape[0], 2):
        raise ValueError(f"{path}: {shape[0]} patches but {len(barcode)} barcodes and coords of shape {coords.shape}.")
    if pd.Index(barcode).has_duplicates:
        dup = pd.Index(barcode)[pd.Index(barcode).duplicated()]
        raise ValueError(f"{path}: duplicated barcodes, e.g. {list(dup[:3])}.")
    return {"img_key": img_key, "n": shape[0], "size": shape[1], "barcode": barcode, "coords": coords, "attrs": attrs}


def _h5_pixel_size(path) -> tuple[float | None, str]:
    """The source pixel size HEST's patcher records in the patches file (``pixel_size`` of ``img`` or ``coords``)."""
    try:
        attrs = _patch_meta(path)["attrs"]
    except (OSError, ValueError):
        return None, "unknown"
    for key, a in attrs.items():
        v = a.get("pixel_size")
        try:
            v = float(np.asarray(v).ravel()[0])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(v) and v > 0:
            return v, f"{Path(path).name}: {key}.attrs['pixel_size']"
    return None, "unknown"


def _metadata_pixel_size(hest_root: Path | None, sample_id: str) -> tuple[float | None, str]:
    """``pixel_size_um_estimated`` (else ``_embedded``) of HEST-1k's ``metadata/<sample>.json`` under ``hest_root``."""
    from .._settings import settings

    root = hest_root if hest_root is not None else settings.datasetdir / "hest"
    path = root / "metadata" / f"{sample_id}.json"
    if not path.is_file():
        return None, "unknown"
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None, "unknown"
    for key in _PIXEL_SIZE_KEYS:
        try:
            v = float(meta.get(key))
        except (TypeError, ValueError):
            continue
        if math.isfinite(v) and v > 0:
            return v, f"{path}: {key}"
    return None, "unknown"


# ---- the mosaic -----------------------------------------------------------------------------------------------------


class _Mosaic:
    """A (3, rows * S, cols * S) uint8 array-like over a ``.h5``'s patches (patch i at row i // cols, col i % cols).

    Any ``[c, y, x]`` slice (unit steps) is read from the patches it covers; cells past the last patch are white.
    Picklable (the file is opened per read), for ``dask.array.from_array``.
    """

    def __init__(self, path: str, img_key: str, n: int, size: int, n_cols: int) -> None:
        self.path, self.img_key, self.n, self.size, self.n_cols = str(path), img_key, int(n), int(size), int(n_cols)
        self.n_rows = -(-self.n // self.n_cols)
        self.shape = (3, self.n_rows * self.size, self.n_cols * self.size)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key):
        import h5py

        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        cs, ys, xs = key
        if not all(isinstance(k, slice) for k in (ys, xs)):
            raise TypeError("The patch mosaic reads slices in y and x only.")
        y0, y1, sy = ys.indices(self.shape[1])
        x0, x1, sx = xs.indices(self.shape[2])
        if sy != 1 or sx != 1:
            raise TypeError("The patch mosaic reads unit-step slices only.")
        out = np.full((3, max(y1 - y0, 0), max(x1 - x0, 0)), 255, np.uint8)
        s = self.size
        if out.shape[1] and out.shape[2]:
            cells = [(r, c) for r in range(y0 // s, (y1 - 1) // s + 1) for c in range(x0 // s, (x1 - 1) // s + 1)
                     if r * self.n_cols + c < self.n]
            if cells:
                with h5py.File(self.path, "r") as f:
                    data = f[self.img_key]
                    for r, c in cells:
                        patch = np.asarray(data[r * self.n_cols + c]).transpose(2, 0, 1)
                        py0, py1 = max(y0, r * s), min(y1, (r + 1) * s)
                        px0, px1 = max(x0, c * s), min(x1, (c + 1) * s)
                        out[:, py0 - y0:py1 - y0, px0 - x0:px1 - x0] = patch[:, py0 - r * s:py1 - r * s,
                                                                             px0 - c * s:px1 - c * s]
        return out[cs]


def _to_spatialdata(task: HestBenchTask, sample_id: str):
    import dask.array as da
    import geopandas as gpd
    import shapely
    from dask.base import tokenize
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity, Scale

    from .._constants import (
        COUNTS_LAYER,
        IMAGE_KEY,
        N_TRANSCRIPTS_COL,
        PIXEL_CS,
        SAMPLE_COL,
        TILES_KEY,
        TILES_TABLE_KEY,
        TISSUE_FRACTION_COL,
        UM_CS,
        UM_PER_PX_KEY,
        UNS_KEY,
    )
    from ..pp._tile_table import tile_table, write_tile_table

    row = task._sample(sample_id)
    meta = _patch_meta(row["patches_path"])
    n, size = meta["n"], meta["size"]
    n_cols = max(1, math.ceil(math.sqrt(n)))
    mosaic = _Mosaic(row["patches_path"], meta["img_key"], n, size, n_cols)
    px = PATCH_SIZE_UM / size  # µm per pixel of the patches, so of the mosaic
    transforms = {PIXEL_CS: Identity(), UM_CS: Scale([px, px], axes=("y", "x"))}
    stat = os.stat(row["patches_path"])  # the file's identity in the dask name: a rewritten file is another array
    arr = da.from_array(mosaic, chunks=(3, size, size), asarray=False, fancy=False, lock=False,
                        name=f"hest-bench-{task.name}-{sample_id}-"
                             f"{tokenize(str(row['patches_path']), stat.st_mtime_ns, stat.st_size)}")
    image = Image2DModel.parse(arr, dims=("c", "y", "x"), transformations=transforms)
    i = np.arange(n)
    x0, y0 = (i % n_cols) * size, (i // n_cols) * size
    gdf = gpd.GeoDataFrame({"x0": x0, "y0": y0, "x1": x0 + size, "y1": y0 + size, "barcode": meta["barcode"],
                            TISSUE_FRACTION_COL: np.full(n, np.nan)},
                           geometry=shapely.box(x0, y0, x0 + size, y0 + size), index=pd.RangeIndex(n))
    tiles = ShapesModel.parse(gdf, transformations=dict(transforms))
    source_px, source = task._resolve_pixel_sizes()[sample_id]
    tiles.attrs["dbk"] = {"image_key": IMAGE_KEY, "tile_size_px": int(size), "mode": "hest_bench",
                          "hest_bench": {"task": task.name, "sample": sample_id, "n_cols": int(n_cols)}}
    sdata = SpatialData(images={IMAGE_KEY: image}, shapes={TILES_KEY: tiles})

    counts = task.counts(sample_id)
    total = _total_counts(row["expr_path"], meta["barcode"])
    table = tile_table(sdata, TILES_KEY, np.log1p(counts.to_numpy()).astype(np.float32),
                       obs={SAMPLE_COL: pd.Categorical([sample_id] * n), "barcode": meta["barcode"],
                            N_TRANSCRIPTS_COL: total, TISSUE_FRACTION_COL: np.full(n, np.nan)},
                       var=pd.DataFrame(index=pd.Index(task.genes)))
    table.layers[COUNTS_LAYER] = counts.to_numpy().astype(np.float32)
    coords = np.asarray(meta["coords"], np.float64)
    table.obsm["hest_coords"] = coords
    table.obsm["spatial_um"] = (coords * source_px + PATCH_SIZE_UM / 2 if source_px is not None
                                else np.full((n, 2), np.nan))
    table.uns[UNS_KEY] = {UM_PER_PX_KEY: px, "hest_bench": {"task": task.name, "sample": sample_id,
                                                           "source_pixel_size_um": source_px,
                                                           "source_pixel_size_from": source}}
    write_tile_table(sdata, table, TILES_KEY, TILES_TABLE_KEY)
    sdata.attrs["sample"] = sample_id
    sdata.attrs["hest_bench"] = {"task": task.name, "source_pixel_size_um": source_px,
                                 "source_pixel_size_from": source}
    return sdata


def _total_counts(expr_path: str, barcodes: np.ndarray) -> np.ndarray:
    """Each patch's total over all genes of the ``.h5ad`` (its library size)."""
    import anndata as ad

    adata = ad.read_h5ad(expr_path, backed="r")
    try:
        rows = pd.Index(adata.obs_names.astype(str)).get_indexer(barcodes)
        order = np.argsort(rows)
        x = adata.X[np.sort(rows)]
        tot = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
        out = np.empty_like(tot)
        out[order] = tot
    finally:
        adata.file.close()
    return out


# ---- finding the files ----------------------------------------------------------------------------------------------


def _task_name(task: str, root: Path) -> str:
    """The folder name of a task: HEST's folder names, README labels mapped to them, or a local folder's name."""
    from ..io._hest import check_hest_id

    check_hest_id(task, "HEST-Benchmark task")
    if (root / task).is_dir():
        return task
    key = task.upper().replace(" ", "_")
    known = (*HEST_BENCH_TASKS, *HEST_BENCH_OTHER_TASKS)
    if key in known:
        return key
    if key.replace("_", "") in HEST_BENCH_ALIASES or key in HEST_BENCH_ALIASES:
        name = HEST_BENCH_ALIASES.get(key) or HEST_BENCH_ALIASES[key.replace("_", "")]
        logger.info(f"hest_bench: task {task!r} is HEST-Benchmark's folder {name!r}.")
        return name
    raise ValueError(f"Unknown HEST-Benchmark task {task!r}: the tasks (folders of {HEST_BENCH_REPO}) are "
                     f"{list(HEST_BENCH_TASKS)} (bench_config.yaml) and {list(HEST_BENCH_OTHER_TASKS)}; the README's "
                     f"LUAD is the folder LUNG. A task folder of another name is read when it is in {root}.")


def _sample_files(folder: Path) -> list[str]:
    """The files the split files name, relative to the task folder."""
    _, samples = read_splits(folder)
    out = []
    for p, e in samples[["patches_path", "expr_path"]].itertuples(index=False):
        out += [os.path.relpath(p, folder), os.path.relpath(e, folder)]
    return list(dict.fromkeys(out))


def _listing(root: Path, name: str, files: list[str], *, splits_unknown: bool = False) -> str:
    lines = [f"  {root / name / f}\n      <- {HEST_BENCH_URL}/{name}/{f}" for f in files]
    if splits_unknown:
        lines.append(f"  {root / name / 'splits'}/train_{{i}}.csv, test_{{i}}.csv (i = 0, 1, ...)\n"
                     f"      <- {HEST_BENCH_URL}/{name}/splits/")
    return ("\n".join(lines)
            + f"\nFor example, in Python: huggingface_hub.snapshot_download({HEST_BENCH_REPO!r}, repo_type='dataset', "
            + f"allow_patterns=['{name}/*'], local_dir={str(root)!r})"
            + f"\n(If the hub refuses: accept the dataset's terms on https://huggingface.co/datasets/{HEST_BENCH_REPO} "
            + "and set HF_TOKEN.)")


def _link_from_cache(root: Path, name: str, files: list[str]) -> bool:
    """Link (else copy) into ``root/name`` the files the Hugging Face cache holds; whether any was."""
    from huggingface_hub import try_to_load_from_cache

    found = False
    for f in files:
        cached = try_to_load_from_cache(HEST_BENCH_REPO, f"{name}/{f}", repo_type="dataset")
        if not isinstance(cached, str) or not Path(cached).is_file():
            continue
        dest = root / name / f
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            dest.symlink_to(Path(cached).resolve())
        except OSError:
            shutil.copyfile(cached, dest)
        logger.info(f"hest_bench: {name}/{f} from the Hugging Face cache ({cached}) -> {dest}.")
        found = True
    return found


def _cached_head(root: Path, name: str) -> None:
    """The gene list and split files from the Hugging Face cache (split files tried from train_0 until one is not)."""
    files = [GENES_FILE]
    i = 0
    while i < 100:
        pair = [f"splits/train_{i}.csv", f"splits/test_{i}.csv"]
        if not _link_from_cache(root, name, pair):
            break
        i += 1
    _link_from_cache(root, name, files)


def _fetch_error(err: Exception, root: Path, name: str, files: list[str], token, *, splits_unknown=False):
    from ._hest import _failure

    kind = _failure(err)
    if kind == "refused":
        reason = (f"the hub refused the download ({type(err).__name__}); accept the dataset's terms on "
                  f"https://huggingface.co/datasets/{HEST_BENCH_REPO} and pass token= or set HF_TOKEN"
                  + ("" if token else " (no token was found)"))
    elif kind == "missing":
        reason = f"a file does not exist on the hub (HTTP 404): is {name!r} a task of {HEST_BENCH_REPO}?"
    elif kind == "unreachable":
        reason = f"the hub cannot be reached and the files are not cached ({type(err).__name__}: {err})"
    else:
        reason = f"{type(err).__name__}: {err}"
    return ConnectionError(f"HEST-Benchmark task {name!r}: could not download its files ({reason}). Fetch them into "
                           f"{root / name} by hand, or retry:\n"
                           + _listing(root, name, files, splits_unknown=splits_unknown))


def hest_bench(
    task: str,
    *,
    root: str | os.PathLike | None = None,
    token: str | None = None,
    pixel_size_um: float | Mapping[str, float] | None = None,
    hest_root: str | os.PathLike | None = None,
    timeout: float = 30.0,
) -> HestBenchTask:
    """A HEST-Benchmark task: found in ``root``, else fetched from the hub (``MahmoodLab/hest-bench``).

    Found as :func:`dbk.datasets.hest` finds HEST-1k samples: files already in ``root`` are never fetched again
    (nothing is checked online, so a complete folder works offline); files the Hugging Face cache holds are linked
    into ``root`` without network; the others are downloaded with :mod:`huggingface_hub` (``local_dir=root``) unless
    downloads are off (``HF_HUB_OFFLINE`` or ``DBK_OFFLINE`` set), which raises at once with the list of the files
    to put there. First the gene list and the split files, then the patches and expression files they name.

    The local copy must have the hub's layout (``src/hest/bench/benchmark.py`` reads the same files)::

        <root>/<TASK>/var_50genes.json          {"genes": [50 gene names]}
        <root>/<TASK>/splits/train_{i}.csv      sample_id,patches_path,expr_path   (i = 0, 1, ...)
        <root>/<TASK>/splits/test_{i}.csv
        <root>/<TASK>/patches/<sample>.h5       img (n, 224, 224, 3) uint8, barcode (n, 1), coords (n, 2)
        <root>/<TASK>/adata/<sample>.h5ad       raw counts, obs_names the barcodes

    so a copy made with ``huggingface_hub.snapshot_download("MahmoodLab/hest-bench", repo_type="dataset",
    local_dir=root)``, or HEST's own ``bench_data_root``, can be given as ``root``.

    Parameters
    ----------
    task
        The task's folder name: ``"IDC"``, ``"PRAD"``, ``"PAAD"``, ``"SKCM"``, ``"COAD"``, ``"READ"``, ``"CCRCC"``,
        ``"LUNG"``, ``"LYMPH_IDC"`` (``bench_config.yaml``'s tasks; ``"HCC"`` is on the hub too). The README's
        labels are mapped to them (``"LUAD"`` is ``"LUNG"``; case is ignored). A folder of another name is read
        when it is in ``root``.
    root
        The folder holding the task folders; default ``dbk.settings.datasetdir / "hest_bench"``.
    token
        Hugging Face access token; default from the environment (``HF_TOKEN``) or ``huggingface_hub``'s login.
    pixel_size_um
        µm per pixel of the source slides (``{sample: value}``, or one value for all), for the patches' positions;
        by default from the patches files' attributes, else from HEST-1k's ``metadata/<sample>.json`` under
        ``hest_root``; samples without any have no positions (see :class:`HestBenchTask`).
    hest_root
        A HEST-1k download (:func:`dbk.datasets.hest`'s ``root``) whose ``metadata/`` gives pixel sizes; default
        ``dbk.settings.datasetdir / "hest"``.
    timeout
        Seconds to wait for the hub to answer a file's metadata request.

    Returns
    -------
    HestBenchTask
        The task (genes, folds, samples); the samples are read when used. Pass it to :func:`dbk.tl.benchmark`.

    Raises
    ------
    FileNotFoundError
        If files are missing and downloads are off, listing each file, where it goes and its URL.
    ConnectionError
        If the hub cannot be reached or refuses the download (the same listing, plus the reason).
    ValueError
        If ``task`` names no HEST-Benchmark task and no local folder, or a file is malformed (naming it).

    Examples
    --------
    >>> task = dbk.datasets.hest_bench("IDC")  # doctest: +SKIP
    >>> task.folds()["split0"]  # doctest: +SKIP
    >>> res = dbk.tl.benchmark(task, fm="hf-hub:MahmoodLab/UNI")  # doctest: +SKIP
    >>> dbk.tl.hest_summary(res)  # doctest: +SKIP
    """
    from .._settings import settings
    from ._hest import _TOKEN_VARS, _offline

    root = Path(root).expanduser() if root is not None else settings.datasetdir / "hest_bench"
    name = _task_name(task, root)
    folder = root / name
    token = token or next((os.environ[v] for v in _TOKEN_VARS if os.environ.get(v)), None)

    # 1. the gene list and the split files
    if not ((folder / GENES_FILE).is_file() and split_files(folder)):
        _cached_head(root, name)
    if not ((folder / GENES_FILE).is_file() and split_files(folder)):
        head = [GENES_FILE] if not (folder / GENES_FILE).is_file() else []
        var = _offline()
        if var is not None:
            raise FileNotFoundError(
                f"HEST-Benchmark task {name!r}: its gene list or split files are missing in {folder} and downloads "
                f"are off ({var}={os.environ[var]!r}); nor does the Hugging Face cache hold them. Put these files "
                f"into that folder, or unset {var}:\n" + _listing(root, name, head, splits_unknown=True))
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(HEST_BENCH_REPO, repo_type="dataset", local_dir=root, token=token,
                              allow_patterns=[f"{name}/{GENES_FILE}", f"{name}/splits/*"], etag_timeout=timeout)
        except Exception as err:
            raise _fetch_error(err, root, name, head, token, splits_unknown=True) from err
        if not ((folder / GENES_FILE).is_file() and split_files(folder)):
            raise FileNotFoundError(f"HEST-Benchmark task {name!r}: the hub gave no {GENES_FILE} and split files "
                                    f"for it in {folder}.")

    # 2. the samples the splits name
    missing = [f for f in _sample_files(folder) if not (folder / f).is_file()]
    if missing and _link_from_cache(root, name, missing):
        missing = [f for f in missing if not (folder / f).is_file()]
    if missing:
        var = _offline()
        if var is not None:
            raise FileNotFoundError(
                f"HEST-Benchmark task {name!r}: {len(missing)} file(s) missing in {folder} and downloads are off "
                f"({var}={os.environ[var]!r}); nor does the Hugging Face cache hold them. Put these files into that "
                f"folder, or unset {var}:\n" + _listing(root, name, missing))
        from huggingface_hub import hf_hub_download

        for k, f in enumerate(missing):
            try:
                hf_hub_download(HEST_BENCH_REPO, f"{name}/{f}", repo_type="dataset", local_dir=root, token=token,
                                etag_timeout=timeout)
            except Exception as err:
                raise _fetch_error(err, root, name, missing[k:], token) from err

    given = None
    if pixel_size_um is not None:
        if isinstance(pixel_size_um, Mapping):
            given = {str(k): v for k, v in pixel_size_um.items()}
        else:
            _positive(pixel_size_um, "pixel_size_um")
            given = dict.fromkeys(read_splits(folder)[1].index, pixel_size_um)
    out = HestBenchTask(name, folder, pixel_size_um=given, hest_root=hest_root)
    logger.info(f"hest_bench: task {name!r} in {folder}: {len(out.samples)} samples, {len(out.splits)} folds, "
                f"{len(out.genes)} genes.")
    return out
