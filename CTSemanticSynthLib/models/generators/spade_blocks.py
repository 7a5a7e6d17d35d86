"""SPADE building blocks shared by the SPADE and OASIS generators (Park et al. 2019, Sec. 3 and Fig. 4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: a parameter-free ``norm`` (default batch norm; SDM passes group norm),
    then a per-pixel scale and shift predicted from the (resized) label map by a shared 3x3 conv + ReLU and two
    3x3 convs: ``norm(x) * (1 + gamma) + beta``."""

    def __init__(self, channels: int, label_channels: int, hidden: int, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False) if norm is None else norm
        self.shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: Tensor, label: Tensor) -> Tensor:
        h = self.shared(F.interpolate(label, size=x.shape[-2:], mode="nearest"))
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class SPADEResBlock(nn.Module):
    """SPADE ResNet block: two (SPADE, leaky ReLU 0.2, spectral-norm 3x3 conv) steps, and a learned
    (SPADE, 1x1 conv) shortcut when the channels change; the middle width is min(in, out)."""

    def __init__(self, fin: int, fout: int, label_channels: int, hidden: int) -> None:
        super().__init__()
        middle = min(fin, fout)
        self.norm_0 = SPADE(fin, label_channels, hidden)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, middle, 3, padding=1))
        self.norm_1 = SPADE(middle, label_channels, hidden)
        self.conv_1 = spectral_norm(nn.Conv2d(middle, fout, 3, padding=1))
        self.shortcut: nn.Module | None = None
        self.norm_s: SPADE | None = None
        if fin != fout:
            self.norm_s = SPADE(fin, label_channels, hidden)
            self.shortcut = spectral_norm(nn.Conv2d(fin, fout, 1, bias=False))

    def forward(self, x: Tensor, label: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(self.norm_s(x, label))
        h = self.conv_0(F.leaky_relu(self.norm_0(x, label), 0.2))
        h = self.conv_1(F.leaky_relu(self.norm_1(h, label), 0.2))
        return skip + h


class SPADEStack(nn.Module):
    """The generator body both methods share: the label map (plus noise channels) resized to ``init_size`` and
    convolved to the first width, then SPADE ResNet blocks (``blocks``: (output width, upsample x2 before it)),
    leaky ReLU, a 3x3 conv to the output and tanh."""

    def __init__(self, label_channels: int, out_channels: int, init_size: int, hidden: int,
                 blocks: list[tuple[int, bool]]) -> None:
        super().__init__()
        self.init_size = init_size
        self.fc = nn.Conv2d(label_channels, blocks[0][0], 3, padding=1)
        self.upsample_before = [up for _, up in blocks]
        widths = [blocks[0][0]] + [w for w, _ in blocks]
        self.blocks = nn.ModuleList(SPADEResBlock(widths[i], widths[i + 1], label_channels, hidden)
                                    for i in range(len(blocks)))
        self.conv_img = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, label: Tensor) -> Tensor:
        x = self.fc(F.interpolate(label, size=(self.init_size, self.init_size), mode="nearest"))
        for block, up in zip(self.blocks, self.upsample_before):
            if up:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = block(x, label)
        return self.conv_img(F.leaky_relu(x, 0.2)).tanh()
