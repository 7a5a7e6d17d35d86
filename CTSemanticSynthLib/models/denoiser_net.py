"""What the U-Net and the SDM share: the config check, the timestep embedding, the input conv, the output head, the
residual block of their levels and the checks on a forward call's inputs.

The parts keep their attribute names (``time_embed``, ``input_conv``, ``out``: the state-dict keys saved models load
by) and are added when the subclass calls `_add_stem` and `_add_head`, so each network keeps its own module order.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .blocks import ResBlock
from .config import resolve_config
from .nn import normalization, timestep_embedding, zero_module


class DenoiserNet(nn.Module):
    """Base of the mask-conditioned denoisers: ``Net(**config)`` resolves and keeps `config`; the subclass names the
    `architecture` it builds and sets `mask_channels` (the channels of the one-hot mask it is called with)."""

    architecture: ClassVar[str]
    mask_channels: int

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = self.config = resolve_config(**config)
        if cfg["architecture"] != self.architecture:
            raise ValueError(f"{type(self).__name__} builds architecture {self.architecture!r}, not "
                             f"{cfg['architecture']!r} (use factory.create_model)")
        self.conditioning: str = cfg["conditioning"]
        self.size_multiple = 2 ** (len(cfg["channel_mult"]) - 1)
        self.emb_channels = 4 * cfg["model_channels"]

    def _add_stem(self, in_channels: int) -> None:
        """Add the timestep-embedding MLP and the input conv taking `in_channels`."""
        mc, emb = self.config["model_channels"], self.emb_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_conv = nn.Conv2d(in_channels, mc, 3, padding=1)

    def _add_head(self, channels: int) -> None:
        """Add the output head: norm, SiLU and a zero-initialised conv from the decoder's `channels`."""
        conv = nn.Conv2d(channels, self.config["out_channels"], 3, padding=1)
        self.out = nn.Sequential(normalization(channels), nn.SiLU(), zero_module(conv))

    def _res_block(self, in_channels: int, out_channels: int) -> ResBlock:
        """A timestep-conditioned residual block with the config's dropout, norm and checkpointing."""
        cfg = self.config
        return ResBlock(in_channels, out_channels, self.emb_channels, cfg["dropout"], cfg["use_scale_shift_norm"],
                        cfg["use_checkpoint"])

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        mask: Tensor,
        edge: Tensor | None = None,
        cond_features: list[Tensor] | None = None,
    ) -> Tensor:
        """Predict [B, out_channels, H, W] from the noisy image x [B, in_channels, H, W].

        `timesteps` [B] (or a scalar) are on the diffusion's original 0..T-1 scale, int or float; `mask` is the
        one-hot mask [B, mask_channels, H, W] (all zeros: the "no label" input of classifier-free guidance); `edge`
        and `cond_features` are what the subclass's conditioning takes (see its docstring).
        """
        self._check_inputs(x, timesteps, mask, edge, cond_features)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.config["model_channels"]))
        h = self._decoder_features(x, emb, mask.to(x.dtype), edge, cond_features)
        return self.out(h).to(x.dtype)

    def _decoder_features(self, x: Tensor, emb: Tensor, mask: Tensor, edge: Tensor | None,
                          cond_features: list[Tensor] | None) -> Tensor:
        """The last decoder level's features (what the output head reads), from checked inputs, the timestep
        embedding `emb` and the mask in x's dtype."""
        raise NotImplementedError

    def _check_inputs(self, x: Tensor, timesteps: Tensor, mask: Tensor, edge: Tensor | None,
                      cond_features: list[Tensor] | None) -> tuple[int, int, int]:
        """Check x [B, in_channels, H, W] (H, W multiples of `size_multiple`), timesteps [B] or scalar and the mask
        [B, mask_channels, H, W]; return (B, H, W). Subclasses check `edge` and `cond_features`."""
        in_channels = self.config["in_channels"]
        if x.ndim != 4 or x.shape[1] != in_channels:
            raise ValueError(f"x must be [B, {in_channels}, H, W], got {tuple(x.shape)}")
        b, _, height, width = x.shape
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"image height and width must be multiples of {self.size_multiple}, got {height}x{width}")
        if timesteps.shape not in ((), (b,)):
            raise ValueError(f"timesteps must be a scalar or have shape [{b}], got {tuple(timesteps.shape)}")
        if mask.shape != (b, self.mask_channels, height, width):
            raise ValueError(
                f"mask must be one-hot [{b}, {self.mask_channels}, {height}, {width}], got {tuple(mask.shape)}"
            )
        return b, height, width
