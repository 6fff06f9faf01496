"""The package logger, ``logging.getLogger("dbk")``."""

from __future__ import annotations

import logging

logger = logging.getLogger("dbk")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s dbk: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
