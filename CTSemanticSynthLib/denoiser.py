"""The conditioned network over every slice of a volume at once, evaluated a chunk of slices at a time.

The samplers see the whole volume's state (N slices: a few MB), so every slice is at the same timestep and
anything that couples slices within a step (neighbour agreement, inpainting a region across slices) is a function
of that state; memory is bounded by the chunk, not the volume. The condition encoder's features (independent of
the timestep) are cached per chunk while they fit :data:`FEATURE_CACHE_BYTES`, else recomputed every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .device import autocast_dtype
from .errors import Cancelled
from .preprocess import condition_inputs, drop_condition

FEATURE_CACHE_BYTES = 2 * 1024**3
"""Largest total size of cached condition-encoder features; beyond it they are recomputed each step."""


class VolumeDenoiser:
    """``denoiser(x, t)`` -> the network's output for the (N, 1, S, S) state ``x`` of the class slices ``classes``
    (N, S, S), computed ``batch_size`` slices at a time under ``precision``.

    ``cancel()`` is polled before each chunk (raises :class:`Cancelled`); ``progress(evaluated)`` gets the number of
    slice evaluations done so far. ``guidance`` s != 0 is classifier-free guidance (for models trained with label
    dropout): every chunk is evaluated with and without its labels, see :meth:`evaluate`. ``finite`` turns False once any output is NaN or infinite (read it after the
    loop: reading it inside would make a GPU wait every step).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        conditioning: str,
        classes: Tensor,
        *,
        batch_size: int | None = None,
        device: torch.device,
        precision: str = "fp32",
        guidance: float = 0.0,
        cancel: Callable[[], bool] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.network = network
        self.conditioning = conditioning
        self.classes = classes
        self.batch_size = len(classes) if batch_size is None else max(1, int(batch_size))
        self.device = device
        self.precision = precision
        self.guidance = guidance
        self.cancel = cancel
        self.progress = progress
        self.evaluated = 0
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self._features: dict[tuple[int, int], list[Tensor]] = {}
        self._cache_features = True

    def chunks(self) -> Iterator[slice]:
        """The slices of the volume evaluated together."""
        for first in range(0, len(self.classes), self.batch_size):
            yield slice(first, min(first + self.batch_size, len(self.classes)))

    def condition(self, chunk: slice) -> dict[str, Any]:
        """The network's condition keywords for ``chunk`` (one-hot mask, edges, encoder features)."""
        kwargs: dict[str, Any] = {
            k: self.memory_format(v.to(self.device))
            for k, v in condition_inputs(self.classes[chunk].long(), self.conditioning).items()
        }
        key = (chunk.start, chunk.stop)
        features = self._features.get(key)
        if features is None:
            features = self.network.encode_condition(**kwargs)  # None for concat models
            if features is not None and self._cache_features:
                size = sum(f.numel() * f.element_size() for f in features) * len(self.classes) // len(features[0])
                self._cache_features = size <= FEATURE_CACHE_BYTES
                if self._cache_features:
                    self._features[key] = features
        if features is not None:
            kwargs["cond_features"] = features
        return kwargs

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        outputs = []
        with self.autocast():
            for chunk in self.chunks():
                if self.cancel is not None and self.cancel():
                    raise Cancelled("cancelled by the user; nothing was written")
                out = self.evaluate(self.memory_format(x[chunk]), t[chunk], chunk)
                self.finite = self.finite & torch.isfinite(out).all()  # NaN would become 0 HU; x0 clamps hide inf
                outputs.append(out)
                self.evaluated += chunk.stop - chunk.start
                if self.progress is not None:
                    self.progress(self.evaluated)
        return torch.cat(outputs)

    def evaluate(self, x: Tensor, t: Tensor, chunk: slice) -> Tensor:
        """The network's float32 output for ``chunk``; with guidance s the prediction channels become
        ``uncond + (1 + s) (cond - uncond)`` from a second evaluation on the "no label" input (the learned-variance
        channels stay conditional)."""
        condition = self.condition(chunk)
        out = self.network(x, t, **condition).float()
        if self.guidance:
            labels = {k: v for k, v in condition.items() if k != "cond_features"}  # the network encodes the null
            null = drop_condition(labels, torch.zeros(len(x), dtype=torch.bool, device=x.device))
            uncond, channels = self.network(x, t, **null).float(), x.shape[1]
            out[:, :channels] = uncond[:, :channels] + (1 + self.guidance) * (out[:, :channels] - uncond[:, :channels])
        return out

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return precision_autocast(self.device, self.precision)

    def memory_format(self, x: Tensor) -> Tensor:
        return to_memory_format(x, self.precision)


def precision_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to the precision's dtype, or nothing for fp32."""
    dtype = autocast_dtype(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def to_memory_format(x: Tensor, precision: str) -> Tensor:
    """channels_last for 4-D tensors under reduced precision (where oneDNN/cuDNN's fast kernels want it)."""
    if autocast_dtype(precision) is None or x.ndim != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last)
