"""Private helpers shared by the search package."""
from __future__ import annotations

import re

__all__ = ["UsageError", "parse_macs", "format_count", "format_accuracies"]


class UsageError(Exception):
    """Bad input from the user: the CLI prints it as one line and exits with code 2."""


_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_macs(text: str) -> float:
    """'12M' -> 12e6; accepts K, M, G suffixes (case-insensitive) and plain numbers like 1.2e7."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise UsageError(f"--max-macs: {text!r} is not a MACs count; write e.g. 12M, 800K, 1.5G or 12000000")
    return float(match.group(1)) * _SUFFIXES[match.group(2).upper()]


def format_count(value: float) -> str:
    """12_345_678 -> '12.35M'."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


def format_accuracies(metrics: dict[str, float], metric: str = "accuracy", *, splits: tuple[str, ...] = ("val", "test")) -> str:
    """'val acc 0.969, test acc 0.958'; with `metric` balanced_accuracy (the search's objective) its
    values lead: 'val bal acc 0.912 (acc 0.950), test bal acc 0.905 (acc 0.940)'. Missing values read nan."""

    def value(split: str, name: str) -> float:
        return float(metrics.get(f"{split}_{name}", float("nan")))

    if metric == "balanced_accuracy":
        return ", ".join(f"{s} bal acc {value(s, metric):.3f} (acc {value(s, 'accuracy'):.3f})" for s in splits)
    return ", ".join(f"{s} acc {value(s, 'accuracy'):.3f}" for s in splits)
