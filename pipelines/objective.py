"""Assemble a trial's training objective: the chosen distillation/regularisation terms, wired to
the student, the pruned pretrained anchors, the frozen source network and the stored teacher logits.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.data import Split, batches
from pipelines.device import device_of
from pipelines.distill import DistillBatch, ExtraHead, attach_extra_head, build_objective, build_term, delta_channel_weights
from pipelines.models import head_name
from pipelines.sources import FeatureTap, SourceNet, classifier_inputs, kept_channels, stage_widths

__all__ = ["TrialObjective", "learned_parts", "make_objective", "SOURCE_TERMS", "FEATURE_TERMS", "delta_weights"]

SOURCE_TERMS = {"source_kd", "delta", "afd"}  # terms that run the frozen source network
FEATURE_TERMS = {"delta", "afd"}
DELTA_FILE = "delta_weights.safetensors"


def delta_weights(teacher: nn.Module, layers: list[str], train: Split, *, directory: Path, batch_size: int) -> dict[str, torch.Tensor]:
    """DELTA's channel weights on the dense teacher, computed once per teacher and cached beside it."""
    path = directory / DELTA_FILE
    if path.exists():
        return load_file(path)
    probe = [(x, y) for x, y, _ in batches(train, batch_size=batch_size, shuffle=True, seed=0)][:1]
    weights = {k: v.cpu().contiguous() for k, v in delta_channel_weights(teacher, layers, probe).items()}
    # Hidden, so that a trial loading the teacher folder meanwhile ignores it; named with uuid, not
    # torch's RNG: the trial's stream stays its own.
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    save_file(weights, temporary)
    temporary.replace(path)  # atomic: concurrent trials may race to write the same weights
    return weights


@dataclass
class TrialObjective:
    """A loss function for `train_one_epoch` plus the extra trainable parameters it owns."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    parameters: list[nn.Parameter]
    weight_decay: float
    close: Callable[[], None]


def learned_parts(losses: dict[str, dict[str, float]], *, dense: nn.Module, layers: list[str]) -> nn.ModuleDict:
    """The trainable parts of the chosen losses (the source-KD head, AFD's attention nets), sized
    to the unpruned network: a trial builds them once and trains them across its pruning rounds."""
    parts = nn.ModuleDict()
    if "source_kd" in losses:
        parts["source_kd"] = ExtraHead(_classifier_width(dense))
    if "afd" in losses:
        parts["afd"] = build_term("afd", losses["afd"], channels=stage_widths(dense, layers))
    return parts.to(device_of(dense))


def _classifier_width(model: nn.Module) -> int:
    return next(m for m in model.get_submodule(head_name(model)).modules() if isinstance(m, nn.Linear)).in_features


def make_objective(
    losses: dict[str, dict[str, float]],
    *,
    student: nn.Module,
    tracer: nn.Module | None,
    parts: nn.ModuleDict,
    teacher_logits: torch.Tensor | None,
    teacher: nn.Module | None = None,
    source: SourceNet | None,
    delta: dict[str, torch.Tensor] | None,
    weight_decay: float,
    class_weights: torch.Tensor | None,
) -> TrialObjective:
    """`losses` wired to the student as it is now. `tracer`: the pretrained network pruned in step
    with the student (L2-SP's anchors, and the kept channels' indices); `parts`: `learned_parts`.
    The KD targets: the rows `index` of `teacher_logits`, or, with `teacher`, that frozen network
    run on the student's own (augmented) input batch."""
    context: dict = {}
    cleanups: list[Callable[[], None]] = []
    head = head_name(student)
    if "l2sp" in losses:
        anchors = dict(tracer.named_parameters())
        context["pairs"] = [(p, anchors[n].detach().clone()) for n, p in student.named_parameters() if not n.startswith(head + ".")]
        context["head_params"] = list(student.get_submodule(head).parameters())
        weight_decay = 0.0  # L2-SP replaces weight decay
    extra_logits = None
    if "source_kd" in losses:
        _, extra_logits = attach_extra_head(student, head, extra=parts["source_kd"], inputs=classifier_inputs(tracer))
        cleanups.append(parts["source_kd"].remove)
    kept: dict[str, torch.Tensor] = {}
    tap = None
    if FEATURE_TERMS & losses.keys():
        kept = {name: kept_channels(tracer, name) for name in source.layers}
        tap = FeatureTap(student, source.layers)
        cleanups.append(tap.remove)
        context["channel_weights"] = delta
    if (source is not None or (teacher is not None and "kd" in losses)) and tap is None:
        tap = FeatureTap(student, [])
        cleanups.append(tap.remove)
    built = {"afd": parts["afd"]} if "afd" in losses else {}
    objective = build_objective(losses, class_weights=class_weights, built=built, **context).to(device_of(student))
    extras = list(objective.parameters()) + (list(parts["source_kd"].parameters()) if "source_kd" in losses else [])

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = None
        if "kd" in losses and teacher is None:
            targets = teacher_logits[index]
        elif "kd" in losses:
            with torch.no_grad():
                targets = teacher(tap.input).float()
        batch = DistillBatch(logits=logits, labels=labels, teacher_logits=targets, source_channels=kept)
        if source is not None:
            source_logits, source_features = source(tap.input)
            batch.source_logits = source_logits
            batch.source_features = {n: f[:, kept[n]] for n, f in source_features.items() if n in kept}
            batch.student_features = {n: tap.outputs[n] for n in kept}
        if extra_logits is not None:
            batch.extra_logits = extra_logits()
        return objective(batch)

    def close() -> None:
        for cleanup in cleanups:
            cleanup()

    return TrialObjective(loss_fn=loss_fn, parameters=extras, weight_decay=weight_decay, close=close)
