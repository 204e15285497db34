"""`slimtune verify`: train a search's front members again with other seeds, and select on the means.

A front is selected on one fine-tune seed per trial, and on a few hundred val images, so the order of
two members a point apart is noise as often as not. `verify` trains each front member again through
the same trainable with `trial.seed` + 1, ..., + N-1: the same knobs, split, teacher and (for a
warm-started member) the same parent model. Each run is a child of the search run with role `verify`,
tagged with the member's run id and its seed; a seed whose run FINISHED already is not trained again,
so `--seeds 5` after `--seeds 3` trains two more per member. The member's own run is the first seed.

Then every member's run gets `<split>_<accuracy>_mean` / `_sd` and `macs_mean` over its seeds and
`verified_seeds`, and the tags `slimtune.rank` (its rank by the search's val metric on one seed and
on the mean: "2 -> 3") and `slimtune.verified_front` (whether it is still on the front selected on the
means); the search run gets `verified_hypervolume`. `fetch --verified` chooses on those means.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from search.front import front_hypervolume, hypervolume_scale, load_front, select_front
from search.knobs import knob_ranges
from search.space import Experiment, SpaceError, to_dict
from search.tracking import RAY_STORAGE_TAG, TRIAL_TAG, RunRecord
from search.trainable import SEED_TAG, VERIFY_TAG

__all__ = ["verify_search", "summarise", "verified_front", "Verification", "VerifiedMember", "VERIFIED_FRONT_TAG", "RANK_TAG"]

Log = Callable[[str], None]

VERIFIED_FRONT_TAG = "slimtune.verified_front"  # "true" / "false" on each verified front member
RANK_TAG = "slimtune.rank"  # "<rank on one seed> -> <rank on the mean>", 1 = the best val metric
VERIFIED_SEEDS = "verified_seeds"
SUMMARISED = ("val_accuracy", "test_accuracy", "val_balanced_accuracy", "test_balanced_accuracy", "macs")


@dataclass(frozen=True)
class VerifiedMember:
    run: RunRecord  # the front member, its SUMMARISED metrics replaced by their means over the seeds
    seeds: int
    sd: dict[str, float]  # sample standard deviation over the seeds (0 with one seed)
    rank: int  # by the val metric among the front's members, on the member's own seed
    verified_rank: int  # the same on the mean
    on_front: bool  # on the front selected on the means


@dataclass(frozen=True)
class Verification:
    search: RunRecord
    members: list[VerifiedMember]  # by MACs ascending, as the front
    hypervolume: float | None  # of the one-seed front
    verified_hypervolume: float | None  # of the front selected on the means, with test means
    failed: int  # seed runs that did not finish this time


def _ranks(runs: list[RunRecord], key: str) -> dict[str, int]:
    ordered = sorted(runs, key=lambda r: (-r.metrics[key], r.metrics["macs"]))
    return {r.run_id: rank for rank, r in enumerate(ordered, start=1)}


def summarise(members: list[RunRecord], reruns: list[RunRecord], *, metric: str = "accuracy") -> list[VerifiedMember]:
    """Each front member's means over its own run and its finished `verify` runs, ranked and
    selected again on the means."""
    by_member: dict[str, list[RunRecord]] = {}
    for run in reruns:
        by_member.setdefault(run.tags[VERIFY_TAG], []).append(run)
    averaged, spread, counts = [], {}, {}
    for member in members:
        seeds = [member, *by_member.get(member.run_id, [])]
        means, sds = {}, {}
        for name in SUMMARISED:
            values = [r.metrics[name] for r in seeds if name in r.metrics]
            if values:
                means[name] = statistics.fmean(values)
                sds[name] = statistics.stdev(values) if len(values) > 1 else 0.0
        averaged.append(replace(member, metrics={**member.metrics, **means}))
        spread[member.run_id], counts[member.run_id] = sds, len(seeds)
    key = f"val_{metric}"
    before, after = _ranks(members, key), _ranks(averaged, key)
    kept = {r.run_id for r in select_front(averaged, metric)}
    return [
        VerifiedMember(run=r, seeds=counts[r.run_id], sd=spread[r.run_id], rank=before[r.run_id], verified_rank=after[r.run_id], on_front=r.run_id in kept)
        for r in averaged
    ]


def verified_front(front: list[RunRecord]) -> list[RunRecord]:
    """The members `verify` kept on the front, their SUMMARISED metrics read as the logged means;
    empty if the search was never verified."""
    kept = [r for r in front if VERIFIED_SEEDS in r.metrics and r.tags.get(VERIFIED_FRONT_TAG) == "true"]
    return [replace(r, metrics={**r.metrics, **{n: r.metrics[f"{n}_mean"] for n in SUMMARISED if f"{n}_mean" in r.metrics}}) for r in kept]


def _job(member: RunRecord, seed: int, *, experiment: Experiment, groups: tuple, parents: dict[str, str]) -> dict[str, Any]:
    """The Tune config that trains `member` again with `seed`: its knobs as its run logged them."""
    config: dict[str, Any] = {"seed": seed, "verify_of": member.run_id}
    for name, knob in knob_ranges(experiment, groups).items():
        if name in member.params:
            config[name] = member.params[name] if isinstance(knob, list) else float(member.params[name])
    start_from = member.params.get("start_from", "teacher")
    if start_from != "teacher":
        config.update(start_from=start_from, start_from_run=parents[start_from])
    return config


def verify_search(
    name: str,
    *,
    output: str | Path,
    seeds: int = 3,
    tracking_uri: str | None = None,
    address: str | None = None,
    search_id: str | None = None,
    verbose: bool = False,
    log: Log = print,
) -> Verification:
    """Train the front of search `search_id` (default: the newest finished one) of experiment `name`
    with `seeds` seeds in all, log the means, and select the front again on them."""
    from ray import tune

    from pipelines.export import load_model
    from pipelines.prune import prunable_groups
    from search.cluster import pack
    from search.progress import progress_callback
    from search._session import checked_data, end_unfinished, ray_session
    from search.run import open_store, stored_experiment
    from search.trainable import TrialContext, run_job

    if seeds < 2:
        raise SpaceError(f"--seeds: {seeds} is not enough to verify anything; give 2 or more (the search's own run is the first seed)")
    layout, uri, tracker = open_store(name, output=output, tracking_uri=tracking_uri)
    front = load_front(tracker, name, search_id=search_id)
    if not front.front:
        raise SpaceError(f"search {front.search.run_id} of {name!r} has no finished trial to verify")
    search_id = front.search.run_id
    experiment = stored_experiment(tracker, front.search)
    teacher_dir = layout.teacher_dir(experiment)
    if not teacher_dir.exists():
        raise SpaceError(
            f"verify needs the search's teacher at {teacher_dir}: it is not there (another --output, or the files in"
            f" {experiment.data.path} changed since the search); give the --output the search used"
        )
    splits = checked_data(experiment, log)
    base = experiment.trial.seed
    done = {(r.tags.get(VERIFY_TAG), r.tags.get(SEED_TAG)) for r in tracker.children(search_id, role="verify") if r.status == "FINISHED"}
    todo = [(m, base + k) for m in front.front for k in range(1, seeds) if (m.run_id, str(base + k)) not in done]
    metric = front.metric
    log(f"verify: {len(front.front)} front members of search {search_id}, seeds {base}..{base + seeds - 1}: {len(todo)} fine-tune(s) to run")
    if todo:
        teacher, _ = load_model(teacher_dir)
        groups = tuple(prunable_groups(teacher, image_size=experiment.data.image_size))
        parents = {r.tags.get(TRIAL_TAG): r.run_id for r in front.trials}
        jobs = tuple(_job(m, seed, experiment=experiment, groups=groups, parents=parents) for m, seed in todo)
        labels = [f"member {m.trial_id} seed {seed}" for m, seed in todo]  # the progress lines' names, by job
        with ray_session(address, experiment, tracking_uri=uri, log=log, verbose=verbose) as experiment:
            s = experiment.search
            context = TrialContext(
                experiment=experiment,
                tracking_uri=uri,
                experiment_name=name,
                parent_run_id=search_id,
                config_yaml=yaml.safe_dump(to_dict(experiment), sort_keys=False),
                groups=groups,
                splits=splits,
                teacher=pack(teacher_dir),
                role="verify",
            )
            trainable = tune.with_resources(tune.with_parameters(run_job, context=context, jobs=jobs), {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
            tuner = tune.Tuner(
                trainable,
                param_space={"job": tune.grid_search(list(range(len(jobs))))},
                tune_config=tune.TuneConfig(max_concurrent_trials=s.max_concurrent, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=f"verify-{search_id[:8]}-{time.strftime('%Y%m%d-%H%M%S')}",
                    storage_path=front.search.tags.get(RAY_STORAGE_TAG, str(layout.ray_storage)),
                    failure_config=tune.FailureConfig(max_failures=s.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    verbose=1 if verbose else 0,
                    callbacks=[progress_callback(len(jobs), log, metric, concurrency=s.max_concurrent, verbose=verbose, labels=labels)],
                ),
            )
            try:
                tuner.fit()
            finally:
                end_unfinished(tracker, search_id, role="verify")
    wanted = {(m.run_id, str(base + k)) for m in front.front for k in range(1, seeds)}  # this verify's member and seed pairs
    reruns = [
        r for r in tracker.children(search_id, role="verify")
        if r.status == "FINISHED" and f"val_{metric}" in r.metrics and (r.tags.get(VERIFY_TAG), r.tags.get(SEED_TAG)) in wanted
    ]
    members = summarise(front.front, reruns, metric=metric)
    for member in members:
        means = {f"{n}_mean": member.run.metrics[n] for n in SUMMARISED if n in member.sd}
        sds = {f"{n}_sd": v for n, v in member.sd.items()}
        tracker.log_metrics(member.run.run_id, {**means, **sds, VERIFIED_SEEDS: float(member.seeds)})
        tracker.set_tags(member.run.run_id, {RANK_TAG: f"{member.rank} -> {member.verified_rank}", VERIFIED_FRONT_TAG: str(member.on_front).lower()})
    scale = hypervolume_scale(front.search, front.teacher)
    volume = front_hypervolume([m.run for m in members], **scale) if scale else None
    if volume is not None:
        tracker.log_metrics(search_id, {"verified_hypervolume": volume, VERIFIED_SEEDS: float(min(m.seeds for m in members))})
    finished = {(r.tags.get(VERIFY_TAG), r.tags.get(SEED_TAG)) for r in reruns}
    failed = sum((m.run_id, str(seed)) not in finished for m, seed in todo)
    return Verification(search=front.search, members=members, hypervolume=front.hypervolume, verified_hypervolume=volume, failed=failed)
