"""Pruning schedules: how the cut from the dense network to the target widths is spread over time.

Every schedule gets the same fine-tuning compute (the trial's epochs, split across rounds), so
schedules compare fairly. Each returns one record per round.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines._registry import Registry
from pipelines.gating import ChannelGate
from pipelines.prune import Group, prune_to_counts

__all__ = ["SCHEDULES", "PruningSession", "round_counts", "split_epochs"]


@dataclass
class PruningSession:
    """The mutable state of one trial's pruning, and the callbacks a schedule drives."""

    student: nn.Module
    followers: list[nn.Module]  # pruned alongside the student: anchors/channel tracer, weight snapshots
    groups: list[Group]  # the dense network's groups
    target: dict[str, int]  # channels each group keeps at the end
    image_size: int
    score: Callable[[nn.Module, list[nn.Module]], dict[nn.Module, torch.Tensor]]  # criterion on (student, followers)
    recalibrate: Callable[[nn.Module], None]  # BN statistics on train batches
    val_loss_and_accuracy: Callable[[nn.Module], tuple[float, float]]  # the proxy: val accuracy after the first cut
    # Loss and accuracy that schedules decide on: a selection split carved from train, never val
    # (val is the search's objective; deciding on it would make these trials look better than they are).
    decide_loss_and_accuracy: Callable[[nn.Module], tuple[float, float]]
    fit: Callable[[nn.Module, list[nn.Module], int], float]  # (student, followers, epochs) -> accuracy to decide on
    dense_scores: dict[nn.Module, torch.Tensor] | None = None  # the criterion on the unpruned student, if already computed
    proxy_accuracy: float | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)

    def current(self) -> dict[str, int]:
        """Channels each group has now (read off the student's named layers' output widths)."""
        widths = {}
        for g in self.groups:
            layer = self.student.get_submodule(g.name)
            if isinstance(layer, ChannelGate):  # a gated conv keeps its static width
                layer = layer.conv
            widths[g.name] = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        return widths

    def cut(self, counts: dict[str, int]) -> None:
        scores = self.dense_scores if self.dense_scores is not None else self.score(self.student, self.followers)
        self.dense_scores = None  # valid for the first cut only
        prune_to_counts(self.student, counts, image_size=self.image_size, scores=scores, followers=self.followers)
        self.recalibrate(self.student)
        if self.proxy_accuracy is None:
            self.proxy_accuracy = self.val_loss_and_accuracy(self.student)[1]

    def snapshot(self) -> tuple[nn.Module, list[nn.Module]]:
        return copy.deepcopy(self.student), copy.deepcopy(self.followers)

    def restore(self, saved: tuple[nn.Module, list[nn.Module]]) -> None:
        self.student, self.followers = saved


SCHEDULES: Registry[Callable[..., None]] = Registry("pruning schedule")


def split_epochs(epochs: int, rounds: int) -> list[int]:
    """`epochs` spread over at most `rounds` rounds, each at least one epoch, earlier rounds shorter."""
    rounds = max(1, min(rounds, epochs))
    base, extra = divmod(epochs, rounds)
    return [base + (1 if i >= rounds - extra else 0) for i in range(rounds)]


def round_counts(dense: dict[str, int], target: dict[str, int], fraction: float) -> dict[str, int]:
    """Widths `fraction` of the way from dense to target (linear in channels removed)."""
    return {name: dense[name] - round((dense[name] - target[name]) * fraction) for name in target}


@SCHEDULES.register("one_shot", description="cut to the target widths once, then fine-tune all epochs")
def one_shot(session: PruningSession, *, epochs: int, rounds: int, max_drop: float) -> None:
    session.cut(session.target)
    val = session.fit(session.student, session.followers, epochs)
    session.rounds.append({"round": 1, "accuracy": val})


def _stop_rule_rounds(session: PruningSession, *, epochs: int, rounds: int, max_drop: float, choose: Callable) -> None:
    """Shared loop of the iterative schedules: cut (via `choose`) -> fine-tune -> stop on a drop.

    When a round's accuracy (on the selection split) falls more than `max_drop` below the best round, the model of
    the previous round is restored and pruning stops short of the target (the MACs then
    reported are those of the model actually kept).
    """
    dense = session.current()
    plan = split_epochs(epochs, rounds)
    best = -1.0
    for i, round_epochs in enumerate(plan, start=1):
        saved = session.snapshot() if i > 1 else None
        goal = round_counts(dense, session.target, i / len(plan))
        choose(session, goal, final=i == len(plan))
        val = session.fit(session.student, session.followers, round_epochs)
        session.rounds.append({"round": i, "accuracy": val, "channels": float(sum(session.current().values()))})
        if saved is not None and val < best - max_drop:
            session.restore(saved)
            session.rounds[-1]["reverted"] = 1.0
            return
        best = max(best, val)


@SCHEDULES.register(
    "iterative",
    description="TASCNet / Zhong: k rounds of prune -> fine-tune, stopping when the selection-split accuracy drops > max_drop below the best; knobs: rounds, max_drop",
)
def iterative(session: PruningSession, *, epochs: int, rounds: int, max_drop: float) -> None:
    _stop_rule_rounds(session, epochs=epochs, rounds=rounds, max_drop=max_drop, choose=lambda s, goal, final: s.cut(goal))


def _priority_cuts(session: PruningSession, goal: dict[str, int], *, final: bool) -> None:
    """Zhong et al.'s priority: try each group's cut alone, apply the least harmful half first."""
    now = session.current()
    pending = [name for name in goal if goal[name] < now[name]]
    if not pending:
        return
    if final:
        session.cut(goal)
        return
    harm = {}
    for name in pending:
        trial_model, trial_followers = copy.deepcopy((session.student, session.followers))
        scores = session.score(trial_model, trial_followers)
        prune_to_counts(trial_model, {name: goal[name]}, image_size=session.image_size, scores=scores)
        session.recalibrate(trial_model)
        harm[name] = session.decide_loss_and_accuracy(trial_model)[0]
    chosen = sorted(pending, key=harm.__getitem__)[: max(1, (len(pending) + 1) // 2)]
    session.cut({name: goal[name] for name in chosen})


@SCHEDULES.register(
    "priority",
    description="Zhong et al. 2018: per round, cut first the groups whose candidate cut hurts the selection-split loss least; knobs: rounds, max_drop",
)
def priority(session: PruningSession, *, epochs: int, rounds: int, max_drop: float) -> None:
    _stop_rule_rounds(session, epochs=epochs, rounds=rounds, max_drop=max_drop, choose=_priority_cuts)
