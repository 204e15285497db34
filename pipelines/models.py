"""Build torchvision classifiers by name, with pretrained weights through torchvision's weights API."""
from __future__ import annotations

import torchvision
from torch import nn

from pipelines.config import ModelConfig

__all__ = [
    "available_archs", "available_weights", "build_model", "head_name", "unweighted_kwargs", "recorded_kwargs",
    "WeightsUnavailableError", "TESTED_ARCHS",
]

# Each is pruned, fine-tuned a step, exported, reloaded and MAC-counted in the test suite; any
# other torchvision classifier goes through `pipelines.preflight` before its teacher is trained.
TESTED_ARCHS = (
    "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
    "vgg11_bn", "densenet121", "googlenet", "convnext_tiny", "regnet_y_400mf",
)
# Built without weights, these get what their pretrained builds have: no auxiliary heads (slimtune
# never trains or exports them) and no slow initialisation (overwritten by the weights anyway).
_UNWEIGHTED_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}
# Set by some pretrained builders (googlenet's input transform); recorded with an exported model.
_RECORDED_ATTRIBUTES = ("transform_input",)


class WeightsUnavailableError(RuntimeError):
    """The pretrained weights could not be loaded (typically: offline and not in torch's hub cache)."""


def available_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_weights(arch: str) -> list[str]:
    return [w.name for w in torchvision.models.get_model_weights(arch)]


def unweighted_kwargs(arch: str, recorded: dict | None = None) -> dict:
    """Builder arguments for `arch` without weights, plus what `recorded_kwargs` kept of a model."""
    return {**_UNWEIGHTED_KWARGS.get(arch, {}), **(recorded or {})}


def recorded_kwargs(model: nn.Module) -> dict:
    """The builder arguments a rebuild without weights needs to compute what `model` computes."""
    return {name: getattr(model, name) for name in _RECORDED_ATTRIBUTES if hasattr(model, name)}


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
        model = torchvision.models.get_model(config.arch, weights=weights, **({} if weights else unweighted_kwargs(config.arch)))
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
