"""Sampler interface (diffusers-style set_timesteps / timesteps / step) and the generic sampling loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..gaussian_diffusion import GaussianDiffusion, ModelFn
from ..respace import space_timesteps


Generators = torch.Generator | Sequence[torch.Generator] | Callable[[Tensor], Tensor] | None
"""One generator for the whole batch, one per batch element (a sample's noise then does not depend on the batch
it is drawn in), a noise source called with x (e.g. :class:`~..slice_noise.SliceNoise`), or None (the global RNG)."""


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (reproducible) and moved to ``x``'s.

    A sequence of generators draws element ``b`` of the batch from ``generator[b]``; a noise source draws it all.
    """
    if callable(generator):
        return generator(x)
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([randn_like(x[b : b + 1], g) for b, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class Sampler(ABC):
    """Walks a respaced reverse chain of a diffusion process; never sees the model, only its outputs.

    After ``set_timesteps(n)``, ``timesteps`` (int64) holds the n ORIGINAL timesteps to call the model with, descending;
    ``step(model_output, i, x_t)`` turns the model output at ``timesteps[i]`` into (x at timesteps[i+1], pred_x0)
    (after the last index: the sample).
    """

    name: ClassVar[str]

    def __init__(self, diffusion: GaussianDiffusion, *, clip_denoised: bool = True) -> None:
        self.diffusion = diffusion
        self.clip_denoised = clip_denoised
        self.start_timestep: int | None = None
        self.timesteps: Tensor = torch.empty(0, dtype=torch.long)
        self.chain: GaussianDiffusion | None = None

    @property
    def num_steps(self) -> int:
        """Number of steps set by ``set_timesteps`` (0 before)."""
        return int(self.timesteps.numel())

    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable description for provenance; ``make_sampler(**config, diffusion=...)`` rebuilds it."""
        return {
            "name": self.name,
            "num_steps": self.num_steps,
            "start_timestep": self.start_timestep,
            "clip_denoised": self.clip_denoised,
            **self.options(),
        }

    def options(self) -> dict[str, Any]:
        """Sampler-specific settings recorded in ``config``."""
        return {}

    def set_timesteps(self, num_steps: int, start_timestep: int | None = None) -> None:
        """Use ``num_steps`` evenly spaced original timesteps from ``start_timestep`` (default T-1) down to 0.

        A ``start_timestep`` below T-1 starts from a partially noised image (SDEdit): see ``add_noise``.
        """
        top = self.diffusion.original_num_timesteps - 1
        if start_timestep is not None and not 0 <= start_timestep <= top:
            raise ValueError(f"start_timestep must lie in 0..{top}, got {start_timestep}")
        first = top if start_timestep is None else int(start_timestep)
        if not 1 <= num_steps <= first + 1:
            raise ValueError(f"num_steps must lie in 1..{first + 1} (timesteps 0..{first}), got {num_steps}")
        kept = space_timesteps(first + 1, int(num_steps)) if num_steps > 1 else [first]  # one step starts at the top
        self.chain = self.diffusion.respaced(kept)
        self.start_timestep = None if start_timestep is None else first
        self.timesteps = torch.tensor(kept[::-1], dtype=torch.long)

    def chain_index(self, timestep_index: int) -> int:
        """Index into the respaced chain for position ``timestep_index`` of ``timesteps``."""
        if self.chain is None:
            raise RuntimeError("call set_timesteps(num_steps) before sampling")
        if not 0 <= timestep_index < self.num_steps:
            raise IndexError(f"timestep_index must lie in 0..{self.num_steps - 1}, got {timestep_index}")
        return self.num_steps - 1 - timestep_index

    def add_noise(self, x0: Tensor, timestep_index: int, noise: Tensor) -> Tensor:
        """Noise a clean ``x0`` to the marginal at ``timesteps[timestep_index]``: the state to start from there."""
        k = self.chain_index(timestep_index)
        assert self.chain is not None
        t = torch.full((x0.shape[0],), k, dtype=torch.long, device=x0.device)
        return self.chain.q_sample(x0, t, noise)

    def p_mean_variance(self, model_output: Tensor, timestep_index: int, x_t: Tensor) -> dict[str, Tensor]:
        """The chain's ``p_mean_variance`` at position ``timestep_index``."""
        k = self.chain_index(timestep_index)
        assert self.chain is not None
        t = torch.full((x_t.shape[0],), k, dtype=torch.long, device=x_t.device)
        return self.chain.p_mean_variance(model_output, x_t, t, clip_denoised=self.clip_denoised)

    @abstractmethod
    def step(
        self, model_output: Tensor, timestep_index: int, x_t: Tensor, generator: Generators = None
    ) -> tuple[Tensor, Tensor]:
        """One reverse step: (x_prev, pred_x0)."""


def sample_loop(
    model_fn: ModelFn,
    sampler: Sampler,
    x_T: Tensor,
    model_kwargs: dict[str, Any],
    generator: Generators = None,
    start_index: int = 0,
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Run ``sampler`` from ``x_T`` (the state at ``timesteps[start_index]``), yielding (i, n, x, pred_x0) per step.

    ``model_fn(x, t, **model_kwargs)`` gets the original timestep as a LongTensor of batch size; i runs from
    start_index + 1 to n = sampler.num_steps, and the last x is the sample. Runs without autograd.
    """
    n = sampler.num_steps
    if n == 0:
        raise RuntimeError("call set_timesteps(num_steps) before sampling")
    if not 0 <= start_index < n:
        raise ValueError(f"start_index must lie in 0..{n - 1}, got {start_index}")
    x = x_T
    for index in range(start_index, n):
        with torch.no_grad():
            t = torch.full((x.shape[0],), int(sampler.timesteps[index]), dtype=torch.long, device=x.device)
            model_output = model_fn(x, t, **model_kwargs)
            x, pred_x0 = sampler.step(model_output, index, x, generator)
        yield index + 1, n, x, pred_x0
