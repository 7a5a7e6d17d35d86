"""Small building helpers for the diffusion U-Net: timestep embedding, normalisation, zero init."""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import Tensor, nn

M = TypeVar("M", bound=nn.Module)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B] on the 0..T-1 scale."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: M) -> M:
    """Zero all parameters of `module` (so a residual branch starts as the identity) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest number of groups <= max_groups that divides `channels`."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under bf16/fp16 autocast), returned in the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The U-Net's normalisation layer: GroupNorm with up to 32 groups that divide `channels`."""
    return GroupNorm32(group_count(channels), channels)
