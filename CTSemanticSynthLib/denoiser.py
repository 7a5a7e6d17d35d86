"""The conditioned network over every slice of a volume at once, evaluated a chunk of slices at a time.

The samplers see the whole volume's state (N slices: a few MB), so every slice is at the same timestep and
anything that couples slices within a step (neighbour agreement, inpainting a region across slices) is a function
of that state; memory is bounded by the chunk, not the volume. The class slices live on the device (uint8) and
each chunk's condition (one-hot mask, edges, and the condition encoder's features: all independent of the
timestep) is built there and cached while the whole volume's fits :data:`CONDITION_CACHE_BYTES`, else rebuilt on
the device every step; nothing crosses from the host per step.

The chunk size can be measured (``batch_size="auto"``), and an out-of-memory error inside a chunk halves it and
retries that chunk. A slice's output does not depend on the chunk it was computed in up to float rounding (oneDNN
on the CPU and cuDNN/cuBLAS on CUDA pick kernels by batch size: ~0.05 HU before int16 rounding for the tiny test
network on a CPU), so the volume is the one an uninterrupted run at the smaller size gives, but for a few voxels
1 HU apart. A repeated run at the same batch size is bit for bit the same on the CPU (with the same thread count);
on CUDA with deterministic algorithms.
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
from .preprocess import condition_inputs, drop_condition, network_classes

logger = logging.getLogger(__name__)

CONDITION_CACHE_BYTES = 2 * 1024**3
"""Largest total size of the whole volume's cached conditions (one-hot masks, edges, condition-encoder features);
beyond it they are rebuilt (on the device) each step."""

AUTO = "auto"
"""``batch_size`` that is measured: see :meth:`VolumeDenoiser.measured_batch_size`."""

FIXED_AUTO_BATCH = 8
"""What ``auto`` means where free memory cannot be asked (CPU, MPS). On the CPU a larger chunk is not faster (the
cores are busy from a few slices on), and running out of host memory is not an error torch can catch (the
kernel's OOM killer ends the process), so a measured guess could not be corrected by halving."""

MEMORY_FRACTION = 0.8
"""Share of the free device memory that ``auto`` plans to fill (the rest: fragmentation, cuDNN workspaces)."""

CHANNELS_LAST_DEVICES = ("cpu",)
"""Device types whose reduced-precision (bf16/fp16) sampling takes channels_last inputs, where a measurement showed
it pays (oneDNN's bf16 kernels, docs/benchmarks.md). Not CUDA: GroupNorm returns NCHW there whatever it is given,
so the U-Net would convert layouts in every block; ``benchmarks/gpu_check.sh`` measures both layouts."""


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
        self.classes = classes.to(device)  # copied once: each chunk's condition is built on the device
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
        self._conditions: dict[tuple[int, int], dict[str, Any]] = {}
        self._cache_conditions = True

    def condition(self, chunk: slice) -> dict[str, Any]:
        """The network's condition keywords for ``chunk`` (one-hot mask, edges, encoder features), built on the
        device from its class slices; cached per chunk while the whole volume's fit :data:`CONDITION_CACHE_BYTES`."""
        key = (chunk.start, chunk.stop)
        kwargs = self._conditions.get(key)
        if kwargs is not None:
            return kwargs
        kwargs = {k: self.memory_format(v)
                  for k, v in condition_inputs(self.classes[chunk].long(), self.conditioning,
                                                  network_classes(self.network)).items()}
        features = self.network.encode_condition(**kwargs)  # None for concat models
        if features is not None:
            kwargs["cond_features"] = features
        if self._cache_conditions:
            self._cache_conditions = self._cache_bytes(kwargs, chunk) <= CONDITION_CACHE_BYTES
            if self._cache_conditions:
                self._conditions[key] = kwargs
        return kwargs

    def _cache_bytes(self, condition: dict[str, Any], chunk: slice) -> int:
        """The size of the whole volume's cached conditions, from one chunk's."""
        tensors = [t for v in condition.values() for t in (v if isinstance(v, list) else [v])]
        return sum(t.numel() * t.element_size() for t in tensors) * len(self.classes) // (chunk.stop - chunk.start)

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
        self._conditions.clear()  # cached per chunk: the chunks change
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
        (:func:`~.device.free_memory`) less what does not grow with the chunk (the fixed cost, the condition cache,
        the whole volume's outputs, held until a step's chunks are joined, and the join), at the cost of one more
        slice; where free memory cannot be asked, :data:`FIXED_AUTO_BATCH`. At most all slices.

        The costs come from the peak memory of two probe evaluations of 1 and 2 slices (with guidance's second
        pass, under the run's precision): their difference is one slice's; what the 1-slice probe needs beyond it
        (reduced-precision weight copies, library workspaces) is paid once per chunk, not per slice. The plan is
        logged (INFO)."""
        free = free_memory(self.device)
        if free is None:
            return min(FIXED_AUTO_BATCH, len(self.classes))
        size = self.classes.shape[-1]
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        peaks, cache, outputs = [], 0, 0
        for slices in (1, 2)[: len(self.classes)]:
            torch.cuda.reset_peak_memory_stats(self.device)
            x = self.memory_format(torch.zeros((slices, 1, size, size), device=self.device))
            out = self.evaluate(x, torch.zeros((slices,), dtype=torch.long, device=self.device), slice(0, slices))
            outputs = 2 * out[0].numel() * out.element_size() * len(self.classes)  # the chunks' outputs and their join
            del out
            peaks.append(torch.cuda.max_memory_allocated(self.device) - before)
            if slices == 1 and (0, 1) in self._conditions:  # the whole volume's condition cache, planned for below
                cache = self._cache_bytes(self._conditions[(0, 1)], slice(0, 1))
            self._conditions.clear()
        if len(peaks) == 1:
            return 1
        per_slice = peaks[1] - peaks[0]
        if per_slice <= 0:  # allocator rounding or a smaller workspace for 2 slices: charge the 2-slice probe's mean
            per_slice = peaks[1] / 2
        fixed = max(0, peaks[0] - per_slice)
        batch = max(1, min(len(self.classes), int((free * MEMORY_FRACTION - fixed - cache - outputs) / per_slice)))
        logger.info("batch size auto: %d of %d slices (%.0f MiB free x %.2f; once %.0f MiB, per slice %.1f MiB, "
                    "condition cache %.0f MiB, outputs %.0f MiB)", batch, len(self.classes), free / 2**20,
                    MEMORY_FRACTION, fixed / 2**20, per_slice / 2**20, cache / 2**20, outputs / 2**20)
        return batch

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return precision_autocast(self.device, self.precision)

    def memory_format(self, x: Tensor) -> Tensor:
        return to_memory_format(x, self.precision)


def precision_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to the precision's dtype, or nothing for fp32."""
    dtype = autocast_dtype(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def to_memory_format(x: Tensor, precision: str) -> Tensor:
    """channels_last for 4-D tensors under reduced precision on the :data:`CHANNELS_LAST_DEVICES`, else ``x``."""
    if autocast_dtype(precision) is None or x.ndim != 4 or x.device.type not in CHANNELS_LAST_DEVICES:
        return x
    return x.contiguous(memory_format=torch.channels_last)
