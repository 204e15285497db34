from __future__ import annotations

import functools

import pytest
import torch
import torch_pruning as tp
from torch import nn

from pipelines.data import Split, batches
from pipelines.importance import CRITERIA, ScoringData, group_scores, module_scores

from _models import fresh

IMAGE_SIZE = 32
NAMES = ["activation", "bn_gamma", "l1", "taylor", "trajectory"]


@functools.lru_cache(maxsize=None)
def tiny_split(n: int = 16) -> Split:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    return Split(images=images, labels=torch.arange(n) % 10)


def fake_trajectory(model: nn.Module, epochs: int = 3) -> dict[str, torch.Tensor]:
    """Each conv/linear weight after `epochs` fake epochs: the current weights plus growing noise."""
    generator = torch.Generator().manual_seed(1)
    return {
        name: torch.stack([m.weight.detach() + 0.01 * k * torch.randn(m.weight.shape, generator=generator)
                           for k in range(epochs)])
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def scoring_data(model: nn.Module | None = None, **kwargs: object) -> ScoringData:
    trajectory = fake_trajectory(model) if model is not None else None
    return ScoringData(train=tiny_split(), batch_size=8, num_batches=2, trajectory=trajectory, **kwargs)


def out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return module.out_features if isinstance(module, nn.Linear) else module.num_features


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("criterion", NAMES)
def test_criterion_contract(arch: str, criterion: str) -> None:
    model = fresh(arch)
    model.train()
    model.get_submodule("features.1.conv.0.1" if arch == "mobilenet_v2" else "bn1").eval()  # a frozen BN
    head = model.fc if arch == "resnet18" else model.classifier[1]
    head.weight.requires_grad_(False)  # a frozen parameter must stay frozen after Taylor's backward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]

    scores = module_scores(model, criterion, data=scoring_data(model))

    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())
    modules = set(model.modules())
    assert scores and set(scores) <= modules
    for module, values in scores.items():
        assert values.dim() == 1 and len(values) == out_channels(module), module
        assert values.dtype.is_floating_point and torch.isfinite(values).all(), module
    layers = {m for m in modules if isinstance(m, (nn.Conv2d, nn.Linear))}
    norms = {m for m in modules if isinstance(m, nn.BatchNorm2d)}
    expected = {"bn_gamma": norms, "l1": layers, "taylor": layers, "trajectory": layers}.get(criterion)
    if expected is not None:
        assert set(scores) == expected
    else:  # activation: every BN, plus the layers that do not feed one (here: only the classifier)
        assert set(scores) == norms | (layers - {m for m in layers if isinstance(m, nn.Conv2d)})


def _zero_channel_3() -> nn.Module:
    model = fresh("resnet18")
    block = model.layer1[0]
    with torch.no_grad():
        block.conv1.weight[3] = 0
        block.bn1.weight[3] = 0
        block.bn1.bias.fill_(1.0)  # every other channel clearly active after the ReLU
        block.bn1.bias[3] = 0
    return model


@pytest.mark.parametrize(
    ("criterion", "layer"), [("l1", "conv1"), ("bn_gamma", "bn1"), ("activation", "bn1"), ("taylor", "conv1")]
)
def test_zeroed_filter_ranks_last(criterion: str, layer: str) -> None:
    model = _zero_channel_3()
    values = module_scores(model, criterion, data=scoring_data())[getattr(model.layer1[0], layer)]
    assert values[3] == 0
    assert (values[torch.arange(len(values)) != 3] > 0).all()


def test_taylor_matches_hand_computation_on_the_first_batches_only() -> None:
    """(sum over the filter of grad * w)^2, averaged over exactly `num_batches` shuffled batches."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, 10))
    data = ScoringData(train=tiny_split(), batch_size=4, num_batches=2, seed=5)
    expected = torch.zeros(10)
    for step, (images, labels, _) in enumerate(batches(data.train, batch_size=4, shuffle=True, seed=5)):
        if step == 2:
            break
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(images), labels), [model[1].weight])
        expected += (grad * model[1].weight.detach()).sum(1) ** 2 / 2
    torch.testing.assert_close(module_scores(model, "taylor", data=data)[model[1]], expected)


def _conv_with_trajectory(l1_by_filter: list[float]) -> tuple[nn.Module, torch.Tensor]:
    """A 3->8 conv whose filter k has L1 norm l1_by_filter[k], and a random 3-epoch trajectory for it."""
    conv = nn.Conv2d(3, len(l1_by_filter), 3, bias=False)
    with torch.no_grad():
        for k, norm in enumerate(l1_by_filter):
            conv.weight[k] = norm / conv.weight[k].numel()
    trajectory = torch.randn((3, *conv.weight.shape), generator=torch.Generator().manual_seed(2))
    return nn.Sequential(conv), trajectory


def _trajectory_scores(model: nn.Module, trajectory: torch.Tensor, *, pair_fraction: float) -> torch.Tensor:
    data = ScoringData(train=tiny_split(), trajectory={"0": trajectory})
    return CRITERIA.get("trajectory")(model, data=data, pair_fraction=pair_fraction)[model[0]]


def test_trajectory_marks_the_smaller_filter_of_an_identical_pair_first() -> None:
    model, trajectory = _conv_with_trajectory([0.1, 2, 3, 4, 5, 9, 7, 8])
    trajectory[:, 5] = 3 * trajectory[:, 0]  # identical direction over every epoch: cosine 1
    trajectory[:, 4] = trajectory[:, 3] + 0.01 * trajectory[:, 4]  # the next most similar pair
    scores = _trajectory_scores(model, trajectory, pair_fraction=0.05)  # 28 pairs -> walk 2
    assert scores.argmin() == 0 and scores[5] >= 1
    assert scores[0] < scores[3] < 1  # marked second, so less redundant than filter 0
    unmarked = [k for k in range(8) if k not in (0, 3)]
    assert (scores[unmarked] >= 1).all()
    assert torch.equal(torch.argsort(scores[unmarked]), torch.argsort(torch.tensor([2.0, 3, 5, 9, 7, 8])))  # by L1


def test_trajectory_walks_pairs_most_similar_first() -> None:
    model, trajectory = _conv_with_trajectory([0.1, 2, 3, 4, 5, 9, 7, 8])
    trajectory[:, 5] = trajectory[:, 0]
    trajectory[:, 2] = -trajectory[:, 1]  # cosine -1: the pair an ascending sort would take first
    scores = _trajectory_scores(model, trajectory, pair_fraction=0.03)  # 28 pairs -> walk 1
    assert (scores < 1).nonzero().flatten().tolist() == [0]


def test_walking_every_pair_leaves_one_filter_unmarked() -> None:
    """Why `pair_fraction` exists: the unrestricted walk marks all filters but the largest-L1 one."""
    model, trajectory = _conv_with_trajectory([0.1, 2, 3, 4, 5, 9, 7, 8])
    scores = _trajectory_scores(model, trajectory, pair_fraction=1.0)
    assert (scores >= 1).nonzero().flatten().tolist() == [5]


@pytest.mark.parametrize(
    ("trajectory", "message"),
    [({"0": torch.zeros(3, 8, 3, 2, 2)}, "expected"), ({"1": torch.zeros(3, 8, 3, 3, 3)}, "no Conv2d/Linear")],
)
def test_trajectory_rejects_mismatched_entries(trajectory: dict[str, torch.Tensor], message: str) -> None:
    model, _ = _conv_with_trajectory([1.0] * 8)
    with pytest.raises(ValueError, match=message):
        module_scores(model, "trajectory", data=ScoringData(train=tiny_split(), trajectory=trajectory))


@functools.lru_cache(maxsize=None)
def _graph(arch: str) -> tuple[nn.Module, tp.DependencyGraph]:
    model = fresh(arch)
    return model, tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))


def _group(arch: str, root: str, idxs: list[int] | None = None) -> tuple[nn.Module, tp.dependency.Group]:
    model, graph = _graph(arch)
    conv = model.get_submodule(root)
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs or list(range(conv.out_channels)))
    return model, group


def test_group_scores_single_member_and_mean_of_members() -> None:
    model, group = _group("resnet18", "layer1.0.conv1")
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    l1 = module_scores(model, "l1", data=None)[conv]
    gamma = module_scores(model, "bn_gamma", data=None)[bn]
    assert torch.equal(group_scores(group, {conv: l1}), l1)
    torch.testing.assert_close(group_scores(group, {conv: l1, bn: gamma}), (l1 + gamma) / 2)


def test_group_scores_residual_group_averages_every_coupled_conv() -> None:
    model, group = _group("resnet18", "layer1.0.conv2")
    l1 = module_scores(model, "l1", data=None)
    result = group_scores(group, l1)
    coupled = [model.conv1, model.layer1[0].conv2, model.layer1[1].conv2]  # tied by the two residual adds
    assert len(result) == 64 and torch.isfinite(result).all()
    torch.testing.assert_close(result, sum(l1[m] for m in coupled) / 3)


def test_group_scores_counts_depthwise_outputs() -> None:
    model, group = _group("mobilenet_v2", "features.2.conv.0.0")
    l1 = module_scores(model, "l1", data=None)
    expand, depthwise = model.features[2].conv[0][0], model.features[2].conv[1][0]
    torch.testing.assert_close(group_scores(group, l1), (l1[expand] + l1[depthwise]) / 2)


def test_group_scores_maps_a_partial_group_to_positions() -> None:
    model, group = _group("resnet18", "layer1.0.conv1", idxs=[2, 6, 9])
    l1 = module_scores(model, "l1", data=None)
    assert torch.equal(group_scores(group, l1), l1[model.layer1[0].conv1][[2, 6, 9]])


def test_group_scores_without_scored_members_raises() -> None:
    model, group = _group("resnet18", "layer1.0.conv1")
    with pytest.raises(ValueError, match="rooted at"):
        group_scores(group, {model.fc: torch.ones(10)})


def test_registry_names_and_unknown_criterion() -> None:
    assert CRITERIA.names() == NAMES
    assert all(CRITERIA.describe()[name] for name in NAMES)
    with pytest.raises(KeyError, match="valid: activation, bn_gamma, l1, taylor, trajectory"):
        module_scores(fresh("resnet18"), "nope", data=None)


@pytest.mark.parametrize(
    ("criterion", "with_images"),
    [("activation", False), ("taylor", False), ("trajectory", False), ("trajectory", True)],
)
def test_data_driven_criteria_require_data(criterion: str, with_images: bool) -> None:
    data = scoring_data() if with_images else None  # train images, but no trajectory
    with pytest.raises(ValueError, match=criterion):
        module_scores(fresh("resnet18"), criterion, data=data)
