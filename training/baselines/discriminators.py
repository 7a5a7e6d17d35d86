"""The baselines' discriminators: Pix2Pix's 70 x 70 PatchGAN, SPADE's multi-scale PatchGAN, OASIS's U-Net
segmenter with N+1 outputs. Inference never needs them, so they are not in the library."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


class PatchGAN(nn.Module):
    """Pix2Pix's conditional PatchGAN (Isola et al. 2017, Sec. 3.2.2; the authors' ``n_layers=3`` net, 70 x 70
    receptive field): 4x4 convolutions, stride 2, 2, 2, 1, 1, widths 64-128-256-512-1, leaky ReLU 0.2, on
    concat(one-hot mask, image). Instance norm instead of batch norm: the authors' batch-1 batch norm is instance
    norm, and it keeps real and fake halves of one forward pass independent."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            blocks += [nn.Conv2d(width, out, 4, 2 if n < layers else 1, 1), nn.InstanceNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, mask: Tensor, image: Tensor) -> Tensor:
        """Patch logits [B, 1, h, w] for (mask, image) pairs."""
        return self.net(torch.cat([mask, image.to(mask.dtype)], dim=1))


class NLayerFeatures(nn.Module):
    """One scale of SPADE's discriminator (pix2pixHD's ``NLayerDiscriminator``, ``n_layers_D`` 4): 4x4 convs with
    padding 2, stride 2 except the last, widths 64 doubling up to 512, spectral norm + instance norm after the first;
    returns every layer's output (the last is the patch logits) for feature matching."""

    def __init__(self, in_channels: int, channels: int, layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, channels, 4, 2, 2), nn.LeakyReLU(0.2))])
        width = channels
        for n in range(1, layers):
            out = min(width * 2, 8 * channels)
            self.layers.append(nn.Sequential(spectral_norm(nn.Conv2d(width, out, 4, 2 if n < layers - 1 else 1, 2)),
                                             nn.InstanceNorm2d(out), nn.LeakyReLU(0.2)))
            width = out
        self.layers.append(nn.Conv2d(width, 1, 4, 1, 2))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """SPADE's discriminator (Park et al. 2019, Sec. 4; ``num_D`` 2): the same PatchGAN on concat(mask, image) at
    full and half resolution (3x3 average pooling, stride 2)."""

    def __init__(self, in_channels: int, channels: int = 64, scales: int = 2) -> None:
        super().__init__()
        self.scales = nn.ModuleList(NLayerFeatures(in_channels, channels) for _ in range(scales))

    def forward(self, mask: Tensor, image: Tensor) -> list[list[Tensor]]:
        """Per scale, every layer's features (the last is the logits)."""
        x = torch.cat([mask, image.to(mask.dtype)], dim=1)
        out = []
        for i, scale in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(scale(x))
        return out


class _ResBlockD(nn.Module):
    """OASIS's ``residual_block_D``: two (leaky ReLU, spectral-norm 3x3 conv) steps and a (1x1) shortcut, with
    average-pool down (``down``) or nearest up-sampling; the first block has no leading activation."""

    def __init__(self, fin: int, fout: int, down: bool, first: bool = False) -> None:
        super().__init__()
        self.down, self.first = down, first
        act: list[nn.Module] = [] if first else [nn.LeakyReLU(0.2)]
        up: list[nn.Module] = [] if down or first else [nn.Upsample(scale_factor=2.0)]
        self.conv1 = nn.Sequential(*act, *up, spectral_norm(nn.Conv2d(fin, fout, 3, 1, 1)))
        self.conv2 = nn.Sequential(nn.LeakyReLU(0.2), spectral_norm(nn.Conv2d(fout, fout, 3, 1, 1)))
        self.shortcut = spectral_norm(nn.Conv2d(fin, fout, 1)) if fin != fout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            skip = self.shortcut(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.shortcut(x), 2)
            return skip + F.avg_pool2d(self.conv2(self.conv1(x)), 2)
        return self.shortcut(F.interpolate(x, scale_factor=2.0)) + self.conv2(self.conv1(x))


class OASISDiscriminator(nn.Module):
    """OASIS's segmentation discriminator (Schoenfeld et al. 2021, Sec. 3.1): a U-Net of residual blocks on the image
    alone, widths 2, 2, 4, 4, 8, 8 x 64 down to a 4 x 4 map (fewer blocks for smaller images), mirrored up with skip
    connections, and a 1x1 conv to N+1 logits per pixel (channel 0 = fake, channel c + 1 = class c)."""

    MAX_BLOCKS = 6

    def __init__(self, in_channels: int, num_classes: int, image_size: int, channels: int = 64) -> None:
        super().__init__()
        depth = min(self.MAX_BLOCKS, int(math.log2(image_size)) - 2)
        if depth < 1:
            raise ValueError(f"the OASIS discriminator needs images of at least 8 px, got {image_size}")
        widths = [in_channels] + [channels * m for m in (2, 2, 4, 4, 8, 8)[:depth]]
        self.down = nn.ModuleList(_ResBlockD(widths[i], widths[i + 1], down=True, first=i == 0) for i in range(depth))
        ups = [_ResBlockD(widths[-1], widths[-2] if depth > 1 else channels, down=False)]
        for i in range(1, depth):
            ups.append(_ResBlockD(2 * widths[-1 - i], widths[-2 - i] if i < depth - 1 else channels, down=False))
        self.up = nn.ModuleList(ups)
        self.out = nn.Conv2d(channels, num_classes + 1, 1)

    def forward(self, image: Tensor) -> Tensor:
        """Logits [B, N+1, S, S]."""
        skips = []
        x = image
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.up[0](x)
        for i, block in enumerate(self.up[1:], start=1):
            x = block(torch.cat([skips[-1 - i], x], dim=1))
        return self.out(x)
