"""The two pipeline entry points: `train_teacher` (once per search) and `run_trial` (once per trial).

run_trial: teacher weights -> structural prune to the keep ratios -> BN recalibration -> proxy
accuracy -> fine-tune with KD -> val/test accuracy -> MACs -> export. Pure PyTorch: callable
from a notebook; progress goes to an optional per-epoch callback.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.config import DataConfig, FinetuneConfig, ModelConfig, TrialParams
from pipelines.data import IMAGENET_MEAN, IMAGENET_STD, Splits, load_data
from pipelines.distill import KDLoss
from pipelines.export import load_model, save_model
from pipelines.macs import count_macs
from pipelines.models import build_model
from pipelines.prune import prune_to_ratios
from pipelines.train import cross_entropy_loss, evaluate, make_optimizer, predict_logits, recalibrate_bn, train_one_epoch

__all__ = ["train_teacher", "run_trial", "EpochCallback", "TEACHER_LOGITS_FILE"]

EpochCallback = Callable[[dict[str, float]], None]
TEACHER_LOGITS_FILE = "train_logits.safetensors"


def _finish(
    model: nn.Module, splits: Splits, *, data: DataConfig, arch: str, output_dir: Path, extra: dict[str, float]
) -> dict[str, float]:
    """Evaluate, count MACs, export; returns the final metrics (also stored in the channel spec)."""
    complexity = count_macs(model, image_size=data.image_size)
    metrics = {
        **extra,
        "val_accuracy": evaluate(model, splits.val),
        "test_accuracy": evaluate(model, splits.test),
        "macs": float(complexity.macs),
        "params": float(complexity.params),
    }
    metadata = {
        "classes": list(splits.classes),
        "image_size": data.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "metrics": metrics,
    }
    save_model(model, output_dir, arch=arch, metadata=metadata)
    return metrics


def _fit(
    model: nn.Module,
    splits: Splits,
    *,
    loss_fn: Callable,
    lr: float,
    finetune: FinetuneConfig,
    flip: bool,
    on_epoch_end: EpochCallback | None,
) -> None:
    steps_per_epoch = -(-len(splits.train) // finetune.batch_size)
    optimizer, scheduler = make_optimizer(
        model, lr=lr, weight_decay=finetune.weight_decay, total_steps=finetune.epochs * steps_per_epoch
    )
    for epoch in range(1, finetune.epochs + 1):
        parts = train_one_epoch(
            model,
            splits.train,
            loss_fn=loss_fn,
            optimizer=optimizer,
            scheduler=scheduler,
            batch_size=finetune.batch_size,
            seed=finetune.seed * 1000 + epoch,
            flip=flip,
        )
        if on_epoch_end is not None:
            val = evaluate(model, splits.val)
            on_epoch_end({"epoch": epoch, **{f"loss_{k}": v for k, v in parts.items()}, "val_accuracy": val})


def train_teacher(
    *,
    data: DataConfig,
    model: ModelConfig,
    finetune: FinetuneConfig,
    output_dir: str | Path,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, float]:
    """Fine-tune the pretrained model on the target train split (the dense teacher) and export it.

    Also stores the teacher's logits on the train split, so trials distil without running it.
    """
    torch.manual_seed(finetune.seed)
    splits = load_data(data)
    net = build_model(model, num_classes=len(splits.classes)).to(memory_format=torch.channels_last)
    _fit(
        net,
        splits,
        loss_fn=cross_entropy_loss,
        lr=finetune.lr,
        finetune=finetune,
        flip=True,
        on_epoch_end=on_epoch_end,
    )
    output_dir = Path(output_dir)
    metrics = _finish(net, splits, data=data, arch=model.arch, output_dir=output_dir, extra={})
    save_file({"logits": predict_logits(net, splits.train).contiguous()}, output_dir / TEACHER_LOGITS_FILE)
    return metrics


def run_trial(
    params: TrialParams,
    *,
    data: DataConfig,
    finetune: FinetuneConfig,
    teacher_dir: str | Path,
    output_dir: str | Path,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, float]:
    """Prune the teacher to `params.keep_ratios`, fine-tune it with KD, evaluate and export it.

    Fine-tuning uses no augmentation so that the teacher's stored train logits match each image.
    Each epoch reports the loss parts, `val_accuracy` and the (fixed) `macs` to `on_epoch_end`.
    Returns `proxy_accuracy` (after pruning + BN recalibration, before fine-tuning),
    `val_accuracy`, `test_accuracy`, `macs`, `params` and `macs_ratio` (vs the teacher).
    """
    torch.manual_seed(finetune.seed)
    teacher_dir = Path(teacher_dir)
    splits = load_data(data)
    student, spec = load_model(teacher_dir)
    teacher_logits = load_file(teacher_dir / TEACHER_LOGITS_FILE)["logits"]
    if len(teacher_logits) != len(splits.train):
        raise ValueError(f"{teacher_dir} holds logits for {len(teacher_logits)} train images, the data has {len(splits.train)}")

    prune_to_ratios(student, params.keep_ratios, image_size=data.image_size, importance=params.importance)
    student = student.to(memory_format=torch.channels_last)
    recalibrate_bn(
        student,
        splits.train,
        num_batches=finetune.bn_recalibration_batches,
        batch_size=finetune.batch_size,
        seed=finetune.seed,
    )
    proxy_accuracy = evaluate(student, splits.val)
    macs = float(count_macs(student, image_size=data.image_size).macs)

    def report_epoch(metrics: dict[str, float]) -> None:
        if on_epoch_end is not None:
            on_epoch_end({**metrics, "macs": macs})

    distill = KDLoss(alpha=params.kd_alpha, temperature=params.kd_temperature)
    _fit(
        student,
        splits,
        loss_fn=lambda logits, labels, index: distill(logits, teacher_logits[index], labels),
        lr=params.lr,
        finetune=finetune,
        flip=False,
        on_epoch_end=report_epoch,
    )
    teacher_macs = spec["metrics"]["macs"]
    metrics = _finish(
        student, splits, data=data, arch=spec["arch"], output_dir=Path(output_dir), extra={"proxy_accuracy": proxy_accuracy}
    )
    metrics["macs_ratio"] = metrics["macs"] / teacher_macs
    return metrics
