from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from search.scheduler import ParetoHalving, continues


@pytest.mark.parametrize(
    ("accuracy", "macs", "recorded", "eta", "expected"),
    [
        (0.5, 1.0, [], 2, True),  # the first arrival at a rung always continues
        (0.5, 1.0, [(0.9, 1.0)], 2, False),  # top 1 of 2 neighbours: the better one keeps going
        (0.95, 1.0, [(0.9, 1.0)], 2, True),
        (0.5, 1.0, [(0.9, 1.0), (0.4, 1.1)], 2, True),  # second of 3: ceil(3 / 2) = 2 continue
        (0.3, 1.0, [(0.9, 1.0), (0.4, 1.1)], 2, False),
        (0.5, 1.0, [(0.9, 1.0), (0.4, 1.1)], 3, False),  # ceil(3 / 3) = 1
        (0.2, 0.1, [(0.9, 1.0), (0.8, 0.5)], 2, True),  # a small model is not compared with large ones
        (0.2, 1.0, [(0.9, 1.6)], 2, True),  # 1.6x apart: outside the 1.5x neighbourhood
        (0.2, 1.0, [(0.9, 1.4), (0.9, 0.7)], 2, False),  # both within 1.5x, both better
        (0.9, 1.0, [(0.9, 1.0)], 2, True),  # a tie is not "better"
    ],
)
def test_continues(accuracy: float, macs: float, recorded: list, eta: float, expected: bool) -> None:
    assert continues(accuracy, macs, recorded, eta=eta) is expected


def _result(epoch: int, accuracy: float, macs: float = 1e6, **extra) -> dict:
    return {"epoch": epoch, "val_accuracy": accuracy, "macs": macs, **extra}


def test_scheduler_stops_only_the_worse_trial_at_a_rung_and_ignores_other_epochs() -> None:
    scheduler = ParetoHalving(rungs=[1, 2], eta=2)
    good, bad, small = (SimpleNamespace(trial_id=name) for name in ("good", "bad", "small"))
    assert scheduler.on_trial_result(None, good, _result(1, 0.8)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, bad, _result(1, 0.6)) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, small, _result(1, 0.3, macs=1e5)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, good, _result(3, 0.1)) == TrialScheduler.CONTINUE  # not a rung
    assert scheduler.on_trial_result(None, good, _result(1, 0.1, final=True)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, good, _result(2, 0.9)) == TrialScheduler.CONTINUE
    assert set(scheduler.recorded[1]) == {"good", "bad", "small"} and set(scheduler.recorded[2]) == {"good"}


def test_scheduler_ranks_on_the_metric_it_is_given() -> None:
    scheduler = ParetoHalving(rungs=[1], eta=2, metric="val_balanced_accuracy")
    first, second = SimpleNamespace(trial_id="first"), SimpleNamespace(trial_id="second")
    # "second" is more accurate, but less balanced: on balanced accuracy it is the one stopped
    assert scheduler.on_trial_result(None, first, _result(1, 0.6, val_balanced_accuracy=0.6)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, second, _result(1, 0.9, val_balanced_accuracy=0.5)) == TrialScheduler.STOP
    with pytest.raises(KeyError, match="val_balanced_accuracy"):
        scheduler.on_trial_result(None, SimpleNamespace(trial_id="third"), _result(1, 0.7))
