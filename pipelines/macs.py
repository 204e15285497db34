"""The one MACs counter.

Definition: multiply-accumulates of every nn.Conv2d and nn.Linear (the classifier included) for
ONE image at the given size. Batch norm, activations, pooling and residual adds are not counted:
BN folds into the preceding convolution at deployment, and the rest are a few percent of the
total. This is exactly half of what `torch.utils.flop_counter.FlopCounterMode` reports for the same
layers (it counts 2 FLOPs per MAC); tests hold us to that. FLOPs, where shown, are 2 x MACs.

Gated models (`pipelines.gating`): given `inputs` (real normalised images at `image_size`), the
count is the EXPECTATION over those images, a float. Per image, a gated conv costs only its kept
output channels; a depthwise conv following the gate costs only the kept channels; a conv reading
the gated channels costs only its kept input channels, plus, where skipped channels read a `fill`
constant, one MAC per output channel per skipped channel (the fill folded into its bias). Each gate's
predictor Linear costs (kept input channels) x (channels it still predicts: neither static nor
pruned). Without `inputs`, or without gates, every channel is counted, as above.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipelines._helpers import probe_forward
from pipelines.gating import ChannelGate

__all__ = ["Complexity", "count_macs", "layer_macs", "LayerCost", "MacsModel"]

_CHUNK = 64  # images per forward when counting expected MACs


@dataclass(frozen=True)
class Complexity:
    macs: int | float  # an int; a float (an expectation over inputs) for gated models given `inputs`
    params: int


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    per_image_outputs = output[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image_outputs * (module.in_channels // module.groups) * kh * kw
    return per_image_outputs * module.in_features  # nn.Linear


def _readers(model: nn.Module, name: str) -> list[nn.Module]:
    """The layers reading conv `name`'s input: itself, or a gate's conv and predictor."""
    module = model.get_submodule(name)
    return [module.conv, module.predictor] if isinstance(module, ChannelGate) else [module]


def _gated_macs(model: nn.Module, gates: list[ChannelGate], dense: dict[nn.Module, int], n: int) -> int:
    """Sum over the last forward's `n` images of each one's MACs, from the gates' recorded masks."""
    # layer -> [(kept channels per image, channels)]: each factor scales the layer's dense MACs.
    factors: dict[nn.Module, list[tuple[torch.Tensor, int]]] = {}
    folded = 0  # a skipped channel's fill, added to each reader's bias: one MAC per reader output
    for gate in gates:
        if gate.last_mask is None:
            continue
        channels = gate.conv.out_channels
        kept = gate.last_mask.sum(dim=1).cpu()
        factors.setdefault(gate.conv, []).append((kept, channels))
        factors.setdefault(gate.predictor, []).append((torch.full((n,), gate.predicted), channels))
        for name in gate.consumers:
            for layer in _readers(model, name):
                factors.setdefault(layer, []).append((kept, channels))
                if gate.fill is not None:
                    outputs = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
                    folded += int((channels - kept).sum()) * outputs
        for name in gate.followers:  # depthwise: MACs proportional to its channels, counted once
            factors.setdefault(model.get_submodule(name), []).append((kept, channels))
    total = folded
    for layer, macs in dense.items():
        numerator, denominator = torch.full((n,), macs, dtype=torch.int64), 1
        for kept, channels in factors.get(layer, []):
            numerator, denominator = numerator * kept, denominator * channels
        total += int((numerator // denominator).sum())  # exact: dense MACs are multiples of the channels
    return total


@torch.no_grad()
def _expected_macs(model: nn.Module, gates: list[ChannelGate], inputs: torch.Tensor | Iterable[torch.Tensor], image_size: int) -> float:
    dense: dict[nn.Module, int] = {}

    def record(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        dense[module] = _layer_macs(module, output)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(record) for m in layers]
    was_training = model.training
    model.eval()
    total, seen = 0, 0
    try:
        for batch in [inputs] if isinstance(inputs, torch.Tensor) else inputs:
            if batch.dim() != 4 or tuple(batch.shape[-2:]) != (image_size, image_size):
                raise ValueError(f"inputs must be N x C x {image_size} x {image_size}, got {tuple(batch.shape)}")
            for chunk in batch.split(_CHUNK):
                for gate in gates:
                    gate.last_mask = None
                model(chunk)
                total += _gated_macs(model, gates, dense, len(chunk))
                seen += len(chunk)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("inputs must hold at least one image")
    return total / seen


def layer_macs(model: nn.Module, *, image_size: int) -> dict[nn.Module, int]:
    """MACs per image of every nn.Conv2d and nn.Linear (all channels counted), in definition order."""
    macs: dict[nn.Module, int] = {}

    def add(module: nn.Module, output: torch.Tensor) -> None:
        macs[module] = macs.get(module, 0) + _layer_macs(module, output)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    probe_forward(model, layers, add, image_size=image_size)
    return {m: macs[m] for m in layers if m in macs}


def count_macs(model: nn.Module, *, image_size: int, inputs: torch.Tensor | Iterable[torch.Tensor] | None = None) -> Complexity:
    """MACs per image and parameters; with `inputs` (images, or batches of them) and gates, the
    expected MACs over those images."""
    params = sum(p.numel() for p in model.parameters())
    gates = [m for m in model.modules() if isinstance(m, ChannelGate)]
    if inputs is not None and gates:
        return Complexity(macs=_expected_macs(model, gates, inputs, image_size), params=params)
    return Complexity(macs=sum(layer_macs(model, image_size=image_size).values()), params=params)


@dataclass(frozen=True)
class LayerCost:
    """One layer's dense MACs and which groups' channels it reads and writes."""

    macs: int
    out_channels: int
    in_channels: int
    grouped: bool  # groups > 1 (depthwise): each output reads a fixed number of inputs
    # (group name, this layer's channels per group channel): pruning k channels of the group removes
    # k * that many of the layer's output (input) channels.
    writes: tuple[tuple[str, float], ...] = ()
    reads: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class MacsModel:
    """`count_macs` of the model pruned to given channel counts per group, without pruning it.

    Exact for structured channel pruning of plain, residual, depthwise and concatenating CNNs (a
    layer's MACs scale with its kept outputs and, ungrouped, its kept inputs); tests hold it to
    `count_macs` of the really pruned model. Cheap enough to evaluate hundreds of times (bisection).
    """

    layers: tuple[LayerCost, ...]
    channels: dict[str, int]  # each group's channels in the model the costs were read from

    @property
    def dense(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def __call__(self, counts: dict[str, int]) -> float:
        removed = {name: n - min(n, counts.get(name, n)) for name, n in self.channels.items()}
        total = 0.0
        for layer in self.layers:
            factor = 1 - sum(removed[g] * k for g, k in layer.writes) / layer.out_channels
            if not layer.grouped:
                factor *= 1 - sum(removed[g] * k for g, k in layer.reads) / layer.in_channels
            total += layer.macs * factor
        return total
