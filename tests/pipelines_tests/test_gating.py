from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pipelines.export import SPEC_FILE, load_model, save_model
from pipelines.gating import (
    ChannelGate,
    add_gates,
    add_stage_gates,
    channel_usage,
    default_gate_layers,
    density_schedule,
    fit_predictors,
    freeze_static_channels,
    gate_stages,
    kept_channels,
    named_gates,
    set_density,
)
from pipelines.macs import count_macs

IMAGE_SIZE = 32
EXPECTED_GATES = {
    "resnet18": [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)],
    "mobilenet_v2": [f"features.{i}.conv.0.0" for i in range(2, 18)],
}


@functools.lru_cache(maxsize=None)
def _plain(arch: str) -> nn.Module:
    """Random-init model with non-trivial BN statistics, in eval mode; tests copy it before changing it."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).train()
    with torch.no_grad():
        model(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def gated(arch: str, density: float) -> nn.Module:
    """A gated copy whose random predictors (saliency ~ 1) make different inputs pick different channels."""
    model = add_gates(copy.deepcopy(_plain(arch)), density)
    torch.manual_seed(2)
    for gate in named_gates(model).values():
        nn.init.normal_(gate.predictor.weight, std=gate.predictor.in_features**-0.5)
        nn.init.normal_(gate.predictor.bias, mean=1.0, std=0.1)
    return model.eval()


def images(n: int = 4, seed: int = 123) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_fresh_gates_at_full_density_are_exact_identity(arch: str) -> None:
    plain = _plain(arch)
    model = add_gates(copy.deepcopy(plain), 1.0).eval()
    assert list(named_gates(model)) == EXPECTED_GATES[arch]
    with torch.no_grad():
        assert torch.equal(model(images()), plain(images()))


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_half_density_keeps_ceil_half_per_input_and_inputs_differ(arch: str) -> None:
    model = gated(arch, 0.5)
    with torch.no_grad():
        assert torch.isfinite(model(images())).all()
    differs = False
    for name, gate in named_gates(model).items():
        assert gate.last_mask.shape == (4, gate.conv.out_channels)
        assert (gate.last_mask.sum(dim=1) == math.ceil(0.5 * gate.conv.out_channels)).all(), name
        differs |= bool((gate.last_mask != gate.last_mask[:1]).any())
    assert differs


@pytest.mark.parametrize(
    ("channels", "density", "kept"), [(8, 0.5, 4), (10, 0.7, 7), (100, 0.07, 7), (7, 0.5, 4), (5, 0.01, 1), (6, 1.0, 6)]
)
def test_kept_channels_is_ceil_without_float_noise(channels: int, density: float, kept: int) -> None:
    assert kept_channels(channels, density) == kept


def tiny(width: int = 8, *, depthwise: bool = False) -> nn.Sequential:
    """conv(3->width)+BN+ReLU [depthwise 3x3 +BN+ReLU] conv(width->4), pool, linear(4->2), at 8 px."""
    torch.manual_seed(0)
    middle = [nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += middle if depthwise else []
    layers += [nn.Conv2d(width, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)]
    return nn.Sequential(*layers).eval()


def hand_gated(density: float, *, depthwise: bool = False) -> nn.Sequential:
    """Type A images (mean in the red channel) favour channels 0..3, type B (green) 4..7, by hand."""
    model = add_gates(tiny(depthwise=depthwise), {"0": density}, layers=["0"])
    predictor = model[0].predictor
    with torch.no_grad():
        predictor.weight.zero_()
        predictor.bias.zero_()
        predictor.weight[:4, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])
        predictor.weight[4:, 1] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    return model


def typed_images(kinds: str) -> torch.Tensor:
    x = torch.zeros(len(kinds), 3, 8, 8)
    for i, kind in enumerate(kinds):
        x[i, 0 if kind == "A" else 1] = 1.0
    return x


@pytest.mark.parametrize("depthwise", [False, True], ids=["plain", "depthwise"])
def test_expected_macs_match_hand_computation(depthwise: bool) -> None:
    model = hand_gated(0.5, depthwise=depthwise)
    x = typed_images("AAAB")
    with torch.no_grad():
        model(x)
    selected = model[0].last_mask
    assert selected[:3, :4].all() and not selected[:3, 4:].any()
    assert selected[3, 4:].all() and not selected[3, :4].any()

    # 8x8 outputs; conv0 3->4 kept (3x3); [depthwise on 4 kept (3x3)]; conv 4 kept->4 (1x1); fc; predictor 3x8;
    # the 4 skipped channels' fill folded into the 1x1 conv's 4 biases.
    expected = 64 * 4 * 3 * 9 + (64 * 4 * 9 if depthwise else 0) + 64 * 4 * 4 + 4 * 2 + 3 * 8 + 4 * 4
    assert count_macs(model, image_size=8, inputs=x).macs == expected
    assert expected == count_macs(tiny(4, depthwise=depthwise), image_size=8).macs + 3 * 8 + 4 * 4

    dense = 64 * 8 * 3 * 9 + (64 * 8 * 9 if depthwise else 0) + 64 * 4 * 8 + 4 * 2
    assert count_macs(tiny(depthwise=depthwise), image_size=8).macs == dense
    assert count_macs(tiny(depthwise=depthwise), image_size=8, inputs=x).macs == dense  # no gates: dense
    assert count_macs(model, image_size=8).macs == dense + 3 * 8  # no inputs: every channel

    by_density = []
    for density in (0.25, 0.5, 1.0):
        set_density(model, density)
        by_density.append(count_macs(model, image_size=8, inputs=x).macs)
    assert by_density[0] < by_density[1] < by_density[2] == dense + 3 * 8


def test_expected_macs_of_gated_mobilenet_between_zero_and_dense() -> None:
    model = gated("mobilenet_v2", 0.5)
    dense = count_macs(_plain("mobilenet_v2"), image_size=IMAGE_SIZE).macs
    expected = count_macs(model, image_size=IMAGE_SIZE, inputs=images(3)).macs
    assert 0 < expected < dense
    with pytest.raises(ValueError, match="inputs must be"):
        count_macs(model, image_size=IMAGE_SIZE, inputs=torch.zeros(1, 3, 16, 16))


def test_expected_macs_over_batches_are_the_mean_over_every_image_whatever_their_order() -> None:
    """Counted over the whole val split in batches (a class-sorted first batch cannot bias it):
    with top-k gates each image keeps the same number of channels, so the per-image MACs agree."""
    model = gated("mobilenet_v2", 0.5)
    x = images(6)
    whole = count_macs(model, image_size=IMAGE_SIZE, inputs=x).macs
    assert count_macs(model, image_size=IMAGE_SIZE, inputs=[x[:1], x[1:4], x[4:]]).macs == pytest.approx(whole)
    assert count_macs(model, image_size=IMAGE_SIZE, inputs=iter([x.flip(0)])).macs == pytest.approx(whole)
    per_image = {count_macs(model, image_size=IMAGE_SIZE, inputs=x[i : i + 1]).macs for i in range(len(x))}
    assert per_image == {whole}
    with pytest.raises(ValueError, match="at least one image"):
        count_macs(model, image_size=IMAGE_SIZE, inputs=[])


def test_export_round_trip_of_gated_resnet18(tmp_path: Path) -> None:
    model = gated("resnet18", 0.5)
    gate = model.layer1[0].conv1
    gate.static[:3] = True
    gate.pruned[-2:] = True
    save_model(model, tmp_path, arch="resnet18", metadata={"classes": list("abcdefghij")})
    loaded, spec = load_model(tmp_path)
    assert json.loads((tmp_path / SPEC_FILE).read_text()) == spec
    assert spec["gates"]["layer1.0.conv1"] == {
        "type": "Gate",
        "bn": "layer1.0.bn1",
        "density": 0.5,
        "in_features": 64,
        "out_features": 64,
        "fill": False,  # its consumer conv2 is 3x3: a skipped channel reads 0
        "static": [0, 1, 2],
        "pruned": [62, 63],
    }
    assert list(spec["gates"]) == EXPECTED_GATES["resnet18"]
    assert spec["layers"]["layer1.0.conv1"]["type"] == "Conv2d"
    assert spec["layers"]["layer1.0.bn1"] == {"type": "BatchNorm2d", "num_features": 64}
    assert isinstance(loaded.layer1[0].conv1, ChannelGate)
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))


def test_export_round_trip_keeps_the_fill_of_gated_mobilenet(tmp_path: Path) -> None:
    model = gated("mobilenet_v2", 0.5)
    with torch.no_grad():
        for gate in named_gates(model).values():
            gate.fill.normal_()
    save_model(model, tmp_path, arch="mobilenet_v2", metadata={})
    loaded, spec = load_model(tmp_path)
    assert all(entry["fill"] for entry in spec["gates"].values())
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))


def test_onnx_export_of_a_gated_model_gives_the_gated_logits(tmp_path: Path) -> None:
    import onnxruntime

    from pipelines.export import export_onnx

    model = gated("resnet18", 0.5).eval()
    spec = {"image_size": IMAGE_SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "classes": list("abcdefghij")}
    session = onnxruntime.InferenceSession(str(export_onnx(copy.deepcopy(model), tmp_path / "m.onnx", spec=spec)))
    x = images(5)
    with torch.no_grad():
        expected = model(x)
    with torch.no_grad():
        assert (expected - _plain("resnet18")(x)).abs().max() > 1e-3  # the gates change the logits
    assert abs(session.run(None, {"images": x.numpy()})[0] - expected.numpy()).max() < 1e-5


def test_plain_spec_has_no_gates(tmp_path: Path) -> None:
    save_model(_plain("resnet18"), tmp_path, arch="resnet18", metadata={})
    spec = json.loads((tmp_path / SPEC_FILE).read_text())
    assert "gates" not in spec
    assert all(entry["type"] != "Gate" for entry in spec["layers"].values())


@pytest.mark.parametrize(
    ("kinds", "static", "pruned"),
    [("AAAA", [0, 1, 2, 3], [4, 5, 6, 7]), ("AAAB", [], [])],
    ids=["always-or-never", "mixed"],
)
def test_usage_decides_static_and_pruned_channels(kinds: str, static: list[int], pruned: list[int]) -> None:
    model = hand_gated(0.5)
    x = typed_images(kinds)
    with torch.no_grad():
        before = model(x)
    usage = channel_usage(model, [(x[:2],), (x[2:],)])
    share_a = kinds.count("A") / len(kinds)
    assert torch.equal(usage["0"], torch.tensor([share_a] * 4 + [1 - share_a] * 4))
    summary = freeze_static_channels(model, usage)
    gate = model[0]
    assert gate.static.nonzero().flatten().tolist() == static
    assert gate.pruned.nonzero().flatten().tolist() == pruned
    assert summary["0"] == {"dynamic": 8 - len(static) - len(pruned), "static": len(static), "pruned": len(pruned)}
    with torch.no_grad():
        after = model(x)
    assert torch.isfinite(after).all()
    torch.testing.assert_close(after, before)  # the same channels are kept for every image
    if static:  # predictor rows of static and pruned channels cost nothing any more; the fill still folds
        assert count_macs(model, image_size=8, inputs=x).macs == count_macs(tiny(4), image_size=8).macs + 4 * 4


def test_freezing_never_prunes_below_the_kept_channels() -> None:
    model = hand_gated(0.5)
    x = typed_images("AAAB")
    freeze_static_channels(model, channel_usage(model, [x]), never=1.1)  # every channel under the bar
    assert model[0].pruned.nonzero().flatten().tolist() == [4, 5, 6, 7]  # the 4 most used stay
    with torch.no_grad():
        assert (model(x) != 0).any() and model[0].last_mask[:, :4].all()


def test_density_schedule_and_set_density() -> None:
    assert density_schedule(0.25, 4, warmup=3) == [1.0, 0.75, 0.5, 0.25]
    assert density_schedule(0.25, 4, warmup=9) == [1.0, 0.75, 0.5, 0.25]  # the last epoch is at the target
    assert density_schedule(0.5, 4, warmup=2) == [1.0, 0.75, 0.5, 0.5]
    assert density_schedule(0.5, 3, warmup=0) == [0.5, 0.5, 0.5]
    assert density_schedule(0.3, 1, warmup=1) == [0.3]
    assert density_schedule({"a": 0.5, "b": 0.3}, 3, warmup=2)[-1] == {"a": 0.5, "b": 0.3}
    with pytest.raises(ValueError, match="warmup"):
        density_schedule(0.5, 3, warmup=-1)
    model = hand_gated(1.0)
    set_density(model, {"0": 0.25})
    assert model[0].density == 0.25 and model[0].kept == 2
    with pytest.raises(ValueError, match="density"):
        set_density(model, 0.0)
    with pytest.raises(KeyError):
        set_density(model, {"3": 0.5})


@pytest.mark.parametrize("depthwise", [False, True], ids=["plain", "depthwise"])
def test_skipped_channels_read_the_fill_where_they_are_consumed(depthwise: bool) -> None:
    model = hand_gated(0.5, depthwise=depthwise)
    with torch.no_grad():
        model[0].fill.copy_(torch.arange(8.0))
    read = []
    consumer = model[-4]  # the 1x1 conv(8 -> 4)
    consumer.register_forward_pre_hook(lambda _m, args: read.append(args[0]))
    plain = tiny(depthwise=depthwise)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "predictor" not in k and "fill" not in k}, strict=False)
    plain[0], plain[1] = model[0].conv, model[0].bn  # the gate's conv and BN
    unmasked = []
    plain[-4].register_forward_hook(lambda _m, args, _out: unmasked.append(args[0]))
    x = typed_images("AB")
    with torch.no_grad():
        out = model(x)
        plain(x)
    mask = model[0].last_mask
    assert torch.equal(read[0][mask], unmasked[0][mask])  # kept channels: untouched
    assert torch.equal(read[0][~mask], torch.arange(8.0).expand(2, 8)[~mask][:, None, None].expand(-1, 8, 8))
    # the fill is exactly a per-input bias of the 1x1 consumer: what count_macs charges for it
    zeroed = torch.where(mask[:, :, None, None], unmasked[0], 0.0)
    bias = (consumer.weight[:, :, 0, 0] @ (~mask * torch.arange(8.0)).T).T
    conv = functools.partial(torch.nn.functional.conv2d, weight=consumer.weight, bias=consumer.bias)  # no hooks
    torch.testing.assert_close(conv(read[0]), conv(zeroed) + bias[:, :, None, None])
    assert torch.isfinite(out).all()


def test_fit_predictors_recovers_each_channels_mean_activation() -> None:
    """Flat positive images, positive weights: no clipping, so each channel's mean is linear in GAP(x)."""
    model = add_gates(tiny(), 0.5, layers=["0"])
    with torch.no_grad():
        model[0].conv.weight.uniform_(0.0, 1.0)
        model[0].conv.bias.uniform_(0.0, 1.0)
    x = (torch.rand(64, 3, 1, 1, generator=torch.Generator().manual_seed(0)) + 0.5).expand(-1, -1, 8, 8)
    fits = fit_predictors(model, [x[:32], (x[32:],)], ridge=1e-9)
    assert fits["0"] > 0.999
    with torch.no_grad():
        model(x)
        truth = model[2](model[0](x)).mean(dim=(2, 3))  # BN output through the ReLU, per image
    torch.testing.assert_close(model[0].last_saliency, truth, atol=1e-3, rtol=1e-3)
    assert torch.equal(model[0].last_mask, torch.zeros_like(truth, dtype=torch.bool).scatter_(1, truth.topk(4).indices, True))
    assert model[0].density == 0.5 and not model[0].predictor.weight.requires_grad
    skipped = ~model[0].last_mask
    when_skipped = (truth * skipped).sum(0) / skipped.sum(0)
    expected_fill = torch.where(skipped.any(0), when_skipped, truth.mean(0))  # never skipped: the plain mean
    assert skipped.any(0).sum() >= 4
    torch.testing.assert_close(model[0].fill, expected_fill, atol=1e-3, rtol=1e-3)


def test_gate_stages_follow_prune_stage_labels() -> None:
    stages = gate_stages(_plain("resnet18"))
    assert stages == {name: f"stride_{2 ** (int(name[5]) + 1)}" for name in EXPECTED_GATES["resnet18"]}
    assert gate_stages(add_gates(copy.deepcopy(_plain("resnet18")), 0.5)) == stages


def test_stage_densities_reach_the_gates_of_that_stage() -> None:
    model = copy.deepcopy(_plain("resnet18"))
    per_layer = add_stage_gates(model, {"stride_8": 0.5})
    assert per_layer == {name: 0.5 if name.startswith("layer2") else 1.0 for name in EXPECTED_GATES["resnet18"]}
    assert {name: gate.density for name, gate in named_gates(model).items()} == per_layer


def test_explicit_layers_need_bn_and_activation() -> None:
    with pytest.raises(ValueError, match="BatchNorm2d"):
        add_gates(tiny(), 0.5, layers=["3"])  # conv(8->4) is followed by pooling
    assert default_gate_layers(tiny()) == []  # the only candidate reads the image itself
