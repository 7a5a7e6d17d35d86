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
from .config import resolve_config
from .generators.spade_blocks import SPADE
from .levels import build_levels
from .nn import GroupNorm32, group_count, normalization, timestep_embedding, zero_module

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


class SDMModel(nn.Module):
    """SDM denoiser for 2-D CT slices; same config keys and call as :class:`~.unet.UNetModel`
    (``architecture`` "sdm", ``conditioning`` "spade"), so the diffusion, samplers and trainer use it unchanged."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = self.config = resolve_config(**config)
        if cfg["architecture"] != "sdm":
            raise ValueError(f"SDMModel builds architecture 'sdm', not {cfg['architecture']!r}")
        mc, mult, ckpt = cfg["model_channels"], cfg["channel_mult"], cfg["use_checkpoint"]
        emb_dim, labels = 4 * mc, cfg["num_classes"]

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_dim, cfg["dropout"], cfg["use_scale_shift_norm"], ckpt)

        def spade(in_ch: int, out_ch: int) -> SPADEResBlock:
            return SPADEResBlock(in_ch, out_ch, emb_dim, labels, cfg["dropout"], cfg["use_scale_shift_norm"], ckpt)

        self.conditioning: str = cfg["conditioning"]
        self.size_multiple = 2 ** (len(mult) - 1)
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(cfg["in_channels"], mc, 3, padding=1)

        # the encoder sees the noisy image only; the middle block and the decoder see the mask too
        levels = build_levels(cfg, res, spade, SPADESequential, [0] * len(mult))
        self.input_blocks, self.middle_block = levels.input_blocks, levels.middle_block
        self.output_blocks = levels.output_blocks
        ch = levels.out_channels

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg["out_channels"], 3, padding=1))
        )

    def encode_condition(self, mask: Tensor, edge: Tensor | None = None) -> None:
        """None: SDM has no condition encoder (each SPADE norm reads the mask at its own resolution)."""
        return None

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        mask: Tensor,
        edge: Tensor | None = None,
        cond_features: list[Tensor] | None = None,
    ) -> Tensor:
        """Predict [B, out_channels, H, W] from the noisy image x [B, in_channels, H, W] and the one-hot mask
        [B, num_classes, H, W] (all zeros: the "no label" input of classifier-free guidance); `timesteps` [B] or a
        scalar on the 0..T-1 scale. `edge` and `cond_features` exist for the U-Net's call and must be None."""
        self._check_inputs(x, timesteps, mask, edge, cond_features)
        mask = mask.to(x.dtype)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config["model_channels"]))
        h = self.input_conv(x)
        skips = [h]
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb, mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, mask)
        return self.out(h).to(x.dtype)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, mask: Tensor, edge: Tensor | None,
                      cond_features: list[Tensor] | None) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg["in_channels"]:
            raise ValueError(f"x must be [B, {cfg['in_channels']}, H, W], got {tuple(x.shape)}")
        b, _, height, width = x.shape
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image height and width must be multiples of {self.size_multiple}, got {height}x{width}")
        if timesteps.shape not in ((), (b,)):
            raise ValueError(f"timesteps must be a scalar or have shape [{b}], got {tuple(timesteps.shape)}")
        if mask.shape != (b, cfg["num_classes"], height, width):
            raise ValueError(
                f"mask must be one-hot [{b}, {cfg['num_classes']}, {height}, {width}], got {tuple(mask.shape)}"
            )
        if edge is not None or cond_features is not None:
            raise ValueError("an SDM model takes the mask only (no edge map, no condition-encoder features)")
