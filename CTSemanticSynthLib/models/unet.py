"""Improved-DDPM ResNet U-Net with the paper's three mask conditionings (arXiv 2312.06453, Fig. 2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .blocks import EmbedSequential, ResBlock
from .condition_encoder import ConditionEncoder
from .config import resolve_config
from .levels import build_levels
from .nn import normalization, timestep_embedding, zero_module


class UNetModel(nn.Module):
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
    interpolation value v.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        cfg = self.config = resolve_config(**config)
        if cfg["architecture"] != "unet":
            raise ValueError(f"UNetModel builds architecture 'unet', not {cfg['architecture']!r} (use factory.create_model)")
        mc, mult, ckpt = cfg["model_channels"], cfg["channel_mult"], cfg["use_checkpoint"]
        emb_dim = 4 * mc

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, emb_dim, cfg["dropout"], cfg["use_scale_shift_norm"], ckpt)

        self.conditioning: str = cfg["conditioning"]
        self.uses_concat = self.conditioning in ("concat", "edge")
        self.size_multiple = 2 ** (len(mult) - 1)
        self.mask_channels = cfg["num_classes"] * (1 + 2 * cfg["context_slices"])
        self.cond_encoder: ConditionEncoder | None = None
        cond_ch = [0] * len(mult)
        if self.conditioning in ("mask_encoder", "edge"):
            enc_in = 1 if self.conditioning == "edge" else self.mask_channels
            self.cond_encoder = ConditionEncoder(
                enc_in, cfg["encoder_channels"], mult, cfg["num_res_blocks"], cfg["conv_resample"], ckpt
            )
            cond_ch = self.cond_encoder.out_channels

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        in_ch = cfg["in_channels"] + (self.mask_channels if self.uses_concat else 0)
        self.input_conv = nn.Conv2d(in_ch, mc, 3, padding=1)

        levels = build_levels(cfg, res, res, EmbedSequential, cond_ch)
        self.input_blocks, self.middle_block = levels.input_blocks, levels.middle_block
        self.output_blocks = levels.output_blocks
        # `*_inject[i]` is the condition-encoder level concatenated before block i, or None.
        self.input_inject, self.output_inject = levels.input_inject, levels.output_inject
        ch = levels.out_channels

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg["out_channels"], 3, padding=1))
        )

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

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        mask: Tensor,
        edge: Tensor | None = None,
        cond_features: list[Tensor] | None = None,
    ) -> Tensor:
        """Predict [B, out_channels, H, W] from the noisy image x [B, in_channels, H, W].

        `timesteps` [B] (or a scalar) are on the diffusion's original 0..T-1 scale, int or float;
        `mask` is the one-hot mask [B, mask_channels, H, W]; `edge` [B, 1, H, W] is required exactly
        for "edge" models (unless precomputed `cond_features` from `encode_condition` are given).
        """
        self._check_inputs(x, timesteps, mask, edge, cond_features)
        mask = mask.to(x.dtype)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config["model_channels"]))
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
        return self.out(h).to(x.dtype)

    def _check_inputs(
        self,
        x: Tensor,
        timesteps: Tensor,
        mask: Tensor,
        edge: Tensor | None,
        cond_features: list[Tensor] | None,
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg["in_channels"]:
            raise ValueError(f"x must be [B, {cfg['in_channels']}, H, W], got {tuple(x.shape)}")
        b, _, height, width = x.shape
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"image height and width must be multiples of {self.size_multiple}, got {height}x{width}"
            )
        if timesteps.shape not in ((), (b,)):
            raise ValueError(f"timesteps must be a scalar or have shape [{b}], got {tuple(timesteps.shape)}")
        if mask.shape != (b, self.mask_channels, height, width):
            raise ValueError(
                f"mask must be one-hot [{b}, {self.mask_channels}, {height}, {width}], got {tuple(mask.shape)}"
            )
        if cond_features is not None and self.cond_encoder is None:
            raise ValueError('cond_features were given but a "concat" model has no condition encoder')
        if self.conditioning != "edge" and edge is not None:
            raise ValueError(f'an edge map was given but this model uses "{self.conditioning}" conditioning')
        if self.conditioning == "edge" and cond_features is None:
            if edge is None:
                raise ValueError("this model uses edge-guided conditioning: pass the semantic edge map as `edge`")
            if edge.shape != (b, 1, height, width):
                raise ValueError(f"edge must be [{b}, 1, {height}, {width}], got {tuple(edge.shape)}")
