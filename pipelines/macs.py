"""The one MACs counter.

Definition: multiply-accumulates of every nn.Conv2d and nn.Linear (the classifier included) for
ONE image at the given size. Batch norm, activations, pooling and residual adds are not counted:
BN folds into the preceding convolution at deployment, and the rest are a few percent of the
total. This is exactly half of what `torch.utils.flop_counter.FlopCounterMode` reports for the same
layers (it counts 2 FLOPs per MAC); tests hold us to that. FLOPs, where shown, are 2 x MACs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipelines._helpers import probe_forward

__all__ = ["Complexity", "count_macs"]


@dataclass(frozen=True)
class Complexity:
    macs: int
    params: int


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    per_image_outputs = output[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image_outputs * (module.in_channels // module.groups) * kh * kw
    return per_image_outputs * module.in_features  # nn.Linear


def count_macs(model: nn.Module, *, image_size: int) -> Complexity:
    total = 0

    def add(module: nn.Module, output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, output)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    probe_forward(model, layers, add, image_size=image_size)
    return Complexity(macs=total, params=sum(p.numel() for p in model.parameters()))
