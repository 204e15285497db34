"""Build torchvision classifiers by name, with pretrained weights through torchvision's weights API."""
from __future__ import annotations

import torchvision
from torch import nn

from pipelines.config import ModelConfig

__all__ = ["available_archs", "available_weights", "build_model", "head_name", "WeightsUnavailableError"]


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights could not be loaded (typically: offline and not in torch's hub cache)."""


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_weights(arch: str) -> list[str]:
    return [w.name for w in torchvision.models.get_model_weights(arch)]


def head_name(model: nn.Module) -> str:
    """Name of the classifier: the last nn.Linear in definition order (never pruned)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return linears[-1]


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def build_model(config: ModelConfig, *, num_classes: int | None) -> nn.Module:
    """The torchvision model `config.arch` with its pretrained weights and a new `num_classes` head
    (`num_classes=None` keeps the pretrained classifier: the source network)."""
    weights = None
    if config.weights is not None:
        weights = torchvision.models.get_model_weights(config.arch)[config.weights]
    try:
        model = torchvision.models.get_model(config.arch, weights=weights)
    except OSError as error:  # urllib's URLError is an OSError: offline without a cached file
        raise WeightsUnavailableError(
            f"model.weights: cannot load {config.arch} {config.weights} offline ({error}); "
            f"put {weights.url.rsplit('/', 1)[-1]} into torch's hub cache (`make weights` does this for mobilenet_v2)"
        ) from error
    if num_classes is None:
        return model
    head = head_name(model)
    old = model.get_submodule(head)
    _replace_module(model, head, nn.Linear(old.in_features, num_classes))
    return model
