"""The function one Ray Tune trial runs: knobs -> `pipelines.run_trial`, tracked in MLflow.

Everything a trial reads comes through Ray (the decoded data, the teacher's files) or MLflow (the
model it starts from); everything it writes goes to MLflow (its run, its exported model). So on a
cluster only the MLflow server and Ray Tune's storage need to be reachable, not the output folder.

A trial that raises is recorded FAILED in MLflow (with its error) and reports `failed`, so Optuna
records it as failed too and Tune does not retry it (the same knobs would fail again); the search
goes on with the other trials. Tune retries (`search.max_failures`) only trials whose process or
node died, and `slimtune resume` continues those its dead or interrupted driver left: the trial
continues the same MLflow run, from its last epoch's checkpoint (`pipelines.checkpoint.TrialState`),
and counts itself in the tag `slimtune.resumed`; one whose run
already FINISHED reports that run's results instead of running again. A
trial the scheduler stops (Ray raises SystemExit inside `tune.report`) ends KILLED with the tag
`stopped_at_epoch`.
"""
from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.data import Splits
from pipelines.prune import Group
from search.cluster import unpack
from search.knobs import resolve, trial_params
from search.space import Experiment
from search.tracking import STOPPED_TAG

__all__ = ["TrialContext", "run_tune_trial", "run_job", "NODE_TAG", "NOT_KNOBS", "VERIFY_TAG", "SEED_TAG"]

NODE_TAG = "slimtune.node_id"
VERIFY_TAG = "slimtune.verify_of"  # on a `verify` run: the front member's run it re-trains with another seed
SEED_TAG = "slimtune.seed"  # on a `verify` run: its `trial.seed`
# What the searcher (start_from*, anchor) or `verify` (seed, verify_of) adds to a trial's config.
NOT_KNOBS = ("start_from", "start_from_run", "anchor", "seed", "verify_of")


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its sampled config; Ray sends it once to each node."""

    experiment: Experiment
    tracking_uri: str
    experiment_name: str
    parent_run_id: str
    config_yaml: str  # the resolved space, saved beside every exported model
    groups: tuple[Group, ...]
    splits: Splits  # decoded once, by the driver
    teacher: dict[str, bytes]  # the teacher folder's files
    role: str = "trial"  # the MLflow runs' role tag: `verify` runs are not trials of the search


@functools.lru_cache(maxsize=4)
def _tracker(tracking_uri: str, experiment: str) -> Any:
    """One MLflow client per process: with reused actors, successive trials share it."""
    from search.tracking import Tracker

    return Tracker(tracking_uri, experiment)


def _end_stopped(tracker: Any, run_id: str, parent_id: str, otherwise: dict[str, str] | None) -> bool:
    """End the run KILLED as interrupted if the driver marked the search so (Ctrl-C, SIGTERM), else
    with the tags `otherwise` (None: leave it); whether it was ended here."""
    from search.tracking import INTERRUPTED_TAG

    signal_name = tracker.get(parent_id).tags.get(INTERRUPTED_TAG)
    if signal_name is None and otherwise is None:
        return False
    tracker.set_tags(run_id, {INTERRUPTED_TAG: signal_name} if signal_name else otherwise)
    tracker.end_run(run_id, "KILLED")
    return True


def run_tune_trial(config: dict[str, Any], context: TrialContext) -> None:
    import ray
    import torch
    from ray import tune

    from pipelines.checkpoint import checkpoint_epoch
    from pipelines.trial import run_trial
    from search.tracking import ANCHOR_TAG, RESUMED_FROM_TAG, TRIAL_TAG

    started = time.perf_counter()
    experiment = context.experiment
    torch.set_num_threads(max(1, int(experiment.search.cpus_per_trial)))
    trial_id = tune.get_context().get_trial_id()
    tracker = _tracker(context.tracking_uri, context.experiment_name)
    node = ray.get_runtime_context().get_node_id()
    earlier = tracker.trial_run(context.parent_run_id, trial_id)  # a retry, or a trial `slimtune resume` continues
    parent = config.get("start_from")
    if earlier is not None and earlier.status == "FINISHED":  # finished after Tune last saved its state: not rerun
        tune.report({**earlier.metrics, "final": True, "mlflow_run_id": earlier.run_id, **({"start_from": parent} if parent else {})})
        return
    finetune = experiment.trial if "seed" not in config else dataclasses.replace(experiment.trial, seed=int(config["seed"]))
    if earlier is None:
        tags = {TRIAL_TAG: trial_id, NODE_TAG: node, **({ANCHOR_TAG: "true"} if config.get("anchor") else {})}
        if "verify_of" in config:
            tags.update({VERIFY_TAG: config["verify_of"], SEED_TAG: str(finetune.seed)})
        name = f"{context.role}-{trial_id}"
        run_id, logged_through = tracker.start_run(name, role=context.role, parent_id=context.parent_run_id, tags=tags), 0
    else:
        run_id, logged_through = earlier.run_id, int(earlier.metrics.get("epoch", 0))
        tracker.reopen(run_id)
        tracker.set_tags(run_id, {NODE_TAG: node})
    epoch = 0
    try:
        knobs = resolve({k: v for k, v in config.items() if k not in NOT_KNOBS}, experiment, context.groups)
        tracker.log_params(run_id, {**knobs, "start_from": parent or "teacher", "seed": finetune.seed})

        with tempfile.TemporaryDirectory(prefix="slimtune-trial-") as work:
            output_dir, checkpoint_dir, resume_dir = Path(work) / "model", Path(work) / "checkpoint", Path(work) / "resume"
            checkpoint = tune.get_checkpoint()
            if checkpoint is not None:
                checkpoint.to_directory(str(resume_dir))
            if earlier is not None:
                tracker.set_tags(run_id, {RESUMED_FROM_TAG: str(checkpoint_epoch(resume_dir) if checkpoint is not None else 0)})

            def on_epoch_end(metrics: dict[str, float]) -> None:
                nonlocal epoch
                epoch = int(metrics["epoch"])
                if epoch > logged_through:  # a trial restarted without a checkpoint repeats epochs MLflow has
                    tracker.log_metrics(run_id, metrics, step=epoch)
                saved = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir.exists() else None
                tune.report(metrics, checkpoint=saved)  # Tune copies it to its storage now
            final = run_trial(
                trial_params(knobs, experiment, context.groups),
                data=experiment.data,
                model=experiment.model,
                finetune=finetune,
                teacher_dir=unpack(context.teacher, Path(work) / "teacher"),
                output_dir=output_dir,
                start_from=None if parent is None or checkpoint else tracker.download(config["start_from_run"], "model", Path(work) / "parent"),
                splits=context.splits,
                on_epoch_end=on_epoch_end,
                checkpoint_dir=checkpoint_dir,
                resume_from=resume_dir if checkpoint is not None else None,
            )
            (output_dir / "config.yaml").write_text(context.config_yaml)
            final["seconds"] = time.perf_counter() - started
            tracker.log_metrics(run_id, final, step=finetune.epochs)
            tracker.log_artifacts(run_id, output_dir, "model")
        tracker.end_run(run_id, "FINISHED")
    except SystemExit:
        _end_stopped(tracker, run_id, context.parent_run_id, {STOPPED_TAG: str(epoch)})
        raise
    except Exception as error:
        if not _end_stopped(tracker, run_id, context.parent_run_id, None):  # not an error the interruption caused
            tracker.fail_run(run_id, error)
        tune.report({"failed": True, "epoch": epoch})
        return
    except BaseException as error:
        tracker.fail_run(run_id, error)
        raise
    # Report only after the run is FINISHED, so a trial Tune counts as done is done in MLflow too.
    tune.report({**final, "final": True, "mlflow_run_id": run_id, **({"start_from": parent} if parent else {})})


def run_job(config: dict[str, Any], context: TrialContext, jobs: tuple[dict[str, Any], ...]) -> None:
    """`run_tune_trial` of the fixed trial config `jobs[config["job"]]`: how `verify` runs a list of
    configs through Tune (a grid over their indices) instead of a searcher's suggestions."""
    run_tune_trial(jobs[int(config["job"])], context)
