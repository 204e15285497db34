"""Does the search beat a uniform sweep? Hypervolume at equal compute, several seeds, two tasks.

Every variant runs the real `slimtune search` (local Ray, Optuna, SQLite MLflow) on the same dense
teacher with the same total number of fine-tune epochs (16 trials x 4 epochs, or an epoch budget
of 64 where trials may stop early); only the way trials are chosen differs. Hypervolume: the area
dominated by the front of finished trials, selected on val accuracy, measured with test accuracy,
in the box MACs / teacher MACs in [0, 1] x accuracy in [1 / classes, 1]. The limit is the
teacher's test accuracy at zero MACs; "gap closed" is (HV - best uniform sweep) / (limit - best
uniform sweep). Also reported: the Spearman rank correlation, at 0.05x-0.5x MACs, of each finished
trial's final val accuracy with its adaptive-BN proxy and with its val accuracy after one epoch
(the two candidate early signals for successive halving).

    .venv/bin/python benchmarks/search_efficiency.py [--tasks animal_mnist fashion_mnist] [--seeds 0 1 2]
        [--variants ...] [--work benchmark-work] [--results benchmarks/search_efficiency.jsonl]

Results are appended to --results as one JSON line per search (a rerun skips what is there), and
the table (benchmarks/search_efficiency.md) and plot (.png) are rebuilt from all of them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from _tasks import TASKS, prepare_task

ROOT = Path(__file__).resolve().parents[1]
TRIALS, EPOCHS = 16, 4
SWEEP_RATIOS = [0.97 - i * (0.97 - 0.14) / 15 for i in range(16)]  # the uniform sweep, as keep ratios


def _log_spaced(low: float, high: float, n: int) -> list[float]:
    return [high * (low / high) ** (i / (n - 1)) for i in range(n)]


def _sweep(raw: dict, *, criterion: str, targets: list[float], warm_start: str = "teacher") -> dict:
    s = raw["search"]
    s.update(importance=criterion, uniform_anchors=targets, warm_start=warm_start, num_trials=len(targets))
    return raw


def _ratio_targets(raw: dict) -> list[float]:
    """MACs targets of the uniform keep ratios in SWEEP_RATIOS (a user's hand sweep)."""
    import torchvision

    from pipelines.prune import kept_channels, macs_model, prunable_groups

    model = torchvision.models.get_model(raw["model"]["arch"], weights=None, num_classes=10)
    size = raw["data"]["image_size"]
    groups, macs = prunable_groups(model, image_size=size), macs_model(model, image_size=size)
    return [macs({g.name: kept_channels(g.channels, r) for g in groups}) / macs.dense for r in SWEEP_RATIOS]


VARIANTS: dict[str, Callable[[dict], dict]] = {
    # (a), (b): what a user does by hand, the sweep: 16 uniform keep ratios 0.97 .. 0.14, each from the teacher.
    "uniform L1 sweep, 16 x 4": lambda raw: _sweep(raw, criterion="l1", targets=_ratio_targets(raw)),
    "uniform activation sweep, 16 x 4": lambda raw: _sweep(raw, criterion="activation", targets=_ratio_targets(raw)),
    # (d), the quickstart's default: the same uniform shapes at 16 log-spaced MACs targets, each
    # trial pruning the nearest larger finished one (the space's own uniform_anchors).
    "uniform activation chain, 16 x 4": lambda raw: raw,
    "uniform activation chain, 8 x 8": lambda raw: _epochs(
        _sweep(raw, criterion="activation", targets=_log_spaced(0.005, 0.8, 8), warm_start="front"), 8
    ),
    # (c) and the samplers over the full space (MACs target + allocation shape + KD weights, warm
    # start), after 4 uniform anchors.
    "random search, 16 x 4": lambda raw: _sampled(raw, sampler="random"),
    "gp, 16 x 4": lambda raw: _sampled(raw, sampler="gp"),
    "tpe, 16 x 4": lambda raw: _sampled(raw, sampler="tpe"),
    "nsga2, 16 x 4": lambda raw: _sampled(raw, sampler="nsga2"),
    "gp, 16 x 4, 12 on a MACs grid": lambda raw: _sampled(raw, sampler="gp", target_grid=12),
    "random search, 16 x 4, 12 on a MACs grid": lambda raw: _sampled(raw, sampler="random", target_grid=12),
    "gp, 16 x 4, no warm start": lambda raw: _sampled(raw, sampler="gp", warm_start="teacher"),
    "gp, 8 x 8": lambda raw: _epochs(_sampled(raw, sampler="gp", num_trials=8), 8),
    "gp + halving at 2 and 4 of 8 epochs, 64 epochs": lambda raw: _epochs(
        _sampled(raw, sampler="gp", num_trials=24, rungs=[2, 4], eta=2, epoch_budget=TRIALS * EPOCHS), 8
    ),
}
SWEEPS = ("uniform L1 sweep, 16 x 4", "uniform activation sweep, 16 x 4")  # the baselines the issue names
ROLES = {  # the four: (a), (b) hand sweeps, (c) random search, (d) the default search
    "uniform L1 sweep, 16 x 4": "(a) ",
    "uniform activation sweep, 16 x 4": "(b) ",
    "random search, 16 x 4": "(c) ",
    "uniform activation chain, 16 x 4": "(d) default: ",
}


def _epochs(raw: dict, epochs: int) -> dict:
    raw["trial"]["epochs"] = epochs
    return raw


def _sampled(raw: dict, **search: Any) -> dict:
    raw["search"].update(uniform_anchors=[0.5, 0.15, 0.05, 0.015], **search)
    return raw


def space(task: str, variant: str, seed: int, work: Path) -> dict:
    raw = yaml.safe_load((ROOT / "spaces" / "quickstart.yaml").read_text())
    raw["name"] = task
    raw["data"]["path"] = str(prepare_task(task, work))
    raw["trial"]["epochs"] = EPOCHS
    raw["trial"]["seed"] = seed
    raw["search"].update(num_trials=TRIALS, seed=seed)
    return VARIANTS[variant](copy.deepcopy(raw))


def _spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return None if sx == 0 or sy == 0 else sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)


def run_one(task: str, variant: str, seed: int, work: Path) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from search.run import run_search
    from search.space import parse_space

    experiment = parse_space(space(task, variant, seed, work))
    started = time.perf_counter()
    outcome = run_search(experiment, output=work / "runs", log=lambda line: print(f"    {line}", flush=True))
    front = outcome.front
    teacher = front.teacher.metrics
    client = MlflowClient(outcome.tracking_uri)
    trials = []
    for run in front.trials:
        m = run.metrics
        history = client.get_metric_history(run.run_id, "val_accuracy")
        first = next((h.value for h in history if h.step == 1), None)
        trials.append(
            {
                "status": run.status,
                "macs_ratio": m.get("macs_ratio"),
                "val": m.get("val_accuracy"),
                "test": m.get("test_accuracy"),
                "proxy": m.get("proxy_accuracy"),
                "val_epoch1": first,
                "start_from": run.params.get("start_from"),
                "anchor": run.tags.get("slimtune.anchor") == "true",
                "front": run.tags.get("pareto") == "true",
            }
        )
    return {
        "task": task,
        "variant": variant,
        "seed": seed,
        "hypervolume": front.hypervolume,
        "anchors_hypervolume": front.anchors_hypervolume,
        "limit": teacher["test_accuracy"] - 1 / int(front.search.params["num_classes"]),
        "teacher_test": teacher["test_accuracy"],
        "epochs": int(front.search.metrics["fine_tune_epochs"]),
        "finished": len(front.finished),
        "front_macs": [min(r.metrics["macs_ratio"] for r in front.front), max(r.metrics["macs_ratio"] for r in front.front)],
        "seconds": time.perf_counter() - started,
        "trials": trials,
    }


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {sd:.3f}"


def table(results: list[dict]) -> str:
    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    lines = [
        f"Hypervolume (test accuracy of the val-selected front; mean +- sd over seeds) at equal compute:"
        f" {TRIALS * EPOCHS} fine-tune epochs per search, MobileNetV2 at 64 px, one shared teacher per task.",
        "Gap closed = (HV - best uniform sweep) / (limit - best uniform sweep), from the means.",
        "",
        "| variant | " + " | ".join(f"{t} HV | {t} gap closed | {t} front spans (x MACs)" for t in tasks) + " |",
        "| --- |" + " --- | --- | --- |" * len(tasks),
    ]
    by = {(r["task"], r["variant"]): [] for r in results}
    for r in results:
        by[(r["task"], r["variant"])].append(r)
    best_sweep = {
        t: max((statistics.mean([r["hypervolume"] for r in by.get((t, v), [])]) for v in SWEEPS if by.get((t, v))), default=None)
        for t in tasks
    }
    limits = {t: statistics.mean([r["limit"] for r in results if r["task"] == t]) for t in tasks}
    for v in variants:
        cells = []
        for t in tasks:
            runs = by.get((t, v), [])
            hv = [r["hypervolume"] for r in runs]
            closed = "-"
            if hv and best_sweep[t] is not None and limits[t] > best_sweep[t]:
                closed = f"{(statistics.mean(hv) - best_sweep[t]) / (limits[t] - best_sweep[t]):+.2f}"
            spans = f"{statistics.mean([r['front_macs'][0] for r in runs]):.3f} - {statistics.mean([r['front_macs'][1] for r in runs]):.2f}" if runs else "-"
            cells.append(f"{_mean_sd(hv)} (n={len(hv)}) | {closed} | {spans}")
        lines.append(f"| {ROLES.get(v, '')}{v} | " + " | ".join(cells) + " |")
    lines.append("| limit (teacher test accuracy at zero MACs) | " + " | ".join(f"{limits[t]:.3f} | | " for t in tasks) + " |")
    lines += [
        "",
        "Spearman rank correlation of two early signals with the final val accuracy, finished trials of all variants"
        " pooled, within MACs bins (across bins both would correlate through MACs alone):",
        "",
    ]
    fmt = lambda v: "-" if v is None else f"{v:+.2f}"  # noqa: E731
    for t in tasks:
        cells = []
        for low, high in ((0.05, 0.15), (0.15, 0.5)):
            pool = [x for r in results if r["task"] == t for x in r["trials"] if x["status"] == "FINISHED" and low <= x["macs_ratio"] < high]
            first = [x for x in pool if x["val_epoch1"] is not None]
            proxy = _spearman([x["proxy"] for x in pool], [x["val"] for x in pool])
            epoch1 = _spearman([x["val_epoch1"] for x in first], [x["val"] for x in first])
            cells.append(f"{low:g}x-{high:g}x: adaptive-BN proxy {fmt(proxy)}, val accuracy after epoch 1 {fmt(epoch1)} ({len(pool)} trials)")
        lines.append(f"- {t}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in results)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), dpi=110, squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for i, v in enumerate(variants):
            runs = [r for r in results if r["task"] == t and r["variant"] == v]
            if not runs:
                continue
            run = min(runs, key=lambda r: r["seed"])
            front = sorted((x["macs_ratio"], x["test"]) for x in run["trials"] if x["front"])
            ax.step([m for m, _ in front], [a for _, a in front], where="post", marker="o", ms=3, color=f"C{i}", label=f"{v} (seed {run['seed']})")
        ax.set_xscale("log")
        ax.set_xlabel("MACs / teacher MACs (log)")
        ax.set_ylabel("test accuracy of the val-selected front")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", default="benchmark-work")
    parser.add_argument("--results", default="benchmarks/search_efficiency.jsonl")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    results_file = Path(args.results)
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    done = {(r["task"], r["variant"], r["seed"]) for r in results}
    for seed in args.seeds:  # seed-major: a cut-short run still covers every variant
        for task in args.tasks:
            for variant in args.variants:
                if (task, variant, seed) in done:
                    continue
                print(f"{task} / {variant} / seed {seed}", flush=True)
                result = run_one(task, variant, seed, work)
                print(f"  -> hypervolume {result['hypervolume']:.4f} in {result['seconds']:.0f} s", flush=True)
                results.append(result)
                with results_file.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                Path(args.results).with_suffix(".md").write_text(table(results))
    Path(args.results).with_suffix(".md").write_text(table(results))
    plot(results, Path(args.results).with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
