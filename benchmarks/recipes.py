"""The teacher's training recipe, today's against the new one and its variants, and trial augmentation.

Teachers: MobileNetV2 (ImageNet) fine-tuned for 8 epochs at 64 px on Animal-MNIST, Fashion-MNIST
and an imbalanced 3-class Fashion-MNIST subset (shirt / t-shirt / pullover at 200 / 60 / 20
images: similar garments, so the minority class is hard), with each recipe in RECIPES; test
accuracy and test balanced accuracy, mean +- sd over seeds (the teacher's seed; the split is
fixed), and the fine-tune's wall time as a ratio to today's recipe on the same task.

Trials: one uniform-L1 + KD trial at ~0.1x the teacher's MACs (the knob bisected as
benchmarks/methods.py does) from the TRIAL_TEACHER teacher, with each of TRIAL_RECIPES: no
augmentation, flip from the stored mirror logits, flip and crop_flip from the teacher run online;
and the cost of the mirror logits the teacher stores for flip, as a ratio to the teacher's
fine-tune, both timed in the same process.

    nice -n 10 .venv/bin/python benchmarks/recipes.py [--seeds 0 1] [--per-class 100] [--workers 2]
        [--work /tmp/recipes-work] [--out benchmarks/recipes.md]

Every finished run is appended to <work>/results.jsonl; a rerun skips what is there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pipelines.config import DataConfig, FinetuneConfig, ModelConfig, TeacherConfig
from pipelines.data import Split, load_data
from pipelines.train import predict_logits
from pipelines.teacher import train_teacher
from pipelines.trial import run_trial

from _tasks import prepare_fashion_mnist, prepare_task

IMAGE_SIZE = 64
EPOCHS = 8
MODEL = ModelConfig()
IMBALANCED = {"shirt": 200, "tshirt": 60, "pullover": 20}
TODAY = TeacherConfig(epochs=EPOCHS, augment="flip", warmup_epochs=0, label_smoothing=0.0, keep="last", class_balance="off")
NEW = TeacherConfig(epochs=EPOCHS, keep="ema")  # the grid's centre: flip, no warm-up, no smoothing, ema, class_balance auto
WARM = TeacherConfig(epochs=EPOCHS, augment="flip", warmup_epochs=1, label_smoothing=0.1, keep="ema", class_balance="auto")
# On the balanced tasks class_balance auto is off, so these are today's / ema's run there.
IMBALANCED_ONLY = {"**default**: flip, last epoch, class_balance auto", "flip, ema, class_balance off"}
TRIAL_TEACHER = "flip, ema, class_balance auto"  # the teacher (seed 0) the trial rows distil from
# Today's recipe, the default and the default with one choice changed; then the grid first measured,
# centred on warm-up 1 + smoothing 0.1 (and partly crop_flip): those rows are reported, not rerun.
RECIPES = {
    "today: flip, no warm-up, plain CE, last epoch": TODAY,
    "flip, ema, class_balance auto": NEW,
    "**default**: flip, last epoch, class_balance auto": replace(NEW, keep="last"),
    "flip, keep best (selection split), class_balance auto": replace(NEW, keep="best"),
    "flip, ema, class_balance off": replace(NEW, class_balance="off"),
    "ema + warm-up 1": replace(NEW, warmup_epochs=1),
    "ema + warm-up 1 + smoothing 0.1": WARM,
}
EARLIER = {
    "... + keep last": replace(WARM, keep="last"),
    "... + keep best (selection split)": replace(WARM, keep="best"),
    "... + class_balance off": replace(WARM, class_balance="off"),
    "... + crop_flip": replace(WARM, augment="crop_flip"),
    "... + crop_flip, keep last": replace(WARM, augment="crop_flip", keep="last"),
    "... + crop_flip, keep best": replace(WARM, augment="crop_flip", keep="best"),
    "... + crop_flip, no warm-up, no smoothing": replace(WARM, augment="crop_flip", warmup_epochs=0, label_smoothing=0.0),
}
TASKS = ("animal_mnist", "fashion_mnist", "fashion_imbalanced")
# A trial's augmentation and where its KD targets come from (`trial.augment`, `trial.teacher_logits`).
TRIAL_RECIPES = {
    "none": {},
    "flip": {"augment": "flip"},
    "flip, online teacher": {"augment": "flip", "teacher_logits": "online"},
    "crop_flip, online teacher": {"augment": "crop_flip", "teacher_logits": "online"},
}


def task_data(task: str, work: Path, per_class: int) -> DataConfig:
    if task == "fashion_imbalanced":
        return DataConfig(path=str(prepare_fashion_mnist(work / task, counts=IMBALANCED)), image_size=IMAGE_SIZE)
    return DataConfig(path=str(prepare_task(task, work)), image_size=IMAGE_SIZE, max_images_per_class=per_class)


def _teacher_job(job: tuple) -> dict:
    task, recipe_name, seed, data, work = job
    torch.set_num_threads(1)
    recipe = replace(RECIPES[recipe_name], seed=seed)
    out = work / f"teacher-{task}-{recipe_name.replace(' ', '_').replace('.', '').replace(',', '').replace('(', '').replace(')', '')}-{seed}"
    started = time.perf_counter()
    metrics = train_teacher(data=data, model=MODEL, finetune=recipe, output_dir=out)
    seconds = time.perf_counter() - started
    # The mirror logits' cost (train_teacher computes them, untimed there): the same pass again,
    # timed beside the fine-tune in this process, with the model loading it needs.
    from pipelines.export import load_model

    train = load_data(data).train
    started = time.perf_counter()
    predict_logits(load_model(out)[0], Split(images=train.images.flip(-1), labels=train.labels))
    mirror_seconds = time.perf_counter() - started
    return {"kind": "teacher", "task": task, "recipe": recipe_name, "seed": seed, "seconds": seconds, "mirror_seconds": mirror_seconds,
            "dir": str(out), **{k: v for k, v in metrics.items() if not k.startswith("kept.")}}  # fmt: skip


def _trial_job(job: tuple) -> dict:
    task, augment, seed, data, teacher_dir, knob, work = job
    torch.set_num_threads(1)
    from methods import concrete, method

    params = concrete(method("uniform L1 + KD (spine)", knob), Path(teacher_dir))
    started = time.perf_counter()
    metrics = run_trial(
        params, data=data, model=MODEL, finetune=FinetuneConfig(epochs=3, seed=seed, **TRIAL_RECIPES[augment]),
        teacher_dir=teacher_dir, output_dir=work / f"trial-{task}-{augment.replace(' ', '_').replace(',', '')}-{seed}",
    )  # fmt: skip
    return {"kind": "trial", "task": task, "augment": augment, "seed": seed, "seconds": time.perf_counter() - started,
            **{k: v for k, v in metrics.items() if not k.startswith("kept.")}}  # fmt: skip


def _recipe_text(recipe: TeacherConfig) -> str:
    return ", ".join(f"{k} {v}" for k, v in asdict(recipe).items() if k in ("augment", "warmup_epochs", "label_smoothing", "keep", "class_balance"))


def load_results(work: Path) -> tuple[Path, list[dict]]:
    """<work>/results.jsonl (the folder made if need be) and the rows already in it."""
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    return results, [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def append_result(results: Path, row: dict) -> None:
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def _run(jobs: list[tuple], fn, workers: int, results: Path, done: list[dict]) -> None:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for row in pool.map(fn, jobs):
            done.append(row)
            append_result(results, row)
            print(json.dumps({k: row[k] for k in row if k in ("kind", "task", "recipe", "augment", "seed", "test_accuracy", "test_balanced_accuracy", "seconds")}), flush=True)


def report(rows: list[dict], seeds: list[int], per_class: int) -> str:
    teachers = [r for r in rows if r["kind"] == "teacher" and r["seed"] in seeds]
    tasks = [t for t in TASKS if any(r["task"] == t for r in teachers)]
    lines = [
        f"# Teacher recipes: MobileNetV2 (ImageNet), {EPOCHS} epochs at {IMAGE_SIZE} px, seeds {', '.join(map(str, seeds))}",
        "",
        f"`benchmarks/recipes.py`, one torch thread per run. Animal-MNIST and Fashion-MNIST at {per_class} images per class "
        f"(~{int(per_class * 0.55)} train per class); the imbalanced subset is Fashion-MNIST "
        + " / ".join(f"{k} {v}" for k, v in IMBALANCED.items())
        + " images. Test accuracy / test balanced accuracy, mean +- sd over the teacher's seeds (the split is fixed)."
        " Fine-tune times are not compared: the runs shared the machine with other work, so the same recipe's time varied 2x.",
        f"Default recipe (pipelines.config.TeacherConfig): {_recipe_text(replace(TeacherConfig(), seed=0))}. \"...\": ema + warm-up 1 + smoothing 0.1,"
        " the grid measured first, over seeds 0 and 1 only (one seed where no sd is given), with a class-weighted loss that ignored"
        " smoothing's interaction, fixed since (its imbalanced rows were rerun)."
        " \"-\": not run (on the balanced tasks class_balance auto is off, so the default is today's recipe there, and"
        " class_balance off is the ema row).",
        "",
        "| recipe | " + " | ".join(f"{t} acc | {t} bal. acc" for t in tasks) + " |",
        "| --- |" + " --- | --- |" * len(tasks),
    ]
    for name in [*RECIPES, *EARLIER]:
        cells = []
        for task in tasks:
            mine = [r for r in teachers if r["task"] == task and r["recipe"] == name]
            cells += [mean_sd([r["test_accuracy"] for r in mine]), mean_sd([r["test_balanced_accuracy"] for r in mine])]
        if any(c != "-" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    best = [r for r in teachers if "best_epoch" in r]
    if best:
        kept = {}
        for r in best:
            kept.setdefault(r["recipe"], []).append(f"{r['task']} seed {r['seed']}: {int(r['best_epoch'])}")
        lines += ["", "keep best, the epoch kept (of 8): " + "; ".join(f"{name}: {', '.join(v)}" for name, v in kept.items()) + "."]
    mirror = [r for r in teachers if r.get("mirror_seconds") and r["recipe"] != next(iter(RECIPES))]
    if mirror:
        ratios = [r["mirror_seconds"] / r["seconds"] for r in mirror]
        lines += ["", f"Mirror logits (one inference pass over the mirrored train images, timed in the same process right after the"
                  f" fine-tune): {min(ratios):.3f}x to {max(ratios):.3f}x the teacher's fine-tune time (median {statistics.median(ratios):.3f}x, {len(ratios)} new-recipe teachers)."]  # fmt: skip
    trials = [r for r in rows if r["kind"] == "trial" and r["seed"] in seeds]
    if trials:
        lines += [
            "",
            "## Trial augmentation (`trial.augment`, `trial.teacher_logits`): uniform L1 + KD (alpha 0.5, T 4), 3 epochs,"
            f" from the {TRIAL_TEACHER!r} teacher (seed 0)",
            "",
            "Time: the trials' summed wall time as a ratio to `none`'s on the same task, all run in one process pool, two at a time.",
            "",
            "| task | trial recipe | MACs ratio | test acc | test bal. acc | time / none |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for task in TASKS:
            none = [r for r in trials if r["task"] == task and r["augment"] == "none"]
            for name in TRIAL_RECIPES:
                mine = [r for r in trials if r["task"] == task and r["augment"] == name]
                if not mine:
                    continue
                ratio = f"{sum(r['seconds'] for r in mine) / sum(r['seconds'] for r in none):.2f}x" if none else "-"
                lines.append(
                    f"| {task} | {name} | {mean_sd([r['macs_ratio'] for r in mine])} | {mean_sd([r['test_accuracy'] for r in mine])}"
                    f" | {mean_sd([r['test_balanced_accuracy'] for r in mine])} | {ratio} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--trial-tasks", nargs="*", default=["fashion_mnist", "animal_mnist"])
    parser.add_argument("--trial-budget", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/recipes-work")
    parser.add_argument("--out", default="benchmarks/recipes.md")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    results, rows = load_results(work)
    have = {(r["task"], r.get("recipe", r.get("augment")), r["seed"], r["kind"]) for r in rows}
    data = {task: task_data(task, work, args.per_class) for task in {*args.tasks, *args.trial_tasks}}
    jobs = [(task, name, seed, data[task], work) for seed in args.seeds for task in args.tasks for name in args.recipes
            if (task, name, seed, "teacher") not in have and not (name in IMBALANCED_ONLY and task != "fashion_imbalanced")]  # fmt: skip
    # The one-thread runs first, two at a time; the largest tasks first so that the pool drains evenly.
    jobs.sort(key=lambda j: j[0] == "fashion_imbalanced")
    _run(jobs, _teacher_job, args.workers, results, rows)
    trial_jobs = []
    for task in [t for t in args.trial_tasks if any((t, a, seed, "trial") not in have for a in TRIAL_RECIPES for seed in args.seeds)]:
        teacher = next((r for r in rows if r["kind"] == "teacher" and r["task"] == task and r["recipe"] == TRIAL_TEACHER and r["seed"] == 0), None)
        if teacher is None:
            print(f"{task}: no {TRIAL_TEACHER!r} teacher at seed 0; skipping its trials", flush=True)
            continue
        from methods import knob_for_budget  # bisects the uniform keep ratio to the budget (MACs before training)

        knob = knob_for_budget("uniform L1 + KD (spine)", args.trial_budget, data[task], Path(teacher["dir"]))
        trial_jobs += [(task, augment, seed, data[task], teacher["dir"], knob[0], work) for seed in args.seeds for augment in TRIAL_RECIPES
                       if (task, augment, seed, "trial") not in have]  # fmt: skip
    _run(trial_jobs, _trial_job, args.workers, results, rows)
    text = report(rows, args.seeds, args.per_class)
    print(text)
    Path(args.out).write_text(text)
    (work / "recipes.md").write_text(text)


if __name__ == "__main__":
    main()
