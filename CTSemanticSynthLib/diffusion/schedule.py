"""Beta schedules of the forward (noising) process, in float64."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SCHEDULES = ("linear", "cosine")


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into ``num_timesteps`` betas capped at ``max_beta``."""
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = np.array([alpha_bar(float(v)) for v in s], dtype=np.float64)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def cosine_alpha_bar(s: float, offset: float = 0.008) -> float:
    """Nichol & Dhariwal's cosine alpha_bar, before normalisation by alpha_bar(0) (which cancels in the betas)."""
    return math.cos((s + offset) / (1.0 + offset) * math.pi / 2.0) ** 2


def get_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas for ``num_timesteps`` steps: "linear" (Ho et al., scaled by 1000/T) or "cosine" (Nichol & Dhariwal)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        if scale * 0.02 >= 1.0:
            raise ValueError(f"the linear schedule needs num_timesteps > 20 (last beta = 20 / T), got {num_timesteps}")
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
