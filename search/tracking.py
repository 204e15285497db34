"""MLflow tracking: one parent run per search, one nested run per trial (and one for the teacher).

A thin layer over `MlflowClient` with an explicit tracking URI and experiment id, so trials in
Ray worker processes write to the same store as the driver without any global MLflow state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Tracker", "RunRecord", "ROLE_TAG", "PARETO_TAG", "TRIAL_TAG", "ANCHOR_TAG", "INTERRUPTED_TAG", "STOPPED_TAG", "RESUMED_TAG", "RESUMED_FROM_TAG", "RAY_STORAGE_TAG"]

ROLE_TAG = "slimtune.role"  # search | teacher | trial
TRIAL_TAG = "slimtune.trial_id"
ANCHOR_TAG = "slimtune.anchor"  # "true" on the uniform-allocation anchor trials
PARETO_TAG = "pareto"
RESUMED_TAG = "slimtune.resumed"  # how often a trial (or, on the parent, the search) continued after its process, node or driver stopped
RESUMED_FROM_TAG = "slimtune.resumed_from_epoch"  # the checkpoint its latest retry started from (0: from the start)
STOPPED_TAG = "stopped_at_epoch"  # the rung at which successive halving stopped a trial
INTERRUPTED_TAG = "slimtune.interrupted"  # the signal that stopped a search (on the parent) or a trial in it
RAY_STORAGE_TAG = "slimtune.ray_storage"  # where the search's Ray Tune experiment lives: what `resume` restores
_PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    status: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]

    @property
    def trial_id(self) -> str:
        """The Ray Tune trial id the run was tracked under (its run name where a run has none)."""
        return self.tags.get(TRIAL_TAG, self.name)


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, *, create: bool = False, local_artifacts: str | Path | None = None) -> None:
        """`create`: make the experiment if it does not exist, with its artifacts in `local_artifacts`
        for a store on this machine (SQLite); a tracking server keeps them where it is configured to
        (with `--artifacts-destination`, uploaded through the server, so every node can reach them)."""
        import os

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        elif create:
            server = tracking_uri.startswith(("http://", "https://"))
            location = None if server or local_artifacts is None else Path(local_artifacts).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = None  # read-only use: the experiment does not exist

    def start_run(self, name: str, *, role: str, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        all_tags = {ROLE_TAG: role, **(tags or {})}
        if parent_id is not None:
            all_tags[_PARENT_TAG] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException

        for key, value in tags.items():
            try:
                self.client.set_tag(run_id, key, value)
            except MlflowException as error:  # another process inserted the same tag between MLflow's read and write
                if "UNIQUE constraint failed" not in str(error):
                    raise
                self.client.set_tag(run_id, key, value)  # the row exists now: this is an update

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_file: str | Path) -> None:
        self.client.log_artifact(run_id, str(local_file))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def reopen(self, run_id: str) -> None:
        """Set a run RUNNING again to continue it, counting it in the tag `slimtune.resumed`; what
        ended it before (a signal, a halving stop, an error) is over."""
        run = self.get(run_id)
        self.client.update_run(run_id, status="RUNNING")
        for tag in (INTERRUPTED_TAG, STOPPED_TAG, "error"):
            if tag in run.tags:
                self.client.delete_tag(run_id, tag)
        self.client.set_tag(run_id, RESUMED_TAG, str(int(run.tags.get(RESUMED_TAG, "0")) + 1))

    def fail_run(self, run_id: str, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        self.client.set_tag(run_id, "error", message[:4000])
        self.end_run(run_id, "FAILED")

    def get(self, run_id: str) -> RunRecord:
        return _record(self.client.get_run(run_id))

    def latest_search(self, *, status: str | None = None, unfinished: bool = False) -> RunRecord | None:
        """The newest search run (of `status`, e.g. FINISHED, if given; not FINISHED if `unfinished`)."""
        condition = f" and attributes.status = '{status}'" if status else ""
        condition += " and attributes.status != 'FINISHED'" if unfinished else ""
        runs = self._search(f"tags.`{ROLE_TAG}` = 'search'{condition}", max_results=1)
        return runs[0] if runs else None

    def search_run(self, run_id: str) -> RunRecord | None:
        """The search run `run_id` of this experiment, or None."""
        runs = self._search(f"tags.`{ROLE_TAG}` = 'search' and attributes.run_id = '{run_id}'", max_results=1)
        return runs[0] if runs else None

    def children(self, parent_id: str, *, role: str) -> list[RunRecord]:
        return self._search(f"tags.`{_PARENT_TAG}` = '{parent_id}' and tags.`{ROLE_TAG}` = '{role}'")

    def trial_run(self, parent_id: str, trial_id: str) -> RunRecord | None:
        """The run of Ray trial `trial_id` in search `parent_id`, if an earlier attempt opened one."""
        runs = self._search(f"tags.`{_PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
        return runs[0] if runs else None

    def download(self, run_id: str, artifact_path: str, destination: str | Path) -> Path:
        from mlflow.artifacts import download_artifacts

        Path(destination).mkdir(parents=True, exist_ok=True)
        return Path(
            download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=str(destination), tracking_uri=self.tracking_uri
            )
        )

    def _search(self, filter_string: str, *, max_results: int = 10_000) -> list[RunRecord]:
        if self.experiment_id is None:
            return []
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=max_results
        )
        return [_record(r) for r in runs]


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name,
        status=run.info.status,
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=dict(run.data.tags),
    )
