"""Global settings: ``dbk.settings``."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ._logging import logger

_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}
# the device names dbk accepts, for ``settings.device`` and every ``accelerator=`` (dbk.core._device.resolve_device)
DEVICE_NAMES = re.compile(r"auto|cpu|gpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:<i>', 'gpu' or 'mps'"


class DbkSettings:
    """Package-wide settings.

    Attributes
    ----------
    verbosity
        0 errors, 1 warnings, 2 info (default), 3 debug; sets the level of the ``"dbk"`` logger.
    seed
        Default random seed used where a function's ``random_state`` is ``None``.
    datasetdir
        Where :mod:`dbk.datasets` stores downloads (default ``$DBK_DATASETDIR`` or ``~/.cache/dbk``).
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …: what ``accelerator="auto"``
        means wherever dbk trains or infers.
    progress
        Show ``tqdm`` progress bars on long work.
    """

    def __init__(self) -> None:
        self._verbosity = 2
        self.seed: int = 0
        self._datasetdir = Path(os.environ.get("DBK_DATASETDIR", Path.home() / ".cache" / "dbk"))
        self._device = "auto"
        self.progress: bool = True

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        if value not in _LEVELS:
            raise ValueError(f"verbosity must be one of {sorted(_LEVELS)}, got {value!r}.")
        self._verbosity = value
        logger.setLevel(_LEVELS[value])

    @property
    def datasetdir(self) -> Path:
        return self._datasetdir

    @datasetdir.setter
    def datasetdir(self, value: str | os.PathLike) -> None:
        self._datasetdir = Path(value).expanduser()

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        if not isinstance(value, str) or not DEVICE_NAMES.fullmatch(value):
            raise ValueError(f"device must be {DEVICE_CHOICES}, got {value!r}.")
        self._device = value

    def __repr__(self) -> str:
        return (
            f"DbkSettings(verbosity={self.verbosity}, seed={self.seed}, datasetdir={str(self.datasetdir)!r}, "
            f"device={self.device!r}, progress={self.progress})"
        )


settings = DbkSettings()
