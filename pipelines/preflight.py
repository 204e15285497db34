"""Check, in seconds and before any teacher is trained, that slimtune can handle an architecture:
build it (random init, a new classifier) -> find its prunable groups -> prune every group to half -> one training
step -> export -> reload -> the same logits at the search's image size."""
from __future__ import annotations

import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipelines.config import ModelConfig
from pipelines.export import load_model, save_model
from pipelines.macs import count_macs
from pipelines.models import build_model
from pipelines.prune import prunable_groups, prune_to_ratios

__all__ = ["ArchitectureError", "check_architecture"]


class ArchitectureError(ValueError):
    """The architecture fails one step of the pre-flight; the message names the step."""


def check_architecture(arch: str, *, image_size: int, num_classes: int) -> None:
    torch.manual_seed(0)
    step = "build it with a new classifier (its last nn.Linear)"
    try:
        model = build_model(ModelConfig(arch=arch, weights=None), num_classes=num_classes)
        step = "have no attention layers"  # their MACs are not counted; tracing them can exhaust memory
        attention = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        if attention:
            raise ValueError(f"it has {', '.join(attention)}")
        step = "trace its prunable channel groups"
        groups = prunable_groups(model, image_size=image_size)
        step = "prune every group to half its channels"
        prune_to_ratios(model, {g.name: 0.5 for g in groups}, image_size=image_size)
        step = "train one step"
        images = torch.randn(2, 3, image_size, image_size)
        model.train()
        logits = model(images)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"its training-mode output is a {type(logits).__name__}, not a tensor of logits")
        torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)).backward()
        step = "export and reload"
        model.eval()
        with tempfile.TemporaryDirectory(prefix="slimtune-preflight-") as directory:
            save_model(model, directory, arch=arch, metadata={})
            reloaded, _ = load_model(directory)
        step = "give the same logits after reloading"
        with torch.no_grad():
            if not torch.allclose(model(images), reloaded(images), atol=1e-5):
                raise ValueError("the reloaded model computes other logits")
        step = "count its MACs"  # conv and linear layers only: attention's matrix products would be missed
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model(images[:1])
        counted, expected = count_macs(model, image_size=image_size).macs, flops.get_total_flops() // 2
        if counted != expected:
            raise ValueError(f"slimtune counts {counted} MACs, torch's FlopCounterMode {expected} (attention or other matrix products)")
    except Exception as error:
        raise ArchitectureError(f"{arch} fails the pre-flight at '{step}' ({type(error).__name__}: {str(error).splitlines()[0][:200]})") from error
