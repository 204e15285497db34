"""Budget parametrisations: every one ends as a number of channels to keep per group.

So MACs are always computed one way, on the physically pruned model, whatever knob produced it.
`target` is the budget-targeted one (AMC's action wall, FastNAS's bisection): a MACs target plus an
allocation shape, the shape scaled until the pruned model's MACs meet the target.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipelines._registry import Registry
from pipelines.macs import MacsModel
from pipelines.prune import Group, kept_channels

__all__ = ["BUDGETS", "BudgetInputs", "keep_counts", "allocation_weights", "meet_target", "uniform_keep_ratio", "TARGET_KNOBS"]

TARGET_KNOBS = ("target_macs", "depth_tilt", "residual_tilt")


@dataclass(frozen=True)
class BudgetInputs:
    groups: list[Group]  # the dense network's groups, in definition order
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # per-group channel scores (theta, global_percentile)
    macs: MacsModel | None = None  # of the dense network (target)
    ceiling: dict[str, int] | None = None  # channels each group has now (a warm-started student): never exceeded


Parametrisation = Callable[[BudgetInputs, dict[str, float]], dict[str, int]]
BUDGETS: Registry[Parametrisation] = Registry("budget parametrisation")


@BUDGETS.register("group", description="one keep ratio per dependency group (AMC-style); knobs: keep.<group>")
def _per_group(inputs: BudgetInputs, knobs: dict[str, float]) -> dict[str, int]:
    return {g.name: kept_channels(g.channels, knobs[g.name]) for g in inputs.groups}


@BUDGETS.register("stage", description="one keep ratio per stage (groups at one stride); knobs: keep.<stage>")
def _per_stage(inputs: BudgetInputs, knobs: dict[str, float]) -> dict[str, int]:
    return {g.name: kept_channels(g.channels, knobs[g.stage]) for g in inputs.groups}


@BUDGETS.register(
    "theta",
    description="Zhong et al. 2018: per layer, prune the channels inside the lowest cumulative share theta of the scores; knob: theta",
)
def _theta(inputs: BudgetInputs, knobs: dict[str, float]) -> dict[str, int]:
    theta = knobs["theta"]
    keep = {}
    for g in inputs.groups:
        ordered = inputs.scores[g.name].clamp(min=0).sort().values
        share = ordered.cumsum(0) / ordered.sum().clamp(min=1e-12)
        pruned = int((share <= theta).sum())
        keep[g.name] = max(1, g.channels - pruned)
    return keep


@BUDGETS.register(
    "global_percentile",
    description="network slimming: one global cut of the criterion scores across all groups; knob: percentile (fraction cut)",
)
def _global_percentile(inputs: BudgetInputs, knobs: dict[str, float]) -> dict[str, int]:
    everything = torch.cat([inputs.scores[g.name].float() for g in inputs.groups])
    threshold = torch.quantile(everything, knobs["percentile"])
    return {g.name: max(1, int((inputs.scores[g.name] > threshold).sum())) for g in inputs.groups}


def allocation_weights(groups: list[Group], *, depth_tilt: float, residual_tilt: float) -> dict[str, float]:
    """Relative keep ratios: log-linear in depth (first group -tilt/2, last +tilt/2) and, for the
    groups on a residual stream, `residual_tilt` above the others (both 0: a uniform ratio)."""
    last = max(1, len(groups) - 1)
    residual_share = sum(g.residual for g in groups) / len(groups)
    return {
        g.name: math.exp(depth_tilt * (i / last - 0.5) + residual_tilt * (float(g.residual) - residual_share))
        for i, g in enumerate(groups)
    }


def _bisect_scale(counts: Callable[[float], dict[str, int]], macs: MacsModel, goal: float, high: float) -> tuple[float, dict[str, int]]:
    """The scale in [0, high] whose counts' MACs come closest to `goal` (MACs rise with the scale)."""
    low = 0.0
    best = (high, counts(high))
    best_miss = abs(macs(best[1]) - goal)
    for _ in range(50):  # MACs rise in steps of one channel; 50 halvings resolve every step
        mid = (low + high) / 2
        candidate = counts(mid)
        achieved = macs(candidate)
        if abs(achieved - goal) < best_miss:
            best, best_miss = (mid, candidate), abs(achieved - goal)
        if achieved > goal:
            high = mid
        else:
            low = mid
    return best


def meet_target(
    groups: list[Group], weights: dict[str, float], *, macs: MacsModel, target: float, ceiling: dict[str, int] | None = None
) -> dict[str, int]:
    """Channels per group, keep ratio = min(1, s * weight), with the scale s bisected so that the
    pruned MACs come closest to `target` (a fraction of the dense MACs). Below the smallest reachable
    MACs (one channel per group, or the ceiling) it returns that smallest model."""
    cap = ceiling or {}

    def counts(scale: float) -> dict[str, int]:
        return {g.name: min(cap.get(g.name, g.channels), kept_channels(g.channels, min(1.0, scale * weights[g.name]))) for g in groups}

    # At scale 1 / min(weight) every group keeps all it may.
    return _bisect_scale(counts, macs, target * macs.dense, high=1.0 / min(weights.values()))[1]


def uniform_keep_ratio(groups: list[Group], *, macs: MacsModel, target: float) -> float:
    """The one keep ratio for every group whose pruned MACs come closest to `target`."""
    return _bisect_scale(lambda r: {g.name: kept_channels(g.channels, r) for g in groups}, macs, target * macs.dense, high=1.0)[0]


@BUDGETS.register(
    "target",
    description="a MACs target (fraction of the dense model) met by scaling an allocation shape; knobs: target_macs,"
    " depth_tilt (log keep ratio from the first to the last group), residual_tilt (residual-stream groups vs the rest)",
)
def _target(inputs: BudgetInputs, knobs: dict[str, float]) -> dict[str, int]:
    if inputs.macs is None:
        raise ValueError("the target parametrisation needs BudgetInputs.macs (pipelines.prune.macs_model of the dense model)")
    weights = allocation_weights(inputs.groups, depth_tilt=knobs.get("depth_tilt", 0.0), residual_tilt=knobs.get("residual_tilt", 0.0))
    return meet_target(inputs.groups, weights, macs=inputs.macs, target=knobs["target_macs"], ceiling=inputs.ceiling)


def keep_counts(parametrisation: str, inputs: BudgetInputs, knobs: dict[str, float]) -> dict[str, int]:
    """Channels each group keeps under `parametrisation` with `knobs`, never above `inputs.ceiling`."""
    counts = BUDGETS.get(parametrisation)(inputs, knobs)
    if inputs.ceiling is not None:
        counts = {name: min(n, inputs.ceiling.get(name, n)) for name, n in counts.items()}
    return counts
