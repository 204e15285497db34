"""A node lost in the middle of a trial costs nothing: a real 2-worker Ray cluster on this machine,
the worker's raylet killed by PID (SIGKILL) while a trial trains there; the trial resumes from
its last epoch's checkpoint on the other node, in the same MLflow run."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from pipelines.data import prepare_animal_mnist
from _store_helpers import initialised_store, tracker_once_created

from search._local_cluster import RAY_ENV, local_cluster, stop
from search.tracking import RESUMED_FROM_TAG, RESUMED_TAG
from search.trainable import NODE_TAG

EPOCHS = 6


def test_a_trial_on_a_lost_node_resumes_from_its_checkpoint_on_another(tmp_path_factory: pytest.TempPathFactory) -> None:
    work = tmp_path_factory.mktemp("node-loss")
    prepare_animal_mnist(work / "animal_mnist")
    space = {
        "name": "lost",
        "data": {"path": "animal_mnist", "image_size": 32, "max_images_per_class": 40},
        "teacher": {"epochs": 1},
        "trial": {"epochs": EPOCHS, "bn_recalibration_batches": 2},
        "search": {"num_trials": 2, "max_concurrent": 2, "uniform_anchors": [0.5, 0.2], "warm_start": "teacher"},
    }
    (work / "lost.yaml").write_text(yaml.safe_dump(space))
    with local_cluster(workers=2) as cluster:  # one CPU each: one trial on each worker
        command = [sys.executable, "-m", "search.cli", "search", "lost.yaml", "--address", cluster.address]
        uri = initialised_store(work)
        lost_node = cluster.node_id(1)
        assert lost_node is not None
        search = subprocess.Popen(command, cwd=work, env=RAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            tracker, killed, trials = None, None, []
            deadline = time.monotonic() + 600
            while killed is None and time.monotonic() < deadline and search.poll() is None:
                time.sleep(0.5)
                tracker = tracker or tracker_once_created(uri, "lost")
                parent = tracker.latest_search() if tracker else None
                trials = tracker.children(parent.run_id, role="trial") if parent else []
                if any(r.status == "RUNNING" and r.tags.get(NODE_TAG) == lost_node and r.metrics.get("epoch", 0) >= 2 for r in trials):
                    killed = cluster.kill_raylet(1)  # the trial training there has a checkpoint, and is lost
            seen = [(r.tags.get(NODE_TAG) == lost_node, r.status, r.metrics.get("epoch")) for r in trials]
            assert killed is not None, f"no trial was seen past epoch 2 on worker 1: (on worker 1, status, epoch) {seen}; search exit {search.poll()}"
            stdout, stderr = search.communicate(timeout=600)
        finally:
            stop(search)  # SIGTERM first: the search then ends its runs and leaves the cluster
    assert search.returncode == 0, (stdout[-2000:], stderr[-3000:])
    assert "its process or node was lost" in stdout
    parent = tracker.latest_search()
    assert parent.status == "FINISHED"
    trials = tracker.children(parent.run_id, role="trial")
    assert len(trials) == 2 and all(r.status == "FINISHED" for r in trials)  # one run per trial id, both finished
    (resumed,) = [r for r in trials if RESUMED_TAG in r.tags]
    assert resumed.tags[RESUMED_TAG] == "1" and int(resumed.tags[RESUMED_FROM_TAG]) >= 2
    other = next(r for r in trials if r is not resumed)
    assert resumed.tags[NODE_TAG] == other.tags[NODE_TAG]  # it finished on the node that was left
    steps = [m.step for m in tracker.client.get_metric_history(resumed.run_id, "epoch")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))  # every epoch logged once: nothing lost, nothing twice
    assert parent.metrics["finished_trials"] == 2 and parent.metrics["front_size"] >= 1
