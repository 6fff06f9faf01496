"""The stage-2 head: fusion of foundation-model features ``z_fm`` with diffusion features ``z_diff``, gene decoder."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import torch
from torch import nn

from .._constants import DIFF_FEATURES_KEY
from ._baselines import TorchRegressor, _masked_mse, gene_decoder, resolve_obsm_key

FUSIONS = ("gated", "concat", "add", "film")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the entries where ``mask`` is 1 (genes measured on the tile).

    Masked entries contribute nothing, whatever they hold (NaN included), to the loss or its gradient; the mean is
    over the unmasked entries (0 when there are none). ``mask=None`` is the plain MSE.
    """
    return _masked_mse(pred, target, mask)


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
        """The fused representation ``z`` (before the decoder)."""
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
        """Predicted genes, (batch, n_genes)."""
        return self.decoder(self.fuse(z_fm, z_diff))

    def forward_fm(self, z_fm: torch.Tensor) -> torch.Tensor:
        """The FM path alone, ``decoder(z_fm)`` (not defined for ``"concat"``)."""
        if self.fusion == "concat":
            raise ValueError("fusion='concat' has no FM-only path.")
        return self.decoder(z_fm)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion!r}, dim_fm={self.dim_fm}, dim_diff={self.dim_diff}, n_genes={self.n_genes}"


class FusionRegressor(TorchRegressor):
    """A :class:`FusionHead` trained on ``obsm`` features like :class:`dbk.tl.MLPBaseline`.

    Same options plus ``fusion``: standardised inputs and targets, AdamW, masked MSE, early stopping on held-out
    training slides.
    """

    name = "fusion_head"

    def __init__(self, *, fusion: str = "gated", **kwargs) -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"Unknown fusion {fusion!r}; options: {', '.join(map(repr, FUSIONS))}.")
        super().__init__(**kwargs)
        self.fusion = fusion

    def fit(
        self,
        adata: ad.AnnData,
        *,
        obsm_key: str | None = None,
        diff_key: str = DIFF_FEATURES_KEY,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        groups: str | Sequence | None = None,
    ) -> FusionRegressor:
        """Fit on FM features ``obsm[obsm_key]`` and diffusion features ``obsm[diff_key]`` of training tiles.

        Other parameters as :meth:`dbk.tl.MLPBaseline.fit`.
        """
        if diff_key not in adata.obsm:
            raise KeyError(f"No diffusion features adata.obsm[{diff_key!r}] (obsm keys: {list(adata.obsm)}).")
        obsm_key = resolve_obsm_key(adata, obsm_key, exclude=(diff_key,))
        return self._fit_keys(adata, [obsm_key, diff_key], genes, layer, groups)

    def _build(self, dims: list[int], n_genes: int) -> nn.Module:
        return FusionHead(dims[0], dims[1], n_genes, fusion=self.fusion, hidden=self.hidden, dropout=self.dropout)


def fit_head(
    adata_train: ad.AnnData,
    *,
    obsm_key: str | None = None,
    diff_key: str = DIFF_FEATURES_KEY,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    groups: str | Sequence | None = None,
    fusion: str = "gated",
    **kwargs,
) -> FusionRegressor:
    """Train the stage-2 fusion head on FM and diffusion features of training tiles.

    Returns the fitted :class:`FusionRegressor` (``.predict(adata)`` -> tiles x genes DataFrame).

    Parameters
    ----------
    adata_train
        Training tiles with ``obsm[obsm_key]`` (FM) and ``obsm[diff_key]`` (diffusion features).
    obsm_key
        FM features; default the only other embedding in ``obsm``.
    diff_key
        Diffusion features.
    genes, layer, groups
        See :meth:`dbk.tl.MLPBaseline.fit`.
    fusion
        ``"gated"``, ``"concat"``, ``"add"`` or ``"film"``.
    **kwargs
        Training options of :class:`dbk.tl.MLPBaseline` (``hidden``, ``dropout``, ``lr``, ``max_epochs``,
        ``patience``, ``random_state`` ...).
    """
    return FusionRegressor(fusion=fusion, **kwargs).fit(adata_train, obsm_key=obsm_key, diff_key=diff_key,
                                                       genes=genes, layer=layer, groups=groups)
