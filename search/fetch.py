"""Copy one trial's model out of MLflow into a folder, whole or not at all, with an ONNX copy beside it."""
from __future__ import annotations

import shutil
from pathlib import Path

from search._helpers import UsageError

__all__ = ["fetch_model"]


def fetch_model(tracker, run, destination: Path) -> Exception | None:
    """Write `run`'s safetensors model, and model.onnx beside it, into `destination`.

    Everything happens in a staging folder beside `destination` and moves in once complete: a disk
    that fills, a lost server or a model folder the loader refuses leaves `destination` as it was
    (a UsageError that names the cause). Returns None, or the error that kept the exporter from
    writing the ONNX copy (the safetensors model is complete anyway).
    """
    from pipelines._helpers import error_line

    trial = run.trial_id
    needed = _artifact_bytes(tracker.client, run.run_id, "model")
    free = shutil.disk_usage(_nearest_folder(destination)).free
    if free < needed:
        raise UsageError(
            f"-o {destination}: the model of trial {trial} needs {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free there;"
            " nothing was written: free some space or give another -o"
        )
    staging = destination.parent / f".{destination.name}.download"
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier fetch that was killed
    try:
        try:
            path = tracker.download(run.run_id, "model", staging)
            onnx_failure = _write_onnx(path, run_id=run.run_id)
            destination.mkdir(parents=True, exist_ok=True)
            for file in sorted(path.iterdir()):
                file.replace(destination / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise UsageError(
            f"-o {destination}: cannot write the model of trial {trial} there ([Errno {error.errno}] {error.strerror});"
            f" nothing was written: free some space or give another -o"
        ) from None
    except UsageError:
        raise
    except Exception as error:  # MLflow's download reports a failed file (a disk that filled, a lost server) as its own error
        cause = "the disk filled up" if shutil.disk_usage(_nearest_folder(destination)).free < needed else error_line(error)
        raise UsageError(f"-o {destination}: cannot download the model of trial {trial} (MLflow run {run.run_id}): {cause}; nothing was written") from None
    return onnx_failure


def _artifact_bytes(client, run_id: str, path: str) -> int:
    return sum(_artifact_bytes(client, run_id, f.path) if f.is_dir else (f.file_size or 0) for f in client.list_artifacts(run_id, path))


def _nearest_folder(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (what `shutil.disk_usage` can ask about)."""
    path = path.absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def _write_onnx(directory: Path, *, run_id: str) -> Exception | None:
    """Add model.onnx beside the safetensors model, loading it first (a folder the loader refuses is
    an error naming the file); returns None, or the error that kept the exporter from writing it
    (the safetensors model is complete anyway; an OSError is the disk's, not the model's)."""
    from pipelines.export import ONNX_FILE, ModelFolderError, export_onnx, load_model

    try:
        model, spec = load_model(directory)
    except ModelFolderError as error:  # name the file as MLflow stores it, not as the staging folder
        raise UsageError(str(error).replace(str(directory), f"runs:/{run_id}/model")) from None
    try:
        export_onnx(model, directory / ONNX_FILE, spec=spec)
    except Exception as error:  # the exporter's failures are many and version-specific; the model itself is fine
        (directory / ONNX_FILE).unlink(missing_ok=True)  # no half-written file
        cause = error
        while not isinstance(cause, OSError) and cause.__cause__ is not None:  # a full disk inside the exporter's own errors
            cause = cause.__cause__
        return cause if isinstance(cause, OSError) else error
    return None
