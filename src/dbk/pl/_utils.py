"""Shared plotting helpers: figure handling (``ax=``, ``show=``, ``return_fig=``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def zoom_to_tiles(axis, bounds: np.ndarray, image_shape: tuple[int, int] | None = None, margin: float = 0.05) -> None:
    """Limit the view to the tiles (``(n, 4)`` x0, y0, x1, y1 in display pixels) plus a margin, y pointing down.

    On slides where the tissue fills a small part of the scan, the whole image would leave the tiles tiny. The view
    stays inside the image when its ``(height, width)`` is given.
    """
    if not len(bounds):
        return
    x0, y0 = float(bounds[:, 0].min()), float(bounds[:, 1].min())
    x1, y1 = float(bounds[:, 2].max()), float(bounds[:, 3].max())
    pad = margin * max(x1 - x0, y1 - y0)
    x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad
    if image_shape is not None:
        h, w = image_shape
        x0, y0 = max(x0, -0.5), max(y0, -0.5)
        x1, y1 = min(x1, w - 0.5), min(y1, h - 0.5)
    axis.set_xlim(x0, x1)
    axis.set_ylim(y1, y0)


_AX_PARAM = """ax
    Axes to draw into (the figure is then the caller's: it is neither shown nor closed)."""

_SHOW_SAVE_PARAMS = """show
    Show the figure. ``None`` (default): show it when dbk made the figure (no ``ax``) and the matplotlib backend
    is interactive (a notebook, a window); ``False``: do not show it and return its axes, as scanpy does.
return_fig
    Return the figure (not shown).
save
    Save the figure, as scanpy's ``save=``: ``True`` writes ``<dbk.settings.figdir>/{name}.png``; a suffix such
    as ``"_erbb2.png"`` or ``".pdf"`` (a string that starts with ``_`` or ``.``, or has no file extension, and
    no folder) writes ``<dbk.settings.figdir>/{name}<suffix>`` (``.png`` appended when it names no format); a path
    (a :class:`~pathlib.Path`, or a string with a folder or a file extension, e.g. ``"out/a.png"``, ``"a.pdf"``)
    is written as given. Written atomically (a temporary file renamed into place); the folder is made when
    missing. Saved and not shown, a figure dbk made is closed (as scanpy does); the returned axes still work."""

_PLOT_PARAMS = _AX_PARAM + "\n" + _SHOW_SAVE_PARAMS

_RETURNS = """Returns
-------
matplotlib.figure.Figure | matplotlib.axes.Axes | list[matplotlib.axes.Axes] | None
    ``return_fig=True``: the figure. Not shown (``show=False``; or ``show=None`` with ``ax`` given or a
    non-interactive backend such as Agg): {axes_doc}, as scanpy returns them.
    Shown: ``None``."""

_AXES_DOC = "the axes, one :class:`~matplotlib.axes.Axes` for a one-panel figure,\n    else a list of the panels' axes"


def plot_docs(func=None, *, axes: str = _AXES_DOC):
    """Fill the shared text of the plot functions into their docstrings.

    ``{plot_params}``: ``ax``, ``show``, ``return_fig``, ``save``; ``{plot_show_save}``: the same without ``ax``;
    ``{plot_returns}``: the Returns section. ``axes`` says what ``show=False`` returns (for ``{plot_returns}``).
    """

    def fill(f):
        indent = "    "
        returns = _RETURNS.replace("{axes_doc}", axes)
        for key, text in (("{plot_params}", _PLOT_PARAMS), ("{plot_show_save}", _SHOW_SAVE_PARAMS),
                          ("{plot_returns}", returns)):
            text = text.replace("{name}", f.__name__).replace("\n", "\n" + indent)
            f.__doc__ = f.__doc__.replace(key, text)
        return f

    return fill if func is None else fill(func)


def new_axes(
    ax, n: int = 1, *, size: float = 4.5, ncols: int | None = None, figsize: tuple[float, float] | None = None
):
    """Return (fig, axes list) creating a grid of ``n`` panels unless ``ax`` is given (then it must hold ``n`` axes).

    Panels are ``size`` inches square unless ``figsize`` gives the whole figure's size.
    """
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = list(np.atleast_1d(ax))
        if len(axes) != n:
            raise ValueError(f"This plot needs {n} axes, got {len(axes)}.")
        return axes[0].figure, axes
    ncols = ncols or min(n, 4)
    nrows = int(np.ceil(n / ncols))
    figsize = figsize or (size * ncols, size * nrows)
    fig, axs = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    axs = list(axs.ravel())
    for extra in axs[n:]:
        extra.set_visible(False)
    return fig, axs[:n]


DEFAULT_FORMAT = "png"


def _extension(name: str) -> str | None:
    """The file format a name ends in, one matplotlib writes (``"png"`` for ``"_a.png"``), or ``None``."""
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(name)[1][1:].lower()
    return ext if ext in FigureCanvasBase.get_supported_filetypes() else None


def save_path(save: str | os.PathLike | bool, name: str) -> Path:
    """Where ``save=`` writes the figure of plot function ``name`` (see the ``save`` parameter of the plots).

    ``True``: ``{figdir}/{name}.png``; a suffix (a string with no folder that starts with ``_`` or ``.`` or has no
    file extension, as scanpy's): ``{figdir}/{name}{suffix}`` (``.png`` appended when it names no format); otherwise
    the path itself (``~`` expanded, ``.png`` appended when it names no format, as matplotlib does).
    """
    from .._settings import settings

    if save is True:
        return settings.figdir / f"{name}.{DEFAULT_FORMAT}"
    if isinstance(save, (bool, int, float)) or not isinstance(save, (str, os.PathLike)):
        raise TypeError(f"save must be True, a suffix such as '_a.png' or a path, got {save!r}.")
    text = os.fspath(save)
    if not text:
        raise ValueError("save='' names no file; give True, a suffix such as '_a.png' or a path.")
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    is_path = isinstance(save, os.PathLike) or any(s in text for s in seps) or (
        _extension(text) is not None and not text.startswith(("_", "."))
    )
    if is_path:
        path = Path(os.path.expanduser(text))
    else:
        path = settings.figdir / f"{name}{text}"
    if _extension(path.name) is None:
        path = path.with_name(f"{path.name}.{DEFAULT_FORMAT}")
    return path


def write_figure(fig, path: Path, *, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` atomically (a temporary file beside it, renamed into place); the path."""
    from .._logging import logger
    from .._utils import atomic_path

    if path.is_dir():
        raise IsADirectoryError(f"Cannot save the figure to {path}: it is a folder; give a file name, e.g. "
                                f"{os.fspath(path / 'figure.png')!r}.")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=_extension(path.name))
    logger.info(f"Saved the figure to {path}.")
    return path


def finish(fig, axes, *, name: str, ax=None, show: bool | None, return_fig: bool,
           save: str | os.PathLike | bool | None = None):
    """Save / show / return the figure in scanpy's way (the ``show``, ``return_fig`` and ``save`` of the plots).

    ``axes``: the panels' axes (one: returned as itself, several: as a list); ``name``: the plot function's name,
    for a ``save=`` suffix; ``ax``: the axes the caller gave (then the figure is theirs: neither shown by default
    nor closed). Never calls ``plt.show()`` when the figure is not to be shown.
    """
    import matplotlib.pyplot as plt

    if save is not None and save is not False:
        write_figure(fig, save_path(save, name))
    if return_fig:
        return fig
    if show is None:
        show = ax is None and plt.get_backend().lower() not in _NON_INTERACTIVE
    if show:
        plt.show()
        return None
    if save is not None and save is not False and ax is None:
        plt.close(fig)  # saved and not shown: closed as scanpy does (no pile of open figures); its axes still work
    axes = list(axes)
    return axes[0] if len(axes) == 1 else axes


_NON_INTERACTIVE = ("agg", "pdf", "svg", "ps", "cairo", "template", "pgf")
