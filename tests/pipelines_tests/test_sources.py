from __future__ import annotations

import pytest
import torch
import torchvision

from pipelines.prune import prune_to_counts
from pipelines.sources import FeatureTap, index_tracer, kept_channels, stage_outputs


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("resnet18", ["bn1", "layer1", "layer2", "layer3", "layer4"]),
        ("mobilenet_v2", ["features.1", "features.3", "features.6", "features.13", "features"]),
    ],
)
def test_stage_outputs(arch: str, expected: list[str]) -> None:
    assert stage_outputs(torchvision.models.get_model(arch, num_classes=10)) == expected


def test_tracer_follows_pruning_to_the_kept_source_channels() -> None:
    student = torchvision.models.get_model("resnet18", num_classes=10)
    tracer = index_tracer(student)
    # Scores 0..63 on the stem conv: pruning its (residual) group to 48 drops channels 0..15.
    scores = {student.conv1: torch.arange(64, dtype=torch.float32)}
    prune_to_counts(student, {"conv1": 48}, image_size=32, scores=scores, followers=[tracer])
    assert student.layer1[1].bn2.num_features == tracer.layer1[1].bn2.num_features == 48
    assert torch.equal(kept_channels(tracer, "layer1"), torch.arange(16, 64))
    assert torch.equal(kept_channels(tracer, "layer2"), torch.arange(128))  # untouched stage
    # The follower's weights are sliced exactly like the student's.
    assert tracer.conv1.weight.shape == student.conv1.weight.shape


def test_feature_tap_records_input_and_outputs() -> None:
    model = torchvision.models.get_model("resnet18", num_classes=10).eval()
    tap = FeatureTap(model, ["layer1", "layer4"])
    x = torch.randn(2, 3, 32, 32)
    model(x)
    assert tap.input is x
    assert tap.outputs["layer1"].shape == (2, 64, 8, 8) and tap.outputs["layer4"].shape[1] == 512
    tap.remove()
    tap.outputs.clear()
    model(x)
    assert tap.outputs == {}
