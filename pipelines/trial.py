"""A trial, `run_trial`: prune the dense teacher, fine-tune it with distillation, evaluate, export.

teacher weights -> importance criterion -> budget parametrisation -> pruning schedule (cut -> BN
recalibration -> proxy accuracy -> fine-tune with the chosen distillation terms, in one or more
rounds) -> optional dynamic gating -> val/test accuracy -> MACs -> export. Pure PyTorch: callable
from a notebook; progress goes to an optional per-epoch callback. The teacher: `pipelines.teacher`.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pipelines._fit import EpochCallback, finish, fit, selection_indices, subset
from pipelines.budgets import BudgetInputs, keep_counts
from pipelines.checkpoint import TrialState, load_state, save_state
from pipelines.config import DataConfig, FinetuneConfig, ModelConfig, TrialParams
from pipelines.data import Split, Splits, batches, load_data
from pipelines.device import device_of, pick_device
from pipelines.export import load_model
from pipelines.importance import ScoringData, module_scores
from pipelines.macs import MacsModel, count_macs
from pipelines.models import build_model
from pipelines.objective import FEATURE_TERMS, SOURCE_TERMS, delta_weights, learned_parts, make_objective
from pipelines.prune import Group, group_scores_by_name, macs_model, prunable_groups
from pipelines.schedules import SCHEDULES, PruningSession, group_widths
from pipelines.sources import SourceNet, index_tracer, stage_outputs
from pipelines.teacher import TEACHER_LOGITS_FILE, TEACHER_VIEWS, TRAJECTORY_FILE
from pipelines.train import class_balance_weights, evaluate, predict_logits, recalibrate_bn

__all__ = ["run_trial", "can_start_from_trial"]

_FOLLOWER_TERMS = SOURCE_TERMS | {"l2sp"}  # losses that need the pretrained network pruned in step with the student


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


def can_start_from_trial(params: TrialParams) -> bool:
    """Whether `run_trial(params, start_from=...)` may prune an earlier trial's model: not with
    state that follows the teacher's channels (pretrained-channel losses, trajectories, gates)."""
    return not (_FOLLOWER_TERMS & params.losses.keys() or params.criterion == "trajectory" or params.densities)


@dataclass
class _Trial:
    """What a trial reads and never changes: rebuilt the same way when it resumes, so not in its checkpoint."""

    params: TrialParams
    data: DataConfig
    model: ModelConfig
    finetune: FinetuneConfig
    splits: Splits  # train without the selection split, for schedules that decide during training
    selection: Split | None  # what those schedules decide on; None: val (one_shot never decides)
    # For `splits.train`, view-major (one row per image and view, `TEACHER_VIEWS[finetune.augment]`):
    # what the indices of `batches(..., views=True)` address. None with `teacher_logits: online`.
    teacher_logits: torch.Tensor | None
    teacher: nn.Module | None  # the frozen dense teacher, with `teacher_logits: online`
    teacher_macs: float
    arch: str
    groups: list[Group]
    macs: MacsModel | None  # the dense network's MACs per group width, for MACs targets
    source: SourceNet | None
    delta: dict[str, torch.Tensor] | None
    checkpoint_dir: Path | None
    on_epoch_end: EpochCallback | None

    @property
    def schedule_epochs(self) -> int:
        """The fine-tune epochs the schedule shares out: the trial's, less a sparsity epoch."""
        return self.finetune.epochs - (1 if self.params.bn_sparsity > 0 else 0)

    def macs_inputs(self) -> Iterator[torch.Tensor] | None:
        """Gated MACs are an expectation over the whole val split; None for static models."""
        if not self.params.densities:
            return None
        return (images for images, _, _ in batches(self.splits.val, batch_size=256))

    def report(self, net: nn.Module) -> EpochCallback | None:
        """`on_epoch_end` with the MACs the network has now."""
        if self.on_epoch_end is None:
            return None

        def with_macs(metrics: dict[str, float]) -> None:
            macs = float(count_macs(net, image_size=self.data.image_size, inputs=self.macs_inputs()).macs)
            self.on_epoch_end({**metrics, "macs": macs, "macs_ratio": macs / self.teacher_macs})

        return with_macs

    def checkpoint(self, state: TrialState) -> None:
        if self.checkpoint_dir is not None:
            save_state(state, self.checkpoint_dir, arch=self.arch)


def _prepare(
    params: TrialParams,
    *,
    data: DataConfig,
    model: ModelConfig,
    finetune: FinetuneConfig,
    teacher_dir: Path,
    splits: Splits,
    device: torch.device,
    on_epoch_end: EpochCallback | None,
    checkpoint_dir: str | Path | None,
) -> tuple[_Trial, nn.Module]:
    """The trial's fixed inputs, and the fine-tuned teacher they were derived from."""
    dense, spec = load_model(teacher_dir)
    dense = dense.to(device)
    teacher, views = None, None
    if finetune.teacher_logits == "online":
        teacher = copy.deepcopy(dense).to(memory_format=torch.channels_last).eval().requires_grad_(False)
    else:
        views = _teacher_views(teacher_dir, finetune.augment).to(device)  # views x train images x classes
        if views.shape[1] != len(splits.train):
            raise ValueError(f"{teacher_dir} holds logits for {views.shape[1]} train images, the data has {len(splits.train)}")
    selection = None
    if params.schedule != "one_shot":  # it decides during training: on images held out of train, not on val
        trained, held_out = selection_indices(splits.train)
        splits, selection = replace(splits, train=subset(splits.train, trained)), subset(splits.train, held_out)
        views = None if views is None else views[:, trained]
    layers = stage_outputs(dense) if FEATURE_TERMS & params.losses.keys() else []
    delta = None
    if "delta" in params.losses:
        delta = delta_weights(dense, layers, splits.train, directory=teacher_dir, batch_size=finetune.batch_size)
    trial = _Trial(
        params=params,
        data=data,
        model=model,
        finetune=finetune,
        splits=splits,
        selection=selection,
        teacher_logits=None if views is None else views.flatten(0, 1),
        teacher=teacher,
        teacher_macs=spec["metrics"]["macs"],
        arch=spec["arch"],
        groups=prunable_groups(dense, image_size=data.image_size),
        macs=macs_model(dense, image_size=data.image_size) if params.parametrisation == "target" else None,
        source=SourceNet(model, layers=layers, device=device) if SOURCE_TERMS & params.losses.keys() else None,
        delta=delta,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        on_epoch_end=on_epoch_end,
    )
    return trial, dense


def _teacher_views(teacher_dir: Path, augment: str) -> torch.Tensor:
    """The teacher's stored train logits for the views `augment` trains on, stacked: V x N x C."""
    if augment not in TEACHER_VIEWS:
        raise ValueError(f"trial.augment: {augment} draws new views every step, so it needs trial.teacher_logits: online (stored logits exist for {' and '.join(TEACHER_VIEWS)} only)")
    path = teacher_dir / TEACHER_LOGITS_FILE
    stored = load_file(path)
    missing = [name for name in TEACHER_VIEWS[augment] if name not in stored]
    if missing:
        raise ValueError(
            f"trial.augment: {augment} needs the teacher's logits of the mirrored train images, which {path} lacks"
            " (a teacher trained before trial augmentation existed): train the teacher again, or set trial.augment: none"
        )
    return torch.stack([stored[name] for name in TEACHER_VIEWS[augment]])


def _start(
    trial: _Trial, dense: nn.Module, *, teacher_dir: Path, start_from: str | Path | None, resume_from: str | Path | None
) -> TrialState:
    """The trial's state before its first epoch (the student: `dense` itself, or `start_from`), or
    as its checkpoint left it."""
    device = device_of(dense)
    parts = learned_parts(trial.params.losses, dense=dense, layers=trial.source.layers if trial.source else [])
    if resume_from is not None:
        state = load_state(resume_from, loss_parts=parts)
        for name in ("student", "tracer", "previous"):
            if (network := getattr(state, name)) is not None:
                setattr(state, name, network.to(device, memory_format=torch.channels_last))
        state.snapshots = [s.to(device, memory_format=torch.channels_last) for s in state.snapshots]
        torch.set_rng_state(state.rng)  # as it was after the checkpoint's epoch
        return state
    student = (dense if start_from is None else load_model(start_from)[0]).to(device, memory_format=torch.channels_last)
    state = TrialState(student=student, loss_parts=parts)
    state.start_widths = {g.name: g.channels for g in prunable_groups(student, image_size=trial.data.image_size)}
    if _FOLLOWER_TERMS & trial.params.losses.keys():
        state.tracer = index_tracer(build_model(trial.model, num_classes=len(trial.splits.classes))).to(device)
    if trial.params.criterion == "trajectory":
        state.snapshots = _weight_snapshots(student, teacher_dir)
    return state


def _score(trial: _Trial, net: nn.Module, followers: list[nn.Module], *, snapshots: int) -> dict[nn.Module, torch.Tensor]:
    """The importance criterion on `net`; the trajectory criterion reads the last `snapshots` followers."""
    trajectory = None
    if snapshots:
        epochs_seen = [dict(f.named_modules()) for f in followers[-snapshots:]]
        trajectory = {
            name: torch.stack([modules[name].weight.detach() for modules in epochs_seen])
            for name, m in net.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        }
    scoring = ScoringData(
        train=trial.splits.train,
        batch_size=trial.finetune.batch_size,
        num_batches=trial.finetune.bn_recalibration_batches,
        seed=trial.finetune.seed,
        trajectory=trajectory,
    )
    return module_scores(net, trial.params.criterion, data=scoring)


def _sparsify_bn(trial: _Trial, state: TrialState) -> None:
    """Network slimming's sparsity phase: one epoch of CE + `bn_sparsity` * sum |BN scale|, the trial's epoch 1."""
    if trial.params.bn_sparsity <= 0 or state.epoch > 0:
        return
    norms = [m for m in state.student.modules() if isinstance(m, nn.BatchNorm2d)]

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = torch.nn.functional.cross_entropy(logits, labels)
        l1 = sum(m.weight.abs().sum() for m in norms)
        return {"ce": ce, "bn_l1": l1, "total": ce + trial.params.bn_sparsity * l1}

    def after_epoch(epoch: int, *_: object) -> None:
        state.epoch, state.rng = epoch, torch.get_rng_state()
        trial.checkpoint(state)

    fit(
        state.student, trial.splits, loss_fn=loss_fn, lr=trial.params.lr, epochs=1, finetune=trial.finetune, weight_decay=0.0,
        augment=trial.finetune.augment, after_epoch=after_epoch, on_epoch_end=trial.report(state.student),
    )  # fmt: skip


def _decide_target(trial: _Trial, state: TrialState) -> dict[nn.Module, torch.Tensor] | None:
    """The channels each group keeps in the end, from the criterion on the unpruned student; returns
    those scores for the first cut (None when a resumed trial decided before its checkpoint)."""
    if state.target is not None:
        return None
    scores = _score(trial, state.student, state.followers, snapshots=len(state.snapshots))
    group_scores = group_scores_by_name(state.student, scores, image_size=trial.data.image_size)
    inputs = BudgetInputs(groups=trial.groups, macs=trial.macs, ceiling=state.start_widths, scores=group_scores)
    state.target = keep_counts(trial.params.parametrisation, inputs, trial.params.budget)
    state.target.update({g.name: g.channels for g in trial.groups if g.channels <= trial.params.min_channels})
    return scores


def _fine_tune(trial: _Trial, state: TrialState, epochs: int) -> float:
    """Train the current round up to its `epochs` with the chosen losses; returns the accuracy the
    schedule decides on (the selection split, or val for schedules that do not decide)."""
    params, finetune = trial.params, trial.finetune
    net = state.student.to(memory_format=torch.channels_last)  # pruning leaves odd strides; a resumed student must train in the same layout
    before_epoch = _gate(net, params, epochs=epochs, train=trial.splits.train, finetune=finetune) if params.densities else None
    objective = make_objective(
        params.losses,
        student=net,
        tracer=state.tracer,
        parts=state.loss_parts,
        teacher_logits=trial.teacher_logits,
        teacher=trial.teacher,
        source=trial.source,
        delta=trial.delta,
        weight_decay=finetune.weight_decay,
        class_weights=class_balance_weights(trial.splits.train.labels, len(trial.splits.classes), "on") if params.class_weighted else None,
    )
    first_epoch = state.epoch - state.round_epochs + 1
    # Reseed after everything is built: the training stream (dropout) must not depend on how
    # many random numbers the chosen losses' modules drew.
    torch.manual_seed(finetune.seed * 1000 + first_epoch - 1)

    def after_epoch(epoch: int, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        state.epoch, state.round_epochs = epoch, state.round_epochs + 1
        state.optimizer, state.scheduler, state.rng = optimizer.state_dict(), scheduler.state_dict(), torch.get_rng_state()
        trial.checkpoint(state)

    try:
        val = fit(
            net, trial.splits, loss_fn=objective.loss_fn, lr=params.lr, epochs=epochs, finetune=finetune,
            weight_decay=objective.weight_decay, extra_params=objective.parameters, augment=finetune.augment,
            views=trial.teacher_logits is not None and finetune.augment != "none", first_epoch=first_epoch,
            done=state.round_epochs, saved=state if state.optimizer is not None else None, before_epoch=before_epoch,
            after_epoch=after_epoch, on_epoch_end=trial.report(net),
        )  # fmt: skip
    finally:
        objective.close()
    state.round_epochs, state.optimizer, state.scheduler = 0, None, None
    return val if trial.selection is None else evaluate(net, trial.selection, amp=finetune.amp)


def _loss_and_accuracy(net: nn.Module, split: Split, *, amp: bool) -> tuple[float, float]:
    logits = predict_logits(net, split, amp=amp)
    loss = torch.nn.functional.cross_entropy(logits, split.labels).item()
    return loss, (logits.argmax(1) == split.labels).float().mean().item()


def _prune_and_fine_tune(trial: _Trial, state: TrialState, dense_scores: dict[nn.Module, torch.Tensor] | None) -> None:
    """The schedule: cut -> BN recalibration -> proxy accuracy -> fine-tune, in one or more rounds."""
    finetune = trial.finetune
    session = PruningSession(
        state=state,
        groups=trial.groups,
        image_size=trial.data.image_size,
        score=lambda net, followers: _score(trial, net, followers, snapshots=len(state.snapshots)),
        dense_scores=dense_scores,
        recalibrate=lambda net: recalibrate_bn(
            net, trial.splits.train, num_batches=finetune.bn_recalibration_batches, batch_size=finetune.batch_size, seed=finetune.seed
        ),
        val_loss_and_accuracy=lambda net: _loss_and_accuracy(net, trial.splits.val, amp=finetune.amp),
        decide_loss_and_accuracy=lambda net: _loss_and_accuracy(
            net, trial.splits.val if trial.selection is None else trial.selection, amp=finetune.amp
        ),
        fit=lambda epochs: _fine_tune(trial, state, epochs),
    )
    SCHEDULES.get(trial.params.schedule)(session, epochs=trial.schedule_epochs, rounds=trial.params.rounds, max_drop=trial.params.max_drop)


def _freeze_gates(trial: _Trial, state: TrialState) -> None:
    """AFS: channels (almost) never selected on the train data are pruned, (almost) always: static."""
    if not trial.params.densities:
        return
    from pipelines.gating import channel_usage, freeze_static_channels

    usage = channel_usage(state.student, batches(trial.splits.train, batch_size=trial.finetune.batch_size))
    freeze_static_channels(state.student, usage)


def _summary(trial: _Trial, state: TrialState) -> dict[str, float]:
    """What the trial measured before its final evaluation, with the widths it achieved (not requested)."""
    widths = group_widths(state.student, trial.groups)
    achieved = {g.name: widths[g.name] / g.channels for g in trial.groups}
    kept = list(achieved.values())
    return {
        "proxy_accuracy": state.proxy_accuracy,
        "rounds": float(len([r for r in state.rounds if not r.get("reverted")])),
        "train_epochs_used": float(state.epoch),
        **{f"kept.{name}": fraction for name, fraction in achieved.items()},
        "keep_min": min(kept),
        "keep_mean": sum(kept) / len(kept),
        "keep_max": max(kept),
        **{f"round{r['round']}_accuracy": r["accuracy"] for r in state.rounds},  # every round, reverted too
    }


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

    `finetune.augment`: none, flip (each step trains on the image or its mirror) or crop_flip.
    `finetune.teacher_logits`: stored, distilling from the teacher's stored logits of the same view
    (`TEACHER_VIEWS`: none and flip only; a teacher folder without mirror logits raises a ValueError
    saying so), or online: the frozen teacher runs on each augmented batch.
    Each epoch reports the loss parts, `val_accuracy`, `val_balanced_accuracy`, `macs` and `macs_ratio` to `on_epoch_end`.
    Returns `proxy_accuracy` (after the first cut + BN recalibration, before fine-tuning),
    `val_accuracy`, `test_accuracy`, `macs` (expected over val images for gated models), `params`,
    `macs_ratio` (vs the teacher), `rounds` (pruning rounds kept), `round<i>_accuracy` for every
    round (what the schedule decided on: the selection split for iterative/priority, else val),
    `train_epochs_used`, and `kept.<group>`, the achieved fraction of each group's channels
    (before gating), with its summary `keep_min` / `keep_mean` / `keep_max`.

    `checkpoint_dir`: where the trial's state (`pipelines.checkpoint.TrialState`) is written after
    every epoch, before `on_epoch_end` sees it. `resume_from`: such a checkpoint of this same trial;
    training continues after its epoch, with the same results as without the interruption.
    """
    if params.densities and params.schedule != "one_shot":
        raise ValueError("dynamic gating needs the one_shot schedule")
    if start_from is not None and not can_start_from_trial(params):
        raise ValueError("start_from needs losses without the pretrained network's channels, no trajectory criterion and no gating")
    torch.manual_seed(finetune.seed)
    device = pick_device(device)
    teacher_dir = Path(teacher_dir)
    splits = (splits or load_data(data)).to(device)
    trial, dense = _prepare(
        params, data=data, model=model, finetune=finetune, teacher_dir=teacher_dir, splits=splits, device=device,
        on_epoch_end=on_epoch_end, checkpoint_dir=checkpoint_dir,
    )  # fmt: skip
    state = _start(trial, dense, teacher_dir=teacher_dir, start_from=start_from, resume_from=resume_from)
    _sparsify_bn(trial, state)
    dense_scores = _decide_target(trial, state)
    _prune_and_fine_tune(trial, state, dense_scores)
    _freeze_gates(trial, state)
    metrics = finish(
        state.student, trial.splits, data=data, arch=trial.arch, output_dir=Path(output_dir), extra=_summary(trial, state),
        amp=finetune.amp, macs_inputs=trial.macs_inputs(),
    )  # fmt: skip
    metrics["macs_ratio"] = metrics["macs"] / trial.teacher_macs
    return metrics


def _gate(net: nn.Module, params: TrialParams, *, epochs: int, train: Split, finetune: FinetuneConfig) -> Callable[[int], None]:
    """Dynamic channel gates (per-stage densities) with fitted predictors, unless a resumed student
    has them already; returns the per-epoch density step."""
    from pipelines.gating import add_stage_gates, density_schedule, fit_predictors, gate_stages, named_gates, set_density

    if named_gates(net):
        targets = {name: params.densities.get(stage, 1.0) for name, stage in gate_stages(net).items()}
    else:
        targets = add_stage_gates(net, params.densities)
        fitting = batches(train, batch_size=finetune.batch_size, shuffle=True, seed=finetune.seed)
        fit_predictors(net, itertools.islice(fitting, max(1, finetune.bn_recalibration_batches)))  # as many as BN recalibration
    steps = {name: density_schedule(d, epochs, warmup=params.density_warmup) for name, d in targets.items()}
    return lambda epoch: set_density(net, {name: s[epoch] for name, s in steps.items()})
