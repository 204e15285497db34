"""The function one Ray Tune trial runs: knobs -> `pipelines.run_trial`, tracked in MLflow.

A trial that raises is recorded FAILED in MLflow (with its error) and re-raised, so Ray Tune and
Optuna record it as failed too; the search goes on with the other trials. A trial the scheduler
stops (Ray raises SystemExit inside `tune.report`) ends KILLED with the tag `stopped_at_epoch`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipelines.prune import Group
from search.knobs import resolve, trial_params
from search.space import Experiment

__all__ = ["TrialContext", "run_tune_trial", "STOPPED_TAG"]

STOPPED_TAG = "stopped_at_epoch"


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled config; sent once to each worker."""

    experiment: Experiment
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    teacher_dir: str
    trials_dir: str
    config_yaml: str  # the resolved space, saved beside every exported model
    groups: tuple[Group, ...]


def run_tune_trial(config: dict[str, Any], context: TrialContext) -> None:
    import torch
    from ray import tune

    from pipelines.trial import run_trial
    from search.tracking import ANCHOR_TAG, TRIAL_TAG, Tracker

    started = time.perf_counter()
    experiment = context.experiment
    torch.set_num_threads(max(1, int(experiment.search.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id()
    tracker = Tracker(context.tracking_uri, context.experiment_name)
    tags = {TRIAL_TAG: trial_id, **({ANCHOR_TAG: "true"} if config.get("anchor") else {})}
    run_id = tracker.start_run(f"trial-{trial_id}", role="trial", parent_id=context.parent_run_id, tags=tags)
    parent = config.get("start_from")
    epoch = 0
    try:
        knobs = resolve({k: v for k, v in config.items() if k not in ("start_from", "anchor")}, experiment, context.groups)
        tracker.log_params(run_id, {**knobs, "start_from": parent or "teacher"})

        def on_epoch_end(metrics: dict[str, float]) -> None:
            nonlocal epoch
            epoch = int(metrics["epoch"])
            tracker.log_metrics(run_id, metrics, step=epoch)
            tune.report(metrics)

        output_dir = f"{context.trials_dir}/{trial_id}"
        final = run_trial(
            trial_params(knobs, experiment, context.groups),
            data=experiment.data,
            model=experiment.model,
            finetune=experiment.trial,
            teacher_dir=context.teacher_dir,
            output_dir=output_dir,
            start_from=None if parent is None else f"{context.trials_dir}/{parent}",
            on_epoch_end=on_epoch_end,
        )
        with open(f"{output_dir}/config.yaml", "w") as f:
            f.write(context.config_yaml)
        final["seconds"] = time.perf_counter() - started
        tracker.log_metrics(run_id, final, step=experiment.trial.epochs)
        tracker.log_artifacts(run_id, output_dir, "model")
        tracker.end_run(run_id, "FINISHED")
    except SystemExit:
        tracker.set_tags(run_id, {STOPPED_TAG: str(epoch)})
        tracker.end_run(run_id, "KILLED")
        raise
    except BaseException as error:
        tracker.fail_run(run_id, error)
        raise
    # Report only after the run is FINISHED, so a trial Tune counts as done is done in MLflow too.
    tune.report({**final, "final": True, "mlflow_run_id": run_id, **({"start_from": parent} if parent else {})})
