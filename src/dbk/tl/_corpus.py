"""Corpus preparation (:func:`prepare_corpus`, ``dbk prepare``): the slide work of :mod:`dbk.pp` plus the embeddings.

Preparing a corpus runs a foundation model on every slide (:func:`dbk.tl.embed_tiles`), so it lives here, in the
tools layer, above :mod:`dbk.pp`: :func:`dbk.pp._corpus.run_corpus` does the reading, tissue, tiles, pseudo-bulk,
markers and scheduling and is handed :func:`embed_step`; :mod:`dbk.pp` imports nothing from :mod:`dbk.tl`.
``dbk.pp.prepare``, its name before, is a deprecated alias defined here (:func:`prepare`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .._constants import TILES_KEY, TILES_TABLE_KEY
from ..pp._corpus import DEFAULT_FM, run_corpus
from ..pp._corpus import prepare_one as _prepare_one

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def embed_step(sdata, *, fm: str, fm_size_px: int, tiles_key: str, table_key: str, batch_size: int,
               accelerator: str) -> str:
    """The embedding step of each slide: :func:`dbk.tl.embed_tiles` of every tile; the ``obsm`` key written.

    Embeddings already in the slide from the same model, input size and tiles are kept (``embed_tiles``' own check).
    Torch loads here, on the worker, when the first slide reaches this step.

    Parameters
    ----------
    sdata
        The slide, with its tiles and their table.
    fm, fm_size_px, tiles_key, table_key, batch_size, accelerator
        As in :func:`dbk.tl.embed_tiles`.

    Returns
    -------
    The ``obsm`` key of the embeddings (:func:`dbk.tl.model_key` of ``fm``).
    """
    from ._embed import embed_tiles, model_key

    embed_tiles(sdata, fm=fm, fm_size_px=fm_size_px, tiles_key=tiles_key, table_key=table_key, batch_size=batch_size,
                accelerator=accelerator)
    return model_key(fm)


def model_input_size(fm: str) -> int:
    """The model's own input size in pixels (224 for the default EfficientNet-Lite0): what ``fm_size_px=None`` means.

    The model is loaded once, on the CPU of this process, as :func:`dbk.tl.fit_diffbulk` loads it, and its size
    read from its data config (:func:`dbk.tl._embed.fm_input_plan`).

    Parameters
    ----------
    fm
        A model name :func:`dbk.tl.embed_tiles` takes.

    Returns
    -------
    The input side in pixels.
    """
    import torch

    from ._fit_steps import load_fm

    return int(load_fm(fm, size_px=None, device=torch.device("cpu")).size_px)


def prepare_one(source, name: str, dest: str | os.PathLike, **kwargs) -> dict:
    """:func:`dbk.pp._corpus.prepare_one` of one slide with :func:`embed_step` (the work of one task; never raises).

    Parameters
    ----------
    source, name, dest
        As in :func:`dbk.pp._corpus.prepare_one`.
    **kwargs
        Its keywords (``settings``, ``reader``, ``batch_size``, ``accelerator``, ``threads``, ``step_hook``).

    Returns
    -------
    The report row of the slide.
    """
    return _prepare_one(source, name, dest, embed=embed_step, **kwargs)


def prepare_corpus(
    paths_or_slides,
    *,
    out: str | os.PathLike,
    tile_size_um: float = 112.0,
    fm: str = DEFAULT_FM,
    fm_size_px: int | None = None,
    client=None,
    overwrite: bool = False,
    reader: Callable | None = None,
    names: Sequence[str] | None = None,
    tiles_key: str = TILES_KEY,
    table_key: str = TILES_TABLE_KEY,
    batch_size: int = 64,
    accelerator: str = "auto",
    threads: int | None = None,
) -> pd.DataFrame:
    """Prepare a corpus of slides for training, slide by slide, in parallel on a dask.distributed cluster.

    ``dbk prepare`` on the command line (``dbk.pp.prepare`` before: a deprecated alias now). Each slide is read, its
    tissue found (:func:`dbk.pp.tissue_mask`), tiled and summed into its pseudo-bulk table
    (:func:`dbk.pp.prepare_slide`, checked as for training), its tiles embedded with a foundation model
    (:func:`dbk.tl.embed_tiles`), and it is written atomically to ``<out>/<name>.zarr``
    (:func:`dbk.io.write_zarr`). A small JSON marker, ``dbk_prepare.json`` with the settings and a fingerprint of
    the source (path, file sizes and times), is written into the store before it is renamed into place: a rerun
    skips the slides whose marker holds the same settings and source, so a killed run resumes; a store without the
    marker is not dbk's and is never replaced (that slide fails). The output folder is checked to be writable before
    any slide is read. A slide that fails is reported (in the log and the returned table, with a traceback summary)
    and the others go on.

    Parameters
    ----------
    paths_or_slides
        One slide or a list (or ``{name: slide}`` dict) of them. A slide is a path: a SpatialData ``.zarr`` store,
        a HEST-1k folder (``wsis/``, ``metadata/`` ...; every sample in it, see :func:`dbk.io.read_hest`) or
        ``<hest root>/<sample id>``, or a legacy ST folder (:func:`dbk.io.read_st_folder`); a SpatialData object,
        used as is (changed in place with ``client=None``; a copy travels to a cluster); or a callable returning
        one. Paths and callables are read on the worker, so only they travel to the cluster. Tiles, tables and
        embeddings already in a slide are kept, as :func:`dbk.pp.prepare_slide` and :func:`dbk.tl.embed_tiles` do.
    out
        Folder of the prepared stores, one ``<name>.zarr`` per slide. Names: the dict keys or ``names``, else the
        store or folder name, the HEST sample id, ``sdata.attrs["sample"]``, the callable's ``__name__``, else
        ``slide<i>``.
    tile_size_um
        Side of the grid tiles in µm (slides with spots and no transcripts get one tile per spot).
    fm
        Foundation model of the embeddings (a name :func:`dbk.tl.embed_tiles` takes; the default is offline).
    fm_size_px
        Its input size in pixels. ``None`` (default): the model's own input size (224 for the default
        EfficientNet-Lite0), read from the model, loaded once in this process before any slide. The markers record
        the resolved size, so a corpus prepared with ``fm_size_px=224`` resumes under ``None`` when the model's own
        size is 224.
    client
        A ``distributed.Client``, a scheduler address (``"tcp://host:8786"``), or ``None``: one slide after the
        other in this process. One slide is one task (``client.map(..., pure=False)``, results by
        ``as_completed``); give workers one thread each and memory for a whole slide.
    overwrite
        Prepare every slide again; without it, complete stores with the same settings are skipped and a store
        prepared with other settings is reported as failed (with the settings that differ).
    reader
        ``reader(path) -> SpatialData`` for every path (e.g. ``functools.partial(dbk.io.read_image,
        pixel_size_um=0.5)``); must be picklable to run on a cluster.
    names
        The slides' names, one per item of ``paths_or_slides`` (not with a HEST root of several samples).
    tiles_key, table_key
        The tiles and their table.
    batch_size, accelerator
        Of :func:`dbk.tl.embed_tiles` on each worker.
    threads
        Torch and dask threads per slide (on each worker); ``None`` leaves them as they are.

    Returns
    -------
    The report, one row per slide in input order: ``name``, ``status`` (``"done"``, ``"skipped"`` or
    ``"failed"``), ``n_tiles``, ``n_genes``, ``seconds``, ``error`` (``"<step>: <exception>: <message>"``),
    ``path``, then the seconds of each step
    (``read_s``, ``tissue_s``, ``tiles_s``, ``pseudobulk_s``, ``embed_s``, ``write_s``), ``traceback`` and
    ``worker`` (host:pid). ``report.attrs["settings"]`` holds the settings recorded in the markers.

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> client = Client(LocalCluster(n_workers=4, threads_per_worker=1))
    >>> report = dbk.tl.prepare_corpus(["a.zarr", "b.zarr", "hest_data/TENX95"], out="corpus", client=client)
    >>> report[report.status == "failed"]
    """
    return run_corpus(paths_or_slides, out=out, embed=embed_step, tile_size_um=tile_size_um, fm=fm,
                      fm_size_px=fm_size_px, own_size=model_input_size, client=client, overwrite=overwrite,
                      reader=reader, names=names, tiles_key=tiles_key, table_key=table_key, batch_size=batch_size,
                      accelerator=accelerator, threads=threads)


def prepare(paths_or_slides, **kwargs) -> pd.DataFrame:
    """Deprecated alias of :func:`dbk.tl.prepare_corpus`, kept so that ``dbk.pp.prepare`` still works; warns."""
    warnings.warn("dbk.pp.prepare is deprecated and will be removed: preparing a corpus runs a foundation model, so it "
                  "moved to dbk.tl.prepare_corpus (same arguments, same result).", DeprecationWarning, stacklevel=2)
    return prepare_corpus(paths_or_slides, **kwargs)


# the alias shows prepare_corpus' signature and documentation, under a deprecation note
prepare.__wrapped__ = prepare_corpus
if prepare_corpus.__doc__:  # (None under python -OO)
    prepare.__doc__ = (
        "Deprecated alias of :func:`dbk.tl.prepare_corpus` (``dbk.pp.prepare`` before it moved to the tools layer, "
        "since\n    it runs a foundation model); same arguments, same result, with a DeprecationWarning.\n\n"
        + prepare_corpus.__doc__.split("\n\n", 1)[1]
    )
