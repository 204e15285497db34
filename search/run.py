"""`slimtune search`: teacher once, then Ray Tune + Optuna trials, then the Pareto front.

Ray, Optuna and MLflow are imported here (not at CLI start-up) so that `slimtune --help` is instant.
"""
from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from search._session import checked_data, end_unfinished, ray_session
from search.front import METRIC_PARAM, SearchFront, front_of
from search.knobs import anchor_points, resolve, search_space, target_grid, trial_params
from search.layout import Layout
from search.space import Experiment, SpaceError, parse_space, to_dict
from search.teacher import ensure_teacher
from search.tracking import INTERRUPTED_TAG, PARETO_TAG, RAY_STORAGE_TAG, TRIAL_TAG, RunRecord, Tracker

__all__ = ["run_search", "resume_search", "open_store", "stored_experiment", "SearchOutcome", "SearchInterrupted"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class SearchOutcome:
    layout: Layout
    tracking_uri: str
    front: SearchFront


class SearchInterrupted(Exception):
    """SIGINT or SIGTERM stopped the trials. Finished trials stay in MLflow, running ones end KILLED
    with the tag `slimtune.interrupted`, and the partial front is published on the parent run,
    which ends KILLED."""

    def __init__(self, signum: int, *, trial_ids: list[str], front: SearchFront | None = None) -> None:
        self.signum, self.trial_ids, self.front = signum, list(trial_ids), front
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 after Ctrl-C, 143 after SIGTERM


class _StopRequest:
    """The first SIGINT or SIGTERM received while the trials run; a second SIGINT aborts at once.

    The first is handed on to Ray Tune's own graceful stop (its SIGUSR1 handler): Tune saves the
    experiment state with the running trials as unfinished, which is what `resume` continues,
    then stops them. `announce` runs first, so that a stopped trial can tell a signal from a
    halving stop."""

    def __init__(self, announce: Callable[[int], None]) -> None:
        self.signum: int | None = None
        self.announce = announce

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        self.announce(signum)
        threading.Thread(target=_stop_tune, daemon=True).start()


def _stop_tune() -> None:
    """Raise SIGUSR1 once Tune's handler for it is installed (at the start of its loop)."""
    deadline = time.monotonic() + 600
    while signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None) and time.monotonic() < deadline:
        time.sleep(0.05)
    signal.raise_signal(signal.SIGUSR1)


@contextlib.contextmanager
def _handling_signals(request: _StopRequest) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return
    previous = {signum: signal.signal(signum, request) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # not an earlier Tune run's handler
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _sampler(experiment: Experiment, *, startup: int) -> Any:
    import optuna

    s = experiment.search
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=startup)
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, constant_liar=True, n_startup_trials=startup)
    if s.sampler == "nsga2":
        # Smaller generations than Optuna's default 50 so that a 16-trial search evolves at all.
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(50, s.num_trials // 2)), seed=s.seed)
    return optuna.samplers.RandomSampler(seed=s.seed)


def _run_trials(
    experiment: Experiment,
    layout: Layout,
    context: Any,
    *,
    tracker: Tracker,
    macs: Any,
    study_name: str,
    storage: str,
    restore: bool,
    log: Log,
    verbose: bool = False,
) -> tuple[float, SearchInterrupted | None]:
    """Run the trials (or, with `restore`, continue those of the Ray experiment `study_name` in
    `storage`); returns the trial phase's wall time and, if a signal stopped it, what to raise
    once the partial front is published."""
    import optuna
    from ray import tune

    from pipelines.trial import can_start_from_trial
    from search.progress import progress_callback
    from search.scheduler import ParetoHalving
    from search.searcher import StudySearcher, close_running, objectives
    from search.trainable import run_tune_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = experiment.search
    trainable = tune.with_resources(
        tune.with_parameters(run_tune_trial, context=context), {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial}
    )
    optuna_storage = optuna.storages.RDBStorage(layout.optuna_storage)
    if restore:  # the searcher, scheduler and callbacks are Tune's saved ones; the trials pick up their checkpoints
        study = optuna.load_study(study_name=study_name, storage=optuna_storage)
        tuner = tune.Tuner.restore(_experiment_path(storage, study_name), trainable, resume_unfinished=True, resume_errored=True)
        log(f"search: resuming the Ray Tune experiment {study_name} and the Optuna study of the same name")
    else:
        groups = context.groups
        anchors = anchor_points(experiment, groups, macs)

        def can_warm_start(config: dict[str, Any]) -> bool:
            return can_start_from_trial(trial_params(resolve(config, experiment, groups), experiment, groups))

        study = optuna.create_study(
            study_name=study_name,
            storage=optuna_storage,
            sampler=_sampler(experiment, startup=max(2, len(anchors))),
            directions=list(objectives(s.objective).values()),
        )
        searcher = StudySearcher(
            study,
            search_space(experiment, groups),
            anchors=anchors,
            grid=target_grid(experiment),
            trial_epochs=experiment.trial.epochs,
            epoch_budget=s.epoch_budget,
            can_warm_start=can_warm_start if s.warm_start == "front" else None,
            objective=s.objective,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=ParetoHalving(rungs=s.rungs, eta=s.eta, metric=s.objective) if s.rungs else None,
                num_samples=s.num_trials,
                max_concurrent_trials=s.max_concurrent,
                reuse_actors=True,  # a trial process keeps its imports and its MLflow client for the next trial
            ),
            run_config=tune.RunConfig(
                name=study_name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1 if verbose else 0,  # Tune's tables: only with --verbose
                callbacks=[progress_callback(s.num_trials, log, s.metric, concurrency=s.max_concurrent, verbose=verbose)],
            ),
        )
        halving = f", halving at epochs {s.rungs} (eta {s.eta:g})" if s.rungs else ""
        budget = f", at most {s.epoch_budget} epochs" if s.epoch_budget else ""
        log(
            f"search: {s.num_trials} trials ({len(anchors)} uniform anchors, {s.target_grid} on a MACs grid first), {s.max_concurrent} at a time,"
            f" sampler {s.sampler} (seed {s.seed}), warm start from {s.warm_start}{halving}{budget}"
            + (f", objectives {s.objective} and MACs" if s.metric != "accuracy" else "")
        )

    def announce(signum: int) -> None:  # before Tune stops any trial: they read it
        tracker.set_tags(context.parent_run_id, {INTERRUPTED_TAG: signal.Signals(signum).name})

    request = _StopRequest(announce)
    started = time.perf_counter()
    with _handling_signals(request):
        tuner.fit()
    seconds = time.perf_counter() - started
    repeats = sum(bool(t.user_attrs.get("repeat")) for t in study.get_trials(deepcopy=False))
    if repeats:
        log(f"search: skipped {repeats} repeated configuration(s) the sampler proposed")
    if request.signum is None:
        return seconds, None
    finished = {r.tags.get(TRIAL_TAG): r.metrics for r in tracker.children(context.parent_run_id, role="trial") if r.status == "FINISHED"}
    return seconds, SearchInterrupted(request.signum, trial_ids=close_running(study, finished=finished, objective=s.objective))


def _experiment_path(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def _publish_front(
    tracker: Tracker, parent_id: str, front: SearchFront, experiment: Experiment, layout: Layout, *, epochs: int, seconds: float, log: Log
) -> None:
    from search.registry import publish_front_registry
    from search.plots import kept_fractions, plot_search_front, plot_widths
    from search.report import front_csv, front_json, front_rows

    members = {r.run_id for r in front.front}
    for run in front.trials:
        tracker.set_tags(run.run_id, {PARETO_TAG: str(run.run_id in members).lower()})
    rows = front_rows(front.front)
    tracker.log_text(parent_id, front_csv(rows), "front.csv")
    tracker.log_text(parent_id, front_json(rows), "front.json")
    if front.teacher is not None and front.finished:
        for name in ("front.png", "front.html"):
            tracker.log_artifact(parent_id, plot_search_front(front, name=experiment.name, path=layout.directory / name))
    with tempfile.TemporaryDirectory(dir=layout.directory) as scratch:  # each member's chart is its run's widths.png
        for run in front.front:
            if kept_fractions(run):  # absent in searches made before they were logged
                tracker.log_artifact(run.run_id, plot_widths(run, path=Path(scratch) / "widths.png"))
    counts = {
        "finished_trials": len(front.finished),
        "stopped_trials": len(front.stopped),
        "failed_trials": sum(r.status == "FAILED" for r in front.trials),
        "interrupted_trials": sum(INTERRUPTED_TAG in r.tags for r in front.trials),
        "front_size": len(front.front),
        "fine_tune_epochs": epochs,
        "trial_phase_seconds": seconds,
        "max_concurrent": experiment.search.max_concurrent,
    }
    volumes = {"hypervolume": front.hypervolume, "anchors_hypervolume": front.anchors_hypervolume}
    tracker.log_metrics(parent_id, {**counts, **{k: v for k, v in volumes.items() if v is not None}})
    publish_front_registry(tracker, front, name=experiment.name, budgets=experiment.search.alias_budgets, log=log)  # moves the aliases


def run_search(
    experiment: Experiment,
    *,
    output: str | Path,
    tracking_uri: str | None = None,
    address: str | None = None,
    storage: str | None = None,
    log: Log = print,
    verbose: bool = False,
) -> SearchOutcome:
    """Run one search end to end; every run it opens ends FINISHED, FAILED or KILLED.

    `address`: a Ray cluster to join (else $RAY_ADDRESS, else a fresh local Ray); `storage`: Ray
    Tune's storage (a path all nodes see, or s3://...; default <output>/<name>/ray)."""
    layout = _writable(Layout.at(output, experiment.name))
    splits = checked_data(experiment, log)
    with ray_session(address, experiment, tracking_uri=tracking_uri or layout.tracking_uri, log=log, verbose=verbose) as experiment:
        return _search(experiment, splits, layout=layout, uri=tracking_uri or layout.tracking_uri, storage=storage, resume=None, log=log, verbose=verbose)


def resume_search(
    name: str, *, output: str | Path, tracking_uri: str | None = None, address: str | None = None, search_id: str | None = None, log: Log = print,
    verbose: bool = False,
) -> SearchOutcome:
    """Continue the search `search_id` of experiment `name` (default: its newest unfinished one)
    after its driver was killed or interrupted: the same parent run, Optuna study and Ray Tune
    experiment; finished trials are kept, unfinished ones continue from their checkpoints, and the
    search runs on to `search.num_trials`. Ray restores its experiment from pickles in its
    storage: resume only from storage you control."""
    from ray import tune

    layout, uri, tracker = open_store(name, output=output, tracking_uri=tracking_uri)
    run = tracker.search_run(search_id) if search_id else tracker.latest_search(unfinished=True)
    if run is None:
        which = f"no search run {search_id}" if search_id else "no unfinished search"
        raise SpaceError(f"{which} of experiment {name!r} in {uri}; `slimtune runs {name}` lists its searches' trials")
    if run.status == "FINISHED":
        raise SpaceError(f"search {run.run_id} of {name!r} finished already; `slimtune search` starts a new one")
    storage = run.tags.get(RAY_STORAGE_TAG, str(layout.ray_storage))
    path = _experiment_path(storage, _study_name(name, run))
    if not tune.Tuner.can_restore(path):
        raise SpaceError(f"search {run.run_id}: no Ray Tune experiment to restore at {path} (moved or deleted?)")
    experiment = stored_experiment(tracker, run)
    log(f"resuming search {run.name} ({run.run_id}, {run.status}) of {name!r} with the config it was started with")
    layout = _writable(layout)
    splits = checked_data(experiment, log)
    with ray_session(address, experiment, tracking_uri=uri, log=log, verbose=verbose) as experiment:
        return _search(experiment, splits, layout=layout, uri=uri, storage=storage, resume=run, log=log, verbose=verbose)


def open_store(name: str, *, output: str | Path, tracking_uri: str | None) -> tuple[Layout, str, Tracker]:
    """The output layout, tracking URI and tracker of the searches of experiment `name` that
    `--output` / `--tracking-uri` name; a default store that does not exist is one line."""
    layout = Layout.at(output, name)
    uri = tracking_uri or layout.tracking_uri
    if tracking_uri is None and not layout.tracking_db.exists():
        raise SpaceError(f"no searches in {layout.root}; pass the --output / --tracking-uri the search used")
    return layout, uri, Tracker(uri, name)


def stored_experiment(tracker: Tracker, search: RunRecord) -> Experiment:
    """The resolved config a search was started with (its parent run's `config.yaml`)."""
    with tempfile.TemporaryDirectory(prefix="slimtune-config-") as work:
        return parse_space(yaml.safe_load((tracker.download(search.run_id, "config.yaml", work)).read_text()))


def _writable(layout: Layout) -> Layout:
    """The output folders, made and checked to take a file before anything is computed: a folder
    that cannot is one line (`--output`), not a traceback after the teacher's fine-tune."""
    try:
        layout.make()
        for folder in (layout.root, layout.directory):
            with tempfile.TemporaryFile(dir=folder):
                pass
    except OSError as error:
        raise SpaceError(
            f"--output: cannot write to {layout.root} ([Errno {error.errno}] {error.strerror}); pass --output DIR, a folder you can write to"
        ) from None
    return layout


def _study_name(name: str, search: RunRecord) -> str:
    """The Optuna study and the Ray Tune experiment of a search are named after its parent run."""
    return f"{name}-{search.name.removeprefix('search-')}"


def _search(experiment: Experiment, splits: Any, *, layout: Layout, uri: str, storage: str | None, resume: RunRecord | None, log: Log, verbose: bool = False) -> SearchOutcome:
    from pipelines.export import load_model
    from pipelines.models import TESTED_ARCHS
    from pipelines.prune import macs_model, prunable_groups
    from search.cluster import pack
    from search.trainable import TrialContext

    config_yaml = yaml.safe_dump(to_dict(experiment), sort_keys=False)
    layout.config_file.write_text(config_yaml)
    storage = storage or str(layout.ray_storage)
    if resume is None:
        tracker = Tracker(uri, experiment.name, create=True, local_artifacts=layout.artifacts)
        parent_id = tracker.start_run(f"search-{time.strftime('%Y%m%d-%H%M%S')}", role="search", tags={RAY_STORAGE_TAG: storage})
    else:
        tracker = Tracker(uri, experiment.name)
        parent_id = resume.run_id
        tracker.reopen(parent_id)
    log(f"MLflow: experiment {experiment.name!r}, parent run {parent_id} in {uri}")
    try:
        if resume is None:
            tracker.log_text(parent_id, config_yaml, "config.yaml")
            tracker.log_params(
                parent_id,
                {"arch": experiment.model.arch, "num_trials": experiment.search.num_trials, "sampler": experiment.search.sampler, METRIC_PARAM: experiment.search.metric},
            )
        if splits.skipped:
            tracker.log_text(parent_id, "\n".join(splits.skipped) + "\n", "skipped_files.txt")
        teacher_dir = ensure_teacher(experiment, splits, layout, tracker, parent_id, log)
        teacher, spec = load_model(teacher_dir)
        tracker.log_params(parent_id, {"num_classes": len(spec["classes"])})
        try:
            groups = tuple(prunable_groups(teacher, image_size=experiment.data.image_size))
            macs = macs_model(teacher, image_size=experiment.data.image_size)
        except Exception as error:  # Torch-Pruning cannot trace some architectures (e.g. channel shuffle)
            raise SpaceError(
                f"model.arch: {experiment.model.arch} cannot be pruned structurally ({type(error).__name__}: {error});"
                f" tested: {', '.join(TESTED_ARCHS)}"
            ) from error
        log(f"pruning: {len(groups)} dependency groups in {len(set(g.stage for g in groups))} stages, budgets per {experiment.search.budgets.granularity}")
        search_space(experiment, groups)  # unknown keep names fail before any trial starts
        context = TrialContext(
            experiment=experiment,
            tracking_uri=uri,
            experiment_name=experiment.name,
            parent_run_id=parent_id,
            config_yaml=config_yaml,
            groups=groups,
            splits=splits,
            teacher=pack(teacher_dir),
        )
        interrupted = None
        try:
            seconds, interrupted = _run_trials(
                experiment, layout, context, tracker=tracker, macs=macs, study_name=_study_name(experiment.name, tracker.get(parent_id)),
                storage=storage, restore=resume is not None, log=log, verbose=verbose,
            )
        finally:
            end_unfinished(tracker, parent_id, interrupted=interrupted)
        seconds += float(resume.metrics.get("trial_phase_seconds", 0.0)) if resume else 0.0
        front = front_of(tracker, tracker.get(parent_id))
        epochs = sum(int(r.metrics.get("epoch", 0)) for r in front.trials)
        _publish_front(tracker, parent_id, front, experiment, layout, epochs=epochs, seconds=seconds, log=log)
        if front.hypervolume is not None:
            versus = f", uniform anchors alone {front.anchors_hypervolume:.3f}" if front.anchors_hypervolume is not None else ""
            log(f"search: {epochs} fine-tune epochs; hypervolume {front.hypervolume:.3f} (test {front.metric.replace('_', ' ')} of the front){versus}")
        if interrupted is None:  # an interrupted search exits at once; its resume measures the front
            from search.latency import measure_front_latency

            measure_front_latency(tracker, front.front, log=log)
        if interrupted is not None:
            tracker.set_tags(parent_id, {INTERRUPTED_TAG: signal.Signals(interrupted.signum).name})
            tracker.end_run(parent_id, "KILLED")
            interrupted.front = front_of(tracker, tracker.get(parent_id))
            raise interrupted
        tracker.end_run(parent_id, "FINISHED")
        front = front_of(tracker, tracker.get(parent_id))  # as stored: with the front tags and the search's metrics
    except SearchInterrupted:
        raise
    except KeyboardInterrupt:
        tracker.end_run(parent_id, "KILLED")
        raise
    except BaseException as error:
        tracker.fail_run(parent_id, error)
        raise
    return SearchOutcome(layout=layout, tracking_uri=uri, front=front)
