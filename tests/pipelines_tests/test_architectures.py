"""The architectures the README lists as tested, at tiny size (random init, 32 px), and the ones
the pre-flight refuses in one line before any teacher is trained."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipelines.config import ModelConfig
from pipelines.export import load_model, save_model
from pipelines.macs import count_macs
from pipelines.models import TESTED_ARCHS, build_model
from pipelines.preflight import ArchitectureError, check_architecture
from pipelines.prune import prunable_groups, prune_to_ratios

SIZE = 32


@pytest.mark.parametrize("arch", TESTED_ARCHS)
def test_a_tested_architecture_prunes_trains_exports_and_counts_its_macs(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, weights=None), num_classes=5)
    prune_to_ratios(model, {g.name: 0.5 for g in prunable_groups(model, image_size=SIZE)}, image_size=SIZE)
    images = torch.randn(4, 3, SIZE, SIZE)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    model.eval()
    save_model(model, tmp_path, arch=arch, metadata={})
    reloaded, _ = load_model(tmp_path)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        logits = model(images[:1])
    with torch.no_grad():
        assert torch.isfinite(logits).all() and torch.equal(logits, reloaded(images[:1]))
    assert count_macs(model, image_size=SIZE).macs == flops.get_total_flops() // 2


@pytest.mark.parametrize(
    ("arch", "image_size", "step"),
    [
        ("squeezenet1_0", 32, "build it with a new classifier"),  # a Conv2d classifier, no nn.Linear
        ("shufflenet_v2_x1_0", 32, "trace its prunable channel groups"),  # channel shuffle
        ("inception_v3", 64, "trace its prunable channel groups"),  # needs at least 75 px
        ("swin_t", 32, "have no attention layers"),  # attention MACs are not counted
    ],
)
def test_the_preflight_refuses_an_architecture_naming_the_step(arch: str, image_size: int, step: str) -> None:
    with pytest.raises(ArchitectureError, match=f"{arch} fails the pre-flight at '{step}"):
        check_architecture(arch, image_size=image_size, num_classes=3)


def test_the_preflight_passes_googlenet_with_its_recorded_input_transform() -> None:
    check_architecture("googlenet", image_size=SIZE, num_classes=3)


def test_groups_through_a_grouped_convolution_stay_whole() -> None:
    """RegNet's bottlenecks run grouped convolutions (8 channels a group): those groups are kept,
    the residual streams between them are pruned."""
    model = build_model(ModelConfig(arch="regnet_y_400mf", weights=None), num_classes=5)
    names = {g.name for g in prunable_groups(model, image_size=SIZE)}
    assert "trunk_output.block1.block1-0.f.b.0" not in names and "trunk_output.block1.block1-0.f.a.0" not in names
    assert any(name.startswith("trunk_output.block4") for name in names)
