"""The one place that owns the output folder.

```
<output>/                      default ./slimtune-runs
  mlflow.db                    MLflow tracking store (SQLite), one for all experiments here
  mlartifacts/                 MLflow artifacts (configs, fronts, plots, exported models)
  <experiment>/
    config.yaml                the resolved space of the latest search
    optuna.db                  the Optuna studies (one per search), survives a crash
    teacher-<config>-<data>/   the dense teacher, reused by every search with the same config and data files
    ray/                       Ray Tune's storage_path (shared storage on a cluster)
```
Trials write nothing here: their models are MLflow artifacts (under mlartifacts/ with the SQLite store).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from search.space import Experiment, to_dict

__all__ = ["Layout", "DEFAULT_OUTPUT"]

DEFAULT_OUTPUT = "slimtune-runs"


@dataclass(frozen=True)
class Layout:
    root: Path
    experiment: str

    @classmethod
    def at(cls, output: str | Path, experiment: str) -> Layout:
        return cls(root=Path(output).resolve(), experiment=experiment)

    @property
    def tracking_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.tracking_db}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def directory(self) -> Path:
        return self.root / self.experiment

    @property
    def config_file(self) -> Path:
        return self.directory / "config.yaml"

    @property
    def optuna_storage(self) -> str:
        return f"sqlite:///{self.directory / 'optuna.db'}"

    @property
    def ray_storage(self) -> Path:
        return self.directory / "ray"

    def teacher_dir(self, experiment: Experiment) -> Path:
        """Keyed by everything that shapes the teacher, so that neither a changed config nor changed
        data files reuse a stale one: teacher-<config digest>-<data digest>."""
        from pipelines.data import folder_fingerprint

        key = {k: to_dict(getattr(experiment, k)) for k in ("data", "model", "teacher")}
        config = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        return self.directory / f"teacher-{config}-{folder_fingerprint(experiment.data.path)[:8]}"

    def make(self) -> Layout:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        return self
