"""Pruning schedules: how the cut from the dense network to the target widths is spread over time.

Every schedule gets the same fine-tuning compute (the trial's epochs, split across rounds), so
schedules compare fairly. Each returns one record per round.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipelines._registry import Registry
from pipelines.checkpoint import TrialState
from pipelines.gating import ChannelGate
from pipelines.prune import Group, prune_to_counts

__all__ = ["SCHEDULES", "PruningSession", "group_widths", "round_counts", "split_epochs"]


def group_widths(model: nn.Module, groups: list[Group]) -> dict[str, int]:
    """Channels each group has now (read off the named layers' output widths)."""
    widths = {}
    for g in groups:
        layer = model.get_submodule(g.name)
        if isinstance(layer, ChannelGate):  # a gated conv keeps its static width
            layer = layer.conv
        widths[g.name] = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    return widths


@dataclass
class PruningSession:
    """One trial's pruning: its state, and the callbacks a schedule drives.

    Schedules are re-entrant: they read how far the state got (cuts done, rounds recorded, epochs
    of the current round) and carry on from there, so a trial resumed from a checkpoint mid-round
    continues that round instead of starting over.
    """

    state: TrialState
    groups: list[Group]  # the dense network's groups
    image_size: int
    score: Callable[[nn.Module, list[nn.Module]], dict[nn.Module, torch.Tensor]]  # criterion on (student, followers)
    recalibrate: Callable[[nn.Module], None]  # BN statistics on train batches
    val_loss_and_accuracy: Callable[[nn.Module], tuple[float, float]]  # the proxy: val accuracy after the first cut
    # Loss and accuracy that schedules decide on: a selection split carved from train, never val
    # (val is the search's objective; deciding on it would make these trials look better than they are).
    decide_loss_and_accuracy: Callable[[nn.Module], tuple[float, float]]
    fit: Callable[[int], float]  # train the current round up to its planned epochs -> accuracy to decide on
    dense_scores: dict[nn.Module, torch.Tensor] | None = None  # the criterion on the unpruned student, if already computed

    @property
    def target(self) -> dict[str, int]:
        return self.state.target

    def current(self) -> dict[str, int]:
        return group_widths(self.state.student, self.groups)

    def cut(self, counts: dict[str, int], *, final: bool = True) -> None:
        """Prune the student (and its followers) to `counts`, recalibrate BN; starts a round."""
        state = self.state
        scores = self.dense_scores if self.dense_scores is not None else self.score(state.student, state.followers)
        self.dense_scores = None  # valid for the first cut only
        prune_to_counts(state.student, counts, image_size=self.image_size, scores=scores, followers=state.followers)
        if final:
            state.snapshots = []  # only scoring reads them, and nothing is scored any more
        self.recalibrate(state.student)
        if state.proxy_accuracy is None:
            state.proxy_accuracy = self.val_loss_and_accuracy(state.student)[1]
        state.cuts += 1


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
    if session.state.cuts == 0:
        session.cut(session.target)
    session.state.rounds = [{"round": 1, "accuracy": session.fit(epochs)}]


def _stop_rule_rounds(session: PruningSession, *, epochs: int, rounds: int, max_drop: float, choose: Callable) -> None:
    """Shared loop of the iterative schedules: cut (via `choose`) -> fine-tune -> stop on a drop.

    When a round's accuracy (on the selection split) falls more than `max_drop` below the best round, the model of
    the previous round is restored and pruning stops short of the target (the MACs then
    reported are those of the model actually kept).
    """
    state = session.state
    plan = split_epochs(epochs, rounds)
    for i in range(len(state.rounds) + 1, len(plan) + 1):
        if state.cuts < i:
            state.previous = copy.deepcopy(state.student) if i > 1 else None
            choose(session, round_counts(state.start_widths, session.target, i / len(plan)), final=i == len(plan))
            state.cuts = i  # a priority round that finds nothing to cut is a round all the same
        val = session.fit(plan[i - 1])
        state.rounds.append({"round": i, "accuracy": val, "channels": float(sum(session.current().values()))})
        if state.previous is not None and val < state.best - max_drop:
            state.student, state.previous = state.previous, None
            state.rounds[-1]["reverted"] = 1.0
            return
        state.best = max(state.best, val)
    state.previous = None


@SCHEDULES.register(
    "iterative",
    description="TASCNet / Zhong: k rounds of prune -> fine-tune, stopping when the selection-split accuracy drops > max_drop below the best; knobs: rounds, max_drop",
)
def iterative(session: PruningSession, *, epochs: int, rounds: int, max_drop: float) -> None:
    _stop_rule_rounds(session, epochs=epochs, rounds=rounds, max_drop=max_drop, choose=lambda s, goal, final: s.cut(goal, final=final))


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
        trial_model, trial_followers = copy.deepcopy((session.state.student, session.state.followers))
        scores = session.score(trial_model, trial_followers)
        prune_to_counts(trial_model, {name: goal[name]}, image_size=session.image_size, scores=scores)
        session.recalibrate(trial_model)
        harm[name] = session.decide_loss_and_accuracy(trial_model)[0]
    chosen = sorted(pending, key=harm.__getitem__)[: max(1, (len(pending) + 1) // 2)]
    session.cut({name: goal[name] for name in chosen}, final=False)


@SCHEDULES.register(
    "priority",
    description="Zhong et al. 2018: per round, cut first the groups whose candidate cut hurts the selection-split loss least; knobs: rounds, max_drop",
)
def priority(session: PruningSession, *, epochs: int, rounds: int, max_drop: float) -> None:
    _stop_rule_rounds(session, epochs=epochs, rounds=rounds, max_drop=max_drop, choose=_priority_cuts)
