"""Semantic Diffusion Model (SDM; Wang et al. 2022, "Semantic Image Synthesis via Diffusion Models", arXiv 2207.00050).

The paper's diffusion baseline (arXiv 2312.06453, Table 2). Unlike the project's U-Net, the noisy image alone
enters the encoder (plain residual blocks: the labels never reach it); the semantic map conditions the middle
block and every decoder residual block through both of its group norms, each a SPADE norm (multi-layer SPADE:
parameter-free GroupNorm, then per-pixel ``(1 + gamma) * h + beta`` from a small conv net on the nearest-resized
one-hot mask). Timestep embedding, scale-shift norm, attention and the learned-variance output are the U-Net's.

Defaults in ``training/configs/sdm.yaml``, taken from the authors' release (github.com/WeilunWang/semantic-diffusion-
model, ``scripts/ade20k.sh``): 256 px, 256 base channels, channel_mult (1, 1, 2, 2, 4, 4) (guided-diffusion's 256 px
default), 2 residual blocks per level, attention at 32, 16 and 8 px (downsample factors 8, 16, 32), scale-shift norm,
learned variance, linear schedule with 1000 steps, dropout 0, SPADE hidden width 128, gradient checkpointing, EMA
0.9999, label dropout 0.2 and guidance for classifier-free sampling. Their lr 1e-4 (pre-training) / 2e-5
(classifier-free fine-tuning with the label dropout) and per-GPU batch 4 on 8 GPUs are replaced by the comparison
paper's protocol, which trained SDM like its DDPM models (arXiv 2312.06453, Sec. 3: Adam 1e-4, batch 16, 150k
iterations), with the label dropout from the start (one stage); the authors' fine-tuning stage is a ``--resume``
with ``--lr 2e-5`` and more ``--iterations``. Guidance: their sampling scripts pass ``--s 1.5`` to code that computes
``eps_uncond + s (eps_cond - eps_uncond)``; this library uses the paper's form ``eps_uncond + (1 + s) (eps_cond -
eps_uncond)``, so their setting is ``guidance_scale`` 0.5. Not taken: ``num_head_channels`` 64 (here a fixed
``num_heads`` 8: 64 channels per head at 8 px downsampling, 128 below) and ``resblock_updown`` (here the U-Net's
strided-conv / nearest+conv resampling).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .blocks import ResBlock
from .denoiser_net import DenoiserNet
from .generators.spade_blocks import SPADE
from .levels import build_levels
from .nn import GroupNorm32, group_count

SPADE_HIDDEN = 128
"""Width of the conv net that turns the mask into a SPADE norm's scale and shift (the authors' ``nhidden``)."""


def spade_group_norm(channels: int, label_channels: int) -> SPADE:
    """SPADE over a GroupNorm without affine parameters (SDM's decoder norm)."""
    return SPADE(channels, label_channels, SPADE_HIDDEN, norm=GroupNorm32(group_count(channels), channels, affine=False))


class SPADEResBlock(ResBlock):
    """The U-Net's timestep-conditioned residual block with both group norms replaced by SPADE norms of the mask."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, label_channels: int,
                 dropout: float, use_scale_shift_norm: bool, use_checkpoint: bool) -> None:
        super().__init__(in_channels, out_channels, emb_channels, dropout, use_scale_shift_norm, use_checkpoint)
        self.in_layers[0] = spade_group_norm(in_channels, label_channels)
        self.out_norm = spade_group_norm(out_channels, label_channels)

    def forward(self, x: Tensor, emb: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward_mask, x, emb, mask, use_reentrant=False)
        return self._forward_mask(x, emb, mask)

    def _forward_mask(self, x: Tensor, emb: Tensor, mask: Tensor) -> Tensor:
        h = self.in_layers[1:](self.in_layers[0](x, mask))
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h, mask) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e, mask)
        return self.skip(x) + self.out_layers(h)


class SPADESequential(nn.Sequential):
    """Blocks that all receive the timestep embedding; SPADE blocks get the mask too."""

    def forward(self, x: Tensor, emb: Tensor, mask: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb, mask) if isinstance(layer, SPADEResBlock) else layer(x, emb)
        return x


class SDMModel(DenoiserNet):
    """SDM denoiser for 2-D CT slices; same config keys and call as :class:`~.unet.UNetModel`
    (``architecture`` "sdm", ``conditioning`` "spade"), so the diffusion, samplers and trainer use it unchanged.

    A call's mask is [B, num_classes, H, W] (no 2.5D neighbours); `edge` and `cond_features` exist for the U-Net's
    call and must be None.
    """

    architecture = "sdm"

    def __init__(self, **config: Any) -> None:
        super().__init__(config)
        cfg = self.config
        self.mask_channels = cfg["num_classes"]

        def spade(in_ch: int, out_ch: int) -> SPADEResBlock:
            return SPADEResBlock(in_ch, out_ch, self.emb_channels, self.mask_channels, cfg["dropout"],
                                 cfg["use_scale_shift_norm"], cfg["use_checkpoint"])

        self._add_stem(cfg["in_channels"])
        # the encoder sees the noisy image only; the middle block and the decoder see the mask too
        levels = build_levels(cfg, self._res_block, spade, SPADESequential, [0] * len(cfg["channel_mult"]))
        self.input_blocks, self.middle_block = levels.input_blocks, levels.middle_block
        self.output_blocks = levels.output_blocks
        self._add_head(levels.out_channels)

    def encode_condition(self, mask: Tensor, edge: Tensor | None = None) -> None:
        """None: SDM has no condition encoder (each SPADE norm reads the mask at its own resolution)."""
        return None

    def _decoder_features(self, x: Tensor, emb: Tensor, mask: Tensor, edge: Tensor | None,
                          cond_features: list[Tensor] | None) -> Tensor:
        h = self.input_conv(x)
        skips = [h]
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb, mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, mask)
        return h

    def _check_inputs(self, x: Tensor, timesteps: Tensor, mask: Tensor, edge: Tensor | None,
                      cond_features: list[Tensor] | None) -> tuple[int, int, int]:
        shape = super()._check_inputs(x, timesteps, mask, edge, cond_features)
        if edge is not None or cond_features is not None:
            raise ValueError("an SDM model takes the mask only (no edge map, no condition-encoder features)")
        return shape
