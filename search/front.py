"""The Pareto front of a search, read back from MLflow: shared by `search`, `pareto` and `fetch`."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from search._helpers import UsageError, format_count
from search.pareto import Point, hypervolume, pareto_front
from search.tracking import ANCHOR_TAG, STOPPED_TAG, RunRecord, Tracker

__all__ = ["SearchFront", "front_of", "load_front", "select_front", "choose_under_budget", "best_within", "front_hypervolume", "metric_points", "hypervolume_scale", "METRIC_PARAM"]

_REQUIRED = ("val_accuracy", "test_accuracy", "macs", "params")
METRIC_PARAM = "metric"  # the search run's param holding `search.metric`; absent (accuracy) in older searches


@dataclass(frozen=True)
class SearchFront:
    search: RunRecord
    trials: list[RunRecord]  # every trial run of the search, any status
    finished: list[RunRecord]  # FINISHED with all final metrics
    stopped: list[RunRecord]  # stopped by successive halving (KILLED with STOPPED_TAG)
    front: list[RunRecord]  # non-dominated finished trials, by MACs ascending
    teacher: RunRecord | None
    anchors: list[RunRecord]  # the finished uniform-allocation anchor trials
    hypervolume: float | None  # of the front (test accuracy, or test balanced accuracy; see front_hypervolume); None without a teacher
    anchors_hypervolume: float | None  # of the anchors' own front; None without anchors
    metric: str = "accuracy"  # the search's `search.metric`: the front is non-dominated on val_<metric> and MACs


def metric_points(runs: list[RunRecord], metric: str) -> list[Point]:
    """Points on `val_<metric>` and MACs."""
    key = f"val_{metric}"
    return [Point(key=r.run_id, accuracy=r.metrics.get(key, 0.0), macs=r.metrics.get("macs", 0.0), finished=_is_finished(r, metric)) for r in runs]


def select_front(runs: list[RunRecord], metric: str = "accuracy") -> list[RunRecord]:
    """The finished runs non-dominated on (val_<metric> max, MACs min), by MACs ascending."""
    by_id = {r.run_id: r for r in runs}
    return [by_id[p.key] for p in pareto_front(metric_points(runs, metric))]


def front_hypervolume(runs: list[RunRecord], *, teacher_macs: float, chance: float, metric: str = "accuracy") -> float:
    """Hypervolume of the front selected on val_<metric>, measured with its test_<metric> (which the
    search never sees), in the box MACs / teacher MACs in [0, 1] x accuracy in [chance, 1] (chance
    is 1 / classes for balanced accuracy too)."""
    test = {r.run_id: r.metrics.get(f"test_{metric}", 0.0) for r in runs}
    front = [replace(p, accuracy=test[p.key]) for p in pareto_front(metric_points(runs, metric))]
    return hypervolume(front, reference_macs=teacher_macs, floor=chance)


def _is_finished(run: RunRecord, metric: str = "accuracy") -> bool:
    required = _REQUIRED + (f"val_{metric}", f"test_{metric}")
    return run.status == "FINISHED" and all(k in run.metrics for k in required)


def hypervolume_scale(search: RunRecord, teacher: RunRecord | None) -> dict | None:
    """`front_hypervolume`'s box for a search's trials (teacher MACs, chance, metric); None without a teacher."""
    if teacher is None or "num_classes" not in search.params:
        return None
    return {"teacher_macs": teacher.metrics["macs"], "chance": 1 / int(search.params["num_classes"]), "metric": search.params.get(METRIC_PARAM, "accuracy")}


def front_of(tracker: Tracker, search: RunRecord) -> SearchFront:
    metric = search.params.get(METRIC_PARAM, "accuracy")
    trials = tracker.children(search.run_id, role="trial")
    teachers = tracker.children(search.run_id, role="teacher")
    teacher = teachers[0] if teachers and "macs" in teachers[0].metrics else None
    finished = [r for r in trials if _is_finished(r, metric)]
    anchors = [r for r in finished if r.tags.get(ANCHOR_TAG) == "true"]
    volume = anchors_volume = None
    scale = hypervolume_scale(search, teacher)
    if scale is not None:
        volume = front_hypervolume(finished, **scale)
        anchors_volume = front_hypervolume(anchors, **scale) if anchors else None
    return SearchFront(
        search=search,
        trials=trials,
        finished=finished,
        stopped=[r for r in trials if r.status == "KILLED" and STOPPED_TAG in r.tags],
        front=select_front(trials, metric),
        teacher=teacher,
        anchors=anchors,
        hypervolume=volume,
        anchors_hypervolume=anchors_volume,
        metric=metric,
    )


def load_front(tracker: Tracker, experiment: str, *, search_id: str | None = None) -> SearchFront:
    """The front of search run `search_id`, else of the newest FINISHED search; UsageError if none.

    A search that is running, was killed or failed has a partial front: it is shown only when
    asked for by id (SearchFront.search.status says which it is).
    """
    where = f"in {tracker.tracking_uri}; pass the --output / --tracking-uri the search used"
    if search_id is not None:
        search = tracker.search_run(search_id)
        if search is None:
            raise UsageError(f"--search: no search run {search_id!r} in experiment {experiment!r} {where}")
        return front_of(tracker, search)
    search = tracker.latest_search(status="FINISHED")
    if search is None:
        newest = tracker.latest_search()
        if newest is not None:
            raise UsageError(
                f"no finished search of {experiment!r} yet; the newest, {newest.run_id}, is {newest.status}:"
                f" pass --search {newest.run_id} to see its partial front"
            )
        raise UsageError(f"no search named {experiment!r} {where}, or run `slimtune search SPACE.yaml` first")
    return front_of(tracker, search)


def best_within(points: Sequence[Point], max_macs: float = math.inf) -> Point | None:
    """The point with the highest accuracy among those with MACs <= max_macs; fewer MACs break
    ties; None if none fits."""
    return max((p for p in points if p.macs <= max_macs), key=lambda p: (p.accuracy, -p.macs), default=None)


def choose_under_budget(front: list[RunRecord], max_macs: float, *, metric: str = "accuracy") -> RunRecord:
    """The front member with the best val_<metric> among those with MACs <= max_macs; fewer MACs break ties."""
    best = best_within(metric_points(front, metric), max_macs)
    if best is None:
        smallest = min((r.metrics["macs"] for r in front), default=None)
        hint = f"the smallest model on the front has {format_count(smallest)} MACs" if smallest else "the front is empty"
        raise UsageError(f"--max-macs: no Pareto model has at most {format_count(max_macs)} MACs; {hint}")
    return next(r for r in front if r.run_id == best.key)
