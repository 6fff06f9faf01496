"""Datasets: synthetic Xenium-like slides (offline, seeded) and public samples (HEST-1k) from the Hugging Face hub."""

from ._hest import hest
from ._synthetic import synthetic

__all__ = ["hest", "synthetic"]
