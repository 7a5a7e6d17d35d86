"""Configs of the one-pass baseline generators (Pix2Pix, SPADE, OASIS): defaults per method and validation."""

from __future__ import annotations

import math
from typing import Any

from ...labels import NUM_CLASSES

GENERATORS = ("pix2pix", "spade", "oasis")
MAX_UPSAMPLINGS = 5
"""SPADE/OASIS double the map at most 5 times (channels x16 .. x1), as their 256 px generators do."""


def generator_defaults(method: str) -> dict[str, Any]:
    """The authors' 256 px generator for ``method`` (see each network's docstring for the source)."""
    common = {"method": method, "image_size": 256, "num_classes": NUM_CLASSES, "out_channels": 1, "channels": 64}
    if method == "pix2pix":
        return common | {"dropout": 0.5}
    if method in ("spade", "oasis"):
        return common | {"init_size": 8, "hidden_channels": 128, "noise_channels": 64 if method == "oasis" else 0}
    raise ValueError(f"generator config: method must be one of {', '.join(GENERATORS)}, got {method!r}")


def _positive_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"generator config: {name} must be an integer >= {low}, got {value!r}")
    return value


def upsamplings(size: int, init_size: int) -> int:
    """log2(size / init_size); ValueError unless that is a whole number in 1..MAX_UPSAMPLINGS."""
    ups = math.log2(size / init_size)
    if size % init_size or not ups.is_integer() or not 1 <= ups <= MAX_UPSAMPLINGS:
        raise ValueError(f"generator config: image_size {size} must be init_size {init_size} times 2, 4, .. or "
                         f"{2 ** MAX_UPSAMPLINGS}")
    return int(ups)


def resolve_generator_config(**kwargs: Any) -> dict[str, Any]:
    """Fill the method's defaults, check every value (ValueError naming the key), reject unknown keys."""
    method = kwargs.get("method")
    if method not in GENERATORS:
        raise ValueError(f"generator config: method must be one of {', '.join(GENERATORS)}, got {method!r}")
    cfg = generator_defaults(method)
    unknown = sorted(set(kwargs) - set(cfg))
    if unknown:
        raise ValueError(f"generator config: unknown option(s) {', '.join(unknown)} for {method}; "
                         f"known: {', '.join(cfg)}")
    cfg.update(kwargs)
    for key in ("image_size", "num_classes", "out_channels", "channels"):
        cfg[key] = _positive_int(key, cfg[key])
    if method == "pix2pix":
        size = cfg["image_size"]
        if size < 2 or size & (size - 1):
            raise ValueError(f"generator config: the Pix2Pix U-Net needs a power-of-two image_size, got {size}")
        dropout = cfg["dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"generator config: dropout must be a number in [0, 1), got {dropout!r}")
        cfg["dropout"] = float(dropout)
    else:
        for key in ("init_size", "hidden_channels"):
            cfg[key] = _positive_int(key, cfg[key])
        cfg["noise_channels"] = _positive_int("noise_channels", cfg["noise_channels"], low=0)
        upsamplings(cfg["image_size"], cfg["init_size"])
    return cfg
