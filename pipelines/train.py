"""Training verbs: `train_one_epoch`, `evaluate`, `recalibrate_bn`, `predict_logits`."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.data import Split, batches
from pipelines.device import autocast, device_of

__all__ = [
    "train_one_epoch", "evaluate", "recalibrate_bn", "predict_logits", "make_optimizer", "WarmupCosine", "class_balance_weights",
    "teacher_loss", "WeightEMA", "CLASS_BALANCE_RATIO",
]

CLASS_BALANCE_RATIO = 2.0  # class_balance auto: on when the largest class has more than this many times the smallest's images

# (logits, labels, split indices of the batch) -> named loss parts including "total"
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, _index: torch.Tensor) -> dict[str, torch.Tensor]:
    ce = F.cross_entropy(logits, labels)
    return {"ce": ce, "total": ce}


class WarmupCosine:
    """The lr factor at step s: linear from 1/w to 1 over the first w steps, then the cosine
    annealing to 0 over the rest (CosineAnnealingLR's curve, shifted by the warm-up)."""

    def __init__(self, *, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, max(1, total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay = max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - self.warmup_steps, decay) / decay))


def make_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, total_steps: int, extra: Iterable[nn.Parameter] = (), warmup_steps: int = 0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the model's and `extra` parameters (e.g. a loss's attention networks) with a
    cosine schedule over `total_steps`: robust to the lr on small targets, unlike SGD.
    `warmup_steps` > 0: a linear warm-up first (`WarmupCosine`), at most half of the steps (a
    one-epoch smoke run still anneals); 0 is torch's CosineAnnealingLR, as trials checkpoint it."""
    optimizer = torch.optim.AdamW([*model.parameters(), *extra], lr=lr, weight_decay=weight_decay)
    warmup_steps = min(warmup_steps, total_steps // 2)
    if warmup_steps <= 0:
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps=warmup_steps, total_steps=total_steps))


def class_balance_weights(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Cross-entropy class weights `N / (C * count_c)` from the train labels (1 for every class of
    a balanced split), or None: mode off, or auto with the largest class at most
    CLASS_BALANCE_RATIO times the smallest; mode on: always. A class without images counts as one."""
    if mode not in ("auto", "off", "on"):
        raise ValueError(f"class_balance must be auto, off or on, got {mode!r}")
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double().clamp(min=1)
    if mode == "off" or (mode == "auto" and counts.max() <= CLASS_BALANCE_RATIO * counts.min()):
        return None
    return (counts.sum() / (num_classes * counts)).float().to(labels.device)


def teacher_loss(*, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> LossFn:
    """The teacher's cross-entropy, optionally label-smoothed and class-weighted (the part is `ce`).

    A sample of class y weighs `class_weights[y]` (mean over the batch's weights, as torch's
    weighted cross-entropy). Not torch's `weight=` with `label_smoothing`: that weighs the
    smoothing term's every class by its own weight, so each image is pulled towards the rare
    classes (measured: test accuracy 0.51 against 0.78 unweighted on a 200/60/20 folder)."""

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, _index: torch.Tensor) -> dict[str, torch.Tensor]:
        if class_weights is None:
            ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        else:
            weight = class_weights.to(logits.device)[labels]
            per_sample = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
            ce = (weight * per_sample).sum() / weight.sum()
        return {"ce": ce, "total": ce}

    return loss_fn


class WeightEMA:
    """An exponential moving average of a model's parameters and float buffers (BatchNorm's running
    statistics too; integer buffers are copied): `average = decay * average + (1 - decay) * model`
    after every `update`. `model` is a copy, with the averaged weights."""

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        mine, theirs = self.model.state_dict(), model.state_dict()  # the tensors themselves: training updates them in place
        self._floats = [(mine[k], v) for k, v in theirs.items() if v.is_floating_point()]
        self._others = [(mine[k], v) for k, v in theirs.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if self._floats:
            averages, currents = zip(*self._floats)
            torch._foreach_lerp_(list(averages), list(currents), 1.0 - self.decay)
        for average, current in self._others:
            average.copy_(current)


def train_one_epoch(
    model: nn.Module,
    split: Split,
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    seed: int,
    augment: str = "none",
    views: bool = False,
    amp: bool = False,
    epoch: int = 1,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over `split` (on the model's device); returns the mean of every loss part.

    `augment`, `views`: see `pipelines.data.batches` (with views, the loss's index is the row of
    each image's view). `after_step`: called after every optimizer step (e.g. `WeightEMA.update`).

    `amp`: bf16 autocast on CUDA. Loss parts stay on the device and are read once per epoch; the
    loss is checked for NaN/inf before every step on the CPU, every 32 steps on a GPU (a check is a
    host synchronisation), and a FloatingPointError naming the epoch and the step is raised (a
    trial records it as its error). `epoch`: this epoch's number, for that message.
    """
    model.train()
    device = device_of(model)
    check_every = 1 if device.type == "cpu" else 32
    advice = "the fine-tune diverged; lower the learning rate (search.lr for the trials, teacher.lr for the teacher)"
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    for images, labels, index in batches(split, batch_size=batch_size, shuffle=True, seed=seed, augment=augment, views=views):
        with autocast(device, enabled=amp):
            parts = loss_fn(model(images), labels, index)
        total = parts["total"]
        if steps % check_every == 0 and not torch.isfinite(total).item():
            raise FloatingPointError(f"loss is {total.item()} at step {steps + 1} of epoch {epoch}: {advice}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        steps += 1
    means = {name: float(value) / max(1, steps) for name, value in sums.items()}
    if "total" in means and not math.isfinite(means["total"]):
        raise FloatingPointError(f"loss was {means['total']} in epoch {epoch}: {advice}")
    return means


@torch.no_grad()
def predict_logits(model: nn.Module, split: Split, *, batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """Float32 logits of every image of `split`, on the model's device."""
    model.eval()
    device = device_of(model)
    with autocast(device, enabled=amp):
        return torch.cat([model(images).float() for images, _, _ in batches(split, batch_size=batch_size)])


def evaluate(model: nn.Module, split: Split, *, batch_size: int = 256, amp: bool = False) -> float:
    """Top-1 accuracy on `split` (correct / total in float64, as `pipelines.metrics` computes it)."""
    predictions = predict_logits(model, split, batch_size=batch_size, amp=amp).argmax(dim=1)
    return int((predictions == split.labels).sum()) / len(split.labels)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, *, num_batches: int, batch_size: int, seed: int) -> None:
    """Re-estimate BatchNorm running statistics on training batches (no gradients; EagleEye).

    A freshly pruned network's BN statistics describe channels that no longer exist together;
    scoring it without this step gives near-chance accuracy.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or num_batches <= 0:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the recalibration batches
    model.train()
    for step, (images, _, _) in enumerate(batches(split, batch_size=batch_size, shuffle=True, seed=seed)):
        if step >= num_batches:
            break
        model(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()
