"""dbk — DiffBulk: spatial gene expression from H&E histology, scverse style.

The submodules (``io``, ``datasets``, ``pp``, ``tl``, ``pl``, ``core``) load on first use, so ``import dbk`` is light
and the torch core (``dbk.core``: networks, training loop, datasets over arrays) imports without the SpatialData
stack, e.g. on a GPU node.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

from ._settings import settings

try:
    __version__ = version("diffbulk")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("core", "datasets", "io", "pl", "pp", "tl")
__all__ = ["__version__", "core", "datasets", "io", "pl", "pp", "settings", "tl"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
