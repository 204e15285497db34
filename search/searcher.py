"""The Ray Tune searcher: an Optuna study driven by ask/tell, with the knobs of `search.knobs`.

Ray's own `OptunaSearch` tells Optuna COMPLETE for a trial the scheduler stopped (its rung values
then look like full-fidelity results) and builds its space from Tune domains under other names.
This one:
- asks the study for each trial, in the knobs' own names: first the enqueued uniform anchors and
  the `grid` targets (trials whose MACs target is fixed and whose other knobs the sampler picks),
  largest target first;
- never hands out a configuration twice (NSGA-II's crossover of equal parents proposes repeats): a
  repeat is told FAIL and the study is asked again, at most `retries` times in a row;
- tells COMPLETE only for a trial whose final report arrived (`final` in the result), with its
  values of the objectives (`objective`, the search's val metric, and MACs), PRUNED with the rung's
  values as user attrs for one the scheduler stopped, FAIL for one that raised;
- marks the anchors (`anchor: true` in their config);
- picks the model a trial starts from (`warm_start: front`): the finished front member with the
  fewest MACs above the trial's target, passed as `start_from` (its Ray trial id) and
  `start_from_run` (its MLflow run, which holds its model);
- stops starting trials once the epoch budget (spent + still owed to running trials) is used up;
- saves its bookkeeping as JSON in Tune's experiment state (`save` / `restore`), so `slimtune
  resume` continues it: a trial the dead driver already told stays as told, one it told FAIL
  (interrupted) that finishes after all is added to the study as a COMPLETE copy
  (`continues_trial`), and a study trial the saved state never heard of is closed FAIL (`lost`).
Imported lazily by `search.run` because it imports Ray and Optuna.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search.pareto import Point, pareto_front

__all__ = ["StudySearcher", "FinishedTrial", "choose_parent", "close_running", "objectives"]


def objectives(objective: str = "val_accuracy") -> dict[str, str]:
    """The study's objectives, in the order Optuna stores them: `objective` (the search's val metric,
    `search.objective`) up, MACs down."""
    return {objective: "maximize", "macs": "minimize"}


@dataclass(frozen=True)
class FinishedTrial:
    trial_id: str
    objective: float  # its value of the search's val metric
    macs_ratio: float
    run_id: str = ""  # its MLflow run, which holds its exported model


def choose_parent(finished: list[FinishedTrial], target: float) -> FinishedTrial | None:
    """The front member (the val objective vs MACs) with the fewest MACs above `target`, if any."""
    points = [Point(key=t.trial_id, accuracy=t.objective, macs=t.macs_ratio) for t in finished]
    above = [p for p in pareto_front(points) if p.macs > target]
    if not above:
        return None
    chosen = min(above, key=lambda p: (p.macs, -p.accuracy))
    return next(t for t in finished if t.trial_id == chosen.key)


class StudySearcher(Searcher):
    objective = "val_accuracy"  # what a searcher pickled before `search.metric` existed optimises

    def __init__(
        self,
        study: optuna.Study,
        space: dict[str, optuna.distributions.BaseDistribution],
        *,
        anchors: list[dict[str, Any]] = (),
        grid: list[float] = (),
        trial_epochs: int,
        epoch_budget: int | None = None,
        can_warm_start: Callable[[dict[str, Any]], bool] | None = None,
        retries: int = 10,
        objective: str = "val_accuracy",
    ) -> None:
        super().__init__()
        self.study = study
        self.objective = objective  # the result key the study maximises (its first direction)
        self.space = space
        self.trial_epochs = trial_epochs
        self.epoch_budget = epoch_budget
        self.can_warm_start = can_warm_start  # None: every trial starts from the teacher
        self.retries = retries
        # Largest MACs target first, so that each can start from the one before (warm start).
        queue = [*anchors, *({"target_macs": t} for t in grid)]
        for point in sorted(queue, key=lambda p: -p.get("target_macs", 2.0)):
            study.enqueue_trial(point, skip_if_exists=True)
        self._anchor_keys = {_key(point) for point in anchors}
        self.repeats_skipped = 0
        self._handed_out: set[str] = set()
        self._trials: dict[str, optuna.trial.Trial] = {}  # Ray trial id -> its Optuna trial
        self._epochs: dict[str, int] = {}  # Ray trial id -> fine-tune epochs it has reported
        self._running: set[str] = set()
        self.finished: list[FinishedTrial] = []
        self.seconds = 0.0  # wall time of the trial phase, set by whoever runs the Tuner

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the study carries both objectives; the space comes from `search.knobs`

    @property
    def epochs_used(self) -> int:
        return sum(self._epochs.values())

    def _budget_left(self) -> bool:
        if self.epoch_budget is None:
            return True
        owed = sum(self.trial_epochs - self._epochs.get(t, 0) for t in self._running)
        return self.epochs_used + owed + self.trial_epochs <= self.epoch_budget

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self._budget_left():
            return None if self._running else Searcher.FINISHED
        trial = self.study.ask(fixed_distributions=self.space)
        for _ in range(self.retries):
            if _key(trial.params) not in self._handed_out:
                break
            trial.set_user_attr("repeat", True)
            self.study.tell(trial, state=TrialState.FAIL)
            self.repeats_skipped += 1
            trial = self.study.ask(fixed_distributions=self.space)
        self._handed_out.add(_key(trial.params))
        trial.set_user_attr("ray_trial_id", trial_id)
        self._trials[trial_id] = trial
        self._running.add(trial_id)
        config = dict(trial.params)
        if _key(trial.params) in self._anchor_keys:
            config["anchor"] = True
        if self.can_warm_start is not None and "target_macs" in config and self.can_warm_start(dict(trial.params)):
            parent = choose_parent(self.finished, float(config["target_macs"]))
            if parent is not None:
                config.update(start_from=parent.trial_id, start_from_run=parent.run_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if "epoch" in result:
            self._epochs[trial_id] = max(self._epochs.get(trial_id, 0), int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self._trials.get(trial_id)
        self._running.discard(trial_id)
        if trial is None:
            return
        result = result or {}
        self.on_trial_result(trial_id, result)  # Tune passes a stopping result here, not to on_trial_result
        attrs = {key: result[key] for key in ("mlflow_run_id", "start_from") if key in result}
        if error or result.get("failed"):  # Tune's error: a process that died every retry; `failed`: the trial raised
            self._tell(trial, attrs, state=TrialState.FAIL)
        elif result.get("final"):
            self._tell(trial, attrs, values=[float(result[name]) for name in objectives(self.objective)])
            if self.can_warm_start is not None and self.can_warm_start(dict(trial.params)):
                self.finished.append(
                    FinishedTrial(trial_id, float(result[self.objective]), float(result["macs_ratio"]), run_id=str(result.get("mlflow_run_id", "")))
                )
        else:  # stopped by the scheduler: its rung values are partial, never a result
            names = dict.fromkeys(("epoch", "val_accuracy", self.objective, "macs"))
            stopped = {f"stopped_{name}": float(result[name]) for name in names if name in result}
            self._tell(trial, {**attrs, **stopped}, state=TrialState.PRUNED)

    def _tell(self, trial: optuna.trial.Trial, attrs: dict[str, Any], *, values: list[float] | None = None, state: TrialState | None = None) -> None:
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        if frozen.state == TrialState.RUNNING:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            self.study.tell(trial, values, state=state)
        elif frozen.state != TrialState.COMPLETE and values is not None:  # interrupted, then resumed and finished
            self.study.add_trial(
                optuna.trial.create_trial(
                    params=frozen.params,
                    distributions=frozen.distributions,
                    values=values,
                    user_attrs={**frozen.user_attrs, **attrs, "continues_trial": trial.number},
                )
            )
        # else: the driver that died told it already, after Tune last saved this searcher

    def save(self, checkpoint_path: str) -> None:
        state = {
            "trials": {trial_id: trial.number for trial_id, trial in self._trials.items()},
            "epochs": self._epochs,
            "running": sorted(self._running),
            "handed_out": sorted(self._handed_out),
            "finished": [dataclasses.asdict(t) for t in self.finished],
            "repeats_skipped": self.repeats_skipped,
        }
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        self._trials = {trial_id: _live_trial(self.study, number) for trial_id, number in state["trials"].items()}
        self._epochs = {trial_id: int(epochs) for trial_id, epochs in state["epochs"].items()}
        self._running = set(state["running"])
        self._handed_out = set(state["handed_out"])
        renamed = {"val_accuracy": "objective"}  # a state saved before `search.metric` existed
        self.finished = [FinishedTrial(**{renamed.get(k, k): v for k, v in t.items()}) for t in state["finished"]]
        self.repeats_skipped = int(state["repeats_skipped"])
        known = set(state["trials"].values())
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in known:  # asked by the dead driver after Tune last saved this state
                trial = _live_trial(self.study, frozen.number)
                trial.set_user_attr("lost", True)
                self.study.tell(trial, state=TrialState.FAIL)


def close_running(study: optuna.Study, *, finished: dict[str, dict[str, float]], objective: str = "val_accuracy") -> list[str]:
    """End the study's trials still RUNNING after the trials stopped (a signal, or a resume that
    ended): one whose MLflow run finished before Tune dropped its last report (`finished`: Ray
    trial id -> the run's metrics) is COMPLETE, with its `objective` and MACs; the others are FAIL
    with the user attribute `interrupted`. Returns the Ray ids of those interrupted."""
    interrupted = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = frozen.user_attrs.get("ray_trial_id")
        trial = _live_trial(study, frozen.number)
        if trial_id in finished:
            study.tell(trial, [float(finished[trial_id][name]) for name in objectives(objective)])
            continue
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        if trial_id is not None:
            interrupted.append(trial_id)
    return sorted(interrupted)


def _live_trial(study: optuna.Study, number: int) -> optuna.trial.Trial:
    """The study's trial `number` as a `Trial` one can still tell (Optuna has no public lookup)."""
    return optuna.trial.Trial(study, study.get_trials(deepcopy=False)[number]._trial_id)


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)
