"""Distillation losses: modules whose forward returns a dict of named loss parts.

Every part is logged under its own name, and `total` is what gets back-propagated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipelines._registry import Registry

__all__ = ["LOSSES", "KDLoss"]

LOSSES: Registry[type[nn.Module]] = Registry("distillation loss")


@LOSSES.register("kd", description="Hinton KD from the dense fine-tuned teacher; knobs: alpha, temperature")
class KDLoss(nn.Module):
    """`(1 - alpha) * CE(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))`.

    The T^2 factor keeps the KD gradient's scale independent of the temperature (Hinton et al. 2015).
    """

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
        t = self.temperature
        ce = F.cross_entropy(student_logits, targets)
        kd = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits.detach() / t, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        return {"ce": ce, "kd": kd, "total": (1.0 - self.alpha) * ce + self.alpha * kd}
