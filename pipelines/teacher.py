"""The dense teacher, trained once per search: `train_teacher` fine-tunes the pretrained model on
the target data with the teacher recipe (`TeacherConfig`), exports it, and stores what trials
read from it (its train logits per view, its weight trajectory)."""
from __future__ import annotations

import copy
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipelines._fit import EpochCallback, finish, fit, selection_indices, subset
from pipelines.config import DataConfig, ModelConfig, TeacherConfig, TrainConfig
from pipelines.data import Split, Splits, load_data, num_batches
from pipelines.device import pick_device
from pipelines.metrics import measure
from pipelines.models import build_model
from pipelines.train import WeightEMA, class_balance_weights, predict_logits, teacher_loss

__all__ = ["train_teacher", "as_teacher_config", "TEACHER_LOGITS_FILE", "TEACHER_VIEWS", "TRAJECTORY_FILE"]

TEACHER_LOGITS_FILE = "train_logits.safetensors"
# The tensors of TEACHER_LOGITS_FILE a trial reads per `trial.augment`, one per view of each train
# image: as it is (`logits`) and mirrored (`mirror_logits`, absent from teachers trained before).
TEACHER_VIEWS = {"none": ("logits",), "flip": ("logits", "mirror_logits")}
EMA_EPOCHS = 1.0  # teacher keep: ema averages over about this many epochs' steps (decay 1 - 1 / steps)
TRAJECTORY_FILE = "trajectory.safetensors"


def as_teacher_config(finetune: TrainConfig) -> TeacherConfig:
    """`finetune` as a TeacherConfig: a trial's config keeps its shared fields (`TrainConfig`) and
    gets the teacher recipe's defaults."""
    if isinstance(finetune, TeacherConfig):
        return finetune
    return TeacherConfig(**{f.name: getattr(finetune, f.name) for f in fields(TrainConfig)})


def _conv_linear_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().half().cpu().contiguous() for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def train_teacher(
    *,
    data: DataConfig,
    model: ModelConfig,
    finetune: TrainConfig,
    output_dir: str | Path,
    splits: Splits | None = None,
    device: str | torch.device | None = None,
    on_epoch_end: EpochCallback | None = None,
    metric: str = "accuracy",
) -> dict[str, float]:
    """Fine-tune the pretrained model on the target train split (the dense teacher) and export it.

    The recipe is `finetune`'s (`TeacherConfig`; a trial's FinetuneConfig gets the TeacherConfig
    defaults, `as_teacher_config`): `augment` (flip or crop_flip), `warmup_epochs`,
    `label_smoothing`, `class_balance` (class-weighted cross-entropy when the train classes are
    imbalanced) and `keep`: the last epoch's weights, the best epoch's on a selection split held
    out of train (`selection_indices`, the images iterative trials also decide on; the teacher
    then trains on the rest, and val stays untouched for the search), or an EMA of the weights.
    keep best ranks the epochs by `metric` (accuracy or balanced_accuracy: the search's). The
    returned (and exported) metrics add `class_balanced` (1 or 0), and `best_epoch` with
    `best_selection_<metric>` (keep best) or `ema_decay` (keep ema); each epoch's report adds
    `selection_<metric>` (keep best).

    Also stores the kept teacher's logits on the train split, as each image is and mirrored
    (`TEACHER_VIEWS`), so trials distil without running it, and its conv/linear weights after each
    epoch up to the kept one (float16; the EMA's with keep ema), for TASCNet's trajectory criterion.
    `splits`: the data already decoded (`load_data(data)`), e.g. sent by the driver. `device`:
    see `pipelines.device.pick_device` (default: CUDA when visible).
    """
    recipe = as_teacher_config(finetune)
    torch.manual_seed(recipe.seed)
    device = pick_device(device)
    splits = (splits or load_data(data)).to(device)
    net = build_model(model, num_classes=len(splits.classes)).to(device, memory_format=torch.channels_last)
    output_dir = Path(output_dir)
    fitted, selection = splits, None
    if recipe.keep == "best":  # decided on images held out of train: val is the search's objective
        trained, held_out = selection_indices(splits.train)
        fitted, selection = replace(splits, train=subset(splits.train, trained)), subset(splits.train, held_out)
    class_weights = class_balance_weights(fitted.train.labels, len(splits.classes), recipe.class_balance)
    ema = None
    if recipe.keep == "ema":
        steps = num_batches(len(fitted.train), batch_size=recipe.batch_size)
        ema = WeightEMA(net, decay=1.0 - 1.0 / max(1.0, EMA_EPOCHS * steps))
    kept = net if ema is None else ema.model
    trajectory: list[dict[str, torch.Tensor]] = []
    best: dict = {"epoch": 0, "score": -1.0, "state": None}

    def end_of_epoch(metrics: dict[str, float]) -> None:
        trajectory.append(_conv_linear_weights(kept))
        if selection is not None:
            score = _selection_score(net, selection, metric=metric, num_classes=len(splits.classes), amp=recipe.amp)
            metrics = {**metrics, f"selection_{metric}": score}
            if score >= best["score"]:  # ties: the later epoch, further down the cosine
                best.update(epoch=int(metrics["epoch"]), score=score, state=copy.deepcopy(net.state_dict()))
        if on_epoch_end is not None:
            on_epoch_end(metrics)

    fit(
        net,
        fitted,
        loss_fn=teacher_loss(class_weights=class_weights, label_smoothing=recipe.label_smoothing),
        lr=recipe.lr,
        epochs=recipe.epochs,
        finetune=recipe,
        weight_decay=recipe.weight_decay,
        augment=recipe.augment,
        warmup_epochs=recipe.warmup_epochs,
        after_step=None if ema is None else ema.update,
        on_epoch_end=end_of_epoch,
    )
    extra = {"class_balanced": float(class_weights is not None)}
    if selection is not None:
        net.load_state_dict(best["state"])
        trajectory = trajectory[: best["epoch"]]
        extra.update({"best_epoch": float(best["epoch"]), f"best_selection_{metric}": best["score"]})
    if ema is not None:
        net.load_state_dict(ema.model.state_dict())
        extra["ema_decay"] = ema.decay
    metrics = finish(net, splits, data=data, arch=model.arch, output_dir=output_dir, extra=extra, amp=recipe.amp)
    mirrored = Split(images=splits.train.images.flip(-1), labels=splits.train.labels)
    views = {"logits": predict_logits(net, splits.train), "mirror_logits": predict_logits(net, mirrored)}
    save_file({name: v.cpu().contiguous() for name, v in views.items()}, output_dir / TEACHER_LOGITS_FILE)
    save_file({name: torch.stack([epoch[name] for epoch in trajectory]) for name in trajectory[0]}, output_dir / TRAJECTORY_FILE)
    return metrics


def _selection_score(net: nn.Module, split: Split, *, metric: str, num_classes: int, amp: bool) -> float:
    """`metric` (accuracy or balanced_accuracy) of `net` on `split`."""
    return getattr(measure(net, split, num_classes=num_classes, amp=amp), metric)
