"""Stage-1 inference: sampling tiles from profiles, denoising losses and the does-the-model-use-the-genes check.

:class:`_SamplingMixin` holds the public inference methods of :class:`~dbk.tl.DiffusionPretrainer`
(:meth:`generate`, :meth:`denoising_loss`, :meth:`evaluate`); the model class inherits them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .._constants import TILES_KEY, TILES_TABLE_KEY
from .._utils import resolve_seed
from ._data import _as_list, _build_sources, _TileBatches
from ._edm import heun_sample, precondition
from ._network import GeneToImageNet


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (a counter-based stream: the same parts give the same seed everywhere)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips / 90° rotations per sample (``k`` in 0..7)."""
    out = x.clone()
    for code in range(1, 8):
        sel = (k == code).nonzero().flatten()
        if len(sel):
            y = torch.rot90(x[sel], code % 4, dims=(2, 3))
            out[sel] = y.flip(3) if code >= 4 else y
    return out


def _per_sample_noise(shape, random_state: int, stream: int) -> torch.Tensor:
    """Standard normal noise whose row ``i`` is seeded by ``(random_state, i, stream)``."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(_seed(random_state, i, stream)))
                        for i in range(shape[0])]) if shape[0] else torch.zeros(shape)


class _SamplingMixin:
    """Inference methods of the pretrainer (uses its ``net``, ``ema_net``, ``edm``, ``encoder``, ``image_size``)."""

    def _move(self, accelerator) -> None:
        """Move the model to the device ``accelerator`` names (``None``: leave it where it is)."""
        if accelerator is not None:
            from ._device import resolve_device

            self.to(resolve_device(accelerator))

    def _model(self, use_ema: bool) -> GeneToImageNet:
        m = self.ema_net if use_ema else self.net
        m.eval()
        return m

    def _as_images(self, images) -> torch.Tensor:
        """uint8 images (N, H, W, 3) array or (N, 3, H, W) tensor -> float (N, 3, H, W) in [-1, 1]."""
        if isinstance(images, torch.Tensor):
            t = images
            if t.ndim == 4 and t.shape[-1] == 3 and t.shape[1] != 3:
                t = t.permute(0, 3, 1, 2)
        else:
            arr = np.asarray(images)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[-1] != 3:
                raise ValueError(f"images must be (N, H, W, 3) uint8, got shape {arr.shape}.")
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
        if t.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0-255), got {t.dtype}.")
        if tuple(t.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(t.shape[2:])} px; this model works on {self.image_size} px tiles "
                             "(read them with dbk.pp.TileDataset(size_px=model.image_size)).")
        return t.float().div(127.5).sub(1.0)

    def _tokens(self, profiles, n: int, device) -> dict | None:
        if profiles is None:
            return None
        self._grow_vocab(())
        tok = self.encoder.tokenize(profiles, device=device)
        if tok["ids"].shape[0] != n:
            raise ValueError(f"{tok['ids'].shape[0]} profiles for {n} images.")
        return tok

    @torch.no_grad()
    def denoising_loss(
        self,
        images,
        profiles=None,
        *,
        sigma: float,
        random_state: int | None = None,
        use_ema: bool = True,
        batch_size: int = 64,
        accelerator: str | None = None,
    ) -> np.ndarray:
        """Per-image mean squared error of the denoiser at one noise level (images scaled to [-1, 1]).

        The noise of image ``i`` is seeded by ``(random_state, i)``, so a conditional and an unconditional call on
        the same images see the same noise: their difference is what the genes tell about the image.

        Parameters
        ----------
        images
            (N, H, W, 3) uint8 array (as :meth:`generate` returns) or (N, 3, H, W) uint8 tensor.
        profiles
            N profiles (anything :meth:`generate` accepts); ``None`` for the unconditional loss.
        sigma
            Noise level.
        random_state
            Seed of the noise (``None``: ``dbk.settings.seed``).
        use_ema
            Use the EMA weights.
        batch_size
            Images per forward pass.
        accelerator
            Where the network runs: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... (the model is moved there);
            ``None``: where the model is.

        Returns
        -------
        (N,) float array; multiply by ``(sigma^2 + 0.25) / (0.5 sigma)^2`` for the EDM-weighted training loss.
        """
        self._move(accelerator)
        n = self._as_images(images).shape[0]
        tok = self._tokens(profiles, n, self.device)
        if tok is not None:
            tok = {k: tok[k] for k in ("ids", "values", "mask")}
        return self._loss_tokens(images, tok, float(sigma), resolve_seed(random_state), use_ema, batch_size)

    @torch.no_grad()
    def generate(
        self,
        profiles,
        *,
        n_steps: int = 18,
        guidance: float = 1.0,
        random_state: int | None = None,
        use_ema: bool = True,
        batch_size: int = 64,
        s_churn: float = 0.0,
        accelerator: str | None = None,
    ) -> np.ndarray:
        """Generate tiles from expression profiles with the EDM Heun sampler and classifier-free guidance.

        Parameters
        ----------
        profiles
            An AnnData (rows = profiles; its ``measured`` layer marks each row's panel), a DataFrame (NaN = not
            measured), a Series or ``{gene: value}`` dict, a ``(genes, values)`` pair, a list of those with ``None``
            for unconditional samples, or an int ``n`` for ``n`` unconditional samples. Values are log1p-normalised
            (like ``X`` of the tile table); genes not in the vocabulary are dropped with a warning.
        n_steps
            Sampler steps (each two network evaluations but the last).
        guidance
            Classifier-free guidance weight ``w``: ``D = D_uncond + w (D_cond - D_uncond)``; 1 is plain conditional
            sampling, 0 unconditional, > 1 strengthens the genes' effect.
        random_state
            Sample ``i`` starts from noise seeded by ``(random_state, i)`` (independent of ``batch_size``; ``None``:
            ``dbk.settings.seed``).
        use_ema
            Use the EMA weights.
        batch_size
            Samples per batch.
        s_churn
            EDM stochasticity (0: deterministic ODE sampler).
        accelerator
            Where the network runs: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... (the model is moved there);
            ``None``: where the model is.

        Returns
        -------
        (N, image_size, image_size, 3) uint8 RGB tiles.
        """
        _check_batch_size(batch_size)
        self._move(accelerator)
        random_state = resolve_seed(random_state)
        model = self._model(use_ema)
        device = self.device
        if isinstance(profiles, (int, np.integer)):
            profiles = [None] * int(profiles)
        self._grow_vocab(())
        tok = self.encoder.tokenize(profiles, device=device)
        n = tok["ids"].shape[0]
        shape = (n, 3, self.image_size, self.image_size)
        noise = _per_sample_noise(shape, random_state, 0)
        churn = [torch.Generator().manual_seed(_seed(random_state, i, 1)) for i in range(n)]
        sigmas = self.edm.schedule(n_steps, device)
        out = np.empty((n, self.image_size, self.image_size, 3), np.uint8)
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            b = e - s
            kw = {k: tok[k][s:e] for k in ("ids", "values", "mask")}
            emb_c = model.condition(b, **kw)
            emb_u = model.condition(b)

            def unet(x_in, c_noise, emb):
                return model.unet(x_in, c_noise, class_labels=emb).sample

            def denoise(x, sig, emb_c=emb_c, emb_u=emb_u):
                if guidance == 1.0:
                    return precondition(self.edm, lambda xi, cn: unet(xi, cn, emb_c), x, sig)
                if guidance == 0.0:
                    return precondition(self.edm, lambda xi, cn: unet(xi, cn, emb_u), x, sig)
                both = precondition(self.edm, lambda xi, cn: unet(xi, cn, torch.cat([emb_c, emb_u])),
                                    torch.cat([x, x]), torch.cat([sig, sig]))
                d_c, d_u = both.chunk(2)
                return d_u + guidance * (d_c - d_u)

            gens = churn[s:e]

            def randn_like(x, gens=gens):
                return torch.stack([torch.randn(x.shape[1:], generator=gg) for gg in gens]).to(x.device)

            x = heun_sample(denoise, noise[s:e].to(device), sigmas, s_churn=s_churn, randn_like=randn_like)
            img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
            out[s:e] = img.cpu().numpy()
        return out

    def evaluate(
        self,
        data,
        *,
        sigmas: Sequence[float] = (0.5, 1.0),
        random_state: int | None = None,
        max_tiles: int | None = 512,
        use_ema: bool = True,
        genes: Sequence[str] | None = None,
        table_key: str = TILES_TABLE_KEY,
        tiles_key: str = TILES_KEY,
        accelerator: str | None = None,
    ):
        """Does the model use the genes? Denoising loss with the tile's profile, without, and with another tile's.

        Evaluate on held-out slides (or tiles). All losses use the same noise (seeded by ``random_state``); a
        conditional loss clearly below the unconditional one means the profiles inform the image, and a loss with the
        tile's own profile below the one with a profile shuffled from another tile means the information is
        tile-specific (not only the slide's average composition).

        Returns
        -------
        DataFrame with one row per sigma: ``sigma``, ``loss_cond`` (own profile), ``loss_uncond`` (no profile),
        ``loss_shuffled`` (each tile conditioned on the profile of another tile of the evaluated set, a random
        derangement seeded by ``random_state``), as mean per-pixel MSE in [-1, 1] units; ``gain``
        (``1 - loss_cond / loss_uncond``), ``gain_shuffled`` (``1 - loss_shuffled / loss_uncond``) and ``n_tiles``.
        ``random_state=None`` means ``dbk.settings.seed``; ``accelerator`` as in :meth:`generate` (``None``: where the
        model is).
        """
        import pandas as pd

        self._move(accelerator)
        random_state = resolve_seed(random_state)

        sources = _build_sources(_as_list(data), vocab=self.vocab, image_size=self.image_size, genes=genes,
                                 table_key=table_key, tiles_key=tiles_key, unlabeled_tiles_key=None,
                                 labeled_only=True)
        ds = _TileBatches([s for s in sources if s.ids is not None])
        idx = np.arange(ds.n)
        if max_tiles is not None and ds.n > max_tiles:
            idx = np.sort(np.random.default_rng(random_state).choice(ds.n, max_tiles, replace=False))
        batch = ds[idx]
        tok = {k: batch[k] for k in ("ids", "values", "mask")}
        n = len(idx)
        perm = np.random.default_rng([random_state, 1]).permutation(n)
        if n > 1:  # a derangement: a random cyclic shift of a random order, so no tile keeps its own profile
            perm = np.roll(perm, 1)[np.argsort(perm)]
        shuf = {k: v[torch.as_tensor(perm)] for k, v in tok.items()}
        rows = []
        for sigma in sigmas:
            lc = self._loss_tokens(batch["image"], tok, sigma, random_state, use_ema)
            lu = self._loss_tokens(batch["image"], None, sigma, random_state, use_ema)
            ls = self._loss_tokens(batch["image"], shuf, sigma, random_state, use_ema)
            rows.append({"sigma": float(sigma), "loss_cond": float(lc.mean()), "loss_uncond": float(lu.mean()),
                         "loss_shuffled": float(ls.mean()), "gain": float(1 - lc.mean() / lu.mean()),
                         "gain_shuffled": float(1 - ls.mean() / lu.mean()), "n_tiles": n})
        return pd.DataFrame(rows)

    @torch.no_grad()
    def _loss_tokens(self, images_u8, tok, sigma, random_state, use_ema, batch_size: int = 64) -> np.ndarray:
        _check_batch_size(batch_size)
        model = self._model(use_ema)
        device = self.device
        x0 = self._as_images(images_u8)
        noise = _per_sample_noise(x0.shape, random_state, 0)
        out = np.empty(x0.shape[0])
        for s in range(0, x0.shape[0], batch_size):
            e = min(x0.shape[0], s + batch_size)
            x = x0[s:e].to(device)
            kw = {} if tok is None else {k: v[s:e].to(device) for k, v in tok.items()}
            d = model(x + sigma * noise[s:e].to(device), torch.full((e - s,), float(sigma), device=device), **kw)
            out[s:e] = (d.float() - x).pow(2).flatten(1).mean(1).cpu().numpy()
        return out
