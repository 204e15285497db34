"""The driver's latency step without a search: a store stand-in with the three Tracker methods it uses."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torchvision

from pipelines.export import save_model
from search.latency import FAILED_TAG, THREADS_TAG, measure_front_latency
from search.tracking import TRIAL_TAG, RunRecord


class _Store:
    def __init__(self, models: dict[str, Path]) -> None:
        self.models, self.metrics, self.tags = models, {}, {}

    def download(self, run_id: str, artifact_path: str, destination: str | Path) -> Path:
        if run_id not in self.models:
            raise OSError("artifact store unreachable")
        return Path(shutil.copytree(self.models[run_id], Path(destination) / artifact_path))

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self.metrics[run_id] = metrics

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.tags[run_id] = tags


def _run(run_id: str, **metrics: float) -> RunRecord:
    return RunRecord(run_id=run_id, name=f"trial-{run_id}", status="FINISHED", metrics=metrics, params={}, tags={TRIAL_TAG: run_id})


def test_measured_members_are_skipped_and_failures_are_warning_lines(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_model(torchvision.models.mobilenet_v2(num_classes=2).eval(), tmp_path / "model", arch="mobilenet_v2", metadata={"image_size": 16})
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not ONNX")
    store = _Store({"ok": tmp_path / "model"})
    said: list[str] = []
    members = [_run("done", latency_ms_torch_b1=1.0), _run("ok"), _run("lost")]
    measured = measure_front_latency(store, members, log=said.append, batches=(1,), repeats=1, warmup=0, onnx_file=broken)
    assert measured == 1 and set(store.metrics) == {"ok"}  # "done" has latency already: never measured twice
    assert set(store.metrics["ok"]) == {"latency_ms_torch_b1", "latency_ms_torch_b1_p90"}
    assert store.tags["ok"][THREADS_TAG] == "1" and store.tags["ok"][FAILED_TAG].startswith("onnxruntime: ")
    failure = store.tags["ok"][FAILED_TAG].removeprefix("onnxruntime: ")
    assert said[0] == "latency: measuring 2 front model(s) on the CPU (1 thread; torch and onnxruntime, batch 1)..."
    assert said[1].startswith("  trial ok: torch ") and said[1].endswith(" ms (median per batch of 1)")
    assert said[2:] == [
        f"latency: warning: trial ok: onnxruntime not measured ({failure})",
        "latency: warning: trial lost not measured (OSError: artifact store unreachable)",
    ]
