"""Ctrl-C and SIGTERM during the trials of a real `slimtune search` (local Ray, SQLite MLflow, Optuna):
every run ends in a true state, what finished is kept, and the partial front is published."""
from __future__ import annotations

import json
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

from search._local_cluster import stop
from search.tracking import INTERRUPTED_TAG, STOPPED_TAG, Tracker

SLIMTUNE = [sys.executable, "-m", "search.cli"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("interrupt")
    prepare_animal_mnist(work / "animal_mnist")
    space = {
        "name": "tiny",
        "data": {"path": "animal_mnist", "image_size": 32, "max_images_per_class": 40},
        "teacher": {"epochs": 1},
        "trial": {"epochs": 6, "bn_recalibration_batches": 2},
        "search": {"num_trials": 8, "max_concurrent": 2, "warm_start": "teacher"},
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(space))
    return work


def _interrupt_once_a_trial_finished(work: Path, signum: int) -> tuple[subprocess.CompletedProcess[str], Tracker]:
    """Start a search, send `signum` to its PID while one trial has finished and another runs."""
    uri = initialised_store(work)
    tracker = tracker_once_created(uri, "tiny")
    earlier = tracker.latest_search() if tracker else None  # the other signal's search, in the same store
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
                process.send_signal(signum)
                break
        stdout, stderr = process.communicate(timeout=300)
    finally:
        stop(process)  # SIGTERM first: slimtune then stops its local Ray itself
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), tracker


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_ends_every_run_truthfully_and_keeps_the_partial_front(work: Path, signum: int, exit_code: int) -> None:
    result, tracker = _interrupt_once_a_trial_finished(work, signum)
    assert result.returncode == exit_code, result.stderr[-3000:]
    search = tracker.latest_search()
    assert search.status == "KILLED" and search.tags[INTERRUPTED_TAG] == signal.Signals(signum).name
    assert f"--search {search.run_id}" in result.stderr and "Partial Pareto front of 'tiny'" in result.stdout
    trials = tracker.children(search.run_id, role="trial")
    finished = [r for r in trials if r.status == "FINISHED"]
    interrupted = [r for r in trials if r.status != "FINISHED"]
    assert finished and interrupted and len(trials) < 8
    for run in interrupted:  # stopped by the signal: neither failed nor stopped by successive halving
        assert run.status == "KILLED" and INTERRUPTED_TAG in run.tags and STOPPED_TAG not in run.tags, run.tags
    assert all(r.status != "RUNNING" for r in tracker.children(search.run_id, role="teacher"))
    assert search.metrics["finished_trials"] == len(finished) and search.metrics["interrupted_trials"] == len(interrupted)
    front = {r.run_id for r in trials if r.tags.get("pareto") == "true"}
    assert front and front <= {r.run_id for r in finished}
    storage = f"sqlite:///{work}/slimtune-runs/tiny/optuna.db"
    (study_name,) = [s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.endswith(search.name.removeprefix("search-"))]
    states = [t.state for t in optuna.load_study(study_name=study_name, storage=storage).trials]
    assert optuna.trial.TrialState.RUNNING not in states and states.count(optuna.trial.TrialState.COMPLETE) == len(finished)

    rows = json.loads(subprocess.run([*SLIMTUNE, "runs", "tiny", "--search", search.run_id, "--json"], cwd=work, capture_output=True, text=True, timeout=300).stdout)
    assert sorted(row["status"] for row in rows) == sorted(["finished"] * len(finished) + ["interrupted"] * len(interrupted))
