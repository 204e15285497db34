"""The quickstart search under today's teacher recipe, the default and the ema variant, side by side.

Each run is the quickstart space (spaces/quickstart.yaml: 16 trials, 4 epochs, the same
anchors and sampler) with only the teacher's recipe changed, so both recipes get the same
compute. Three tasks: Animal-MNIST at the quickstart's size (350 images per class), Fashion-MNIST
at 100 per class and the imbalanced 200/60/20 Fashion-MNIST subset of benchmarks/recipes.py,
whose search maximises balanced accuracy (what a user with that folder would choose). Seed s sets
teacher.seed, trial.seed and search.seed; the split is fixed. Reported: the teacher's test
metric and the front's hypervolume (the front chosen on val, measured on test, as `slimtune
pareto` reports it), mean +- sd.

    nice -n 10 .venv/bin/python benchmarks/recipe_fronts.py [--seeds 0 1 2] [--tasks ...]
        [--work /tmp/recipe-fronts] [--out benchmarks/recipe_fronts.md]

Every finished search is appended to <work>/results.jsonl; a rerun skips what is there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import yaml

from search.run import run_search
from search.space import parse_space, to_dict

from recipes import NEW, TODAY, append_result, load_results, mean_sd, task_data

RECIPES = {
    "today (last epoch, no class balance)": TODAY,
    "ema, class_balance auto": NEW,
    "**default**: last epoch, class_balance auto": dataclasses.replace(NEW, keep="last"),
}
IMBALANCED_ONLY = {"**default**: last epoch, class_balance auto"}  # on a balanced task, class_balance auto is off: today's recipe
RECIPE_KEYS = ("augment", "warmup_epochs", "label_smoothing", "keep", "class_balance")
TASKS = {"animal_mnist": "accuracy", "fashion_mnist": "accuracy", "fashion_imbalanced": "balanced_accuracy"}


def experiment_for(task: str, recipe: str, seed: int, work: Path, *, space: str = "spaces/quickstart.yaml"):
    raw = yaml.safe_load(Path(space).read_text())
    raw["name"] = f"{task}-{list(RECIPES).index(recipe)}-{seed}"
    if task != "animal_mnist":
        data = task_data(task, work, per_class=100)
        raw["data"].update(path=data.path, max_images_per_class=data.max_images_per_class)
    raw["teacher"].update({k: getattr(RECIPES[recipe], k) for k in RECIPE_KEYS}, seed=seed)
    raw["trial"]["seed"] = seed
    raw["search"].update(seed=seed, metric=TASKS[task])
    return parse_space(raw)


def _run(task: str, recipe: str, seed: int, work: Path) -> dict:
    experiment = experiment_for(task, recipe, seed, work)
    started = time.perf_counter()
    front = run_search(experiment, output=work / "runs", log=lambda line: None).front
    metric = experiment.search.metric
    return {
        "task": task, "recipe": recipe, "seed": seed, "metric": metric, "seconds": time.perf_counter() - started,
        "teacher_test": front.teacher.metrics[f"test_{metric}"], "teacher_test_accuracy": front.teacher.metrics["test_accuracy"],
        "hypervolume": front.hypervolume,
        "front_size": len(front.front), "finished": len(front.finished), "experiment": to_dict(experiment),
    }  # fmt: skip


def report(rows: list[dict], seeds: list[int]) -> str:
    rows = [r for r in rows if r["seed"] in seeds]
    lines = [
        f"# The quickstart search under each teacher recipe, seeds {', '.join(map(str, sorted({r['seed'] for r in rows})))}",
        "",
        "`benchmarks/recipe_fronts.py`: spaces/quickstart.yaml with only the teacher's recipe changed (16 trials, 4 epochs each;"
        " equal compute). Animal-MNIST at 350 images per class, Fashion-MNIST at 100, the 200/60/20 Fashion-MNIST subset"
        " searched on balanced accuracy. The default (last epoch, class_balance auto) runs on the imbalanced subset only: on a"
        " balanced task class_balance auto is off, so there it is today's recipe. Hypervolume: the front chosen on val, measured on test; front size: the mean. Mean +- sd over seeds (teacher, trial and search seed; the split is fixed).",
        "",
        "| task | metric | recipe | seeds | teacher test | front hypervolume | front size |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, metric in TASKS.items():
        for recipe in RECIPES:
            mine = [r for r in rows if r["task"] == task and r["recipe"] == recipe]
            if mine:
                lines.append(
                    f"| {task} | {metric} | {recipe} | {len(mine)} | {mean_sd([r['teacher_test'] for r in mine])}"
                    f" | {mean_sd([r['hypervolume'] for r in mine])}"
                    f" | {statistics.mean([r['front_size'] for r in mine]):.1f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", default="/tmp/recipe-fronts")
    parser.add_argument("--out", default="benchmarks/recipe_fronts.md")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    results, rows = load_results(work)
    have = {(r["task"], r["recipe"], r["seed"]) for r in rows}
    # Seed-major, the cheap tasks first: a run cut short still compares the recipes on the same seeds.
    for seed in args.seeds:
        for task in sorted(args.tasks, key=lambda t: t == "animal_mnist"):
            for recipe in RECIPES:
                if (task, recipe, seed) in have or (recipe in IMBALANCED_ONLY and task != "fashion_imbalanced"):
                    continue
                row = _run(task, recipe, seed, work)
                rows.append(row)
                append_result(results, row)
                print(json.dumps({k: row[k] for k in ("task", "recipe", "seed", "teacher_test", "hypervolume", "seconds")}), flush=True)  # fmt: skip
                Path(args.out).write_text(report(rows, args.seeds))
    text = report(rows, args.seeds)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
