"""Samplers over a GaussianDiffusion: ancestral (improved DDPM), DDIM and DPM-Solver++(2M), plus the generic loop."""

from __future__ import annotations

from typing import Any

from ..gaussian_diffusion import GaussianDiffusion
from .ancestral import AncestralSampler
from .base import Sampler, randn_like, sample_loop
from .ddim import DDIMSampler
from .dpmsolver import DPMSolverSampler

SAMPLERS: dict[str, type[Sampler]] = {
    AncestralSampler.name: AncestralSampler,
    DDIMSampler.name: DDIMSampler,
    DPMSolverSampler.name: DPMSolverSampler,
}


def make_sampler(
    name: str, diffusion: GaussianDiffusion, num_steps: int, start_timestep: int | None = None, **options: Any
) -> Sampler:
    """Sampler ``name`` (a key of SAMPLERS) with ``num_steps`` set; ``options`` go to its constructor (eta, ...)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name](diffusion, **options)
    sampler.set_timesteps(num_steps, start_timestep=start_timestep)
    return sampler


__all__ = ["SAMPLERS", "AncestralSampler", "DDIMSampler", "DPMSolverSampler", "Sampler", "make_sampler", "randn_like",
           "sample_loop"]
