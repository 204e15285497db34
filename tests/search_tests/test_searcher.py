from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from search.searcher import DistinctOptunaSearch

SPACE = {"x": CategoricalDistribution(["a", "b", "c"])}


def searcher(*, retries: int = 10, space: dict | None = SPACE) -> DistinctOptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return DistinctOptunaSearch(
        space=space, metric=["acc", "macs"], mode=["max", "min"], sampler=optuna.samplers.RandomSampler(seed=0), retries=retries
    )


def test_every_handed_out_configuration_is_new_and_repeats_are_failed_in_optuna() -> None:
    search = searcher()
    configs = [search.suggest(f"t{i}") for i in range(3)]
    assert sorted(c["x"] for c in configs) == ["a", "b", "c"]
    for i in range(3):
        search.on_trial_complete(f"t{i}", result={"acc": 0.5, "macs": 1.0})
    states = [t.state for t in search._ot_study.trials]
    assert states.count(TrialState.COMPLETE) == 3
    assert states.count(TrialState.FAIL) == search.repeats_skipped > 0  # seed 0 repeats at least once


@pytest.mark.parametrize("retries", [0, 2])
def test_an_exhausted_space_still_gets_a_configuration(retries: int) -> None:
    search = searcher(retries=retries)
    for i in range(3 if retries else 1):
        search.suggest(f"t{i}")
    skipped = search.repeats_skipped
    assert search.suggest("more")["x"] in {"a", "b", "c"}  # a repeat, after `retries` failed asks
    assert search.repeats_skipped - skipped == retries
    search.on_trial_complete("more", result={"acc": 0.5, "macs": 1.0})
    assert search._ot_study.trials[-1].state == TrialState.COMPLETE


def test_inside_ray_tune_each_trial_runs_a_distinct_configuration(tmp_path: Path) -> None:
    import ray
    from ray import tune

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    search = searcher(space=None)  # as search.run builds it: the space comes from the Tuner

    def trainable(config: dict) -> dict:
        return {"acc": {"a": 0.1, "b": 0.2, "c": 0.3}[config["x"]], "macs": 1.0}

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        results = tune.Tuner(
            trainable,
            param_space={"x": tune.choice(["a", "b", "c"])},
            tune_config=tune.TuneConfig(search_alg=search, num_samples=3, max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
        ).fit()
    finally:
        ray.shutdown()
    assert sorted(r.config["x"] for r in results) == ["a", "b", "c"]
    assert sorted(r.metrics["acc"] for r in results) == [0.1, 0.2, 0.3]
    assert search.repeats_skipped > 0  # the sampler did repeat itself, and Tune used this very searcher
