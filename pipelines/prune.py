"""Structural pruning with Torch-Pruning's dependency graph, one keep ratio per dependency group.

Channels tied together by a residual add, a depthwise convolution or a concatenation form one
group: they share one keep ratio and one index set. Groups that pass through a grouped (not
depthwise) convolution are not prunable: they stay whole. A group is named after the first layer (in
the model's definition order) whose output channels it prunes, e.g. `features.2.conv.0.0`; the
same names appear in the space YAML, in MLflow params and in the exported channel spec.
A group's *stage* is `stride_<s>`, s being the downsampling of that layer's output w.r.t. the
input at 224 px (`classifier` for hidden Linear layers): a definition that works for any CNN without a per-architecture table.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from pipelines._helpers import probe_forward
from pipelines.device import device_of
from pipelines.importance import drop_pruned_scores, group_scores, module_scores
from pipelines.macs import LayerCost, MacsModel, layer_macs
from pipelines.models import head_name

__all__ = [
    "Group",
    "prunable_groups",
    "group_scores_by_name",
    "prune_to_counts",
    "prune_to_ratios",
    "kept_channels",
    "layer_stages",
    "macs_model",
]

_WRITES = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels)
_READS = (tp.prune_conv_in_channels, tp.prune_depthwise_conv_in_channels, tp.prune_linear_in_channels)

@dataclass(frozen=True)
class Group:
    name: str
    channels: int
    stage: str
    residual: bool = False  # the channels pass through a residual add


def _dependency_graph(model: nn.Module, image_size: int) -> tp.DependencyGraph:
    was_training = model.training  # build_dependency leaves the model in eval mode
    try:
        example = torch.zeros(1, 3, image_size, image_size, device=device_of(model))
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)


def _grouped(module: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (whose groups hold several channels)."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels


def _named_groups(model: nn.Module, graph: tp.DependencyGraph) -> list[tuple[str, tp.dependency.Group]]:
    order = {module: i for i, (_, module) in enumerate(model.named_modules())}
    names = {module: name for name, module in model.named_modules()}
    head = model.get_submodule(head_name(model))
    named = []
    for group in graph.get_all_groups(ignored_layers=[head], root_module_types=(nn.Conv2d, nn.Linear)):
        if any(_grouped(dep.target.module) for dep, _ in group):
            continue  # kept whole: Torch-Pruning's per-channel pruning breaks the groups of a grouped conv (RegNet's)
        pruned_outputs = [
            dep.target.module
            for dep, _ in group
            if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
        ]
        first = min(pruned_outputs or [group[0].dep.target.module], key=order.__getitem__)
        named.append((names[first], group))
    named.sort(key=lambda item: order[model.get_submodule(item[0])])
    return named


def layer_stages(model: nn.Module, layer_names: list[str]) -> dict[str, str]:
    names = {model.get_submodule(name): name for name in layer_names}
    stages: dict[str, str] = {}
    # Probe at 224 px, divisible by every stride of an ImageNet CNN, so labels do not depend on the
    # (possibly tiny, possibly odd) training size, where rounding would merge or mislabel stages.
    probe_size = 224

    def record(module: nn.Module, output: torch.Tensor) -> None:
        # A Linear's output has no spatial size: such groups form the `classifier` stage.
        stages[names[module]] = f"stride_{probe_size // output.shape[-1]}" if output.dim() == 4 else "classifier"

    probe_forward(model, names, record, image_size=probe_size)
    return stages


def _is_residual(group: tp.dependency.Group) -> bool:
    """The group's channels pass through an element-wise add (Torch-Pruning records it as an op node)."""
    for item in group:
        grad_fn = getattr(item.dep.target.module, "_grad_fn", None)
        if isinstance(grad_fn, str) and grad_fn.startswith("AddBackward"):
            return True
    return False


def prunable_groups(model: nn.Module, *, image_size: int) -> list[Group]:
    """The model's prunable groups in definition order (the classifier's outputs are never pruned)."""
    named = _named_groups(model, _dependency_graph(model, image_size))
    stages = layer_stages(model, [name for name, _ in named])
    return [
        Group(name=name, channels=len(group[0].idxs), stage=stages[name], residual=_is_residual(group))
        for name, group in named
    ]


def macs_model(model: nn.Module, *, image_size: int) -> MacsModel:
    """The model's MACs as a function of the channels each prunable group keeps (see MacsModel)."""
    named = _named_groups(model, _dependency_graph(model, image_size))
    writes: dict[nn.Module, dict[str, float]] = {}
    reads: dict[nn.Module, dict[str, float]] = {}
    for name, group in named:
        channels = len(group[0].idxs)
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            table = writes if handler in _WRITES else reads if handler in _READS else None
            if table is not None:
                table.setdefault(module, {})[name] = len(item.idxs) / channels
    layers = []
    for module, macs in layer_macs(model, image_size=image_size).items():
        is_conv = isinstance(module, nn.Conv2d)
        layers.append(
            LayerCost(
                macs=macs,
                out_channels=module.out_channels if is_conv else module.out_features,
                in_channels=module.in_channels if is_conv else module.in_features,
                grouped=is_conv and module.groups > 1,
                writes=tuple(writes.get(module, {}).items()),
                reads=tuple(reads.get(module, {}).items()),
            )
        )
    return MacsModel(layers=tuple(layers), channels={name: len(group[0].idxs) for name, group in named})


def kept_channels(channels: int, ratio: float) -> int:
    """Channels a group keeps at `ratio`: rounded, and never fewer than one."""
    return max(1, min(channels, round(channels * ratio)))


def group_scores_by_name(model: nn.Module, scores: dict[nn.Module, torch.Tensor], *, image_size: int) -> dict[str, torch.Tensor]:
    """One score per channel of every prunable group, from per-module scores (see pipelines.importance)."""
    return {name: group_scores(group, scores) for name, group in _named_groups(model, _dependency_graph(model, image_size))}


def prune_to_counts(
    model: nn.Module,
    keep: dict[str, int],
    *,
    image_size: int,
    scores: dict[nn.Module, torch.Tensor],
    followers: Sequence[nn.Module] = (),
) -> nn.Module:
    """Physically remove the lowest-scoring channels so that each group keeps `keep[name]`, in place.

    `scores` are per-module output-channel scores of `model` (pipelines.importance). `followers`
    are models of the same architecture and current shapes that lose exactly the same channels
    (e.g. the pretrained weights, for L2-SP anchors). Groups absent from `keep` stay whole;
    unknown names raise KeyError.
    """
    graph = _dependency_graph(model, image_size)
    named = _named_groups(model, graph)
    unknown = set(keep) - {name for name, _ in named}
    if unknown:
        raise KeyError(f"no prunable group named {sorted(unknown)}; groups: {[name for name, _ in named]}")
    module_names = {module: name for name, module in model.named_modules()}
    follower_graphs = [(f, _dependency_graph(f, image_size)) for f in followers]
    scores = dict(scores)  # kept aligned with the live model below; the caller's stay as they were
    for name, group in named:
        channels = len(group[0].idxs)
        n_prune = channels - max(1, min(channels, keep.get(name, channels)))
        if n_prune <= 0:
            continue
        # Re-derive the group now: pruning an earlier group (e.g. one branch of a concatenation)
        # shifts the channel positions that the group collected before any pruning still holds.
        root = group[0].dep
        current = graph.get_pruning_group(root.target.module, root.handler, idxs=list(range(channels)))
        drop = torch.argsort(group_scores(current, scores))[:n_prune].tolist()
        pruned = graph.get_pruning_group(root.target.module, root.handler, idxs=drop)
        drop_pruned_scores(scores, pruned)
        pruned.prune()
        root_name = module_names[root.target.module]
        for follower, follower_graph in follower_graphs:
            follower_graph.get_pruning_group(follower.get_submodule(root_name), root.handler, idxs=drop).prune()
    return model


def prune_to_ratios(
    model: nn.Module,
    keep_ratios: dict[str, float],
    *,
    image_size: int,
    criterion: str = "l1",
    scores: dict[nn.Module, torch.Tensor] | None = None,
    followers: Sequence[nn.Module] = (),
) -> nn.Module:
    """`prune_to_counts` with each group keeping `kept_channels(current channels, ratio)`.

    Without `scores`, the data-free `criterion` (l1 or bn_gamma) ranks the channels.
    """
    graph = _dependency_graph(model, image_size)
    current = {name: len(group[0].idxs) for name, group in _named_groups(model, graph)}
    unknown = set(keep_ratios) - set(current)
    if unknown:
        raise KeyError(f"no prunable group named {sorted(unknown)}; groups: {list(current)}")
    keep = {name: kept_channels(current[name], ratio) for name, ratio in keep_ratios.items()}
    if scores is None:
        scores = module_scores(model, criterion, data=None)
    return prune_to_counts(model, keep, image_size=image_size, scores=scores, followers=followers)
