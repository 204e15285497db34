"""CPU inference latency of a model, in PyTorch and in onnxruntime, at batch 1 and 32.

What is timed: one forward pass of a random batch at the model's image size, in milliseconds per
batch (not per image), on the CPU: `warmup` untimed passes, then the median and the 90th
percentile of `repeats` timed ones. PyTorch runs under `torch.inference_mode` in eval mode and in
channels_last (the layout slimtune trains and evaluates in: up to 1.5x faster than contiguous for
MobileNetV2 on CPU); onnxruntime runs the CPU execution provider with every graph optimisation.
Both use the same fixed number of threads (`torch.set_num_threads`, restored afterwards, and the
session's `intra_op_num_threads`; one inter-op thread): one by default, so that numbers do not
depend on how many cores are free.

The ONNX file, unless one is given, is exported by `pipelines.export.export_onnx`, as `slimtune
fetch` writes it. A gated model (`pipelines.gating`) runs densely in ONNX: its ONNX latency has
no gating saving.

Measured once per model; these are wall times on a possibly busy machine: compare models measured
side by side, not against another machine's numbers.
"""
from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipelines._helpers import error_line

__all__ = ["RUNTIMES", "BATCHES", "WARMUP", "REPEATS", "THREADS", "Timing", "Latency", "measure_latency", "metric_name", "cpu_name"]

RUNTIMES = ("torch", "onnxruntime")
BATCHES = (1, 32)  # one image (interactive use) and a typical batch (throughput)
WARMUP = 2  # untimed passes first: allocator, caches and onnxruntime's first-run set-up
REPEATS = 9  # timed passes; odd, so the median is one real pass. With the export: 1-3 s for a 0.1x-MACs 64 px MobileNetV2 on 2 busy cores
THREADS = 1  # the same for both runtimes; 1: independent of how many cores happen to be free
_SHORT = {"torch": "torch", "onnxruntime": "onnx"}  # runtime -> its name in metric names


@dataclass(frozen=True)
class Timing:
    runtime: str  # "torch" or "onnxruntime"
    batch: int
    median_ms: float  # per batch
    p90_ms: float


@dataclass(frozen=True)
class Latency:
    timings: tuple[Timing, ...]
    threads: int
    warmup: int
    repeats: int
    cpu: str
    failures: dict[str, str] = field(default_factory=dict)  # runtime -> "ErrorType: first line" for one that could not run

    def get(self, runtime: str, batch: int) -> Timing | None:
        return next((t for t in self.timings if t.runtime == runtime and t.batch == batch), None)

    def metrics(self) -> dict[str, float]:
        """`latency_ms_<torch|onnx>_b<batch>` (median) and `..._p90`, for every runtime that ran."""
        out: dict[str, float] = {}
        for t in self.timings:
            out[metric_name(t.runtime, t.batch)] = t.median_ms
            out[metric_name(t.runtime, t.batch, stat="p90")] = t.p90_ms
        return out


def metric_name(runtime: str, batch: int, *, stat: str = "median") -> str:
    """`latency_ms_torch_b1`, `latency_ms_onnx_b32_p90`, ...: milliseconds per batch."""
    return f"latency_ms_{_SHORT[runtime]}_b{batch}" + ("" if stat == "median" else f"_{stat}")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), architecture and core count."""
    name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    name = name or platform.processor() or "unknown CPU"
    return f"{name} ({platform.machine()}, {os.cpu_count()} cores)"


def measure_latency(
    model: nn.Module,
    *,
    image_size: int,
    runtimes: Sequence[str] = RUNTIMES,
    batches: Sequence[int] = BATCHES,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
    threads: int = THREADS,
    onnx_file: str | Path | None = None,
) -> Latency:
    """Time `model` (not modified: a CPU copy is timed) in each runtime at each batch size.

    A runtime that fails (the exporter rejects the model, onnxruntime cannot load it) is recorded in
    `Latency.failures` and left out of `timings`; the others are still measured. `onnx_file`: an ONNX
    export of the same model to time instead of exporting one (e.g. a fetched `model.onnx`)."""
    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise ValueError(f"runtimes: unknown {sorted(unknown)}; known: {list(RUNTIMES)}")
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and threads >= 1, got {repeats}, {warmup}, {threads}")
    model = copy.deepcopy(model).cpu().eval()
    generator = torch.Generator().manual_seed(0)
    inputs = {batch: torch.randn(batch, 3, image_size, image_size, generator=generator) for batch in batches}
    timings: list[Timing] = []
    failures: dict[str, str] = {}
    for runtime in runtimes:
        try:
            run = _torch_runner(model) if runtime == "torch" else _onnx_runner(model, image_size, threads, onnx_file)
            with run as forward, _torch_threads(threads):
                for batch, x in inputs.items():
                    times = _time(lambda: forward(x), warmup=warmup, repeats=repeats)
                    timings.append(Timing(runtime, batch, statistics.median(times), _p90(times)))
        except Exception as error:  # one runtime's failure (often the exporter's) must not hide the other's numbers
            failures[runtime] = error_line(error)
    return Latency(tuple(timings), threads=threads, warmup=warmup, repeats=repeats, cpu=cpu_name(), failures=failures)


def _time(call: Callable[[], object], *, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def _p90(times: list[float]) -> float:
    return statistics.quantiles(times, n=10, method="inclusive")[8] if len(times) > 1 else times[0]


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _torch_runner(model: nn.Module) -> Iterator[Callable[[torch.Tensor], object]]:
    net = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> object:
        with torch.inference_mode():
            return net(x.contiguous(memory_format=torch.channels_last))

    yield forward


@contextlib.contextmanager
def _onnx_runner(model: nn.Module, image_size: int, threads: int, onnx_file: str | Path | None) -> Iterator[Callable[[torch.Tensor], object]]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory(prefix="slimtune-latency-") as work:
        path = Path(onnx_file) if onnx_file is not None else _export(model, Path(work) / "model.onnx", image_size=image_size)
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    yield lambda x: session.run(None, {name: x.numpy()})


def _export(model: nn.Module, path: Path, *, image_size: int) -> Path:
    from pipelines.export import export_onnx

    spec = {"image_size": image_size, "mean": None, "std": None, "classes": None}  # metadata of a file nobody reads
    return export_onnx(model, path, spec=spec)