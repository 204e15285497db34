"""Pareto selection for two objectives: maximise accuracy, minimise MACs."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Point", "pareto_front", "hypervolume"]


@dataclass(frozen=True)
class Point:
    key: str  # the trial's id
    accuracy: float
    macs: float
    finished: bool = True  # failed or early-stopped trials are never on the front
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _dominates(a: Point, b: Point) -> bool:
    return a.accuracy >= b.accuracy and a.macs <= b.macs and (a.accuracy > b.accuracy or a.macs < b.macs)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The finished points no other finished point dominates, sorted by MACs.

    Exact ties (same accuracy and MACs) do not dominate each other, so all of them stay.
    """
    finished = [p for p in points if p.finished]
    front = [p for p in finished if not any(_dominates(q, p) for q in finished)]
    return sorted(front, key=lambda p: (p.macs, -p.accuracy, p.key))


def hypervolume(front: Sequence[Point], *, reference_macs: float, floor: float = 0.0) -> float:
    """Area dominated by `front` in the box MACs / reference_macs in [0, 1] x accuracy in [floor, 1].

    reference_macs is the dense teacher's, floor the chance accuracy (1 / classes): the limit, the
    teacher's accuracy at zero MACs, is (teacher accuracy - floor). Points above reference_macs or
    below floor add nothing.
    """
    area = 0.0
    # Staircase: between consecutive MACs levels, the best accuracy reachable with at most that many MACs.
    levels = sorted({p.macs for p in front if p.macs <= reference_macs})
    for i, level in enumerate(levels):
        upper = levels[i + 1] if i + 1 < len(levels) else reference_macs
        reachable = max(p.accuracy for p in front if p.macs <= level)
        area += max(0.0, reachable - floor) * (upper - level) / reference_macs
    return area
