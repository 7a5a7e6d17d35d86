"""Timestep respacing: keep a subset of the original timesteps and rebuild the betas of the shorter chain."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """Original timesteps to keep, sorted ascending (improved-diffusion semantics).

    ``section_counts``: an int or "N" (N evenly spaced steps, both ends included), "a,b,c" (the process is cut into
    equal sections, each evenly strided to its count) or "ddimN" (the DDIM paper's integer stride, range(0, T, s)).
    """
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make exactly {desired} steps out of {num_timesteps} with an integer stride")
    else:
        counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot divide a section of {size} timesteps into {count} steps")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.update(start + round(j * stride) for j in range(count))
        start += size
    return sorted(kept)


def respaced_betas(base_alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, list[int]]:
    """Betas of the chain that visits only ``use_timesteps``, and the map from its indices to original timesteps.

    The new chain's alphas_cumprod equal the base ones at the kept timesteps.
    """
    timestep_map = sorted({int(t) for t in use_timesteps})
    if not timestep_map:
        raise ValueError("use_timesteps is empty")
    if timestep_map[0] < 0 or timestep_map[-1] >= len(base_alphas_cumprod):
        raise ValueError(f"use_timesteps must lie in 0..{len(base_alphas_cumprod) - 1}")
    kept = np.asarray(base_alphas_cumprod, dtype=np.float64)[timestep_map]
    previous = np.concatenate([[1.0], kept[:-1]])
    return 1.0 - kept / previous, timestep_map
