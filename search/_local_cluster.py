"""Several Ray nodes on this one machine, for the tests and benchmarks of the cluster path.

Each node is a `ray start --block` process that this module starts and stops by its own PID
(terminating it stops that node's Ray processes); nothing else on the machine is touched. All
nodes bind 127.0.0.1. The head offers no CPUs, so that work runs on the worker nodes, each with
its own custom resource (`worker_0`, `worker_1`, ...) to steer placement.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["local_cluster", "LocalCluster", "free_port", "wait_for", "stop", "RAY_ENV"]

BIN = Path(sys.executable).parent
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], *, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s")


def stop(process: subprocess.Popen, *, group: bool = False) -> None:
    """SIGTERM the process we started (or its own process group), SIGKILL if it does not exit."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig) if group else process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)


def _active_nodes(address: str) -> int:
    """Active nodes, as `ray status` lists them (one ` 1 node_<id>` line each)."""
    status = subprocess.run([BIN / "ray", "status", f"--address={address}"], env=RAY_ENV, capture_output=True, text=True).stdout
    active = status.split("Active:")[-1].split("Pending:")[0] if "Active:" in status else ""
    return sum(line.strip().startswith("1 node_") for line in active.splitlines())


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid`, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass(frozen=True)
class LocalCluster:
    address: str  # to join: 127.0.0.1:<port>
    workers: list[subprocess.Popen]  # the worker nodes' `ray start --block` processes

    def kill_raylet(self, worker: int) -> int:
        """SIGKILL worker `worker`'s raylet, as when its machine is lost; returns the raylet's PID."""
        for pid in _descendants(self.workers[worker].pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    os.kill(pid, signal.SIGKILL)
                    return pid
        raise RuntimeError(f"worker {worker} has no raylet process")


@contextlib.contextmanager
def local_cluster(workers: int, *, cpus_per_worker: int = 1) -> Iterator[LocalCluster]:
    """A head plus `workers` worker nodes."""
    temp = tempfile.mkdtemp(prefix="/tmp/rc")  # short: Ray's socket paths must stay under ~107 characters
    address = f"127.0.0.1:{free_port()}"
    quiet = {"env": RAY_ENV, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    common = ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    head = ["--head", f"--port={address.split(':')[1]}", "--num-cpus=0", "--include-dashboard=false"]
    nodes = [subprocess.Popen([BIN / "ray", "start", *head, *common], **quiet)]
    try:
        wait_for(lambda: _active_nodes(address) >= 1, what="the Ray head")
        for i in range(workers):
            resources = f"--resources={json.dumps({f'worker_{i}': 1})}"
            nodes.append(subprocess.Popen([BIN / "ray", "start", f"--address={address}", f"--num-cpus={cpus_per_worker}", resources, *common], **quiet))
            wait_for(lambda: _active_nodes(address) >= i + 2, what=f"Ray worker {i}")
        yield LocalCluster(address=address, workers=nodes[1:])
    finally:
        for node in reversed(nodes):
            stop(node)
