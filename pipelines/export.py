"""Save and load compact models without pickle: safetensors weights + a JSON channel spec.

The channel spec records, for every Conv2d, Linear and BatchNorm layer, the widths it has after
pruning. Loading builds the plain torchvision architecture, swaps in layers of the recorded
widths, and loads the weights; Torch-Pruning is not needed at load time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["channel_spec", "save_model", "load_model", "MODEL_FILE", "SPEC_FILE"]

MODEL_FILE = "model.safetensors"
SPEC_FILE = "channel_spec.json"
SPEC_VERSION = 1


def channel_spec(model: nn.Module) -> dict[str, dict[str, int | str]]:
    spec: dict[str, dict[str, int | str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            spec[name] = {
                "type": "Conv2d",
                "in_channels": module.in_channels,
                "out_channels": module.out_channels,
                "groups": module.groups,
            }
        elif isinstance(module, nn.Linear):
            spec[name] = {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features}
        elif isinstance(module, nn.BatchNorm2d):
            spec[name] = {"type": "BatchNorm2d", "num_features": module.num_features}
    return spec


def save_model(model: nn.Module, directory: str | Path, *, arch: str, metadata: dict[str, Any]) -> Path:
    """Write `model.safetensors` and `channel_spec.json` (arch, layer widths, `metadata`) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, directory / MODEL_FILE)
    spec = {**metadata, "version": SPEC_VERSION, "arch": arch, "layers": channel_spec(model)}
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    return directory


def _resized(module: nn.Module, widths: dict[str, int | str]) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(
            int(widths["in_channels"]),
            int(widths["out_channels"]),
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=int(widths["groups"]),
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
    if isinstance(module, nn.Linear):
        return nn.Linear(int(widths["in_features"]), int(widths["out_features"]), bias=module.bias is not None)
    return nn.BatchNorm2d(int(widths["num_features"]), eps=module.eps, momentum=module.momentum)


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the compact model saved in `directory`; returns (model in eval mode, spec)."""
    directory = Path(directory)
    spec = json.loads((directory / SPEC_FILE).read_text())
    layers = spec["layers"]
    head = next(name for name in reversed(layers) if layers[name]["type"] == "Linear")
    model = torchvision.models.get_model(spec["arch"], weights=None, num_classes=int(layers[head]["out_features"]))
    for name, widths in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _resized(getattr(parent, child), widths))
    model.load_state_dict(load_file(directory / MODEL_FILE))
    return model.eval(), spec
