"""The MLflow model registry: a search's Pareto front as versions of one registered model.

The registered model is named after the experiment (`models:/quickstart@knee`). Each front
member's exported `model/` artifact folder (safetensors + channel spec + config + per-class files;
no pickle, no pyfunc) is one version, created once per trial run: a resumed search re-publishing
its front adds none. Aliases name the members a user asks for by role, and move to the newest
published front each time a search (or a resume) publishes one; a version no longer on the front
keeps its number but loses its aliases. Aliases slimtune does not manage (`production`, ...) are
left alone.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from search._helpers import UsageError, format_count
from search.front import best_within, metric_points
from search.pareto import Point
from search.tracking import INTERRUPTED_TAG, TRIAL_TAG, RunRecord

__all__ = [
    "Registered",
    "alias_name",
    "choose_aliases",
    "knee",
    "is_managed_alias",
    "register_front",
    "publish_front_registry",
    "resolve_alias",
    "EXPERIMENT_TAG",
    "SEARCH_TAG",
    "OBJECTIVE_TAG",
    "ON_FRONT_TAG",
]

Log = Callable[[str], None]

EXPERIMENT_TAG = "slimtune.experiment"  # on the registered model: slimtune made it (and manages its aliases)
SEARCH_TAG = "slimtune.search_run_id"  # on a version: the search whose front it was on first
OBJECTIVE_TAG = "slimtune.objective"  # on a version: val_accuracy or val_balanced_accuracy (its value is the tag of that name)
ON_FRONT_TAG = "slimtune.on_front"  # on a version: "true" while it is on the newest published front
_ROLES = ("best", "smallest", "knee")
_UNDER = re.compile(r"under-[0-9]+(p[0-9]+)?x")


@dataclass(frozen=True)
class Registered:
    """What `register_front` left in the registry."""

    name: str  # the registered model
    versions: dict[str, str]  # run id -> version, for every front member
    created: list[str] = field(default_factory=list)  # the versions this call created
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> version, those slimtune manages
    unmet: list[float] = field(default_factory=list)  # budgets no member meets (no alias)


def alias_name(budget: float) -> str:
    """The alias of a MACs budget (a fraction of the teacher's MACs): 0.1 -> 'under-0p1x', 1 -> 'under-1x'.

    MLflow aliases allow only letters, digits, '_' and '-', hence 'p' for the decimal point."""
    text = f"{budget:.10f}".rstrip("0").rstrip(".")
    return f"under-{text.replace('.', 'p')}x"


def is_managed_alias(alias: str) -> bool:
    """best, smallest, knee and under-<budget>x: the aliases slimtune sets, moves and removes."""
    return alias in _ROLES or _UNDER.fullmatch(alias) is not None


def knee(points: Sequence[Point]) -> Point:
    """The front member farthest above the straight line from the smallest member to the best one,
    on axes normalised to the front's range (MACs and objective each to [0, 1]): the one with the
    largest (normalised objective - normalised MACs). When no member lies strictly above that line
    (one or two members, a straight front), the knee is the best member. Ties: fewer MACs."""
    best = best_within(points)
    if best is None:
        raise ValueError("knee of an empty front")
    low_macs, high_macs = min(p.macs for p in points), max(p.macs for p in points)
    low_acc, high_acc = min(p.accuracy for p in points), max(p.accuracy for p in points)
    if high_macs <= low_macs or high_acc <= low_acc:
        return best

    def lift(p: Point) -> float:
        return (p.accuracy - low_acc) / (high_acc - low_acc) - (p.macs - low_macs) / (high_macs - low_macs)

    top = max(points, key=lambda p: (lift(p), -p.macs))
    return top if lift(top) > 1e-12 else best


def choose_aliases(points: Sequence[Point], *, teacher_macs: float, budgets: Sequence[float]) -> tuple[dict[str, str], list[float]]:
    """Alias -> point key for a front (`accuracy` = the search's objective): best (highest
    objective), smallest (fewest MACs), knee (see `knee`), and under-<b>x for each budget b (a
    fraction of `teacher_macs`): the best member with MACs <= b x teacher MACs. Returns the
    aliases and the budgets no member meets (those get no alias). Ties: fewer MACs."""
    best = best_within(points)
    if best is None:
        return {}, list(budgets)
    chosen = {
        "best": best.key,
        "smallest": min(points, key=lambda p: (p.macs, -p.accuracy)).key,
        "knee": knee(points).key,
    }
    unmet: list[float] = []
    for budget in dict.fromkeys(budgets):  # in order, without repeats
        fitting = best_within(points, budget * teacher_macs)
        if fitting is not None:
            chosen[alias_name(budget)] = fitting.key
        else:
            unmet.append(budget)
    return chosen, unmet


def _versions_by_run(client: Any, name: str) -> dict[str, Any]:
    """run id -> its (oldest) model version of registered model `name`."""
    found: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        for version in page:
            if version.run_id and (version.run_id not in found or int(version.version) < int(found[version.run_id].version)):
                found[version.run_id] = version
        token = page.token
        if not token:
            return found


def _ensure_registered_model(client: Any, name: str) -> bool:
    """Create registered model `name` if it does not exist; False if one exists that slimtune did not make."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(
                name,
                tags={EXPERIMENT_TAG: name},
                description=f"The Pareto front of slimtune experiment {name!r}: one version per front member"
                " (safetensors + channel_spec.json, no pickle); aliases best, smallest, knee, under-<budget>x.",
            )
        except MlflowException as race:  # another search of the experiment created it meanwhile
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return True
    return model.tags.get(EXPERIMENT_TAG) == name


def register_front(
    client: Any,
    *,
    name: str,
    front: Sequence[RunRecord],
    metric: str,
    teacher_macs: float,
    budgets: Sequence[float],
    search_id: str | None = None,
    log: Log = print,
) -> Registered | None:
    """Make every run of `front` (non-dominated, each with a `model/` artifact) a version of
    registered model `name` (once per run), then point the managed aliases at the chosen versions,
    moving them from wherever they were and removing those no member earns. `metric`: the
    search's (the objective is val_<metric>). None (and a log line) if a registered model of that
    name exists that slimtune did not create: it is not touched."""
    if not _ensure_registered_model(client, name):
        log(f"registry: a registered model {name!r} exists that slimtune did not create (no tag {EXPERIMENT_TAG}): left alone, no versions or aliases set")
        return None
    objective = f"val_{metric}"
    existing = _versions_by_run(client, name)
    versions: dict[str, str] = {}
    created: list[str] = []
    for run in front:
        if run.run_id in existing:
            versions[run.run_id] = str(existing[run.run_id].version)
            continue
        m = run.metrics
        trial = run.trial_id
        tags = {TRIAL_TAG: trial, OBJECTIVE_TAG: objective, objective: f"{m[objective]:.6g}", "macs": f"{m['macs']:.0f}"}
        tags.update({k: f"{m[k]:.6g}" for k in ("macs_ratio", f"test_{metric}") if k in m})
        if search_id is not None:
            tags[SEARCH_TAG] = search_id
        version = client.create_model_version(
            name,
            source=f"runs:/{run.run_id}/model",
            run_id=run.run_id,
            tags=tags,
            description=f"trial {trial}: {objective} {m[objective]:.4f}, {format_count(m['macs'])} MACs",
        )
        versions[run.run_id] = str(version.version)
        created.append(str(version.version))
    chosen, unmet = choose_aliases(metric_points(list(front), metric), teacher_macs=teacher_macs, budgets=budgets)
    wanted = {alias: versions[run_id] for alias, run_id in chosen.items()}
    current = {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
    for alias, version in wanted.items():
        if current.get(alias) != version:
            client.set_registered_model_alias(name, alias, version)  # moves it from its earlier version
    for alias in current:
        if is_managed_alias(alias) and alias not in wanted:
            client.delete_registered_model_alias(name, alias)
    on_front = set(versions.values())
    tags_of = {str(v.version): dict(v.tags or {}) for v in existing.values()} | {v: {} for v in created}
    for version, tags in tags_of.items():
        flag = str(version in on_front).lower()
        if tags.get(ON_FRONT_TAG) != flag:
            client.set_model_version_tag(name, version, ON_FRONT_TAG, flag)
    trials = {r.run_id: r.trial_id for r in front}
    by_version = {v: trials[run_id] for run_id, v in versions.items()}
    listed = ", ".join(f"{alias} v{version} (trial {by_version[version]})" for alias, version in wanted.items())
    log(f"registry: registered model {name!r}: {len(created)} new version(s), {len(versions) - len(created)} kept; aliases {listed}; load with models:/{name}@knee")
    for budget in unmet:
        log(f"registry: no front member has at most {budget:g}x the teacher's MACs: no alias {alias_name(budget)}")
    return Registered(name=name, versions=versions, created=created, aliases=wanted, unmet=unmet)


def publish_front_registry(tracker: Any, front: Any, *, name: str, budgets: Sequence[float], log: Log = print) -> Registered | None:
    """The driver's hook (`front`: a `search.front.SearchFront`): register the front unless it is
    empty or the search was interrupted (its resume publishes the whole front); a registry error
    is one log line, not a failed search (the front is published on the search run either way)."""
    from mlflow.exceptions import MlflowException

    if not front.front:
        log(f"registry: the front is empty: registered model {name!r} and its aliases unchanged")
        return None
    if INTERRUPTED_TAG in front.search.tags:
        log(f"registry: the search was interrupted: registered model {name!r} and its aliases unchanged until its resume finishes")
        return None
    if front.teacher is not None:
        teacher_macs = front.teacher.metrics["macs"]
    else:  # every trial logs its MACs relative to the teacher's
        first = front.front[0].metrics
        teacher_macs = first["macs"] / first.get("macs_ratio", 1.0)
    try:
        return register_front(
            tracker.client, name=name, front=front.front, metric=front.metric, teacher_macs=teacher_macs,
            budgets=budgets, search_id=front.search.run_id, log=log,
        )  # fmt: skip
    except MlflowException as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        log(f"registry: not updated ({lines[0][:200] if lines else type(error).__name__}); the front is on the search run")
        return None


def resolve_alias(client: Any, *, name: str, alias: str) -> Any:
    """The model version `alias` names in registered model `name` (any alias, slimtune's or a
    user's); a UsageError naming the aliases that exist otherwise."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UsageError(
            f"--alias: no registered model {name!r} in this store; a search registers its front when it finishes"
            f" (searches made before slimtune had a registry did not): run `slimtune search` again, or fetch with --max-macs"
        ) from None
    if alias not in model.aliases:
        known = ", ".join(sorted(model.aliases)) or "none"
        raise UsageError(f"--alias: {alias!r} is not an alias of registered model {name!r}; its aliases: {known}")
    return client.get_model_version_by_alias(name, alias)
