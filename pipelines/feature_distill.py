"""Feature-map regularisers towards the frozen source network: DELTA and AFD (attentive feature distillation).

Both compare a student feature map with the source net's map *restricted to the same kept channels*
(`DistillBatch.student_features` / `source_features`, aligned by the trial). Their channel weights
and attention nets are sized to the source's (unpruned) widths and read the kept channels'
entries (`DistillBatch.source_channels`), so a term survives pruning rounds unchanged. Distances are means over
the spatial positions (and, for DELTA, the batch), not the papers' sums, so a weight means the same at
any image size; the papers' weights (DELTA ~0.01 on sums) are thus not directly transferable.
The terms are registered in `pipelines.distill.LOSSES` by `pipelines.distill` (this module does not
import it at run time, so there is no import cycle).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from pipelines.distill import DistillBatch

__all__ = ["DeltaLoss", "AFDLoss", "delta_channel_weights"]


def _layer_pairs(
    batch: DistillBatch, known: Mapping[str, int], term: str
) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(name, student, detached source, kept channel indices or None) for every feature in the
    batch, checked against the term's layers (`known`: their unpruned widths)."""
    if not batch.student_features:
        raise ValueError(f"{term} needs batch.student_features (and source_features); none were given")
    pairs = []
    for name, student in batch.student_features.items():
        if name not in known:
            raise KeyError(f"{term}: feature {name!r} has no channel weights/attention; known: {', '.join(known)}")
        if name not in batch.source_features:
            raise ValueError(f"{term}: batch.source_features lacks {name!r}")
        source = batch.source_features[name].detach()
        index = batch.source_channels.get(name)
        width = known[name] if index is None else len(index)
        if student.shape != source.shape or student.dim() < 2 or student.shape[1] != width:
            raise ValueError(
                f"{term}: feature {name!r}: student {tuple(student.shape)} and source {tuple(source.shape)}"
                f" must be equal N x {width} x ... maps"
            )
        pairs.append((name, student, source, index))
    return pairs


def _channel_mse(student: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """N x C: mean over every dim after the channel dim of the squared difference."""
    diff = (student - source).pow(2)
    return diff.flatten(2).mean(dim=2) if diff.dim() > 2 else diff


class DeltaLoss(nn.Module):
    """DELTA (Li et al. ICLR 2019): `sum_l sum_c w_l[c] * mean_{n,h,w} (f_l[c] - f*_l[c])^2`.

    `channel_weights[name]` comes from `delta_channel_weights` on the full source net; the kept
    channels' weights are used. They are NOT renormalised after pruning: a heavily pruned layer
    whose important channels survive keeps most of its weight. Sums over the batch's feature names.
    """

    part = "delta"
    batch_fields = frozenset({"student_features", "source_features"})
    context = frozenset({"channel_weights"})

    def __init__(self, *, channel_weights: Mapping[str, torch.Tensor], weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = weight
        # a plain dict: module names such as "features.3" cannot be buffer names
        self.channel_weights = {name: w.detach().clone().float().flatten() for name, w in channel_weights.items()}

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        sizes = {name: len(w) for name, w in self.channel_weights.items()}
        total = None
        for name, student, source, index in _layer_pairs(batch, sizes, "delta"):
            per_channel = _channel_mse(student, source).mean(dim=0)
            weights = self.channel_weights[name].to(per_channel)
            term = ((weights if index is None else weights[index.to(weights.device)]) * per_channel).sum()
            total = term if total is None else total + term
        return {"delta": total}


@torch.no_grad()
def delta_channel_weights(
    model: nn.Module,
    layer_names: list[str],
    batches: Iterable[tuple[torch.Tensor, ...]],
    *,
    temperature: float = 5.0,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """DELTA's channel weights: `softmax(standardise(loss increase when channel c is zeroed) / temperature)`.

    `model` must output logits for the labels' classes (the dense fine-tuned teacher, or the source
    backbone with a target-trained head); its channel indices are the source's. `batches` yields
    (images, labels, ...) tuples (`data.batches` triples work). Cost: `(1 + sum_l C_l)` eval forwards per
    batch (960 + 1 for resnet18's four stages), so compute it once per search and cache it; `max_batches`
    caps it. Increases are averaged per image over the batches and standardised per layer with the
    population std (a layer whose channels all tie gets uniform weights). Runs in eval mode without
    gradients; the model's parameters, buffers and train/eval mode are unchanged afterwards.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    modules = {name: model.get_submodule(name) for name in layer_names}
    ablate: list[tuple[str, int] | None] = [None]
    widths: dict[str, int] = {}

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            widths[name] = output.shape[1]
            if ablate[0] is None or ablate[0][0] != name:
                return None
            zeroed = output.clone()  # never in place: the output may feed a residual add
            zeroed[:, ablate[0][1]] = 0
            return zeroed

        return hook

    was_training = model.training
    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    increases: dict[str, torch.Tensor] = {}
    seen = 0
    model.eval()
    try:
        for step, batch in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            images, labels = batch[0], batch[1]
            ablate[0] = None
            base = F.cross_entropy(model(images), labels, reduction="sum").double()
            for name in layer_names:
                sums = increases.setdefault(name, torch.zeros(widths[name], dtype=torch.float64))
                for channel in range(widths[name]):
                    ablate[0] = (name, channel)
                    sums[channel] += F.cross_entropy(model(images), labels, reduction="sum").double() - base
            seen += len(labels)
    finally:
        ablate[0] = None
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("delta_channel_weights: `batches` yielded no images")
    weights = {}
    for name in layer_names:
        increase = increases[name] / seen
        std = increase.std(correction=0)
        standardised = (increase - increase.mean()) / std if std > 0 else torch.zeros_like(increase)
        weights[name] = torch.softmax(standardised / temperature, dim=0).float()
    return weights


def _module_key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot contain dots


class AFDLoss(nn.Module):
    """AFD (Wang et al. ICLR 2020): `mean_n sum_l sum_c rho_l[c](x_n) * mean_{h,w} (f_l[c] - f*_l[c])^2`.

    rho_l(x) = SE-style attention on the SOURCE map: GAP -> Linear(C, max(4, C//4)) -> ReLU ->
    Linear(., C) -> sigmoid, normalised to sum 1 over channels (last layer zero-initialised, so rho
    starts uniform at 1/C and `afd` starts as the plain channel-mean feature distance).

    Anti-collapse remedy (the surprising part): trained jointly on the weighted distance itself, rho's
    optimum is all mass on the currently closest channel (paper softmax: max rho 0.99 after 200 Adam
    steps; sigmoid normalisation alone only delays it: 1.0 after 3000 steps; an entropy bonus on the raw
    distance is scale dependent: 0.78 at unit scale). Here rho gets its OWN objective, per image and
    layer, `sum_c rho[c] * d~[c] - entropy_weight * H(rho)`, with `d~ = d / mean_c d` (detached), whose
    optimum is the soft-min `rho ∝ exp(-d~ / entropy_weight)`: independent of the feature scale and
    bounded, `max rho <= 1 / (1 + (C-1) exp(-C / ((C-1) entropy_weight)))` (0.164 for C=16 at the
    default 1.0). It keeps regularising channels that still resemble the source and relaxes channels
    the target has repurposed. That objective enters as a zero-VALUED surrogate added to part `afd`: the
    value of `afd` is exactly the weighted distance (rho detached there, so the student is pulled towards
    the source only), while its gradient also trains the attention nets. The attention gradient is thus
    scaled by the term's `weight`, harmless under Adam/AdamW. Part `afd_entropy` = H(rho)/log C averaged
    over layers and images (1 = uniform, 0 = collapsed) is a diagnostic and is not in the total.
    The attention nets are submodules: add `.parameters()` to the optimiser.
    """

    part = "afd"
    batch_fields = frozenset({"student_features", "source_features"})
    context = frozenset({"channels"})

    def __init__(self, *, channels: Mapping[str, int], weight: float, entropy_weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0 or entropy_weight < 0:
            raise ValueError(f"weight and entropy_weight must be >= 0, got {weight}, {entropy_weight}")
        self.weight = weight
        self.entropy_weight = entropy_weight
        self.channels = dict(channels)
        self.attention = nn.ModuleDict({_module_key(name): self._attention_net(c) for name, c in self.channels.items()})

    @staticmethod
    def _attention_net(channels: int) -> nn.Sequential:
        hidden = max(4, channels // 4)
        net = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        nn.init.zeros_(net[2].weight)
        nn.init.zeros_(net[2].bias)
        return net

    def attention_weights(self, name: str, source: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """rho for layer `name`: N x C, each row positive and summing to 1. `index`: the source
        channels that `source`'s C are (pruned maps); the pruned channels enter the net as zeros
        and leave its output, which is the net with those inputs and outputs removed."""
        pooled = (source.flatten(2).mean(dim=2) if source.dim() > 2 else source).detach()
        if index is not None:
            pooled = pooled.new_zeros(len(pooled), self.channels[name]).index_copy(1, index.to(pooled.device), pooled)
        gates = torch.sigmoid(self.attention[_module_key(name)](pooled))
        if index is not None:
            gates = gates[:, index.to(gates.device)]
        return gates / gates.sum(dim=1, keepdim=True)

    def forward(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        distance, surrogate, entropies = None, None, []
        for name, student, source, index in _layer_pairs(batch, self.channels, "afd"):
            d = _channel_mse(student, source)
            rho = self.attention_weights(name, source, index)
            layer = (rho.detach() * d).sum(dim=1).mean()
            entropy = -(rho * rho.clamp_min(1e-12).log()).sum(dim=1)
            relative = (d / (d.mean(dim=1, keepdim=True) + 1e-12)).detach()
            own = (rho * relative).sum(dim=1).mean() - self.entropy_weight * entropy.mean()
            distance = layer if distance is None else distance + layer
            surrogate = own - own.detach() if surrogate is None else surrogate + (own - own.detach())
            c = rho.shape[1]
            entropies.append(entropy.mean().detach() / math.log(c) if c > 1 else torch.ones((), device=d.device))
        return {"afd": distance + surrogate, "afd_entropy": torch.stack(entropies).mean()}
