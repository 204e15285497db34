"""The Pareto front of a search, read back from MLflow: shared by `search`, `pareto` and `fetch`."""
from __future__ import annotations

from dataclasses import dataclass

from search._helpers import UsageError, format_count
from search.pareto import Point, pareto_front
from search.tracking import RunRecord, Tracker

__all__ = ["SearchFront", "load_front", "choose_under_budget"]

_REQUIRED = ("val_accuracy", "test_accuracy", "macs", "params")


@dataclass(frozen=True)
class SearchFront:
    search: RunRecord
    trials: list[RunRecord]  # every trial run of the search, any status
    finished: list[RunRecord]  # FINISHED with all final metrics
    front: list[RunRecord]  # non-dominated finished trials, by MACs ascending
    teacher: RunRecord | None


def _is_finished(run: RunRecord) -> bool:
    return run.status == "FINISHED" and all(k in run.metrics for k in _REQUIRED)


def front_of(tracker: Tracker, search: RunRecord) -> SearchFront:
    trials = tracker.children(search.run_id, role="trial")
    points = [
        Point(key=r.run_id, accuracy=r.metrics.get("val_accuracy", 0.0), macs=r.metrics.get("macs", 0.0), finished=_is_finished(r))
        for r in trials
    ]
    by_id = {r.run_id: r for r in trials}
    teachers = tracker.children(search.run_id, role="teacher")
    return SearchFront(
        search=search,
        trials=trials,
        finished=[r for r in trials if _is_finished(r)],
        front=[by_id[p.key] for p in pareto_front(points)],
        teacher=teachers[0] if teachers else None,
    )


def load_front(tracker: Tracker, experiment: str) -> SearchFront:
    """The front of the latest search of `experiment`; UsageError if there is none."""
    search = tracker.latest_search()
    if search is None:
        raise UsageError(
            f"no search named {experiment!r} in {tracker.tracking_uri}; run `slimtune search SPACE.yaml` first,"
            " or pass the --output / --tracking-uri the search used"
        )
    return front_of(tracker, search)


def choose_under_budget(front: list[RunRecord], max_macs: float) -> RunRecord:
    """The most accurate (val) front member with MACs <= max_macs; fewer MACs break ties."""
    fitting = [r for r in front if r.metrics["macs"] <= max_macs]
    if not fitting:
        smallest = min((r.metrics["macs"] for r in front), default=None)
        hint = f"the smallest model on the front has {format_count(smallest)} MACs" if smallest else "the front is empty"
        raise UsageError(f"--max-macs: no Pareto model has at most {format_count(max_macs)} MACs; {hint}")
    return max(fitting, key=lambda r: (r.metrics["val_accuracy"], -r.metrics["macs"]))
