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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_BF16_UNITS = (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported"))
"""CPU features with native bf16 matrix arithmetic, and the torch.cpu probe for each (private, hence getattr)."""


def cpu_bf16_units() -> list[str]:
    """The CPU's native bf16 matrix units among AMX and AVX512-BF16 (empty on AVX2-only CPUs)."""
    return [name for name, probe in _BF16_UNITS if getattr(torch.cpu, probe, lambda: False)()]


def device_capability(device: torch.device) -> str:
    """What the device computes with: the GPU's name and compute capability, or the CPU's vector ISA (torch's
    dispatch level) and whether it has native bf16 matrix units (AMX / AVX512-BF16)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    if device.type == "cpu":
        return "+".join([torch.backends.cpu.get_cpu_capability(), *cpu_bf16_units()])
    return device.type


def cuda_native_bf16() -> bool:
    """Whether the current CUDA GPU computes bf16 natively (torch's plain check also counts slow emulation)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def select_precision(name: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA (when the GPU supports it) and on CPUs with native bf16 matrix units, else 'fp32';
    an explicit 'fp32', 'bf16' or 'fp16' is kept. Unknown names are an InputError."""
    if name not in PRECISIONS:
        raise InputError(f"unknown precision '{name}': use one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if cuda_native_bf16() else "fp32"
    if device.type == "cpu" and cpu_bf16_units():
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision ('bf16', 'fp16'), or None for fp32 (no autocast)."""
    return _AUTOCAST_DTYPES.get(precision)


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give this process (free device memory plus what torch's caching allocator holds
    unused), or None where it cannot be asked (CPU, MPS)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
