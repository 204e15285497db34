"""The two pipeline entry points: `train_teacher` (once per search) and `run_trial` (once per trial).

run_trial: teacher weights -> importance criterion -> budget parametrisation -> pruning schedule
(cut -> BN recalibration -> proxy accuracy -> fine-tune with the chosen distillation terms, in one
or more rounds) -> optional dynamic gating -> val/test accuracy -> MACs -> export. Pure PyTorch:
callable from a notebook; progress goes to an optional per-epoch callback.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.budgets import BudgetInputs, keep_counts
from pipelines.checkpoint import TrainingCheckpoint, load_checkpoint, save_checkpoint
from pipelines.config import DataConfig, FinetuneConfig, ModelConfig, TrialParams
from pipelines.data import IMAGENET_MEAN, IMAGENET_STD, Split, Splits, batches, load_data
from pipelines.device import pick_device
from pipelines.export import load_model, save_model
from pipelines.importance import ScoringData, module_scores
from pipelines.macs import count_macs
from pipelines.models import build_model
from pipelines.objective import FEATURE_TERMS, SOURCE_TERMS, delta_weights, make_objective
from pipelines.prune import group_scores_by_name, macs_model, prunable_groups
from pipelines.schedules import SCHEDULES, PruningSession
from pipelines.sources import SourceNet, index_tracer, stage_outputs
from pipelines.train import cross_entropy_loss, evaluate, make_optimizer, predict_logits, recalibrate_bn, train_one_epoch

__all__ = ["train_teacher", "run_trial", "can_start_from_trial", "can_resume", "EpochCallback", "TEACHER_LOGITS_FILE"]

EpochCallback = Callable[[dict[str, float]], None]
TEACHER_LOGITS_FILE = "train_logits.safetensors"
TRAJECTORY_FILE = "trajectory.safetensors"
_FOLLOWER_TERMS = SOURCE_TERMS | {"l2sp"}  # losses that need the pretrained network pruned in step with the student
SELECTION_EVERY = 10  # iterative / priority trials hold out 1 train image in 10 per class to decide on


def _finish(
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
    """Evaluate, count MACs (expected over the `macs_inputs` batches for gated models), export; returns the
    final metrics (also stored in the channel spec)."""
    complexity = count_macs(model, image_size=data.image_size, inputs=macs_inputs)
    metrics = {
        **extra,
        "val_accuracy": evaluate(model, splits.val, amp=amp),
        "test_accuracy": evaluate(model, splits.test, amp=amp),
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
    epochs: int,
    finetune: FinetuneConfig,
    weight_decay: float,
    extra_params: list[nn.Parameter] = (),
    flip: bool,
    first_epoch: int = 1,
    before_epoch: Callable[[int], None] | None = None,
    on_epoch_end: EpochCallback | None,
    resume: TrainingCheckpoint | None = None,
    save_state: Callable[[int, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], None] | None = None,
) -> float:
    """Train `epochs` epochs (AdamW, cosine); returns the final val accuracy. `resume`: the state
    of this same fit after some of its epochs (which are skipped); `save_state(epoch, optimizer,
    scheduler)` runs after each epoch, before `on_epoch_end`."""
    steps_per_epoch = -(-len(splits.train) // finetune.batch_size)
    optimizer, scheduler = make_optimizer(
        model, lr=lr, weight_decay=weight_decay, total_steps=epochs * steps_per_epoch, extra=extra_params
    )
    done = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        torch.set_rng_state(resume.rng)
        done = resume.epoch - first_epoch + 1
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
            flip=flip,
            amp=finetune.amp,
        )
        val = evaluate(model, splits.val, amp=finetune.amp)
        if save_state is not None:
            save_state(epoch, optimizer, scheduler)
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch, **{f"loss_{k}": v for k, v in parts.items()}, "val_accuracy": val})
    return val


def train_teacher(
    *,
    data: DataConfig,
    model: ModelConfig,
    finetune: FinetuneConfig,
    output_dir: str | Path,
    splits: Splits | None = None,
    device: str | torch.device | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, float]:
    """Fine-tune the pretrained model on the target train split (the dense teacher) and export it.

    Also stores the teacher's logits on the train split, so trials distil without running it, and
    every conv/linear weight after each epoch (float16), for TASCNet's trajectory criterion.
    `splits`: the data already decoded (`load_data(data)`), e.g. sent by the driver. `device`:
    see `pipelines.device.pick_device` (default: CUDA when visible).
    """
    torch.manual_seed(finetune.seed)
    device = pick_device(device)
    splits = (splits or load_data(data)).to(device)
    net = build_model(model, num_classes=len(splits.classes)).to(device, memory_format=torch.channels_last)
    output_dir = Path(output_dir)
    trajectory: dict[str, list[torch.Tensor]] = {}

    def record_weights(metrics: dict[str, float]) -> None:
        for name, module in net.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                trajectory.setdefault(name, []).append(module.weight.detach().half().cpu().contiguous())
        if on_epoch_end is not None:
            on_epoch_end(metrics)

    _fit(
        net,
        splits,
        loss_fn=cross_entropy_loss,
        lr=finetune.lr,
        epochs=finetune.epochs,
        finetune=finetune,
        weight_decay=finetune.weight_decay,
        flip=True,
        on_epoch_end=record_weights,
    )
    metrics = _finish(net, splits, data=data, arch=model.arch, output_dir=output_dir, extra={}, amp=finetune.amp)
    save_file({"logits": predict_logits(net, splits.train).cpu().contiguous()}, output_dir / TEACHER_LOGITS_FILE)
    save_file({name: torch.stack(w) for name, w in trajectory.items()}, output_dir / TRAJECTORY_FILE)
    return metrics


def _weight_snapshots(student: nn.Module, teacher_dir: Path) -> list[nn.Module]:
    """One copy of the student per teacher epoch, holding that epoch's conv/linear weights."""
    trajectory = load_file(teacher_dir / TRAJECTORY_FILE)
    epochs = next(iter(trajectory.values())).shape[0]
    snapshots = []
    for epoch in range(epochs):
        snapshot = copy.deepcopy(student)
        for name, module in snapshot.named_modules():
            if name in trajectory:
                module.weight.data.copy_(trajectory[name][epoch].to(module.weight))
        snapshots.append(snapshot)
    return snapshots


def _sparsify_bn(
    model: nn.Module, splits: Splits, *, weight: float, lr: float, finetune: FinetuneConfig, on_epoch_end: EpochCallback | None
) -> None:
    """Network slimming's sparsity phase: one epoch of CE + `weight` * sum |BN scale|, the trial's epoch 1."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = torch.nn.functional.cross_entropy(logits, labels)
        l1 = sum(m.weight.abs().sum() for m in norms)
        return {"ce": ce, "bn_l1": l1, "total": ce + weight * l1}

    _fit(model, splits, loss_fn=loss_fn, lr=lr, epochs=1, finetune=finetune, weight_decay=0.0, flip=False, on_epoch_end=on_epoch_end)


def _selection_indices(train: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) positions: every SELECTION_EVERY-th image of each class with at least two
    images is held out as the selection split of schedules that decide during training."""
    held = torch.zeros(len(train), dtype=torch.bool)
    labels = train.labels.cpu()
    for label in labels.unique():
        positions = (labels == label).nonzero().flatten()
        if len(positions) >= 2:
            held[positions[SELECTION_EVERY - 1 :: SELECTION_EVERY] if len(positions) >= SELECTION_EVERY else positions[-1:]] = True
    return (~held).nonzero().flatten().to(train.labels.device), held.nonzero().flatten().to(train.labels.device)


def _subset(split: Split, index: torch.Tensor) -> Split:
    return Split(images=split.images[index], labels=split.labels[index])


def _class_weights(train: Split, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(train.labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def can_start_from_trial(params: TrialParams) -> bool:
    """Whether `run_trial(params, start_from=...)` may prune an earlier trial's model: not with
    state that follows the teacher's channels (pretrained-channel losses, trajectories, gates)."""
    return not (_FOLLOWER_TERMS & params.losses.keys() or params.criterion == "trajectory" or params.densities)


def can_resume(params: TrialParams) -> bool:
    """Whether a checkpoint (student, optimizer, scheduler: `pipelines.checkpoint`) holds all of the
    trial's training state: one-shot pruning, no gating, no losses with state of their own."""
    return params.schedule == "one_shot" and not params.densities and not ((_FOLLOWER_TERMS | FEATURE_TERMS) & params.losses.keys())


def run_trial(
    params: TrialParams,
    *,
    data: DataConfig,
    model: ModelConfig,
    finetune: FinetuneConfig,
    teacher_dir: str | Path,
    output_dir: str | Path,
    start_from: str | Path | None = None,
    splits: Splits | None = None,
    device: str | torch.device | None = None,
    on_epoch_end: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
) -> dict[str, float]:
    """Prune the teacher as `params` say, fine-tune it with the chosen losses, evaluate and export it.

    `splits`: the data already decoded (`load_data(data)`), e.g. sent by the driver. `device`: see
    `pipelines.device.pick_device` (default: CUDA when visible, as Ray assigns it).
    `start_from`: an exported, smaller model of the same teacher (an earlier trial's) to prune
    further instead of the teacher; channel counts are still those `params` give for the teacher,
    capped by what that model has. Not with losses that track the pretrained channels (l2sp,
    source terms), the trajectory criterion or gating, whose state follows the teacher's channels.

    Fine-tuning uses no augmentation so that the teacher's stored train logits match each image.
    Each epoch reports the loss parts, `val_accuracy`, `macs` and `macs_ratio` to `on_epoch_end`.
    Returns `proxy_accuracy` (after the first cut + BN recalibration, before fine-tuning),
    `val_accuracy`, `test_accuracy`, `macs` (expected over val images for gated models), `params`,
    `macs_ratio` (vs the teacher), `rounds` (pruning rounds kept), `round<i>_accuracy` for every
    round (what the schedule decided on: the selection split for iterative/priority, else val), and `kept.<group>`, the achieved fraction of each group's channels (before gating),
    with its summary `keep_min` / `keep_mean` / `keep_max`.

    `checkpoint_dir`: where the training state is written after every fine-tune epoch, before
    `on_epoch_end` sees it (only for trials that `can_resume`). `resume_from`: such a checkpoint of
    this same trial; training continues after its epoch, with the same results as without the
    interruption.
    """
    if params.densities and params.schedule != "one_shot":
        raise ValueError("dynamic gating needs the one_shot schedule")
    if start_from is not None and not can_start_from_trial(params):
        raise ValueError("start_from needs losses without the pretrained network's channels, no trajectory criterion and no gating")
    if resume_from is not None and not can_resume(params):
        raise ValueError("resume_from needs a one_shot trial without gating or losses with their own state")
    resume = load_checkpoint(resume_from) if resume_from is not None else None
    torch.manual_seed(finetune.seed)
    device = pick_device(device)
    teacher_dir = Path(teacher_dir)
    splits = (splits or load_data(data)).to(device)
    dense, spec = load_model(teacher_dir)
    student = dense if start_from is None else load_model(start_from)[0]
    if resume is not None:
        student = resume.model
    teacher_logits = load_file(teacher_dir / TEACHER_LOGITS_FILE)["logits"].to(device)
    if len(teacher_logits) != len(splits.train):
        raise ValueError(f"{teacher_dir} holds logits for {len(teacher_logits)} train images, the data has {len(splits.train)}")
    selection = None
    if params.schedule != "one_shot":  # it decides during training: on images held out of train, not on val
        trained, held_out = _selection_indices(splits.train)
        splits, selection, teacher_logits = replace(splits, train=_subset(splits.train, trained)), _subset(splits.train, held_out), teacher_logits[trained]
    groups = prunable_groups(dense, image_size=data.image_size)
    budget_inputs = BudgetInputs(
        groups=groups,
        macs=macs_model(dense, image_size=data.image_size) if params.parametrisation == "target" else None,
        ceiling=None if start_from is None else {g.name: g.channels for g in prunable_groups(student, image_size=data.image_size)},
    )
    student = student.to(device, memory_format=torch.channels_last)
    needs_source = bool(_FOLLOWER_TERMS & params.losses.keys())
    layers = stage_outputs(student) if FEATURE_TERMS & params.losses.keys() else []
    source = SourceNet(model, layers=layers, device=device) if SOURCE_TERMS & params.losses.keys() else None
    delta = (
        delta_weights(student, layers, splits.train, directory=teacher_dir, batch_size=finetune.batch_size)
        if "delta" in params.losses
        else None
    )
    # Pruned in step with the student: the pretrained weights (L2-SP anchors) with BN means as channel indices.
    follower = index_tracer(build_model(model, num_classes=len(splits.classes))).to(device) if needs_source else None

    def val_images() -> Iterator[torch.Tensor]:  # gated MACs: the expectation over the whole val split
        return (images for images, _, _ in batches(splits.val, batch_size=256))

    def count(net: nn.Module) -> float:
        return float(count_macs(net, image_size=data.image_size, inputs=val_images() if params.densities else None).macs)

    def with_macs(net: nn.Module) -> EpochCallback | None:
        if on_epoch_end is None:
            return None
        return lambda metrics: on_epoch_end({**metrics, "macs": (m := count(net)), "macs_ratio": m / spec["metrics"]["macs"]})

    # Every pass over the train split is one of the trial's epochs: the sparsity epoch too.
    epochs_done = 0
    if resume is not None:
        epochs_done = int(resume.measured["epochs_before_fine_tune"])
    elif params.bn_sparsity > 0:
        _sparsify_bn(student, splits, weight=params.bn_sparsity, lr=params.lr, finetune=finetune, on_epoch_end=with_macs(student))
        epochs_done = 1

    followers = [follower] if follower is not None else []
    snapshots = _weight_snapshots(student, teacher_dir) if params.criterion == "trajectory" else []
    followers += snapshots  # pruned in step, so the trajectories stay aligned with the channels left

    def score(net: nn.Module, current_followers: list[nn.Module]) -> dict[nn.Module, torch.Tensor]:
        trajectory = None
        if snapshots:
            epochs_seen = [dict(f.named_modules()) for f in current_followers[-len(snapshots) :]]
            trajectory = {
                name: torch.stack([modules[name].weight.detach() for modules in epochs_seen])
                for name, m in net.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))
            }
        scoring = ScoringData(
            train=splits.train,
            batch_size=finetune.batch_size,
            num_batches=finetune.bn_recalibration_batches,
            seed=finetune.seed,
            trajectory=trajectory,
        )
        return module_scores(net, params.criterion, data=scoring)

    dense_scores, target = None, {}
    if resume is None:  # a resumed student is pruned already
        dense_scores = score(student, followers)
        group_scores = group_scores_by_name(student, dense_scores, image_size=data.image_size)
        target = keep_counts(params.parametrisation, replace(budget_inputs, scores=group_scores), params.budget)
        target.update({g.name: g.channels for g in groups if g.channels <= params.min_channels})

    def save_state(epoch: int, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        # epochs_done still counts the epochs before this fit: fit adds its own once they are all done
        measured = {"epochs_before_fine_tune": epochs_done, "proxy_accuracy": session.proxy_accuracy}
        save_checkpoint(checkpoint_dir, model=session.student, arch=spec["arch"], epoch=epoch, optimizer=optimizer, scheduler=scheduler, measured=measured)

    def fit(net: nn.Module, current_followers: list[nn.Module], epochs: int) -> float:
        nonlocal epochs_done
        net.to(memory_format=torch.channels_last)  # pruning leaves odd strides; a resumed student must train in the same layout
        before_epoch = _gate(net, params, epochs=epochs, train=splits.train, finetune=finetune) if params.densities else None
        objective = make_objective(
            params.losses,
            student=net,
            follower=current_followers[0] if follower is not None else None,
            teacher_logits=teacher_logits,
            source=source,
            delta=delta,
            weight_decay=finetune.weight_decay,
            class_weights=_class_weights(splits.train, len(splits.classes)) if params.class_weighted else None,
        )
        # Reseed after everything is built: the training stream (dropout) must not depend on how
        # many random numbers the chosen losses' modules drew.
        torch.manual_seed(finetune.seed * 1000 + epochs_done)
        try:
            val = _fit(
                net,
                splits,
                loss_fn=objective.loss_fn,
                lr=params.lr,
                epochs=epochs,
                finetune=finetune,
                weight_decay=objective.weight_decay,
                extra_params=objective.parameters,
                flip=False,
                first_epoch=epochs_done + 1,
                before_epoch=before_epoch,
                on_epoch_end=with_macs(net),
                resume=resume,
                save_state=save_state if checkpoint_dir is not None and can_resume(params) else None,
            )
        finally:
            objective.close()
        epochs_done += epochs
        return val if selection is None else evaluate(net, selection, amp=finetune.amp)

    def loss_and_accuracy(net: nn.Module, split: Split) -> tuple[float, float]:
        logits = predict_logits(net, split, amp=finetune.amp)
        loss = torch.nn.functional.cross_entropy(logits, split.labels).item()
        return loss, (logits.argmax(1) == split.labels).float().mean().item()

    session = PruningSession(
        student=student,
        followers=followers,
        groups=groups,
        target=target,
        image_size=data.image_size,
        score=score,
        dense_scores=dense_scores,
        recalibrate=lambda net: recalibrate_bn(
            net, splits.train, num_batches=finetune.bn_recalibration_batches, batch_size=finetune.batch_size, seed=finetune.seed
        ),
        val_loss_and_accuracy=lambda net: loss_and_accuracy(net, splits.val),
        decide_loss_and_accuracy=lambda net: loss_and_accuracy(net, selection if selection is not None else splits.val),
        fit=fit,
    )
    if resume is None:
        SCHEDULES.get(params.schedule)(session, epochs=finetune.epochs - epochs_done, rounds=params.rounds, max_drop=params.max_drop)
    else:  # the one_shot schedule after its cut, continued
        session.proxy_accuracy = resume.measured["proxy_accuracy"]
        session.rounds.append({"round": 1, "accuracy": fit(student, [], finetune.epochs - epochs_done)})
    extra = {
        "proxy_accuracy": session.proxy_accuracy,
        "rounds": float(len([r for r in session.rounds if not r.get("reverted")])),
        "train_epochs_used": float(epochs_done),
    }
    achieved = {g.name: session.current()[g.name] / g.channels for g in groups}  # achieved, not requested
    extra.update({f"kept.{name}": fraction for name, fraction in achieved.items()})
    kept = list(achieved.values())
    extra.update(keep_min=min(kept), keep_mean=sum(kept) / len(kept), keep_max=max(kept))
    extra.update({f"round{r['round']}_accuracy": r["accuracy"] for r in session.rounds})  # every round, reverted too
    if params.densities:
        from pipelines.gating import channel_usage, freeze_static_channels

        # AFS: channels (almost) never selected on the train data are pruned, (almost) always: static.
        usage = channel_usage(session.student, batches(splits.train, batch_size=finetune.batch_size))
        freeze_static_channels(session.student, usage)
    metrics = _finish(
        session.student, splits, data=data, arch=spec["arch"], output_dir=Path(output_dir), extra=extra, amp=finetune.amp,
        macs_inputs=val_images() if params.densities else None,
    )  # fmt: skip
    metrics["macs_ratio"] = metrics["macs"] / spec["metrics"]["macs"]
    return metrics


def _gate(net: nn.Module, params: TrialParams, *, epochs: int, train: Split, finetune: FinetuneConfig) -> Callable[[int], None]:
    """Insert dynamic channel gates (per-stage densities), fit their predictors; returns the per-epoch density step."""
    from pipelines.gating import add_stage_gates, density_schedule, fit_predictors, set_density

    targets = add_stage_gates(net, params.densities)
    fitting = batches(train, batch_size=finetune.batch_size, shuffle=True, seed=finetune.seed)
    fit_predictors(net, itertools.islice(fitting, max(1, finetune.bn_recalibration_batches)))  # as many as BN recalibration
    steps = {name: density_schedule(d, epochs, warmup=params.density_warmup) for name, d in targets.items()}
    return lambda epoch: set_density(net, {name: s[epoch] for name, s in steps.items()})
