"""Small private helpers shared by pipeline modules."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from pipelines.device import device_of

OutputHook = Callable[[nn.Module, torch.Tensor], None]


@torch.no_grad()
def probe_forward(model: nn.Module, modules: Iterable[nn.Module], hook: OutputHook, *, image_size: int) -> None:
    """One eval-mode forward pass of a blank image, calling `hook(module, output)` for each module."""
    handles = [m.register_forward_hook(lambda module, _inputs, output: hook(module, output)) for m in modules]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, image_size, image_size, device=device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def error_line(error: BaseException) -> str:
    """`ErrorType: its first non-empty line` (at most 200 characters of it): an error in one line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200] if lines else 'no message'}"
