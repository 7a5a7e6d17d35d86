"""RePaint (Lugmayr et al. 2022): inpaint a region with any sampler, the known area held to the data at every step.

Before every network evaluation at position i of ``sampler.timesteps`` the known area of the state is replaced by
the known image noised to that timestep (``Sampler.add_noise``), so the unknown area is denoised in the context of
the data; at the end the known area is the known image itself. Resampling jumps harmonise the two: every
``jump_length`` positions the state is noised back up ``jump_length`` positions (the chain's forward transition
q(x_a | x_b), one draw) and walked down again, ``jump_n_sample - 1`` times; ``jump_n_sample`` 1 means no jumps.
The paper's setting is 250 steps with jump length 10 and 10 samples (about 10x the evaluations of plain sampling);
:meth:`Jumps.scaled` keeps the jump at 4 % of the trajectory (10/250) for any number of steps.

A multistep sampler (DPM-Solver++) keeps no history across a replaced state, so every step is first order (DDIM).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..gaussian_diffusion import ModelFn
from .base import Generators, Sampler, randn_like

PAPER_STEPS, PAPER_JUMP_LENGTH = 250, 10


@dataclass(frozen=True)
class Jumps:
    """RePaint's resampling: go back ``length`` positions, ``n_sample - 1`` times at every jump point."""

    length: int = 1
    n_sample: int = 1

    def __post_init__(self) -> None:
        if self.length < 1 or self.n_sample < 1:
            raise ValueError(f"jump length and jump samples must be at least 1, got {self.length} and {self.n_sample}")

    @classmethod
    def scaled(cls, num_steps: int, n_sample: int) -> Jumps:
        """The paper's jump (10 of 250 steps) scaled to ``num_steps`` (at least one step)."""
        return cls(max(1, round(num_steps * PAPER_JUMP_LENGTH / PAPER_STEPS)), n_sample)

    def schedule(self, num_steps: int) -> list[int]:
        """The positions of ``timesteps`` visited, from 0 (the start) to ``num_steps`` (the sample); a position
        below its predecessor is a jump back up.

        Jump points are the positions i >= length with (num_steps - 1 - i) divisible by length (the paper's
        t = 0, j, 2j, ... below T - j)."""
        left = {i: self.n_sample - 1 for i in range(self.length, num_steps)
                if (num_steps - 1 - i) % self.length == 0}
        position, path = 0, [0]
        while position < num_steps:
            position += 1
            path.append(position)
            if left.get(position, 0) > 0:
                left[position] -= 1
                position -= self.length
                path.append(position)
        return path

    def evaluations(self, num_steps: int) -> int:
        """Network evaluations of one walk through :meth:`schedule`."""
        path = self.schedule(num_steps)
        return sum(b > a for a, b in zip(path, path[1:]))


@dataclass(frozen=True)
class Inpainting:
    """What :func:`repaint_loop` needs besides the sampler: the clean ``known`` state, the ``unknown`` area (1 where
    to sample, broadcastable to the state) and the ``jumps``."""

    known: Tensor
    unknown: Tensor
    jumps: Jumps

    def to(self, device: torch.device | str) -> Inpainting:
        """The same on ``device``."""
        return Inpainting(self.known.to(device), self.unknown.to(device), self.jumps)


def renoise(sampler: Sampler, x: Tensor, from_index: int, to_index: int, noise: Tensor) -> Tensor:
    """Noise the state at position ``from_index`` back up to the earlier (noisier) position ``to_index``:
    x_to = sqrt(abar_to / abar_from) x + sqrt(1 - abar_to / abar_from) noise."""
    assert sampler.chain is not None
    abar = sampler.chain.alphas_cumprod
    ratio = float(abar[sampler.chain_index(to_index)]) / float(abar[sampler.chain_index(from_index)])
    return math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * noise


def repaint_loop(
    model_fn: ModelFn,
    sampler: Sampler,
    x_T: Tensor,
    inpaint: Inpainting,
    generator: Generators = None,
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """Like :func:`~.base.sample_loop` from the state ``x_T`` at ``timesteps[0]``, with ``inpaint.known`` (clean, the
    shape of x) kept where ``inpaint.unknown`` (0..1, broadcastable to x) is 0. Yields (evaluation, evaluations, x,
    pred_x0) after every reverse step; the last x is the sample, equal to ``known`` where ``unknown`` is 0.
    """
    n = sampler.num_steps
    if n == 0:
        raise RuntimeError("call set_timesteps(num_steps) before sampling")
    known, unknown = inpaint.known, inpaint.unknown
    path = inpaint.jumps.schedule(n)
    total = inpaint.jumps.evaluations(n)
    keep = 1.0 - unknown
    x, done = x_T, 0
    for here, there in zip(path, path[1:]):
        if there < here:
            x = renoise(sampler, x, here, there, randn_like(x, generator))
            continue
        with torch.no_grad():
            x = unknown * x + keep * sampler.add_noise(known, here, randn_like(x, generator))
            t = torch.full((x.shape[0],), int(sampler.timesteps[here]), dtype=torch.long, device=x.device)
            x, pred_x0 = sampler.step(model_fn(x, t), here, x, generator)
        done += 1
        if there == n:
            x = unknown * x + keep * known
        yield done, total, x, pred_x0
