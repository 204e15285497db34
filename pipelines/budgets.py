"""Budget parametrisations: every one ends as a number of channels to keep per group.

So MACs are always computed one way, on the physically pruned model, whatever knob produced it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from pipelines._registry import Registry
from pipelines.prune import Group, kept_channels

__all__ = ["BUDGETS", "keep_counts"]

# (groups, knobs, per-group channel scores) -> channels kept per group
Parametrisation = Callable[[list[Group], dict[str, float], dict[str, torch.Tensor]], dict[str, int]]
BUDGETS: Registry[Parametrisation] = Registry("budget parametrisation")


@BUDGETS.register("group", description="one keep ratio per dependency group (AMC-style); knobs: keep.<group>")
def _per_group(groups: list[Group], knobs: dict[str, float], scores: dict[str, torch.Tensor]) -> dict[str, int]:
    return {g.name: kept_channels(g.channels, knobs[g.name]) for g in groups}


@BUDGETS.register("stage", description="one keep ratio per stage (groups at one stride); knobs: keep.<stage>")
def _per_stage(groups: list[Group], knobs: dict[str, float], scores: dict[str, torch.Tensor]) -> dict[str, int]:
    return {g.name: kept_channels(g.channels, knobs[g.stage]) for g in groups}


@BUDGETS.register(
    "theta",
    description="Zhong et al. 2018: per layer, prune the channels inside the lowest cumulative share theta of the scores; knob: theta",
)
def _theta(groups: list[Group], knobs: dict[str, float], scores: dict[str, torch.Tensor]) -> dict[str, int]:
    theta = knobs["theta"]
    keep = {}
    for g in groups:
        ordered = scores[g.name].clamp(min=0).sort().values
        share = ordered.cumsum(0) / ordered.sum().clamp(min=1e-12)
        pruned = int((share <= theta).sum())
        keep[g.name] = max(1, g.channels - pruned)
    return keep


@BUDGETS.register(
    "global_percentile",
    description="network slimming: one global cut of the criterion scores across all groups; knob: percentile (fraction cut)",
)
def _global_percentile(groups: list[Group], knobs: dict[str, float], scores: dict[str, torch.Tensor]) -> dict[str, int]:
    everything = torch.cat([scores[g.name].float() for g in groups])
    threshold = torch.quantile(everything, knobs["percentile"])
    return {g.name: max(1, int((scores[g.name] > threshold).sum())) for g in groups}


def keep_counts(
    parametrisation: str, *, groups: list[Group], knobs: dict[str, float], scores: dict[str, torch.Tensor]
) -> dict[str, int]:
    """Channels each group keeps under `parametrisation` with `knobs` (scores needed by theta/global only)."""
    return BUDGETS.get(parametrisation)(groups, knobs, scores)
