"""Shared plotting helpers: figure handling (``ax=``, ``show=``, ``return_fig=``)."""

from __future__ import annotations

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


_PLOT_PARAMS = """ax
    Axes to draw into.
show
    Show the figure (default: when the backend is interactive).
return_fig
    Return the figure.
save
    Path to save the figure to."""

_RETURNS = """Returns
-------
The figure when ``return_fig=True``, else ``None``."""


def plot_docs(func):
    """Fill the shared parameter text of the plot functions into ``{plot_params}`` and ``{plot_returns}``."""
    indent = "    "
    func.__doc__ = func.__doc__.replace("{plot_params}", _PLOT_PARAMS.replace("\n", "\n" + indent)).replace(
        "{plot_returns}", _RETURNS.replace("\n", "\n" + indent)
    )
    return func


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


def finish(fig, *, show: bool | None, return_fig: bool, save: str | None = None):
    """Save / show / return the figure in scanpy's way; never calls ``plt.show()`` when ``show=False``."""
    import matplotlib.pyplot as plt

    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    if return_fig:
        return fig
    if show is None:
        show = plt.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template")
    if show:
        plt.show()
    return None
