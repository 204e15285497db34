from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipelines.macs import Complexity, count_macs
from pipelines.prune import prunable_groups, prune_to_ratios

IMAGE_SIZE = 32


@functools.lru_cache(maxsize=None)
def _pristine(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None, num_classes=10)


@functools.lru_cache(maxsize=None)
def model_at(arch: str, keep_ratio: float) -> nn.Module:
    """Uniformly pruned copy of the seeded model; shared between tests, which only measure it."""
    model = copy.deepcopy(_pristine(arch))
    if keep_ratio < 1.0:
        groups = prunable_groups(model, image_size=IMAGE_SIZE)
        prune_to_ratios(model, {g.name: keep_ratio for g in groups}, image_size=IMAGE_SIZE)
    return model


def reference_flops(model: nn.Module, image_size: int) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops()


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5], ids=["dense", "pruned"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "vgg11_bn"])
def test_macs_are_half_of_flop_counter(arch: str, keep_ratio: float) -> None:
    model = model_at(arch, keep_ratio)
    macs = count_macs(model, image_size=IMAGE_SIZE).macs
    flops = reference_flops(model, IMAGE_SIZE)
    assert flops > 0
    assert macs == pytest.approx(flops / 2, rel=1e-9)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_macs_and_params_decrease_with_keep_ratio(arch: str) -> None:
    results = [count_macs(model_at(arch, r), image_size=IMAGE_SIZE) for r in (1.0, 0.75, 0.5, 0.25)]
    macs = [c.macs for c in results]
    params = [c.params for c in results]
    assert all(a > b for a, b in zip(macs, macs[1:])), macs
    assert all(a > b for a, b in zip(params, params[1:])), params


def test_hand_computed_macs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    result = count_macs(model, image_size=4)
    assert result == Complexity(macs=4 * 4 * 8 * 3 * 9 + 128 * 5, params=(8 * 3 * 9 + 8) + (128 * 5 + 5))


def test_hand_computed_grouped_and_strided_conv() -> None:
    # Depthwise 3x3 stride 2 on 8 channels at 8 px -> 4x4 output; then a 1x1 conv 8 -> 4.
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    expected = 8 * 8 * 8 * 3 + 4 * 4 * 8 * 9 + 4 * 4 * 4 * 8 + 4 * 2
    assert count_macs(model, image_size=8).macs == expected
    assert count_macs(model, image_size=8).macs * 2 == reference_flops(model, 8)


def test_count_macs_leaves_model_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).train()
    before = model[1].running_mean.clone()
    result = count_macs(model, image_size=4)
    assert model.training
    assert torch.equal(model[1].running_mean, before)  # eval-mode probe: BN statistics untouched
    assert result.macs == 2 * 2 * 4 * 3 * 9 + 16 * 3
