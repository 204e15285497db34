"""A search on a real 3-node Ray cluster with a real MLflow server, all on this machine, on loopback.

The head gets no CPUs, each worker one and a custom resource, so the teacher task and the trials
run on the workers and two trials at a time land on different nodes. The trials get everything
through Ray and MLflow: the output folder gets no trial files, and models come back from the
server. Every process is started here and stopped by its own PID (`ray start --block` stops its
node's processes when terminated; the MLflow server runs in its own process group).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pipelines.data import prepare_animal_mnist
from search.tracking import Tracker
from search.trainable import NODE_TAG

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
QUIET = {"env": ENV, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check: Callable[[], bool], *, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s")


def _stop(process: subprocess.Popen, *, group: bool = False) -> None:
    """SIGTERM the process we started (or its own process group), SIGKILL if it does not exit."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig) if group else process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    temp = tempfile.mkdtemp(prefix="/tmp/rc")  # short: Ray's socket paths must stay under ~107 characters
    port = _free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    nodes = [subprocess.Popen([BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false", *common], **QUIET)]
    address = f"127.0.0.1:{port}"

    def alive() -> int:
        """Active nodes, as `ray status` lists them (one ` 1 node_<id>` line each)."""
        status = subprocess.run([BIN / "ray", "status", f"--address={address}"], env=ENV, capture_output=True, text=True).stdout
        active = status.split("Active:")[-1].split("Pending:")[0] if "Active:" in status else ""
        return sum(line.strip().startswith("1 node_") for line in active.splitlines())

    try:
        _wait(lambda: alive() >= 1, what="the Ray head")
        for count, name in enumerate(("worker_a", "worker_b"), start=2):
            resources = f"--resources={json.dumps({name: 1})}"
            nodes.append(subprocess.Popen([BIN / "ray", "start", f"--address={address}", "--num-cpus=1", resources, *common], **QUIET))
            _wait(lambda: alive() >= count, what=f"Ray node {count}")
        yield address
    finally:
        for node in reversed(nodes):
            _stop(node)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        start_new_session=True, **QUIET,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait(healthy, what="the MLflow server")
        yield uri
    finally:
        _stop(server, group=True)


@pytest.fixture(scope="module")
def searched(cluster: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("cluster-search")
    prepare_animal_mnist(work / "animal_mnist")
    space = {
        "name": "cluster",
        "data": {"path": "animal_mnist", "image_size": 32, "max_images_per_class": 20},
        "teacher": {"epochs": 1},
        "trial": {"epochs": 1, "bn_recalibration_batches": 2},
        "search": {"num_trials": 4, "max_concurrent": 2, "uniform_anchors": [0.5, 0.2, 0.08, 0.03]},
    }
    (work / "cluster.yaml").write_text(yaml.safe_dump(space))
    command = [sys.executable, "-m", "search.cli", "search", "cluster.yaml", "--address", cluster, "--tracking-uri", mlflow_server]
    result = subprocess.run(command, cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return {"work": work, "stdout": result.stdout, "tracker": Tracker(mlflow_server, "cluster"), "uri": mlflow_server}


def test_trials_ran_on_two_nodes_and_finished(searched: dict) -> None:
    tracker: Tracker = searched["tracker"]
    search = tracker.latest_search()
    assert search.status == "FINISHED"
    trials = tracker.children(search.run_id, role="trial")
    assert len(trials) == 4 and all(r.status == "FINISHED" for r in trials)
    assert len({r.tags[NODE_TAG] for r in trials}) >= 2
    assert "Ray: joined 127.0.0.1" in searched["stdout"]


def test_trials_wrote_nothing_to_the_output_folder(searched: dict) -> None:
    output = searched["work"] / "slimtune-runs"
    assert sorted(p.name for p in (output / "cluster").iterdir() if not p.name.startswith("teacher-")) == ["config.yaml", "front.png", "optuna.db", "ray"]
    assert not any((output / "mlartifacts").iterdir())  # the server holds the artifacts


def test_models_download_from_the_server(searched: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "search.cli", "fetch", "cluster", "--max-macs", "1G", "-o", "model", "--tracking-uri", searched["uri"]],
        cwd=searched["work"], env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"model.safetensors", "channel_spec.json", "config.yaml"} <= {p.name for p in (searched["work"] / "model").iterdir()}
