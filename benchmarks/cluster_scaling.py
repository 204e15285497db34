"""One fixed search on 1 vs 2 Ray worker nodes (1 CPU each), and the trial overhead of each.

Nodes are `ray start` processes on this machine (search/_local_cluster.py); the search joins them
with --address, exactly as on a cluster. The search is fixed: uniform anchors only, so both runs
train the same trials. Reported, measured in this one run: the trial phase's wall-time ratio
(2 nodes / 1 node; target <= 0.6) and each run's trial overhead = trial-phase wall time /
(sum of the trials' own seconds / trials at once); 1.0 would be no time lost between trials
(target <= 1.05). The teacher is trained once, before either timed run.

    .venv/bin/python benchmarks/cluster_scaling.py [--trials 8] [--epochs 2] [--work DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pipelines.data import prepare_animal_mnist
from search._local_cluster import local_cluster
from search.run import run_search
from search.space import parse_space


def _space(data: Path, *, trials: int, epochs: int, concurrent: int) -> dict:
    targets = [0.6 * 0.7**i for i in range(trials)]
    return {
        "name": "scaling",
        "data": {"path": str(data), "image_size": 64, "max_images_per_class": 150},
        "teacher": {"epochs": 2},
        "trial": {"epochs": epochs},
        "search": {"num_trials": trials, "max_concurrent": concurrent, "uniform_anchors": targets, "warm_start": "teacher"},
    }


def _timed(space: dict, output: Path, address: str | None) -> tuple[float, float]:
    front = run_search(parse_space(space), output=output, address=address, log=lambda line: None).front
    phase = front.search.metrics["trial_phase_seconds"]
    own = sum(r.metrics["seconds"] for r in front.finished)
    return phase, phase / (own / space["search"]["max_concurrent"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="slimtune-scaling-"))
    data = prepare_animal_mnist(work / "animal_mnist")
    output = work / "runs"
    run_search(parse_space(_space(data, trials=1, epochs=1, concurrent=1)), output=output, log=lambda line: None)  # the teacher, once
    results = {}
    for workers in (1, 2):
        with local_cluster(workers=workers) as cluster:
            results[workers] = _timed(_space(data, trials=args.trials, epochs=args.epochs, concurrent=workers), output, cluster.address)
        print(f"{workers} node(s): trial phase {results[workers][0]:.0f} s, trial overhead {results[workers][1]:.2f}x", flush=True)
    print(f"wall-time ratio 2 nodes / 1 node: {results[2][0] / results[1][0]:.2f} (target <= 0.6)")


if __name__ == "__main__":
    main()
