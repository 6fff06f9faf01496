"""The stage-2 head networks (torch core): the gene decoder, the MLP baseline's network and the fusion head.

They map standardised feature vectors to standardised genes; training (:mod:`dbk.core._head_training`) and the
AnnData-facing regressors (:class:`dbk.tl.MLPBaseline`, :class:`dbk.tl.FusionRegressor`) live elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

FUSIONS = ("gated", "concat", "add", "film")  # the fusions of the neural head (:class:`FusionHead`)


def gene_decoder(dim: int, n_genes: int, hidden: int | None, dropout: float) -> nn.Module:
    """Linear (``hidden`` falsy) or one-hidden-layer MLP (Linear, GELU, Dropout, Linear) from features to genes."""
    if not hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_genes))
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_genes))


class MLPNet(nn.Module):
    """The MLP baseline's network: :func:`gene_decoder` on one feature vector (weights under ``net.``)."""

    def __init__(self, dim: int, n_genes: int, *, hidden: int | None = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = gene_decoder(dim, n_genes, hidden, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FusionHead(nn.Module):
    """Fuse ``z_fm`` (foundation model) and ``z_diff`` (frozen diffusion U-Net) and decode genes.

    Fusions (``z`` is then decoded by :func:`gene_decoder`):

    - ``"gated"`` (default, gated residual): ``z = z_fm + sigmoid(W_g [z_fm; z_diff]) * W_d z_diff``;
    - ``"concat"``: ``z = [z_fm; z_diff]``;
    - ``"add"``: ``z = z_fm + W_d z_diff``;
    - ``"film"``: ``z = z_fm * (1 + gamma(z_diff)) + beta(z_diff)``, ``gamma``/``beta`` linear in ``z_diff`` and
      initialised at 0 (the head starts as the FM path).

    ``W_d`` projects ``z_diff`` to ``dim_fm``. With ``W_d`` = 0 the gated and add fusions are exactly the FM path
    ``decoder(z_fm)`` (:meth:`forward_fm`), i.e. the MLP baseline.

    Parameters
    ----------
    dim_fm, dim_diff
        Widths of the two feature vectors.
    n_genes
        Outputs.
    fusion
        One of ``"gated"``, ``"concat"``, ``"add"``, ``"film"``.
    hidden
        Hidden width of the gene decoder (``None`` or 0: linear decoder).
    dropout
        Dropout in the decoder.
    """

    def __init__(
        self,
        dim_fm: int,
        dim_diff: int,
        n_genes: int,
        *,
        fusion: str = "gated",
        hidden: int | None = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {fusion!r}; options: {', '.join(map(repr, FUSIONS))}.")
        for name, v in (("dim_fm", dim_fm), ("dim_diff", dim_diff), ("n_genes", n_genes)):
            if int(v) != v or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        self.fusion = fusion
        self.dim_fm, self.dim_diff, self.n_genes = int(dim_fm), int(dim_diff), int(n_genes)
        if fusion in ("gated", "add"):
            self.proj = nn.Linear(dim_diff, dim_fm)
        if fusion == "gated":
            self.gate = nn.Linear(dim_fm + dim_diff, dim_fm)
        if fusion == "film":
            self.film = nn.Linear(dim_diff, 2 * dim_fm)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        dim = dim_fm + dim_diff if fusion == "concat" else dim_fm
        self.decoder = gene_decoder(dim, n_genes, hidden, dropout)

    def fuse(self, z_fm: torch.Tensor, z_diff: torch.Tensor) -> torch.Tensor:
        """The fused representation ``z`` (before the decoder).

        Parameters
        ----------
        z_fm
            Foundation-model features, ``(..., dim_fm)`` (standardised, as the head was trained on).
        z_diff
            Diffusion features, ``(..., dim_diff)``.

        Returns
        -------
        torch.Tensor
            ``(..., dim_fm)``, or ``(..., dim_fm + dim_diff)`` for ``"concat"``.

        Raises
        ------
        ValueError
            If the feature widths are not ``dim_fm`` and ``dim_diff``.
        """
        if z_fm.shape[-1] != self.dim_fm or z_diff.shape[-1] != self.dim_diff:
            raise ValueError(f"Expected z_fm (..., {self.dim_fm}) and z_diff (..., {self.dim_diff}), got "
                             f"{tuple(z_fm.shape)} and {tuple(z_diff.shape)}.")
        if self.fusion == "gated":
            g = torch.sigmoid(self.gate(torch.cat([z_fm, z_diff], dim=-1)))
            return z_fm + g * self.proj(z_diff)
        if self.fusion == "add":
            return z_fm + self.proj(z_diff)
        if self.fusion == "film":
            gamma, beta = self.film(z_diff).chunk(2, dim=-1)
            return z_fm * (1 + gamma) + beta
        return torch.cat([z_fm, z_diff], dim=-1)

    def forward(self, z_fm: torch.Tensor, z_diff: torch.Tensor) -> torch.Tensor:
        """Predicted genes, (batch, n_genes).

        Parameters
        ----------
        z_fm
            Foundation-model features, ``(..., dim_fm)`` (standardised, as the head was trained on).
        z_diff
            Diffusion features, ``(..., dim_diff)``.

        Returns
        -------
        torch.Tensor
            ``(..., n_genes)``: the decoder on :meth:`fuse`'s output (standardised targets).
        """
        return self.decoder(self.fuse(z_fm, z_diff))

    def forward_fm(self, z_fm: torch.Tensor) -> torch.Tensor:
        """The FM path alone, ``decoder(z_fm)`` (not defined for ``"concat"``).

        Parameters
        ----------
        z_fm
            Foundation-model features, ``(..., dim_fm)``.

        Returns
        -------
        torch.Tensor
            ``(..., n_genes)``: what the head predicts without the diffusion features.
        """
        if self.fusion == "concat":
            raise ValueError("fusion='concat' has no FM-only path.")
        return self.decoder(z_fm)

    def extra_repr(self) -> str:
        """The settings torch's module repr shows: fusion and widths.

        Returns
        -------
        str
            ``"fusion=..., dim_fm=..., dim_diff=..., n_genes=..."``.
        """
        return f"fusion={self.fusion!r}, dim_fm={self.dim_fm}, dim_diff={self.dim_diff}, n_genes={self.n_genes}"
