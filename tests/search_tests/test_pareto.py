from __future__ import annotations

import itertools

import numpy as np
import pytest

from search.front import front_hypervolume
from search.pareto import Point, hypervolume, pareto_front
from search.tracking import RunRecord


def _p(key: str, accuracy: float, macs: float, finished: bool = True) -> Point:
    return Point(key=key, accuracy=accuracy, macs=macs, finished=finished)


def _keys(points: list[Point]) -> list[str]:
    return [p.key for p in points]


# ---------------------------------------------------------------- pareto_front


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        pytest.param([], [], id="empty"),
        pytest.param([_p("a", 0.5, 10)], ["a"], id="single"),
        pytest.param(
            [_p("big", 0.95, 100), _p("mid", 0.90, 50), _p("small", 0.80, 10)], ["small", "mid", "big"], id="all-on-front"
        ),
        pytest.param(
            [_p("big", 0.95, 100), _p("mid", 0.90, 50), _p("small", 0.80, 10), _p("bad", 0.85, 60), _p("worse", 0.70, 20)],
            ["small", "mid", "big"],
            id="simple-known-front",
        ),
        pytest.param([_p("a", 0.9, 10), _p("b", 0.8, 20)], ["a"], id="better-and-cheaper-dominates"),
        pytest.param([_p("a", 0.9, 10), _p("b", 0.9, 20)], ["a"], id="equal-accuracy-more-macs-dominated"),
        pytest.param([_p("a", 0.9, 10), _p("b", 0.8, 10)], ["a"], id="equal-macs-less-accuracy-dominated"),
        pytest.param([_p("a", 0.9, 10), _p("b", 0.9, 10)], ["a", "b"], id="exact-tie-both-kept"),
        pytest.param([_p("b", 0.9, 10), _p("a", 0.9, 10), _p("c", 0.5, 50)], ["a", "b"], id="tie-kept-dominated-dropped"),
        pytest.param([_p("a", 0.9, 10, finished=False), _p("b", 0.5, 50)], ["b"], id="unfinished-dominator-ignored"),
        pytest.param([_p("a", 1.0, 0, finished=False), _p("b", 0.5, 50), _p("c", 0.6, 80)], ["b", "c"], id="unfinished-perfect-ignored"),
        pytest.param([_p("a", 0.9, 10, finished=False)], [], id="only-unfinished"),
        pytest.param([_p("a", 0.9, 10, finished=False), _p("b", 0.9, 10, finished=False)], [], id="all-unfinished"),
    ],
)
def test_pareto_front(points: list[Point], expected: list[str]) -> None:
    assert _keys(pareto_front(points)) == expected


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_pareto_front_sorted_by_macs_ascending(order: tuple[int, ...]) -> None:
    points = [_p("d", 0.95, 400), _p("c", 0.9, 300), _p("b", 0.8, 200), _p("a", 0.7, 100)]
    front = pareto_front([points[i] for i in order])
    assert [p.macs for p in front] == [100, 200, 300, 400]


def test_pareto_front_returns_the_same_point_objects() -> None:
    point = Point("a", 0.9, 10, extra={"trial": object()})
    assert pareto_front([point])[0] is point


def test_pareto_front_accepts_tuples() -> None:
    assert _keys(pareto_front((_p("a", 0.9, 10), _p("b", 0.8, 20)))) == ["a"]


def test_pareto_front_does_not_mutate_input() -> None:
    points = [_p("b", 0.9, 20), _p("a", 0.8, 10), _p("c", 0.1, 30)]
    before = list(points)
    pareto_front(points)
    assert points == before


@pytest.mark.parametrize("seed", range(5))
def test_no_front_point_is_dominated(seed: int) -> None:
    import random

    rng = random.Random(seed)
    points = [_p(str(i), round(rng.random(), 2), rng.randint(1, 20), finished=rng.random() > 0.2) for i in range(30)]
    front = pareto_front(points)
    finished = [p for p in points if p.finished]
    for p in front:
        assert p.finished
        assert not any(
            q.accuracy >= p.accuracy and q.macs <= p.macs and (q.accuracy > p.accuracy or q.macs < p.macs) for q in finished
        )
    for p in finished:
        if p not in front:
            assert any(q.accuracy >= p.accuracy and q.macs <= p.macs for q in front)


def test_extra_does_not_affect_equality() -> None:
    assert Point("a", 0.9, 10, extra={"x": 1}) == Point("a", 0.9, 10, extra={"x": 2})


# ---------------------------------------------------------------- hypervolume


@pytest.mark.parametrize(
    ("points", "reference", "expected"),
    [
        pytest.param([], 100, 0.0, id="empty"),
        pytest.param([_p("a", 0.9, 50)], 100, 0.45, id="single-half-reference"),
        pytest.param([_p("a", 0.9, 0.5e9)], 1e9, 0.45, id="single-half-reference-large"),
        pytest.param([_p("a", 1.0, 0)], 100, 1.0, id="perfect"),
        pytest.param([_p("a", 0.9, 100)], 100, 0.0, id="at-reference"),
        pytest.param([_p("a", 0.0, 10)], 100, 0.0, id="zero-accuracy"),
        # staircase: 0.6 over [20, 50) and 0.9 over [50, 100): 0.6 * 0.3 + 0.9 * 0.5 = 0.63
        pytest.param([_p("a", 0.6, 20), _p("b", 0.9, 50)], 100, 0.63, id="two-point-staircase"),
        pytest.param([_p("b", 0.9, 50), _p("a", 0.6, 20)], 100, 0.63, id="two-point-staircase-unsorted"),
        # 0.5 * 0.25 + 0.7 * 0.25 + 0.8 * 0.25 = 0.5
        pytest.param([_p("a", 0.5, 25), _p("b", 0.7, 50), _p("c", 0.8, 75)], 100, 0.5, id="three-point-staircase"),
        pytest.param([_p("a", 0.9, 50), _p("b", 0.99, 150)], 100, 0.45, id="above-reference-ignored"),
        pytest.param([_p("b", 0.99, 150)], 100, 0.0, id="only-above-reference"),
        pytest.param([_p("a", 0.9, 50), _p("b", 0.9, 50)], 100, 0.45, id="tie-counted-once"),
        pytest.param([_p("a", 0.9, 50), _p("b", 0.5, 70)], 100, 0.45, id="dominated-point-adds-nothing"),
        pytest.param([_p("a", 0.5, 50), _p("b", 0.9, 50)], 100, 0.45, id="same-macs-best-accuracy"),
    ],
)
def test_hypervolume(points: list[Point], reference: float, expected: float) -> None:
    assert hypervolume(points, reference_macs=reference) == pytest.approx(expected)


def test_hypervolume_of_front_equals_hypervolume_of_all_points() -> None:
    points = [_p("a", 0.6, 20), _p("b", 0.9, 50), _p("c", 0.5, 40), _p("d", 0.7, 90)]
    assert hypervolume(pareto_front(points), reference_macs=100) == pytest.approx(hypervolume(points, reference_macs=100))


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_is_between_0_and_1(seed: int) -> None:
    import random

    rng = random.Random(seed)
    points = [_p(str(i), rng.random(), rng.uniform(0, 150)) for i in range(20)]
    value = hypervolume(pareto_front(points), reference_macs=100)
    assert 0.0 <= value <= 1.0


def test_hypervolume_grows_when_a_point_is_added() -> None:
    base = [_p("a", 0.6, 20), _p("b", 0.9, 50)]
    assert hypervolume([*base, _p("c", 0.8, 30)], reference_macs=100) > hypervolume(base, reference_macs=100)


def test_hypervolume_reference_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        hypervolume([_p("a", 0.9, 50)], 100)  # type: ignore[misc]


def test_hypervolume_above_chance_matches_the_hand_computed_front_and_optuna() -> None:
    """SEARCH.md's example: (0.2, 0.70), (0.5, 0.80), (1.0, 0.88) with 10 classes: 0.6 * 0.3 + 0.7 * 0.5."""
    from optuna._hypervolume import compute_hypervolume

    front = [_p("a", 0.70, 0.2), _p("b", 0.80, 0.5), _p("c", 0.88, 1.0)]
    assert hypervolume(front, reference_macs=1.0, floor=0.1) == pytest.approx(0.53)
    losses = np.array([[p.macs, 1 - p.accuracy] for p in front])
    assert compute_hypervolume(losses, np.array([1.0, 0.9])) == pytest.approx(0.53)


def test_points_below_chance_add_nothing() -> None:
    assert hypervolume([_p("a", 0.05, 0.2), _p("b", 0.6, 0.5)], reference_macs=1.0, floor=0.1) == pytest.approx(0.25)


def _run(key: str, val: float, test: float, macs: float, status: str = "FINISHED") -> RunRecord:
    metrics = {"val_accuracy": val, "test_accuracy": test, "macs": macs, "params": 1.0}
    return RunRecord(run_id=key, name=key, status=status, metrics=metrics, params={}, tags={})


def test_front_hypervolume_selects_on_val_and_measures_on_test() -> None:
    runs = [
        _run("a", val=0.90, test=0.80, macs=50),
        _run("b", val=0.85, test=0.95, macs=60),  # dominated on val: its better test accuracy must not count
        _run("c", val=0.95, test=0.90, macs=80, status="KILLED"),  # stopped early: never on the front
    ]
    assert front_hypervolume(runs, teacher_macs=100, chance=0.1) == pytest.approx((0.80 - 0.1) * 0.5)
