"""What `search`, `resume` and `verify` share around their trials: the data check, Ray, the runs left RUNNING."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from search.space import Experiment, SpaceError
from search.tracking import INTERRUPTED_TAG, TRIAL_TAG, Tracker

if TYPE_CHECKING:
    from search.run import SearchInterrupted

__all__ = ["checked_data", "ray_session", "end_unfinished"]

Log = Callable[[str], None]


def checked_data(experiment: Experiment, log: Log) -> Any:
    """Decode the folder and pre-flight the architecture before Ray starts or any run exists: a
    folder or model slimtune cannot use is an error, not a failed search."""
    splits = _load_data(experiment, log)
    _preflight(experiment, num_classes=len(splits.classes))
    return splits


@contextlib.contextmanager
def ray_session(address: str | None, experiment: Experiment, *, tracking_uri: str, log: Log, verbose: bool = False) -> Iterator[Experiment]:
    """Start or join Ray and check what the trials will need of it; yields the experiment with
    `search.max_concurrent` resolved."""
    import ray

    from search.cluster import check_gpus, check_tracking_uri, concurrency, configure_ray_environment, node_addresses, start_ray

    configure_ray_environment(verbose=verbose)
    joined = start_ray(address, verbose=verbose)
    try:
        check_gpus(experiment.search.gpus_per_trial)  # before anything trains or is logged
        check_tracking_uri(tracking_uri, nodes=node_addresses())
        s = experiment.search
        if s.max_concurrent is None:
            fits = concurrency(cpus_per_trial=s.cpus_per_trial, gpus_per_trial=s.gpus_per_trial)
            experiment = dataclasses.replace(experiment, search=dataclasses.replace(s, max_concurrent=fits))
        if joined != "local":
            log(f"Ray: joined {joined}, {len(node_addresses())} machine(s), {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs")
        yield experiment
    finally:
        ray.shutdown()


def end_unfinished(tracker: Tracker, parent_id: str, *, interrupted: SearchInterrupted | None = None, role: str = "trial") -> None:
    """A trial process killed before its own `except` (a lost worker, a hard stop, the end of an
    interrupted search) leaves its run RUNNING: end it KILLED, so that no run of the search stays
    RUNNING. Trials that ended themselves read the interruption from the search run (`announce`)."""
    stopped_by_signal = set(interrupted.trial_ids) if interrupted else set()
    for run in tracker.children(parent_id, role=role):
        if run.status != "RUNNING":
            continue
        if run.tags.get(TRIAL_TAG) in stopped_by_signal:
            tracker.set_tags(run.run_id, {INTERRUPTED_TAG: signal.Signals(interrupted.signum).name})
        else:
            tracker.set_tags(run.run_id, {"error": "the trial process ended without reporting a final status (its node or the driver was lost)"})
        tracker.end_run(run.run_id, "KILLED")


def _load_data(experiment: Experiment, log: Log) -> Any:
    """Decode the folder once (the teacher task and the trials get it through Ray) and say what it holds."""
    import torch

    from pipelines.data import load_data

    started = time.perf_counter()
    splits = load_data(experiment.data)
    sizes = "/".join(str(len(s)) for s in (splits.train, splits.val, splits.test))
    log(f"data: {len(splits.classes)} classes, {sizes} train/val/test images, decoded in {time.perf_counter() - started:.0f} s")
    if splits.skipped:
        more = f" and {len(splits.skipped) - 3} more" if len(splits.skipped) > 3 else ""
        log(f"data: skipped {len(splits.skipped)} unreadable file(s): {', '.join(splits.skipped[:3])}{more} (all in skipped_files.txt on the search run)")
    per_class = torch.bincount(splits.val.labels, minlength=len(splits.classes))
    if int(per_class.min()) < 30:
        smallest = splits.classes[int(per_class.argmin())]
        log(f"data: warning: class {smallest!r} has {int(per_class.min())} val images (< 30): val accuracies differ by noise of several points")
    return splits


def _preflight(experiment: Experiment, *, num_classes: int) -> None:
    from pipelines.models import TESTED_ARCHS
    from pipelines.preflight import ArchitectureError, check_architecture

    try:
        check_architecture(experiment.model.arch, image_size=experiment.data.image_size, num_classes=num_classes)
    except ArchitectureError as error:
        raise SpaceError(f"model.arch: {error}; tested: {', '.join(TESTED_ARCHS)}") from None
