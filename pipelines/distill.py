"""Distillation and regularisation losses, and the `Objective` that combines them per batch.

Every term is an nn.Module registered in `LOSSES`; its forward returns a dict of named loss parts
(each logged under its own name). `Objective` adds them up into `total`, the back-propagated scalar.
`KDLoss` keeps its original `(student_logits, teacher_logits, targets)` signature; every other term's
forward takes one `DistillBatch`. Each term class lists the DistillBatch fields it reads
(`batch_fields`, see `needs`) and the constructor objects the trial must supply (`context`, see
`context_needs`), so the trial computes only what the chosen terms use.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines._registry import Registry
from pipelines.feature_distill import AFDLoss, DeltaLoss, delta_channel_weights

__all__ = [
    "LOSSES",
    "DistillBatch",
    "KDLoss",
    "SourceKDLoss",
    "ExtraHead",
    "attach_extra_head",
    "L2SP",
    "DeltaLoss",
    "AFDLoss",
    "delta_channel_weights",
    "Objective",
    "build_term",
    "build_objective",
    "needs",
    "context_needs",
]

LOSSES: Registry[type[nn.Module]] = Registry("distillation loss")


@dataclass
class DistillBatch:
    """Everything a loss term may read for one training batch; fields a term does not need stay None/empty."""

    logits: torch.Tensor  # student logits, N x num_classes
    labels: torch.Tensor  # N
    teacher_logits: torch.Tensor | None = None  # dense fine-tuned target teacher, N x num_classes
    source_logits: torch.Tensor | None = None  # frozen ImageNet classifier on these images, N x 1000
    extra_logits: torch.Tensor | None = None  # the student's extra 1000-way head (source_kd), N x 1000
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> N x C_kept x H x W
    source_features: dict[str, torch.Tensor] = field(default_factory=dict)  # same names, same kept channels
    # name -> the kept channels' indices among the source's (absent: the maps are unpruned). Terms
    # with learned parts size them to the source's widths and index them, so pruning never resizes them.
    source_channels: dict[str, torch.Tensor] = field(default_factory=dict)


def _required(batch: DistillBatch, name: str, term: str) -> torch.Tensor:
    value = getattr(batch, name)
    if value is None:
        raise ValueError(f"loss {term!r} needs batch.{name}, which is None")
    return value


def _soft_kl(student: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * KL(softmax(target/T) || softmax(student/T))`, batch mean; the target is detached."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=1), F.log_softmax(target.detach() / t, dim=1), reduction="batchmean", log_target=True
    ) * (t * t)


@LOSSES.register("kd", description="Hinton KD from the dense fine-tuned teacher; knobs: alpha, temperature")
class KDLoss(nn.Module):
    """`(1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))`.

    The T^2 factor keeps the KD gradient's scale independent of the temperature (Hinton et al. 2015).
    In an `Objective` its `total` replaces plain CE as the base (it is not added on top of CE).
    """

    part = "kd"
    batch_fields = frozenset({"teacher_logits"})
    context: frozenset[str] = frozenset()

    def __init__(self, *, alpha: float, temperature: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha = alpha
        self.temperature = temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(student_logits, targets)
        kd = _soft_kl(student_logits, teacher_logits, self.temperature)
        return {"ce": ce, "kd": kd, "total": (1.0 - self.alpha) * ce + self.alpha * kd}

    def on_batch(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        """`forward` on a DistillBatch: (batch.logits, batch.teacher_logits, batch.labels)."""
        return self(batch.logits, _required(batch, "teacher_logits", "kd"), batch.labels)


@LOSSES.register(
    "source_kd",
    description="Liu et al. 2017 Hybrid-TransferNet source-classifier KD into an extra 1000-way head; knobs: weight, temperature",
)
class SourceKDLoss(nn.Module):
    """`T^2 * KL(softmax(source_logits / T) || softmax(extra_logits / T))`, batch mean.

    Liu et al. write it as a soft cross-entropy; the KL differs only by the source's entropy, a constant,
    so the gradients are the same and the part is 0 when the extra head matches the source classifier.
    Only the extra head's logits (and, through them, the shared backbone) get gradients.
    """

    part = "source_kd"
    batch_fields = frozenset({"source_logits", "extra_logits"})
    context: frozenset[str] = frozenset()

    def __init__(self, *, weight: float, temperature: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weight = weight
        self.temperature = temperature

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        extra = _required(batch, "extra_logits", "source_kd")
        source = _required(batch, "source_logits", "source_kd")
        return {"source_kd": _soft_kl(extra, source, self.temperature)}


class ExtraHead(nn.Module):
    """Liu et al.'s extra branch: `Linear(in_features, num_outputs)` on the student's classifier input.

    Deliberately NOT a submodule of the student, so the exported state_dict is unchanged; add its
    `.parameters()` to the optimiser and call `remove()` (drops the hook) before exporting. `weight`/`bias`
    optionally initialise it, e.g. from the ImageNet classifier, so that source_kd starts near 0
    instead of learning a 1000-way head from scratch. Sized to the unpruned classifier input: after
    pruning, `inputs` (the kept input channels' indices) selects its columns, so one head is trained
    across pruning rounds and its columns stay aligned with the channels they read.
    """

    def __init__(
        self, in_features: int, num_outputs: int = 1000, *, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_outputs)
        with torch.no_grad():
            if weight is not None:
                self.fc.weight.copy_(weight)
            if bias is not None:
                self.fc.bias.copy_(bias)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._captured: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.fc.weight if self.inputs is None else self.fc.weight[:, self.inputs]
        return F.linear(features.flatten(1), weight, self.fc.bias)

    def remove(self) -> None:
        """Remove the forward pre-hook from the student's classifier and drop the captured features."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._captured = None


def attach_extra_head(
    model: nn.Module,
    head_name: str,
    num_outputs: int = 1000,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    extra: ExtraHead | None = None,
    inputs: torch.Tensor | None = None,
) -> tuple[ExtraHead, Callable[[], torch.Tensor]]:
    """Hook `model.get_submodule(head_name)`'s input; returns (ExtraHead, fn giving the last forward's extra logits).

    Without `extra`, a new head of `in_features` that of the first nn.Linear in the classifier (the
    head itself, or e.g. the Linear of a `Sequential(Dropout, Linear)` classifier). `extra`: an
    existing (unpruned-width) head to hook on instead, reading the columns `inputs`. The extra logits
    are computed when the function is called, from the captured (graph-carrying) input of the latest
    forward, so they back-propagate into the shared backbone. The model gains only a hook.
    """
    head = model.get_submodule(head_name)
    linear = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise ValueError(f"{head_name!r} contains no nn.Linear; pass the classifier whose input is the penultimate features")
    if extra is None:
        extra = ExtraHead(linear.in_features, num_outputs, weight=weight, bias=bias).to(linear.weight.device)
    extra.inputs = inputs
    width = linear.in_features if inputs is None else len(inputs)
    if width != linear.in_features or (inputs is None and extra.fc.in_features != width):
        raise ValueError(f"the extra head reads {width} of its {extra.fc.in_features} inputs; the classifier has {linear.in_features}")

    def capture(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        extra._captured = args[0]

    extra._handle = head.register_forward_pre_hook(capture)

    def extra_logits() -> torch.Tensor:
        if extra._captured is None:
            raise RuntimeError("no forward pass of the model since attach_extra_head (or the head was removed)")
        return extra(extra._captured)

    return extra, extra_logits


@LOSSES.register("l2sp", description="L2-SP (Li et al. ICML 2018) pull to the pretrained weights; knobs: alpha, beta")
class L2SP(nn.Module):
    """`alpha/2 * sum ||w_S - w*_S||^2 + beta/2 * ||w_head||^2`; it REPLACES weight decay.

    With l2sp on, the optimiser's weight decay must be 0 (the trial does that). `pairs` are the
    student's backbone parameters with their pretrained anchors of the same shape (already sliced to
    the kept channels); anchors are copied into non-persistent buffers, so later updates of the
    parameters cannot move them. The parameters are held by plain reference, not registered:
    `Objective.parameters()` never yields the student's weights. The batch is ignored. Its `weight`
    in an Objective is 1 (alpha and beta are the strengths).
    """

    part = "l2sp"
    weight = 1.0
    batch_fields: frozenset[str] = frozenset()
    context = frozenset({"pairs", "head_params"})

    def __init__(
        self, *, pairs: list[tuple[nn.Parameter, torch.Tensor]], head_params: list[nn.Parameter], alpha: float, beta: float
    ) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha = alpha
        self.beta = beta
        self._params = [param for param, _ in pairs]
        self._head = list(head_params)
        if {id(p) for p in self._params} & {id(p) for p in self._head}:
            raise ValueError("l2sp: a head parameter is also in `pairs`; the head must be excluded from the backbone")
        for i, (param, anchor) in enumerate(pairs):
            if param.shape != anchor.shape:
                raise ValueError(f"l2sp: pair {i}: parameter {tuple(param.shape)} vs anchor {tuple(anchor.shape)}")
            self.register_buffer(f"anchor_{i}", anchor.detach().clone().to(param), persistent=False)

    def forward(self, batch: DistillBatch | None = None) -> dict[str, torch.Tensor]:
        device = next(iter(self._params + self._head), torch.zeros(())).device
        start = torch.zeros((), device=device)
        backbone = sum(((p - getattr(self, f"anchor_{i}")).pow(2).sum() for i, p in enumerate(self._params)), start)
        head = sum((p.pow(2).sum() for p in self._head), start)
        return {"l2sp": self.alpha / 2 * backbone + self.beta / 2 * head}


LOSSES.register("delta", description="DELTA (Li et al. ICLR 2019) channel-weighted feature distance to the source net; knobs: weight")(DeltaLoss)
LOSSES.register(
    "afd", description="AFD (Wang et al. ICLR 2020, AFDS) attention-weighted feature distance to the source net; knobs: weight, entropy_weight"
)(AFDLoss)


class Objective(nn.Module):
    """`total = base + sum_t term.weight * parts[term.part]` over the non-kd terms.

    base = KDLoss's own total `(1-alpha) CE + alpha T^2 KL` when a KDLoss is among the terms, else plain
    CE. Parts returned: `ce` (always: plain CE of batch.logits vs labels), `kd` if present, every other
    term's parts (diagnostics such as `afd_entropy` are logged but not added), and `total`. Each term's
    `weight` is its own knob (source_kd/delta/afd) or 1 (l2sp). `.parameters()` are only the terms'
    own trainable parameters (AFD attention), never the student's. `class_weights` (C,) weights the
    CE, also inside the kd base: `(1-alpha) * weighted CE + alpha * kd` (the KL stays unweighted).
    """

    def __init__(self, *, terms: Mapping[str, nn.Module], class_weights: torch.Tensor | None = None) -> None:
        super().__init__()
        if sum(isinstance(t, KDLoss) for t in terms.values()) > 1:
            raise ValueError("an Objective takes at most one KDLoss")
        self.terms = nn.ModuleDict(dict(terms))
        self.register_buffer("class_weights", None if class_weights is None else class_weights.detach().float(), persistent=False)

    def needs(self) -> set[str]:
        """The DistillBatch fields (besides logits and labels) the terms read."""
        return set().union(*(t.batch_fields for t in self.terms.values()))

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        weights = None if self.class_weights is None else self.class_weights.to(batch.logits)
        ce = F.cross_entropy(batch.logits, batch.labels, weight=weights)
        parts: dict[str, torch.Tensor] = {"ce": ce}
        base, added = ce, []
        for term in self.terms.values():
            if isinstance(term, KDLoss):
                kd = _soft_kl(batch.logits, _required(batch, "teacher_logits", "kd"), term.temperature)
                parts["kd"], base = kd, (1.0 - term.alpha) * ce + term.alpha * kd  # == KDLoss total if unweighted
                continue
            term_parts = term(batch)
            clash = (set(term_parts) & set(parts)) | ({"total"} & set(term_parts))
            if clash:
                raise ValueError(f"loss parts {sorted(clash)} are produced twice")
            parts.update(term_parts)
            added.append(term.weight * term_parts[term.part])
        parts["total"] = base + sum(added) if added else base
        return parts


def _knobs(cls: type[nn.Module]) -> set[str]:
    signature = inspect.signature(cls.__init__)
    return {n for n, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY} - set(cls.context)


def build_term(name: str, knobs: Mapping[str, float], **context: object) -> nn.Module:
    """One term of `LOSSES` from its knobs and the context it needs (see `build_objective`)."""
    cls = LOSSES.get(name)
    missing = sorted(k for k in cls.context if context.get(k) is None)
    if missing:
        raise ValueError(f"loss {name!r} needs {', '.join(missing)} passed to build_objective")
    unknown = sorted(set(knobs) - _knobs(cls))
    if unknown:
        raise ValueError(f"loss {name!r}: unknown knobs {unknown}; valid: {', '.join(sorted(_knobs(cls)))}")
    return cls(**dict(knobs), **{k: context[k] for k in cls.context})


def build_objective(
    spec: Mapping[str, Mapping[str, float]],
    *,
    class_weights: torch.Tensor | None = None,
    built: Mapping[str, nn.Module] | None = None,
    **context: object,
) -> Objective:
    """Build an Objective from `{term name: {knob: value}}`, e.g. `{"kd": {"alpha": 0.5, "temperature": 4}}`.

    `context` holds the non-knob objects the terms need (`context_needs(name)`: pairs/head_params for
    l2sp, channel_weights for delta, channels for afd); a None value counts as missing. Unknown term
    names raise KeyError listing the valid ones; missing context or unknown knobs raise ValueError.
    An empty spec gives plain cross-entropy; `class_weights` goes to `Objective`. Context a term does
    not need is ignored, so the trial may pass one context for every spec. `built`: terms built
    earlier (`build_term`) to use as they are, e.g. AFD's attention, trained across pruning rounds.
    """
    built = built or {}
    terms = {name: built[name] if name in built else build_term(name, knobs, **context) for name, knobs in spec.items()}
    return Objective(terms=terms, class_weights=class_weights)


def needs(name: str) -> set[str]:
    """DistillBatch fields (besides logits and labels) that term `name` reads; KeyError if unknown."""
    return set(LOSSES.get(name).batch_fields)


def context_needs(name: str) -> set[str]:
    """Keyword arguments of `build_objective` that term `name` needs; KeyError if unknown."""
    return set(LOSSES.get(name).context)
