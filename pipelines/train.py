"""Training verbs: `train_one_epoch`, `evaluate`, `recalibrate_bn`, `predict_logits`."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.data import Split, batches
from pipelines.device import autocast, device_of

__all__ = ["train_one_epoch", "evaluate", "recalibrate_bn", "predict_logits", "make_optimizer"]

# (logits, labels, split indices of the batch) -> named loss parts including "total"
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, _index: torch.Tensor) -> dict[str, torch.Tensor]:
    ce = F.cross_entropy(logits, labels)
    return {"ce": ce, "total": ce}


def make_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, total_steps: int, extra: Iterable[nn.Parameter] = ()
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the model's and `extra` parameters (e.g. a loss's attention networks) with a
    cosine schedule over `total_steps`: robust to the lr on small targets, unlike SGD."""
    optimizer = torch.optim.AdamW([*model.parameters(), *extra], lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))


def train_one_epoch(
    model: nn.Module,
    split: Split,
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    seed: int,
    flip: bool = False,
    amp: bool = False,
    epoch: int = 1,
) -> dict[str, float]:
    """One pass over `split` (on the model's device); returns the mean of every loss part.

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
    for images, labels, index in batches(split, batch_size=batch_size, shuffle=True, seed=seed, flip=flip):
        with autocast(device, enabled=amp):
            parts = loss_fn(model(images), labels, index)
        total = parts["total"]
        if steps % check_every == 0 and not torch.isfinite(total).item():
            raise FloatingPointError(f"loss is {total.item()} at step {steps + 1} of epoch {epoch}: {advice}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
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
