"""Filter-importance criteria: per-module channel scores, reduced per Torch-Pruning group.

A criterion maps a model (and, for data-driven ones, `ScoringData`) to `{module: 1-D scores}`,
one score per OUTPUT channel, higher = more important. Scores are meant to rank channels within
one group; only `bn_gamma` is comparable across layers, the rest have a per-layer scale.
Criteria never change weights, gradients, BN running statistics or any module's train/eval flag.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from pipelines._registry import Registry
from pipelines.data import Split, batches, normalize

__all__ = ["CRITERIA", "ScoringData", "module_scores", "group_scores", "drop_pruned_scores"]

Scores = dict[nn.Module, torch.Tensor]


@dataclass(frozen=True)
class ScoringData:
    train: Split
    batch_size: int = 32
    num_batches: int = 10  # train batches used by data-driven criteria
    seed: int = 0
    trajectory: dict[str, torch.Tensor] | None = None  # module name -> [epochs, *weight.shape], oldest first


Criterion = Callable[..., Scores]  # (model, *, data: ScoringData | None) -> Scores
CRITERIA: Registry[Criterion] = Registry("importance criterion")

_LAYERS = (nn.Conv2d, nn.Linear)
# Handlers that remove a module's OUTPUT channels; depthwise convs are included (MobileNet groups).
_OUT_HANDLERS = (
    tp.prune_conv_out_channels,
    tp.prune_depthwise_conv_out_channels,
    tp.prune_linear_out_channels,
    tp.prune_batchnorm_out_channels,
)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; restores every submodule's own flag (frozen BNs inside a training model too)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _train_batches(data: ScoringData | None, criterion: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if data is None:
        raise ValueError(f"importance criterion {criterion!r} needs ScoringData (train images); got data=None")
    stream = batches(data.train, batch_size=data.batch_size, shuffle=True, seed=data.seed)
    for step, (images, labels, _) in enumerate(stream):
        if step >= data.num_batches:
            break
        yield images, labels


def _l1_per_filter(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().flatten(1).sum(1).float()


@CRITERIA.register("l1", description="sum of |weight| per output filter of each Conv2d/Linear (Li et al. 2017)")
def _l1(model: nn.Module, *, data: ScoringData | None = None) -> Scores:
    return {m: _l1_per_filter(m.weight) for m in model.modules() if isinstance(m, _LAYERS)}


@CRITERIA.register("bn_gamma", description="|gamma| of each BatchNorm2d (network slimming, Liu et al. 2017); no data")
def _bn_gamma(model: nn.Module, *, data: ScoringData | None = None) -> Scores:
    """The only criterion whose scores are comparable across layers (one global cut works)."""
    return {m: m.weight.detach().abs().float() for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine}


@CRITERIA.register(
    "taylor",
    description="(sum_filter grad*w)^2 per Conv2d/Linear filter, mean over data.num_batches CE batches"
    " (Molchanov et al. 2019)",
)
def _taylor(model: nn.Module, *, data: ScoringData | None) -> Scores:
    """Computed in EVAL mode (BN uses running stats and does not update them), unlike the paper's train mode.

    Gradients come from `torch.autograd.grad`, so no `.grad` is touched; `requires_grad` is restored.
    """
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    weights = [m.weight for m in layers]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    sums = [torch.zeros(w.shape[0], device=w.device) for w in weights]
    steps = 0
    with _eval_mode(model), torch.enable_grad():
        try:
            for w in weights:
                w.requires_grad_(True)
            for images, labels in _train_batches(data, "taylor"):
                loss = F.cross_entropy(model(images), labels)
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for total, w, g in zip(sums, weights, grads):
                    if g is not None:
                        total += (g * w.detach()).flatten(1).sum(1).pow(2).float()
                steps += 1
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
    if steps == 0:
        raise ValueError("importance criterion 'taylor': the train split yielded no batches")
    return {m: total / steps for m, total in zip(layers, sums)}


def _feeds_batchnorm(model: nn.Module, layers: list[nn.Module], example: torch.Tensor) -> set[nn.Module]:
    """Layers whose output tensor is the direct input of a BatchNorm2d (one batch-1 probe forward)."""
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    feeding: set[nn.Module] = set()

    def record(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        outputs[id(output)] = (module, output)  # keep the tensor alive so its id stays unique

    def check(_module: nn.Module, inputs: tuple) -> None:
        hit = outputs.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            feeding.add(hit[0])

    handles = [m.register_forward_hook(record) for m in layers]
    handles += [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return feeding


@CRITERIA.register(
    "activation",
    description="mean relu(output) per channel of each BatchNorm2d and each Conv2d/Linear not feeding a BN,"
    " over data.num_batches train batches (Zhong et al. 2018)",
)
@torch.no_grad()
def _activation(model: nn.Module, *, data: ScoringData | None) -> Scores:
    """ReLU is applied whatever follows (ReLU6, a residual add, or nothing in a linear bottleneck).

    A conv feeding a BN gets no entry of its own: its channels are scored by that BN.
    """
    if data is None or len(data.train) == 0:
        raise ValueError("importance criterion 'activation' needs ScoringData with train images")
    layers = [m for m in model.modules() if isinstance(m, _LAYERS)]
    sums: Scores = {}
    counts: dict[nn.Module, int] = {}

    def accumulate(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        dims = [0] + list(range(2, output.dim()))  # everything but the channel axis
        relu = output.detach().float().clamp_min(0)
        sums[module] = sums.get(module, 0) + relu.sum(dims)
        counts[module] = counts.get(module, 0) + relu.numel() // relu.shape[1]

    with _eval_mode(model):
        feeding = _feeds_batchnorm(model, layers, normalize(data.train.images[:1]))
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        hooked = norms + [m for m in layers if m not in feeding]
        handles = [m.register_forward_hook(accumulate) for m in hooked]
        try:
            for images, _ in _train_batches(data, "activation"):
                model(images)
        finally:
            for handle in handles:
                handle.remove()
    if not counts:
        raise ValueError("importance criterion 'activation': the train split yielded no batches")
    return {m: sums[m] / counts[m] for m in hooked if m in counts}


def _unmarked(weight: torch.Tensor) -> torch.Tensor:
    l1 = _l1_per_filter(weight)
    return 1 + l1 / l1.max().clamp_min(1e-12)  # in [1, 2]


def _redundancy_scores(trajectory: torch.Tensor, weight: torch.Tensor, *, pair_fraction: float) -> torch.Tensor:
    """TASCNet marking: most similar pairs FIRST (their code sorted ascending, a bug); drop the smaller-L1 one."""
    n = trajectory.shape[1]
    scores = _unmarked(weight)
    l1 = scores.tolist()
    vectors = F.normalize(trajectory.detach().float().transpose(0, 1).reshape(n, -1), dim=1)
    first, second = torch.triu_indices(n, n, offset=1)
    similarity = (vectors @ vectors.T)[first, second]
    n_walk = math.ceil(round(pair_fraction * len(similarity), 6))  # 2/28 of 28 pairs is 2, not 3
    top = torch.argsort(similarity, descending=True, stable=True)[:n_walk]
    marked: list[int] = []
    is_marked = [False] * n
    for i, j in zip(first[top].tolist(), second[top].tolist()):
        if not (is_marked[i] or is_marked[j]):
            drop = j if l1[j] < l1[i] else i  # ties: the lower index
            is_marked[drop] = True
            marked.append(drop)
    for order, index in enumerate(marked):  # k-th marked -> (k + 1) / (M + 1), in (0, 1)
        scores[index] = (order + 1) / (len(marked) + 1)
    return scores


@CRITERIA.register(
    "trajectory",
    description="TASCNet redundancy (Basha et al. 2022): cosine similarity of filter weight trajectories;"
    " the most similar pair_fraction=0.05 of pairs mark their smaller-L1 member",
)
def _trajectory(model: nn.Module, *, data: ScoringData | None, pair_fraction: float = 0.05) -> Scores:
    """Marked filters score in (0, 1), earlier-marked lower; unmarked ones 1 + L1/max(L1) in [1, 2].

    Walking only the most similar `pair_fraction` of pairs (TASCNet's per-round 5%) matters: walking
    all of them would mark every filter but one. Layers without a trajectory get the unmarked L1 range.
    """
    if data is None or data.trajectory is None:
        raise ValueError("importance criterion 'trajectory' needs ScoringData with data.trajectory (weights per epoch)")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _LAYERS)}
    unknown = sorted(set(data.trajectory) - set(layers))
    if unknown:
        raise ValueError(f"trajectory names no Conv2d/Linear of the model: {unknown}")
    scores: Scores = {}
    for name, module in layers.items():
        trajectory = data.trajectory.get(name)
        if trajectory is None:
            scores[module] = _unmarked(module.weight)
            continue
        if trajectory.dim() < 2 or trajectory.shape[1:] != module.weight.shape:
            raise ValueError(
                f"trajectory[{name!r}] has shape {tuple(trajectory.shape)};"
                f" expected [epochs, {', '.join(map(str, module.weight.shape))}] (stale after pruning?)"
            )
        scores[module] = _redundancy_scores(trajectory, module.weight, pair_fraction=pair_fraction)
    return scores


def module_scores(model: nn.Module, criterion: str, *, data: ScoringData | None) -> Scores:
    """Per-module output-channel scores by criterion name; KeyError lists the valid names."""
    return CRITERIA.get(criterion)(model, data=data)


def group_scores(group: tp.dependency.Group, scores: Scores) -> torch.Tensor:
    """One score per group channel: the mean over the members (with scores) that prune output channels.

    `root_idxs` are channel indices of the ROOT layer, not positions: for a group built on a subset of
    channels (`idxs=[2, 6, 9]`) they are mapped to positions 0..2 (Torch-Pruning's own reduce would fail).
    The mean is per position; positions no member covers get the mean of the covered ones.
    """
    position = {r: k for k, r in enumerate(group[0].root_idxs)}
    total = torch.zeros(len(group[0].idxs))
    count = torch.zeros(len(group[0].idxs))
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        if module not in scores or handler not in _OUT_HANDLERS or any(r is None for r in item.root_idxs):
            continue
        values = scores[module].detach().cpu().float()
        pairs = [(i, position[r]) for i, r in zip(item.idxs, item.root_idxs) if r in position]
        if not pairs:
            continue
        idxs, slots = (torch.as_tensor(column, dtype=torch.long) for column in zip(*pairs))
        if int(idxs.max()) >= len(values):
            raise ValueError(
                f"scores for {type(module).__name__} have {len(values)} channels but the group needs index"
                f" {int(idxs.max())} (scores computed before pruning?)"
            )
        total.scatter_add_(0, slots, values[idxs])
        count.scatter_add_(0, slots, torch.ones(len(slots)))
    if not count.any():
        raise ValueError(f"no member of the group rooted at {group[0].dep.target.module!r} has scores")
    mean = total / count.clamp_min(1)
    return torch.where(count > 0, mean, mean[count > 0].mean())


def drop_pruned_scores(scores: Scores, group: tp.dependency.Group) -> None:
    """Remove from `scores`, in place, the channels `group` is about to prune, so that the scores of
    a module several groups share (a BN after a concatenation) keep lining up with its channels."""
    for item in group:
        module = item.dep.target.module
        if module in scores and item.dep.handler in _OUT_HANDLERS:
            keep = torch.ones(len(scores[module]), dtype=torch.bool, device=scores[module].device)
            keep[torch.as_tensor(item.idxs, dtype=torch.long, device=keep.device)] = False
            scores[module] = scores[module][keep]
