"""Graph helpers for `pipelines.gating`: which convs' channels can be gated, read off a torch.fx trace."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

_ZERO_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU)  # act(0) == 0
_ZERO_FUNCTIONS = (F.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.leaky_relu, torch.relu)
_CHANNELWISE = (nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


def module_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def zero_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return isinstance(module_of(node, modules), _ZERO_ACTIVATIONS) or (
        node.op == "call_function" and node.target in _ZERO_FUNCTIONS
    )


def bn_act(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, fx.Node] | None:
    """The (BN, activation) nodes right after conv `node`, each its predecessor's only user; else None."""
    if len(node.users) != 1:
        return None
    bn = next(iter(node.users))
    if not isinstance(module_of(bn, modules), nn.BatchNorm2d) or len(bn.users) != 1:
        return None
    act = next(iter(bn.users))
    return (bn, act) if zero_activation(act, modules) else None


def reach(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[str], list[str], bool]:
    """Convs reading `node`'s channels, depthwise convs passing them on, and whether ONLY convs read them."""
    consumers: list[str] = []
    followers: list[str] = []
    clean = True
    for user in node.users:
        module = module_of(user, modules)
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            consumers.append(user.target)
            continue
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels:
            followers.append(user.target)
        elif not (isinstance(module, _CHANNELWISE) or zero_activation(user, modules)):
            clean = False
            continue
        more_consumers, more_followers, more_clean = reach(user, modules)
        consumers += more_consumers
        followers += more_followers
        clean = clean and more_clean
    return consumers, followers, clean
