"""The frozen ImageNet source network and the taps that feature distillation needs.

Feature terms (DELTA, AFD) compare the student's and the source's feature maps at the *stage
outputs*: for each downsampling factor, the last-run module of the shallowest nesting depth at
that stride among BatchNorm layers and blocks containing one (`layer1`..`layer4` for ResNets, the last block of each resolution for MobileNetV2).
After pruning, the student's map has fewer channels; `kept_channels` says which source channels
they are, traced through pruning by a follower model whose BatchNorm `running_mean` holds the
channel indices (pruning slices it exactly like the weights); the classifier's input channels are
traced the same way, in the first row of its weight (`classifier_inputs`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pipelines._helpers import probe_forward
from pipelines.config import ModelConfig
from pipelines.models import build_model, head_name

__all__ = ["stage_outputs", "stage_widths", "index_tracer", "kept_channels", "classifier_inputs", "FeatureTap", "SourceNet"]

_PROBE = 224  # divisible by every stride of an ImageNet CNN


def stage_outputs(model: nn.Module) -> list[str]:
    """Module names of the stage outputs (see the module docstring), in execution order."""
    order: list[tuple[str, int]] = []
    # Only modules whose channels can be traced through pruning: BN layers or blocks holding one.
    names = {m: n for n, m in model.named_modules() if n and any(isinstance(x, nn.BatchNorm2d) for x in m.modules())}

    def record(module: nn.Module, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] > 1:
            order.append((names[module], _PROBE // output.shape[-1]))

    probe_forward(model, names, record, image_size=_PROBE)
    best: dict[int, tuple[int, int, str]] = {}  # stride -> (depth, -position, name)
    for position, (name, stride) in enumerate(order):
        key = (name.count("."), -position, name)
        if stride not in best or key < best[stride]:
            best[stride] = key
    return [best[s][2] for s in sorted(best) if s > 1]


def _last_norm(model: nn.Module, name: str) -> str:
    module = model.get_submodule(name)
    norms = [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if isinstance(module, nn.BatchNorm2d):
        norms.append(name)
    if not norms:
        raise ValueError(f"stage output {name!r} has no BatchNorm2d to trace its channels through pruning")
    return norms[-1]


def stage_widths(model: nn.Module, layers: list[str]) -> dict[str, int]:
    """The channels of each stage output `layers` (of an unpruned model: the source's widths)."""
    return {name: model.get_submodule(_last_norm(model, name)).num_features for name in layers}


def _classifier_linear(model: nn.Module) -> nn.Linear:
    return next(m for m in model.get_submodule(head_name(model)).modules() if isinstance(m, nn.Linear))


def index_tracer(model: nn.Module) -> nn.Module:
    """A copy whose BN running means, and the classifier weight's first row, are channel indices;
    prune it as a follower of `model`. Its other weights are `model`'s (e.g. L2-SP's anchors)."""
    tracer = copy.deepcopy(model)
    for module in tracer.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean = torch.arange(module.num_features, dtype=torch.float32)
    with torch.no_grad():
        linear = _classifier_linear(tracer)
        linear.weight[0] = torch.arange(linear.in_features, dtype=linear.weight.dtype)
    return tracer


def classifier_inputs(tracer: nn.Module) -> torch.Tensor:
    """Original indices of the classifier input channels that the traced model still has."""
    return _classifier_linear(tracer).weight[0].detach().round().long()


def kept_channels(tracer: nn.Module, layer: str) -> torch.Tensor:
    """Original indices of the channels that the stage output `layer` still has."""
    return tracer.get_submodule(_last_norm(tracer, layer)).running_mean.round().long()


class FeatureTap:
    """Forward hooks that keep the latest outputs of named layers (and the model's input)."""

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.input: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(lambda _m, args: setattr(self, "input", args[0]))]
        for name in layers:
            self._handles.append(
                model.get_submodule(name).register_forward_hook(
                    lambda _m, _i, out, name=name: self.outputs.__setitem__(name, out)
                )
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class SourceNet:
    """The frozen pretrained ImageNet classifier: 1000-way logits and stage-output features."""

    def __init__(self, config: ModelConfig, *, layers: list[str], device: torch.device | str = "cpu") -> None:
        self.model = build_model(config, num_classes=None).eval().to(device, memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = layers
        self._tap = FeatureTap(self.model, layers)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(images)
        return logits, dict(self._tap.outputs)
