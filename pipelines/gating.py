"""Dynamic channel gating: AFDS's AFS, in the style of Feature Boosting and Suppression (FBS, ICLR 2019).

A `ChannelGate` takes the place of a conv and absorbs the BatchNorm after it (whose slot becomes
nn.Identity), so one module sees both the conv's input and the BN's output:

    g    = relu(predictor(GAP(x)))        predictor = nn.Linear(C_in, C_out), on the conv's INPUT
    mask = top ceil(d * C_out) of g, per input (winner-take-all; d = density in (0, 1])
    y    = bn(conv(x)) * (mask * g)       applied to the BN output, BEFORE the activation

After a ReLU-like activation a skipped channel is exactly zero, so the convs reading it skip it
too. The forward still computes every channel and masks it (a simulation); each gate records its
per-image mask, and `pipelines.macs.count_macs(..., inputs=...)` counts what a gated runtime would.
A fresh gate has W = 0, b = 1, so g == 1.0 exactly: at d = 1 it is a bit-exact identity. The
saliency scaling is what trains the predictor (top-k passes no gradient).

Which layers (`default_gate_layers`, found by tracing with torch.fx): every ungrouped conv, not
reading the image itself, followed by BatchNorm2d then a zero-preserving activation (ReLU, ReLU6,
SiLU, ...) whose output reaches ONLY convs (possibly through pools, BN, activations and depthwise
convs), i.e. channels not tied to a residual add or a concatenation. ResNet: conv1 of each
BasicBlock (conv1 and conv2 of each Bottleneck); MobileNetV2: the expansion 1x1 conv of each block.
A depthwise conv after a gate follows its channels: a skipped channel's depthwise output is a
per-channel constant, folded into the next 1x1 conv's bias by a gated runtime, so it costs nothing.

Gate after structural pruning: `pipelines.prune` does not understand gated models.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn


__all__ = [
    "DESCRIPTION", "ChannelGate", "default_gate_layers", "gate_stages", "add_gates", "named_gates", "set_density",
    "density_schedule", "kept_channels", "channel_usage", "freeze_static_channels", "gate_spec",
]

DESCRIPTION = (
    "AFS/FBS dynamic channel gating: per input keep the top ceil(d*C) channels of each gated conv by predicted"
    " saliency; density d per stage, lowered from 1 over the epochs; MACs are the expectation over val images"
)

_ZERO_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU)  # act(0) == 0
_ZERO_FUNCTIONS = (F.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.leaky_relu, torch.relu)
_CHANNELWISE = (nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity)


def kept_channels(channels: int, density: float) -> int:
    """`ceil(density * channels)`, immune to float noise (0.7 * 10 is 7.000000000000001)."""
    return math.ceil(round(density * channels, 6))


def _checked(density: float) -> float:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return float(density)


class ChannelGate(nn.Module):
    """conv -> BN -> per-input channel mask scaled by the predicted saliency (see the module docstring).

    Buffers `static` (always kept, scaled by the learned `static_scale` instead of the prediction)
    and `pruned` (never kept) come from `freeze_static_channels`; both start all False.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        *,
        density: float,
        bn_name: str,
        consumers: Iterable[str] = (),
        followers: Iterable[str] = (),
    ) -> None:
        super().__init__()
        channels = conv.out_channels
        self.conv, self.bn = conv, bn
        self.predictor = nn.Linear(conv.in_channels, channels).to(conv.weight)  # same device and dtype
        nn.init.zeros_(self.predictor.weight)
        nn.init.ones_(self.predictor.bias)
        self.static_scale = nn.Parameter(conv.weight.new_ones(channels))
        self.register_buffer("static", torch.zeros(channels, dtype=torch.bool, device=conv.weight.device))
        self.register_buffer("pruned", torch.zeros(channels, dtype=torch.bool, device=conv.weight.device))
        self.density = _checked(density)
        self.bn_name = bn_name  # where the BN lived; its slot now holds nn.Identity
        self.consumers = tuple(consumers)  # convs reading the gated channels (names in the model)
        self.followers = tuple(followers)  # depthwise convs whose channels follow the gate
        self.last_mask: torch.Tensor | None = None  # N x C bool, from the latest forward
        self.last_saliency: torch.Tensor | None = None  # N x C, the g that scaled the kept channels

    @property
    def kept(self) -> int:
        """Channels kept per input: ceil(d * C), but all static ones and none of the pruned ones."""
        channels = self.conv.out_channels
        wanted = min(kept_channels(channels, self.density), channels - int(self.pruned.sum()))
        return max(int(self.static.sum()), wanted)

    @property
    def predicted(self) -> int:
        """Predictor rows still needed (dynamic channels): what its MACs count."""
        return self.conv.out_channels - int(self.static.sum()) - int(self.pruned.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        g = F.relu(self.predictor(x.mean(dim=(2, 3))))
        g = torch.where(self.static, self.static_scale, g)
        scores = g.detach().masked_fill(self.static, math.inf).masked_fill(self.pruned, -math.inf)
        mask = torch.zeros_like(g).scatter_(1, scores.topk(self.kept, dim=1).indices, 1.0)
        self.last_mask, self.last_saliency = mask.detach().bool(), g.detach()
        return y * (mask * g)[:, :, None, None]

    def extra_repr(self) -> str:
        return f"density={self.density}, bn_name={self.bn_name!r}"


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, nn.Module]]:
    if any(isinstance(m, ChannelGate) for m in model.modules()):
        raise ValueError("the model already has gates; add them once, to the ungated model")
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types for untraceable control flow
        raise ValueError(f"gating: torch.fx cannot trace {type(model).__name__}: {error}") from error
    return graph, dict(model.named_modules())


def _module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _zero_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return isinstance(_module(node, modules), _ZERO_ACTIVATIONS) or (
        node.op == "call_function" and node.target in _ZERO_FUNCTIONS
    )


def _bn_act(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, fx.Node] | None:
    """The (BN, activation) nodes right after conv `node`, each its predecessor's only user; else None."""
    if len(node.users) != 1:
        return None
    bn = next(iter(node.users))
    if not isinstance(_module(bn, modules), nn.BatchNorm2d) or len(bn.users) != 1:
        return None
    act = next(iter(bn.users))
    return (bn, act) if _zero_activation(act, modules) else None


def _reach(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[str], list[str], bool]:
    """Convs reading `node`'s channels, depthwise convs passing them on, and whether ONLY convs read them."""
    consumers: list[str] = []
    followers: list[str] = []
    clean = True
    for user in node.users:
        module = _module(user, modules)
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            consumers.append(user.target)
            continue
        if isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels:
            followers.append(user.target)
        elif not (isinstance(module, _CHANNELWISE) or _zero_activation(user, modules)):
            clean = False
            continue
        more_consumers, more_followers, more_clean = _reach(user, modules)
        consumers += more_consumers
        followers += more_followers
        clean = clean and more_clean
    return consumers, followers, clean


def default_gate_layers(model: nn.Module) -> list[str]:
    """Names of the convs the module docstring's rule selects, in graph order."""
    graph, modules = _trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    names = []
    for node in graph.nodes:
        conv = _module(node, modules)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or calls[node.target] != 1:
            continue
        if node.args[0].op == "placeholder":  # the stem: a GAP of the image says little
            continue
        chain = _bn_act(node, modules)
        if chain is None or calls[chain[0].target] != 1:
            continue
        consumers, _, clean = _reach(chain[1], modules)
        if clean and consumers:
            names.append(node.target)
    return names


def gate_stages(model: nn.Module, *, layers: Iterable[str] | None = None) -> dict[str, str]:
    """`stride_<s>` per gated conv: its output's downsampling at 224 px, as `pipelines.prune` labels stages.

    `layers` defaults to the model's gates, or to `default_gate_layers` for an ungated model.
    """
    from pipelines.prune import layer_stages

    if layers is None:
        layers = list(named_gates(model)) or default_gate_layers(model)
    return layer_stages(model, list(layers))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_gates(
    model: nn.Module, densities: Mapping[str, float] | float = 1.0, *, layers: Iterable[str] | None = None
) -> nn.Module:
    """Wrap each conv of `layers` (default: `default_gate_layers`) in a ChannelGate, in place.

    `densities` is one float for all, or conv name -> density (absent names get 1.0, unknown raise
    KeyError). An explicit layer needs only conv -> BatchNorm2d -> ReLU-like activation.
    """
    names = list(layers) if layers is not None else default_gate_layers(model)
    if isinstance(densities, Mapping):
        unknown = set(densities) - set(names)
        if unknown:
            raise KeyError(f"no gated layer named {sorted(unknown)}; gated layers: {names}")
        per_layer = {name: _checked(densities.get(name, 1.0)) for name in names}
    else:
        per_layer = dict.fromkeys(names, _checked(densities))
    graph, modules = _trace(model)
    nodes = {node.target: node for node in graph.nodes if node.op == "call_module"}
    for name in names:
        if not isinstance(modules.get(name), nn.Conv2d) or name not in nodes:
            raise ValueError(f"{name!r} is not a Conv2d called in {type(model).__name__}'s forward")
        chain = _bn_act(nodes[name], modules)
        if chain is None:
            raise ValueError(f"{name}: a gate needs conv -> BatchNorm2d -> ReLU-like activation, each used once")
        bn, act = chain
        consumers, followers, _ = _reach(act, modules)
        gate = ChannelGate(
            modules[name],
            modules[bn.target],
            density=per_layer[name],
            bn_name=bn.target,
            consumers=consumers,
            followers=followers,
        )
        _replace(model, bn.target, nn.Identity())
        _replace(model, name, gate)
    return model


def named_gates(model: nn.Module) -> dict[str, ChannelGate]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ChannelGate)}


def set_density(model: nn.Module, density: Mapping[str, float] | float) -> None:
    """Set every gate's density (a float) or the named ones (a mapping; unknown names raise KeyError)."""
    gates = named_gates(model)
    chosen = density if isinstance(density, Mapping) else dict.fromkeys(gates, density)
    unknown = set(chosen) - set(gates)
    if unknown:
        raise KeyError(f"no gate named {sorted(unknown)}; gates: {list(gates)}")
    for name, value in chosen.items():
        gates[name].density = _checked(value)


def density_schedule(target: Mapping[str, float] | float, epochs: int) -> list:
    """Per-epoch densities from 1.0 (first epoch) linearly down to `target` (last epoch, exactly).

    A mapping target gives one mapping per epoch; one epoch gives just the target.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")

    def at(value: float, epoch: int) -> float:
        value = _checked(value)
        if epoch == epochs - 1:
            return value
        return 1.0 + (value - 1.0) * epoch / (epochs - 1)

    if isinstance(target, Mapping):
        return [{name: at(value, e) for name, value in target.items()} for e in range(epochs)]
    return [at(target, e) for e in range(epochs)]


@torch.no_grad()
def channel_usage(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Per gate, the fraction of inputs for which each channel was kept (eval mode).

    `batches` yields image tensors or tuples starting with one (as `pipelines.data.batches` does).
    Also leaves each gate's mean saliency in `gate.saliency_mean`: the initial static scale.
    """
    gates = named_gates(model)
    kept = {name: torch.zeros(g.conv.out_channels) for name, g in gates.items()}
    saliency = {name: torch.zeros(g.conv.out_channels) for name, g in gates.items()}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images)
            seen += len(images)
            for name, gate in gates.items():
                kept[name] += gate.last_mask.sum(dim=0).cpu()
                saliency[name] += gate.last_saliency.sum(dim=0).float().cpu()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("channel_usage got no images")
    for name, gate in gates.items():
        gate.saliency_mean = saliency[name] / seen
    return {name: counts / seen for name, counts in kept.items()}


@torch.no_grad()
def freeze_static_channels(
    model: nn.Module, usage: Mapping[str, torch.Tensor], *, never: float = 0.01, always: float = 0.99
) -> dict[str, dict[str, int]]:
    """Kept for < `never` of inputs -> pruned; > `always` -> static (scale = its mean saliency); else dynamic.

    Never prunes below the ceil(d * C) most used channels. Returns per gate the three counts.
    """
    gates = named_gates(model)
    summary = {}
    for name, used in usage.items():
        gate = gates[name]
        pruned = used < never
        pruned[used.topk(kept_channels(gate.conv.out_channels, gate.density)).indices] = False
        static = (used > always) & ~pruned
        gate.pruned.copy_(pruned)
        gate.static.copy_(static)
        mean = getattr(gate, "saliency_mean", None)
        if mean is not None:
            gate.static_scale[gate.static] = mean.to(gate.static_scale)[gate.static]
        summary[name] = {"dynamic": gate.predicted, "static": int(static.sum()), "pruned": int(pruned.sum())}
    return summary


def gate_spec(model: nn.Module) -> dict[str, dict]:
    """JSON-ready description of every gate, keyed by conv name (for the exported channel spec)."""
    return {
        name: {
            "type": "Gate",
            "bn": gate.bn_name,
            "density": gate.density,
            "in_features": gate.predictor.in_features,
            "out_features": gate.predictor.out_features,
            "static": gate.static.nonzero().flatten().tolist(),
            "pruned": gate.pruned.nonzero().flatten().tolist(),
        }
        for name, gate in named_gates(model).items()
    }
