from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search.searcher import FinishedTrial, StudySearcher, choose_parent, close_running

SPACE = {"x": CategoricalDistribution(["a", "b", "c"])}


def searcher(*, space: dict = SPACE, retries: int = 10, **kwargs) -> StudySearcher:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    return StudySearcher(study, space, trial_epochs=kwargs.pop("trial_epochs", 2), retries=retries, **kwargs)


def final(acc: float = 0.5, macs: float = 1.0, ratio: float = 0.5) -> dict:
    return {"final": True, "val_accuracy": acc, "macs": macs, "macs_ratio": ratio}


def states(search: StudySearcher) -> list[TrialState]:
    return [t.state for t in search.study.trials]


def test_every_handed_out_configuration_is_new_and_repeats_are_failed_in_optuna() -> None:
    search = searcher()
    configs = [search.suggest(f"t{i}") for i in range(3)]
    assert sorted(c["x"] for c in configs) == ["a", "b", "c"]
    for i in range(3):
        search.on_trial_complete(f"t{i}", result=final())
    assert states(search).count(TrialState.COMPLETE) == 3
    assert states(search).count(TrialState.FAIL) == search.repeats_skipped > 0  # seed 0 repeats at least once


@pytest.mark.parametrize("retries", [0, 2])
def test_an_exhausted_space_still_gets_a_configuration(retries: int) -> None:
    search = searcher(retries=retries)
    for i in range(3 if retries else 1):
        search.suggest(f"t{i}")
    skipped = search.repeats_skipped
    assert search.suggest("more")["x"] in {"a", "b", "c"}  # a repeat, after `retries` failed asks
    assert search.repeats_skipped - skipped == retries
    search.on_trial_complete("more", result=final())
    assert search.study.trials[-1].state == TrialState.COMPLETE


def test_anchors_come_first_in_order_and_are_marked() -> None:
    space = {"target_macs": FloatDistribution(0.01, 1.0, log=True)}
    anchors = [{"target_macs": 0.5}, {"target_macs": 0.1}]
    search = searcher(space=space, anchors=anchors)
    first, second, third = (search.suggest(f"t{i}") for i in range(3))
    assert first == {"target_macs": 0.5, "anchor": True} and second == {"target_macs": 0.1, "anchor": True}
    assert "anchor" not in third


@pytest.mark.parametrize(
    ("result", "error", "state"),
    [
        (final(), False, TrialState.COMPLETE),
        ({"epoch": 1, "val_accuracy": 0.4, "macs": 2.0}, False, TrialState.PRUNED),  # stopped at a rung
        ({"epoch": 1, "val_accuracy": 0.4, "macs": 2.0}, True, TrialState.FAIL),
        (None, True, TrialState.FAIL),
    ],
    ids=["finished", "stopped", "raised-after-a-report", "raised"],
)
def test_optuna_state_follows_how_the_trial_ended(result: dict | None, error: bool, state: TrialState) -> None:
    search = searcher()
    search.suggest("t0")
    search.on_trial_complete("t0", result=result, error=error)
    (trial,) = search.study.trials
    assert trial.state == state
    if state == TrialState.PRUNED:
        assert trial.values is None  # partial values never reach the samplers or the front
        assert trial.user_attrs["stopped_epoch"] == 1.0 and trial.user_attrs["stopped_val_accuracy"] == 0.4
    if state == TrialState.COMPLETE:
        assert trial.values == [0.5, 1.0]


def test_the_study_and_the_warm_start_front_use_the_objective_they_are_given() -> None:
    search = searcher(objective="val_balanced_accuracy", can_warm_start=lambda config: True)
    search.suggest("t0")
    search.on_trial_complete("t0", result={**final(acc=0.9), "val_balanced_accuracy": 0.6})
    assert search.study.trials[0].values == [0.6, 1.0] and search.finished[0].objective == 0.6
    search.suggest("t1")
    interrupted = close_running(search.study, finished={"t1": {"val_accuracy": 0.9, "val_balanced_accuracy": 0.4, "macs": 2.0}}, objective="val_balanced_accuracy")
    assert interrupted == [] and search.study.trials[-1].values == [0.4, 2.0]


def by_ray_id(search: StudySearcher) -> dict[str, optuna.trial.FrozenTrial]:
    """The newest study trial of each Ray trial id (a resumed one may have a COMPLETE copy)."""
    return {t.user_attrs["ray_trial_id"]: t for t in search.study.trials if "ray_trial_id" in t.user_attrs}


def test_an_interruption_fails_the_running_trials_except_those_mlflow_saw_finish() -> None:
    search = searcher()
    for i in range(3):
        search.suggest(f"t{i}")
    search.on_trial_complete("t0", result=final(acc=0.7))
    # t1 finished its MLflow run, but Tune stopped before its last report reached the searcher
    interrupted = close_running(search.study, finished={"t0": {"val_accuracy": 0.7, "macs": 1.0}, "t1": {"val_accuracy": 0.6, "macs": 3.0}})
    assert interrupted == ["t2"]
    trials = by_ray_id(search)
    assert [trials[t].state for t in ("t0", "t1", "t2")] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert trials["t1"].values == [0.6, 3.0] and trials["t2"].user_attrs["interrupted"]


def saved_with_three_running(tmp_path: Path) -> tuple[StudySearcher, Path]:
    space = {"target_macs": FloatDistribution(0.01, 1.0, log=True)}
    search = searcher(space=space)
    for i in range(4):
        search.suggest(f"t{i}")
    search.on_trial_complete("t0", result=final(acc=0.7))
    search.save(str(tmp_path / "state.json"))
    return search, tmp_path / "state.json"


def restored(search: StudySearcher, state: Path) -> StudySearcher:
    again = searcher(space=search.space)
    again.study = search.study  # what Tune unpickles: the same study storage
    again.restore(str(state))
    return again


def test_after_a_killed_driver_the_restored_searcher_tells_each_trial_once(tmp_path: Path) -> None:
    search, state = saved_with_three_running(tmp_path)
    search.on_trial_complete("t1", result=final(acc=0.6))  # after the save, the driver told t1, asked t4 and died
    search.suggest("t4")
    again = restored(search, state)
    for trial_id in ("t1", "t2", "t3"):  # Tune resumes the trials it saved as running
        again.on_trial_complete(trial_id, result=final(acc=0.5))
    trials = by_ray_id(again)
    assert [trials[t].state for t in ("t0", "t1", "t2", "t3")] == [TrialState.COMPLETE] * 4 and len(again.study.trials) == 5
    assert trials["t1"].values == [0.6, 1.0]  # told by the driver that finished it, not again
    assert trials["t4"].state == TrialState.FAIL and trials["t4"].user_attrs["lost"]  # Tune never knew it
    assert again.suggest("t5")["target_macs"] not in {t.params["target_macs"] for t in again.study.trials[:5]}


def test_an_interrupted_trial_that_finishes_after_resume_is_added_as_complete(tmp_path: Path) -> None:
    search, state = saved_with_three_running(tmp_path)
    assert close_running(search.study, finished={}) == ["t1", "t2", "t3"]  # Ctrl-C
    interrupted = by_ray_id(search)["t2"].number
    again = restored(search, state)
    again.on_trial_complete("t2", result=final(acc=0.5))
    copies = [t for t in again.study.trials if t.user_attrs.get("continues_trial") == interrupted]
    assert len(copies) == 1 and copies[0].state == TrialState.COMPLETE and copies[0].values == [0.5, 1.0]


def test_epoch_budget_counts_epochs_owed_to_running_trials() -> None:
    space = {"x": FloatDistribution(0.0, 1.0)}
    search = searcher(space=space, trial_epochs=4, epoch_budget=10)
    assert isinstance(search.suggest("a"), dict) and isinstance(search.suggest("b"), dict)
    assert search.suggest("c") is None  # 0 spent + 8 owed + 4 > 10: wait for a running trial
    search.on_trial_result("a", {"epoch": 1})
    search.on_trial_complete("a", result={"epoch": 1, "val_accuracy": 0.1, "macs": 1.0})  # stopped after 1 epoch
    assert isinstance(search.suggest("c"), dict)  # 1 spent + 4 owed by b + 4 <= 10
    for trial in ("b", "c"):
        search.on_trial_result(trial, {"epoch": 4})
        search.on_trial_complete(trial, result=final())
    assert search.epochs_used == 9
    assert search.suggest("d") == Searcher.FINISHED  # nothing running, and 9 + 4 > 10


@pytest.mark.parametrize(
    ("target", "expected"),
    [(0.05, "small"), (0.15, "mid"), (0.3, "big"), (0.9, None), (0.1, "mid")],
)
def test_choose_parent_takes_the_front_member_with_fewest_macs_above_the_target(target: float, expected: str | None) -> None:
    finished = [
        FinishedTrial("big", objective=0.95, macs_ratio=0.5),
        FinishedTrial("mid", objective=0.90, macs_ratio=0.2),
        FinishedTrial("dominated", objective=0.80, macs_ratio=0.25),  # worse and larger than "mid"
        FinishedTrial("small", objective=0.85, macs_ratio=0.1),
    ]
    chosen = choose_parent(finished, target)
    assert (chosen.trial_id if chosen else None) == expected


def test_target_trials_start_from_a_finished_parent_when_warm_start_allows() -> None:
    space = {"target_macs": FloatDistribution(0.01, 1.0, log=True)}
    search = searcher(space=space, anchors=[{"target_macs": 0.5}, {"target_macs": 0.1}], can_warm_start=lambda config: True)
    assert "start_from" not in search.suggest("a")  # nothing has finished yet: from the teacher
    search.on_trial_complete("a", result=final(acc=0.9, ratio=0.5))
    assert search.suggest("b")["start_from"] == "a"
    refusing = searcher(space=space, anchors=[{"target_macs": 0.5}, {"target_macs": 0.1}], can_warm_start=lambda config: False)
    refusing.suggest("a")
    refusing.on_trial_complete("a", result=final(acc=0.9, ratio=0.5))
    assert "start_from" not in refusing.suggest("b")


def test_inside_ray_tune_each_trial_runs_a_distinct_configuration(tmp_path: Path) -> None:
    import ray
    from ray import tune

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    search = searcher()

    def trainable(config: dict) -> None:  # self-contained: Ray pickles it to a worker without this module
        tune.report({"epoch": 1, "val_accuracy": 0.0, "macs": 1.0})
        tune.report({"final": True, "val_accuracy": {"a": 0.1, "b": 0.2, "c": 0.3}[config["x"]], "macs": 1.0, "macs_ratio": 1.0})

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        results = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, num_samples=3, max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    assert sorted(r.config["x"] for r in results) == ["a", "b", "c"]
    assert sorted(t.values[0] for t in search.study.trials if t.state == TrialState.COMPLETE) == [0.1, 0.2, 0.3]
    assert search.repeats_skipped > 0  # the sampler did repeat itself, and Tune used this very searcher
    assert search.epochs_used == 3


def test_grid_targets_are_fixed_interleaved_with_anchors_largest_first_and_the_sampler_picks_the_rest() -> None:
    space = {"target_macs": FloatDistribution(0.01, 1.0, log=True), "tilt": FloatDistribution(-1.0, 1.0)}
    search = searcher(space=space, anchors=[{"target_macs": 0.5, "tilt": 0.0}], grid=[0.8, 0.2])
    configs = [search.suggest(f"t{i}") for i in range(3)]
    assert [c["target_macs"] for c in configs] == [0.8, 0.5, 0.2]
    assert [bool(c.get("anchor")) for c in configs] == [False, True, False]
    assert configs[0]["tilt"] != 0.0 and -1.0 <= configs[2]["tilt"] <= 1.0  # sampled, not the anchor's uniform 0


@pytest.mark.parametrize(("n", "expected"), [(0, []), (1, [0.1]), (3, [1.0, 0.1, 0.01])])
def test_target_grid_is_log_spaced_largest_first(n: int, expected: list[float], tmp_path: Path) -> None:
    from search.knobs import target_grid
    from search.space import parse_space

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    raw = {"name": "t", "data": {"path": str(tmp_path)}, "search": {"target_grid": n, "budgets": {"target_macs": {"low": 0.01, "high": 1.0, "log": True}}}}
    assert target_grid(parse_space(raw)) == pytest.approx(expected)
