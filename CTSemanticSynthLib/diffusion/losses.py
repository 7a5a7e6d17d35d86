"""Likelihood helpers for the variational bound: Gaussian KL and the discretised Gaussian decoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension except the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats; arguments broadcast."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Standard normal CDF, tanh approximation (as in Ho et al. and improved DDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of ``x`` (256 levels scaled to [-1, 1]) under a Gaussian binned to them.

    The outermost bins extend to -inf / +inf.
    """
    if not x.shape == means.shape == log_scales.shape:
        shapes = f"x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        raise ValueError(f"shape mismatch: {shapes}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    half_bin = 1.0 / 255.0
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
