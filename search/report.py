"""What a user reads: the front as a table, CSV/JSON, and an accuracy-vs-MACs plot."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from search._helpers import format_count
from search.tracking import INTERRUPTED_TAG, STOPPED_TAG, RunRecord

__all__ = ["FrontRow", "front_rows", "front_table", "front_csv", "front_json", "plot_front", "RUN_COLUMNS", "run_columns", "run_rows", "runs_table"]

_LABELS = {"accuracy": "acc", "balanced_accuracy": "bal acc"}  # column labels of `search.metric`'s values


@dataclass(frozen=True)
class FrontRow:
    trial: str
    run_id: str
    val_accuracy: float
    test_accuracy: float
    val_balanced_accuracy: float  # NaN in searches made before it was logged
    test_balanced_accuracy: float
    macs: float
    macs_ratio: float
    params: float
    keep_min: float
    keep_mean: float
    keep_max: float


def front_rows(runs: Sequence[RunRecord]) -> list[FrontRow]:
    rows = []
    for run in runs:
        m = run.metrics
        rows.append(
            FrontRow(
                trial=run.tags.get("slimtune.trial_id", run.name),
                run_id=run.run_id,
                val_accuracy=m["val_accuracy"],
                test_accuracy=m["test_accuracy"],
                val_balanced_accuracy=m.get("val_balanced_accuracy", math.nan),
                test_balanced_accuracy=m.get("test_balanced_accuracy", math.nan),
                macs=m["macs"],
                macs_ratio=m.get("macs_ratio", 1.0),
                params=m["params"],
                keep_min=m.get("keep_min", math.nan),  # absent in searches made before it was logged
                keep_mean=m.get("keep_mean", math.nan),
                keep_max=m.get("keep_max", math.nan),
            )
        )
    return sorted(rows, key=lambda r: r.macs)


def _accuracy_columns(metric: str) -> list[str]:
    """The FrontRow fields shown: the objective's val and test values first, then plain accuracy's."""
    shown = [metric, "accuracy"] if metric != "accuracy" else ["accuracy"]
    return [f"{split}_{name}" for name in shown for split in ("val", "test")]


def front_table(rows: Sequence[FrontRow], *, metric: str = "accuracy") -> str:
    """The front; with `metric` balanced_accuracy its val/test columns come first, then accuracy's."""
    columns = _accuracy_columns(metric)
    labels = [f"{c.split('_', 1)[0]} {_LABELS[c.split('_', 1)[1]]}" for c in columns]
    header = ("trial", *labels, "MACs", "x teacher", "params", "keep min/mean/max")
    lines = [
        (
            r.trial,
            *(f"{getattr(r, c):.3f}" for c in columns),
            format_count(r.macs),
            f"{r.macs_ratio:.3f}",
            format_count(r.params),
            f"{r.keep_min:.2f}/{r.keep_mean:.2f}/{r.keep_max:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*line) for line in lines)])


def front_csv(rows: Sequence[FrontRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(FrontRow.__dataclass_fields__))
    writer.writeheader()
    for row in rows:
        writer.writerow(row.__dict__)
    return out.getvalue()


def front_json(rows: Sequence[FrontRow]) -> str:
    return json.dumps([row.__dict__ for row in rows], indent=1)


def plot_front(
    trials: Sequence[RunRecord],
    front: Sequence[FrontRow],
    *,
    teacher: dict[str, float],
    anchors: Sequence[RunRecord] = (),
    title: str,
    path: Path,
    metric: str = "accuracy",
) -> Path:
    """Val `metric` (accuracy or balanced accuracy) vs MACs: every finished trial, the uniform
    anchors, the front as a staircase, the dense teacher as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"val_{metric}"
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter(
        [t.metrics["macs"] / 1e6 for t in trials],
        [t.metrics[key] for t in trials],
        s=18,
        color="0.65",
        label="trials",
    )
    if anchors:
        ax.scatter(
            [t.metrics["macs"] / 1e6 for t in anchors],
            [t.metrics[key] for t in anchors],
            s=36,
            marker="s",
            facecolors="none",
            edgecolors="C2",
            label="uniform anchors",
        )
    ax.step([r.macs / 1e6 for r in front], [getattr(r, key) for r in front], where="post", color="C0", marker="o", label="Pareto front")
    if key in teacher:
        ax.scatter([teacher["macs"] / 1e6], [teacher[key]], marker="*", s=140, color="C3", label="dense teacher")
    ax.set_xscale("log")  # fronts span two decades of MACs; the low end is where they differ
    ax.set_xlabel("MACs per image (millions, log scale)")
    ax.set_ylabel("val balanced accuracy (mean per-class recall)" if metric == "balanced_accuracy" else "val accuracy (top-1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# Every column `runs` can sort by; val_bal / test_bal (balanced accuracy) are shown when it is the objective.
# The latency columns (CPU ms per batch, measured for front members only: search.latency) show batch 1;
# batch 32 is in --json and --sort.
_LATENCY_COLUMNS = {"torch_b1_ms": "latency_ms_torch_b1", "onnx_b1_ms": "latency_ms_onnx_b1", "torch_b32_ms": "latency_ms_torch_b32", "onnx_b32_ms": "latency_ms_onnx_b32"}
RUN_COLUMNS = ("trial", "status", "from", "target", "val", "test", "val_bal", "test_bal", "proxy", "macs", "x_teacher", "params", *_LATENCY_COLUMNS, "front")
_STATUS = {"FINISHED": "finished", "KILLED": "stopped", "FAILED": "failed", "RUNNING": "running"}


def run_rows(trials: Sequence[RunRecord], *, front: Sequence[RunRecord]) -> list[dict]:
    """One row per trial run, any status: `RUN_COLUMNS`, plus every knob and metric under `knobs`/`metrics`."""
    members = {r.run_id for r in front}
    rows = []
    for run in trials:
        m = run.metrics
        status = _STATUS.get(run.status, run.status.lower())
        if run.status == "KILLED" and STOPPED_TAG not in run.tags:
            status = "interrupted" if INTERRUPTED_TAG in run.tags else "killed"  # by a signal, or ended by the driver
        rows.append(
            {
                "trial": run.tags.get("slimtune.trial_id", run.name),
                "status": status,
                "from": run.params.get("start_from", "-"),
                "target": float(run.params["target_macs"]) if "target_macs" in run.params else None,
                "val": m.get("val_accuracy"),
                "test": m.get("test_accuracy"),
                "val_bal": m.get("val_balanced_accuracy"),
                "test_bal": m.get("test_balanced_accuracy"),
                "proxy": m.get("proxy_accuracy"),
                "macs": m.get("macs"),
                "x_teacher": m.get("macs_ratio"),
                "params": m.get("params"),
                **{column: m.get(metric) for column, metric in _LATENCY_COLUMNS.items()},
                "front": run.run_id in members,
                "run_id": run.run_id,
                "knobs": dict(run.params),
                "metrics": dict(m),
                "error": run.tags.get("error"),
            }
        )
    return rows


def run_columns(metric: str = "accuracy") -> tuple[str, ...]:
    """The columns `runs` shows: the balanced-accuracy ones only when `metric` is balanced_accuracy;
    batch-32 latency never (it is in --json and --sort)."""
    hidden = ("torch_b32_ms", "onnx_b32_ms") + (() if metric == "balanced_accuracy" else ("val_bal", "test_bal"))
    return tuple(c for c in RUN_COLUMNS if c not in hidden)


def runs_table(rows: Sequence[dict], *, columns: Sequence[str] = run_columns()) -> str:
    def cell(column: str, value: object) -> str:
        if value is None:
            return "-"
        if column == "front":
            return "yes" if value else ""
        if column in ("macs", "params"):
            return format_count(float(value))
        if column.endswith("_ms"):
            return f"{value:.2f}"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    lines = [[column.replace("_", " ") for column in columns]]
    lines += [[cell(column, row[column]) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*lines[0]), fmt.format(*("-" * w for w in widths)), *(fmt.format(*line) for line in lines[1:])])
