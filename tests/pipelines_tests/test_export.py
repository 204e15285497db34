from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.export import MODEL_FILE, SPEC_FILE, export_onnx, load_model, save_model
from pipelines.prune import prunable_groups, prune_to_ratios

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32
CLASSES = [f"class_{i}" for i in range(10)]


@functools.lru_cache(maxsize=None)
def pruned(arch: str, mode: str) -> nn.Module:
    """A pruned random-init model in eval mode; shared between tests, which must not modify it."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    groups = prunable_groups(model, image_size=IMAGE_SIZE)
    if mode == "half":
        ratios = {g.name: 0.5 for g in groups}
    else:  # mixed, and some groups left whole
        choices = (0.25, 0.5, 0.8, None)
        ratios = {g.name: choices[i % 4] for i, g in enumerate(groups) if choices[i % 4] is not None}
    prune_to_ratios(model, ratios, image_size=IMAGE_SIZE)
    # Non-trivial BN statistics, so the round trip checks buffers as well as parameters.
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def fixed_input() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(123))


@pytest.mark.parametrize("mode", ["half", "mixed"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_round_trip_gives_identical_logits(tmp_path: Path, arch: str, mode: str) -> None:
    model = pruned(arch, mode)
    save_model(model, tmp_path, arch=arch, metadata={"classes": CLASSES})
    loaded, spec = load_model(tmp_path)
    assert not loaded.training
    x = fixed_input()
    with torch.no_grad():
        expected, actual = model(x), loaded(x)
    assert actual.shape == (3, 10)
    assert torch.equal(actual, expected)
    assert spec["classes"] == CLASSES
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_saved_files_and_spec(tmp_path: Path) -> None:
    model = pruned("resnet18", "mixed")
    save_model(model, tmp_path / "out", arch="resnet18", metadata={"classes": CLASSES})
    directory = tmp_path / "out"
    assert sorted(p.name for p in directory.iterdir()) == sorted([MODEL_FILE, SPEC_FILE])
    assert {MODEL_FILE, SPEC_FILE} == {"model.safetensors", "channel_spec.json"}
    spec = json.loads((directory / SPEC_FILE).read_text())
    assert spec["arch"] == "resnet18"
    assert spec["classes"] == CLASSES
    layers = spec["layers"]
    assert layers["layer1.0.conv1"] == {
        "type": "Conv2d",
        "in_channels": model.layer1[0].conv1.in_channels,
        "out_channels": model.layer1[0].conv1.out_channels,
        "groups": 1,
    }
    assert layers["layer1.0.bn1"] == {"type": "BatchNorm2d", "num_features": model.layer1[0].bn1.num_features}
    assert layers["fc"] == {"type": "Linear", "in_features": model.fc.in_features, "out_features": 10}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [n for n in layers if layers[n]["type"] == "Conv2d"] == convs


def test_weights_are_plain_safetensors(tmp_path: Path) -> None:
    model = pruned("mobilenet_v2", "half")
    save_model(model, tmp_path, arch="mobilenet_v2", metadata={"classes": CLASSES})
    raw = (tmp_path / MODEL_FILE).read_bytes()
    assert not raw.startswith(b"PK")  # torch.save's zip container
    assert not raw.startswith(b"\x80")  # a bare pickle stream
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8 : 8 + header_len].lstrip().startswith(b"{")
    tensors = load_file(tmp_path / MODEL_FILE)
    state = model.state_dict()
    assert set(tensors) == set(state)
    for name, tensor in state.items():
        assert torch.equal(tensors[name], tensor), name


def test_depthwise_groups_recorded(tmp_path: Path) -> None:
    model = pruned("mobilenet_v2", "mixed")
    save_model(model, tmp_path, arch="mobilenet_v2", metadata={})
    layers = json.loads((tmp_path / SPEC_FILE).read_text())["layers"]
    dw = model.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels
    assert layers["features.2.conv.1.0"]["groups"] == dw.groups


def test_load_without_torch_pruning(tmp_path: Path) -> None:
    model = pruned("mobilenet_v2", "mixed")
    save_model(model, tmp_path / "model", arch="mobilenet_v2", metadata={"classes": CLASSES})
    x = fixed_input()
    with torch.no_grad():
        save_file({"input": x, "logits": model(x).contiguous()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch_pruning"] = None  # any import of it now raises ImportError
        import torch
        torch.set_num_threads({torch.get_num_threads()})  # same kernels' partitioning as the parent
        from safetensors.torch import load_file
        from pipelines.export import load_model
        try:
            import torch_pruning
        except ImportError:
            pass
        else:
            sys.exit("torch_pruning was importable")
        model, spec = load_model({str(tmp_path / "model")!r})
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        with torch.no_grad():
            logits = model(expected["input"])
        if not torch.equal(logits, expected["logits"]):
            sys.exit(f"logits differ by {{(logits - expected['logits']).abs().max().item()}}")
        print("OK", spec["arch"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip().endswith("OK mobilenet_v2")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_onnx_export_matches_torch_logits_at_any_batch_and_carries_the_preprocessing(tmp_path: Path, arch: str) -> None:
    import numpy as np
    import onnxruntime

    from pipelines.export import export_onnx

    model = pruned(arch, "mixed")
    spec = {"image_size": IMAGE_SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "classes": CLASSES}
    path = export_onnx(copy.deepcopy(model), tmp_path / "model.onnx", spec=spec)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 7):
        x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x).numpy()
        assert float(np.abs(expected).max()) > 1e-3  # a real comparison, not of two near-zero outputs
        assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max() < 1e-5
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["classes"]) == CLASSES and json.loads(metadata["image_size"]) == IMAGE_SIZE


class _TopKMask(nn.Module):
    """A gate's per-input top-k mask, scattered in place: TorchScript's tracer cannot export it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.conv(x).mean(dim=(2, 3))
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(2, dim=1).indices, True)
        return torch.where(mask, g, 0.0)


def test_a_model_the_torchscript_exporter_rejects_is_exported_with_the_dynamo_one(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime

    model = _TopKMask().eval()
    path = export_onnx(model, tmp_path / "model.onnx", spec={"image_size": 16, "mean": None, "std": None, "classes": None})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max() < 1e-6
