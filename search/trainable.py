"""The function one Ray Tune trial runs: sample -> `pipelines.run_trial`, tracked in MLflow.

A trial that raises is recorded FAILED in MLflow (with its error) and re-raised, so Ray Tune and
Optuna record it as failed too; the search goes on with the other trials.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipelines.config import TrialParams
from pipelines.prune import Group, stage_ratios_to_groups
from search.space import Experiment

__all__ = ["TrialContext", "trial_params", "run_tune_trial"]


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


def trial_params(config: dict[str, Any], *, experiment: Experiment, groups: tuple[Group, ...]) -> TrialParams:
    """Turn a sampled Tune config into pipeline parameters (per-stage ratios expand to their groups)."""
    keep = {name: float(value) for name, value in config["keep"].items()}
    if experiment.search.budgets.granularity == "stage":
        keep = stage_ratios_to_groups(list(groups), keep)
    return TrialParams(
        keep_ratios=keep,
        lr=float(config["lr"]),
        kd_alpha=float(config["kd_alpha"]),
        kd_temperature=float(config["kd_temperature"]),
        importance=experiment.search.importance,
    )


def _mlflow_params(params: TrialParams) -> dict[str, Any]:
    return {
        **{f"keep.{name}": round(ratio, 4) for name, ratio in params.keep_ratios.items()},
        "lr": params.lr,
        "kd_alpha": params.kd_alpha,
        "kd_temperature": params.kd_temperature,
        "importance": params.importance,
    }


def run_tune_trial(config: dict[str, Any], context: TrialContext) -> None:
    import torch
    from ray import tune

    from pipelines.trial import run_trial
    from search.tracking import TRIAL_TAG, Tracker

    started = time.perf_counter()
    experiment = context.experiment
    torch.set_num_threads(max(1, int(experiment.search.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id()
    tracker = Tracker(context.tracking_uri, context.experiment_name)
    run_id = tracker.start_run(
        f"trial-{trial_id}", role="trial", parent_id=context.parent_run_id, tags={TRIAL_TAG: trial_id}
    )
    try:
        params = trial_params(config, experiment=experiment, groups=context.groups)
        tracker.log_params(run_id, _mlflow_params(params))

        def on_epoch_end(metrics: dict[str, float]) -> None:
            tracker.log_metrics(run_id, metrics, step=int(metrics["epoch"]))
            tune.report(metrics)

        output_dir = f"{context.trials_dir}/{trial_id}"
        final = run_trial(
            params,
            data=experiment.data,
            finetune=experiment.trial,
            teacher_dir=context.teacher_dir,
            output_dir=output_dir,
            on_epoch_end=on_epoch_end,
        )
        with open(f"{output_dir}/config.yaml", "w") as f:
            f.write(context.config_yaml)
        final["seconds"] = time.perf_counter() - started
        tracker.log_metrics(run_id, final, step=experiment.trial.epochs)
        tracker.log_artifacts(run_id, output_dir, "model")
        tracker.end_run(run_id, "FINISHED")
    except BaseException as error:
        tracker.fail_run(run_id, error)
        raise
    # Report only after the run is FINISHED, so a trial Tune counts as done is done in MLflow too.
    tune.report({**final, "done": True, "mlflow_run_id": run_id})
