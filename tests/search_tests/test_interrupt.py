"""Ctrl-C, SIGTERM and a killed driver during the trials of a real `slimtune search` (local Ray,
SQLite MLflow, Optuna): every run ends in a true state, what finished is kept, the partial front
is published, and `slimtune resume` completes the search without rerunning a finished trial."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from pipelines.data import prepare_animal_mnist
from _store_helpers import initialised_store, tracker_once_created

from mlflow.tracking import MlflowClient

from search._local_cluster import descendants, stop
from search.tracking import INTERRUPTED_TAG, RESUMED_TAG, STOPPED_TAG, TRIAL_TAG, Tracker

SLIMTUNE = [sys.executable, "-m", "search.cli"]
NUM_TRIALS = 6


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("interrupt")
    prepare_animal_mnist(work / "animal_mnist")
    space = {
        "name": "tiny",
        "data": {"path": "animal_mnist", "image_size": 32, "max_images_per_class": 40},
        "teacher": {"epochs": 1},
        "trial": {"epochs": 4, "bn_recalibration_batches": 2},
        "search": {"num_trials": NUM_TRIALS, "max_concurrent": 2, "warm_start": "teacher"},
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(space))
    return work


def _interrupt_once_a_trial_finished(work: Path, signum: int) -> tuple[subprocess.CompletedProcess[str], Tracker]:
    """Start a search, send `signum` to its PID while one trial has finished and another runs.
    After SIGKILL, also kill what the search had started (its local Ray), by PID."""
    uri = initialised_store(work)
    tracker = tracker_once_created(uri, "tiny")
    earlier = tracker.latest_search() if tracker else None  # the other signals' searches, in the same store
    process = subprocess.Popen([*SLIMTUNE, "search", "tiny.yaml"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            tracker = tracker or tracker_once_created(uri, "tiny")
            search = tracker.latest_search() if tracker else None
            if search is None or search.status != "RUNNING" or (earlier is not None and search.run_id == earlier.run_id):
                continue
            statuses = [r.status for r in tracker.children(search.run_id, role="trial")]
            if "FINISHED" in statuses and "RUNNING" in statuses:
                started = descendants(process.pid)
                process.send_signal(signum)
                if signum == signal.SIGKILL:
                    process.wait(timeout=30)
                    for pid in started:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                break
        stdout, stderr = process.communicate(timeout=300)
    finally:
        stop(process)  # SIGTERM first: slimtune then stops its local Ray itself
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), tracker


def _end_times(tracker: Tracker, runs: list) -> dict[str, int]:
    return {r.run_id: MlflowClient(tracking_uri=tracker.tracking_uri).get_run(r.run_id).info.end_time for r in runs}


def _resume_completes_the_search(work: Path, tracker: Tracker, search_id: str, *, lost: int = 0) -> None:
    """`slimtune resume` ends the search FINISHED with `NUM_TRIALS` finished trials, each trial id
    once, without rerunning those that had finished; nothing is left RUNNING. `lost`: how many
    trials a killed driver may have started after Tune last saved its state (Tune does not know
    them, so they end KILLED and others take their place)."""
    finished_before = [r for r in tracker.children(search_id, role="trial") if r.status == "FINISHED"]
    ended_before = _end_times(tracker, finished_before)
    result = subprocess.run([*SLIMTUNE, "resume", "tiny", "--search", search_id], cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    search = tracker.get(search_id)
    assert search.status == "FINISHED" and INTERRUPTED_TAG not in search.tags and search.tags[RESUMED_TAG] == "1"
    runs = tracker.children(search_id, role="trial")
    assert len({r.tags[TRIAL_TAG] for r in runs}) == len(runs)
    trials = [r for r in runs if r.status == "FINISHED"]
    orphans = [r for r in runs if r.status != "FINISHED"]
    assert len(trials) == NUM_TRIALS and len(orphans) <= lost, [(r.status, r.tags) for r in runs]
    assert all(r.status == "KILLED" and "ended without reporting" in r.tags["error"] for r in orphans), [r.tags for r in orphans]
    assert all(INTERRUPTED_TAG not in r.tags for r in runs), [(r.status, r.tags) for r in runs]
    assert _end_times(tracker, finished_before) == ended_before  # not rerun
    assert any(RESUMED_TAG in r.tags for r in trials)  # the trials the stop had cut short continued their own runs
    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    for run in trials:  # a continued run logs only the epochs after its checkpoint
        steps = [m.step for m in client.get_metric_history(run.run_id, "epoch")]
        assert len(steps) == len(set(steps)), (run.run_id, steps)
    assert all(r.status != "RUNNING" for r in tracker.children(search_id, role="teacher"))
    assert len(tracker.children(search_id, role="teacher")) == 1
    front = {r.run_id for r in trials if r.tags.get("pareto") == "true"}
    assert front and search.metrics["finished_trials"] == NUM_TRIALS
    states = [t.state for t in _study(work, search).trials]
    assert optuna.trial.TrialState.RUNNING not in states


def _study(work: Path, search) -> optuna.Study:
    storage = f"sqlite:///{work}/slimtune-runs/tiny/optuna.db"
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.endswith(search.name.removeprefix("search-"))]
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_ends_every_run_truthfully_and_keeps_the_partial_front(work: Path, signum: int, exit_code: int) -> None:
    result, tracker = _interrupt_once_a_trial_finished(work, signum)
    assert result.returncode == exit_code, result.stderr[-3000:]
    search = tracker.latest_search()
    assert search.status == "KILLED" and search.tags[INTERRUPTED_TAG] == signal.Signals(signum).name
    assert f"slimtune resume tiny --search {search.run_id}" in result.stderr and "Partial Pareto front of 'tiny'" in result.stdout
    trials = tracker.children(search.run_id, role="trial")
    finished = [r for r in trials if r.status == "FINISHED"]
    interrupted = [r for r in trials if r.status != "FINISHED"]
    assert finished and interrupted and len(trials) < NUM_TRIALS
    for run in interrupted:  # stopped by the signal: neither failed nor stopped by successive halving
        assert run.status == "KILLED" and INTERRUPTED_TAG in run.tags and STOPPED_TAG not in run.tags, run.tags
    assert all(r.status != "RUNNING" for r in tracker.children(search.run_id, role="teacher"))
    assert search.metrics["finished_trials"] == len(finished) and search.metrics["interrupted_trials"] == len(interrupted)
    front = {r.run_id for r in trials if r.tags.get("pareto") == "true"}
    assert front and front <= {r.run_id for r in finished}
    states = [t.state for t in _study(work, search).trials]
    assert optuna.trial.TrialState.RUNNING not in states and states.count(optuna.trial.TrialState.COMPLETE) == len(finished)

    rows = json.loads(subprocess.run([*SLIMTUNE, "runs", "tiny", "--search", search.run_id, "--json"], cwd=work, capture_output=True, text=True, timeout=300).stdout)
    assert sorted(row["status"] for row in rows) == sorted(["finished"] * len(finished) + ["interrupted"] * len(interrupted))
    if signum == signal.SIGINT:
        _resume_completes_the_search(work, tracker, search.run_id)


def test_after_the_driver_is_killed_resume_completes_the_search(work: Path) -> None:
    result, tracker = _interrupt_once_a_trial_finished(work, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    search = tracker.latest_search()
    assert search.status == "RUNNING"  # the driver died before it could end anything
    assert "RUNNING" in {r.status for r in tracker.children(search.run_id, role="trial")}
    _resume_completes_the_search(work, tracker, search.run_id, lost=1)
