from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from pipelines.models import head_name
from pipelines.importance import module_scores
from pipelines.prune import Group, kept_channels, prunable_groups, prune_to_counts, prune_to_ratios

from _models import fresh, pristine

IMAGE_SIZE = 32
ARCHS = ["mobilenet_v2", "resnet18", "vgg11_bn"]


@functools.lru_cache(maxsize=None)
def groups_of(arch: str, image_size: int = IMAGE_SIZE) -> tuple[Group, ...]:
    return tuple(prunable_groups(pristine(arch), image_size=image_size))


def out_width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def run(model: nn.Module, batch: int = 2) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE))


@pytest.mark.parametrize(("arch", "expected"), [("mobilenet_v2", 25), ("resnet18", 12), ("vgg11_bn", 10)])
def test_group_count(arch: str, expected: int) -> None:
    assert len(groups_of(arch)) == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_group_names_unique_ordered_and_exclude_head(arch: str) -> None:
    model = pristine(arch)
    groups = groups_of(arch)
    names = [g.name for g in groups]
    assert len(set(names)) == len(names)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    positions = [order[name] for name in names]
    assert positions == sorted(positions)
    assert head_name(model) not in names
    for group in groups:
        assert group.channels == out_width(model.get_submodule(group.name))


def test_resnet18_half_ratio_shapes_and_residual_coupling() -> None:
    model = fresh("resnet18")
    groups = groups_of("resnet18")
    prune_to_ratios(model, {g.name: 0.5 for g in groups}, image_size=IMAGE_SIZE)
    for group in groups:
        assert out_width(model.get_submodule(group.name)) == kept_channels(group.channels, 0.5), group.name
    # Residual adds tie each block's conv2 (and downsample) outputs to the stage's input width.
    assert model.conv1.out_channels == model.layer1[0].conv2.out_channels == model.layer1[1].conv2.out_channels == 32
    for stage, width in (("layer2", 64), ("layer3", 128), ("layer4", 256)):
        layer = model.get_submodule(stage)
        assert layer[0].conv2.out_channels == layer[0].downsample[0].out_channels == width
        assert layer[1].conv2.out_channels == layer[1].conv1.in_channels == width
        assert layer[0].bn2.num_features == layer[1].bn2.num_features == width
    assert model.fc.in_features == 256
    assert model.fc.out_features == 10
    assert run(model, batch=3).shape == (3, 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_runs_with_ten_outputs(arch: str) -> None:
    model = fresh(arch)
    groups = groups_of(arch)
    dense_params = sum(p.numel() for p in model.parameters())
    prune_to_ratios(model, {g.name: 0.5 for g in groups}, image_size=IMAGE_SIZE)
    assert sum(p.numel() for p in model.parameters()) < dense_params / 2
    assert model.get_submodule(head_name(model)).out_features == 10
    out = run(model)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_mixed_ratios_per_group() -> None:
    model = fresh("mobilenet_v2")
    groups = groups_of("mobilenet_v2")
    choices = (0.1, 0.3, 0.5, 0.77, 1.0)
    ratios = {g.name: choices[i % len(choices)] for i, g in enumerate(groups)}
    prune_to_ratios(model, ratios, image_size=IMAGE_SIZE)
    for group in groups:
        assert out_width(model.get_submodule(group.name)) == kept_channels(group.channels, ratios[group.name])
    assert run(model).shape == (2, 10)


@pytest.mark.parametrize(
    ("channels", "ratio", "expected"),
    [(64, 0.5, 32), (64, 0.001, 1), (3, 0.0, 1), (10, 1.0, 10), (10, 1.5, 10), (96, 0.25, 24)],
)
def test_kept_channels(channels: int, ratio: float, expected: int) -> None:
    assert kept_channels(channels, ratio) == expected


def test_tiny_ratio_keeps_exactly_one_channel() -> None:
    model = fresh("resnet18")
    prune_to_ratios(model, {"layer2.0.conv1": 0.001, "conv1": 1e-6}, image_size=IMAGE_SIZE)
    assert model.layer2[0].conv1.out_channels == 1
    assert model.layer2[0].bn1.num_features == 1
    assert model.layer2[0].conv2.in_channels == 1
    assert model.conv1.out_channels == 1
    assert model.layer1[1].conv2.out_channels == 1
    assert run(model).shape == (2, 10)


def test_groups_absent_from_ratios_stay_whole() -> None:
    model = fresh("resnet18")
    groups = groups_of("resnet18")
    prune_to_ratios(model, {"layer2.0.conv1": 0.5}, image_size=IMAGE_SIZE)
    for group in groups:
        expected = 64 if group.name == "layer2.0.conv1" else group.channels
        assert out_width(model.get_submodule(group.name)) == expected, group.name
    assert model.layer2[0].conv2.in_channels == 64


def test_unknown_group_raises_key_error_and_leaves_model_alone() -> None:
    model = fresh("resnet18")
    before = {name: p.shape for name, p in model.named_parameters()}
    with pytest.raises(KeyError, match="layer9.conv1"):
        prune_to_ratios(model, {"layer1.0.conv1": 0.5, "layer9.conv1": 0.5}, image_size=IMAGE_SIZE)
    assert {name: p.shape for name, p in model.named_parameters()} == before


def test_head_is_not_a_group_and_cannot_be_pruned() -> None:
    model = fresh("resnet18")
    with pytest.raises(KeyError):
        prune_to_ratios(model, {"fc": 0.5}, image_size=IMAGE_SIZE)


def test_prunable_groups_keeps_training_mode_and_weights() -> None:
    """BUG (minor): Torch-Pruning's DependencyGraph.build_dependency calls model.eval() and never
    restores the mode, so prunable_groups / prune_to_ratios return a train-mode model in eval mode
    (probe_forward, by contrast, restores it)."""
    model = fresh("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prunable_groups(model, image_size=IMAGE_SIZE)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training


def test_stage_labels_resnet18_at_64px() -> None:
    stages = {g.name: g.stage for g in groups_of("resnet18", 64)}
    assert stages["conv1"] == "stride_2"
    assert stages["layer1.0.conv1"] == "stride_4"
    assert stages["layer2.0.conv1"] == "stride_8"
    assert stages["layer3.0.conv1"] == "stride_16"
    assert stages["layer4.1.conv1"] == "stride_32"


def test_stage_label_vgg_classifier() -> None:
    stages = {g.name: g.stage for g in groups_of("vgg11_bn")}
    assert stages["classifier.0"] == "classifier"
    assert stages["classifier.3"] == "classifier"
    assert stages["features.0"] == "stride_1"


def test_stage_labels_at_size_not_divisible_by_32() -> None:
    """BUG: stages use `image_size // output_width`; at 100 px resnet18's layer2 output is 13 wide,
    so its stage is labelled stride_7 (and layer3/layer4 stride_14/stride_25) instead of stride_8/16/32."""
    stages = {g.name: g.stage for g in groups_of("resnet18", 100)}
    assert stages["layer2.0.conv1"] == "stride_8"
    assert sorted(set(stages.values())) == ["stride_16", "stride_2", "stride_32", "stride_4", "stride_8"]


def test_l1_criterion_drops_zeroed_filter() -> None:
    model = fresh("resnet18")
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight[3].zero_()
    original = conv.weight.detach().clone()
    original_next = model.layer1[0].conv2.weight.detach().clone()
    original_bn = model.layer1[0].bn1.weight.detach().clone()
    prune_to_ratios(model, {"layer1.0.conv1": 63 / 64}, image_size=IMAGE_SIZE)
    kept = [i for i in range(64) if i != 3]
    assert model.layer1[0].conv1 is conv
    assert conv.weight.shape == (63, 64, 3, 3)
    assert torch.equal(conv.weight.detach(), torch.cat([original[:3], original[4:]]))
    assert torch.equal(model.layer1[0].conv2.weight.detach(), original_next[:, kept])
    assert torch.equal(model.layer1[0].bn1.weight.detach(), original_bn[kept])
    # Nothing outside the group changes.
    assert model.layer1[0].conv2.out_channels == 64
    assert model.layer1[1].conv1.out_channels == 64


class _Concat(nn.Module):
    """Two branches concatenated: pruning one branch shifts the channel offsets of the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.fc(self.c(x).mean(dim=(2, 3)))


def test_concat_groups_prune_both_branches() -> None:
    """BUG: prune_to_ratios scores every group with index sets computed before any pruning. After
    branch `a` is pruned, group `b`'s stale indices into `c`'s concatenated inputs point past the
    end (IndexError), which is what breaks densenet121 and googlenet too."""
    torch.manual_seed(0)
    model = _Concat()
    assert [g.name for g in prunable_groups(model, image_size=8)] == ["a", "b", "c"]
    with torch.no_grad():
        model.b.weight[5].zero_()
        model.b.bias[5] = 0.0
        model.c.weight[:, 8 + 5].zero_()
    b_weight = model.b.weight.detach().clone()
    prune_to_ratios(model, {"a": 0.5, "b": 7 / 8}, image_size=8)
    assert model.a.out_channels == 4
    assert model.b.out_channels == 7
    assert model.c.in_channels == 11
    assert torch.equal(model.b.weight.detach(), torch.cat([b_weight[:5], b_weight[6:]]))
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_more_architectures_prune_export_and_run(arch: str, tmp_path) -> None:
    """The architectures the search's error message names as tested: prune, export, reload, same logits."""
    from pipelines.export import load_model, save_model

    model = torchvision.models.get_model(arch, num_classes=10)
    groups = prunable_groups(model, image_size=IMAGE_SIZE)
    prune_to_ratios(model, {g.name: 0.5 for g in groups}, image_size=IMAGE_SIZE)
    model.eval()
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    save_model(model, tmp_path, arch=arch, metadata={})
    reloaded, _ = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


class _ConcatBN(nn.Module):
    """Two 8-channel branches -> cat -> one BN: the BN's channels belong to two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.fc(self.c(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("criterion", ["bn_gamma", "l1"])
def test_a_later_group_of_a_concatenation_prunes_the_channels_its_scores_chose(criterion: str) -> None:
    model = _ConcatBN()
    with torch.no_grad():
        model.bn.weight.copy_(torch.arange(1.0, 9.0).repeat(2))
        for conv in (model.a, model.b):  # l1 ranks the branch filters the same way
            conv.weight.copy_(torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand_as(conv.weight))
    scores = module_scores(model, criterion, data=None)
    sizes = {module: len(values) for module, values in scores.items()}
    prune_to_counts(model, {"a": 4, "b": 6}, image_size=8, scores=scores)
    assert model.bn.weight.tolist() == [5.0, 6.0, 7.0, 8.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert {module: len(values) for module, values in scores.items()} == sizes  # the caller's scores are unchanged
