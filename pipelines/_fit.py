"""What the teacher's fine-tune and a trial's share: the epoch loop, the final evaluation and
export, and the selection split held out of train."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from pipelines.checkpoint import TrialState
from pipelines.config import DataConfig, TrainConfig
from pipelines.data import IMAGENET_MEAN, IMAGENET_STD, Split, Splits, num_batches
from pipelines.export import save_model
from pipelines.macs import count_macs
from pipelines.metrics import measure, write_class_report
from pipelines.train import evaluate, make_optimizer, train_one_epoch

__all__ = ["EpochCallback", "SELECTION_EVERY", "fit", "finish", "selection_indices", "subset"]

EpochCallback = Callable[[dict[str, float]], None]
SELECTION_EVERY = 10  # iterative / priority trials (and keep best) hold out 1 train image in 10 per class to decide on


def finish(
    model: nn.Module,
    splits: Splits,
    *,
    data: DataConfig,
    arch: str,
    output_dir: Path,
    extra: dict[str, float],
    amp: bool,
    macs_inputs: Iterable[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Evaluate (one pass per split: `val_accuracy`, `val_balanced_accuracy`, `test_accuracy`,
    `test_balanced_accuracy`), count MACs (expected over the `macs_inputs` batches for gated models),
    export; returns the final metrics (also stored in the channel spec). The per-class table and the
    confusion matrices (`pipelines.metrics.CLASS_REPORT_FILE`, `PER_CLASS_FILE`) go beside the model."""
    complexity = count_macs(model, image_size=data.image_size, inputs=macs_inputs)
    measured = {name: measure(model, getattr(splits, name), num_classes=len(splits.classes), amp=amp) for name in ("val", "test")}
    metrics = {
        **extra,
        **{key: value for name, m in measured.items() for key, value in m.values(name).items()},
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
    write_class_report(output_dir, splits.classes, measured)
    return metrics


def fit(
    model: nn.Module,
    splits: Splits,
    *,
    loss_fn: Callable,
    lr: float,
    epochs: int,
    finetune: TrainConfig,
    weight_decay: float,
    extra_params: list[nn.Parameter] = (),
    augment: str = "none",
    views: bool = False,
    warmup_epochs: int = 0,
    first_epoch: int = 1,
    done: int = 0,
    saved: TrialState | None = None,
    before_epoch: Callable[[int], None] | None = None,
    after_epoch: Callable[[int, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], None] | None = None,
    after_step: Callable[[], None] | None = None,
    on_epoch_end: EpochCallback | None,
) -> float:
    """Train `epochs` epochs (AdamW, cosine after `warmup_epochs` of linear warm-up); returns the
    final val accuracy. `augment`, `views`: as in `pipelines.data.batches`. `done`: epochs of this
    same fit already trained (skipped), whose optimizer, scheduler and RNG `saved` holds;
    `after_epoch(epoch, optimizer, scheduler)` runs after each epoch, before `on_epoch_end`;
    `after_step()` after every optimizer step."""
    steps_per_epoch = num_batches(len(splits.train), batch_size=finetune.batch_size)
    optimizer, scheduler = make_optimizer(
        model, lr=lr, weight_decay=weight_decay, total_steps=epochs * steps_per_epoch, extra=extra_params,
        warmup_steps=warmup_epochs * steps_per_epoch,
    )  # fmt: skip
    if saved is not None:
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        torch.set_rng_state(saved.rng)
    val = evaluate(model, splits.val, amp=finetune.amp) if done >= epochs else float("nan")
    for i in range(done, epochs):
        epoch = first_epoch + i
        if before_epoch is not None:
            before_epoch(i)
        parts = train_one_epoch(
            model,
            splits.train,
            loss_fn=loss_fn,
            optimizer=optimizer,
            scheduler=scheduler,
            batch_size=finetune.batch_size,
            seed=finetune.seed * 1000 + epoch,
            augment=augment,
            views=views,
            amp=finetune.amp,
            epoch=epoch,
            after_step=after_step,
        )
        measured = measure(model, splits.val, num_classes=len(splits.classes), amp=finetune.amp)
        val = measured.accuracy
        if after_epoch is not None:
            after_epoch(epoch, optimizer, scheduler)
        if on_epoch_end is not None:
            losses = {f"loss_{k}": v for k, v in parts.items()}
            on_epoch_end({"epoch": epoch, **losses, "val_accuracy": val, "val_balanced_accuracy": measured.balanced_accuracy})
    return val


def selection_indices(train: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) positions: every SELECTION_EVERY-th image of each class with at least two
    images is held out as the selection split of schedules that decide during training."""
    held = torch.zeros(len(train), dtype=torch.bool)
    labels = train.labels.cpu()
    for label in labels.unique():
        positions = (labels == label).nonzero().flatten()
        if len(positions) >= 2:
            held[positions[SELECTION_EVERY - 1 :: SELECTION_EVERY] if len(positions) >= SELECTION_EVERY else positions[-1:]] = True
    return (~held).nonzero().flatten().to(train.labels.device), held.nonzero().flatten().to(train.labels.device)


def subset(split: Split, index: torch.Tensor) -> Split:
    return Split(images=split.images[index], labels=split.labels[index])
