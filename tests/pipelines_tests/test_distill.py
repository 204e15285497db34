from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines._registry import Registry
from pipelines.distill import LOSSES, KDLoss


def logits(seed: int, n: int = 6, c: int = 5, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


TARGETS = torch.tensor([0, 1, 2, 3, 4, 0])


def test_returns_ce_kd_total() -> None:
    parts = KDLoss(alpha=0.5, temperature=2.0)(logits(0), logits(1), TARGETS)
    assert set(parts) == {"ce", "kd", "total"}
    assert all(p.dim() == 0 for p in parts.values())


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.7, 1.0])
def test_total_is_weighted_sum(alpha: float) -> None:
    parts = KDLoss(alpha=alpha, temperature=3.0)(logits(0), logits(1), TARGETS)
    expected = (1 - alpha) * parts["ce"].item() + alpha * parts["kd"].item()
    assert parts["total"].item() == pytest.approx(expected, rel=1e-12)
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(logits(0), TARGETS).item(), rel=1e-12)


def test_kd_is_zero_when_student_matches_teacher() -> None:
    s = logits(0)
    parts = KDLoss(alpha=0.5, temperature=4.0)(s, s.clone(), TARGETS)
    assert abs(parts["kd"].item()) < 1e-10
    assert parts["ce"].item() > 0.1


@pytest.mark.parametrize("seed", range(5))
def test_kd_is_non_negative_and_positive_for_different_logits(seed: int) -> None:
    kd = KDLoss(alpha=0.5, temperature=2.0)(logits(seed), logits(seed + 100), TARGETS)["kd"]
    assert kd.item() > 0


def test_alpha_zero_is_plain_cross_entropy() -> None:
    s, t = logits(2).float(), logits(3).float()
    parts = KDLoss(alpha=0.0, temperature=4.0)(s, t, TARGETS)
    assert torch.equal(parts["total"], F.cross_entropy(s, TARGETS))


def test_gradient_reaches_student_not_teacher() -> None:
    student = logits(0).requires_grad_(True)
    teacher = logits(1).requires_grad_(True)
    KDLoss(alpha=0.6, temperature=2.0)(student, teacher, TARGETS)["total"].backward()
    assert student.grad is not None
    assert student.grad.abs().sum().item() > 0
    assert teacher.grad is None


def test_alpha_one_gradient_is_pure_kd() -> None:
    # With alpha=1 the labels must not matter.
    student, teacher = logits(4), logits(5)
    loss = KDLoss(alpha=1.0, temperature=2.0)
    a = loss(student, teacher, TARGETS)["total"]
    b = loss(student, teacher, torch.zeros_like(TARGETS))["total"]
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize(("alpha", "temperature"), [(1.5, 4.0), (-0.1, 4.0), (0.5, 0.0), (0.5, -1.0)])
def test_invalid_knobs_raise(alpha: float, temperature: float) -> None:
    with pytest.raises(ValueError):
        KDLoss(alpha=alpha, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 7.5])
def test_kd_is_t_squared_times_kl_of_softened_distributions(temperature: float) -> None:
    s, t = logits(6), logits(7)
    p_teacher = torch.softmax(t / temperature, dim=1)
    p_student = torch.softmax(s / temperature, dim=1)
    kl_per_row = (p_teacher * (p_teacher.log() - p_student.log())).sum(dim=1)
    expected = temperature**2 * kl_per_row.mean().item()
    kd = KDLoss(alpha=0.5, temperature=temperature)(s, t, TARGETS)["kd"].item()
    assert kd == pytest.approx(expected, rel=1e-9)


def test_registry_holds_kd() -> None:
    assert LOSSES.get("kd") is KDLoss
    assert "kd" in LOSSES
    assert "kd" in LOSSES.names()


def test_registering_kd_again_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        LOSSES.register("kd")(KDLoss)
    assert LOSSES.get("kd") is KDLoss


def test_fresh_registry_duplicate_and_unknown() -> None:
    registry: Registry[type] = Registry("thing")
    registry.register("a", description="first")(int)
    with pytest.raises(ValueError):
        registry.register("a")(float)
    assert registry.get("a") is int
    assert registry.describe() == {"a": "first"}
    with pytest.raises(KeyError, match="valid: a"):
        registry.get("b")
