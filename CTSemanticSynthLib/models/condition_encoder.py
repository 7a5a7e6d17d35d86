"""The separate condition encoder of the mask-guided and edge-guided models (paper Fig. 2b/2c)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .blocks import Downsample, EmbedSequential, ResBlock


class ConditionEncoder(nn.Module):
    """U-Net-like encoder of a condition map (one-hot mask or edge map) into one feature map per level.

    It mirrors the main U-Net's resolution levels: an input conv, then per level `num_res_blocks`
    residual blocks at ``base_channels * channel_mult[level]`` channels, followed by a downsampling
    step except after the last level. The features after each level's blocks (i.e. before the
    downsampling) are returned, finest first. The blocks have no timestep embedding: the condition
    does not change during sampling, so its features can be computed once per image.
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = [base_channels * m for m in channel_mult]
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = base_channels
        for level, out_ch in enumerate(self.out_channels):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, use_checkpoint=use_checkpoint))
                ch = out_ch
            self.levels.append(EmbedSequential(*blocks))
            if level < len(self.out_channels) - 1:
                self.downsamples.append(Downsample(ch, conv_resample))

    def forward(self, cond: Tensor) -> list[Tensor]:
        """Encode `cond` [B, C, H, W] into ``len(channel_mult)`` maps, map `l` at H / 2**l."""
        h = self.input_conv(cond)
        features = []
        for level, blocks in enumerate(self.levels):
            h = blocks(h)
            features.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
        return features
