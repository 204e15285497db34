"""A trial stopped at a rung, for real: local Ray, the real trainable, SQLite MLflow and Optuna.

Which trial stops is decided by a stand-in for `ParetoHalving` (the rule itself is tested on
constructed results in test_scheduler.py), so the outcome is deterministic: the second trial to
reach epoch 1 is stopped there.
"""
from __future__ import annotations

import optuna
import pytest
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

import search.scheduler
from pipelines.data import prepare_animal_mnist
from search.run import run_search
from search.space import parse_space
from search.tracking import Tracker


class StopSecondArrival(FIFOScheduler):
    def __init__(self, *, rungs: list[int], eta: float, metric: str = "val_accuracy") -> None:
        super().__init__()
        self.rungs, self.arrived = rungs, []

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("epoch") in self.rungs and trial.trial_id not in self.arrived:
            self.arrived.append(trial.trial_id)
            if len(self.arrived) == 2:
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


@pytest.fixture(scope="module")
def halved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("halving")
    data = prepare_animal_mnist(work / "animal_mnist")
    experiment = parse_space(
        {
            "name": "halving",
            "data": {"path": str(data), "image_size": 32, "max_images_per_class": 20},
            "teacher": {"epochs": 1},
            "trial": {"epochs": 2, "bn_recalibration_batches": 2},
            "search": {"num_trials": 3, "max_concurrent": 1, "rungs": [1], "uniform_anchors": [0.5, 0.2, 0.08]},
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search.scheduler, "ParetoHalving", StopSecondArrival)
        outcome = run_search(experiment, output=work / "runs", log=lambda line: None)
    return {"outcome": outcome, "tracker": Tracker(outcome.tracking_uri, "halving")}


def test_the_stopped_trial_is_killed_in_mlflow_with_its_epoch(halved: dict) -> None:
    tracker: Tracker = halved["tracker"]
    search = tracker.latest_search()
    trials = tracker.children(search.run_id, role="trial")
    assert sorted(r.status for r in trials) == ["FINISHED", "FINISHED", "KILLED"]
    (stopped,) = [r for r in trials if r.status == "KILLED"]
    assert stopped.tags["stopped_at_epoch"] == "1" and "error" not in stopped.tags
    assert search.metrics["stopped_trials"] == 1 and search.metrics["failed_trials"] == 0
    assert search.metrics["fine_tune_epochs"] == 2 + 1 + 2  # the stopped trial's one epoch counts


def test_the_stopped_trial_is_pruned_in_optuna_and_never_on_the_front(halved: dict) -> None:
    outcome = halved["outcome"]
    front = outcome.front
    stopped = [r.run_id for r in front.trials if r.status == "KILLED"]
    assert stopped and not set(stopped) & {r.run_id for r in front.front}
    assert all(r.tags["pareto"] == "false" for r in front.trials if r.run_id in stopped)
    storage = f"sqlite:///{outcome.layout.directory / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    (pruned,) = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned.values is None and pruned.user_attrs["stopped_epoch"] == 1.0
