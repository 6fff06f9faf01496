"""The package logger, ``logging.getLogger("dbk")``, its HINT level and the once-per-call rule for repeated messages.

Levels follow scanpy's verbosity scale (:attr:`dbk.settings.verbosity`): 0 error, 1 warning, 2 info, 3 hint
(:data:`HINT`, between INFO and DEBUG), 4 debug.

A public call that loops (:func:`dbk.tl.fit_diffbulk`, :func:`dbk.tl.benchmark`, :meth:`dbk.tl.DiffBulk.predict`,
:func:`dbk.tl.prepare_corpus` ...) runs inside :func:`log_call` (or is decorated with :func:`once_per_call`): within
it a message logged a second time is not shown again (its key: the level and text, or ``extra=once("key")``), and at the
end one HINT line counts what was not shown. Calls nested in such a call share the outer call's memory. At verbosity
4 (debug) every message is shown. Outside a call, messages are logged as they come.

:func:`inner_fits` marks work whose information lines are details of a larger step (e.g. the inner cross-validation
fits of a head): inside it INFO and HINT lines become DEBUG lines; warnings are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TypeVar

HINT = 15  # scanpy's level for hints: between INFO (20) and DEBUG (10)
logging.addLevelName(HINT, "HINT")
ONCE_KEY = "dbk_once"  # LogRecord attribute naming a repeated message's key (``extra=once(...)``)

logger = logging.getLogger("dbk")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s dbk: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

F = TypeVar("F", bound=Callable)


class _Call:
    """What one public call has logged: the keys seen and the repeats not shown."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set = set()
        self.suppressed: Counter = Counter()


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("dbk_log_call", default=None)
_INNER: contextvars.ContextVar[bool] = contextvars.ContextVar("dbk_log_inner", default=False)


def once(key: str) -> dict:
    """``extra=`` for a log call whose repeats within one call share ``key`` although their text differs."""
    return {ONCE_KEY: str(key)}


def hint(msg: str, *args, **kwargs) -> None:
    """Log ``msg`` at the :data:`HINT` level (shown at verbosity 3 'hint' and 4 'debug')."""
    logger.log(HINT, msg, *args, **kwargs)


class _OncePerCall(logging.Filter):
    """Drops a message already logged in the current call; demotes information lines of :func:`inner_fits`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _INNER.get() and logging.DEBUG < record.levelno < logging.WARNING:
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            if not logger.isEnabledFor(logging.DEBUG):
                return False
        call = _CALL.get()
        if call is None or record.levelno <= logging.DEBUG or record.levelno >= logging.ERROR \
                or logger.isEnabledFor(logging.DEBUG):
            return True
        key = (record.levelno, getattr(record, ONCE_KEY, None) or record.getMessage())
        if key in call.seen:
            call.suppressed[key] += 1
            return False
        call.seen.add(key)
        return True


_FILTER = next((f for f in logger.filters if type(f).__name__ == "_OncePerCall"), None)
if _FILTER is None:  # a reload of this module keeps one filter
    _FILTER = _OncePerCall()
    logger.addFilter(_FILTER)


@contextlib.contextmanager
def log_call(name: str) -> Iterator[None]:
    """Within this block a repeated message is logged once (module docstring); nested blocks share the outer one.

    At the end, one :data:`HINT` line says how many repeats were not shown.
    """
    if _CALL.get() is not None:  # inside another dbk call: its memory governs
        yield
        return
    call = _Call(name)
    token = _CALL.set(call)
    try:
        yield
    finally:
        _CALL.reset(token)
        n = sum(call.suppressed.values())
        if n:
            hint(f"{name}: {n} repeat(s) of {len(call.suppressed)} message(s) not shown "
                 "(dbk.settings.verbosity = 'debug' shows every one).")


def once_per_call(func: F) -> F:
    """Decorator: run ``func`` inside :func:`log_call` named after it."""
    name = func.__qualname__.split("<locals>.")[-1]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with log_call(name):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def inner_fits() -> Iterator[None]:
    """Within this block INFO and HINT lines are logged as DEBUG (details of a larger step); warnings unchanged."""
    token = _INNER.set(True)
    try:
        yield
    finally:
        _INNER.reset(token)
