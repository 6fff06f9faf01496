"""The open gene vocabulary: gene symbol -> embedding row, growing when a new panel arrives."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .._logging import logger


def warn_unknown(unknown: list[str], what: str = "profile") -> None:
    """One warning naming the genes that are not in the vocabulary (and so are ignored)."""
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        logger.warning(f"{len(unknown)} gene(s) of the {what} not in the model's vocabulary, ignored: {shown}.")


class GeneVocab:
    """An ordered, growable map from gene symbols to integer ids (rows of the gene embedding table).

    Ids are assigned in order of first appearance and never change: :meth:`add` only appends, so a model trained
    on one panel keeps its embeddings when a later panel brings new genes.

    Parameters
    ----------
    genes
        Initial genes (duplicates are ignored).
    """

    def __init__(self, genes: Iterable[str] = ()) -> None:
        self._genes: list[str] = []
        self._index: dict[str, int] = {}
        self.add(genes)

    def add(self, genes: Iterable[str]) -> list[str]:
        """Append the genes not in the vocabulary yet; returns the newly added ones, in order.

        Parameters
        ----------
        genes
            Gene symbols (non-empty strings; a single string is refused).

        Returns
        -------
        list[str]
            The genes that were new, in order (their ids follow the existing ones).
        """
        if isinstance(genes, str):
            raise TypeError("add() takes a list of gene symbols, not a single string.")
        new = []
        for g in genes:
            if not isinstance(g, str) or not g:
                raise ValueError(f"Gene symbols must be non-empty strings, got {g!r}.")
            if g not in self._index:
                self._index[g] = len(self._genes)
                self._genes.append(g)
                new.append(g)
        return new

    @property
    def genes(self) -> list[str]:
        """The genes, in id order (a copy)."""
        return list(self._genes)

    def __len__(self) -> int:
        return len(self._genes)

    def __contains__(self, gene: object) -> bool:
        return gene in self._index

    def __iter__(self):
        return iter(list(self._genes))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self._genes == other._genes

    def __repr__(self) -> str:
        head = ", ".join(self._genes[:5]) + (", ..." if len(self) > 5 else "")
        return f"GeneVocab({len(self)} genes: {head})"

    def ids(self, genes: Iterable[str]) -> np.ndarray:
        """Ids of ``genes`` (int64), ``-1`` where a gene is unknown.

        Parameters
        ----------
        genes
            Gene symbols.

        Returns
        -------
        numpy.ndarray
            int64, one id per gene in input order, ``-1`` for genes not in the vocabulary.
        """
        return np.fromiter((self._index.get(g, -1) for g in genes), dtype=np.int64)

    def lookup(self, genes: Iterable[str], *, what: str = "profile") -> tuple[np.ndarray, np.ndarray]:
        """Ids of the known genes and a boolean mask of which input genes were known.

        Unknown genes are dropped with one warning naming them; a ``what`` with no known gene at all raises.

        Parameters
        ----------
        genes
            Gene symbols.
        what
            What the genes belong to, for the warning and the error (e.g. ``"profile 3"``).

        Returns
        -------
        tuple[numpy.ndarray, numpy.ndarray]
            ``(ids, known)``: ids of the known genes in input order, and the mask over the input genes.
        """
        genes = list(genes)
        ids = self.ids(genes)
        known = ids >= 0
        if not known.any():
            raise ValueError(
                f"The {what} has no gene of the model's vocabulary ({len(genes)} genes given, e.g. "
                f"{genes[:5]}; vocabulary of {len(self)} genes, e.g. {self._genes[:5]}). Check the gene symbols "
                "(case, aliases) or train on a panel that includes them."
            )
        if not known.all():
            warn_unknown([g for g, k in zip(genes, known, strict=True) if not k], what)
        return ids[known], known

    def to_dict(self) -> dict:
        """JSON-ready form; :meth:`from_dict` restores it.

        Returns
        -------
        dict
            ``{"genes": [...]}`` in id order.
        """
        return {"genes": list(self._genes)}

    @classmethod
    def from_dict(cls, d: dict) -> GeneVocab:
        """Restore a vocabulary written by :meth:`to_dict`.

        Parameters
        ----------
        d
            ``{"genes": [...]}`` (distinct genes, in id order).

        Returns
        -------
        GeneVocab
            The vocabulary, with the same ids.
        """
        if not isinstance(d, dict) or not isinstance(d.get("genes"), list):
            raise ValueError("Not a GeneVocab dict: expected {'genes': [...]}.")
        genes = d["genes"]
        if len(set(genes)) != len(genes):
            raise ValueError("Corrupt GeneVocab dict: duplicate genes.")
        return cls(genes)
