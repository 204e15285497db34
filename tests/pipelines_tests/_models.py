"""Seeded random-init torchvision models shared by the pipeline tests."""
from __future__ import annotations

import copy
import functools

import torch
import torchvision
from torch import nn


@functools.lru_cache(maxsize=None)
def pristine(arch: str) -> nn.Module:
    """One seeded random-init model per arch; never modify it, take `fresh(arch)`."""
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None, num_classes=10)


def fresh(arch: str) -> nn.Module:
    """A private copy of the seeded model (building vgg11_bn costs ~2 s, copying it less)."""
    return copy.deepcopy(pristine(arch))
