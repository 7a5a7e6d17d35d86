"""U-Net building blocks: residual block (optionally timestep-conditioned), self-attention, resampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .nn import normalization, zero_module


class Downsample(nn.Module):
    """Halve the spatial size with a stride-2 3x3 conv (`use_conv`) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op: nn.Module = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)
        )

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the spatial size (nearest neighbour), followed by a 3x3 conv if `use_conv`."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv: nn.Module = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Pre-activation residual block; with `emb_channels` it is conditioned on the timestep embedding.

    The embedding either is added to the features (`use_scale_shift_norm=False`) or modulates the
    second normalisation as ``norm(h) * (1 + scale) + shift`` (improved-DDPM). The last conv is
    zero-initialised, so a fresh block is the identity (up to the 1x1 skip when channels change).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm and emb_channels is not None
        self.in_layers = nn.Sequential(
            normalization(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers: nn.Module | None = None
        if emb_channels is not None:
            emb_out = 2 * out_channels if self.use_scale_shift_norm else out_channels
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_norm = normalization(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.in_layers(x)
        if self.emb_layers is None:
            h = self.out_norm(h)
        else:
            e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
            if self.use_scale_shift_norm:
                scale, shift = e.chunk(2, dim=1)
                h = self.out_norm(h) * (1 + scale) + shift
            else:
                h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, height * width)
        # each [B, heads, HW, head_dim], contiguous: with a non-unit last stride SDPA falls back to its math kernel
        q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.unbind(dim=1))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class EmbedSequential(nn.Sequential):
    """A sequence of blocks that all receive the timestep embedding (blocks may ignore it)."""

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        for layer in self:
            x = layer(x, emb)
        return x
