"""Device selection: a device name typed by a user -> a torch device that can compute, or one clear error."""

from __future__ import annotations

import re

import torch

from .errors import InputError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"(cpu|mps|cuda)(?::(\d+))?")


def select_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything that cannot run the model here is an InputError.

    torch itself accepts names it cannot compute on ('meta', 'xla', 'cuda:7' on a one-GPU machine); those are
    refused here, before any work, naming the devices this machine has.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    match = _DEVICE.fullmatch(name.strip().lower())
    if match is None:
        raise InputError(f"unknown device '{name}': use {DEVICE_CHOICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device '{name}' requested but this machine (or this torch build) has no CUDA GPU; "
                             "use --device cpu or auto")
        if index is not None and int(index) >= count:
            raise InputError(f"device '{name}' does not exist: this machine has {count} CUDA GPU(s), "
                             f"cuda:0..cuda:{count - 1}")
    elif index not in (None, "0"):
        raise InputError(f"device '{name}' does not exist: use {kind} without an index")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' requested but it is not available; use --device cpu or auto")
    return torch.device(kind if index is None else f"{kind}:{index}")
