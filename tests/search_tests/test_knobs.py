"""One name per knob: the YAML's field name is the Optuna parameter, the trial's knob and its MLflow param."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torchvision
import yaml

from pipelines.prune import Group, kept_channels, macs_model, prunable_groups
from search.knobs import CHOICES, anchor_points, knob_ranges, resolve, search_space, trial_params
from search.space import BudgetSpace, SearchConfig, SpaceError, parse_space

from _space_helpers import REPO

GROUPS = (
    Group("features.0.0", 32, "stride_2"),
    Group("features.1.conv.1", 16, "stride_2"),
    Group("features.2.conv.2", 24, "stride_4", residual=True),
)


def experiment(folder: Path, **search) -> object:
    raw = yaml.safe_load((REPO / "spaces" / "quickstart.yaml").read_text())
    raw["data"]["path"] = str(folder)
    raw["search"].update(search)
    return parse_space(raw)


def _yaml_name(knob: str) -> str:
    """The space field a knob comes from (dotted-prefix knobs come from a dict-valued field)."""
    prefix = knob.split(".", 1)[0]
    return {"keep": "keep_ratio", "density": "gating_density", "parametrisation": "granularity", **CHOICES}.get(prefix, prefix)


@pytest.mark.parametrize("preset", ["quickstart", "full", "afds", "zhong2018"])
def test_every_searched_knob_is_named_after_its_space_field(preset: str, folder: Path) -> None:
    raw = yaml.safe_load((REPO / "spaces" / f"{preset}.yaml").read_text())
    raw["data"]["path"] = str(folder)
    space = search_space(parse_space(raw), GROUPS)
    fields = {f.name for f in dataclasses.fields(SearchConfig)} | {f.name for f in dataclasses.fields(BudgetSpace)}
    assert space
    for name in space:
        assert _yaml_name(name) in fields, name


def test_a_trial_logs_every_knob_it_uses_under_the_searched_name(folder: Path) -> None:
    exp = experiment(folder)
    space = search_space(exp, GROUPS)
    sampled = {name: (d.choices[0] if hasattr(d, "choices") else d.low) for name, d in space.items()}
    knobs = resolve(sampled, exp, GROUPS)
    assert set(space) <= set(knobs)  # searched knobs keep their names
    assert knobs["criterion"] == "activation" and knobs["teacher"] == "target"  # fixed choices are filled in
    params = trial_params(knobs, exp, GROUPS)
    assert params.budget == {"target_macs": knobs["target_macs"], "depth_tilt": knobs["depth_tilt"], "residual_tilt": knobs["residual_tilt"]}
    assert params.losses["kd"] == {"alpha": knobs["kd_alpha"], "temperature": knobs["kd_temperature"]}


def test_knobs_a_trial_does_not_use_are_left_out(folder: Path) -> None:
    exp = experiment(folder, teacher=["none", "target"], budgets={"granularity": ["target", "stage"]})
    knobs = resolve({"teacher": "none", "parametrisation": "stage", "keep.stride_2": 0.5, "kd_alpha": 0.3}, exp, GROUPS)
    assert "kd_alpha" not in knobs and "target_macs" not in knobs
    assert {"keep.stride_2", "keep.stride_4"} <= set(knobs)


def test_fixed_ranges_are_not_searched_but_resolved(folder: Path) -> None:
    exp = experiment(folder, kd_alpha=0.25, lr=1e-3)
    assert "kd_alpha" not in search_space(exp, GROUPS) and "lr" not in search_space(exp, GROUPS)
    knobs = resolve({}, exp, GROUPS)
    assert knobs["kd_alpha"] == 0.25 and knobs["lr"] == 1e-3


def test_unknown_keep_name_lists_the_valid_groups(folder: Path) -> None:
    exp = experiment(folder, budgets={"granularity": "group", "keep": {"features.9": 0.5}})
    with pytest.raises(SpaceError, match=r"search\.budgets\.keep\.features\.9: .*valid: features\.0\.0"):
        knob_ranges(exp, GROUPS)


def test_anchors_are_uniform_and_largest_first(folder: Path) -> None:
    exp = experiment(folder, uniform_anchors=[0.05, 0.5, 0.15])
    model = torchvision.models.mobilenet_v2(num_classes=10)
    groups = tuple(prunable_groups(model, image_size=32))
    points = anchor_points(exp, groups, macs_model(model, image_size=32))
    assert [p["target_macs"] for p in points] == [0.5, 0.15, 0.05]
    assert all(p["depth_tilt"] == 0.0 and p["residual_tilt"] == 0.0 for p in points)
    assert set(points[0]) == set(search_space(exp, groups))


def test_group_anchors_get_the_uniform_ratio_that_meets_the_target(folder: Path) -> None:
    exp = experiment(folder, uniform_anchors=[0.25], budgets={"granularity": "group"})
    model = torchvision.models.mobilenet_v2(num_classes=10)
    groups = tuple(prunable_groups(model, image_size=32))
    macs = macs_model(model, image_size=32)
    (point,) = anchor_points(exp, groups, macs)
    ratios = {v for k, v in point.items() if k.startswith("keep.")}
    (ratio,) = ratios
    assert macs({g.name: kept_channels(g.channels, ratio) for g in groups}) / macs.dense == pytest.approx(0.25, rel=0.02)
