from __future__ import annotations

import pytest
import torch

from pipelines.budgets import BUDGETS, keep_counts
from pipelines.prune import Group

GROUPS = [Group(name="a", channels=4, stage="stride_2"), Group(name="b", channels=5, stage="stride_4")]


def test_registry_names() -> None:
    assert BUDGETS.names() == ["global_percentile", "group", "stage", "theta"]


def test_group_and_stage_ratios() -> None:
    assert keep_counts("group", groups=GROUPS, knobs={"a": 0.5, "b": 0.01}, scores={}) == {"a": 2, "b": 1}
    assert keep_counts("stage", groups=GROUPS, knobs={"stride_2": 1.0, "stride_4": 0.6}, scores={}) == {"a": 4, "b": 3}


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
    assert keep_counts("theta", groups=GROUPS, knobs={"theta": theta}, scores=scores) == {"a": expected_a, "b": expected_b}


def test_global_percentile_cuts_across_groups() -> None:
    scores = {"a": torch.tensor([0.1, 0.2, 5.0, 6.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0, 7.0])}
    # Nine scores; the 0.5 quantile is 3.0: a keeps 5 and 6, b keeps 4 and 7.
    assert keep_counts("global_percentile", groups=GROUPS, knobs={"percentile": 0.5}, scores=scores) == {"a": 2, "b": 2}
    # A cut above every score of a group still leaves it one channel.
    assert keep_counts("global_percentile", groups=GROUPS, knobs={"percentile": 0.99}, scores=scores)["a"] == 1
