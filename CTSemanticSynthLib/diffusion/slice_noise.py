"""Noise correlated along the slice axis, drawn slice by slice so that it does not depend on the batch.

Slices sampled with independent noise disagree with their neighbours (stripes in coronal and sagittal views).
:class:`SliceNoise` gives every slice k, at every draw (the starting noise, then each stochastic step),

    noise_k = sqrt(rho) * shared_k + sqrt(1 - rho) * own_k

``own_k`` comes from slice k's generator (seeded ``seed * 1_000_003 + k``: with rho = 0 the noise is exactly the
independent per-slice noise). ``shared_k`` is a Gaussian-weighted sum (``sigma`` slices) of fields z_j,
j = k - r..k + r, each seeded by (seed, j, draw) alone, with weights of unit sum of squares: unit variance, and slices k and k + lag
share a correlation of rho * sum_d w_d w_{d + lag} (:meth:`SliceNoise.correlation`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

SHARED_SIGMA = 3.0
"""Width (standard deviation, in slices) of the filter that smooths the shared component along the slice axis."""


def shared_weights(sigma: float) -> np.ndarray:
    """Gaussian weights for offsets -r..r (r = ceil(3 sigma)), scaled to a unit sum of squares."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    return weights / np.sqrt(np.sum(weights**2))


def _field_seed(seed: int, slice_number: int, draw: int) -> int:
    """A 64-bit seed for the shared field of ``slice_number`` (may be negative) at ``draw``."""
    j = 2 * slice_number if slice_number >= 0 else -2 * slice_number - 1
    low, high = np.random.SeedSequence((seed, j, draw)).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)  # below 2**63: torch.Generator.manual_seed accepts it


class SliceNoise:
    """Standard normal noise for the slices ``slice_index`` of a volume, correlated along the slice axis by
    ``correlation`` (rho, 0..1). Calling it with the batch ``x`` (B = len(slice_index)) returns the next draw, like
    the samplers' ``randn_like``; :meth:`draw` takes a shape."""

    def __init__(self, seed: int, slice_index: Sequence[int], correlation: float = 0.0,
                 sigma: float = SHARED_SIGMA, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= correlation <= 1.0:
            raise ValueError(f"the slice correlation must lie in 0..1, got {correlation}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.seed = int(seed)
        self.slice_index = [int(k) for k in slice_index]
        self.rho = float(correlation)
        self.weights = shared_weights(sigma)
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + k)
                           for k in self.slice_index]
        self.draws = 0
        radius = len(self.weights) // 2
        self.fields = sorted({k + d for k in self.slice_index for d in range(-radius, radius + 1)})
        """The slice numbers whose shared fields the draws need (each slice's, and its neighbours' up to r)."""
        position = {j: i for i, j in enumerate(self.fields)}
        self.taps = torch.tensor([[position[k + d] for k in self.slice_index] for d in range(-radius, radius + 1)],
                                 device=self.device)
        """(2r + 1, N): row d's entry for slice k is the position of field k + d - r in :attr:`fields`."""

    def correlation(self, lag: int) -> float:
        """The correlation between the noise of slices k and k + ``lag`` (the same draw)."""
        w, lag = self.weights, abs(int(lag))
        if lag == 0:
            return 1.0
        return self.rho * float(np.dot(w[:-lag], w[lag:])) if lag < len(w) else 0.0

    def draw(self, shape: Sequence[int]) -> Tensor:
        """The next draw, float32 on the noise's device, shaped (len(slice_index), *shape[1:])."""
        if shape[0] != len(self.slice_index):
            raise ValueError(f"{len(self.slice_index)} slices for a batch of {shape[0]}")
        field = (1, *shape[1:])
        own = torch.cat([torch.randn(field, generator=g, device=self.device) for g in self.generators])
        draw, self.draws = self.draws, self.draws + 1
        if self.rho == 0.0:
            return own
        z = torch.cat([torch.randn(field, device=self.device, generator=torch.Generator(device=self.device)
                                   .manual_seed(_field_seed(self.seed, j, draw))) for j in self.fields])
        shared = float(self.weights[0]) * z[self.taps[0]]  # whole-volume operations per tap, in the order of the
        for w, tap in zip(self.weights[1:], self.taps[1:]):  # weighted sum over d: the same roundings per slice
            shared = shared + float(w) * z[tap]
        return math.sqrt(self.rho) * shared + math.sqrt(1.0 - self.rho) * own

    def __call__(self, x: Tensor) -> Tensor:
        return self.draw(x.shape).to(device=x.device, dtype=x.dtype)
