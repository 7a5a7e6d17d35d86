"""Improved-DDPM ResNet U-Net with the paper's three mask conditionings (arXiv 2312.06453, Fig. 2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .blocks import EmbedSequential
from .condition_encoder import ConditionEncoder
from .denoiser_net import DenoiserNet
from .levels import build_levels


class UNetModel(DenoiserNet):
    """Denoising U-Net for 2-D CT slices conditioned on a semantic mask.

    Built from keyword arguments only (see `model_defaults()` for the keys); the resolved config is
    kept in `self.config` so that ``UNetModel(**model.config)`` rebuilds the same architecture.
    `conditioning` selects the paper's variant:

    - ``"concat"``: the one-hot mask is concatenated to the noisy image at the input.
    - ``"mask_encoder"``: the noisy image alone enters the U-Net; a separate `ConditionEncoder`
      encodes the mask and its per-level features are concatenated to the main features at the
      same resolution, at the first block of every level in the encoder and in the decoder
      (that block's input channels absorb them).
    - ``"edge"``: both: mask concatenated at the input, semantic edge map through the encoder.

    With `context_slices` k > 0 (2.5D) the mask holds the one-hot masks of the slice and of its neighbours
    (`mask_channels` = num_classes * (1 + 2k)) wherever the slice's own mask goes.

    The output has `out_channels` channels: by default the noise prediction and the learned-variance
    interpolation value v. A call's `edge` [B, 1, H, W] is required exactly for "edge" models, unless
    precomputed `cond_features` from `encode_condition` are given.
    """

    architecture = "unet"

    def __init__(self, **config: Any) -> None:
        super().__init__(config)
        cfg, mult = self.config, self.config["channel_mult"]
        self.uses_concat = self.conditioning in ("concat", "edge")
        self.mask_channels = cfg["num_classes"] * (1 + 2 * cfg["context_slices"])
        self.cond_encoder: ConditionEncoder | None = None
        cond_ch = [0] * len(mult)
        if self.conditioning in ("mask_encoder", "edge"):
            enc_in = 1 if self.conditioning == "edge" else self.mask_channels
            self.cond_encoder = ConditionEncoder(
                enc_in, cfg["encoder_channels"], mult, cfg["num_res_blocks"], cfg["conv_resample"], cfg["use_checkpoint"]
            )
            cond_ch = self.cond_encoder.out_channels

        self._add_stem(cfg["in_channels"] + (self.mask_channels if self.uses_concat else 0))
        levels = build_levels(cfg, self._res_block, self._res_block, EmbedSequential, cond_ch)
        self.input_blocks, self.middle_block = levels.input_blocks, levels.middle_block
        self.output_blocks = levels.output_blocks
        # `*_inject[i]` is the condition-encoder level concatenated before block i, or None.
        self.input_inject, self.output_inject = levels.input_inject, levels.output_inject
        self._add_head(levels.out_channels)

    def encode_condition(self, mask: Tensor, edge: Tensor | None = None) -> list[Tensor] | None:
        """Condition-encoder features (finest level first), or None for "concat" models.

        They do not depend on the timestep: compute them once and pass them to every denoising
        step as `cond_features`.
        """
        if self.cond_encoder is None:
            return None
        if self.conditioning == "edge":
            if edge is None:
                raise ValueError("this model uses edge-guided conditioning: pass the semantic edge map as `edge`")
            return self.cond_encoder(edge)
        return self.cond_encoder(mask)

    def _decoder_features(self, x: Tensor, emb: Tensor, mask: Tensor, edge: Tensor | None,
                          cond_features: list[Tensor] | None) -> Tensor:
        features = cond_features
        if features is None:
            features = self.encode_condition(mask, None if edge is None else edge.to(x.dtype))

        h = self.input_conv(torch.cat([x, mask], dim=1) if self.uses_concat else x)
        skips = [h]
        for block, level in zip(self.input_blocks, self.input_inject):
            if level is not None:
                h = torch.cat([h, features[level]], dim=1)
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block, level in zip(self.output_blocks, self.output_inject):
            parts = [h, skips.pop()]
            if level is not None:
                parts.append(features[level])
            h = block(torch.cat(parts, dim=1), emb)
        return h

    def _check_inputs(self, x: Tensor, timesteps: Tensor, mask: Tensor, edge: Tensor | None,
                      cond_features: list[Tensor] | None) -> tuple[int, int, int]:
        b, height, width = super()._check_inputs(x, timesteps, mask, edge, cond_features)
        if cond_features is not None and self.cond_encoder is None:
            raise ValueError('cond_features were given but a "concat" model has no condition encoder')
        if self.conditioning != "edge" and edge is not None:
            raise ValueError(f'an edge map was given but this model uses "{self.conditioning}" conditioning')
        if self.conditioning == "edge" and cond_features is None:
            if edge is None:
                raise ValueError("this model uses edge-guided conditioning: pass the semantic edge map as `edge`")
            if edge.shape != (b, 1, height, width):
                raise ValueError(f"edge must be [{b}, 1, {height}, {width}], got {tuple(edge.shape)}")
        return b, height, width
