from __future__ import annotations

import math
import random

import pytest
import torch

from pipelines.budgets import BUDGETS, BudgetInputs, allocation_weights, keep_counts, uniform_keep_ratio
from pipelines.importance import module_scores
from pipelines.macs import count_macs
from pipelines.prune import Group, kept_channels, macs_model, prunable_groups, prune_to_counts

from _models import fresh

GROUPS = [Group(name="a", channels=4, stage="stride_2"), Group(name="b", channels=5, stage="stride_4")]


def test_registry_names() -> None:
    assert BUDGETS.names() == ["global_percentile", "group", "stage", "target", "theta"]


def test_group_and_stage_ratios() -> None:
    assert keep_counts("group", BudgetInputs(groups=GROUPS), {"a": 0.5, "b": 0.01}) == {"a": 2, "b": 1}
    assert keep_counts("stage", BudgetInputs(groups=GROUPS), {"stride_2": 1.0, "stride_4": 0.6}) == {"a": 4, "b": 3}


@pytest.mark.parametrize(
    ("theta", "expected_a", "expected_b"),
    [
        # a: scores 0, 1, 2, 7 (sum 10): cumulative shares 0, .1, .3, 1.0; b: five equal scores: .2, .4, ...
        (0.0, 3, 5),  # only the zero-score channel of `a` lies inside share 0
        (0.1, 2, 5),
        (0.3, 1, 4),
        (0.45, 1, 3),
        (1.0, 1, 1),  # everything is inside: at least one channel stays
    ],
)
def test_theta_counts_per_layer(theta: float, expected_a: int, expected_b: int) -> None:
    """Zhong's single knob yields a different count per layer from the layers' own statistics."""
    scores = {"a": torch.tensor([2.0, 0.0, 7.0, 1.0]), "b": torch.ones(5)}
    assert keep_counts("theta", BudgetInputs(groups=GROUPS, scores=scores), {"theta": theta}) == {"a": expected_a, "b": expected_b}


def test_global_percentile_cuts_across_groups() -> None:
    scores = {"a": torch.tensor([0.1, 0.2, 5.0, 6.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0, 7.0])}
    # Nine scores; the 0.5 quantile is 3.0: a keeps 5 and 6, b keeps 4 and 7.
    assert keep_counts("global_percentile", BudgetInputs(groups=GROUPS, scores=scores), {"percentile": 0.5}) == {"a": 2, "b": 2}
    # A cut above every score of a group still leaves it one channel.
    assert keep_counts("global_percentile", BudgetInputs(groups=GROUPS, scores=scores), {"percentile": 0.99})["a"] == 1


# ---------------------------------------------------------------- target MACs + allocation shape

IMAGE_SIZE = 32


def _real_macs_ratio(arch: str, counts: dict[str, int]) -> float:
    """MACs of the really pruned model (count_macs, the one counter) over the dense model's."""
    model = fresh(arch)
    dense = count_macs(model, image_size=IMAGE_SIZE).macs
    prune_to_counts(model, counts, image_size=IMAGE_SIZE, scores=module_scores(model, "l1", data=None))
    return count_macs(model, image_size=IMAGE_SIZE).macs / dense


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18", "densenet121", "vgg11_bn"])
def test_macs_model_equals_count_macs_of_the_pruned_model(arch: str) -> None:
    model = fresh(arch)
    groups = prunable_groups(model, image_size=IMAGE_SIZE)
    predict = macs_model(model, image_size=IMAGE_SIZE)
    assert predict.dense == count_macs(model, image_size=IMAGE_SIZE).macs
    rng = random.Random(0)
    counts = {g.name: kept_channels(g.channels, rng.uniform(0.05, 1.0)) for g in groups}
    assert predict(counts) / predict.dense == pytest.approx(_real_macs_ratio(arch, counts), rel=1e-12)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
@pytest.mark.parametrize("target", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("tilts", [(0.0, 0.0), (1.5, 1.0), (-1.0, -0.5)], ids=["uniform", "late-and-residual", "early"])
def test_target_lands_within_two_percent(arch: str, target: float, tilts: tuple[float, float]) -> None:
    model = fresh(arch)
    inputs = BudgetInputs(groups=prunable_groups(model, image_size=IMAGE_SIZE), macs=macs_model(model, image_size=IMAGE_SIZE))
    counts = keep_counts("target", inputs, {"target_macs": target, "depth_tilt": tilts[0], "residual_tilt": tilts[1]})
    assert _real_macs_ratio(arch, counts) == pytest.approx(target, rel=0.02)


def test_target_below_the_floor_gives_one_channel_per_group() -> None:
    model = fresh("mobilenet_v2")
    groups = prunable_groups(model, image_size=IMAGE_SIZE)
    inputs = BudgetInputs(groups=groups, macs=macs_model(model, image_size=IMAGE_SIZE))
    assert keep_counts("target", inputs, {"target_macs": 1e-6}) == {g.name: 1 for g in groups}


def test_target_respects_the_ceiling_of_a_smaller_start() -> None:
    """A warm-started student cannot regrow channels: the bisection works within its widths."""
    model = fresh("resnet18")
    groups = prunable_groups(model, image_size=IMAGE_SIZE)
    macs = macs_model(model, image_size=IMAGE_SIZE)
    ceiling = {g.name: (g.channels // 4 if i == 0 else g.channels) for i, g in enumerate(groups)}
    counts = keep_counts("target", BudgetInputs(groups=groups, macs=macs, ceiling=ceiling), {"target_macs": 0.5})
    assert all(counts[name] <= cap for name, cap in ceiling.items())
    assert macs(counts) / macs.dense == pytest.approx(0.5, rel=0.02)


def test_allocation_weights_tilt_by_depth_and_residual_streams() -> None:
    groups = [Group("a", 8, "s", residual=True), Group("b", 8, "s"), Group("c", 8, "s", residual=True)]
    assert set(allocation_weights(groups, depth_tilt=0.0, residual_tilt=0.0).values()) == {1.0}
    depth = allocation_weights(groups, depth_tilt=2.0, residual_tilt=0.0)
    assert depth["c"] / depth["a"] == pytest.approx(math.exp(2.0))
    residual = allocation_weights(groups, depth_tilt=0.0, residual_tilt=1.0)
    assert residual["a"] / residual["b"] == pytest.approx(math.e) and residual["a"] == residual["c"]


def test_uniform_keep_ratio_meets_the_target() -> None:
    model = fresh("mobilenet_v2")
    groups = prunable_groups(model, image_size=IMAGE_SIZE)
    macs = macs_model(model, image_size=IMAGE_SIZE)
    ratio = uniform_keep_ratio(groups, macs=macs, target=0.25)
    assert macs({g.name: kept_channels(g.channels, ratio) for g in groups}) / macs.dense == pytest.approx(0.25, rel=0.02)


@pytest.mark.parametrize(("arch", "residual"), [("mobilenet_v2", 5), ("resnet18", 4), ("vgg11_bn", 0)])
def test_residual_groups_are_the_streams_through_an_add(arch: str, residual: int) -> None:
    groups = prunable_groups(fresh(arch), image_size=IMAGE_SIZE)
    assert sum(g.residual for g in groups) == residual
