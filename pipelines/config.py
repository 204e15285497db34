"""Frozen configs for one pipeline run; `search.space` fills them from the space YAML."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DataConfig:
    path: str  # ImageFolder root: one sub-folder of images per class
    image_size: int = 64  # small inputs keep CPU trials fast; transfer still clearly helps at 64 px
    val_fraction: float = 0.15  # per class; the search scores trials on val
    test_fraction: float = 0.30  # per class; never seen by the search, reported for the front
    max_images_per_class: int | None = 350  # cap for quick runs; None uses every image
    seed: int = 0  # fixes the split: every trial and the teacher see the same images


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mobilenet_v2"  # any torchvision classification model with a final nn.Linear
    weights: str | None = "IMAGENET1K_V1"  # torchvision weights enum member; None = random init


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3  # fine-tune length dominates accuracy at low budgets; 3 keeps a trial ~1 min on CPU
    batch_size: int = 32
    lr: float = 1e-3  # AdamW; SGD is very lr-sensitive on small targets
    weight_decay: float = 0.05
    bn_recalibration_batches: int = 10  # EagleEye: re-estimate BN statistics before scoring a pruned net
    seed: int = 0


@dataclass(frozen=True)
class TrialParams:
    """What the search samples for one trial."""

    keep_ratios: dict[str, float] = field(default_factory=dict)  # group name -> kept fraction of channels
    lr: float = 1e-3
    kd_alpha: float = 0.5  # weight of the distillation term; 0 = plain cross-entropy
    kd_temperature: float = 4.0
    importance: str = "l1"

