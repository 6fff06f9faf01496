"""A permutation-invariant, open-vocabulary encoder of expression profiles (sets of (gene, value) pairs)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._vocab import GeneVocab, warn_unknown

Profile = tuple[list[str], np.ndarray]


def as_profiles(profiles) -> list[Profile | None]:
    """Normalise the accepted profile inputs to a list of ``(genes, values)`` (``None`` = no profile).

    Accepted: an AnnData (rows are profiles; genes absent from a row's panel are masked by its ``measured`` layer),
    a DataFrame (rows are profiles; NaN = not measured), a Series or ``{gene: value}`` dict (one profile), a
    ``(genes, values)`` pair with 1-D (one profile) or 2-D (one per row) values, or a list of Series / dicts /
    pairs / ``None``. Non-finite values count as not measured.
    """
    import pandas as pd

    def one(genes, values) -> Profile:
        genes = [str(g) for g in genes]
        values = np.asarray(values, dtype=np.float32).ravel()
        if len(genes) != len(values):
            raise ValueError(f"A profile has {len(genes)} genes but {len(values)} values.")
        ok = np.isfinite(values)
        if not ok.all():
            genes = [g for g, k in zip(genes, ok, strict=True) if k]
            values = values[ok]
        return genes, values

    if profiles is None:
        return [None]
    if hasattr(profiles, "var_names") and hasattr(profiles, "layers"):  # an AnnData (duck-typed: no anndata import)
        import scipy.sparse as sp

        from .._constants import MEASURED_LAYER

        x = profiles.X.toarray() if sp.issparse(profiles.X) else np.asarray(profiles.X)
        x = np.asarray(x, dtype=np.float32)
        if MEASURED_LAYER in profiles.layers:  # genes of another slide's panel: not measured here, not zero
            m = profiles.layers[MEASURED_LAYER]
            m = (m.toarray() if sp.issparse(m) else np.asarray(m)) > 0
        else:
            m = np.ones(x.shape, dtype=bool)
        genes = np.asarray([str(g) for g in profiles.var_names])
        if m.all():
            g = list(genes)
            return [one(g, row) for row in x]
        return [one(list(genes[mr]), row[mr]) for row, mr in zip(x, m, strict=True)]
    if isinstance(profiles, pd.DataFrame):
        cols = [str(c) for c in profiles.columns]
        x = profiles.to_numpy(dtype=np.float32)
        return [one(cols, row) for row in x]
    if isinstance(profiles, pd.Series):
        return [one(list(profiles.index), profiles.to_numpy())]
    if isinstance(profiles, Mapping):
        return [one(list(profiles.keys()), list(profiles.values()))]
    if isinstance(profiles, tuple) and len(profiles) == 2 and not isinstance(profiles[0], (Mapping, pd.Series)):
        genes, values = profiles
        values = np.asarray(values, dtype=np.float32)
        if values.ndim == 2:
            return [one(list(genes), row) for row in values]
        return [one(list(genes), values)]
    if isinstance(profiles, Sequence) and not isinstance(profiles, str):
        out: list[Profile | None] = []
        for p in profiles:
            if p is None:
                out.append(None)
            else:
                sub = as_profiles(p)
                if len(sub) != 1:
                    raise ValueError("A list of profiles must hold single profiles (Series, dict, (genes, values)).")
                out.append(sub[0])
        return out
    raise TypeError(
        f"Cannot read expression profiles from {type(profiles).__name__}; pass an AnnData, a DataFrame, a Series, "
        "a {gene: value} dict, a (genes, values) pair, or a list of those."
    )


class _Block(nn.Module):
    """Pre-norm self-attention block with a key-padding mask and no positional encoding."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


class _AttentionPool(nn.Module):
    """Multi-head attention of one learned query over the (masked) tokens."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Parameter(torch.randn(1, 1, dim) / math.sqrt(dim))
        self.norm = nn.LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.n_heads
        k, v = self.kv(self.norm(x)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        q = self.q(self.query).view(1, 1, h, d // h).transpose(1, 2).expand(b, h, 1, d // h)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
        return self.proj(a.transpose(1, 2).reshape(b, d))


class GeneEncoder(nn.Module):
    """Encode an expression profile, a *set* of (gene, value) pairs, into one condition vector.

    Each gene has one learned embedding row, looked up by symbol in ``vocab`` and shared by every panel that
    contains the gene. A token is that embedding FiLM-modulated by the gene's value (``e * (1 + s(v)) + t(v)``,
    ``s, t`` a small MLP of the value). Self-attention blocks without positional encoding (key-padding masks for
    panels of different sizes) and attention pooling with a learned query make the output invariant to the order of
    the genes; genes absent from a panel are absent from the set (never zeros). A linear path
    ``sum_g e_g v_g / sqrt(n)`` is added to the pooled vector before the final LayerNorm: with ``zscore=True`` it
    is centred across profiles, which makes the condition informative from the first training step.

    Parameters
    ----------
    vocab
        The gene vocabulary (shared with the caller; grow it with :meth:`add_genes`).
    dim
        Width of embeddings, tokens and the output vector.
    n_layers
        Self-attention blocks.
    n_heads
        Attention heads (``dim`` must be divisible by it).
    mlp_ratio
        Hidden width of the blocks' MLPs, as a multiple of ``dim``.
    dropout
        Dropout in attention and MLPs during training.
    zscore
        Standardise each gene's value with training statistics (:meth:`set_value_stats`, stored in the buffers
        ``value_mean`` / ``value_std``) before modulation; values are used as given (log1p-normalised) otherwise.

    Notes
    -----
    ``forward(ids, values, mask)`` takes a padded batch (``ids`` (B, L) int64 vocabulary ids, ``values`` (B, L)
    float, ``mask`` (B, L) bool, True where a gene is present) and returns ``(B, dim)``; rows with no gene give
    zeros and are flagged by :meth:`tokenize`'s ``has_genes``. ``forward(..., return_tokens=True)`` also returns
    the (B, L, dim) tokens for cross-attention.
    """

    def __init__(
        self,
        vocab: GeneVocab,
        *,
        dim: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        zscore: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(vocab, GeneVocab):
            vocab = GeneVocab(vocab)
        if len(vocab) == 0:
            raise ValueError("GeneEncoder needs a vocabulary with at least one gene.")
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads}).")
        self.vocab = vocab
        self.dim, self.n_layers, self.n_heads = int(dim), int(n_layers), int(n_heads)
        self.mlp_ratio, self.dropout, self.zscore = float(mlp_ratio), float(dropout), bool(zscore)
        self.embedding = nn.Embedding(len(vocab), dim)
        nn.init.normal_(self.embedding.weight, std=1.0)
        self.value_mlp = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.register_buffer("value_mean", torch.zeros(len(vocab)))
        self.register_buffer("value_std", torch.ones(len(vocab)))
        self.blocks = nn.ModuleList(_Block(dim, n_heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.pool = _AttentionPool(dim, n_heads)
        self.out_norm = nn.LayerNorm(dim)

    def config(self) -> dict:
        """Architecture arguments (without the vocabulary), JSON-ready.

        Returns
        -------
        dict
            ``dim``, ``n_layers``, ``n_heads``, ``mlp_ratio``, ``dropout`` and ``zscore``: with the vocabulary, what
            rebuilds the encoder.
        """
        return {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads, "mlp_ratio": self.mlp_ratio,
                "dropout": self.dropout, "zscore": self.zscore}

    # ---- vocabulary growth -------------------------------------------------------------------------------------

    def add_genes(self, genes: Iterable[str]) -> list[str]:
        """Add genes to the vocabulary and grow the embedding table; existing rows are kept. Returns the new genes.

        Parameters created before (e.g. in an optimizer) are replaced for the embedding: build optimizers after
        growing.

        Parameters
        ----------
        genes
            Gene names; those already in the vocabulary are skipped.

        Returns
        -------
        list[str]
            The genes added, in order (their embedding rows start random).
        """
        new = self.vocab.add(genes)
        self.sync_vocab()
        return new

    def sync_vocab(self) -> None:
        """Grow the embedding table and statistics to the vocabulary's size (new rows random, old rows kept)."""
        n_old, n = self.embedding.num_embeddings, len(self.vocab)
        if n == n_old:
            return
        if n < n_old:
            raise ValueError(f"The vocabulary shrank ({n_old} -> {n} genes); vocabularies may only grow.")
        w = self.embedding.weight
        emb = nn.Embedding(n, self.dim, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.normal_(emb.weight, std=1.0)
            emb.weight[:n_old] = w
        emb.weight.requires_grad_(w.requires_grad)
        self.embedding = emb
        pad = n - n_old
        self.value_mean = torch.cat([self.value_mean, self.value_mean.new_zeros(pad)])
        self.value_std = torch.cat([self.value_std, self.value_std.new_ones(pad)])

    def set_value_stats(self, genes: Sequence[str], mean: np.ndarray, std: np.ndarray) -> None:
        """Store per-gene mean and standard deviation (of training values) used when ``zscore=True``.

        Parameters
        ----------
        genes
            Genes of the vocabulary (an unknown one raises ``KeyError``).
        mean
            Training mean of each gene's values, in ``genes`` order.
        std
            Training standard deviation of each gene's values (below 1e-6 stored as 1).
        """
        ids = self.vocab.ids(genes)
        if (ids < 0).any():
            missing = [g for g, i in zip(genes, ids, strict=True) if i < 0]
            raise KeyError(f"Genes not in the vocabulary: {missing[:10]}.")
        std = np.where(np.asarray(std) > 1e-6, std, 1.0)
        with torch.no_grad():
            self.value_mean[torch.from_numpy(ids)] = torch.as_tensor(np.asarray(mean), dtype=self.value_mean.dtype,
                                                                     device=self.value_mean.device)
            self.value_std[torch.from_numpy(ids)] = torch.as_tensor(std, dtype=self.value_std.dtype,
                                                                    device=self.value_std.device)

    # ---- batching ----------------------------------------------------------------------------------------------

    def tokenize(self, profiles, *, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Pad profiles into a batch: ``ids`` (B, L), ``values`` (B, L), ``mask`` (B, L) and ``has_genes`` (B,).

        Genes not in the vocabulary are dropped with one warning naming them; a profile with no known gene raises
        ``ValueError``.

        Parameters
        ----------
        profiles
            An AnnData (rows are profiles, masked by its ``measured`` layer), a DataFrame (rows; NaN = not
            measured), a Series or ``{gene: value}`` dict (one profile), a ``(genes, values)`` pair (1-D or 2-D
            values), or a list of Series / dicts / pairs / ``None``; ``None`` entries give empty rows
            (``has_genes`` False). Non-finite values count as not measured.
        device
            Where the tensors go (``None``: the CPU).

        Returns
        -------
        dict[str, torch.Tensor]
            ``ids`` (B, L) int64, ``values`` (B, L) float32, ``mask`` (B, L) bool and ``has_genes`` (B,) bool,
            with ``L`` the longest profile (at least 1).
        """
        self.sync_vocab()
        plist = as_profiles(profiles)
        known_sets: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        unknown: dict[str, None] = {}
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        for i, p in enumerate(plist):
            if p is None:
                rows.append((np.zeros(0, np.int64), np.zeros(0, np.float32)))
                continue
            genes, values = p
            key = tuple(genes)
            if key not in known_sets:
                ids = self.vocab.ids(genes)
                known_sets[key] = (ids, ids >= 0)
                for g, k in zip(genes, ids >= 0, strict=True):
                    if not k:
                        unknown[g] = None
            ids, known = known_sets[key]
            if not known.any():
                self.vocab.lookup(genes, what=f"profile {i}")  # raises with a clear message
            rows.append((ids[known], values[known]))
        warn_unknown(list(unknown), "profiles")
        length = max(1, max(len(r[0]) for r in rows))
        ids = np.zeros((len(rows), length), np.int64)
        vals = np.zeros((len(rows), length), np.float32)
        mask = np.zeros((len(rows), length), bool)
        for i, (r_ids, r_vals) in enumerate(rows):
            ids[i, : len(r_ids)], vals[i, : len(r_ids)], mask[i, : len(r_ids)] = r_ids, r_vals, True
        out = {"ids": torch.from_numpy(ids), "values": torch.from_numpy(vals), "mask": torch.from_numpy(mask)}
        out["has_genes"] = out["mask"].any(dim=1)
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, return_tokens: bool = False):
        """Condition vectors (B, dim) of a padded batch (see the class notes).

        Parameters
        ----------
        ids
            Gene ids (B, L), from :meth:`tokenize`.
        values
            The genes' values (B, L), log1p-normalised (standardised per gene here when ``zscore``).
        mask
            (B, L), true where a slot holds a gene; a row with none gives a zero vector.
        return_tokens
            Also return the token states and the mask.

        Returns
        -------
        torch.Tensor or tuple
            The condition vectors (B, dim); with ``return_tokens``, ``(cond, tokens (B, L, dim), mask)``.
        """
        if ids.numel() and int(ids.max()) >= self.embedding.num_embeddings:
            raise IndexError("Gene id beyond the embedding table: call encoder.sync_vocab() after growing the vocab.")
        mask = mask.bool()
        values = values.to(self.embedding.weight.dtype)
        if self.zscore:
            values = (values - self.value_mean[ids]) / self.value_std[ids]
        scale, shift = self.value_mlp(values.unsqueeze(-1)).chunk(2, dim=-1)
        emb = self.embedding(ids)
        m = mask.unsqueeze(-1).to(emb.dtype)  # padded slots carry nothing (and pass no gradient to row 0)
        x = (emb * (1 + scale) + shift) * m
        # linear bag-of-genes path, sum_g e_g v_g / sqrt(n): with standardised values it is centred across tiles,
        # so the condition differs between profiles from the first step (through attention alone the shared gene
        # set dominates at initialisation and the U-Net may learn to ignore the genes)
        linear = (emb * values.unsqueeze(-1) * m).sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(emb.dtype).sqrt()
        empty = ~mask.any(dim=1)
        attend = mask.clone()
        attend[empty, 0] = True  # an all-masked row would give NaN attention; its output is zeroed below
        for block in self.blocks:
            x = block(x, attend)
        cond = self.out_norm(self.pool(x, attend) + linear)
        cond = torch.where(empty.unsqueeze(-1), torch.zeros_like(cond), cond)
        return (cond, x, mask) if return_tokens else cond

    def encode(self, genes: Sequence[str], values) -> torch.Tensor:
        """Encode one profile: ``genes`` and their ``values`` (log1p-normalised) -> a (dim,) tensor.

        Genes not in the vocabulary are dropped with a warning; none known raises ``ValueError``.

        Parameters
        ----------
        genes
            Gene names of the profile.
        values
            Their values, one per gene (log1p-normalised, as the tile tables' ``X``).

        Returns
        -------
        torch.Tensor
            The condition vector, (dim,), on the encoder's device.
        """
        device = self.embedding.weight.device
        batch = self.tokenize((list(genes), np.asarray(values, dtype=np.float32)), device=device)
        return self(batch["ids"], batch["values"], batch["mask"])[0]
