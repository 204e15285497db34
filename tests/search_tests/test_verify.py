"""`verify`'s arithmetic: means over seeds, ranks, the front selected again, a member's knobs read back."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from search.knobs import knob_ranges, resolve
from search.space import parse_space
from search.tracking import RunRecord
from search.trainable import NOT_KNOBS, SEED_TAG, VERIFY_TAG
from search.verify import RANK_TAG, VERIFIED_FRONT_TAG, _job, summarise, verified_front

from _space_helpers import REPO
from test_knobs import GROUPS


def _run(run_id: str, *, val: float, test: float, macs: float, tags: dict[str, str] | None = None) -> RunRecord:
    metrics = {"val_accuracy": val, "test_accuracy": test, "macs": macs, "params": 1.0}
    return RunRecord(run_id=run_id, name=run_id, status="FINISHED", metrics=metrics, params={}, tags=tags or {})


def _rerun(member: str, seed: int, **metrics: float) -> RunRecord:
    return _run(f"{member}-{seed}", **metrics, tags={VERIFY_TAG: member, SEED_TAG: str(seed)})


def test_a_member_whose_mean_falls_below_a_smaller_one_leaves_the_front_and_changes_rank() -> None:
    members = [_run("a", val=0.80, test=0.79, macs=1.0), _run("b", val=0.83, test=0.82, macs=2.0), _run("c", val=0.86, test=0.85, macs=3.0)]
    reruns = [_rerun("b", 1, val=0.75, test=0.74, macs=2.0), _rerun("b", 2, val=0.77, test=0.78, macs=2.0), _rerun("c", 1, val=0.88, test=0.85, macs=3.0)]
    verified = {m.run.run_id: m for m in summarise(members, reruns)}
    b = verified["b"]
    assert b.seeds == 3 and b.run.metrics["val_accuracy"] == pytest.approx((0.83 + 0.75 + 0.77) / 3)
    assert b.sd["val_accuracy"] == pytest.approx(0.04163, abs=1e-5)
    assert (b.rank, b.verified_rank, b.on_front) == (2, 3, False)  # a (0.80 at fewer MACs) now dominates it
    assert (verified["a"].rank, verified["a"].verified_rank, verified["a"].on_front) == (3, 2, True)
    assert verified["c"].seeds == 2 and verified["c"].on_front and verified["c"].sd["test_accuracy"] == 0.0
    assert verified["a"].seeds == 1 and verified["a"].sd["val_accuracy"] == 0.0  # no rerun: its own seed only


def test_reruns_of_other_runs_are_not_averaged_in() -> None:
    members = [_run("a", val=0.80, test=0.79, macs=1.0)]
    (a,) = summarise(members, [_rerun("z", 1, val=0.1, test=0.1, macs=1.0)])
    assert a.seeds == 1 and a.run.metrics["val_accuracy"] == 0.80


def test_fetch_verified_reads_the_logged_means_of_the_members_kept_on_the_front() -> None:
    logged = {"verified_seeds": 3.0, "val_accuracy_mean": 0.7, "test_accuracy_mean": 0.71, "macs_mean": 2.0}
    kept = _run("kept", val=0.9, test=0.9, macs=2.0, tags={VERIFIED_FRONT_TAG: "true", RANK_TAG: "1 -> 1"})
    kept.metrics.update(logged)
    dropped = _run("dropped", val=0.95, test=0.95, macs=3.0, tags={VERIFIED_FRONT_TAG: "false"})
    dropped.metrics.update(logged)
    never = _run("never", val=0.99, test=0.99, macs=1.0)
    (only,) = verified_front([kept, dropped, never])
    assert only.run_id == "kept" and only.metrics["val_accuracy"] == 0.7 and only.metrics["test_accuracy"] == 0.71


@pytest.mark.parametrize("preset", ["quickstart", "full"])
def test_a_members_logged_params_give_back_the_knobs_it_ran_with(preset: str, folder: Path) -> None:
    raw = yaml.safe_load((REPO / "spaces" / f"{preset}.yaml").read_text())
    raw["data"]["path"] = str(folder)
    experiment = parse_space(raw)
    rng = random.Random(0)
    for _ in range(5):
        sampled = {
            name: rng.choice(knob) if isinstance(knob, list) else rng.uniform(knob.low, knob.high)
            for name, knob in knob_ranges(experiment, GROUPS).items()
        }
        knobs = resolve(sampled, experiment, GROUPS)
        params = {**{k: str(v) for k, v in knobs.items()}, "start_from": "t_00002", "seed": "0"}  # as MLflow stores them
        member = RunRecord(run_id="m", name="m", status="FINISHED", metrics={}, params=params, tags={})
        config = _job(member, 7, experiment=experiment, groups=GROUPS, parents={"t_00002": "run-of-t2"})
        assert (config["seed"], config["verify_of"], config["start_from"], config["start_from_run"]) == (7, "m", "t_00002", "run-of-t2")
        assert resolve({k: v for k, v in config.items() if k not in NOT_KNOBS}, experiment, GROUPS) == knobs


def test_the_table_stars_the_members_whose_rank_changed() -> None:
    from search.report import verify_table

    members = [_run("a", val=0.80, test=0.79, macs=1e6), _run("b", val=0.83, test=0.82, macs=2e6)]
    table = verify_table(summarise(members, [_rerun("b", 1, val=0.71, test=0.70, macs=2e6)]))
    a, b = table.splitlines()[2:]
    assert a.split()[:2] == ["a", "1"] and "2 -> 1 *" in a and a.rstrip().endswith("yes")
    assert "0.770 +- 0.085" in b and "1 -> 2 *" in b and b.rstrip().endswith("no")
