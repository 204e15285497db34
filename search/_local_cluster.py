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
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["local_cluster", "LocalCluster", "free_port", "wait_for", "stop", "descendants", "RAY_ENV"]

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


def descendants(pid: int) -> list[int]:
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


@dataclass
class LocalCluster:
    """The nodes `local_cluster` started; `workers[i]` is worker i's `ray start --block` process."""

    address: str  # to join: 127.0.0.1:<port>
    temp_dir: str
    cpus_per_worker: int
    head: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)

    def _start(self, *args: str) -> subprocess.Popen:
        common = ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        return subprocess.Popen([BIN / "ray", "start", *args, *common], env=RAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def add_worker(self) -> int:
        """Start one more worker node (custom resource `worker_<i>`), as a cluster launcher replaces a lost machine; returns i."""
        i = len(self.workers)
        resources = f"--resources={json.dumps({f'worker_{i}': 1})}"
        self.workers.append(self._start(f"--address={self.address}", f"--num-cpus={self.cpus_per_worker}", resources))

        def joined() -> bool:  # every worker with a raylet is an active node, the new one included
            raylets = [self._raylet(w) for w in self.workers]
            return raylets[-1] is not None and _active_nodes(self.address) == 1 + sum(r is not None for r in raylets)

        wait_for(joined, what=f"Ray worker {i}")
        return i

    def kill_raylet(self, worker: int) -> int:
        """SIGKILL worker `worker`'s raylet, as when its machine is lost; returns the raylet's PID."""
        pid = self._raylet(self.workers[worker])
        if pid is None:
            raise RuntimeError(f"worker {worker} has no raylet process")
        os.kill(pid, signal.SIGKILL)
        return pid

    def node_id(self, worker: int) -> str | None:
        """Worker `worker`'s Ray node id (hex, as `ray.get_runtime_context().get_node_id()` gives it), read from its raylet's command line."""
        pid = self._raylet(self.workers[worker])
        if pid is None:
            return None
        with contextlib.suppress(OSError):
            for arg in Path(f"/proc/{pid}/cmdline").read_text().split("\0"):
                if arg.startswith("--node_id="):
                    return arg.removeprefix("--node_id=")
        return None

    @staticmethod
    def _raylet(node: subprocess.Popen) -> int | None:
        for pid in descendants(node.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
        return None


@contextlib.contextmanager
def local_cluster(workers: int, *, cpus_per_worker: int = 1) -> Iterator[LocalCluster]:
    """A head (no CPUs) plus `workers` worker nodes."""
    temp = tempfile.mkdtemp(prefix="/tmp/rc")  # short: Ray's socket paths must stay under ~107 characters
    cluster = LocalCluster(address=f"127.0.0.1:{free_port()}", temp_dir=temp, cpus_per_worker=cpus_per_worker)
    cluster.head = cluster._start("--head", f"--port={cluster.address.split(':')[1]}", "--num-cpus=0", "--include-dashboard=false")
    try:
        wait_for(lambda: _active_nodes(cluster.address) >= 1, what="the Ray head")
        for _ in range(workers):
            cluster.add_worker()
        yield cluster
    finally:
        for node in reversed([cluster.head, *cluster.workers]):
            stop(node)
