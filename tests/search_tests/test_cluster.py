"""A search on a real 3-node Ray cluster with a real MLflow server, all on this machine, on loopback.

The head gets no CPUs, each worker one and a custom resource, so the teacher task and the trials
run on the workers and two trials at a time land on different nodes. The trials get everything
through Ray and MLflow: the output folder gets no trial files, and models come back from the
server, which uses basic auth as cluster.yaml's does. Every process is started here and stopped by
its own PID (`ray start --block` stops its node's processes when terminated; the MLflow server
runs in its own process group).
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from pipelines.data import prepare_animal_mnist
from search._local_cluster import BIN, RAY_ENV, free_port, local_cluster, stop, wait_for
from search.tracking import Tracker
from search.trainable import NODE_TAG

USER, PASSWORD = "slimtune", secrets.token_hex(8)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with local_cluster(workers=2) as nodes:
        yield nodes.address


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A basic-auth MLflow server on loopback; the credentials are in this process's environment
    only, so trials on the Ray nodes (started without them) get them from the driver through Ray."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    (root / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/basic_auth.db\n"
        f"admin_username = {USER}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {**RAY_ENV, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    server = subprocess.Popen(
        [BIN / "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, what="the MLflow server")
        with pytest.MonkeyPatch.context() as patch:  # this test process reads the server too
            patch.setenv("MLFLOW_TRACKING_USERNAME", USER)
            patch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
            yield uri
    finally:
        stop(server, group=True)


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
    result = subprocess.run(command, cwd=work, env={**RAY_ENV, **_credentials()}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return {"work": work, "stdout": result.stdout, "tracker": Tracker(mlflow_server, "cluster"), "uri": mlflow_server}


def _credentials() -> dict[str, str]:
    return {name: os.environ[name] for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}


def test_the_server_refuses_requests_without_the_credentials(searched: dict) -> None:
    request = urllib.request.Request(f"{searched['uri']}/api/2.0/mlflow/experiments/search", data=b'{"max_results": 1}', method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        urllib.request.urlopen(request, timeout=5)
        status = 200
    except urllib.error.HTTPError as error:
        status = error.code
    assert status == 401


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
    assert sorted(p.name for p in (output / "cluster").iterdir() if not p.name.startswith("teacher-")) == ["config.yaml", "front.html", "front.png", "optuna.db", "ray"]
    assert not any((output / "mlartifacts").iterdir())  # the server holds the artifacts


def test_models_download_from_the_server(searched: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "search.cli", "fetch", "cluster", "--max-macs", "1G", "-o", "model", "--tracking-uri", searched["uri"]],
        cwd=searched["work"], env={**RAY_ENV, **_credentials()}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"model.safetensors", "channel_spec.json", "config.yaml"} <= {p.name for p in (searched["work"] / "model").iterdir()}
