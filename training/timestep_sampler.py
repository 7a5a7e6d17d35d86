"""Which timesteps to train on: uniform, or loss-aware (improved DDPM's second-moment importance sampling)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class UniformSampler:
    """t ~ U{0..T-1}; weights are all 1."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps
        self._on_device: torch.Tensor | None = None  # probabilities() on the sampling device, until they change

    def probabilities(self) -> torch.Tensor:
        """p(t) [T] float64 after every update so far."""
        return self._distribution()

    def _distribution(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [B] long, importance weights [B] float) on ``generator``'s device, with
        E[w * loss] = mean loss over t; no host synchronisation."""
        if self._on_device is None or self._on_device.device != generator.device:
            self._on_device = self._distribution().to(generator.device)
        p = self._on_device
        # at least 2 draws: torch checks a one-sample distribution on the host (a CUDA sync), e.g. one sample per rank
        t = torch.multinomial(p, max(batch, 2), replacement=True, generator=generator)[:batch]
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record this rank's per-sample losses (unused for uniform sampling)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Nothing to restore."""


class LossAwareSampler(UniformSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) over the last ``history`` losses, mixed with ``uniform_prob``.

    Under torch.distributed every rank's (t, loss) pairs are all-gathered, so all ranks keep the same history
    (improved-diffusion's ``update_with_local_losses``). Losses stay on their device and are folded into the
    history every ``fold_every`` updates (one host synchronisation per fold, not per step); non-finite losses are
    dropped there, so one NaN cannot poison the distribution.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001,
                 fold_every: int = 10) -> None:
        super().__init__(num_timesteps)
        self.uniform_prob = uniform_prob
        self.fold_every = fold_every
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def probabilities(self) -> torch.Tensor:
        self._fold()
        self._on_device = None
        return self._distribution()

    def _distribution(self) -> torch.Tensor:
        """p(t) from the folded history (pending losses wait for their fold, so resumed runs fold at the same step)."""
        history = self.losses.shape[1]
        if (self.counts < history).any():  # warm-up: uniform until every t has a full history
            return super()._distribution()
        w = torch.sqrt((self.losses ** 2).mean(dim=1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        t, losses = t.detach().long(), losses.detach().double()
        if self._pending and self._pending[0][0].device != t.device:  # restored from a checkpoint read on the CPU
            self._pending = [(pt.to(t.device), pl.to(t.device)) for pt, pl in self._pending]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ts, ls = _all_gather(t), _all_gather(losses)
            t, losses = torch.cat(ts), torch.cat(ls)
        self._pending.append((t, losses))
        if len(self._pending) >= self.fold_every:
            self._fold()
            self._on_device = None

    def _fold(self) -> None:
        """Move the pending losses into the per-timestep history, oldest first, skipping non-finite ones."""
        if not self._pending:
            return
        t = torch.cat([p[0] for p in self._pending]).cpu().tolist()
        losses = torch.cat([p[1] for p in self._pending]).cpu()
        self._pending.clear()
        history = self.losses.shape[1]
        for ti, loss, finite in zip(t, losses.tolist(), torch.isfinite(losses).tolist()):
            if not finite:
                continue
            if self.counts[ti] == history:
                self.losses[ti] = torch.roll(self.losses[ti], -1)
                self.losses[ti, -1] = loss
            else:
                self.losses[ti, self.counts[ti]] = loss
                self.counts[ti] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        pending_t = torch.cat([p[0].cpu() for p in self._pending]) if self._pending else torch.zeros(0, dtype=torch.long)
        pending = torch.cat([p[1].cpu() for p in self._pending]) if self._pending else torch.zeros(0, dtype=torch.float64)
        return {"losses": self.losses.clone(), "counts": self.counts.clone(), "pending_t": pending_t,
                "pending_losses": pending, "pending_updates": torch.tensor(len(self._pending))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])
        self._on_device = None
        self._pending.clear()
        n = int(state["pending_updates"])
        if n:  # restore the same number of pending updates, so the next fold happens at the same step
            for t, loss in zip(state["pending_t"].chunk(n), state["pending_losses"].chunk(n)):
                self._pending.append((t, loss))


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return out


def make_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    """'uniform' or 'loss-aware'."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-aware":
        return LossAwareSampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}: use uniform or loss-aware")
