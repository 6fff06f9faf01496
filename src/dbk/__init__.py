"""dbk — DiffBulk: spatial gene expression from H&E histology, scverse style."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, pl, pp, tl
from ._settings import settings

try:
    __version__ = version("diffbulk")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "datasets", "io", "pl", "pp", "settings", "tl"]
