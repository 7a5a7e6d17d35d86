"""OASIS generator (Schoenfeld et al. 2021, "You Only Need Adversarial Supervision for Semantic Image Synthesis").

The authors' ``OASIS_Generator``: a SPADE-style generator whose input and every SPADE layer see the label map with
3D noise concatenated (``z_dim`` 64 channels: one 64-d vector per image, broadcast over the pixels, as the authors'
code draws it), resized to init_size (8 at 256 px), then SPADE ResNet blocks of widths 16, 16, 8, 4, 2, 1 x 64 with
an upsampling between consecutive blocks, tanh.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import resolve_generator_config, upsamplings
from .spade_blocks import SPADEStack


def oasis_blocks(channels: int, ups: int) -> list[tuple[int, bool]]:
    """(width, upsample before) of OASIS's blocks for ``ups`` doublings: 16, 16, then halving, x ``channels``."""
    return [(16 * channels, False), (16 * channels, True)] + [(16 * channels >> k, True) for k in range(1, ups)]


class OASISGenerator(nn.Module):
    """One-hot class map [B, num_classes, S, S] and noise [B, noise_channels] -> image [B, out_channels, S, S]."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = self.config = resolve_generator_config(**(config | {"method": "oasis"}))
        self.noise_channels: int = cfg["noise_channels"]
        ups = upsamplings(cfg["image_size"], cfg["init_size"])
        self.body = SPADEStack(cfg["num_classes"] + self.noise_channels, cfg["out_channels"], cfg["init_size"],
                               cfg["hidden_channels"], oasis_blocks(cfg["channels"], ups))

    def forward(self, mask: Tensor, noise: Tensor | None = None) -> Tensor:
        """Image for the one-hot ``mask`` and per-image ``noise`` [B, noise_channels] (needed when noise_channels)."""
        if self.noise_channels:
            if noise is None or noise.shape != (mask.shape[0], self.noise_channels):
                raise ValueError(f"OASIS needs noise [{mask.shape[0]}, {self.noise_channels}], got "
                                 f"{None if noise is None else tuple(noise.shape)}")
            z = noise.to(mask.dtype)[:, :, None, None].expand(-1, -1, *mask.shape[-2:])
            mask = torch.cat([z, mask], dim=1)
        return self.body(mask)
