"""Tests that look like a GPU: what a CUDA device would make the host wait for, counted on the CPU.

:class:`DeviceTrace` sees every aten operation (a ``TorchDispatchMode``) and records

- ``syncs``: operations that make the host wait for a CUDA device (a value read back with ``item``/``int``/``bool``,
  an output whose size depends on the data, a check torch makes on the host), by CUDA's rules, whatever device the
  test runs on; the GPU check counts the real ones with ``torch.cuda.set_sync_debug_mode``;
- ``to_device``: copies from host memory to another device (a test's stand-in device is ``meta``, which has no data:
  anything that reads it back fails, so a hot loop that runs there reads nothing back);
- ``on_host``: operations whose tensors all live in host memory (work the CPU does while a GPU would wait).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

ALWAYS_SYNC = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.bincount, aten.is_nonzero,
               aten.equal, aten._unique2, aten.unique_consecutive, aten.unique_dim}
"""Operations that wait for a CUDA device whatever their arguments (a host read or a data-dependent output size)."""


def _sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    packet = func.overloadpacket
    if packet in ALWAYS_SYNC:
        return packet.__name__
    if packet is aten.multinomial:  # one sample, or none replaced: torch checks the distribution on the host first
        samples, replacement = args[1], args[2] if len(args) > 2 else kwargs.get("replacement", False)
        return "multinomial (one sample or no replacement)" if samples == 1 or not replacement else None
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) < 4:
        return "repeat_interleave without output_size"
    if packet is aten.index and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
        return "boolean-mask indexing"
    return None


class DeviceTrace(TorchDispatchMode):
    """Records, inside ``with DeviceTrace() as trace:``, the operations listed in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.to_device: list[str] = []
        self.on_host: list[str] = []
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.append(name)
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            self.syncs.append(reason)
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        if func.overloadpacket is aten.copy_ and args[1].device.type == "cpu" != args[0].device.type:
            self.to_device.append(name)
        elif tensors and all(t.device.type == "cpu" for t in tensors):
            self.on_host.append(name)
            if any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in tree_leaves(out)):
                self.to_device.append(name)
        return out
