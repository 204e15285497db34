"""Multi-objective successive halving over fine-tune epochs, asynchronous as in ASHA.

At each rung (an epoch in `search.rungs`) a trial's val objective (`search.objective`: val accuracy
or val balanced accuracy, from its per-epoch report) and MACs are recorded. The trial continues if
it is among the best ceil(k / eta) by that objective of the k trials recorded at that rung within
NEIGHBOURHOOD x of its MACs (itself included), and is stopped otherwise; nothing is
resumed later. Comparing only neighbours in MACs is what makes it multi-objective: a small model
is never stopped for being less accurate than a large one, so the low-MACs end of the front
survives (ASHA on accuracy alone would kill it). A stopped trial is recorded as stopped (Optuna
PRUNED, MLflow KILLED with the epoch), never as a result, and never enters the front.
Imported lazily by `search.run` because it imports Ray.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

__all__ = ["ParetoHalving", "continues", "NEIGHBOURHOOD"]

NEIGHBOURHOOD = 1.5  # trials within this MACs factor compete at a rung; wider would pit tiny models against large ones


def continues(accuracy: float, macs: float, recorded: Sequence[tuple[float, float]], *, eta: float) -> bool:
    """Whether a trial arriving at a rung with (accuracy, macs) continues, given the (accuracy, macs)
    of the trials that reached the rung before it."""
    window = math.log(NEIGHBOURHOOD)
    rivals = [a for a, m in recorded if abs(math.log(m / macs)) <= window]
    better = sum(a > accuracy for a in rivals)
    return better < math.ceil((len(rivals) + 1) / eta)


class ParetoHalving(FIFOScheduler):
    """`continues` at each rung epoch (results carry `epoch`, the `metric` key and `macs`)."""

    metric = "val_accuracy"  # what a scheduler pickled before `search.metric` existed ranks on

    def __init__(self, *, rungs: Sequence[int], eta: float, metric: str = "val_accuracy") -> None:
        super().__init__()
        self.eta = eta
        self.metric = metric
        self.recorded: dict[int, dict[str, tuple[float, float]]] = {rung: {} for rung in rungs}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return True  # the objectives are fixed: `metric` up, MACs down

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        rung = self.recorded.get(int(result.get("epoch", 0)))
        if result.get("final") or result.get("failed") or rung is None or trial.trial_id in rung:
            return TrialScheduler.CONTINUE
        if self.metric not in result:
            raise KeyError(f"successive halving ranks on {self.metric!r}, which the trial's epoch {result.get('epoch')} report lacks")
        point = (float(result[self.metric]), float(result["macs"]))
        earlier = list(rung.values())
        rung[trial.trial_id] = point
        return TrialScheduler.CONTINUE if continues(*point, earlier, eta=self.eta) else TrialScheduler.STOP
