"""The conditioned network over every slice of a volume at once, evaluated a chunk of slices at a time.

The samplers see the whole volume's state (N slices: a few MB), so every slice is at the same timestep and
anything that couples slices within a step (neighbour agreement, inpainting a region across slices) is a function
of that state; memory is bounded by the chunk, not the volume. The condition encoder's features (independent of
the timestep) are cached per chunk while they fit :data:`FEATURE_CACHE_BYTES`, else recomputed every step.

The chunk size can be measured (``batch_size="auto"``), and an out-of-memory error inside a chunk halves it and
retries that chunk: each slice's output does not depend on the chunk it was computed in, so the volume is the one
an uninterrupted run at the smaller size gives.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .device import autocast_dtype, free_memory
from .errors import Cancelled, CTSynthError
from .preprocess import condition_inputs, drop_condition

logger = logging.getLogger(__name__)

FEATURE_CACHE_BYTES = 2 * 1024**3
"""Largest total size of cached condition-encoder features; beyond it they are recomputed each step."""

AUTO = "auto"
"""``batch_size`` that is measured: see :meth:`VolumeDenoiser.measured_batch_size`."""

FIXED_AUTO_BATCH = 8
"""What ``auto`` means where free memory cannot be asked (CPU, MPS). On the CPU a larger chunk is not faster (the
cores are busy from a few slices on), and running out of host memory is not an error torch can catch (the
kernel's OOM killer ends the process), so a measured guess could not be corrected by halving."""

MEMORY_FRACTION = 0.8
"""Share of the free device memory that ``auto`` plans to fill (the rest: fragmentation, cuDNN workspaces)."""

PROBE_SLICES = 2
"""Slices of the probe chunk whose peak memory gives ``auto`` the cost of one slice."""


class VolumeDenoiser:
    """``denoiser(x, t)`` -> the network's output for the (N, 1, S, S) state ``x`` of the class slices ``classes``
    (N, S, S), computed ``batch_size`` slices at a time under ``precision``.

    ``batch_size`` None means all slices at once, ``"auto"`` :meth:`measured_batch_size` (on the first call). On
    ``torch.OutOfMemoryError`` the batch size is halved and the chunk retried, down to 1 (then the error is raised);
    ``on_batch_size(b)`` is told each batch size taken (``batch_size`` holds the current one). ``cancel()`` is
    polled before each chunk (raises :class:`Cancelled`); ``progress(evaluated)`` gets the number of slice
    evaluations done so far. ``guidance`` s != 0 is classifier-free guidance (for models trained with label dropout):
    every chunk is evaluated with and without its labels, see :meth:`evaluate`. ``finite`` turns False once any
    output is NaN or infinite (read it after the loop: reading it inside would make a GPU wait every step).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        conditioning: str,
        classes: Tensor,
        *,
        batch_size: int | str | None = None,
        device: torch.device,
        precision: str = "fp32",
        guidance: float = 0.0,
        cancel: Callable[[], bool] | None = None,
        progress: Callable[[int], None] | None = None,
        on_batch_size: Callable[[int], None] | None = None,
    ) -> None:
        self.network = network
        self.conditioning = conditioning
        self.classes = classes
        self.device = device
        self.precision = precision
        self.guidance = guidance
        self.cancel = cancel
        self.progress = progress
        self.on_batch_size = on_batch_size
        self.batch_size = 0  # set below, or by the first call for "auto"
        if batch_size != AUTO:
            self._set_batch_size(max(1, min(len(classes), len(classes) if batch_size is None else int(batch_size))))
        self.evaluated = 0
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self._features: dict[tuple[int, int], list[Tensor]] = {}
        self._cache_features = True

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
                self._cache_features = self._cache_bytes(features) <= FEATURE_CACHE_BYTES
                if self._cache_features:
                    self._features[key] = features
        if features is not None:
            kwargs["cond_features"] = features
        return kwargs

    def _cache_bytes(self, features: list[Tensor]) -> int:
        """The size of the whole volume's cached features, from one chunk's."""
        return sum(f.numel() * f.element_size() for f in features) * len(self.classes) // len(features[0])

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        outputs = []
        with self.autocast():
            if not self.batch_size:
                self._set_batch_size(self.measured_batch_size())
            first = 0
            while first < len(self.classes):
                if self.cancel is not None and self.cancel():
                    raise Cancelled("cancelled by the user; nothing was written")
                chunk = slice(first, min(first + self.batch_size, len(self.classes)))
                out = self._evaluate(x, t, chunk)
                if out is None:  # out of memory: the batch size was halved, the same slices go again
                    continue
                self.finite = self.finite & torch.isfinite(out).all()  # NaN would become 0 HU; x0 clamps hide inf
                outputs.append(out)
                self.evaluated += chunk.stop - chunk.start
                if self.progress is not None:
                    self.progress(self.evaluated)
                first = chunk.stop
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

    def _evaluate(self, x: Tensor, t: Tensor, chunk: slice) -> Tensor | None:
        """The network's output for ``chunk``, or None after an out-of-memory error that halved the batch size."""
        try:
            return self.evaluate(self.memory_format(x[chunk]), t[chunk], chunk)
        except torch.OutOfMemoryError:
            if self.batch_size == 1:
                raise
        except RuntimeError as exc:  # BackendCompilerFailed: only from a torch.compile'd network
            if "torch._dynamo" in sys.modules and isinstance(exc, torch._dynamo.exc.BackendCompilerFailed):
                raise CTSynthError(f"--compile: torch.compile failed ({str(exc).splitlines()[0]}); it needs a working "
                                   "C++ compiler on the CPU, Triton on CUDA: install one or run without --compile"
                                   ) from None
            raise
        # outside the except block, so that the failed chunk's tensors (held by the traceback) are freed first
        halved = self.batch_size // 2
        logger.warning("out of memory on %s with %d slices at a time: retrying with %d", self.device,
                       self.batch_size, halved)
        self._features.clear()  # cached per chunk: the chunks change
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._set_batch_size(halved)
        return None

    def _set_batch_size(self, batch_size: int) -> None:
        self.batch_size = batch_size
        if self.on_batch_size is not None:
            self.on_batch_size(batch_size)

    def measured_batch_size(self) -> int:
        """``batch_size="auto"``: on CUDA, as many slices as fill :data:`MEMORY_FRACTION` of the free memory
        (:func:`~.device.free_memory`, less the feature cache) at the peak memory per slice of a probe chunk of
        :data:`PROBE_SLICES`; where free memory cannot be asked, :data:`FIXED_AUTO_BATCH`. At most all slices."""
        free = free_memory(self.device)
        if free is None:
            return min(FIXED_AUTO_BATCH, len(self.classes))
        probe = slice(0, min(PROBE_SLICES, len(self.classes)))
        size = self.classes.shape[-1]
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        kwargs = self.condition(probe)
        x = self.memory_format(torch.zeros((probe.stop, 1, size, size), device=self.device))
        self.network(x, torch.zeros((probe.stop,), dtype=torch.long, device=self.device), **kwargs)
        per_slice = (torch.cuda.max_memory_allocated(self.device) - before) / probe.stop
        features = kwargs.get("cond_features")
        cache = self._cache_bytes(features) if features is not None and self._cache_features else 0
        self._features.clear()
        return max(1, min(len(self.classes), int((free * MEMORY_FRACTION - cache) / per_slice)))

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
