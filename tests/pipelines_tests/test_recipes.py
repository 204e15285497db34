"""The training recipes: warm-up, class balance, augmentation, the teacher's kept weights, KD per view."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipelines.config import DataConfig, ModelConfig, TeacherConfig
from pipelines.data import Split, batches, normalize, prepare_animal_mnist
from pipelines.distill import KDLoss
from pipelines.objective import make_objective
from pipelines.train import CLASS_BALANCE_RATIO, WarmupCosine, WeightEMA, class_balance_weights, make_optimizer, teacher_loss


def _images(n: int = 10, size: int = 16, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return Split(images=images, labels=torch.arange(n) % 3)


# ---------------------------------------------------------------- the learning-rate schedule


def _lrs(warmup_steps: int, total_steps: int, lr: float = 0.1) -> list[float]:
    model = nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, lr=lr, weight_decay=0.0, total_steps=total_steps, warmup_steps=warmup_steps)
    seen = []
    for _ in range(total_steps):
        seen.append(optimizer.param_groups[0]["lr"])  # the lr the next step uses
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize(("warmup", "total"), [(4, 12), (1, 5), (3, 30)])
def test_warm_up_rises_linearly_then_follows_the_cosine(warmup: int, total: int) -> None:
    lrs = _lrs(warmup, total)
    assert lrs[:warmup] == pytest.approx([0.1 * (s + 1) / warmup for s in range(warmup)])
    decay = total - warmup
    assert lrs[warmup:] == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * s / decay)) for s in range(decay)])
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) in (warmup - 1, warmup)


def test_without_warm_up_the_schedule_is_torchs_cosine_as_trials_checkpoint_it() -> None:
    _, scheduler = make_optimizer(nn.Linear(2, 2), lr=0.1, weight_decay=0.0, total_steps=10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert _lrs(0, 10) == pytest.approx(cosine)


def test_warm_up_takes_at_most_half_the_steps() -> None:
    assert _lrs(10, 4) == pytest.approx(_lrs(2, 4))  # a one-epoch smoke run still anneals
    assert WarmupCosine(warmup_steps=2, total_steps=4)(4) == pytest.approx(0.0)


# ---------------------------------------------------------------- class balance


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])


def test_class_balanced_weights_are_inverse_frequency_on_an_imbalanced_split() -> None:
    weights = class_balance_weights(_labels([60, 30, 10]), 3, "auto")
    assert weights.tolist() == pytest.approx([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)])
    # Each class then weighs the same in the loss: count x weight is N / C for every class.
    assert (weights * torch.tensor([60.0, 30.0, 10.0])).tolist() == pytest.approx([100 / 3] * 3)


@pytest.mark.parametrize(
    ("counts", "mode", "on"),
    [
        ([4, 2, 2], "auto", False),  # exactly twice the smallest: not "more than twice"
        ([5, 2, 2], "auto", True),
        ([20, 20, 9], "auto", True),
        ([20, 19, 10], "auto", False),
        ([60, 30, 10], "off", False),
        ([1, 1, 0], "auto", False),  # an empty class counts as one image
        ([20, 20, 20], "on", True),  # TASCNet's class_weighted trials: always
    ],
)
def test_class_balance_auto_is_on_above_twice_the_smallest_class(counts: list[int], mode: str, on: bool) -> None:
    assert CLASS_BALANCE_RATIO == 2.0
    assert (class_balance_weights(_labels(counts), 3, mode) is not None) == on


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_class_weighted_loss_weighs_each_sample_by_its_own_class(smoothing: float) -> None:
    """Per sample: weight[y] x (smoothed) CE, over the batch's summed weights; without smoothing,
    torch's weighted cross-entropy. Smoothing must not pull every sample towards the rare classes."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -1.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 0])
    weights = torch.tensor([0.5, 1.0, 4.0])
    per_sample = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
    expected = (weights[labels] * per_sample).sum() / weights[labels].sum()
    loss = teacher_loss(class_weights=weights, label_smoothing=smoothing)(logits, labels, torch.arange(4))
    assert loss["total"].item() == pytest.approx(expected.item())
    if smoothing == 0:
        assert loss["total"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels, weight=weights).item())
    # A confident, correct majority-class sample: its loss is the same whatever the rare class's weight.
    confident = torch.tensor([[9.0, 0.0, 0.0]])
    heavy = teacher_loss(class_weights=torch.tensor([1.0, 1.0, 100.0]), label_smoothing=smoothing)
    light = teacher_loss(class_weights=torch.tensor([1.0, 1.0, 1.0]), label_smoothing=smoothing)
    assert heavy(confident, torch.tensor([0]), torch.arange(1))["total"].item() == pytest.approx(light(confident, torch.tensor([0]), torch.arange(1))["total"].item())


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("augment", ["flip", "crop_flip"])
def test_augmentation_keeps_uint8_to_normalised_float_and_is_fixed_by_the_seed(augment: str) -> None:
    split = _images()
    first = list(batches(split, batch_size=4, shuffle=True, seed=5, augment=augment))
    again = list(batches(split, batch_size=4, shuffle=True, seed=5, augment=augment))
    other = list(batches(split, batch_size=4, shuffle=True, seed=6, augment=augment))
    for x, y, index in first:
        assert x.dtype == torch.float32 and x.shape == (len(index), 3, 16, 16)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, split.labels[index])
        low, high = normalize(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)).flatten(1)
        assert (x >= low.view(1, 3, 1, 1) - 1e-6).all() and (x <= high.view(1, 3, 1, 1) + 1e-6).all()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    plain = [(x, i) for x, _, i in batches(split, batch_size=4, shuffle=True, seed=5)]
    assert [i.tolist() for _, i in plain] == [i.tolist() for *_, i in first]  # the same order as without augmentation
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, plain))


def test_crop_flip_crops_each_image_at_its_own_box() -> None:
    same = Split(images=_images(n=1).images.expand(8, -1, -1, -1).contiguous(), labels=torch.zeros(8, dtype=torch.long))
    (x, _, _), = batches(same, batch_size=8, seed=0, augment="crop_flip")
    assert len({tuple(image.flatten().tolist()) for image in x}) > 4


def test_flip_views_index_the_mirror_rows_of_a_view_major_table() -> None:
    split = _images()
    n = len(split)
    for x, y, index in batches(split, batch_size=4, shuffle=True, seed=2, augment="flip", views=True):
        image, mirrored = index % n, index >= n
        assert torch.equal(y, split.labels[image])
        expected = torch.where(mirrored.view(-1, 1, 1, 1), split.images[image].flip(-1), split.images[image])
        assert torch.equal(x, normalize(expected))
    with pytest.raises(ValueError, match="views need augment 'flip'"):
        next(batches(split, batch_size=4, augment="crop_flip", views=True))


def test_kd_on_a_mirrored_image_uses_the_mirror_logits() -> None:
    """Mirror logits point at another class than the image's own: distilling from the wrong view
    gives another loss, and the objective's loss is the one of each sample's own view."""
    split = _images(n=12)
    n, classes = len(split), 3
    own = torch.nn.functional.one_hot(split.labels, classes).float() * 6.0
    mirror = torch.nn.functional.one_hot((split.labels + 1) % classes, classes).float() * 6.0
    table = torch.cat([own, mirror])  # view-major, as the trial stores it
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, classes))
    kd = {"kd": {"alpha": 0.5, "temperature": 4.0}}
    objective = make_objective(
        kd, student=student, tracer=None, parts=nn.ModuleDict(), teacher_logits=table, source=None, delta=None,
        weight_decay=0.0, class_weights=None,
    )  # fmt: skip
    reference = KDLoss(alpha=0.5, temperature=4.0)
    mirrored_seen = 0
    for x, y, index in batches(split, batch_size=6, shuffle=True, seed=1, augment="flip", views=True):
        logits = student(x)
        mirrored = (index >= n).view(-1, 1)
        same_view = torch.where(mirrored, mirror[index % n], own[index % n])
        total = objective.loss_fn(logits, y, index)["total"]
        assert total.item() == pytest.approx(reference(logits, same_view, y)["total"].item())
        if mirrored.any():
            mirrored_seen += int(mirrored.sum())
            assert total.item() != pytest.approx(reference(logits, own[index % n], y)["total"].item())
    assert 0 < mirrored_seen < n


@pytest.mark.parametrize("augment", ["flip", "crop_flip"])
def test_online_kd_distils_from_the_teacher_run_on_the_augmented_batch(augment: str) -> None:
    split = _images(n=12)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)).requires_grad_(False)
    objective = make_objective(
        {"kd": {"alpha": 0.5, "temperature": 4.0}}, student=student, tracer=None, parts=nn.ModuleDict(), teacher_logits=None,
        teacher=teacher, source=None, delta=None, weight_decay=0.0, class_weights=None,
    )  # fmt: skip
    reference = KDLoss(alpha=0.5, temperature=4.0)
    for x, y, index in batches(split, batch_size=6, shuffle=True, seed=1, augment=augment):
        logits = student(x)
        total = objective.loss_fn(logits, y, index)["total"]
        assert total.item() == pytest.approx(reference(logits, teacher(x), y)["total"].item())
        original = batches(Split(images=split.images[index], labels=y), batch_size=6)
        assert total.item() != pytest.approx(reference(logits, teacher(next(original)[0]), y)["total"].item())
    objective.close()


# ---------------------------------------------------------------- the teacher's kept weights


def test_weight_ema_averages_parameters_and_buffers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.75)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(4.0)
        model[1].running_mean.add_(8.0)
        model[1].num_batches_tracked.add_(3)
    ema.update()
    averaged = ema.model.state_dict()
    assert torch.allclose(averaged["0.weight"], start["0.weight"] + 0.25 * 4.0)
    assert torch.allclose(averaged["1.running_mean"], start["1.running_mean"] + 0.25 * 8.0)
    assert averaged["1.num_batches_tracked"].item() == 3
    assert not any(p.requires_grad for p in ema.model.parameters())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    root = prepare_animal_mnist(tmp_path_factory.mktemp("recipes") / "animal_mnist")
    return DataConfig(path=str(root), image_size=16, max_images_per_class=6)


def _teacher(data: DataConfig, tmp_path, **recipe) -> tuple[dict, list[dict], dict, dict]:
    from pipelines.export import load_model
    from pipelines.teacher import TEACHER_LOGITS_FILE, TRAJECTORY_FILE, train_teacher

    epochs: list[dict] = []
    metric = recipe.pop("metric", "accuracy")
    config = TeacherConfig(**{"epochs": 3, "batch_size": 8, "bn_recalibration_batches": 1, **recipe})
    metrics = train_teacher(data=data, model=ModelConfig(), finetune=config, output_dir=tmp_path, on_epoch_end=epochs.append, metric=metric)
    weights = {n: m.weight.detach() for n, m in load_model(tmp_path)[0].named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return metrics, epochs, load_file(tmp_path / TRAJECTORY_FILE), {"weights": weights, "logits": load_file(tmp_path / TEACHER_LOGITS_FILE)}


@pytest.mark.parametrize(("best", "metric"), [(1, "accuracy"), (2, "accuracy"), (2, "balanced_accuracy")])
def test_keep_best_restores_the_epoch_best_on_the_selection_split(
    tiny_data: DataConfig, tmp_path, monkeypatch: pytest.MonkeyPatch, best: int, metric: str
) -> None:
    """The selection score (of the search's metric) is made up so that epoch `best` of 3 wins: the
    exported weights, the stored logits and the trajectory's last entry are that epoch's."""
    import pipelines.teacher as teacher

    scores = iter([0.9 if epoch == best else 0.1 * epoch for epoch in (1, 2, 3)])
    selected: list[Split] = []
    asked: set[str] = set()

    def score(net, split, *, metric, num_classes, amp):
        selected.append(split), asked.add(metric)
        return next(scores)

    monkeypatch.setattr(teacher, "_selection_score", score)
    metrics, epochs, trajectory, kept = _teacher(tiny_data, tmp_path, keep="best", augment="flip", metric=metric)
    assert asked == {metric}
    assert metrics["best_epoch"] == best and metrics[f"best_selection_{metric}"] == 0.9
    assert [e[f"selection_{metric}"] for e in epochs] == [0.9 if e == best else 0.1 * e for e in (1, 2, 3)]
    assert all(len(s) == len(selected[0]) and 0 < len(s) < 20 for s in selected)  # 1 in 10 train images per class: not val
    assert {w.shape[0] for w in trajectory.values()} == {best}
    assert all(torch.equal(kept["weights"][name].half().cpu(), w[-1]) for name, w in trajectory.items())


def test_keep_ema_exports_the_average_and_keep_last_the_last_epoch(tiny_data: DataConfig, tmp_path) -> None:
    ema_metrics, _, ema_trajectory, ema = _teacher(tiny_data, tmp_path / "ema", keep="ema")
    last_metrics, _, last_trajectory, last = _teacher(tiny_data, tmp_path / "last", keep="last")
    assert 0 < ema_metrics["ema_decay"] < 1 and "ema_decay" not in last_metrics and "best_epoch" not in last_metrics
    for trajectory, kept in ((ema_trajectory, ema), (last_trajectory, last)):
        assert {w.shape[0] for w in trajectory.values()} == {3}  # every epoch
        assert all(torch.equal(kept["weights"][name].half().cpu(), w[-1]) for name, w in trajectory.items())
    # The same training run (the EMA never touches the live weights), kept two ways.
    assert not all(torch.equal(a, b) for a, b in zip(ema_trajectory.values(), last_trajectory.values()))
    assert set(ema["logits"]) == {"logits", "mirror_logits"}


def test_the_teacher_stores_the_logits_of_each_image_and_of_its_mirror(tiny_data: DataConfig, tmp_path) -> None:
    from pipelines.data import load_data
    from pipelines.export import load_model
    from pipelines.train import predict_logits

    metrics, _, _, kept = _teacher(tiny_data, tmp_path, epochs=1, keep="last", augment="crop_flip", class_balance="off")
    train = load_data(tiny_data).train
    model = load_model(tmp_path)[0]
    assert torch.allclose(kept["logits"]["logits"], predict_logits(model, train), atol=1e-5)
    mirrored = Split(images=train.images.flip(-1), labels=train.labels)
    assert torch.allclose(kept["logits"]["mirror_logits"], predict_logits(model, mirrored), atol=1e-5)
    assert not torch.allclose(kept["logits"]["logits"], kept["logits"]["mirror_logits"])
    assert metrics["class_balanced"] == 0.0
