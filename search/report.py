"""What a user reads: the front, the trials and a verification as tables, the front as CSV/JSON (plots: search.plots)."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from search._helpers import format_count
from search.tracking import INTERRUPTED_TAG, STOPPED_TAG, RunRecord

if TYPE_CHECKING:
    from search.verify import VerifiedMember

__all__ = ["FrontRow", "front_rows", "front_table", "front_csv", "front_json", "RUN_COLUMNS", "STATUS_NAMES", "run_columns", "run_rows", "runs_table", "verify_table"]

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
                trial=run.trial_id,
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
    return _text_table(header, lines)


def _text_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns under a dashed rule."""
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


# Every column `runs` can sort by; val_bal / test_bal (balanced accuracy) are shown when it is the objective.
# The latency columns (CPU ms per batch, measured for front members only: search.latency) show batch 1;
# batch 32 is in --json and --sort.
_LATENCY_COLUMNS = {"torch_b1_ms": "latency_ms_torch_b1", "onnx_b1_ms": "latency_ms_onnx_b1", "torch_b32_ms": "latency_ms_torch_b32", "onnx_b32_ms": "latency_ms_onnx_b32"}
RUN_COLUMNS = ("trial", "status", "from", "target", "val", "test", "val_bal", "test_bal", "proxy", "macs", "x_teacher", "params", *_LATENCY_COLUMNS, "front")
STATUS_NAMES = {"FINISHED": "finished", "KILLED": "stopped", "FAILED": "failed", "RUNNING": "running"}


def run_rows(trials: Sequence[RunRecord], *, front: Sequence[RunRecord]) -> list[dict]:
    """One row per trial run, any status: `RUN_COLUMNS`, plus every knob and metric under `knobs`/`metrics`."""
    members = {r.run_id for r in front}
    rows = []
    for run in trials:
        m = run.metrics
        status = STATUS_NAMES.get(run.status, run.status.lower())
        if run.status == "KILLED" and STOPPED_TAG not in run.tags:
            status = "interrupted" if INTERRUPTED_TAG in run.tags else "killed"  # by a signal, or ended by the driver
        rows.append(
            {
                "trial": run.trial_id,
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

    return _text_table([column.replace("_", " ") for column in columns], [[cell(column, row[column]) for column in columns] for row in rows])


def verify_table(members: Sequence[VerifiedMember], *, metric: str = "accuracy") -> str:
    """`verify`'s result: per front member its seeds, val / test `metric` mean +- sd, MACs, its rank
    on one seed -> on the mean (starred when it changed) and whether it stays on the front."""
    label = _LABELS[metric]
    header = ("trial", "seeds", f"val {label}", f"test {label}", "MACs", "rank", "on front")

    def spread(m: VerifiedMember, split: str) -> str:
        return f"{m.run.metrics[f'{split}_{metric}']:.3f} +- {m.sd.get(f'{split}_{metric}', 0.0):.3f}"

    lines = [
        (
            m.run.trial_id,
            str(m.seeds),
            spread(m, "val"),
            spread(m, "test"),
            format_count(m.run.metrics["macs"]),
            f"{m.rank} -> {m.verified_rank}" + (" *" if m.rank != m.verified_rank else ""),
            "yes" if m.on_front else "no",
        )
        for m in members
    ]
    return _text_table(header, lines)
