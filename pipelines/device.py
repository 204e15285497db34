"""Where one pipeline run computes: the device, bf16 autocast on CUDA, and the model's device."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["pick_device", "autocast", "device_of"]


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1"), else CUDA when this process sees a GPU, else the CPU.

    Under Ray a trial sees exactly the GPUs it was assigned (Ray sets CUDA_VISIBLE_DEVICES, empty
    for a CPU-only trial), so the default is the device Ray assigned.
    """
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {requested!r}: no CUDA device is visible to this process")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def autocast(device: torch.device, *, enabled: bool) -> Iterator[None]:
    """bf16 autocast on CUDA when `enabled`; a no-op on the CPU (bf16 there is slower, not faster)."""
    if enabled and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
