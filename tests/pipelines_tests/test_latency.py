"""CPU latency in torch and onnxruntime: positive, recorded with its threads, ordered as the models' size.

No timed thresholds: the only timing assertion is the ordering of two models ~100x apart in MACs,
which a busy 2-core machine cannot swap.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pipelines.latency import BATCHES, REPEATS, RUNTIMES, THREADS, WARMUP, Latency, measure_latency, metric_name

KEYS = list(itertools.product(RUNTIMES, BATCHES))


def tiny_cnn() -> nn.Module:
    """Two 4-channel convolutions: ~0.1M MACs at 32 px, against ~6M for a dense MobileNetV2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()


def test_latency_is_positive_for_both_runtimes_and_batches_and_records_its_settings() -> None:
    torch.set_num_threads(2)  # the conftest's 1; measuring must set its own and give this back
    latency = measure_latency(tiny_cnn(), image_size=32)
    assert torch.get_num_threads() == 2
    assert latency.failures == {}
    assert [(t.runtime, t.batch) for t in latency.timings] == KEYS
    assert all(0 < t.median_ms <= t.p90_ms for t in latency.timings)
    assert (latency.threads, latency.warmup, latency.repeats) == (THREADS, WARMUP, REPEATS) == (1, 2, 9)
    assert latency.cpu and "cores" in latency.cpu
    assert set(latency.metrics()) == {
        "latency_ms_torch_b1", "latency_ms_torch_b32", "latency_ms_onnx_b1", "latency_ms_onnx_b32",
        "latency_ms_torch_b1_p90", "latency_ms_torch_b32_p90", "latency_ms_onnx_b1_p90", "latency_ms_onnx_b32_p90",
    }  # fmt: skip
    assert latency.metrics()[metric_name("onnxruntime", 32)] == latency.get("onnxruntime", 32).median_ms


def test_latency_ordering_of_very_different_models_is_the_same_in_two_measurements() -> None:
    torch.manual_seed(0)
    big, small = torchvision.models.mobilenet_v2(num_classes=10).eval(), tiny_cnn()
    measurements: list[dict[str, Latency]] = []
    for _ in range(2):  # interleaved, so that a slow spell of the machine hits both models
        measurements.append({name: measure_latency(model, image_size=32) for name, model in (("big", big), ("small", small))})
    orders = [
        {key: latency["big"].get(*key).median_ms > latency["small"].get(*key).median_ms for key in KEYS} for latency in measurements
    ]
    assert orders[0] == orders[1] == {key: True for key in KEYS}


def test_a_runtime_that_fails_is_recorded_and_the_other_still_measured(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an ONNX file")
    latency = measure_latency(tiny_cnn(), image_size=16, onnx_file=broken, batches=(1,), repeats=3)
    assert [(t.runtime, t.batch) for t in latency.timings] == [("torch", 1)]
    assert set(latency.failures) == {"onnxruntime"} and latency.failures["onnxruntime"].count("\n") == 0
    assert set(latency.metrics()) == {"latency_ms_torch_b1", "latency_ms_torch_b1_p90"}


@pytest.mark.parametrize("bad", [{"runtimes": ("tensorrt",)}, {"repeats": 0}, {"threads": 0}])
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        measure_latency(tiny_cnn(), image_size=16, **bad)
