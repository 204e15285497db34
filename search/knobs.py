"""The one search space: every knob's name and range, from the space YAML to a trial's parameters.

A knob is spelt once. `search.kd_alpha` in the YAML is `kd_alpha` in the Optuna study, in the
config a Ray trial receives and in that trial's MLflow params; `search.budgets.target_macs` is
`target_macs`; a group's (or stage's) keep ratio is `keep.<name>`, a stage's gating density
`density.<stage>`; a list of choices (`search.importance: [l1, activation]`) is the categorical
knob `criterion` (and `parametrisation`, `schedule`, `teacher`). Knobs whose range is one value,
or that have one choice, are not searched: `resolve` fills them in, so every trial logs all of them.
"""
from __future__ import annotations

import math
from typing import Any

from pipelines.budgets import TARGET_KNOBS, uniform_keep_ratio
from pipelines.config import TrialParams
from pipelines.macs import MacsModel
from pipelines.prune import Group
from search.space import Experiment, Range, SpaceError

__all__ = ["knob_ranges", "search_space", "resolve", "trial_params", "anchor_points", "target_grid", "CHOICES"]

Knob = Range | list[str]
# categorical knob name -> the SearchConfig field listing its choices
CHOICES = {"criterion": "importance", "schedule": "schedule", "teacher": "teacher"}


def _budget_names(experiment: Experiment, groups: tuple[Group, ...], parametrisation: str) -> list[str]:
    """Groups or stages with a keep-ratio knob (groups at or below min_channels have none)."""
    budgets = experiment.search.budgets
    prunable = [g for g in groups if g.channels > budgets.min_channels]
    if parametrisation == "group":
        return [g.name for g in prunable]
    return sorted({g.stage for g in prunable})


def knob_ranges(experiment: Experiment, groups: tuple[Group, ...]) -> dict[str, Knob]:
    """Every knob the space's choices can use: its Range, or its list of choices."""
    s = experiment.search
    budgets = s.budgets
    knobs: dict[str, Knob] = {"parametrisation": list(budgets.granularity)}
    knobs.update({name: list(getattr(s, field)) for name, field in CHOICES.items()})
    if "target" in budgets.granularity:
        knobs.update({name: getattr(budgets, name) for name in TARGET_KNOBS})
    names = [n for p in ("group", "stage") if p in budgets.granularity for n in _budget_names(experiment, groups, p)]
    unknown = sorted(set(budgets.keep) - set(names))
    if unknown:
        raise SpaceError(
            f"search.budgets.keep.{unknown[0]}: no prunable group or stage of that name; valid: {', '.join(names)}"
        )
    knobs.update({f"keep.{name}": budgets.keep.get(name, budgets.keep_ratio) for name in names})
    if "theta" in budgets.granularity:
        knobs["theta"] = budgets.theta
    if "global_percentile" in budgets.granularity:
        knobs["percentile"] = budgets.percentile
    knobs["lr"] = s.lr
    if "target" in s.teacher:
        knobs["kd_alpha"] = s.kd_alpha
    if {"target", "source_classifier"} & set(s.teacher):
        knobs["kd_temperature"] = s.kd_temperature
    if "source_classifier" in s.teacher:
        knobs["source_kd_weight"] = s.source_kd_weight
    if "source_features" in s.teacher:
        knobs["feature_weight"] = s.feature_weight
    knobs["l2sp_alpha"] = s.l2sp_alpha
    knobs["bn_sparsity"] = s.bn_sparsity
    if s.gating_density is not None:
        knobs.update({f"density.{stage}": s.gating_density for stage in sorted({g.stage for g in groups}) if stage != "classifier"})
    return knobs


def _searched(knob: Knob) -> bool:
    return len(knob) > 1 if isinstance(knob, list) else knob.low < knob.high


def search_space(experiment: Experiment, groups: tuple[Group, ...]) -> dict[str, Any]:
    """The searched knobs as Optuna distributions (imported here: Optuna is slow to import)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {
        name: CategoricalDistribution(knob) if isinstance(knob, list) else FloatDistribution(knob.low, knob.high, log=knob.log)
        for name, knob in knob_ranges(experiment, groups).items()
        if _searched(knob)
    }


def resolve(config: dict[str, Any], experiment: Experiment, groups: tuple[Group, ...]) -> dict[str, Any]:
    """Every knob's value for one trial: sampled ones from `config`, the others fixed by the space.

    Knobs the trial's own choices do not use (keep ratios of a theta trial, ...) are left out.
    """
    values: dict[str, Any] = {}
    for name, knob in knob_ranges(experiment, groups).items():
        if name in config:
            values[name] = config[name]
        else:
            values[name] = knob[0] if isinstance(knob, list) else knob.low
    parametrisation = values["parametrisation"]

    def used(name: str) -> bool:
        if name in TARGET_KNOBS:
            return parametrisation == "target"
        if name.startswith("keep."):
            return parametrisation in ("group", "stage") and name.removeprefix("keep.") in _budget_names(experiment, groups, parametrisation)
        if name in ("theta", "percentile"):
            return parametrisation == {"theta": "theta", "percentile": "global_percentile"}[name]
        if name == "kd_alpha":
            return values["teacher"] == "target"
        if name == "kd_temperature":
            return values["teacher"] in ("target", "source_classifier")
        if name == "source_kd_weight":
            return values["teacher"] == "source_classifier"
        if name == "feature_weight":
            return values["teacher"] == "source_features"
        return True

    return {name: value for name, value in values.items() if used(name)}


def _losses(knobs: dict[str, Any], experiment: Experiment) -> dict[str, dict[str, float]]:
    """The distillation terms implied by the teacher choice, plus L2-SP when its weight is > 0."""
    s = experiment.search
    losses: dict[str, dict[str, float]] = {}
    teacher = knobs["teacher"]
    if teacher == "target":
        losses["kd"] = {"alpha": float(knobs["kd_alpha"]), "temperature": float(knobs["kd_temperature"])}
    elif teacher == "source_classifier":
        losses["source_kd"] = {"weight": float(knobs["source_kd_weight"]), "temperature": float(knobs["kd_temperature"])}
    elif teacher == "source_features":
        losses[s.feature_loss] = {"weight": float(knobs["feature_weight"])}
    if float(knobs["l2sp_alpha"]) > 0:
        losses["l2sp"] = {"alpha": float(knobs["l2sp_alpha"]), "beta": s.l2sp_beta}
    return losses


def trial_params(knobs: dict[str, Any], experiment: Experiment, groups: tuple[Group, ...]) -> TrialParams:
    """The pipeline parameters of one trial from its resolved knobs (`resolve`)."""
    s = experiment.search
    parametrisation = knobs["parametrisation"]
    if parametrisation == "target":
        budget = {name: float(knobs[name]) for name in TARGET_KNOBS}
    elif parametrisation in ("group", "stage"):
        # Groups (or stages) without a knob are too small to prune: they keep every channel.
        names = [g.name for g in groups] if parametrisation == "group" else sorted({g.stage for g in groups})
        budget = {name: float(knobs.get(f"keep.{name}", 1.0)) for name in names}
    elif parametrisation == "theta":
        budget = {"theta": float(knobs["theta"])}
    else:
        budget = {"percentile": float(knobs["percentile"])}
    return TrialParams(
        budget=budget,
        parametrisation=parametrisation,
        criterion=knobs["criterion"],
        schedule=knobs["schedule"],
        rounds=s.rounds,
        max_drop=s.max_drop,
        bn_sparsity=float(knobs["bn_sparsity"]),
        lr=float(knobs["lr"]),
        losses=_losses(knobs, experiment),
        densities={name.removeprefix("density."): float(v) for name, v in knobs.items() if name.startswith("density.")},
        density_warmup=s.gating_warmup,
        class_weighted=s.class_weighted,
        min_channels=s.budgets.min_channels,
    )


def _middle(knob: Range) -> float:
    return math.sqrt(knob.low * knob.high) if knob.log else (knob.low + knob.high) / 2


def _clip(value: float, knob: Range) -> float:
    return min(max(value, knob.low), knob.high)


def anchor_points(experiment: Experiment, groups: tuple[Group, ...], macs: MacsModel) -> list[dict[str, Any]]:
    """The uniform-allocation trials, in search-space names, largest MACs target first.

    `target` trials get tilts of 0 (clipped into their ranges); `group`/`stage` trials get the one
    keep ratio that meets the target (bisected on the MACs model). Other knobs: their first choice
    or the middle of their range. Empty when the space has neither parametrisation.
    """
    s = experiment.search
    space = knob_ranges(experiment, groups)
    parametrisation = next((p for p in ("target", "group", "stage") if p in s.budgets.granularity), None)
    if parametrisation is None:
        return []
    points = []
    for target in sorted(s.uniform_anchors, reverse=True)[: s.num_trials]:
        point: dict[str, Any] = {}
        ratio = uniform_keep_ratio(list(groups), macs=macs, target=target) if parametrisation != "target" else None
        for name, knob in space.items():
            if not _searched(knob):
                continue
            if isinstance(knob, list):
                point[name] = parametrisation if name == "parametrisation" else knob[0]
            elif name == "target_macs":
                point[name] = _clip(target, knob)
            elif name in ("depth_tilt", "residual_tilt"):
                point[name] = _clip(0.0, knob)
            elif name.startswith("keep.") and ratio is not None:
                point[name] = _clip(ratio, knob)
            else:
                point[name] = _middle(knob)
        points.append(point)
    return points



def target_grid(experiment: Experiment) -> list[float]:
    """`search.target_grid` MACs targets, log-spaced over budgets.target_macs, largest first."""
    n = experiment.search.target_grid
    low, high = experiment.search.budgets.target_macs.low, experiment.search.budgets.target_macs.high
    if n == 1:
        return [math.sqrt(low * high)]
    return [high * (low / high) ** (i / (n - 1)) for i in range(n)]
