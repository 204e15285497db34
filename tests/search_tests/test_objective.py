"""`search.metric: balanced_accuracy`: the front, `fetch`, the hypervolume and the tables follow the objective."""
from __future__ import annotations

import re

import pytest

from search._helpers import format_accuracies
from search.front import choose_under_budget, front_hypervolume, select_front
from search.report import front_rows, front_table, run_columns, run_rows, runs_table
from search.tracking import RunRecord


def _run(key: str, *, val: float, val_bal: float, test: float, test_bal: float, macs: float) -> RunRecord:
    metrics = {
        "val_accuracy": val, "val_balanced_accuracy": val_bal, "test_accuracy": test, "test_balanced_accuracy": test_bal,
        "macs": macs, "params": 1.0, "macs_ratio": macs / 100,
    }  # fmt: skip
    return RunRecord(run_id=key, name=key, status="FINISHED", metrics=metrics, params={}, tags={"slimtune.trial_id": key})


# At the same MACs, "majority" answers mostly the large class: more accurate, far less balanced.
MAJORITY = _run("majority", val=0.80, val_bal=0.55, test=0.79, test_bal=0.52, macs=40)
BALANCED = _run("balanced", val=0.76, val_bal=0.72, test=0.75, test_bal=0.70, macs=40)
BIG = _run("big", val=0.90, val_bal=0.88, test=0.89, test_bal=0.86, macs=90)
RUNS = [MAJORITY, BALANCED, BIG]


def test_the_front_and_fetch_pick_another_member_on_balanced_accuracy() -> None:
    assert [r.run_id for r in select_front(RUNS)] == ["majority", "big"]
    assert [r.run_id for r in select_front(RUNS, "balanced_accuracy")] == ["balanced", "big"]
    assert choose_under_budget(RUNS, 50).run_id == "majority"
    assert choose_under_budget(RUNS, 50, metric="balanced_accuracy").run_id == "balanced"


def test_the_hypervolume_measures_the_test_value_of_the_objective() -> None:
    scale = {"teacher_macs": 100, "chance": 0.5}
    assert front_hypervolume(RUNS, **scale) == pytest.approx((0.79 - 0.5) * 0.5 + (0.89 - 0.5) * 0.1)
    assert front_hypervolume(RUNS, **scale, metric="balanced_accuracy") == pytest.approx((0.70 - 0.5) * 0.5 + (0.86 - 0.5) * 0.1)


def test_a_run_without_the_objective_is_not_finished_for_it() -> None:
    old = RunRecord("old", "old", "FINISHED", {"val_accuracy": 0.99, "test_accuracy": 0.99, "macs": 1.0, "params": 1.0}, {}, {})
    assert [r.run_id for r in select_front([old, BIG])] == ["old"]
    assert [r.run_id for r in select_front([old, BIG], "balanced_accuracy")] == ["big"]


def test_tables_show_balanced_accuracy_first_when_it_is_the_objective() -> None:
    rows = front_rows(select_front(RUNS, "balanced_accuracy"))
    header = front_table(rows, metric="balanced_accuracy").splitlines()[0]
    assert re.split(r"\s{2,}", header)[:6] == ["trial", "val bal acc", "test bal acc", "val acc", "test acc", "MACs"]
    assert re.split(r"\s{2,}", front_table(rows).splitlines()[0])[:4] == ["trial", "val acc", "test acc", "MACs"]
    assert "0.720" in front_table(rows, metric="balanced_accuracy").splitlines()[2]
    runs = run_rows(RUNS, front=select_front(RUNS, "balanced_accuracy"))
    assert "val bal" in runs_table(runs, columns=run_columns("balanced_accuracy")) and "val bal" not in runs_table(runs)
    assert runs[1]["val_bal"] == 0.72


def test_progress_lines_lead_with_the_objective() -> None:
    metrics = {"val_accuracy": 0.8, "val_balanced_accuracy": 0.55, "test_accuracy": 0.79, "test_balanced_accuracy": 0.52}
    assert format_accuracies(metrics) == "val acc 0.800, test acc 0.790"
    assert format_accuracies(metrics, "balanced_accuracy") == "val bal acc 0.550 (acc 0.800), test bal acc 0.520 (acc 0.790)"
