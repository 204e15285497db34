"""`make gpu-check`: the training paths on a GPU, and teacher fine-tune throughput GPU vs CPU.

On a machine without a visible CUDA device it says so and exits 0. With one it: fine-tunes the
teacher for one epoch on the CPU and on the GPU (bf16 autocast on and off) and prints images/s
for each, side by side in this one run; runs one trial on the GPU for each loss family (KD with a
MACs target, warm-started from that trial; AFD; dynamic gating) so that every device path runs;
times flip trials from the stored teacher logits against the teacher run online (flip, crop_flip);
and runs a 4-trial search with `gpus_per_trial: 0.5` through Ray, checking that every trial
finished. Exit code 1 if any step fails.

    .venv/bin/python benchmarks/gpu_check.py [--work DIR] [--device cpu]

`--device cpu` runs the same paths on the CPU (to check this script itself; the throughput
comparison is then CPU against CPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def _throughput(data, model, finetune, splits, device: str, work: Path) -> float:
    from pipelines.teacher import train_teacher

    start = time.perf_counter()
    train_teacher(data=data, model=model, finetune=finetune, output_dir=work / f"teacher-{device}-{finetune.amp}", splits=splits, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(splits.train) * finetune.epochs / (time.perf_counter() - start)


def _teacher_logits_cost(params, data, model, finetune, splits, device: str, teacher: Path, work: Path) -> int:
    """One-epoch trials with flip from the stored logits, flip and crop_flip from the teacher run
    online: their wall times as ratios to the stored one, side by side. Returns the failures."""
    from pipelines.trial import run_trial

    flip = replace(finetune, augment="flip")
    recipes = {
        "flip, stored logits": flip,
        "flip, online teacher": replace(flip, teacher_logits="online"),
        "crop_flip, online teacher": replace(flip, augment="crop_flip", teacher_logits="online"),
    }
    seconds = {}
    for name, recipe in recipes.items():
        try:
            start = time.perf_counter()
            m = run_trial(params, data=data, model=model, finetune=recipe, teacher_dir=teacher, output_dir=work / name, splits=splits, device=device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
            print(f"trial on {device}, {name}: val acc {m['val_accuracy']:.3f}, {seconds[name] / seconds['flip, stored logits']:.2f}x the stored-logits trial's time", flush=True)
        except Exception as error:  # report every path, then fail
            print(f"trial on {device}, {name}: FAILED {type(error).__name__}: {error}", flush=True)
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--device", default="cuda", help="where the trials run (default: cuda)")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible on this machine; nothing to check (run it where a GPU is)")
        return 0
    from pipelines.config import DataConfig, FinetuneConfig, ModelConfig, TrialParams
    from pipelines.data import load_data, prepare_animal_mnist
    from pipelines.trial import run_trial
    from search.run import run_search
    from search.space import parse_space

    work = Path(args.work or tempfile.mkdtemp(prefix="slimtune-gpu-check-"))
    print(f"gpu-check on {torch.cuda.get_device_name(0) if device.startswith('cuda') else device}, work folder {work}", flush=True)
    data = DataConfig(path=str(prepare_animal_mnist(work / "animal_mnist")), image_size=64, max_images_per_class=350)
    model = ModelConfig()
    splits = load_data(data)
    one_epoch = FinetuneConfig(epochs=1)
    torch.set_num_threads(2)
    rates = {
        "cpu (fp32, 2 threads)": _throughput(data, model, replace(one_epoch, amp=False), splits, "cpu", work),
        f"{device} (fp32)": _throughput(data, model, replace(one_epoch, amp=False), splits, device, work),
        f"{device} (bf16 autocast)": _throughput(data, model, one_epoch, splits, device, work),
    }
    for name, rate in rates.items():
        print(f"teacher fine-tune throughput, {name}: {rate:.0f} images/s ({rate / rates['cpu (fp32, 2 threads)']:.1f}x the CPU)", flush=True)
    teacher = work / f"teacher-{device}-True"
    target = {"target_macs": 0.1, "depth_tilt": 0.0, "residual_tilt": 0.0}
    trials = {
        "kd, target 0.1x": TrialParams(budget=target, parametrisation="target", criterion="activation"),
        "afd": TrialParams(budget={"__all__": 0.5}, parametrisation="stage", losses={"afd": {"weight": 0.01}}),
        "gating d=0.5": TrialParams(budget={"__all__": 0.5}, parametrisation="stage", losses={}, densities={"*": 0.5}),
    }
    failures = 0
    for name, params in trials.items():
        if "__all__" in params.budget:  # one ratio for every stage, one density for every stage
            from pipelines.export import load_model
            from pipelines.prune import prunable_groups

            stages = {g.stage for g in prunable_groups(load_model(teacher)[0], image_size=64)}
            params = replace(params, budget={s: 0.5 for s in stages}, densities={s: 0.5 for s in stages if s != "classifier"} if params.densities else {})
        try:
            m = run_trial(params, data=data, model=model, finetune=one_epoch, teacher_dir=teacher, output_dir=work / name, splits=splits, device=device)
            print(f"trial on {device}, {name}: val acc {m['val_accuracy']:.3f}, {m['macs_ratio']:.3f}x MACs", flush=True)
        except Exception as error:  # report every path, then fail
            failures += 1
            print(f"trial on {device}, {name}: FAILED {type(error).__name__}: {error}", flush=True)
    failures += _teacher_logits_cost(trials["kd, target 0.1x"], data, model, one_epoch, splits, device, teacher, work)
    m = run_trial(trials["kd, target 0.1x"], data=data, model=model, finetune=one_epoch, teacher_dir=teacher,
                  output_dir=work / "warm", start_from=work / "kd, target 0.1x", splits=splits, device=device)  # fmt: skip
    print(f"trial on {device}, warm-started from the 0.1x trial: val acc {m['val_accuracy']:.3f}", flush=True)
    space = {
        "name": "gpu-check",
        "data": {"path": data.path, "image_size": 64, "max_images_per_class": 100},
        "teacher": {"epochs": 2},
        "trial": {"epochs": 2},
        "search": {"num_trials": 4, "max_concurrent": 2, "gpus_per_trial": 0.5 if device.startswith("cuda") else 0, "importance": "activation"},
    }
    front = run_search(parse_space(space), output=work / "runs", log=lambda line: print(f"  {line}", flush=True)).front
    finished = len(front.finished)
    print(f"search with gpus_per_trial {space['search']['gpus_per_trial']}: {finished}/{len(front.trials)} trials finished")
    return 1 if failures or finished != len(front.trials) else 0


if __name__ == "__main__":
    sys.exit(main())
