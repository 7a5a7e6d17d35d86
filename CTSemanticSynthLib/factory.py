"""The one place that builds networks and diffusion processes from their JSON configs."""

from __future__ import annotations

from typing import Any

from .diffusion import GaussianDiffusion
from .models import UNetModel


def create_model(config: dict[str, Any]) -> UNetModel:
    """Network from its recorded config (``UNetModel(**config)``)."""
    return UNetModel(**config)


def create_diffusion(config: dict[str, Any]) -> GaussianDiffusion:
    """Diffusion process from its recorded config."""
    return GaussianDiffusion(**config)


__all__ = ["create_diffusion", "create_model"]
