"""`slimtune search`: teacher once, then Ray Tune + Optuna trials, then the Pareto front.

Ray, Optuna and MLflow are imported here (not at CLI start-up) so that `slimtune --help` is instant.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from search._helpers import format_count
from search.front import SearchFront, front_of
from search.layout import Layout
from search.space import Experiment, SpaceError, to_dict
from search.tracking import PARETO_TAG, Tracker

__all__ = ["run_search", "SearchOutcome"]

Log = Callable[[str], None]
OBJECTIVES = {"val_accuracy": "max", "macs": "min"}


@dataclass(frozen=True)
class SearchOutcome:
    layout: Layout
    tracking_uri: str
    front: SearchFront


def _configure_ray_environment() -> None:
    # Ray 2.60 turns token auth on by default; a laptop run has no token to manage.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Per-epoch reports carry no `macs` (widths change between pruning rounds); only the final
    # report holds both objectives, which is the one Optuna is told.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")


def _ensure_teacher(experiment: Experiment, layout: Layout, tracker: Tracker, parent_id: str, log: Log) -> Path:
    """Train the dense teacher unless this exact teacher already exists; log it as the `teacher` run."""
    from pipelines.export import SPEC_FILE
    from pipelines.trial import TEACHER_LOGITS_FILE, train_teacher

    directory = layout.teacher_dir(experiment)
    run_id = tracker.start_run("teacher", role="teacher", parent_id=parent_id)
    try:
        tracker.log_params(run_id, {"arch": experiment.model.arch, "weights": experiment.model.weights, **to_dict(experiment.teacher)})
        if (directory / SPEC_FILE).exists() and (directory / TEACHER_LOGITS_FILE).exists():
            metrics = json.loads((directory / SPEC_FILE).read_text())["metrics"]
            tracker.set_tags(run_id, {"reused_from": str(directory)})
            log(f"teacher: reusing {directory}")
        else:
            log(f"teacher: fine-tuning {experiment.model.arch} ({experiment.model.weights}) for {experiment.teacher.epochs} epochs")

            def on_epoch_end(metrics: dict[str, float]) -> None:
                tracker.log_metrics(run_id, metrics, step=int(metrics["epoch"]))
                log(f"  teacher epoch {int(metrics['epoch'])}/{experiment.teacher.epochs}: loss {metrics['loss_total']:.3f}, val acc {metrics['val_accuracy']:.3f}")

            started = time.perf_counter()
            metrics = train_teacher(
                data=experiment.data,
                model=experiment.model,
                finetune=experiment.teacher,
                output_dir=directory,
                on_epoch_end=on_epoch_end,
            )
            metrics["seconds"] = time.perf_counter() - started
        tracker.log_metrics(run_id, {**metrics, "macs_ratio": 1.0}, step=experiment.teacher.epochs)
        tracker.end_run(run_id)
    except BaseException as error:
        tracker.fail_run(run_id, error)
        raise
    log(
        f"teacher: val acc {metrics['val_accuracy']:.3f}, test acc {metrics['test_accuracy']:.3f},"
        f" {format_count(metrics['macs'])} MACs, {format_count(metrics['params'])} params"
    )
    return directory


def _budget_names(experiment: Experiment, groups: tuple[Any, ...]) -> list[str]:
    """The keep-ratio knobs: groups and/or stages (groups too small to prune have none)."""
    budgets = experiment.search.budgets
    names: list[str] = []
    if "group" in budgets.granularity:
        names += [g.name for g in groups if g.channels > budgets.min_channels]
    if "stage" in budgets.granularity:
        names += sorted({g.stage for g in groups if g.channels > budgets.min_channels})
    return names


def _param_space(experiment: Experiment, groups: tuple[Any, ...]) -> dict[str, Any]:
    """Only the knobs the space's choices can use; single choices stay out (the trial reads them)."""
    from ray import tune

    def domain(r: Any) -> Any:
        return (tune.loguniform if r.log and r.low < r.high else tune.uniform)(r.low, r.high)

    s = experiment.search
    budgets = s.budgets
    names = _budget_names(experiment, groups)
    unknown = set(budgets.overrides) - set(names)
    if unknown:
        raise SpaceError(
            f"search.budgets.overrides.{sorted(unknown)[0]}: no prunable group or stage of that name;"
            f" valid: {', '.join(names)}"
        )
    space: dict[str, Any] = {"lr": domain(s.lr)}
    if names:
        space["keep"] = {name: domain(budgets.overrides.get(name, budgets.keep_ratio)) for name in names}
    if "theta" in budgets.granularity:
        space["theta"] = domain(budgets.theta)
    if "global_percentile" in budgets.granularity:
        space["percentile"] = domain(budgets.percentile)
    for name, choices in (
        ("parametrisation", budgets.granularity),
        ("criterion", s.importance),
        ("schedule", s.schedule),
        ("teacher", s.teacher),
    ):
        if len(choices) > 1:
            space[name] = tune.choice(list(choices))
    if "target" in s.teacher:
        space["kd_alpha"] = domain(s.kd_alpha)
    if {"target", "source_classifier"} & set(s.teacher):
        space["kd_temperature"] = domain(s.kd_temperature)
    if "source_classifier" in s.teacher:
        space["source_kd_weight"] = domain(s.source_kd_weight)
    if "source_features" in s.teacher:
        space["feature_weight"] = domain(s.feature_weight)
    if s.l2sp_alpha.high > 0:
        space["l2sp_alpha"] = domain(s.l2sp_alpha)
    if s.bn_sparsity.high > 0:
        space["bn_sparsity"] = domain(s.bn_sparsity)
    if s.gating_density is not None:
        space["density"] = {stage: domain(s.gating_density) for stage in sorted({g.stage for g in groups}) if stage != "classifier"}
    return space


def _midpoint(domain: Any) -> float:
    """Middle of a Ray Tune float domain (geometric for log-uniform)."""
    if type(domain.get_sampler()).__name__ == "_LogUniform":
        return math.sqrt(domain.lower * domain.upper)
    return (domain.lower + domain.upper) / 2


def _anchor_points(experiment: Experiment, space: dict[str, Any]) -> list[dict[str, Any]]:
    """Uniform-ratio trials (clipped into each knob's range), every other knob at its first choice
    or range midpoint: the plain uniform-pruning baseline, in Optuna's flattened names."""
    s = experiment.search
    if "keep" not in space:
        return []
    points = []
    for ratio in s.uniform_anchors[: s.num_trials]:
        point: dict[str, Any] = {}
        for name, domain in space.items():
            if name == "keep":
                for group, d in domain.items():
                    point[f"keep/{group}"] = min(max(ratio, d.lower), d.upper)
            elif isinstance(domain, dict):
                point.update({f"{name}/{k}": _midpoint(d) for k, d in domain.items()})
            elif hasattr(domain, "categories"):
                point[name] = "group" if name == "parametrisation" and "group" in domain.categories else domain.categories[0]
            else:
                point[name] = _midpoint(domain)
        points.append(point)
    return points


def _sampler(experiment: Experiment) -> Any:
    import optuna

    s = experiment.search
    if s.sampler == "nsga2":
        # Smaller generations than Optuna's default 50 so that a 16-trial search evolves at all.
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, s.num_trials // 2)), seed=s.seed)
    return optuna.samplers.TPESampler(
        seed=s.seed, multivariate=True, constant_liar=True, n_startup_trials=max(4, s.num_trials // 3)
    )


def _progress_callback(total: int, log: Log) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0
            self.started: dict[str, float] = {}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.trial_id] = time.time()

        def _elapsed(self, trial: Any) -> str:
            return f"{time.time() - self.started.get(trial.trial_id, time.time()):.0f} s"

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            r = trial.last_result
            log(
                f"[{self.done}/{total}] trial {trial.trial_id}: val acc {r['val_accuracy']:.3f},"
                f" test acc {r['test_accuracy']:.3f}, {format_count(r['macs'])} MACs ({r['macs_ratio']:.2f}x teacher),"
                f" proxy {r['proxy_accuracy']:.3f}, {self._elapsed(trial)}"
            )

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            log(f"[{self.done}/{total}] trial {trial.trial_id}: FAILED after {self._elapsed(trial)} (error in MLflow run tag 'error')")

    return Progress()


def _run_trials(
    experiment: Experiment, layout: Layout, context: Any, space: dict[str, Any], *, study_name: str, log: Log
) -> None:
    import optuna
    from ray import tune
    from search.searcher import DistinctOptunaSearch
    from search.trainable import run_tune_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = experiment.search
    searcher = DistinctOptunaSearch(
        metric=list(OBJECTIVES),
        mode=list(OBJECTIVES.values()),
        points_to_evaluate=_anchor_points(experiment, space),
        sampler=_sampler(experiment),
        study_name=study_name,
        storage=optuna.storages.RDBStorage(layout.optuna_storage),
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_tune_trial, context=context), {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=s.num_trials, max_concurrent_trials=s.max_concurrent),
        run_config=tune.RunConfig(
            name=study_name,
            storage_path=str(layout.ray_storage),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
            callbacks=[_progress_callback(s.num_trials, log)],
        ),
    )
    log(f"search: {s.num_trials} trials, {s.max_concurrent} at a time, sampler {s.sampler} (seed {s.seed})")
    tuner.fit()
    if searcher.repeats_skipped:
        log(f"search: skipped {searcher.repeats_skipped} repeated configuration(s) the sampler proposed")


def _publish_front(tracker: Tracker, parent_id: str, front: SearchFront, experiment: Experiment, layout: Layout) -> None:
    from search.report import front_csv, front_json, front_rows, plot_front

    members = {r.run_id for r in front.front}
    for run in front.trials:
        tracker.set_tags(run.run_id, {PARETO_TAG: str(run.run_id in members).lower()})
    rows = front_rows(front.front)
    tracker.log_text(parent_id, front_csv(rows), "front.csv")
    tracker.log_text(parent_id, front_json(rows), "front.json")
    if front.teacher is not None and front.finished:
        path = plot_front(
            front.finished, rows, teacher=front.teacher.metrics, title=f"{experiment.name}: accuracy vs MACs", path=layout.directory / "front.png"
        )
        tracker.log_artifact(parent_id, path)
    tracker.log_metrics(parent_id, {"finished_trials": len(front.finished), "failed_trials": len(front.trials) - len(front.finished), "front_size": len(front.front)})


def run_search(
    experiment: Experiment,
    *,
    output: str | Path,
    tracking_uri: str | None = None,
    address: str | None = None,
    log: Log = print,
) -> SearchOutcome:
    """Run one search end to end; every run it opens ends FINISHED, FAILED or KILLED."""
    _configure_ray_environment()
    import ray

    from pipelines.export import load_model
    from pipelines.prune import prunable_groups
    from search.trainable import TrialContext

    layout = Layout.at(output, experiment.name).make()
    uri = tracking_uri or layout.tracking_uri
    config_yaml = yaml.safe_dump(to_dict(experiment), sort_keys=False)
    layout.config_file.write_text(config_yaml)
    tracker = Tracker(uri, experiment.name, artifact_location=layout.artifacts)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent_id = tracker.start_run(f"search-{stamp}", role="search")
    log(f"MLflow: experiment {experiment.name!r}, parent run {parent_id} in {uri}")
    try:
        tracker.log_text(parent_id, config_yaml, "config.yaml")
        tracker.log_params(parent_id, {"arch": experiment.model.arch, "num_trials": experiment.search.num_trials, "sampler": experiment.search.sampler})
        teacher_dir = _ensure_teacher(experiment, layout, tracker, parent_id, log)
        teacher, _ = load_model(teacher_dir)
        try:
            groups = tuple(prunable_groups(teacher, image_size=experiment.data.image_size))
        except Exception as error:  # Torch-Pruning cannot trace some architectures (e.g. channel shuffle)
            raise SpaceError(
                f"model.arch: {experiment.model.arch} cannot be pruned structurally ({type(error).__name__}: {error});"
                " tested: mobilenet_v2, resnet18, resnet50, vgg11_bn, densenet121"
            ) from error
        log(f"pruning: {len(groups)} dependency groups in {len(set(g.stage for g in groups))} stages, budgets per {experiment.search.budgets.granularity}")
        context = TrialContext(
            experiment=experiment,
            tracking_uri=uri,
            experiment_name=experiment.name,
            parent_run_id=parent_id,
            teacher_dir=str(teacher_dir),
            trials_dir=str(layout.directory / "trials"),
            config_yaml=config_yaml,
            groups=groups,
        )
        space = _param_space(experiment, groups)  # before Ray starts: bad overrides fail fast
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            _run_trials(experiment, layout, context, space, study_name=f"{experiment.name}-{stamp}", log=log)
        finally:
            ray.shutdown()
        front = front_of(tracker, tracker.get(parent_id))
        _publish_front(tracker, parent_id, front, experiment, layout)
        tracker.end_run(parent_id, "FINISHED")
    except KeyboardInterrupt:
        tracker.end_run(parent_id, "KILLED")
        raise
    except BaseException as error:
        tracker.fail_run(parent_id, error)
        raise
    return SearchOutcome(layout=layout, tracking_uri=uri, front=front)
