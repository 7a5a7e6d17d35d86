"""The resolution levels of the U-Net and the SDM: encoder, middle block and decoder (improved-diffusion's loops).

Level `l` has `num_res_blocks` residual blocks at ``channel_mult[l] * model_channels`` channels in the encoder and one
more in the decoder, each followed by self-attention where the downsample factor is in `attention_resolutions`; a
downsampling block ends every encoder level and an upsampling layer every decoder level but the coarsest. Each decoder
block takes the previous features concatenated with one encoder skip. With condition-encoder features, the first block
of a level in the encoder and in the decoder also takes that level's features (`cond_channels[l]`, 0 for none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from torch import nn

from .blocks import AttentionBlock, Downsample, EmbedSequential, Upsample

ResFactory = Callable[[int, int], nn.Module]
"""Builds a residual block from its input and output channels."""


class Levels(NamedTuple):
    """The blocks of both U-Net paths, the condition-encoder level concatenated before each block (or None), and the
    decoder's output channels."""

    input_blocks: nn.ModuleList
    middle_block: nn.Sequential
    output_blocks: nn.ModuleList
    input_inject: tuple[int | None, ...]
    output_inject: tuple[int | None, ...]
    out_channels: int


def build_levels(
    cfg: dict[str, Any],
    encoder_res: ResFactory,
    decoder_res: ResFactory,
    decoder_sequential: type[nn.Sequential],
    cond_channels: Sequence[int],
) -> Levels:
    """Build the encoder from `encoder_res` blocks in `EmbedSequential`s, and the middle block and the decoder from
    `decoder_res` blocks in `decoder_sequential`s, in that order, for the resolved model config `cfg`."""
    mc, mult, nrb = cfg["model_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
    attn, heads, ckpt = set(cfg["attention_resolutions"]), cfg["num_heads"], cfg["use_checkpoint"]

    input_blocks, input_inject = nn.ModuleList(), []
    skip_ch, ch, ds = [mc], mc, 1
    for level, m in enumerate(mult):
        for i in range(nrb):
            cond = cond_channels[level] if i == 0 else 0
            layers: list[nn.Module] = [encoder_res(ch + cond, m * mc)]
            ch = m * mc
            if ds in attn:
                layers.append(AttentionBlock(ch, heads, ckpt))
            input_blocks.append(EmbedSequential(*layers))
            input_inject.append(level if cond else None)
            skip_ch.append(ch)
        if level < len(mult) - 1:
            input_blocks.append(EmbedSequential(Downsample(ch, cfg["conv_resample"])))
            input_inject.append(None)
            skip_ch.append(ch)
            ds *= 2

    middle_block = decoder_sequential(decoder_res(ch, ch), AttentionBlock(ch, heads, ckpt), decoder_res(ch, ch))

    output_blocks, output_inject = nn.ModuleList(), []
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            cond = cond_channels[level] if i == 0 else 0
            layers = [decoder_res(ch + skip_ch.pop() + cond, mult[level] * mc)]
            ch = mult[level] * mc
            if ds in attn:
                layers.append(AttentionBlock(ch, heads, ckpt))
            if level and i == nrb:
                layers.append(Upsample(ch, cfg["conv_resample"]))
                ds //= 2
            output_blocks.append(decoder_sequential(*layers))
            output_inject.append(level if cond else None)
    return Levels(input_blocks, middle_block, output_blocks, tuple(input_inject), tuple(output_inject), ch)
