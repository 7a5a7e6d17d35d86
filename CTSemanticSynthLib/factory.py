"""The one place that builds networks and diffusion processes from their JSON configs."""

from __future__ import annotations

from typing import Any

import torch

from .diffusion import GaussianDiffusion
from .models import UNetModel
from .models.generators import OASISGenerator, Pix2PixGenerator, SPADEGenerator, resolve_generator_config
from .models.sdm import SDMModel

GENERATOR_CLASSES: dict[str, type[torch.nn.Module]] = {
    "pix2pix": Pix2PixGenerator, "spade": SPADEGenerator, "oasis": OASISGenerator}


def create_model(config: dict[str, Any]) -> torch.nn.Module:
    """Network from its recorded config: ``SDMModel(**config)`` for architecture "sdm", else ``UNetModel(**config)``
    (which rejects an unknown architecture; configs older than the key mean "unet")."""
    return (SDMModel if config.get("architecture") == "sdm" else UNetModel)(**config)


def create_generator(config: dict[str, Any]) -> torch.nn.Module:
    """One-pass generator from its recorded config (ValueError for a bad one)."""
    method = resolve_generator_config(**config)["method"]
    return GENERATOR_CLASSES[method](**config)


def create_diffusion(config: dict[str, Any]) -> GaussianDiffusion:
    """Diffusion process from its recorded config."""
    return GaussianDiffusion(**config)


__all__ = ["create_diffusion", "create_generator", "create_model"]
