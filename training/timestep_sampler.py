"""Which timesteps to train on: uniform, or loss-aware (improved DDPM's second-moment importance sampling)."""

from __future__ import annotations

import torch


class UniformSampler:
    """t ~ U{0..T-1}; weights are all 1."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [B] long, importance weights [B] float) with E[w * loss] = mean loss over t."""
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (unused for uniform sampling)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore."""


class LossAwareSampler(UniformSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) over the last ``history`` losses, mixed with ``uniform_prob``."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.uniform_prob = uniform_prob
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def probabilities(self) -> torch.Tensor:
        history = self.losses.shape[1]
        if (self.counts < history).any():  # warm-up: uniform until every t has a full history
            return super().probabilities()
        w = torch.sqrt((self.losses ** 2).mean(dim=1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        history = self.losses.shape[1]
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[ti] == history:
                self.losses[ti] = torch.roll(self.losses[ti], -1)
                self.losses[ti, -1] = loss
            else:
                self.losses[ti, self.counts[ti]] = loss
                self.counts[ti] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def make_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    """'uniform' or 'loss-aware'."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-aware":
        return LossAwareSampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}: use uniform or loss-aware")
