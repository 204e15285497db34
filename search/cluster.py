"""Where the trials run: a fresh local Ray, or a cluster joined by address; the checks that must
pass before anything trains there. Imports Ray inside the functions: the CLI stays instant.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from search._helpers import UsageError

__all__ = ["configure_ray_environment", "start_ray", "check_gpus", "check_tracking_uri", "node_addresses", "concurrency", "pack", "unpack"]

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


_FORWARDED = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")  # MLflow auth, for every node


def configure_ray_environment(*, verbose: bool = False) -> None:
    """Ray's and Tune's settings for a search, before Ray starts. Without `verbose` Ray prints
    nothing of its own into the terminal but errors (slimtune's progress lines say what runs);
    with it, Ray's usual output: its start-up logs, the workers' output and Tune's tables."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not verbose:  # Tune's newer output engine (its default) boxes and tables; the legacy one honours verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # With the workers' output on (verbose), Ray would swap builtins.print for its tqdm-safe one, and
    # Tune could no longer pickle the progress callback, whose `log` is the builtin print.
    os.environ["RAY_TQDM_PATCH_PRINT"] = "0"
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # slimtune's own handler stops the trials and labels them (search.run)
    # Save Tune's experiment state after every step of its loop, not every 10 s or more: a trial a
    # killed driver had started is then always in it, and `resume` continues it instead of
    # starting another in its place.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # ... on purpose: not Tune's warning that snapshots that often may become a bottleneck (--verbose).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def start_ray(address: str | None, *, verbose: bool = False) -> str:
    """Join `address` (or $RAY_ADDRESS), else start a fresh local Ray: never a cluster that merely
    happens to run on this machine (its session file may name a dead one). Returns the address used.

    Without `verbose`, only Ray's errors reach the terminal (Tune's "Trial task failed" with
    its traceback among them) and the workers' stdout/stderr stay in Ray's session logs
    (/tmp/ray/session_latest/logs); a failed trial's error is in its MLflow run too."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60's token auth: nothing to manage on a laptop
    # The driver's MLflow credentials reach the trials on every node (they run as Ray workers).
    env_vars = {name: os.environ[name] for name in _FORWARDED if name in os.environ}
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level="INFO" if verbose else "ERROR",  # INFO: Ray's default
        log_to_driver=verbose,
        runtime_env={"env_vars": env_vars} if env_vars else None,
    )
    return address


def node_addresses() -> set[str]:
    """IP addresses of the cluster's alive nodes."""
    import ray

    return {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}


def concurrency(*, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials the cluster's resources hold at once (at least one)."""
    import ray

    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) / cpus_per_trial]
    if gpus_per_trial > 0:
        fits.append(total.get("GPU", 0) / gpus_per_trial)
    return max(1, int(min(fits) + 1e-9))


def check_gpus(gpus_per_trial: float) -> None:
    """A trial asking for GPUs on a cluster without any would wait forever: refuse it now."""
    import ray

    available = ray.cluster_resources().get("GPU", 0)
    if gpus_per_trial > 0 and available < gpus_per_trial:
        raise UsageError(
            f"search.gpus_per_trial: {gpus_per_trial:g} GPU per trial, but the Ray cluster has {available:g} GPUs;"
            " set it to 0 or join a cluster with GPUs (--address)"
        )


def check_tracking_uri(uri: str, *, nodes: set[str]) -> None:
    """Trials log from every node: a loopback server or a local SQLite file only works while every
    node is this machine (SQLite on a network filesystem is not safe either)."""
    if len(nodes) <= 1:
        return
    parsed = urlparse(uri)
    machines = ", ".join(sorted(nodes))
    if parsed.scheme in ("http", "https") and parsed.hostname in _LOOPBACK:
        raise UsageError(
            f"--tracking-uri: {uri} is a loopback address, which the cluster's other machines ({machines}) cannot"
            " reach; give the MLflow server's private address, e.g. http://<head-ip>:5000"
        )
    if parsed.scheme not in ("http", "https", "databricks"):
        raise UsageError(
            f"--tracking-uri: {uri} is a store on this machine, which the cluster's other machines ({machines})"
            " cannot write to; run `mlflow server` on the head (see cluster.yaml) and pass http://<head-ip>:5000"
        )


def pack(directory: Path) -> dict[str, bytes]:
    """A folder's files as bytes, to travel through Ray's object store instead of a shared filesystem."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def unpack(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory
