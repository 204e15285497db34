"""A trial's training state after an epoch, saved without pickle, so that a trial whose process or
node died resumes at the next epoch instead of starting over.

A checkpoint directory holds `model/` (the pruned student, as `pipelines.export` saves any model:
safetensors + channel spec), `state.safetensors` (the optimizer's tensors and the RNG state) and
`state.json` (the epoch, the optimizer's scalars and parameter groups, the learning-rate
scheduler's state, and what the trial measured before training). A directory is replaced whole,
so a reader never sees half of one.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.export import load_model, save_model

__all__ = ["TrainingCheckpoint", "save_checkpoint", "load_checkpoint", "checkpoint_epoch"]

_STATE_JSON = "state.json"
_STATE_TENSORS = "state.safetensors"
_RNG = "rng.cpu"


@dataclass
class TrainingCheckpoint:
    model: nn.Module
    epoch: int  # the trial's epochs done, in its own numbering (a sparsity epoch counts)
    optimizer: dict[str, Any]  # for optimizer.load_state_dict
    scheduler: dict[str, Any]  # for scheduler.load_state_dict
    rng: torch.Tensor  # torch's CPU generator state after the epoch
    measured: dict[str, float]  # what the trial measured before training (e.g. its proxy accuracy)


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    arch: str,
    epoch: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    measured: dict[str, float],
) -> Path:
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_model(model, partial / "model", arch=arch, metadata={})
    state = optimizer.state_dict()
    tensors = {_RNG: torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(partial / _STATE_TENSORS))
    record = {
        "epoch": epoch,
        "optimizer": {"param_groups": state["param_groups"], "scalars": scalars},
        "scheduler": scheduler.state_dict(),
        "measured": measured,
    }
    (partial / _STATE_JSON).write_text(json.dumps(record))
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


def checkpoint_epoch(directory: str | Path) -> int:
    """The trial epoch after which the checkpoint in `directory` was saved, without loading it."""
    return int(json.loads((Path(directory) / _STATE_JSON).read_text())["epoch"])


def load_checkpoint(directory: str | Path) -> TrainingCheckpoint:
    """The checkpoint in `directory`; the model on the CPU in eval mode, as `load_model` gives it."""
    directory = Path(directory)
    record = json.loads((directory / _STATE_JSON).read_text())
    tensors = load_file(str(directory / _STATE_TENSORS))
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entry in record["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    model, _ = load_model(directory / "model")
    return TrainingCheckpoint(
        model=model,
        epoch=int(record["epoch"]),
        optimizer={"state": state, "param_groups": record["optimizer"]["param_groups"]},
        scheduler=record["scheduler"],
        rng=tensors[_RNG],
        measured=record["measured"],
    )
