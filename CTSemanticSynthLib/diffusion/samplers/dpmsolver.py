"""DPM-Solver++(2M) (Lu et al. 2022, multistep second order, data prediction) over a respaced chain.

The solver integrates the probability-flow ODE with the model's x_0 prediction (derived from its eps, v or x_0
output, clipped to [-1, 1] like DDIM when ``clip_denoised``); the learned variance channels are ignored, so it is
deterministic. Three steps are first order, i.e. exactly the deterministic DDIM step: the first (no history yet),
the last (from t = 0 to abar = 1, where the log-SNR is infinite) and the one into t = 0. The log-SNR at t = 0 (4.6
for the linear schedule) lies far beyond the rest of a coarse grid, so the second-order extrapolation into it
overshoots (measured on Gaussian data: 10 steps from t = 300 have 15x the error with it; diffusers'
``lower_order_final`` does the same).
"""

from __future__ import annotations

import math

from torch import Tensor

from ..gaussian_diffusion import GaussianDiffusion
from .base import Generators, Sampler


def _log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) of a marginal with alpha^2 = abar, sigma^2 = 1 - abar (abar < 1)."""
    return 0.5 * (math.log(abar) - math.log1p(-abar))


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M). Keeps the previous step's x_0 prediction; it is used only when ``step`` receives the very
    tensor this sampler returned at the previous position, so one sampler can serve many batches and runs."""

    name = "dpmsolver++"

    def __init__(self, diffusion: GaussianDiffusion, *, clip_denoised: bool = True) -> None:
        super().__init__(diffusion, clip_denoised=clip_denoised)
        self._history: tuple[int, Tensor, Tensor, float] | None = None  # (index, x returned, pred_x0, lambda_t)

    def step(
        self, model_output: Tensor, timestep_index: int, x_t: Tensor, generator: Generators = None
    ) -> tuple[Tensor, Tensor]:
        out = self.p_mean_variance(model_output, timestep_index, x_t)
        x0 = out["pred_x0"]
        k = self.chain_index(timestep_index)
        assert self.chain is not None
        abar, abar_prev = float(self.chain.alphas_cumprod[k]), float(self.chain.alphas_cumprod_prev[k])
        history, self._history = self._history, None
        if abar_prev >= 1.0:  # the last step: sigma_prev = 0, x_prev is the x_0 prediction
            return x0, x0
        lam, lam_prev = _log_snr(abar), _log_snr(abar_prev)
        h = lam_prev - lam
        data = x0
        if k >= 2 and history is not None and history[0] == timestep_index - 1 and history[1] is x_t:
            r = (lam - history[3]) / h
            data = (1.0 + 0.5 / r) * x0 - (0.5 / r) * history[2]
        ratio = math.sqrt((1.0 - abar_prev) / (1.0 - abar))  # sigma_prev / sigma_t
        x_prev = ratio * x_t + math.sqrt(abar_prev) * (-math.expm1(-h)) * data
        self._history = (timestep_index, x_prev, x0, lam)
        return x_prev, x0
