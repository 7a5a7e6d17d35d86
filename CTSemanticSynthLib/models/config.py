"""The U-Net's configuration as data: defaults, validation, and the resolved JSON-ready dict."""

from __future__ import annotations

import math
from typing import Any

CONDITIONINGS = ("concat", "mask_encoder", "edge")
ARCHITECTURES = {"unet": CONDITIONINGS, "sdm": ("spade",)}
"""Networks (``architecture``) and the conditionings each accepts: SDM feeds the mask to SPADE norms only."""
ADDED_KEYS = ("architecture", "label_dropout", "guidance_scale", "context_slices")
"""Keys added after models were first saved: a saved config without one means its default (the old behaviour)."""


def model_defaults() -> dict[str, Any]:
    """Defaults for the paper's 256 x 256 model (improved-DDPM's 256 px U-Net, learned variance).

    `attention_resolutions` are downsample factors (improved-diffusion's `UNetModel` convention):
    at 256 px, (16, 32) puts attention at the 16 x 16 and 8 x 8 feature maps. `encoder_channels`
    is the base width of the separate condition encoder ("mask_encoder" and "edge" only); None
    resolves to half of `model_channels`. `architecture` "sdm" is the semantic diffusion model
    (`models/sdm.py`, conditioning "spade"). `label_dropout` is the fraction of training samples whose
    condition was replaced by the "no label" input (zeros), which classifier-free guidance needs;
    `guidance_scale` is the guidance the model is sampled with by default (0: plain conditional).
    `context_slices` k > 0 makes a 2.5D model: the masks of the slices +-1..+-k enter beside the slice's
    own (see `CTSemanticSynthLib.slice_context`).
    """
    return {
        "architecture": "unet",
        "image_size": 256,
        "in_channels": 1,
        "out_channels": 2,
        "num_classes": 17,
        "conditioning": "concat",
        "model_channels": 128,
        "channel_mult": [1, 1, 2, 2, 4, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [16, 32],
        "num_heads": 4,
        "dropout": 0.0,
        "use_scale_shift_norm": True,
        "conv_resample": True,
        "encoder_channels": None,
        "use_checkpoint": False,
        "label_dropout": 0.0,
        "guidance_scale": 0.0,
        "context_slices": 0,
    }


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
    return value


def _positive_ints(name: str, value: Any, allow_empty: bool) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"model config: {name} must be a list of positive integers, got {value!r}")
    items = [_positive_int(name, v) for v in value]
    if not items and not allow_empty:
        raise ValueError(f"model config: {name} must not be empty")
    return items


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"model config: {name} must be true or false, got {value!r}")
    return value


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"model config: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def resolve_config(**kwargs: Any) -> dict[str, Any]:
    """Fill defaults, check every value, and return the config with lists (JSON round-trips).

    Raises ValueError naming the offending key; unknown keys are rejected too.
    """
    cfg = model_defaults()
    unknown = sorted(set(kwargs) - set(cfg))
    if unknown:
        raise ValueError(f"model config: unknown option(s) {', '.join(unknown)}; known: {', '.join(cfg)}")
    cfg.update(kwargs)

    if cfg["architecture"] not in ARCHITECTURES:
        raise ValueError(
            f"model config: architecture must be one of {', '.join(ARCHITECTURES)}, got {cfg['architecture']!r}"
        )
    conditionings = ARCHITECTURES[cfg["architecture"]]
    if cfg["conditioning"] not in conditionings:
        raise ValueError(
            f"model config: conditioning must be one of {', '.join(conditionings)} for architecture "
            f"{cfg['architecture']}, got {cfg['conditioning']!r}"
        )
    for key in ("image_size", "in_channels", "out_channels", "num_classes", "model_channels",
                "num_res_blocks", "num_heads"):
        cfg[key] = _positive_int(key, cfg[key])
    if cfg["encoder_channels"] is None:
        cfg["encoder_channels"] = max(1, cfg["model_channels"] // 2)
    cfg["encoder_channels"] = _positive_int("encoder_channels", cfg["encoder_channels"])
    context = cfg["context_slices"]
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ValueError(f"model config: context_slices must be a non-negative integer, got {context!r}")
    for key in ("use_scale_shift_norm", "conv_resample", "use_checkpoint"):
        cfg[key] = _flag(key, cfg[key])
    for key in ("dropout", "label_dropout"):
        cfg[key] = _fraction(key, cfg[key])
    guidance = cfg["guidance_scale"]
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance < math.inf:
        raise ValueError(f"model config: guidance_scale must be a finite number >= 0, got {guidance!r}")
    cfg["guidance_scale"] = float(guidance)
    if guidance and not cfg["label_dropout"]:
        raise ValueError("model config: guidance_scale > 0 needs label_dropout > 0 (classifier-free guidance "
                         "needs a model trained without labels some of the time)")

    mult = cfg["channel_mult"] = _positive_ints("channel_mult", cfg["channel_mult"], allow_empty=False)
    attn = cfg["attention_resolutions"] = list(
        dict.fromkeys(_positive_ints("attention_resolutions", cfg["attention_resolutions"], allow_empty=True))
    )
    factor = 2 ** (len(mult) - 1)
    if cfg["image_size"] % factor:
        raise ValueError(
            f"model config: image_size {cfg['image_size']} must be divisible by {factor} "
            f"(2 ** (len(channel_mult) - 1) with channel_mult {mult})"
        )
    level_ds = {2**level: level for level in range(len(mult))}
    for ds in attn:
        if ds not in level_ds:
            raise ValueError(
                f"model config: attention_resolutions entry {ds} is not a downsample factor of this U-Net "
                f"(one of {sorted(level_ds)})"
            )
        channels = cfg["model_channels"] * mult[level_ds[ds]]
        if channels % cfg["num_heads"]:
            raise ValueError(
                f"model config: num_heads {cfg['num_heads']} must divide the {channels} channels "
                f"at downsample factor {ds}"
            )
    return cfg
