"""A trial's state between stages and epochs, `TrialState`, which is also its checkpoint: saved
without pickle after every epoch, so that a trial whose process or node died resumes at the next
epoch instead of starting over, with the same results as without the interruption.

A checkpoint directory holds the networks as `pipelines.export` saves any model (safetensors +
channel spec): `student/`, `tracer/` and `previous/` where the trial has them; `snapshots.safetensors`
(the trajectory criterion's per-epoch conv/linear weights), `loss_parts.safetensors` (the learned
parts of the losses), `state.safetensors` (the optimizer's tensors and the RNG state) and
`state.json` (epochs, rounds, decisions, the optimizer's scalars and parameter groups, the learning
rate scheduler). A directory is replaced whole, so a reader never sees half of one.
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.export import load_model, save_model

__all__ = ["TrialState", "save_state", "load_state", "checkpoint_epoch"]

_STATE_JSON = "state.json"
_STATE_TENSORS = "state.safetensors"
_SNAPSHOTS = "snapshots.safetensors"
_LOSS_PARTS = "loss_parts.safetensors"
_RNG = "rng.cpu"
_NETWORKS = ("student", "tracer", "previous")


@dataclass
class TrialState:
    """Everything one trial has built and decided so far; each stage of `run_trial` advances it."""

    student: nn.Module
    tracer: nn.Module | None = None  # the pretrained network pruned in step: L2-SP anchors, kept channels' indices
    snapshots: list[nn.Module] = field(default_factory=list)  # teacher-epoch weights pruned in step, until the last cut
    loss_parts: nn.ModuleDict = field(default_factory=nn.ModuleDict)  # trained across rounds: source-KD head, AFD attention
    start_widths: dict[str, int] = field(default_factory=dict)  # every group's channels before the first cut
    target: dict[str, int] | None = None  # the channels each group keeps in the end, once decided
    epoch: int = 0  # passes over the train split so far (a sparsity epoch counts)
    cuts: int = 0  # pruning rounds whose cut is done
    round_epochs: int = 0  # fine-tune epochs done in the current round
    rounds: list[dict[str, float]] = field(default_factory=list)  # one record per finished round
    best: float = -1.0  # the best round's accuracy (the stop rule of iterative schedules)
    proxy_accuracy: float | None = None  # val accuracy after the first cut, before fine-tuning
    previous: nn.Module | None = None  # the last round's student, to go back to if this round falls short
    optimizer: dict[str, Any] | None = None  # the current round's optimizer and scheduler, mid-round
    scheduler: dict[str, Any] | None = None
    rng: torch.Tensor | None = None  # torch's CPU generator after the last epoch

    @property
    def followers(self) -> list[nn.Module]:
        """The networks pruned in step with the student."""
        return ([self.tracer] if self.tracer is not None else []) + self.snapshots


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def save_state(state: TrialState, directory: str | Path, *, arch: str) -> Path:
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for name in _NETWORKS:
        if (network := getattr(state, name)) is not None:
            save_model(network, partial / name, arch=arch, metadata={})
    snapshots = {f"{i}.{k}": w.detach().cpu().contiguous() for i, s in enumerate(state.snapshots) for k, w in _weights(s).items()}
    save_file(snapshots, str(partial / _SNAPSHOTS))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.loss_parts.state_dict().items()}, str(partial / _LOSS_PARTS))
    tensors = {_RNG: state.rng if state.rng is not None else torch.get_rng_state()}
    optimizer = None
    if state.optimizer is not None:
        scalars: dict[str, dict[str, Any]] = {}
        for index, entry in state.optimizer["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        optimizer = {"param_groups": state.optimizer["param_groups"], "scalars": scalars}
    save_file(tensors, str(partial / _STATE_TENSORS))
    record = {
        "epoch": state.epoch,
        "cuts": state.cuts,
        "round_epochs": state.round_epochs,
        "rounds": state.rounds,
        "best": state.best,
        "proxy_accuracy": state.proxy_accuracy,
        "start_widths": state.start_widths,
        "target": state.target,
        "snapshots": len(state.snapshots),
        "optimizer": optimizer,
        "scheduler": state.scheduler,
    }
    (partial / _STATE_JSON).write_text(json.dumps(record))
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


def checkpoint_epoch(directory: str | Path) -> int:
    """The trial epoch after which the checkpoint in `directory` was saved, without loading it."""
    return int(json.loads((Path(directory) / _STATE_JSON).read_text())["epoch"])


def load_state(directory: str | Path, *, loss_parts: nn.ModuleDict) -> TrialState:
    """The state saved in `directory`; networks on the CPU in eval mode, as `load_model` gives them.
    `loss_parts`: the trial's freshly built `learned_parts`, whose weights are set from the checkpoint."""
    directory = Path(directory)
    record = json.loads((directory / _STATE_JSON).read_text())
    tensors = load_file(str(directory / _STATE_TENSORS))
    networks = {name: load_model(directory / name)[0] if (directory / name).exists() else None for name in _NETWORKS}
    snapshots = []
    saved = load_file(str(directory / _SNAPSHOTS))
    for i in range(record["snapshots"]):
        snapshot = copy.deepcopy(networks["student"])
        for key, weight in _weights(snapshot).items():
            weight.data.copy_(saved[f"{i}.{key}"])
        snapshots.append(snapshot)
    loss_parts.load_state_dict(load_file(str(directory / _LOSS_PARTS)))
    optimizer = None
    if record["optimizer"] is not None:
        state: dict[int, dict[str, Any]] = {}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value
        for index, entry in record["optimizer"]["scalars"].items():
            state.setdefault(int(index), {}).update(entry)
        optimizer = {"state": state, "param_groups": record["optimizer"]["param_groups"]}
    return TrialState(
        student=networks["student"],
        tracer=networks["tracer"],
        snapshots=snapshots,
        loss_parts=loss_parts,
        start_widths=record["start_widths"],
        target=record["target"],
        epoch=int(record["epoch"]),
        cuts=int(record["cuts"]),
        round_epochs=int(record["round_epochs"]),
        rounds=record["rounds"],
        best=float(record["best"]),
        proxy_accuracy=record["proxy_accuracy"],
        previous=networks["previous"],
        optimizer=optimizer,
        scheduler=record["scheduler"],
        rng=tensors[_RNG],
    )
