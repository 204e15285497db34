"""What a lost node costs: one fixed search on 2 Ray worker nodes (1 CPU each), once undisturbed
and once with worker 1's raylet SIGKILLed when the trial there has passed half its epochs, and a
fresh worker started in its place (as a cluster launcher replaces a lost machine). Reported,
measured in this one run: the trial phase's wall-time ratio (with the loss / without; target
<= 1.2) and the epoch the lost trial resumed from. The search is fixed (uniform anchors only),
so both runs train the same trials; the teacher is trained once, before either timed run.

    .venv/bin/python benchmarks/node_loss.py [--trials 4] [--epochs 4] [--work DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from pipelines.data import prepare_animal_mnist
from search._local_cluster import LocalCluster, local_cluster
from search.run import run_search
from search.space import parse_space
from search.tracking import RESUMED_FROM_TAG, Tracker
from search.trainable import NODE_TAG


def _space(data: Path, *, trials: int, epochs: int) -> dict:
    return {
        "name": "node-loss",
        "data": {"path": str(data), "image_size": 64, "max_images_per_class": 150},
        "teacher": {"epochs": 2},
        "trial": {"epochs": epochs},
        "search": {"num_trials": trials, "max_concurrent": 2, "uniform_anchors": [0.6 * 0.6**i for i in range(trials)], "warm_start": "teacher"},
    }


def _lose_a_node_mid_trial(cluster: LocalCluster, tracker: Tracker, done: threading.Event, *, epoch: int) -> None:
    """Once the trial training on worker 1 has passed `epoch`, kill worker 1 and start a replacement."""
    lost_node = cluster.node_id(1)
    while not done.is_set():
        time.sleep(0.5)
        search = tracker.latest_search()
        trials = tracker.children(search.run_id, role="trial") if search else []
        if any(r.status == "RUNNING" and r.tags.get(NODE_TAG) == lost_node and r.metrics.get("epoch", 0) >= epoch for r in trials):
            cluster.kill_raylet(1)
            cluster.add_worker()
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--work", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="slimtune-node-loss-"))
    data = prepare_animal_mnist(work / "animal_mnist")
    output = work / "runs"
    seconds = {}
    for name in ("teacher", "undisturbed", "lost"):  # one experiment: the teacher is trained in the first only
        space = _space(data, trials=1 if name == "teacher" else args.trials, epochs=1 if name == "teacher" else args.epochs)
        if name == "teacher":
            run_search(parse_space(space), output=output, log=lambda line: None)
            continue
        with local_cluster(workers=2) as cluster:
            done = threading.Event()
            tracker = Tracker(f"sqlite:///{output}/mlflow.db", "node-loss")
            watcher = threading.Thread(target=_lose_a_node_mid_trial, args=(cluster, tracker, done), kwargs={"epoch": args.epochs // 2}, daemon=True)
            if name == "lost":
                watcher.start()
            front = run_search(parse_space(space), output=output, address=cluster.address, log=lambda line: None).front
            done.set()
        seconds[name] = front.search.metrics["trial_phase_seconds"]
        resumed = [r.tags[RESUMED_FROM_TAG] for r in front.trials if RESUMED_FROM_TAG in r.tags]
        finished = len(front.finished)
        print(f"{name}: trial phase {seconds[name]:.0f} s, {finished}/{args.trials} finished, resumed from epoch(s) {resumed or '-'}", flush=True)
    print(f"wall-time ratio with a lost node / without: {seconds['lost'] / seconds['undisturbed']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
