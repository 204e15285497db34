"""Dynamic channel gating: AFDS's AFS, in the style of Feature Boosting and Suppression (FBS, ICLR 2019).

A `ChannelGate` takes the place of a conv and absorbs the BatchNorm after it (whose slot becomes
nn.Identity), so one module sees the conv's input and computes its output:

    g    = relu(predictor(GAP(x)))        predictor = nn.Linear(C_in, C_out), on the conv's INPUT
    mask = top ceil(d * C_out) of g, per input (winner-take-all; d = density in (0, 1])

The mask is applied where the gated channels are READ: a forward pre-hook on each consumer conv
replaces a skipped channel by a per-channel constant `fill` (learned; 0 when a consumer is not a
1x1 conv). So a skipped channel costs nothing anywhere along its path: the gated conv, its BN and
activation, a depthwise conv in between (MobileNetV2), and the consumer, which instead adds
`fill[c] * W[:, c]` to its bias for that input (C_out MACs per skipped channel, counted). Masking
the conv's own output instead breaks MobileNetV2: the depthwise BN turns a zeroed channel into a
large input-dependent constant, and training collapsed to chance (measured, benchmarks/methods.md).

The predictor is FITTED, not trained by the task loss: `fit_predictors` solves ridge regression
from GAP(x) to each gated channel's per-input mean at the consumer, at density 1, once, so the
top-k keeps the channels that are most active for this input. Trained through FBS's saliency
scaling instead, the ranks churned between nearly tied saliencies and training collapsed to chance
(measured); its output no longer scales the channels. A fresh gate has W = 0, b = 1, so every
saliency ties and at d = 1 the gate is a bit-exact identity. Each gate records its per-image mask,
and `pipelines.macs.count_macs(..., inputs=...)` counts what a gated runtime would.

Which layers (`default_gate_layers`, found by tracing with torch.fx): every ungrouped conv, not
reading the image itself, followed by BatchNorm2d then a zero-preserving activation (ReLU, ReLU6,
SiLU, ...) whose output reaches ONLY convs (possibly through pools, BN, activations and depthwise
convs), i.e. channels not tied to a residual add or a concatenation. ResNet: conv1 of each
BasicBlock (conv1 and conv2 of each Bottleneck); MobileNetV2: the expansion 1x1 conv of each block.

Gate after structural pruning: `pipelines.prune` does not understand gated models.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from pipelines._gate_graph import bn_act, module_of, reach


__all__ = [
    "DESCRIPTION", "ChannelGate", "default_gate_layers", "gate_stages", "add_gates", "add_stage_gates", "named_gates", "set_density",
    "density_schedule", "kept_channels", "fit_predictors", "channel_usage", "freeze_static_channels", "gate_spec",
]

DESCRIPTION = (
    "AFS/FBS dynamic channel gating: per input keep the top ceil(d*C) channels of each gated conv by predicted"
    " saliency (a predictor fitted to each channel's per-input activation); density d per stage, optionally"
    " stepped down from 1 over gating_warmup epochs; MACs are the expectation over val images"
)



def kept_channels(channels: int, density: float) -> int:
    """`ceil(density * channels)`, immune to float noise (0.7 * 10 is 7.000000000000001)."""
    return math.ceil(round(density * channels, 6))


def _checked(density: float) -> float:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return float(density)


class ChannelGate(nn.Module):
    """conv -> BN, plus the per-input channel mask its consumers apply (see the module docstring).

    Buffers `static` (always kept) and `pruned` (never kept) come from `freeze_static_channels`;
    both start all False. `fill` (a parameter, or None) is what a skipped channel reads as.
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
        fill: bool = False,
    ) -> None:
        super().__init__()
        channels = conv.out_channels
        self.conv, self.bn = conv, bn
        self.predictor = nn.Linear(conv.in_channels, channels).to(conv.weight)  # same device and dtype
        nn.init.zeros_(self.predictor.weight)
        nn.init.ones_(self.predictor.bias)
        self.predictor.requires_grad_(False)  # fitted by fit_predictors, never by the loss
        self.fill = nn.Parameter(conv.weight.new_zeros(channels)) if fill else None
        self.register_buffer("static", torch.zeros(channels, dtype=torch.bool, device=conv.weight.device))
        self.register_buffer("pruned", torch.zeros(channels, dtype=torch.bool, device=conv.weight.device))
        self.density = _checked(density)
        self.bn_name = bn_name  # where the BN lived; its slot now holds nn.Identity
        self.consumers = tuple(consumers)  # convs reading the gated channels (names in the model)
        self.followers = tuple(followers)  # depthwise convs whose channels follow the gate
        self.last_mask: torch.Tensor | None = None  # N x C bool, from the latest forward
        self.last_saliency: torch.Tensor | None = None  # N x C, the predicted g of the latest forward

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
        g = F.relu(self.predictor(x.mean(dim=(2, 3))))
        scores = g.masked_fill(self.static, math.inf).masked_fill(self.pruned, -math.inf)
        top = scores.topk(self.kept, dim=1).indices
        mask = torch.zeros_like(g, dtype=torch.bool).scatter(1, top, torch.ones_like(top, dtype=torch.bool))  # out of place: TorchScript's ONNX exporter traces it
        self.last_mask, self.last_saliency = mask, g
        return self.bn(self.conv(x))

    def mask_input(self, _consumer: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook of each consumer: skipped channels of its input read `fill` (or 0)."""
        x, *rest = args
        keep = self.last_mask[:, :, None, None]
        skipped = 0.0 if self.fill is None else self.fill[:, None, None]
        return (torch.where(keep, x, skipped), *rest)

    def extra_repr(self) -> str:
        return f"density={self.density}, bn_name={self.bn_name!r}, fill={self.fill is not None}"


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[str, nn.Module]]:
    if any(isinstance(m, ChannelGate) for m in model.modules()):
        raise ValueError("the model already has gates; add them once, to the ungated model")
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many types for untraceable control flow
        raise ValueError(f"gating: torch.fx cannot trace {type(model).__name__}: {error}") from error
    return graph, dict(model.named_modules())


def default_gate_layers(model: nn.Module) -> list[str]:
    """Names of the convs the module docstring's rule selects, in graph order."""
    graph, modules = _trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    names = []
    for node in graph.nodes:
        conv = module_of(node, modules)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or calls[node.target] != 1:
            continue
        if node.args[0].op == "placeholder":  # the stem: a GAP of the image says little
            continue
        chain = bn_act(node, modules)
        if chain is None or calls[chain[0].target] != 1:
            continue
        consumers, _, clean = reach(chain[1], modules)
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
        chain = bn_act(nodes[name], modules)
        if chain is None:
            raise ValueError(f"{name}: a gate needs conv -> BatchNorm2d -> ReLU-like activation, each used once")
        bn, act = chain
        consumers, followers, clean = reach(act, modules)
        if not (clean and consumers):
            raise ValueError(f"{name}: a gate's channels must reach only convs (no residual add or concatenation)")
        gate = ChannelGate(
            modules[name],
            modules[bn.target],
            density=per_layer[name],
            bn_name=bn.target,
            consumers=consumers,
            followers=followers,
            fill=all(_pointwise(modules[c]) for c in consumers),
        )
        _replace(model, bn.target, nn.Identity())
        _replace(model, name, gate)
    for gate in named_gates(model).values():  # after all swaps: a consumer may itself be a gate
        for consumer in gate.consumers:
            model.get_submodule(consumer).register_forward_pre_hook(gate.mask_input)
    return model


def add_stage_gates(model: nn.Module, densities: Mapping[str, float]) -> dict[str, float]:
    """Gate every `default_gate_layers` conv at its stage's density (absent stages: 1.0); returns conv -> density."""
    layers = default_gate_layers(model)
    stages = gate_stages(model, layers=layers)
    per_layer = {name: densities.get(stages[name], 1.0) for name in layers}
    add_gates(model, per_layer, layers=layers)
    return per_layer


def _pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 conv without padding: a constant input channel adds a constant to each output (its bias)."""
    return conv.kernel_size == (1, 1) and conv.padding in ((0, 0), "valid")


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


def density_schedule(target: Mapping[str, float] | float, epochs: int, *, warmup: int) -> list:
    """Per-epoch densities: from 1.0 linearly down to `target`, reached after `warmup` epochs, then held.

    `warmup` 0 gives the target throughout; it is capped at epochs - 1, so the last epoch always
    trains at the target. A mapping target gives one mapping per epoch.
    """
    if epochs < 1 or warmup < 0:
        raise ValueError(f"need epochs >= 1 and warmup >= 0, got {epochs} and {warmup}")
    warmup = min(warmup, epochs - 1)

    def at(value: float, epoch: int) -> float:
        value = _checked(value)
        if epoch >= warmup:
            return value
        return 1.0 + (value - 1.0) * epoch / warmup

    if isinstance(target, Mapping):
        return [{name: at(value, e) for name, value in target.items()} for e in range(epochs)]
    return [at(target, e) for e in range(epochs)]


def _forward_each(model: nn.Module, batches: Iterable) -> Iterator[int]:
    """Run each batch (images, or a tuple starting with them) through `model` in eval mode without
    gradients, yielding its image count; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images)
                yield len(images)
    finally:
        model.train(was_training)


@torch.no_grad()
def fit_predictors(model: nn.Module, batches: Iterable, *, ridge: float = 1e-3) -> dict[str, float]:
    """Fit every gate's predictor and fill on `batches` (eval mode, all gates at density 1); returns R^2 per gate.

    The predictor is the ridge regression (`ridge` x the mean diagonal of X'X, so it is scale-free)
    from [GAP(gate input), 1] to each gated channel's per-image spatial mean where its consumers
    read it. `fill` starts as each channel's mean over the images whose top-ceil(d*C) (at the gate's
    current density) skips it, so a skip changes its consumers' input as little as possible on average.
    Call it before `freeze_static_channels`; `batches` yields images or tuples starting with them.
    """
    gates = named_gates(model)
    if not gates:
        raise ValueError("fit_predictors: the model has no gates")
    pooled: dict[str, list[torch.Tensor]] = defaultdict(list)
    read: dict[str, list[torch.Tensor]] = defaultdict(list)

    def recorder(store: list[torch.Tensor]):
        return lambda _module, args: store.append(args[0].mean(dim=(2, 3)).double())

    handles = [gate.register_forward_pre_hook(recorder(pooled[name])) for name, gate in gates.items()]
    handles += [model.get_submodule(g.consumers[0]).register_forward_pre_hook(recorder(read[n])) for n, g in gates.items()]
    densities = {name: gate.density for name, gate in gates.items()}
    set_density(model, 1.0)
    try:
        seen = sum(_forward_each(model, batches))
    finally:
        for handle in handles:
            handle.remove()
        set_density(model, densities)
    if seen == 0:
        raise ValueError("fit_predictors got no images")
    fits = {}
    for name, gate in gates.items():
        x, y = torch.cat(pooled[name]), torch.cat(read[name])
        x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        gram = x.T @ x
        gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        solution = torch.linalg.solve(gram, x.T @ y)
        gate.predictor.weight.copy_(solution[:-1].T)
        gate.predictor.bias.copy_(solution[-1])
        predicted = x @ solution
        fits[name] = float(1 - (predicted - y).square().sum() / (y - y.mean(dim=0)).square().sum().clamp(min=1e-12))
        if gate.fill is not None:
            kept = predicted.clamp(min=0).topk(gate.kept, dim=1).indices
            skipped = torch.ones_like(y).scatter_(1, kept, 0.0)
            mean_when_skipped = (y * skipped).sum(dim=0) / skipped.sum(dim=0).clamp(min=1)
            gate.fill.copy_(torch.where(skipped.sum(dim=0) > 0, mean_when_skipped, y.mean(dim=0)))
    return fits


@torch.no_grad()
def channel_usage(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Per gate, the fraction of inputs for which each channel was kept (eval mode).

    `batches` yields image tensors or tuples starting with one (as `pipelines.data.batches` does).
    """
    gates = named_gates(model)
    kept = {name: torch.zeros(g.conv.out_channels) for name, g in gates.items()}
    seen = 0
    for count in _forward_each(model, batches):
        seen += count
        for name, gate in gates.items():
            kept[name] += gate.last_mask.sum(dim=0).cpu()
    if seen == 0:
        raise ValueError("channel_usage got no images")
    return {name: counts / seen for name, counts in kept.items()}


@torch.no_grad()
def freeze_static_channels(
    model: nn.Module, usage: Mapping[str, torch.Tensor], *, never: float = 0.01, always: float = 0.99
) -> dict[str, dict[str, int]]:
    """Kept for < `never` of inputs -> pruned; > `always` -> static; else dynamic.

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
            "fill": gate.fill is not None,
            "static": gate.static.nonzero().flatten().tolist(),
            "pruned": gate.pruned.nonzero().flatten().tolist(),
        }
        for name, gate in named_gates(model).items()
    }
