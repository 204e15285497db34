"""Watching a `slimtune search` subprocess's SQLite store from a test while the search runs."""
from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from search.tracking import Tracker


def initialised_store(work: Path) -> str:
    """The URI of the store a search in `work` uses, its tables created now, before the search
    starts: two processes creating them at once collide in MLflow's migrations."""
    (work / "slimtune-runs").mkdir(exist_ok=True)
    uri = f"sqlite:///{work}/slimtune-runs/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def tracker_once_created(uri: str, experiment: str) -> Tracker | None:
    """A Tracker of `experiment`, or None while the search has not created it yet."""
    tracker = Tracker(uri, experiment)
    return tracker if tracker.experiment_id is not None else None
