"""The Ray Tune searcher: Optuna's, minus repeated configurations.

NSGA-II's crossover of two equal parents (common in the small populations a 16-trial search
uses) proposes a configuration that already ran: a whole trial spent on a known answer.
`DistinctOptunaSearch` tells Optuna such a repeat failed (NSGA-II and TPE then ignore it) and asks
again, under an alias id, so that every trial Ray starts is new. Imported lazily by `search.run`
because it imports Ray.
"""
from __future__ import annotations

import json
from typing import Any

from ray.tune.search.optuna import OptunaSearch

__all__ = ["DistinctOptunaSearch"]


class DistinctOptunaSearch(OptunaSearch):
    """`OptunaSearch` that never hands Ray a configuration it already handed out.

    After `retries` repeats in a row it gives up and returns the repeat (a space with fewer
    distinct points than trials, e.g. one categorical knob, must still finish).
    """

    def __init__(self, *args: Any, retries: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._retries = retries
        self._handed_out: set[str] = set()
        self._asked_as: dict[str, str] = {}  # Ray's trial id -> the id Optuna's trial was asked under
        self.repeats_skipped = 0

    def suggest(self, trial_id: str) -> dict | str | None:
        asked_as = trial_id
        config = super().suggest(asked_as)
        for attempt in range(1, self._retries + 1):
            if not isinstance(config, dict) or _key(config) not in self._handed_out:
                break
            super().on_trial_complete(asked_as, error=True)
            self.repeats_skipped += 1
            asked_as = f"{trial_id}-repeat{attempt}"
            config = super().suggest(asked_as)
        if isinstance(config, dict):
            self._handed_out.add(_key(config))
            self._asked_as[trial_id] = asked_as
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(self._asked_as.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        super().on_trial_complete(self._asked_as.get(trial_id, trial_id), result=result, error=error)


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)
