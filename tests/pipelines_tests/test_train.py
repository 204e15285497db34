from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.data import Split, batches, normalize
from pipelines.train import cross_entropy_loss, evaluate, make_optimizer, recalibrate_bn, train_one_epoch

NUM_CLASSES = 3


def make_split(n: int = 10, size: int = 8, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8) * 20  # a distinct key per image
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return Split(images=images, labels=labels)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
        nn.BatchNorm2d(2),
        nn.Conv2d(2, 2, 1),
        nn.BatchNorm2d(2, momentum=None),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, NUM_CLASSES),
    )


def test_recalibrate_bn_reestimates_statistics_and_restores_momentum() -> None:
    split = make_split()
    model = bn_model()
    norms = [m for m in model if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.running_mean.fill_(100.0)
        norm.running_var.fill_(100.0)
    recalibrate_bn(model, split, num_batches=2, batch_size=4, seed=7)

    # momentum=None during recalibration: running_mean is the plain average of the batch means.
    batch_means = []
    for step, (images, _, _) in enumerate(batches(split, batch_size=4, shuffle=True, seed=7)):
        if step >= 2:
            break
        with torch.no_grad():
            batch_means.append(model[0](images).mean(dim=(0, 2, 3)))
    expected = torch.stack(batch_means).mean(dim=0)
    assert torch.allclose(norms[0].running_mean, expected, atol=1e-5)
    for norm in norms:
        assert norm.num_batches_tracked.item() == 2
        assert not torch.any(norm.running_mean == 100.0)
        assert norm.running_mean.abs().sum().item() > 0  # moved away from the reset value 0
    assert [n.momentum for n in norms] == [0.3, 0.1, None]
    assert not model.training


def test_recalibrate_bn_with_zero_batches_is_a_no_op() -> None:
    model = bn_model()
    model[1].running_mean.fill_(5.0)
    recalibrate_bn(model, make_split(), num_batches=0, batch_size=4, seed=0)
    assert torch.all(model[1].running_mean == 5.0)
    assert model[1].momentum == 0.3


class OneHotLookup(nn.Module):
    """Recognises each image by its normalised top-left pixel and outputs the one-hot of a stored label."""

    def __init__(self, split: Split, answers: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keys", normalize(split.images)[:, 0, 0, 0].clone())
        self.register_buffer("answers", answers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = (x[:, 0, 0, 0, None] - self.keys[None]).abs().argmin(dim=1)
        return F.one_hot(self.answers[index], NUM_CLASSES).float()


def test_evaluate_perfect_model_scores_one() -> None:
    split = make_split()
    assert evaluate(OneHotLookup(split, split.labels), split, batch_size=3) == 1.0


def test_evaluate_counts_mistakes() -> None:
    split = make_split()
    answers = split.labels.clone()
    answers[[1, 4, 8]] = (answers[[1, 4, 8]] + 1) % NUM_CLASSES
    assert evaluate(OneHotLookup(split, answers), split, batch_size=4) == pytest.approx(0.7)
    assert evaluate(OneHotLookup(split, (split.labels + 1) % NUM_CLASSES), split) == 0.0


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, NUM_CLASSES))


def test_train_one_epoch_raises_on_nan_and_does_not_step() -> None:
    model = tiny_classifier()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = make_optimizer(model, lr=0.1, weight_decay=0.0, total_steps=5)

    def nan_loss(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": logits.sum() * float("nan")}

    with pytest.raises(FloatingPointError, match="at step 1 of epoch 3: the fine-tune diverged; lower the learning rate"):
        train_one_epoch(
            model, make_split(), loss_fn=nan_loss, optimizer=optimizer, scheduler=scheduler, batch_size=4, seed=0, epoch=3
        )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_one_epoch_returns_mean_parts_and_updates_weights() -> None:
    model = tiny_classifier()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = make_optimizer(model, lr=0.01, weight_decay=0.0, total_steps=3)
    seen: list[float] = []

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = cross_entropy_loss(logits, labels, index)
        seen.append(parts["total"].item())
        return parts

    parts = train_one_epoch(
        model, make_split(), loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, batch_size=4, seed=0
    )
    assert set(parts) == {"ce", "total"}
    assert len(seen) == 3  # 10 images in batches of 4
    assert parts["total"] == pytest.approx(sum(seen) / 3)
    assert math.isfinite(parts["ce"])
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
