"""What a user looks at: the accuracy-vs-MACs front as PNG (matplotlib) or as a self-contained
interactive HTML page (inline SVG; hovering a point shows its trial and knobs), and a per-group
width chart of each front member."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from search._helpers import format_accuracies, format_count
from search.report import STATUS_NAMES, FrontRow, front_rows
from search.tracking import RunRecord

if TYPE_CHECKING:
    from search.front import SearchFront

__all__ = ["plot_front", "plot_front_html", "plot_search_front", "PLOT_SUFFIXES", "plot_widths", "kept_fractions"]


_GREY, _BLUE, _GREEN, _RED = "#a6a6a6", "#1f77b4", "#2ca02c", "#d62728"  # matplotlib's 0.65, C0, C2, C3
PLOT_SUFFIXES = (".html", ".png", ".svg", ".pdf")  # what `plot_search_front` writes: the HTML plot, or matplotlib's


@dataclass(frozen=True)
class _Point:
    macs: float
    value: float  # val_<metric>
    kind: str  # "trial", "anchor" (a uniform anchor trial) or "teacher"
    front: bool
    tooltip: tuple[str, ...]  # the HTML plot's, one line each
    trial: str = ""


@dataclass(frozen=True)
class _FrontFigure:
    """What the PNG and the HTML plot of a front show, drawn by each in its own way."""

    title: str
    xlabel: str
    ylabel: str
    points: list[_Point]  # every finished trial and anchor once, then the teacher (when it has the metric)
    step: list[tuple[float, float]]  # the front's (MACs, val value), by MACs ascending: a staircase
    labels = {"trial": "trials", "anchor": "uniform anchors", "front": "Pareto front", "teacher": "dense teacher"}

    def of(self, kind: str) -> list[_Point]:
        return [p for p in self.points if p.kind == kind]


def _front_figure(
    trials: Sequence[RunRecord], front: Sequence[FrontRow], *, teacher: dict[str, float], anchors: Sequence[RunRecord], title: str, metric: str
) -> _FrontFigure:
    key = f"val_{metric}"
    members = {r.run_id for r in front}
    anchor_ids = {r.run_id for r in anchors}
    runs = {r.run_id: r for r in [*trials, *anchors]}  # each run once, trials first
    teacher_macs = teacher.get("macs")

    def tooltip(run: RunRecord) -> tuple[str, ...]:
        m = run.metrics
        role = ("on the Pareto front" if run.run_id in members else "off the front") + (", uniform anchor" if run.run_id in anchor_ids else "")
        ratio = m.get("macs_ratio", m["macs"] / teacher_macs if teacher_macs else math.nan)
        return (
            f"trial {run.trial_id}: {STATUS_NAMES.get(run.status, run.status.lower())}, {role}",
            format_accuracies(m, metric),
            f"MACs {format_count(m['macs'])} ({ratio:.3f} x teacher)",
            f"params {format_count(m['params'])}",
            *(f"{name} = {value}" for name, value in sorted(run.params.items())),
        )

    points = [
        _Point(r.metrics["macs"], r.metrics[key], "anchor" if r.run_id in anchor_ids else "trial", r.run_id in members, tooltip(r), r.trial_id)
        for r in runs.values()
    ]
    if key in teacher:
        lines = ("dense teacher", format_accuracies(teacher, metric), f"MACs {format_count(teacher['macs'])}", f"params {format_count(teacher.get('params', math.nan))}")
        points.append(_Point(teacher["macs"], teacher[key], "teacher", False, lines))
    return _FrontFigure(
        title=title,
        xlabel="MACs per image (millions, log scale)",  # fronts span two decades of MACs; the low end is where they differ
        ylabel="val balanced accuracy (mean per-class recall)" if metric == "balanced_accuracy" else "val accuracy (top-1)",
        points=points,
        step=sorted((r.macs, getattr(r, key)) for r in front),
    )


def _front_plot(draw: Callable[[_FrontFigure, Path], None]) -> Callable[..., Path]:
    """`draw(figure, path)` as a plot made from the runs: called as NAME(trials, front, *, teacher,
    anchors=(), title, path, metric="accuracy"), with every finished trial, the front's rows, the
    teacher's metrics, the uniform anchor trials, the title, the file and the search's metric."""

    def plot(
        trials: Sequence[RunRecord],
        front: Sequence[FrontRow],
        *,
        teacher: dict[str, float],
        anchors: Sequence[RunRecord] = (),
        title: str,
        path: Path,
        metric: str = "accuracy",
    ) -> Path:
        draw(_front_figure(trials, front, teacher=teacher, anchors=anchors, title=title, metric=metric), path)
        return path

    plot.__name__ = plot.__qualname__ = draw.__name__
    plot.__doc__ = draw.__doc__
    return plot


@_front_plot
def plot_front(figure: _FrontFigure, path: Path) -> None:
    """Val `metric` (accuracy or balanced accuracy) vs MACs: every finished trial, the uniform
    anchors, the front as a staircase, the dense teacher as a star; any format matplotlib writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in figure.points if p.kind != "teacher"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter([p.macs / 1e6 for p in shown], [p.value for p in shown], s=18, color=_GREY, label=figure.labels["trial"])
    if figure.of("anchor"):
        anchored = figure.of("anchor")
        ax.scatter([p.macs / 1e6 for p in anchored], [p.value for p in anchored], s=36, marker="s", facecolors="none", edgecolors=_GREEN, label=figure.labels["anchor"])
    ax.step([x / 1e6 for x, _ in figure.step], [y for _, y in figure.step], where="post", color=_BLUE, marker="o", label=figure.labels["front"])
    for p in figure.of("teacher"):
        ax.scatter([p.macs / 1e6], [p.value], marker="*", s=140, color=_RED, label=figure.labels["teacher"])
    ax.set_xscale("log")
    ax.set_xlabel(figure.xlabel)
    ax.set_ylabel(figure.ylabel)
    ax.set_title(figure.title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis over [lo, hi]: decades, else 1-2-5, else every digit, else the two ends."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for mantissas in ((1,), (1, 2, 5), range(1, 10)):
        ticks = [m * 10.0**e for e in decades for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3:
            return ticks
    return ticks if len(ticks) >= 2 else [lo, hi]


def _linear_ticks(lo: float, hi: float) -> list[float]:
    step = next((s for s in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5) if (hi - lo) / s <= 8), 1.0)
    first = math.ceil(lo / step - 1e-9)
    return [i * step for i in range(first, math.floor(hi / step + 1e-9) + 1)]


def _svg_marker(p: _Point) -> str:
    if p.kind == "teacher":
        corners = [(9 * (1 if i % 2 == 0 else 0.4) * math.sin(i * math.pi / 5), -9 * (1 if i % 2 == 0 else 0.4) * math.cos(i * math.pi / 5)) for i in range(10)]
        return f'<polygon points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in corners)}" fill="{_RED}"/>'
    fill = _BLUE if p.front else _GREY
    if p.kind == "anchor":
        return f'<rect x="-4.5" y="-4.5" width="9" height="9" fill="{fill}" fill-opacity="{0.9 if p.front else 0}" stroke="{_GREEN}" stroke-width="1.6"/>'
    return f'<circle r="{4.5 if p.front else 3.5}" fill="{fill}"/>'


@_front_plot
def plot_front_html(figure: _FrontFigure, path: Path) -> None:
    """`plot_front` as one self-contained HTML file (inline SVG, no script, nothing fetched): hovering
    a point shows its trial, status and front membership, val / test `metric`, MACs, params and knobs.
    Each point is a `<g class="point KIND [front]" data-trial=ID>` holding its `<title>`."""
    from html import escape

    points = [p for p in figure.points if p.macs > 0]  # a log axis has no place for 0
    width, height, left, right, top, bottom = 720, 460, 72, 20, 40, 58
    logs = [math.log10(p.macs) for p in points] or [6.0]
    values = [p.value for p in points] or [0.5]
    x_pad = max(0.05 * (max(logs) - min(logs)), 0.1)
    y_pad = max(0.05 * (max(values) - min(values)), 0.02)
    x_lo, x_hi, y_lo, y_hi = min(logs) - x_pad, max(logs) + x_pad, min(values) - y_pad, max(values) + y_pad

    def x(macs: float) -> float:
        return left + (math.log10(macs) - x_lo) / (x_hi - x_lo) * (width - left - right)

    def y(value: float) -> float:
        return height - bottom - (value - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(figure.title)}</text>',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" stroke="#333"/>',
    ]
    for tick in _log_ticks(10**x_lo, 10**x_hi):
        out.append(f'<line class="grid" x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{height - bottom}"/>')
        out.append(f'<text x="{x(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">{tick / 1e6:g}</text>')
    for tick in _linear_ticks(y_lo, y_hi):
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>')
        out.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 14}" text-anchor="middle">{escape(figure.xlabel)}</text>')
    out.append(f'<text transform="translate(18 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">{escape(figure.ylabel)}</text>')
    if figure.step:
        corners = [figure.step[0]] + [c for (x0, y0), (x1, y1) in zip(figure.step, figure.step[1:]) for c in ((x1, y0), (x1, y1))]
        out.append(f'<polyline class="front-line" points="{" ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in corners)}" fill="none" stroke="{_BLUE}" stroke-width="1.5"/>')
    for p in sorted(points, key=lambda p: (p.kind == "teacher", p.front)):  # the front and the teacher on top
        classes = " ".join(["point", p.kind, *(["front"] if p.front else [])])
        tip = escape("\n".join(p.tooltip))
        out.append(
            f'<g class="{classes}" data-trial="{escape(p.trial)}" data-front="{str(p.front).lower()}" transform="translate({x(p.macs):.1f} {y(p.value):.1f})">'
            f"<title>{tip}</title>{_svg_marker(p)}</g>"
        )
    legend = [(figure.labels["trial"], _Point(0, 0, "trial", False, ()))]
    legend += [(figure.labels["anchor"], _Point(0, 0, "anchor", False, ()))] if figure.of("anchor") else []
    legend += [(figure.labels["front"], _Point(0, 0, "trial", True, ()))]
    legend += [(figure.labels["teacher"], _Point(0, 0, "teacher", False, ()))] if figure.of("teacher") else []
    box_top = height - bottom - 10 - 20 * len(legend)
    out.append(f'<rect x="{width - right - 150}" y="{box_top - 6}" width="140" height="{20 * len(legend) + 4}" fill="white" stroke="#bbb"/>')
    for i, (label, sample) in enumerate(legend):
        row = box_top + 20 * i + 8
        out.append(f'<g class="legend" transform="translate({width - right - 135} {row})">{_svg_marker(sample)}</g>')
        out.append(f'<text x="{width - right - 120}" y="{row + 4}">{escape(label)}</text>')
    out.append("</svg>")
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(figure.title)}</title>\n'
        "<style>body{font-family:sans-serif;margin:1em} .grid{stroke:#ddd} .point *{pointer-events:all}"
        " .point:hover *{stroke:#000;stroke-width:2} p{color:#555;font-size:13px}</style>\n</head>\n<body>\n"
        + "\n".join(out)
        + "\n<p>Hover a point for its trial, accuracies, MACs, params and knobs.</p>\n</body>\n</html>\n"
    )
    path.write_text(page, encoding="utf-8")


def plot_search_front(front: SearchFront, *, name: str, path: Path) -> Path:
    """The plot of a search's front that `path`'s suffix names (one of PLOT_SUFFIXES): `.html` the
    interactive one, any other matplotlib's."""
    plot = plot_front_html if path.suffix.lower() == ".html" else plot_front
    return plot(
        front.finished,
        front_rows(front.front),
        teacher=front.teacher.metrics if front.teacher is not None else {},
        anchors=front.anchors,
        title=f"{name}: {front.metric.replace('_', ' ')} vs MACs",
        path=path,
        metric=front.metric,
    )


def _network_order(group: str) -> tuple:
    """Module paths with their numbers compared as numbers: features.2 before features.10."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in group.split("."))


def kept_fractions(run: RunRecord) -> dict[str, float]:
    """The run's `kept.<group>` metrics (the fraction of each group's channels it kept) by group, in
    network order (their module paths, numbers as numbers: definition order for torchvision's CNNs);
    empty for a run without them (not finished, or from before they were logged)."""
    kept = {k.removeprefix("kept."): v for k, v in run.metrics.items() if k.startswith("kept.")}
    return {group: kept[group] for group in sorted(kept, key=_network_order)}


def plot_widths(run: RunRecord, *, path: Path) -> Path:
    """A bar per prunable group, top to bottom in network order: the fraction of its channels the
    trial kept. A run without `kept.<group>` metrics is a ValueError (check `kept_fractions` first)."""
    kept = kept_fractions(run)
    if not kept:
        raise ValueError(f"trial {run.trial_id} (MLflow run {run.run_id}) has no kept.<group> metrics to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.22 * len(kept)), dpi=110)
    rows = range(len(kept))
    ax.barh(rows, list(kept.values()), color=_BLUE)
    for row, fraction in zip(rows, kept.values()):
        ax.text(min(fraction, 1.0) + 0.01, row, f"{fraction:.2f}", va="center", fontsize=7)
    ax.set_yticks(list(rows), list(kept), fontsize=7)
    ax.invert_yaxis()  # the input side on top
    ax.set_xlim(0, 1.1)
    ax.axvline(1.0, color="0.6", linewidth=0.8)
    ax.set_xlabel("fraction of the group's channels kept")
    ratio = run.metrics.get("macs_ratio", math.nan)
    ax.set_title(f"trial {run.trial_id}: {ratio:.3f} x teacher MACs ({format_count(run.metrics.get('macs', math.nan))})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
