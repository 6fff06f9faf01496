"""EDM (Karras et al. 2022): preconditioning, training noise levels and loss weight, and the Heun sampler."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class EDM:
    """Constants of the EDM formulation.

    Parameters
    ----------
    sigma_data
        Standard deviation of the data (0.5 for images scaled to [-1, 1]).
    p_mean, p_std
        Training noise levels: ``ln(sigma) ~ N(p_mean, p_std^2)``.
    sigma_min, sigma_max, rho
        Sampling schedule ``sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    """

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def to_dict(self) -> dict:
        """JSON-ready form.

        Returns
        -------
        dict
            The six constants by name; ``EDM(**d)`` rebuilds the object.
        """
        return asdict(self)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``c_skip, c_out, c_in, c_noise`` for noise levels ``sigma`` (any shape).

        Parameters
        ----------
        sigma
            Noise levels (> 0), any shape.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
            The EDM preconditioning, each shaped like ``sigma``: ``c_skip = sigma_data^2 / (sigma^2 +
            sigma_data^2)``, ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``, ``c_in = 1 / sqrt(sigma^2 +
            sigma_data^2)``, ``c_noise = ln(sigma) / 4``.
        """
        sd2 = self.sigma_data**2
        s2 = sigma**2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``: unit loss at every noise level.

        Parameters
        ----------
        sigma
            Noise levels (> 0), any shape.

        Returns
        -------
        torch.Tensor
            The weight of each noise level, shaped like ``sigma``.
        """
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
        """Training noise levels, log-normal: ``ln(sigma) ~ N(p_mean, p_std^2)``.

        Parameters
        ----------
        n
            Number of levels (one per sample of the batch).
        generator
            The seeded random generator to draw from (on ``device``).
        device
            Where the levels are made.

        Returns
        -------
        torch.Tensor
            ``(n,)`` float32 noise levels.
        """
        return (torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean).exp()

    def schedule(self, n_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``n_steps`` decreasing noise levels (Karras schedule) followed by 0.

        Parameters
        ----------
        n_steps
            Number of sampling steps (>= 1).
        device
            Where the levels are made.

        Returns
        -------
        torch.Tensor
            ``(n_steps + 1,)`` float32: ``sigma_max`` down to ``sigma_min`` (the class's schedule), then 0.
        """
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps!r}.")
        i = torch.arange(n_steps, dtype=torch.float64, device=device)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        frac = i / max(n_steps - 1, 1)
        s = (hi + frac * (lo - hi)) ** self.rho
        return torch.cat([s, s.new_zeros(1)]).float()


def precondition(
    edm: EDM, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The EDM denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` around a raw network ``F``.

    ``sigma`` has shape (B,); ``model(x_in, c_noise)`` returns a tensor shaped like ``x``.
    """
    c_skip, c_out, c_in, c_noise = edm.scalings(sigma.to(torch.float32))
    shape = (-1,) + (1,) * (x.ndim - 1)
    f = model(x * c_in.view(shape).to(x.dtype), c_noise)
    return c_skip.view(shape) * x + c_out.view(shape) * f.to(torch.float32)


def edm_loss(edm: EDM, denoised: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted denoising loss ``lambda(sigma) * mean((D - x)^2)``, shape (B,)."""
    mse = (denoised.float() - clean.float()).pow(2).flatten(1).mean(dim=1)
    return edm.loss_weight(sigma) * mse


@torch.no_grad()
def heun_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
    randn_like: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order sampler with optional stochastic churn (off by default).

    Parameters
    ----------
    denoise
        ``denoise(x, sigma)`` -> the denoised estimate, ``sigma`` a (B,) tensor.
    noise
        Standard normal noise (B, C, H, W); scaled by ``sigmas[0]``.
    sigmas
        Decreasing noise levels ending with 0 (:meth:`EDM.schedule`).
    s_churn, s_min, s_max, s_noise
        Stochasticity of EDM (``s_churn=0``: deterministic).
    randn_like
        Fresh noise for the churn (default ``torch.randn_like``).

    Returns
    -------
    torch.Tensor
        The samples, float32, shaped like ``noise`` (images in the denoiser's range, [-1, 1] for dbk's).
    """
    n = len(sigmas) - 1
    randn_like = torch.randn_like if randn_like is None else randn_like
    x = noise.float() * sigmas[0]
    ones = x.new_ones(x.shape[0])
    for i in range(n):
        t_cur, t_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * s_noise * randn_like(x) if gamma > 0 else x
        d = (x_hat - denoise(x_hat, ones * t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if t_next > 0:
            d2 = (x - denoise(x, ones * t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    return x
