"""Accuracy, balanced accuracy and the per-class report that `pipelines._fit.finish` exports beside every model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torchvision

import pipelines.metrics
from pipelines.config import DataConfig
from pipelines.data import Split, Splits
from pipelines.export import load_model
from pipelines.metrics import CLASS_REPORT_FILE, PER_CLASS_FILE, split_metrics


def test_a_majority_class_predictor_has_accuracy_073_and_balanced_accuracy_05() -> None:
    labels = torch.tensor([0] * 27 + [1] * 73)
    always_majority = torch.tensor([[0.0, 1.0]]).repeat(100, 1)
    m = split_metrics(always_majority, labels)
    assert m.accuracy == pytest.approx(0.73) and m.balanced_accuracy == pytest.approx(0.5)
    assert m.confusion.tolist() == [[0, 27], [0, 73]]  # rows true, columns predicted
    assert m.support == [27, 73] and m.correct == [0, 73] and m.recall == [0.0, 1.0]


def test_balanced_accuracy_averages_the_recall_of_the_classes_present_only() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1])  # class 2 has no image in this split
    predictions = torch.tensor([0, 0, 0, 2, 1, 0])
    m = split_metrics(torch.nn.functional.one_hot(predictions, 3).float(), labels)
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.balanced_accuracy == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m.recall == [0.75, 0.5, None] and m.confusion.tolist() == [[3, 0, 1], [1, 1, 0], [0, 0, 0]]


def _split(labels: list[int], seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(images=torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=g), labels=torch.tensor(labels))


def test_finish_exports_the_per_class_report_beside_a_model_load_model_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines._fit import finish

    classes = ("cat", "dog", "rare bird")
    splits = Splits(train=_split([0, 1, 2], 0), val=_split([0] * 6 + [1] * 3 + [2], 1), test=_split([0] * 5 + [1] * 5, 2), classes=classes)
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=3).eval()
    passes = []
    real_predict = pipelines.metrics.predict_logits
    monkeypatch.setattr(pipelines.metrics, "predict_logits", lambda *a, **k: passes.append(1) or real_predict(*a, **k))
    metrics = finish(model, splits, data=DataConfig(path="unused", image_size=32), arch="mobilenet_v2", output_dir=tmp_path, extra={}, amp=False)
    assert len(passes) == 2  # one evaluation pass per split
    loaded, spec = load_model(tmp_path)  # the report files do not get in the loader's way
    assert spec["metrics"] == metrics and {"val_accuracy", "val_balanced_accuracy", "test_accuracy", "test_balanced_accuracy"} <= metrics.keys()
    report = json.loads((tmp_path / CLASS_REPORT_FILE).read_text())
    assert report["classes"] == list(classes)
    for name, split in (("val", splits.val), ("test", splits.test)):
        expected = split_metrics(real_predict(loaded, split), split.labels, num_classes=3)
        assert report[name]["confusion_matrix"] == expected.confusion.tolist()
        assert metrics[f"{name}_accuracy"] == report[name]["accuracy"] == pytest.approx(expected.accuracy)
        assert metrics[f"{name}_balanced_accuracy"] == report[name]["balanced_accuracy"] == pytest.approx(expected.balanced_accuracy)
        assert [row["support"] for row in report[name]["per_class"]] == torch.bincount(split.labels, minlength=3).tolist()
    assert report["test"]["per_class"][2] == {"class": "rare bird", "support": 0, "correct": 0, "recall": None}
    rows = list(csv.DictReader((tmp_path / PER_CLASS_FILE).read_text().splitlines()))
    assert [row["class"] for row in rows] == list(classes)
    assert rows[2]["val_support"] == "1" and rows[2]["test_support"] == "0" and rows[2]["test_recall"] == ""
    assert int(rows[0]["val_correct"]) == report["val"]["per_class"][0]["correct"]
