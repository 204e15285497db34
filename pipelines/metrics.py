"""Classification metrics of one split from one evaluation pass: accuracy, balanced accuracy and the
confusion matrix, and the per-class report exported beside every model (teacher and trials).

Balanced accuracy is the mean recall over the classes present in the split (sklearn's
`balanced_accuracy_score`). Accuracy hides a model that mostly answers the majority class: on a
27/73 two-class split, always answering the majority has accuracy 0.73 and balanced accuracy 0.5,
which is chance (1 / classes) whatever the imbalance.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipelines.data import Split
from pipelines.train import predict_logits

__all__ = ["SplitMetrics", "METRICS", "confusion_matrix", "split_metrics", "measure", "write_class_report", "CLASS_REPORT_FILE", "PER_CLASS_FILE"]

METRICS = ("accuracy", "balanced_accuracy")  # what every split reports, as `<split>_<metric>`
CLASS_REPORT_FILE = "class_report.json"  # per-class table and confusion matrix of val and test
PER_CLASS_FILE = "per_class.csv"  # the per-class table alone, one row per class


@dataclass(frozen=True)
class SplitMetrics:
    accuracy: float
    balanced_accuracy: float
    confusion: torch.Tensor  # int64 classes x classes on the CPU: rows the true class, columns the predicted one

    @property
    def support(self) -> list[int]:
        return self.confusion.sum(dim=1).tolist()

    @property
    def correct(self) -> list[int]:
        return self.confusion.diagonal().tolist()

    @property
    def recall(self) -> list[float | None]:
        """Per class; None for a class with no image in the split."""
        return [k / n if n else None for k, n in zip(self.correct, self.support)]

    def values(self, split: str) -> dict[str, float]:
        """`{split}_accuracy` and `{split}_balanced_accuracy`."""
        return {f"{split}_{name}": getattr(self, name) for name in METRICS}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts, rows the true class and columns the predicted one (int64, on the CPU)."""
    index = labels.cpu().long() * num_classes + predictions.cpu().long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def split_metrics(logits: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None) -> SplitMetrics:
    """Top-1 accuracy, balanced accuracy (mean recall over the classes present) and the confusion matrix."""
    confusion = confusion_matrix(logits.argmax(dim=1), labels, num_classes or logits.shape[1])
    support, correct = confusion.sum(dim=1), confusion.diagonal()
    present = support > 0
    total = int(support.sum())
    accuracy = int(correct.sum()) / total if total else float("nan")
    balanced = (correct[present].double() / support[present]).mean().item() if total else float("nan")
    return SplitMetrics(accuracy=accuracy, balanced_accuracy=balanced, confusion=confusion)


def measure(model: nn.Module, split: Split, *, num_classes: int | None = None, amp: bool = False) -> SplitMetrics:
    """One evaluation pass of `model` over `split` (`num_classes`: default, the model's outputs)."""
    return split_metrics(predict_logits(model, split, amp=amp), split.labels, num_classes=num_classes)


def write_class_report(directory: str | Path, classes: tuple[str, ...] | list[str], splits: dict[str, SplitMetrics]) -> None:
    """Write CLASS_REPORT_FILE (per split: accuracy, balanced accuracy, the per-class table and the
    confusion matrix) and PER_CLASS_FILE (class, then support, correct and recall per split) into `directory`."""
    directory = Path(directory)
    report: dict = {"classes": list(classes), "confusion_matrix_axes": "rows: true class, columns: predicted class, both in the order of classes"}
    for name, m in splits.items():
        report[name] = {
            "accuracy": m.accuracy,
            "balanced_accuracy": m.balanced_accuracy,
            "per_class": [
                {"class": c, "support": n, "correct": k, "recall": r} for c, n, k, r in zip(classes, m.support, m.correct, m.recall)
            ],
            "confusion_matrix": m.confusion.tolist(),
        }
    (directory / CLASS_REPORT_FILE).write_text(json.dumps(report, indent=1))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["class", *(f"{name}_{column}" for name in splits for column in ("support", "correct", "recall"))])
    for i, c in enumerate(classes):
        cells = []
        for m in splits.values():
            recall = m.recall[i]
            cells += [m.support[i], m.correct[i], "" if recall is None else f"{recall:.4f}"]
        writer.writerow([c, *cells])
    (directory / PER_CLASS_FILE).write_text(out.getvalue())
