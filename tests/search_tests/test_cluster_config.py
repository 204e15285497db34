"""cluster.yaml is valid for Ray's launcher and keeps the promises its header makes; the cluster checks."""
from __future__ import annotations

import pytest
import yaml

from search._helpers import UsageError
from search.cluster import check_tracking_uri

from _space_helpers import REPO

CONFIG = yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(CONFIG))


def _commands() -> str:
    keys = ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return "\n".join(line for key in keys for line in CONFIG.get(key, []))


def test_nothing_listens_on_all_interfaces_and_mlflow_has_basic_auth() -> None:
    commands = _commands()
    assert "0.0.0.0" not in commands
    assert "--dashboard-host=127.0.0.1" in commands
    assert "--app-name basic-auth" in commands
    assert "mlflow.db" in commands and "/mnt/" not in commands  # the backend store is on the head's own disk


def test_the_virtualenv_data_and_runs_are_not_copied_to_the_nodes() -> None:
    excluded = " ".join(CONFIG["rsync_exclude"])
    for path in (".venv", "data", "slimtune-runs"):
        assert path in excluded


@pytest.mark.parametrize(
    ("uri", "nodes", "refused"),
    [
        ("http://127.0.0.1:5000", {"10.0.0.5"}, False),  # every node is this machine
        ("http://127.0.0.1:5000", {"10.0.0.5", "10.0.0.6"}, True),
        ("http://localhost:5000", {"10.0.0.5", "10.0.0.6"}, True),
        ("sqlite:////tmp/runs/mlflow.db", {"10.0.0.5", "10.0.0.6"}, True),  # a file on one machine
        ("sqlite:////tmp/runs/mlflow.db", {"10.0.0.5"}, False),
        ("http://10.0.0.5:5000", {"10.0.0.5", "10.0.0.6"}, False),
    ],
)
def test_tracking_uri_must_reach_every_machine(uri: str, nodes: set[str], refused: bool) -> None:
    if refused:
        with pytest.raises(UsageError, match=r"^--tracking-uri: .*cannot"):
            check_tracking_uri(uri, nodes=nodes)
    else:
        check_tracking_uri(uri, nodes=nodes)


def test_without_an_address_a_fresh_local_ray_starts_even_beside_a_dead_cluster() -> None:
    """Ray's session file names a cluster that is gone: a plain ray.init() would retry it for minutes."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="/tmp/rt"))  # short: Ray's socket paths are limited to ~107 characters
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens on port 9
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    code = "import ray; from search.cluster import start_ray; print(start_ray(None)); ray.shutdown()"
    try:
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "local"
