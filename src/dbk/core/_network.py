"""The stage-1 denoiser network (a gene-conditioned diffusers U-Net) and the EMA of its weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._edm import EDM, precondition
from ._gene_encoder import GeneEncoder
from ._presets import PretrainerPreset


class GeneToImageNet(nn.Module):
    """The EDM denoiser ``D(x; sigma, genes)``: a diffusers ``UNet2DModel`` whose noise embedding gets the gene vector.

    The gene encoder's vector is projected to the U-Net's time-embedding width and passed as ``class_labels`` of a
    ``UNet2DModel(class_embed_type="identity")``, which adds it to the embedding of ``c_noise`` that modulates every
    residual block. A learned null vector stands in for the condition of unconditioned samples.

    Parameters
    ----------
    encoder
        The gene encoder (:class:`~dbk.tl.GeneEncoder`) that turns a profile into the condition vector.
    preset
        The architecture (:class:`~dbk.tl.PretrainerPreset`: image size, channels, block types, attention).
    edm
        The EDM constants (:class:`~dbk.tl.EDM`) of the preconditioning around the U-Net.
    """

    def __init__(self, encoder: GeneEncoder, preset: PretrainerPreset, edm: EDM) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.edm = edm
        self.encoder = encoder
        chans = list(preset.block_out_channels)
        attn = [c for c, t in zip(chans, preset.down_block_types, strict=True) if t.startswith("Attn")] + chans[-1:]
        bad = [c for c in attn if c % preset.attention_head_dim]
        if bad or any(c % preset.norm_num_groups for c in chans):
            raise ValueError(f"block_out_channels {tuple(chans)} must be multiples of norm_num_groups "
                             f"({preset.norm_num_groups}), and of attention_head_dim ({preset.attention_head_dim}) "
                             "where there is self-attention (attention blocks and the last level).")
        self.unet = UNet2DModel(
            sample_size=preset.image_size,
            in_channels=3,
            out_channels=3,
            time_embedding_type="positional",
            block_out_channels=tuple(preset.block_out_channels),
            down_block_types=tuple(preset.down_block_types),
            up_block_types=tuple(preset.up_block_types),
            layers_per_block=preset.layers_per_block,
            attention_head_dim=preset.attention_head_dim,
            norm_num_groups=preset.norm_num_groups,
            resnet_time_scale_shift="scale_shift",
            class_embed_type="identity",
        )
        temb = self.unet.time_embedding.linear_2.out_features
        # not zero-initialised: like a class embedding, the condition must move the U-Net from the first step, or
        # the network settles on a constant offset and the gene pathway gets almost no gradient
        self.cond_proj = nn.Sequential(nn.Linear(encoder.dim, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.null_cond = nn.Parameter(torch.randn(temb) / math.sqrt(temb))

    def condition(self, batch_size: int, ids=None, values=None, mask=None, drop=None) -> torch.Tensor:
        """(B, temb) vectors added to the noise embedding; the null vector where ``drop`` or a row has no gene.

        Parameters
        ----------
        batch_size
            B, the number of rows (used when ``ids`` is ``None``).
        ids, values, mask
            The genes' padded batch (B, L) from :meth:`GeneEncoder.tokenize`; ``None``: no genes (every row gets the
            null vector).
        drop
            (B,) bool, true for the rows whose condition is dropped (classifier-free guidance training); ``None``:
            none.

        Returns
        -------
        torch.Tensor
            (B, temb), ``temb`` the U-Net's time-embedding width.
        """
        null = self.null_cond.unsqueeze(0).expand(batch_size, -1)
        if ids is None:
            return null
        cond = self.cond_proj(self.encoder(ids, values, mask))
        use_null = ~mask.bool().any(dim=1)
        if drop is not None:
            use_null = use_null | drop.bool()
        return torch.where(use_null.unsqueeze(1), null.to(cond.dtype), cond)

    def forward(self, x, sigma, ids=None, values=None, mask=None, drop=None) -> torch.Tensor:
        """Denoised images ``D(x; sigma)`` (images in [-1, 1]); unconditioned when ``ids`` is ``None``.

        Parameters
        ----------
        x
            Noisy images (B, 3, H, W).
        sigma
            Their noise levels, (B,).
        ids, values, mask
            The genes' padded batch (B, L) from :meth:`GeneEncoder.tokenize`; ``None``: no genes (every row gets the
            null vector).
        drop
            (B,) bool, true for the rows whose condition is dropped (classifier-free guidance training); ``None``:
            none.

        Returns
        -------
        torch.Tensor
            The denoised estimate, float32, shaped like ``x``.
        """
        emb = self.condition(x.shape[0], ids, values, mask, drop)
        return precondition(self.edm, lambda x_in, c_noise: self.unet(x_in, c_noise, class_labels=emb).sample, x,
                            sigma)


def _ema_update(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * net`` for the parameters (one fused lerp); buffers are copied.

    The caller sets ``beta`` (``min(ema_decay, (1 + step) / (10 + step))``, from the step counted by the model).
    """
    # our own lerp, not diffusers' EMAModel: its built-in decay warm-up would give other weights (and numbers)
    with torch.no_grad():
        pe = [p for p in ema.parameters()]
        pn = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(pe, pn, 1.0 - beta)
        for be, bn in zip(ema.buffers(), net.buffers(), strict=True):
            be.copy_(bn)
