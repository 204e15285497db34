"""The quickstart workload, measured: wall time, trial overhead, the dense teacher, the front, its
hypervolume, and the target check.

Target (issue 2): the front holds a model at <= 0.5x the teacher's MACs within 2 points of the
teacher's test accuracy. Times here are noisy (+-20%), so besides the wall time the script prints
ratios measured in this one run: the whole search vs one teacher fine-tune, and the mean trial vs
the teacher.

    .venv/bin/python benchmarks/quickstart.py [--space spaces/quickstart.yaml] [--output DIR]
"""
from __future__ import annotations

import argparse
import tempfile
import time

from search.front import SearchFront
from search.report import front_rows, front_table
from search.run import run_search
from search.space import load_space


def _target(front: SearchFront) -> str:
    teacher = front.teacher.metrics
    within = [
        r for r in front.front
        if r.metrics["macs"] <= 0.5 * teacher["macs"] and r.metrics["test_accuracy"] >= teacher["test_accuracy"] - 0.02
    ]
    if within:
        best = min(within, key=lambda r: r.metrics["macs"])
        return (
            f"MET: trial {best.tags['slimtune.trial_id']} at {best.metrics['macs_ratio']:.2f}x teacher MACs,"
            f" test acc {best.metrics['test_accuracy']:.3f} vs teacher {teacher['test_accuracy']:.3f}"
        )
    small = [r for r in front.front if r.metrics["macs"] <= 0.5 * teacher["macs"]]
    if not small:
        return "NOT MET: no front model at <= 0.5x teacher MACs"
    best = max(small, key=lambda r: r.metrics["test_accuracy"])
    gap = teacher["test_accuracy"] - best.metrics["test_accuracy"]
    return f"NOT MET: best front model at <= 0.5x MACs is {100 * gap:.1f} points below the teacher (needs <= 2)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="spaces/quickstart.yaml")
    parser.add_argument("--output", default=None, help="default: a fresh temporary folder (the teacher is trained anew)")
    args = parser.parse_args()
    experiment = load_space(args.space)
    output = args.output or tempfile.mkdtemp(prefix="slimtune-bench-")
    start = time.perf_counter()
    front = run_search(experiment, output=output, log=lambda line: print(line, flush=True)).front
    wall = time.perf_counter() - start
    teacher_time = front.teacher.metrics["seconds"]
    trial_times = [r.metrics["seconds"] for r in front.finished]
    print("\n## quickstart benchmark")
    print(f"wall time: {wall:.0f} s for {len(front.trials)} trials ({len(front.finished)} finished)")
    print(f"search / one teacher fine-tune: {wall / teacher_time:.1f}x")
    if trial_times:
        print(f"mean trial / teacher fine-tune: {sum(trial_times) / len(trial_times) / teacher_time:.2f}x")
    phase, concurrent = front.search.metrics["trial_phase_seconds"], front.search.metrics["max_concurrent"]
    if trial_times:  # 1.00 = no time lost between trials
        print(f"trial overhead: {phase:.0f} s trial phase / ({sum(trial_times):.0f} s of trials / {concurrent:g} at a time) = {phase / (sum(trial_times) / concurrent):.2f}x")
    if front.hypervolume is not None:
        versus = f", uniform anchors alone {front.anchors_hypervolume:.3f}" if front.anchors_hypervolume is not None else ""
        print(f"hypervolume {front.hypervolume:.3f}{versus}")
    t = front.teacher.metrics
    print(f"dense teacher: test acc {t['test_accuracy']:.3f}, val acc {t['val_accuracy']:.3f}, {t['macs'] / 1e6:.2f}M MACs")
    print(front_table(front_rows(front.front)))
    print(f"target (<= 0.5x MACs within 2 points of the teacher's test accuracy): {_target(front)}")


if __name__ == "__main__":
    main()
