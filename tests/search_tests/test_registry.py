"""The registry: alias choice on constructed fronts, and re-publishing against a real SQLite MLflow."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

from search._helpers import UsageError
from search.pareto import Point
from search.registry import (
    ON_FRONT_TAG,
    OBJECTIVE_TAG,
    alias_name,
    choose_aliases,
    is_managed_alias,
    knee,
    publish_front_registry,
    register_front,
    resolve_alias,
)
from search.tracking import INTERRUPTED_TAG, TRIAL_TAG, RunRecord, Tracker


def _p(key: str, accuracy: float, macs: float) -> Point:
    return Point(key=key, accuracy=accuracy, macs=macs)


# The README's quickstart front (MACs as x teacher, val accuracy).
QUICKSTART = [_p("t005", 0.592, 0.005), _p("t053", 0.906, 0.053), _p("t105", 0.925, 0.105), _p("t207", 0.954, 0.207), _p("t407", 0.956, 0.407), _p("t570", 0.969, 0.570)]


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("budget", "alias"),
    [(0.5, "under-0p5x"), (0.25, "under-0p25x"), (0.1, "under-0p1x"), (0.005, "under-0p005x"), (1, "under-1x"), (1e-6, "under-0p000001x")],
)
def test_budget_aliases_are_valid_mlflow_aliases_that_slimtune_manages(budget: float, alias: str) -> None:
    assert alias_name(budget) == alias
    _validate_model_alias_name(alias)  # MLflow's own checks: letters, digits, '_', '-'; not reserved
    _validate_model_alias_name_reserved(alias)
    assert is_managed_alias(alias)


@pytest.mark.parametrize("alias", ["production", "champion", "v1", "under-x", "under-0.1x", "best2"])
def test_other_aliases_are_not_managed(alias: str) -> None:
    assert not is_managed_alias(alias)


# ---------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        pytest.param(QUICKSTART, "t053", id="quickstart-front"),  # normalised lift 0.75, the next 0.71
        pytest.param([_p("only", 0.9, 10)], "only", id="single-member"),
        pytest.param([_p("small", 0.5, 10), _p("big", 0.9, 100)], "big", id="two-members-the-best"),
        pytest.param([_p("a", 0.5, 10), _p("b", 0.7, 55), _p("c", 0.9, 100)], "c", id="straight-front-the-best"),
        pytest.param([_p("a", 0.5, 10), _p("b", 0.55, 80), _p("c", 0.9, 100)], "c", id="convex-front-the-best"),
        pytest.param([_p("a", 0.5, 10), _p("b", 0.85, 40), _p("c", 0.88, 60), _p("d", 0.9, 100)], "b", id="bulge"),
        pytest.param([_p("a", 0.5, 0), _p("b", 0.75, 25), _p("c", 0.875, 50), _p("d", 1.0, 100)], "b", id="tie-fewer-macs"),  # both lift 0.25
        pytest.param([_p("x", 0.5, 10), _p("y", 0.5, 10)], "x", id="exact-tie-degenerate"),
    ],
)
def test_knee_is_farthest_above_the_line_between_the_extremes(points: list[Point], expected: str) -> None:
    assert knee(points).key == expected
    assert knee(list(reversed(points))).key == expected or expected == "x"  # order does not matter (exact ties aside)


def test_aliases_name_best_smallest_knee_and_each_budget_met() -> None:
    chosen, unmet = choose_aliases(QUICKSTART, teacher_macs=1.0, budgets=[0.5, 0.25, 0.1, 0.053, 0.001, 0.5])
    assert chosen == {
        "best": "t570",
        "smallest": "t005",
        "knee": "t053",
        "under-0p5x": "t407",
        "under-0p25x": "t207",
        "under-0p1x": "t053",
        "under-0p053x": "t053",  # at most: a member exactly at the budget meets it
    }
    assert unmet == [0.001]  # no member that small: no alias; the repeated 0.5 counts once


def test_budgets_scale_with_the_teacher_macs() -> None:
    points = [_p("a", 0.6, 1.5e6), _p("b", 0.9, 8e6)]
    chosen, unmet = choose_aliases(points, teacher_macs=20e6, budgets=[0.5, 0.25, 0.1])
    assert (chosen["under-0p5x"], chosen["under-0p25x"], chosen["under-0p1x"]) == ("b", "a", "a") and unmet == []


# ---------------------------------------------------------------- against a real store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tracker, dict[str, str]]:
    """A SQLite store with one experiment and four finished trial runs, each with a small `model/`
    folder (module-wide: creating MLflow's tables takes seconds; each test uses its own registered model)."""
    tmp_path = tmp_path_factory.mktemp("registry")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "reg", create=True, local_artifacts=tmp_path / "artifacts")
    search = tracker.start_run("search-1", role="search")
    runs = {}
    for trial in "abcd":
        folder = tmp_path / f"model-{trial}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(trial.encode())
        (folder / "channel_spec.json").write_text("{}")
        run = tracker.start_run(f"trial-{trial}", role="trial", parent_id=search, tags={TRIAL_TAG: trial})
        tracker.log_artifacts(run, folder, "model")
        tracker.end_run(run)
        runs[trial] = run
    return tracker, runs


def _member(tracker: Tracker, run_id: str, accuracy: float, ratio: float) -> RunRecord:
    tracker.log_metrics(run_id, {"val_accuracy": accuracy, "test_accuracy": accuracy, "macs": ratio * 1e6, "macs_ratio": ratio})
    return tracker.get(run_id)


def _versions(client: MlflowClient) -> dict[str, str]:
    """run id -> version, every version of the registered model."""
    return {v.run_id: str(v.version) for v in client.search_model_versions("name = 'reg'")}


def test_republishing_a_changed_front_moves_the_aliases_without_duplicating_versions(store: tuple[Tracker, dict[str, str]]) -> None:
    tracker, runs = store
    lines: list[str] = []
    first = [_member(tracker, runs["a"], 0.6, 0.05), _member(tracker, runs["b"], 0.8, 0.2), _member(tracker, runs["c"], 0.9, 0.6)]
    done = register_front(tracker.client, name="reg", front=first, metric="accuracy", teacher_macs=1e6, budgets=[0.5, 0.1], log=lines.append)
    client = MlflowClient(tracking_uri=tracker.tracking_uri)  # read back as any MLflow user would
    versions = _versions(client)
    assert sorted(versions) == sorted(runs[t] for t in "abc") and sorted(done.created) == sorted(versions.values())
    aliases = {alias: client.get_model_version_by_alias("reg", alias).run_id for alias in ("best", "smallest", "knee", "under-0p5x", "under-0p1x")}
    assert aliases == {"best": runs["c"], "smallest": runs["a"], "knee": runs["b"], "under-0p5x": runs["b"], "under-0p1x": runs["a"]}
    version = client.get_model_version_by_alias("reg", "best")
    assert version.source == f"runs:/{runs['c']}/model"
    assert version.tags[TRIAL_TAG] == "c" and version.tags[OBJECTIVE_TAG] == "val_accuracy" and float(version.tags["val_accuracy"]) == 0.9
    assert float(version.tags["macs"]) == 0.6e6 and float(version.tags["macs_ratio"]) == 0.6 and version.tags[ON_FRONT_TAG] == "true"
    client.set_registered_model_alias("reg", "production", versions[runs["a"]])  # a user's own alias
    assert any("3 new version(s), 0 kept" in line for line in lines)

    # A later (or resumed) search: a drops off the front, b improves, d arrives (c is now the knee); nothing is under 0.1x.
    lines.clear()
    second = [_member(tracker, runs["b"], 0.85, 0.2), tracker.get(runs["c"]), _member(tracker, runs["d"], 0.92, 0.9)]
    done = register_front(tracker.client, name="reg", front=second, metric="accuracy", teacher_macs=1e6, budgets=[0.5, 0.1], log=lines.append)
    after = _versions(client)
    assert len(after) == 4 and {run: after[run] for run in versions} == versions  # one new version (d); a keeps its number
    assert done.created == [after[runs["d"]]]
    model = client.get_registered_model("reg")
    assert {alias: str(model.aliases[alias]) for alias in model.aliases if alias != "production"} == {
        "best": after[runs["d"]], "smallest": after[runs["b"]], "knee": after[runs["c"]], "under-0p5x": after[runs["b"]],
    }  # fmt: skip
    assert "under-0p1x" not in model.aliases and str(model.aliases["production"]) == versions[runs["a"]]  # unmet: removed; the user's: kept
    assert client.get_model_version("reg", versions[runs["a"]]).tags[ON_FRONT_TAG] == "false"
    assert any("no front member has at most 0.1x the teacher's MACs: no alias under-0p1x" in line for line in lines)

    # The same front published again (a resume re-publishing it): nothing new, nothing moves.
    again = register_front(tracker.client, name="reg", front=second, metric="accuracy", teacher_macs=1e6, budgets=[0.5, 0.1], log=lines.append)
    assert again.created == [] and _versions(client) == after and client.get_registered_model("reg").aliases == model.aliases

    with pytest.raises(UsageError, match=r"^--alias: 'kne' is not an alias of registered model 'reg'; its aliases: best, knee, production, smallest, under-0p5x$"):
        resolve_alias(tracker.client, name="reg", alias="kne")
    with pytest.raises(UsageError, match="--alias: no registered model 'other'"):
        resolve_alias(tracker.client, name="other", alias="knee")
    assert resolve_alias(tracker.client, name="reg", alias="knee").run_id == runs["c"]


def test_a_registered_model_slimtune_did_not_make_is_left_alone(store: tuple[Tracker, dict[str, str]]) -> None:
    tracker, runs = store
    tracker.client.create_registered_model("foreign")
    lines: list[str] = []
    front = [_member(tracker, runs["a"], 0.6, 0.05)]
    assert register_front(tracker.client, name="foreign", front=front, metric="accuracy", teacher_macs=1e6, budgets=[], log=lines.append) is None
    assert tracker.client.search_model_versions("name = 'foreign'") == [] and "slimtune did not create" in lines[0]


class _Untouchable:
    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"the registry was touched: {name}")


@pytest.mark.parametrize(
    ("front", "says"),
    [
        (SimpleNamespace(front=[], search=SimpleNamespace(tags={})), "the front is empty"),
        (SimpleNamespace(front=["a member"], search=SimpleNamespace(tags={INTERRUPTED_TAG: "SIGINT"})), "the search was interrupted"),
    ],
)
def test_an_empty_or_interrupted_front_leaves_the_registry_as_it_was(front: SimpleNamespace, says: str) -> None:
    lines: list[str] = []
    assert publish_front_registry(SimpleNamespace(client=_Untouchable()), front, name="reg", budgets=[0.5], log=lines.append) is None
    assert len(lines) == 1 and says in lines[0] and "aliases unchanged" in lines[0]
