"""Diffusion U-Net with the paper's three mask conditionings: concat, mask encoder, edge encoder."""

from .config import CONDITIONINGS, model_defaults
from .unet import UNetModel

__all__ = ["CONDITIONINGS", "UNetModel", "model_defaults"]
