"""Ancestral sampling (improved DDPM p_sample) over a respaced chain with the learned variance."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Generators, Sampler, randn_like


class AncestralSampler(Sampler):
    """x_{t-1} ~ N(mean, exp(log_variance)) from the model output; the last step returns the mean (no noise)."""

    name = "ancestral"

    def step(
        self, model_output: Tensor, timestep_index: int, x_t: Tensor, generator: Generators = None
    ) -> tuple[Tensor, Tensor]:
        out = self.p_mean_variance(model_output, timestep_index, x_t)
        if self.chain_index(timestep_index) == 0:
            return out["mean"], out["pred_x0"]
        noise = randn_like(x_t, generator)
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise, out["pred_x0"]
