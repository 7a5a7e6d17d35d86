"""One-pass semantic-synthesis generators, the paper's GAN baselines (arXiv 2312.06453, Table 2): Pix2Pix, SPADE,
OASIS. Each maps a one-hot class map (and, for OASIS, noise) to an image in [-1, 1] in one forward pass; their
discriminators and losses are training-only and live in ``training/baselines``."""

from __future__ import annotations

from .config import GENERATORS, generator_defaults, resolve_generator_config
from .oasis import OASISGenerator
from .pix2pix import Pix2PixGenerator
from .spade import SPADEGenerator

__all__ = ["GENERATORS", "OASISGenerator", "Pix2PixGenerator", "SPADEGenerator", "generator_defaults",
           "resolve_generator_config"]
