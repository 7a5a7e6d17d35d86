"""SPADE generator (Park et al. 2019, "Semantic Image Synthesis with Spatially-Adaptive Normalization").

The authors' ``SPADEGenerator`` without the VAE encoder (``num_upsampling_layers normal``): the label map resized to
init_size (8 at 256 px) -> conv to 16 ngf, then SPADE ResNet blocks head (16) | up | middle (16), middle (16) | up,
8 | up, 4 | up, 2 | up, 1 (x ngf = 64), tanh. Parameter-free normalisation is batch norm (synchronised across GPUs in
DDP), spectral norm on the block convolutions. The paper's optional VGG perceptual loss is not used: it needs
ImageNet VGG-19 weights (torchvision), which this project never downloads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .config import resolve_generator_config, upsamplings
from .spade_blocks import SPADEStack


def spade_blocks(channels: int, ups: int) -> list[tuple[int, bool]]:
    """(width, upsample before) of SPADE's blocks for ``ups`` doublings: head, middle x2, then halving widths."""
    return ([(16 * channels, False), (16 * channels, True), (16 * channels, False)]
            + [(16 * channels >> k, True) for k in range(1, ups)])


class SPADEGenerator(nn.Module):
    """One-hot class map [B, num_classes, S, S] -> image [B, out_channels, S, S] in [-1, 1]."""

    noise_channels = 0

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = self.config = resolve_generator_config(**(config | {"method": "spade"}))
        ups = upsamplings(cfg["image_size"], cfg["init_size"])
        self.body = SPADEStack(cfg["num_classes"], cfg["out_channels"], cfg["init_size"], cfg["hidden_channels"],
                               spade_blocks(cfg["channels"], ups))

    def forward(self, mask: Tensor, noise: Tensor | None = None) -> Tensor:
        """Image for the one-hot ``mask``; SPADE without its encoder takes no noise."""
        return self.body(mask)
