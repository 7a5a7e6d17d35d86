"""Diffusion: beta schedules, Gaussian diffusion with learned-range variance and hybrid loss, respacing, samplers
(ancestral, DDIM, DPM-Solver++).
"""

from .gaussian_diffusion import GaussianDiffusion, ModelFn, diffusion_defaults
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import respaced_betas, space_timesteps
from .samplers import SAMPLERS, AncestralSampler, DDIMSampler, DPMSolverSampler, Sampler, make_sampler, sample_loop
from .schedule import betas_for_alpha_bar, get_beta_schedule

__all__ = [
    "SAMPLERS",
    "AncestralSampler",
    "DDIMSampler",
    "DPMSolverSampler",
    "GaussianDiffusion",
    "ModelFn",
    "Sampler",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "diffusion_defaults",
    "discretized_gaussian_log_likelihood",
    "get_beta_schedule",
    "make_sampler",
    "mean_flat",
    "normal_kl",
    "respaced_betas",
    "sample_loop",
    "space_timesteps",
]
