"""One-pass semantic-synthesis generators, the paper's GAN baselines (arXiv 2312.06453, Table 2): Pix2Pix, SPADE,
OASIS. Each maps a one-hot class map (and, for OASIS, noise) to an image in [-1, 1] in one forward pass; their
discriminators and losses are training-only and live in ``training/baselines``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import GENERATORS, generator_defaults, resolve_generator_config
from .oasis import OASISGenerator
from .pix2pix import Pix2PixGenerator
from .spade import SPADEGenerator

_CLASSES: dict[str, type[nn.Module]] = {"pix2pix": Pix2PixGenerator, "spade": SPADEGenerator, "oasis": OASISGenerator}


def create_generator(config: dict[str, Any]) -> nn.Module:
    """Generator from its recorded config (ValueError for a bad one)."""
    method = resolve_generator_config(**config)["method"]
    return _CLASSES[method](**config)


__all__ = ["GENERATORS", "OASISGenerator", "Pix2PixGenerator", "SPADEGenerator", "create_generator",
           "generator_defaults", "resolve_generator_config"]
