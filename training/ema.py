"""Exponential moving average of model weights (improved-diffusion's update, with a warm-up of the rate)."""

from __future__ import annotations

import torch


def ema_rate(step: int, target: float) -> float:
    """Decay for the update after ``step`` optimiser steps: min(target, (1 + step) / (10 + step)).

    The warm-up keeps early EMA weights from being dominated by the random initialisation.
    """
    return min(target, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model for every parameter; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - rate)  # one fused launch
    for target, buf in zip(ema.buffers(), model.buffers()):
        target.copy_(buf)
