"""CPU latency of the front's models, measured on the driver once the front is published.

Each front member not measured before (a resumed search re-publishes its front: members measured
then are not measured again) is downloaded from its run's `model/` artifact, loaded and timed by
`pipelines.latency.measure_latency`; the numbers go onto the member's own MLflow run as metrics
(`latency_ms_torch_b1`, ..., see `pipelines.latency.metric_name`) with the threads, the CPU and the
repetitions as tags. A member that cannot be measured is one warning line, never a failed search.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from search.tracking import RunRecord, Tracker

if TYPE_CHECKING:
    from pipelines.latency import Latency

__all__ = ["measure_front_latency", "measured", "LATENCY_PREFIX", "THREADS_TAG", "CPU_TAG", "RUNS_TAG", "FAILED_TAG"]

LATENCY_PREFIX = "latency_ms_"  # every latency metric's name starts with it
THREADS_TAG = "slimtune.latency_threads"  # threads both runtimes used
CPU_TAG = "slimtune.latency_cpu"  # the CPU's model name, architecture and core count
RUNS_TAG = "slimtune.latency_runs"  # "<warm-up> warm-up + <repeats> timed per batch"
FAILED_TAG = "slimtune.latency_failed"  # runtime: error, for a runtime that could not run the model


def measured(run: RunRecord) -> bool:
    """Whether `run` has latency metrics already (from an earlier publication of the front)."""
    return any(name.startswith(LATENCY_PREFIX) for name in run.metrics)


def measure_front_latency(tracker: Tracker, members: Sequence[RunRecord], *, log: Callable[[str], None] = print, **options: Any) -> int:
    """Measure and log every member without latency metrics yet; returns how many were measured.
    `options` go to `measure_latency` (threads, warmup, repeats, batches, runtimes)."""
    todo = [run for run in members if not measured(run)]
    if not todo:
        return 0
    from pipelines._helpers import error_line
    from pipelines.export import load_model
    from pipelines.latency import BATCHES, RUNTIMES, THREADS, measure_latency

    threads = options.get("threads", THREADS)
    runtimes, batches = " and ".join(options.get("runtimes", RUNTIMES)), " and ".join(map(str, options.get("batches", BATCHES)))
    log(f"latency: measuring {len(todo)} front model(s) on the CPU ({threads} thread{'s' if threads > 1 else ''}; {runtimes}, batch {batches})...")
    done = 0
    for run in todo:
        trial = run.trial_id
        try:
            with tempfile.TemporaryDirectory(prefix="slimtune-latency-") as work:
                model, spec = load_model(tracker.download(run.run_id, "model", work))
            latency = measure_latency(model, image_size=int(spec["image_size"]), **options)
            failed = "; ".join(f"{runtime}: {error}" for runtime, error in latency.failures.items())
            if not latency.timings:
                raise RuntimeError(failed)
            tracker.log_metrics(run.run_id, latency.metrics())
            tags = {THREADS_TAG: str(latency.threads), CPU_TAG: latency.cpu, RUNS_TAG: f"{latency.warmup} warm-up + {latency.repeats} timed per batch"}
            if latency.failures:
                tags[FAILED_TAG] = failed[:4000]
            tracker.set_tags(run.run_id, tags)
        except Exception as error:  # a model the loader, the exporter or a runtime refuses: the search's results stand
            log(f"latency: warning: trial {trial} not measured ({error_line(error)})")
            continue
        done += 1
        log(f"  trial {trial}: {_summary(latency)}")
        for runtime, failure in latency.failures.items():
            log(f"latency: warning: trial {trial}: {runtime} not measured ({failure})")
    return done


def _summary(latency: Latency) -> str:
    """`torch 6.51 / 32.59 ms, onnxruntime 0.67 / 29.03 ms (median per batch of 1 / 32)`."""
    runtimes = dict.fromkeys(t.runtime for t in latency.timings)
    batches = " / ".join(str(b) for b in dict.fromkeys(t.batch for t in latency.timings))
    values = {r: " / ".join(f"{t.median_ms:.2f}" for t in latency.timings if t.runtime == r) for r in runtimes}
    return ", ".join(f"{r} {v} ms" for r, v in values.items()) + f" (median per batch of {batches})"
