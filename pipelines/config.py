"""Frozen configs for one pipeline run; `search.space` fills them from the space YAML."""
from __future__ import annotations

from typing import Literal
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataConfig:
    path: str  # ImageFolder root: one sub-folder of images per class
    image_size: int = 64  # small inputs keep CPU trials fast; transfer still clearly helps at 64 px
    val_fraction: float = 0.15  # per class; the search scores trials on val
    test_fraction: float = 0.30  # per class; never seen by the search, reported for the front
    max_images_per_class: int | None = None  # a cap for quick runs (the quickstart uses 350); None: every image
    seed: int = 0  # fixes the split: every trial and the teacher see the same images
    on_bad_file: Literal["skip", "error"] = "skip"  # unreadable files: skipped and listed, or stop the search


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobilenet_v2"  # any torchvision classification model with a final nn.Linear
    weights: str | None = "IMAGENET1K_V1"  # torchvision weights enum member; None = random init


@dataclass(frozen=True)
class TrainConfig:
    """What every fine-tune shares: the teacher's (`TeacherConfig`) and each trial's (`FinetuneConfig`)."""

    epochs: int = 3  # fine-tune length dominates accuracy at low budgets; 3 keeps a trial ~1 min on CPU
    batch_size: int = 32
    lr: float = 1e-3  # AdamW; SGD is very lr-sensitive on small targets
    weight_decay: float = 0.05
    bn_recalibration_batches: int = 10  # EagleEye: re-estimate BN statistics before scoring a pruned net
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (about 2x the throughput of fp32); no effect on the CPU


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """A trial's fine-tune (the space's `trial:`)."""

    # flip trains each step on the image or its mirror, crop_flip on a random-resized crop of it,
    # then flipped. none: at 0.1x MACs in 3 epochs flip lost 2-3 points, crop_flip 13-21 (README).
    augment: Literal["none", "flip", "crop_flip"] = "none"
    # Where the KD targets come from: stored (the teacher's logits of each train image, and of its
    # mirror, computed once) or online (the teacher run on every augmented batch: any augment, at
    # one teacher forward pass per step, 1.2-1.7x a flip trial's time on a CPU). crop_flip needs online.
    teacher_logits: Literal["stored", "online"] = "stored"


@dataclass(frozen=True)
class TeacherConfig(TrainConfig):
    """The dense teacher's fine-tune: every trial's ceiling. Defaults measured on Animal-MNIST,
    Fashion-MNIST and a 200/60/20 Fashion-MNIST subset (README, "Teacher and trial recipes")."""

    epochs: int = 8  # 8 AdamW epochs reach ~98% on the embedded task
    augment: Literal["none", "flip", "crop_flip"] = "flip"  # crop_flip (random-resized crop, then flip) lost 2-4 points at 64 px
    warmup_epochs: int = 0  # linear lr warm-up epochs before the cosine; 1 measured no better (within a point)
    # 0: 0.1 measured no better, and teachers trained with smoothing distil worse (Mueller et al. 2019)
    label_smoothing: float = 0.0
    # Which weights are the teacher: last, best (the epoch best on the search's metric on a selection
    # split held out of train, 1 image in 10 per class; val stays the search's), or ema (an
    # exponential moving average of the weights over about the last epoch's steps). last: ema made
    # as good a teacher but a front 0.015 lower on Fashion-MNIST (3 seeds); best lost 3 points
    # (it trains on 10% fewer images).
    keep: Literal["last", "best", "ema"] = "last"
    # Class-weighted cross-entropy (inverse train frequency); auto: on when the largest class has
    # more than twice the train images of the smallest (pipelines.train.CLASS_BALANCE_RATIO).
    # Measured on 200/60/20 (3 seeds): test balanced accuracy +0.15, accuracy -0.06.
    class_balance: Literal["auto", "off"] = "auto"


@dataclass(frozen=True)
class TrialParams:
    """What the search samples for one trial; the defaults are the plain spine (uniform L1, one shot, KD)."""

    budget: dict[str, float] = field(default_factory=dict)  # knobs of the parametrisation: group/stage ratios, theta, percentile
    parametrisation: str = "group"  # pipelines.budgets.BUDGETS
    criterion: str = "l1"  # pipelines.importance.CRITERIA
    schedule: str = "one_shot"  # pipelines.schedules.SCHEDULES
    rounds: int = 3  # iterative / priority schedules: prune -> fine-tune rounds
    max_drop: float = 0.02  # iterative / priority: stop when val accuracy falls this far below the best round
    bn_sparsity: float = 0.0  # network slimming: L1 weight on BN scales during one epoch before the cut; 0 = off
    lr: float = 1e-3
    losses: dict[str, dict[str, float]] = field(default_factory=lambda: {"kd": {"alpha": 0.5, "temperature": 4.0}})
    densities: dict[str, float] = field(default_factory=dict)  # stage -> dynamic-gating density; empty = no gating
    # Epochs stepping the density down from 1 to its target. 0: the target from the start, because
    # the predictors are fitted at d = 1, not trained there (measured best at 3 epochs: README).
    density_warmup: int = 0
    class_weighted: bool = False  # TASCNet: cross-entropy weighted by inverse class frequency
    min_channels: int = 0  # groups with at most this many channels are never pruned (TASCNet: 128)
