"""Global settings: ``dbk.settings``."""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
from pathlib import Path

from ._logging import HINT, logger

# scanpy's verbosity scale: the logger level of each verbosity, and the names settings.verbosity accepts
_LEVELS = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: HINT, 4: logging.DEBUG}
VERBOSITY_NAMES = {"error": 0, "warning": 1, "info": 2, "hint": 3, "debug": 4}
# the device names dbk accepts, for ``settings.device`` and every ``accelerator=`` (dbk.core._device.resolve_device)
DEVICE_NAMES = re.compile(r"auto|cpu|gpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "'auto', 'cpu', 'cuda', 'cuda:<i>', 'gpu' or 'mps'"


def available_cores(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """The CPU cores this process may use (at least 1).

    Its CPU affinity, capped by a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)
    where one is set.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    root = Path(cgroup_root)
    quota = period = None
    try:
        q, per = (root / "cpu.max").read_text().split()[:2]
        if q != "max":
            quota, period = int(q), int(per)
    except (OSError, ValueError):
        try:
            q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            per = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            if q > 0 and per > 0:
                quota, period = q, per
        except (OSError, ValueError):
            pass
    if quota is not None and period:
        n = min(n, max(1, math.floor(quota / period)))
    return max(1, int(n))


class DbkSettings:
    """Package-wide settings.

    Attributes
    ----------
    verbosity
        scanpy's scale: ``0`` / ``"error"``, ``1`` / ``"warning"``, ``2`` / ``"info"`` (default), ``3`` /
        ``"hint"`` (also hints: e.g. how many repeated messages a call did not show), ``4`` / ``"debug"`` (everything,
        repeats and the lines of inner fits included); sets the level of the ``"dbk"`` logger. Reads back as the
        integer. Within one call of :func:`~dbk.tl.fit_diffbulk`, :func:`~dbk.tl.benchmark`,
        :meth:`~dbk.tl.DiffBulk.predict` or :func:`~dbk.tl.prepare_corpus`, a message is shown once below ``4``.
    seed
        Default random seed used where a function's ``random_state`` is ``None``.
    datasetdir
        Where :mod:`dbk.datasets` stores downloads (default ``$DBK_DATASETDIR`` or ``~/.cache/dbk``).
    figdir
        Where :mod:`dbk.pl` saves a figure whose ``save=`` is a suffix or ``True`` (default ``figures``, relative to the
        working folder, as scanpy's ``settings.figdir``).
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …: what ``accelerator="auto"``
        means wherever dbk trains or infers.
    progress
        Show ``tqdm`` progress bars on long work.
    n_jobs
        CPU threads of torch, BLAS and OpenMP in dbk's work (scanpy's name). Default: the cores this process may use
        (:func:`available_cores`: affinity and cgroup quota). Setting it applies at once, process-wide: torch's
        intra-op threads, the BLAS / OpenMP pools (``threadpoolctl``) and ``OMP_NUM_THREADS`` for child processes;
        ``None`` gives them back as they were. Unset, dbk only lowers torch's threads to the available cores where
        torch would use more. On a busy small
        machine ``1`` is often fastest.
    """

    def __init__(self) -> None:
        self._verbosity = 2
        self.seed: int = 0
        self._datasetdir = Path(os.environ.get("DBK_DATASETDIR", Path.home() / ".cache" / "dbk"))
        self._figdir = Path("figures")
        self._device = "auto"
        self.progress: bool = True
        self._n_jobs: int | None = None
        self._before: tuple | None = None  # torch threads, OMP_NUM_THREADS and BLAS limits before n_jobs was set

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int | str) -> None:
        level = VERBOSITY_NAMES.get(value.lower()) if isinstance(value, str) else (
            int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None)
        if level not in _LEVELS:
            names = ", ".join(f"{i} / {n!r}" for n, i in VERBOSITY_NAMES.items())
            raise ValueError(f"verbosity must be one of {names}, got {value!r}.")
        self._verbosity = level
        logger.setLevel(_LEVELS[level])

    @property
    def datasetdir(self) -> Path:
        return self._datasetdir

    @datasetdir.setter
    def datasetdir(self, value: str | os.PathLike) -> None:
        self._datasetdir = Path(value).expanduser()

    @property
    def figdir(self) -> Path:
        return self._figdir

    @figdir.setter
    def figdir(self, value: str | os.PathLike) -> None:
        self._figdir = Path(value).expanduser()

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        if not isinstance(value, str) or not DEVICE_NAMES.fullmatch(value):
            raise ValueError(f"device must be {DEVICE_CHOICES}, got {value!r}.")
        self._device = value

    @property
    def n_jobs(self) -> int:
        return self._n_jobs if self._n_jobs is not None else available_cores()

    @n_jobs.setter
    def n_jobs(self, value: int | None) -> None:
        if value is None:  # back to the default: the threads as they were before dbk set them
            self._n_jobs = None
            self._restore_threads()
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"n_jobs must be a positive integer (threads) or None (the available cores), got "
                             f"{value!r}.")
        self._n_jobs = int(value)
        self.apply_threads()

    def apply_threads(self) -> int:
        """Apply :attr:`n_jobs` to torch, BLAS and OpenMP (set: exactly; unset: torch lowered to the cores available).

        dbk calls this at the start of its long work (fits, embeddings, predictions, benchmarks); returns the torch
        threads in use.
        """
        import sys

        n = self.n_jobs
        torch = sys.modules.get("torch")
        if self._n_jobs is None:  # unset: only never oversubscribe
            if torch is not None and torch.get_num_threads() > n:
                torch.set_num_threads(n)
            return torch.get_num_threads() if torch is not None else n
        if torch is None:
            import torch
        if self._before is None:  # what n_jobs = None gives back
            self._before = (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), None)
        os.environ["OMP_NUM_THREADS"] = str(n)  # child processes (dask workers, DataLoader workers)
        torch.set_num_threads(n)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            pass
        else:
            limiter = threadpool_limits(limits=n)  # not as a context: the limit stays until changed
            if self._before[2] is None:
                self._before = (*self._before[:2], limiter)
        return torch.get_num_threads()

    def _restore_threads(self) -> None:
        if self._before is None:
            return
        import torch

        threads, omp, limiter = self._before
        self._before = None
        if limiter is not None:  # first: torch's intra-op threads share the OpenMP pool
            limiter.restore_original_limits()
        torch.set_num_threads(threads)
        os.environ.pop("OMP_NUM_THREADS", None)
        if omp is not None:
            os.environ["OMP_NUM_THREADS"] = omp

    def __repr__(self) -> str:
        return (
            f"DbkSettings(verbosity={self.verbosity}, seed={self.seed}, datasetdir={str(self.datasetdir)!r}, "
            f"device={self.device!r}, progress={self.progress}, n_jobs={self.n_jobs})"
        )


settings = DbkSettings()
