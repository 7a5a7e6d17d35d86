"""Pix2Pix U-Net generator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks").

The authors' ``unet_256``: log2(size) stride-2 4x4 convolutions down to 1 x 1 (64, 128, 256, 512, 512, ...
channels), mirrored transposed convolutions up with skip connections, dropout 0.5 in the three innermost decoder
blocks, tanh output. Normalisation is instance norm: the authors train with batch 1 and normalise with the test
batch's statistics at inference, which is exactly instance normalisation; it also makes a slice's output independent
of the batch it is synthesized in. Dropout is off at inference (``eval()``), so synthesis is deterministic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import resolve_generator_config

DROPOUT_BLOCKS = 3
"""Decoder blocks next to the innermost one that use dropout (the authors' ``use_dropout`` blocks)."""


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels)


class Pix2PixGenerator(nn.Module):
    """One-hot class map [B, num_classes, S, S] -> image [B, out_channels, S, S] in [-1, 1]."""

    noise_channels = 0

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = self.config = resolve_generator_config(**(config | {"method": "pix2pix"}))
        depth = cfg["image_size"].bit_length() - 1
        widths = [cfg["channels"] * min(2 ** i, 8) for i in range(depth)]
        self.down = nn.ModuleList([nn.Conv2d(cfg["num_classes"], widths[0], 4, 2, 1)])
        for i in range(1, depth):
            layers = [nn.LeakyReLU(0.2), nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1)]
            if i < depth - 1:  # the innermost (1 x 1) map is not normalised
                layers.append(_norm(widths[i]))
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()
        for i in range(depth - 1, 0, -1):
            inner = widths[i] * (1 if i == depth - 1 else 2)
            layers = [nn.ReLU(), nn.ConvTranspose2d(inner, widths[i - 1], 4, 2, 1), _norm(widths[i - 1])]
            if depth - 1 - DROPOUT_BLOCKS < i < depth - 1 and cfg["dropout"]:
                layers.append(nn.Dropout(cfg["dropout"]))
            self.up.append(nn.Sequential(*layers))
        self.up.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * widths[0], cfg["out_channels"], 4, 2, 1),
                                     nn.Tanh()))

    def forward(self, mask: Tensor, noise: Tensor | None = None) -> Tensor:
        """Image for the one-hot ``mask``; Pix2Pix takes no noise (its randomness is dropout)."""
        skips = []
        h = mask
        for block in self.down:
            h = block(h)
            skips.append(h)
        h = self.up[0](skips.pop())
        for block in self.up[1:]:
            h = block(torch.cat([h, skips.pop()], dim=1))
        return h
