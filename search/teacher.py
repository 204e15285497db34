"""The dense teacher: fine-tuned once per search as a Ray task (on whichever node has the trials'
resources), reused while its data, model and teacher config are unchanged, logged as the `teacher`
run. Its epochs reach the console through MLflow, where the task logs them.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search._helpers import format_accuracies, format_count
from search.layout import Layout
from search.space import Experiment, SpaceError, to_dict
from search.tracking import Tracker

__all__ = ["ensure_teacher", "IMBALANCE_HINT"]

IMBALANCE_HINT = 0.05  # val accuracy this far above val balanced accuracy suggests `search.metric: balanced_accuracy`

Log = Callable[[str], None]


def _train_teacher_task(experiment: Experiment, splits: Any, tracking_uri: str, run_id: str, threads: int) -> tuple[dict, dict]:
    """Runs as a Ray task, on whichever node has the resources: fine-tune, log each epoch to the
    teacher's MLflow run, return the metrics and the teacher folder's files."""
    import tempfile

    import torch

    from pipelines.teacher import train_teacher
    from search.cluster import pack

    torch.set_num_threads(threads)
    tracker = Tracker(tracking_uri, experiment.name)
    with tempfile.TemporaryDirectory(prefix="slimtune-teacher-") as directory:
        started = time.perf_counter()
        metrics = train_teacher(
            data=experiment.data,
            model=experiment.model,
            finetune=experiment.teacher,
            output_dir=directory,
            splits=splits,
            on_epoch_end=lambda m: tracker.log_metrics(run_id, m, step=int(m["epoch"])),
            metric=experiment.search.metric,
        )
        metrics["seconds"] = time.perf_counter() - started
        return metrics, pack(Path(directory))


def _teacher_resources(experiment: Experiment) -> dict[str, float]:
    """The trials' whole share while nothing else runs (max_concurrent x cpus_per_trial), within the largest node."""
    import ray

    s = experiment.search
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=s.cpus_per_trial)
    return {"num_cpus": max(s.cpus_per_trial, min(largest, s.max_concurrent * s.cpus_per_trial)), "num_gpus": s.gpus_per_trial}


def _show_epochs(tracker: Tracker, run_id: str, *, shown: int, of: int, log: Log) -> int:
    """Print the teacher epochs logged since the first `shown`; returns how many are shown now."""
    history = {name: tracker.client.get_metric_history(run_id, name) for name in ("loss_total", "val_accuracy")}
    values = {name: {m.step: m.value for m in points} for name, points in history.items()}
    epochs = sorted(values["loss_total"].keys() & values["val_accuracy"].keys())
    for epoch in epochs[shown:]:
        log(f"  teacher epoch {epoch}/{of}: loss {values['loss_total'][epoch]:.3f}, val acc {values['val_accuracy'][epoch]:.3f}")
    return max(shown, len(epochs))


def ensure_teacher(experiment: Experiment, splits: Any, layout: Layout, tracker: Tracker, parent_id: str, log: Log) -> Path:
    """Train the dense teacher (a Ray task) unless this exact teacher already exists; log it as the
    `teacher` run, with its per-class table and confusion matrices as artifacts."""
    import ray

    from pipelines.export import SPEC_FILE
    from pipelines.metrics import CLASS_REPORT_FILE, PER_CLASS_FILE
    from pipelines.teacher import TEACHER_LOGITS_FILE
    from search.cluster import unpack

    directory = layout.teacher_dir(experiment)
    # A teacher exported before the per-class report (and balanced accuracy) existed is trained again.
    ready = all((directory / name).exists() for name in (SPEC_FILE, TEACHER_LOGITS_FILE, CLASS_REPORT_FILE))
    if ready and any(r.status == "FINISHED" for r in tracker.children(parent_id, role="teacher")):  # a resumed search
        log(f"teacher: reusing {directory}, logged in this search already")
        return directory
    run_id = tracker.start_run("teacher", role="teacher", parent_id=parent_id)
    try:
        tracker.log_params(run_id, {"arch": experiment.model.arch, "weights": experiment.model.weights, **to_dict(experiment.teacher)})
        if ready:
            metrics = json.loads((directory / SPEC_FILE).read_text())["metrics"]
            tracker.set_tags(run_id, {"reused_from": str(directory)})
            log(f"teacher: reusing {directory}")
        else:
            stale = sorted(p.name for p in directory.parent.glob(directory.name.rsplit("-", 1)[0] + "-*") if p != directory)
            if stale:
                log(f"teacher: the files in {experiment.data.path} changed since {stale[-1]}: not reusing it")
            log(f"teacher: fine-tuning {experiment.model.arch} ({experiment.model.weights}) for {experiment.teacher.epochs} epochs")
            resources = _teacher_resources(experiment)
            task = ray.remote(**resources)(_train_teacher_task).remote(
                experiment, splits, tracker.tracking_uri, run_id, max(1, int(resources["num_cpus"]))
            )
            shown, done = 0, False
            while not done:  # the task logs each epoch to MLflow; show them as they arrive
                done = bool(ray.wait([task], timeout=2.0)[0])
                shown = _show_epochs(tracker, run_id, shown=shown, of=experiment.teacher.epochs, log=log)
            try:
                metrics, files = ray.get(task)
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, FloatingPointError):  # not a bug: a setting that makes this data diverge
                    where = str(error.cause).split(":")[0]  # "loss is nan at step 5 of epoch 1"
                    raise SpaceError(f"teacher.lr: {experiment.teacher.lr:g} makes the teacher's fine-tune diverge ({where}); try a lower teacher.lr") from None
                raise error.cause from None  # the task's own error (e.g. weights unavailable offline), not Ray's wrapper
            unpack(files, directory)
        tracker.log_metrics(run_id, {**metrics, "macs_ratio": 1.0}, step=experiment.teacher.epochs)
        for name in (CLASS_REPORT_FILE, PER_CLASS_FILE):
            tracker.log_artifact(run_id, directory / name)
        tracker.end_run(run_id)
    except KeyboardInterrupt:
        tracker.end_run(run_id, "KILLED")
        raise
    except BaseException as error:
        tracker.fail_run(run_id, error)
        raise
    metric = experiment.search.metric
    log(f"teacher: {format_accuracies(metrics, metric)}, {format_count(metrics['macs'])} MACs, {format_count(metrics['params'])} params")
    gap = metrics["val_accuracy"] - metrics.get("val_balanced_accuracy", metrics["val_accuracy"])
    if metric == "accuracy" and gap >= IMBALANCE_HINT:
        log(
            f"teacher: val balanced accuracy {metrics['val_balanced_accuracy']:.3f} is {gap:.2f} below val accuracy: some classes are"
            " recognised far worse than others; `search.metric: balanced_accuracy` makes the search select on it"
        )
    return directory
