from __future__ import annotations

import pytest
import torch
import torchvision

from pipelines.checkpoint import TrialState
from pipelines.importance import module_scores
from pipelines.prune import prunable_groups
from pipelines.schedules import SCHEDULES, PruningSession, round_counts, split_epochs


@pytest.mark.parametrize(
    ("epochs", "rounds", "expected"),
    [(4, 1, [4]), (4, 2, [2, 2]), (5, 2, [2, 3]), (2, 3, [1, 1]), (1, 3, [1])],
)
def test_split_epochs_keeps_total_compute(epochs: int, rounds: int, expected: list[int]) -> None:
    assert split_epochs(epochs, rounds) == expected
    assert sum(split_epochs(epochs, rounds)) == epochs


def test_round_counts_interpolate_to_target() -> None:
    dense, target = {"a": 10, "b": 4}, {"a": 2, "b": 4}
    assert round_counts(dense, target, 0.5) == {"a": 6, "b": 4}
    assert round_counts(dense, target, 1.0) == target


def _session(val_by_round: list[float]) -> PruningSession:
    model = torchvision.models.get_model("resnet18", num_classes=10)
    groups = prunable_groups(model, image_size=32)
    state = TrialState(student=model, start_widths={g.name: g.channels for g in groups}, target={g.name: max(1, g.channels // 4) for g in groups})
    vals = iter(val_by_round)
    return PruningSession(
        state=state,
        groups=groups,
        image_size=32,
        score=lambda net, followers: module_scores(net, "l1", data=None),
        recalibrate=lambda net: None,
        val_loss_and_accuracy=lambda net: (1.0, 0.5),
        decide_loss_and_accuracy=lambda net: (1.0, 0.5),
        fit=lambda epochs: next(vals),
    )


def test_one_shot_reaches_target() -> None:
    session = _session([0.9])
    SCHEDULES.get("one_shot")(session, epochs=3, rounds=3, max_drop=0.02)
    assert session.current() == session.target
    assert session.state.proxy_accuracy == 0.5 and len(session.state.rounds) == 1


def test_iterative_reaches_target_when_accuracy_holds() -> None:
    session = _session([0.9, 0.9, 0.89])
    SCHEDULES.get("iterative")(session, epochs=3, rounds=3, max_drop=0.02)
    assert session.current() == session.target
    assert [r["round"] for r in session.state.rounds] == [1, 2, 3]


def test_iterative_stops_and_restores_on_a_drop() -> None:
    session = _session([0.9, 0.95, 0.80])  # round 3 falls 15 points below the best
    SCHEDULES.get("iterative")(session, epochs=3, rounds=3, max_drop=0.02)
    assert session.state.rounds[-1].get("reverted") == 1.0
    widths = session.current()
    assert all(widths[name] >= session.target[name] for name in widths)
    assert widths != session.target  # stopped short of the target, at round 2's widths
    assert session.state.student.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_priority_cuts_every_group_by_the_last_round() -> None:
    session = _session([0.9, 0.9])
    SCHEDULES.get("priority")(session, epochs=2, rounds=2, max_drop=0.5)
    assert session.current() == session.target


def test_a_schedule_continues_from_the_round_its_state_reached() -> None:
    """A state checkpointed in round 2 (its cut done, round 1 recorded): round 2 is fine-tuned, not
    cut again; round 3 is cut and fine-tuned."""
    session = _session([0.9, 0.9])
    state = session.state
    session.cut(round_counts(state.start_widths, state.target, 2 / 3), final=False)
    state.cuts, state.rounds, state.best = 2, [{"round": 1, "accuracy": 0.9}], 0.9
    cuts = []
    session.score = lambda net, followers: (cuts.append(1), module_scores(net, "l1", data=None))[1]
    SCHEDULES.get("iterative")(session, epochs=3, rounds=3, max_drop=0.02)
    assert len(cuts) == 1 and state.cuts == 3
    assert [r["round"] for r in state.rounds] == [1, 2, 3] and session.current() == state.target
