"""DDIM sampling (Song et al. 2021) over a respaced chain; the learned variance channels are ignored."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from ..gaussian_diffusion import GaussianDiffusion
from .base import Generators, Sampler, randn_like


class DDIMSampler(Sampler):
    """DDIM with stochasticity ``eta`` (0: deterministic, 1: ancestral-like with the posterior variance)."""

    name = "ddim"

    def __init__(self, diffusion: GaussianDiffusion, *, eta: float = 0.0, clip_denoised: bool = True) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        super().__init__(diffusion, clip_denoised=clip_denoised)
        self.eta = float(eta)

    def options(self) -> dict[str, Any]:
        return {"eta": self.eta}

    def step(
        self, model_output: Tensor, timestep_index: int, x_t: Tensor, generator: Generators = None
    ) -> tuple[Tensor, Tensor]:
        out = self.p_mean_variance(model_output, timestep_index, x_t)
        k = self.chain_index(timestep_index)
        assert self.chain is not None
        abar = float(self.chain.alphas_cumprod[k])
        abar_prev = float(self.chain.alphas_cumprod_prev[k])
        sigma = self.eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        x_prev = math.sqrt(abar_prev) * out["pred_x0"] + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * out["eps"]
        if sigma > 0.0:
            x_prev = x_prev + sigma * randn_like(x_t, generator)
        return x_prev, out["pred_x0"]
