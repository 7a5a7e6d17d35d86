"""Neighbour agreement: every step, blend each slice's predicted x_0 with its neighbours' where their labels agree.

Slices sampled on their own disagree with their neighbours (stripes in coronal and sagittal views). Every slice of
the volume is at the same timestep (see :mod:`~CTSemanticSynthLib.denoiser`), so a step can look at its neighbours.
:class:`SliceAgreement` wraps the model function over the whole (N, C, S, S) state: it turns the network's output
into the predicted x_0 (clipped to [-1, 1] like the samplers do), replaces slice k's x_0 at every pixel by

    x0_k + W * (avg_k - x0_k),   avg_k = (x0_k + sum_d w_d a_kd x0_{k+d}) / (1 + sum_d w_d a_kd)

(d = +-1, +-2 slices, Gaussian weights w_d; a_kd = 1 where slice k + d exists and has the same class at that pixel,
else 0) and turns the result back into the model's parametrisation (eps, x_0 or v; learned-variance channels
untouched). Every sampler (ancestral, DDIM, DPM-Solver++) then continues its step from the blended x_0 unchanged.
W = 0 returns the network's output itself; pixels without an agreeing neighbour keep it too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .gaussian_diffusion import GaussianDiffusion, ModelFn

AGREEMENT_SIGMA = 1.0
"""Width (standard deviation, in slices) of the Gaussian weights over the neighbours +-1, +-2."""


def neighbour_weights(sigma: float = AGREEMENT_SIGMA) -> dict[int, float]:
    """{offset: weight} for the neighbours at offsets +-1..+-ceil(2 sigma); the slice itself has weight 1."""
    radius = max(1, math.ceil(2 * sigma))
    return {d: math.exp(-(d**2) / (2 * sigma**2)) for d in range(-radius, radius + 1) if d}


class SliceAgreement:
    """The model function ``model_fn`` over the whole volume with its x_0 predictions blended across slices.

    ``classes`` (N, S, S) are the model classes of the slices ``slice_index`` (volume slice numbers, ascending: a
    slice's neighbour at offset d is the one numbered k + d, if it is sampled); ``diffusion`` is the full process
    the model was trained with (its timesteps are the ones the model is called with). ``strength`` W in 0..1;
    ``below`` blends only at timesteps t < below * T (1: every step). Work happens on ``device``, the state's.
    """

    def __init__(self, model_fn: ModelFn, diffusion: GaussianDiffusion, classes: Tensor, slice_index: Sequence[int],
                 strength: float, *, below: float = 1.0, clip_denoised: bool = True,
                 sigma: float = AGREEMENT_SIGMA, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"the slice agreement must lie in 0..1, got {strength}")
        if diffusion.num_timesteps != diffusion.original_num_timesteps:
            raise ValueError("neighbour agreement needs the full diffusion process, not a respaced chain")
        if len(slice_index) != len(classes):
            raise ValueError(f"{len(slice_index)} slice numbers for {len(classes)} class slices")
        self.model_fn = model_fn
        self.diffusion = diffusion
        self.strength = float(strength)
        self.below_timestep = below * diffusion.original_num_timesteps
        self.clip_denoised = clip_denoised
        self.neighbours = {d: w.to(device) for d, w in
                           self._neighbours(classes, [int(k) for k in slice_index], neighbour_weights(sigma)).items()}
        self.agreed = sum(self.neighbours.values(), torch.zeros((), device=device)) > 0
        """Pixels with at least one agreeing neighbour: the only ones blended."""

    @staticmethod
    def _neighbours(classes: Tensor, slice_index: list[int], weights: dict[int, float]) -> dict[int, Tensor]:
        """{offset d: (N, 1, S, S) weight of slice k + d (at position + d) in slice k's average: w_d where it
        agrees, 0 where it is missing or has another class}."""
        n = len(slice_index)
        neighbours = {}
        for d, w in weights.items():
            agree = torch.zeros((n, 1, *classes.shape[1:]))
            for i in range(max(0, -d), min(n, n - d)):
                if slice_index[i + d] - slice_index[i] == d:
                    agree[i, 0] = w * (classes[i] == classes[i + d])
            if agree.any():
                neighbours[d] = agree
        return neighbours

    def blend(self, x0: Tensor) -> Tensor:
        """The blended x_0 (N, C, S, S) of the x_0 predictions ``x0``."""
        total, weight = x0, torch.ones_like(x0[:, :1])
        for d, w in self.neighbours.items():
            total = total + w * torch.roll(x0, -d, dims=0)  # position i gets i + d; w is 0 where that wrapped
            weight = weight + w
        return x0 + self.strength * (total / weight - x0)

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        output = self.model_fn(x, t, **kwargs)
        if self.strength == 0.0 or not self.neighbours:
            return output
        d = self.diffusion
        prediction, variance = d.split_output(output, x)
        x0 = d.x0_from_prediction(x, t, prediction)
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        blended = self.blend(x0)
        replaced = d.prediction_target(blended, t, d.eps_from_x0(x, t, blended))
        blend_here = self.agreed
        if self.below_timestep < d.original_num_timesteps:  # on the device: reading t would make a GPU wait
            blend_here = blend_here & (t < self.below_timestep).view(-1, *[1] * (x.ndim - 1))
        prediction = torch.where(blend_here, replaced, prediction)
        return prediction if variance is None else torch.cat([prediction, variance], dim=1)
