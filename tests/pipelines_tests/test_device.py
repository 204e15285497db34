"""Device selection and placement, tested on the CPU (and on PyTorch's 'meta' device, which has no
data: it shows where tensors would live without needing a GPU)."""
from __future__ import annotations

import pytest
import torch

from pipelines.data import Split, Splits, batches
from pipelines.device import autocast, device_of, pick_device


def test_default_device_follows_what_cuda_this_process_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # Ray gave this trial a GPU
    assert pick_device() == torch.device("cuda")


def test_requesting_cuda_without_a_visible_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        pick_device("cuda:0")
    assert pick_device("cpu") == torch.device("cpu")


def test_autocast_leaves_cpu_math_in_float32() -> None:
    with autocast(torch.device("cpu"), enabled=True):
        out = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert out.dtype == torch.float32


def test_device_of_a_model_and_of_one_without_tensors() -> None:
    assert device_of(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_batches_stay_on_the_splits_device(augment: str) -> None:
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    split = Split(images=images, labels=torch.arange(10))
    on_cpu = list(batches(split, batch_size=4, shuffle=True, seed=3, augment=augment))
    elsewhere = Splits(train=split, val=split, test=split, classes=("a",)).to("meta").train
    moved = list(batches(elsewhere, batch_size=4, shuffle=True, seed=3, augment=augment))
    assert len(moved) == len(on_cpu) == 3
    for (x, y, index), (mx, my, mindex) in zip(on_cpu, moved):
        assert {mx.device.type, my.device.type, mindex.device.type} == {"meta"}
        assert mx.shape == x.shape and mx.dtype == x.dtype == torch.float32
        assert mindex.shape == index.shape
