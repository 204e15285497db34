"""Save and load compact models without pickle: safetensors weights + a JSON channel spec.

The channel spec records, for every Conv2d, Linear, BatchNorm and LayerNorm layer, the widths it
has after pruning, and the builder arguments a rebuild needs (`pipelines.models.recorded_kwargs`). Loading builds the plain torchvision architecture, swaps in layers of the recorded
widths, and loads the weights; Torch-Pruning is not needed at load time.

Gated models (`pipelines.gating`): `layers` still describes the plain architecture (a gate's conv
and BN under their original names; its predictor is not listed), and a `gates` entry (absent for
ungated models) maps each gated conv to its `"type": "Gate"` record: BN name, density, predictor
sizes, static and pruned channels. Loading re-adds the gates before loading the weights.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.gating import ChannelGate, add_gates, gate_spec, named_gates
from pipelines.models import recorded_kwargs, unweighted_kwargs

__all__ = ["channel_spec", "save_model", "load_model", "export_onnx", "ModelFolderError", "MODEL_FILE", "SPEC_FILE", "ONNX_FILE", "DATA_SUFFIXES"]

MODEL_FILE = "model.safetensors"
SPEC_FILE = "channel_spec.json"
ONNX_FILE = "model.onnx"
SPEC_VERSION = 1
# What a model folder may hold besides hidden files and sub-folders: formats that are data, never
# code (the weights, the spec, the config, per-class reports, ONNX, notes). Anything else (a pickle
# such as model.pt, weights.pkl or pytorch_model.bin) makes `load_model` refuse the folder.
DATA_SUFFIXES = (".safetensors", ".json", ".yaml", ".yml", ".csv", ".onnx", ".txt", ".md")


class ModelFolderError(ValueError):
    """A model folder `load_model` refuses: a file that is not one of its data formats, or its own
    files missing or unreadable. The message names the file."""


def _widths(module: nn.Module) -> dict[str, int | str] | None:
    if isinstance(module, nn.Conv2d):
        return {
            "type": "Conv2d",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "groups": module.groups,
        }
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.BatchNorm2d):
        return {"type": "BatchNorm2d", "num_features": module.num_features}
    if isinstance(module, nn.LayerNorm):
        return {"type": "LayerNorm", "normalized_shape": list(module.normalized_shape)}
    return None


def channel_spec(model: nn.Module) -> dict[str, dict[str, int | str]]:
    """Layer name -> widths, for the plain architecture (a gate's conv and BN under their own names)."""
    spec: dict[str, dict[str, int | str]] = {}
    inside_gates: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside_gates and name.startswith(inside_gates):
            continue
        if isinstance(module, ChannelGate):
            spec[name], spec[module.bn_name] = _widths(module.conv), _widths(module.bn)
            inside_gates += (name + ".",)
        elif (widths := _widths(module)) is not None:
            spec[name] = widths
    return spec


def save_model(model: nn.Module, directory: str | Path, *, arch: str, metadata: dict[str, Any]) -> Path:
    """Write `model.safetensors` and `channel_spec.json` (arch, layer widths, `metadata`) to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, directory / MODEL_FILE)
    spec = {**metadata, "version": SPEC_VERSION, "arch": arch, "builder": recorded_kwargs(model), "layers": channel_spec(model)}
    gates = gate_spec(model)
    if gates:
        spec["gates"] = gates
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
    if isinstance(module, nn.LayerNorm):  # kept, with its class (ConvNeXt's LayerNorm2d), at the recorded shape
        module.normalized_shape = tuple(int(n) for n in widths["normalized_shape"])
        if module.elementwise_affine:
            module.weight = nn.Parameter(torch.empty(module.normalized_shape))
            module.bias = nn.Parameter(torch.empty(module.normalized_shape)) if module.bias is not None else None
        return module
    return nn.BatchNorm2d(int(widths["num_features"]), eps=module.eps, momentum=module.momentum)


def _resize_loose_parameters(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Parameters outside any listed layer (ConvNeXt's per-channel layer scale) take their saved shape."""
    for name, parameter in list(model.named_parameters()):
        if name in saved and saved[name].shape != parameter.shape:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, leaf, nn.Parameter(torch.empty(saved[name].shape)))


def _check_folder(directory: Path) -> None:
    """Refuse a folder holding a file no slimtune model has: nothing here would load it, but a
    pickle beside the weights (model.pt, *.pkl) runs code in whoever loads it with torch.load."""
    if not directory.is_dir():
        raise ModelFolderError(f"{directory}: not a folder; a model folder holds {MODEL_FILE} and {SPEC_FILE}")
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() not in DATA_SUFFIXES:
            raise ModelFolderError(
                f"{path}: refusing to load a model folder that holds this file; slimtune models are"
                f" {', '.join(DATA_SUFFIXES)} files only (never pickles, which run code when loaded): remove it"
            )
    for name in (SPEC_FILE, MODEL_FILE):
        if not (directory / name).is_file():
            raise ModelFolderError(f"{directory / name}: missing; a model folder holds {MODEL_FILE} and {SPEC_FILE}")


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the compact model saved in `directory`; returns (model in eval mode, spec).

    Raises ModelFolderError, naming the file, for a folder with a file of another format than
    `DATA_SUFFIXES` (a pickle) or an unreadable spec or weights file."""
    directory = Path(directory)
    _check_folder(directory)
    try:
        spec = json.loads((directory / SPEC_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{directory / SPEC_FILE}: not a channel spec (invalid JSON: {error})") from None
    layers = spec["layers"]
    head = next(name for name in reversed(layers) if layers[name]["type"] == "Linear")
    model = torchvision.models.get_model(
        spec["arch"], weights=None, num_classes=int(layers[head]["out_features"]), **unweighted_kwargs(spec["arch"], spec.get("builder"))
    )
    for name, widths in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _resized(getattr(parent, child), widths))
    gates = spec.get("gates", {})
    if gates:
        add_gates(model, {name: gate["density"] for name, gate in gates.items()}, layers=list(gates))
        for name, gate in named_gates(model).items():
            if gate.bn_name != gates[name]["bn"]:
                raise ValueError(f"{directory}: gate {name} found BN {gate.bn_name}, the spec says {gates[name]['bn']}")
    try:
        saved = load_file(directory / MODEL_FILE)
    except Exception as error:  # safetensors' own error type; a pickle renamed .safetensors lands here
        raise ModelFolderError(f"{directory / MODEL_FILE}: not a safetensors file ({type(error).__name__}: {error})") from None
    _resize_loose_parameters(model, saved)
    model.load_state_dict(saved)
    return model.eval(), spec


def export_onnx(model: nn.Module, path: str | Path, *, spec: dict[str, Any]) -> Path:
    """`model` as one ONNX file with a dynamic batch axis; normalisation, class names and input
    size in its metadata (`mean`, `std`, `classes`, `image_size`, JSON). A gated model is computed
    densely by an ONNX runtime (its MACs saving needs slimtune's gates).

    Exported with torch's TorchScript-based exporter, 6-45x faster here than the dynamo exporter
    for the same graph (the same convolutions with BatchNorm folded in); a model it cannot trace
    falls back to the dynamo exporter."""
    import warnings

    import onnx

    path = Path(path)
    size = int(spec["image_size"])
    example = torch.zeros(2, 3, size, size)
    net = copy.deepcopy(model).eval().cpu()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # its deprecation notice and the tracer's notes
            torch.onnx.export(
                net, (example,), str(path), input_names=["images"], output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False,
            )  # fmt: skip
    except Exception:
        path.unlink(missing_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on data-dependent shapes
            program = torch.onnx.export(
                net, (example,), input_names=["images"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
            )  # fmt: skip
        program.save(str(path))
    proto = onnx.load(str(path))
    for key in ("mean", "std", "classes", "image_size"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(spec[key])
    onnx.save(proto, str(path))
    return path
