"""Shared plotting helpers: thumbnails of the H&E and figure handling (``ax=``, ``show=``, ``return_fig=``)."""

from __future__ import annotations

import numpy as np
from spatialdata import SpatialData

from .._image import image_levels


def thumbnail(sdata: SpatialData, image_key: str | None = None, max_side: int = 2000) -> tuple[np.ndarray, float]:
    """RGB thumbnail (y, x, 3) from the finest pyramid level no larger than ``max_side``, and its downsampling.

    Only that level is read; when even the coarsest level is larger, it is strided down.
    """
    levels = image_levels(sdata, image_key)
    lvl = next((lv for lv in levels if max(lv.shape_yx) <= max_side), levels[-1])
    step = max(1, int(np.ceil(max(lvl.shape_yx) / max_side)))
    arr = lvl.data.transpose("y", "x", "c").data[::step, ::step, :3]
    img = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
    if img.dtype != np.uint8:
        img = np.clip(img / max(float(img.max()), 1e-9), 0, 1)
    return img, float(lvl.downsample_x * step)


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


def new_axes(ax, n: int = 1, *, size: float = 4.5, ncols: int | None = None):
    """Return (fig, axes list) creating a grid of ``n`` panels unless ``ax`` is given (then ``n`` must be 1)."""
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = list(np.atleast_1d(ax))
        if len(axes) != n:
            raise ValueError(f"This plot needs {n} axes, got {len(axes)}.")
        return axes[0].figure, axes
    ncols = ncols or min(n, 4)
    nrows = int(np.ceil(n / ncols))
    fig, axs = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False, layout="constrained")
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
