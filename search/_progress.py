"""The one line per finished trial a search prints while Ray Tune runs it."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from search._helpers import format_count

__all__ = ["progress_callback"]

Log = Callable[[str], None]


def progress_callback(total: int, log: Log) -> Any:
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0
            self.started: dict[str, float] = {}

        def get_state(self) -> dict:  # saved with Tune's experiment state: `resume` counts on
            return {"done": self.done}

        def set_state(self, state: dict) -> None:
            self.done = state["done"]

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started[trial.trial_id] = time.time()

        def _elapsed(self, trial: Any) -> str:
            return f"{time.time() - self.started.get(trial.trial_id, time.time()):.0f} s"

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            r = trial.last_result
            if r.get("failed"):
                self.on_trial_error(iteration, trials, trial)
                return
            self.done += 1
            origin = f", from trial {r['start_from']}" if r.get("start_from") else ""
            if r.get("final"):
                log(
                    f"[{self.done}/{total}] trial {trial.trial_id}: val acc {r['val_accuracy']:.3f},"
                    f" test acc {r['test_accuracy']:.3f}, {format_count(r['macs'])} MACs ({r['macs_ratio']:.3f}x teacher),"
                    f" proxy {r['proxy_accuracy']:.3f}{origin}, {self._elapsed(trial)}"
                )
            else:
                log(
                    f"[{self.done}/{total}] trial {trial.trial_id}: stopped after epoch {int(r.get('epoch', 0))}"
                    f" (val acc {r.get('val_accuracy', float('nan')):.3f} at {r.get('macs_ratio', float('nan')):.3f}x MACs), {self._elapsed(trial)}"
                )

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            epoch = int(trial.last_result.get("epoch", 0)) if trial.last_result else 0
            log(f"        trial {trial.trial_id}: its process or node was lost after epoch {epoch}; retrying it (from its last checkpoint, where it has one)")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            log(f"[{self.done}/{total}] trial {trial.trial_id}: FAILED after {self._elapsed(trial)} (error in MLflow run tag 'error')")

    return Progress()
