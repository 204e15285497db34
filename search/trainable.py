"""The function one Ray Tune trial runs: sample -> `pipelines.run_trial`, tracked in MLflow.

A trial that raises is recorded FAILED in MLflow (with its error) and re-raised, so Ray Tune and
Optuna record it as failed too; the search goes on with the other trials.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipelines.config import TrialParams
from pipelines.prune import Group
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


def _losses(config: dict[str, Any], experiment: Experiment, teacher: str) -> dict[str, dict[str, float]]:
    """The distillation terms implied by the teacher choice, plus L2-SP when its weight is > 0."""
    s = experiment.search
    losses: dict[str, dict[str, float]] = {}
    if teacher == "target":
        losses["kd"] = {"alpha": float(config["kd_alpha"]), "temperature": float(config["kd_temperature"])}
    elif teacher == "source_classifier":
        losses["source_kd"] = {"weight": float(config["source_kd_weight"]), "temperature": float(config["kd_temperature"])}
    elif teacher == "source_features":
        losses[s.feature_loss] = {"weight": float(config["feature_weight"])}
    l2sp_alpha = float(config.get("l2sp_alpha", 0.0))
    if l2sp_alpha > 0:
        losses["l2sp"] = {"alpha": l2sp_alpha, "beta": s.l2sp_beta}
    return losses


def trial_params(config: dict[str, Any], *, experiment: Experiment, groups: tuple[Group, ...]) -> TrialParams:
    """Turn a sampled Tune config into pipeline parameters; single choices come from the space."""
    s = experiment.search

    def choice(name: str, choices: list[str]) -> str:
        return str(config.get(name, choices[0]))

    parametrisation = choice("parametrisation", s.budgets.granularity)
    if parametrisation in ("group", "stage"):
        budget = {name: float(value) for name, value in config.get("keep", {}).items()}
        # Groups (or stages) without a knob are too small to prune: they keep every channel.
        names = [g.name for g in groups] if parametrisation == "group" else sorted({g.stage for g in groups})
        budget = {name: budget.get(name, 1.0) for name in names}
    elif parametrisation == "theta":
        budget = {"theta": float(config["theta"])}
    else:
        budget = {"percentile": float(config["percentile"])}
    return TrialParams(
        budget=budget,
        parametrisation=parametrisation,
        criterion=choice("criterion", s.importance),
        schedule=choice("schedule", s.schedule),
        rounds=s.rounds,
        max_drop=s.max_drop,
        bn_sparsity=float(config.get("bn_sparsity", 0.0)),
        lr=float(config["lr"]),
        losses=_losses(config, experiment, choice("teacher", s.teacher)),
        densities={stage: float(d) for stage, d in config.get("density", {}).items()},
        density_warmup=s.gating_warmup,
        class_weighted=s.class_weighted,
        min_channels=s.budgets.min_channels,
    )


def _mlflow_params(params: TrialParams) -> dict[str, Any]:
    flat = {
        **{f"keep.{name}": round(v, 4) for name, v in params.budget.items() if name not in ("theta", "percentile")},
        **{name: v for name, v in params.budget.items() if name in ("theta", "percentile")},
        **{f"density.{stage}": round(d, 4) for stage, d in params.densities.items()},
        **({"density_warmup": params.density_warmup} if params.densities else {}),
        "parametrisation": params.parametrisation,
        "criterion": params.criterion,
        "schedule": params.schedule,
        "teacher": ",".join(params.losses) or "none",
        "lr": params.lr,
        "bn_sparsity": params.bn_sparsity,
    }
    for term, knobs in params.losses.items():
        flat.update({f"{term}.{knob}": value for knob, value in knobs.items()})
    return flat


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
            model=experiment.model,
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
