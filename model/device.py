"""Device selection: `auto`, `cpu`, `cuda`, `cuda:N`, `mps`.

`auto` picks the CUDA GPU with the most free memory, then MPS, then the CPU. The choice is a
pure function of what is present (`choose_device`), so it is tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gencli.model.errors import DeviceError


@dataclass(frozen=True)
class Inventory:
    cuda_free: tuple[int, ...]  # free bytes of each visible CUDA device
    mps: bool


def inventory() -> Inventory:
    free: list[int] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free.append(torch.cuda.mem_get_info(i)[0])
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Inventory(cuda_free=tuple(free), mps=mps)


def choose_device(spec: str, inv: Inventory) -> str:
    """The device string for spec, given what is present; DeviceError if it is not there."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if inv.cuda_free:
            best = max(range(len(inv.cuda_free)), key=lambda i: inv.cuda_free[i])
            return f"cuda:{best}"
        return "mps" if inv.mps else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "mps":
        if not inv.mps:
            raise DeviceError("device mps is not available on this machine: use --device cpu or auto")
        return "mps"
    if spec == "cuda" or spec.startswith("cuda:"):
        n = len(inv.cuda_free)
        if n == 0:
            raise DeviceError(f"device {spec} is not available: no CUDA GPU is visible; use --device cpu or auto")
        index = spec.partition(":")[2] or "0"
        if not index.isdigit() or int(index) >= n:
            raise DeviceError(f"device {spec} is not available: this machine has CUDA devices 0..{n - 1}")
        return f"cuda:{int(index)}"
    raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


def resolve_device(spec: str) -> torch.device:
    return torch.device(choose_device(spec, inventory()))


def describe(device: torch.device) -> str:
    """One line: the device's name and, on a GPU, free/total memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return f"{device} ({name}), {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
    if device.type == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({torch.get_num_threads()} threads)"
