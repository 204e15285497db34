"""`slimtune search` -> MLflow runs -> `pareto` -> `fetch`, for real: local Ray, SQLite MLflow, Optuna.

Tiny on purpose (20 images per class, 32 px, one epoch): this checks the plumbing, not accuracy.
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.config import DataConfig
from pipelines.data import load_data, prepare_animal_mnist
from pipelines.export import load_model
from pipelines.train import evaluate
from search.cli import main
from search.tracking import PARETO_TAG, Tracker

SLIMTUNE = [sys.executable, "-m", "search.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _slimtune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI: a search as a process of its own (it starts Ray, and Ctrl-C is per process), every
    other command through the same `main` in this process (starting one costs seconds)."""
    if args[0] == "search":
        return subprocess.run([*SLIMTUNE, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code if isinstance(exit.code, int) else 2
    return subprocess.CompletedProcess([*SLIMTUNE, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    prepare_animal_mnist(work / "animal_mnist")
    space = {
        "name": "tiny",
        "data": {"path": "animal_mnist", "image_size": 32, "max_images_per_class": 20},
        "model": {"arch": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        "teacher": {"epochs": 1},
        "trial": {"epochs": 2, "bn_recalibration_batches": 2},
        "search": {"num_trials": 3, "max_concurrent": 2, "budgets": {"granularity": "stage", "keep_ratio": [0.2, 1.0]}},
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(space))
    mixed = work / "animal_mnist" / "mixed"  # a class smaller than the cap: every file in it is read
    mixed.mkdir()
    for image in sorted((work / "animal_mnist" / "cat").glob("*.png"))[:5]:
        (mixed / image.name).write_bytes(image.read_bytes())
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (work / "animal_mnist" / ".ipynb_checkpoints").mkdir()
    result = _slimtune("search", "tiny.yaml", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    tracker = Tracker(f"sqlite:///{work}/slimtune-runs/mlflow.db", "tiny")
    return {"work": work, "stdout": result.stdout, "tracker": tracker, "search_id": tracker.latest_search().run_id}


def test_search_prints_front_and_mlflow_command(searched: dict) -> None:
    out = searched["stdout"]
    assert "Pareto front of 'tiny'" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "slimtune fetch tiny --max-macs" in out


def test_parent_teacher_and_trial_runs_are_logged(searched: dict) -> None:
    tracker: Tracker = searched["tracker"]
    search = tracker.latest_search()
    assert search is not None and search.status == "FINISHED"
    assert search.metrics["finished_trials"] == 3
    (teacher,) = tracker.children(search.run_id, role="teacher")
    assert teacher.name == "teacher" and teacher.status == "FINISHED"
    assert 0 < teacher.metrics["val_balanced_accuracy"] <= 1 and 0 < teacher.metrics["test_balanced_accuracy"] <= 1
    assert {a.path for a in tracker.client.list_artifacts(teacher.run_id)} == {"class_report.json", "per_class.csv"}
    assert search.params["metric"] == "accuracy"
    trials = tracker.children(search.run_id, role="trial")
    assert len(trials) == 3
    for run in trials:
        assert run.status == "FINISHED"
        keep = {k for k in run.params if k.startswith("keep.")}
        assert keep == {f"keep.stride_{s}" for s in (2, 4, 8, 16, 32)}  # one knob per stage of mobilenet_v2
        # Knobs under their space names, plus what the trial started from.
        assert {"lr", "kd_alpha", "kd_temperature", "criterion", "schedule", "parametrisation", "start_from"} <= run.params.keys()
        for metric in ("val_accuracy", "test_accuracy", "val_balanced_accuracy", "test_balanced_accuracy", "proxy_accuracy", "macs", "params", "loss_ce", "loss_kd", "loss_total", "keep_mean"):
            assert metric in run.metrics, metric
        assert 0 < run.metrics["macs"] <= teacher.metrics["macs"]
        for metric in ("val_accuracy", "macs"):  # MACs from the first epoch on, for the scheduler
            history = tracker.client.get_metric_history(run.run_id, metric)
            assert {m.step for m in history} >= {1, 2}, metric
        assert run.tags[PARETO_TAG] in ("true", "false")
    anchors = [r for r in trials if r.tags.get("slimtune.anchor") == "true"]
    assert len(anchors) == 3  # num_trials 3 < the four default anchors: the three largest run
    assert len({r.params["keep.stride_2"] for r in anchors}) == 3  # one uniform ratio each, all different
    assert 0 < search.metrics["hypervolume"] < 1 and search.metrics["anchors_hypervolume"] == search.metrics["hypervolume"]
    assert search.metrics["fine_tune_epochs"] == 6


def test_pareto_command_lists_tagged_front(searched: dict) -> None:
    tracker: Tracker = searched["tracker"]
    search = tracker.latest_search()
    front = [r for r in tracker.children(search.run_id, role="trial") if r.tags[PARETO_TAG] == "true"]
    assert front
    result = _slimtune("pareto", "tiny", cwd=searched["work"])
    assert result.returncode == 0, result.stderr
    for run in front:
        assert run.tags["slimtune.trial_id"] in result.stdout


def test_fetch_returns_the_logged_model(searched: dict) -> None:
    work: Path = searched["work"]
    tracker: Tracker = searched["tracker"]
    result = _slimtune("fetch", "tiny", "--max-macs", "1G", "-o", "best", cwd=work)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (work / "best").iterdir()) == [
        "channel_spec.json", "class_report.json", "config.yaml", "model.onnx", "model.safetensors", "per_class.csv"
    ]  # fmt: skip
    model, spec = load_model(work / "best")
    config = yaml.safe_load((work / "best" / "config.yaml").read_text())
    splits = load_data(DataConfig(**config["data"]))
    accuracy = evaluate(model.to(memory_format=torch.channels_last), splits.test)
    search = tracker.latest_search()
    chosen = [
        r for r in tracker.children(search.run_id, role="trial") if r.tags[PARETO_TAG] == "true" and r.metrics["macs"] == spec["metrics"]["macs"]
    ]
    assert chosen and accuracy == pytest.approx(chosen[0].metrics["test_accuracy"], abs=1e-6)


def _front_members(searched: dict) -> list:
    tracker: Tracker = searched["tracker"]
    return [r for r in tracker.children(searched["search_id"], role="trial") if r.tags[PARETO_TAG] == "true"]


def test_each_front_member_is_one_registered_version_with_the_right_aliases(searched: dict) -> None:
    from mlflow.tracking import MlflowClient

    from search.registry import alias_name

    tracker: Tracker = searched["tracker"]
    client = MlflowClient(tracking_uri=tracker.tracking_uri)  # a plain client, as any MLflow user reads it
    front = _front_members(searched)
    versions = client.search_model_versions("name = 'tiny'")  # the registered model is named after the experiment
    assert sorted(v.run_id for v in versions) == sorted(r.run_id for r in front)  # one version per member, no more
    trial_of = {r.run_id: r.tags["slimtune.trial_id"] for r in front}
    for version in versions:
        assert version.source == f"runs:/{version.run_id}/model" and version.tags["slimtune.trial_id"] == trial_of[version.run_id]
        assert version.tags["slimtune.objective"] == "val_accuracy" and version.tags["slimtune.on_front"] == "true"

    def best(runs: list) -> str:
        return max(runs, key=lambda r: (r.metrics["val_accuracy"], -r.metrics["macs"])).run_id

    (teacher,) = tracker.children(searched["search_id"], role="teacher")
    expected = {"best": best(front), "smallest": min(front, key=lambda r: r.metrics["macs"]).run_id}
    for budget in (0.5, 0.25, 0.1):  # search.alias_budgets' default
        fitting = [r for r in front if r.metrics["macs"] <= budget * teacher.metrics["macs"]]
        if fitting:
            expected[alias_name(budget)] = best(fitting)
        else:
            assert f"no front member has at most {budget:g}x the teacher's MACs: no alias {alias_name(budget)}" in searched["stdout"]
    aliases = client.get_registered_model("tiny").aliases
    assert set(aliases) == {*expected, "knee"}
    for alias, run_id in expected.items():
        assert client.get_model_version_by_alias("tiny", alias).run_id == run_id, alias
    assert client.get_model_version_by_alias("tiny", "knee").run_id in trial_of
    assert f"registry: registered model 'tiny': {len(front)} new version(s), 0 kept; aliases best v" in searched["stdout"]


def test_fetch_alias_writes_what_max_macs_writes_for_that_member(searched: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.export
    from search.cli import main

    work: Path = searched["work"]
    tracker: Tracker = searched["tracker"]
    store = ["--output", str(work / "slimtune-runs")]
    assert main(["fetch", "tiny", "--alias", "knee", "-o", str(work / "knee"), *store]) == 0
    out = capsys.readouterr().out
    knee = tracker.get(tracker.client.get_model_version_by_alias("tiny", "knee").run_id)
    assert "(alias knee, models:/tiny@knee)" in out and f"trial {knee.tags['slimtune.trial_id']}" in out
    names = sorted(p.name for p in (work / "knee").iterdir())
    assert "model.onnx" in names and "model.safetensors" in names
    by_budget = work / "knee-by-budget"  # --max-macs at exactly its MACs chooses that front member
    monkeypatch.setattr(pipelines.export, "export_onnx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("skipped")))  # written above already
    assert main(["fetch", "tiny", "--max-macs", repr(knee.metrics["macs"]), "-o", str(by_budget), *store]) == 0
    assert sorted(p.name for p in by_budget.iterdir()) == [name for name in names if name != "model.onnx"]
    for name in names:
        if name != "model.onnx":
            assert (work / "knee" / name).read_bytes() == (by_budget / name).read_bytes(), name

    assert main(["fetch", "tiny", "--alias", "elbow", "-o", str(work / "elbow"), *store]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--alias: 'elbow' is not an alias of registered model 'tiny'; its aliases: best, knee, smallest" in err
    assert not (work / "elbow").exists()


def test_a_models_uri_with_an_alias_downloads_with_plain_mlflow_and_loads(searched: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    tracker: Tracker = searched["tracker"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri sets it: restored afterwards
    previous = mlflow.tracking._tracking_service.utils._tracking_uri
    mlflow.set_tracking_uri(tracker.tracking_uri)  # the registry follows the tracking URI (download_artifacts' own tracking_uri= does not)
    try:
        path = mlflow.artifacts.download_artifacts("models:/tiny@knee", dst_path=str(tmp_path))
    finally:
        mlflow.set_tracking_uri(previous)
    model, spec = load_model(path)
    knee = tracker.get(tracker.client.get_model_version_by_alias("tiny", "knee").run_id)
    assert spec["metrics"]["macs"] == knee.metrics["macs"]
    with torch.no_grad():
        assert model(torch.zeros(2, 3, spec["image_size"], spec["image_size"])).shape == (2, len(spec["classes"]))


def test_verify_trains_each_member_again_logs_the_means_and_fetch_chooses_on_them(searched: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the corrupt-teacher test below: verify trains with the search's teacher."""
    from search.trainable import SEED_TAG, VERIFY_TAG
    from search.verify import RANK_TAG, VERIFIED_FRONT_TAG

    work, tracker, search = searched["work"], searched["tracker"], searched["search_id"]
    monkeypatch.chdir(work)
    unverified = _slimtune("fetch", "tiny", "--max-macs", "1G", "--verified", "--search", search, cwd=work)
    assert unverified.returncode == 2 and "--verified: search" in unverified.stderr and "slimtune verify tiny" in unverified.stderr
    first = io.StringIO()
    with contextlib.redirect_stdout(first):
        assert main(["verify", "tiny", "--seeds", "2", "--search", search]) == 0
    members = _front_members(searched)
    assert all(f"member {m.tags['slimtune.trial_id']} seed 1:" in first.getvalue() for m in members), first.getvalue()[-2000:]
    reruns = tracker.children(search, role="verify")
    assert sorted(r.tags[VERIFY_TAG] for r in reruns) == sorted(m.run_id for m in members)
    assert all(r.status == "FINISHED" and r.tags[SEED_TAG] == "1" and r.params["seed"] == "1" for r in reruns)
    for member in (tracker.get(m.run_id) for m in members):
        (rerun,) = [r for r in reruns if r.tags[VERIFY_TAG] == member.run_id]
        assert {k: v for k, v in rerun.params.items() if k != "seed"} == {k: v for k, v in member.params.items() if k != "seed"}
        assert member.metrics["verified_seeds"] == 2
        assert member.metrics["test_accuracy_mean"] == pytest.approx((member.metrics["test_accuracy"] + rerun.metrics["test_accuracy"]) / 2)
        assert RANK_TAG in member.tags and member.tags[VERIFIED_FRONT_TAG] in ("true", "false")
    assert "verified_hypervolume" in tracker.get(search).metrics
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        assert main(["verify", "tiny", "--seeds", "2", "--search", search]) == 0
    assert "0 fine-tune(s) to run" in again.getvalue() and len(tracker.children(search, role="verify")) == len(reruns)
    fetched = _slimtune("fetch", "tiny", "--max-macs", "1G", "--verified", "--search", search, "-o", "verified-model", cwd=work)
    assert fetched.returncode == 0, fetched.stderr
    kept = {m.tags["slimtune.trial_id"] for m in (tracker.get(m.run_id) for m in members) if m.tags[VERIFIED_FRONT_TAG] == "true"}
    assert any(f"trial {trial}," in fetched.stdout for trial in kept)


def test_fetch_under_too_small_budget_is_a_one_line_error(searched: dict) -> None:
    result = _slimtune("fetch", "tiny", "--max-macs", "1K", cwd=searched["work"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--max-macs" in result.stderr


def test_unknown_experiment_is_a_one_line_error(searched: dict) -> None:
    result = _slimtune("pareto", "no-such-experiment", cwd=searched["work"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no-such-experiment" in result.stderr


def test_corrupt_teacher_fails_every_trial_but_the_search_completes(searched: dict) -> None:
    """A fault inside trials: each is recorded FAILED with its error; earlier results stay intact."""
    work: Path = searched["work"]
    tracker: Tracker = searched["tracker"]
    before = tracker.latest_search()
    (logits,) = (work / "slimtune-runs" / "tiny").glob("teacher-*/train_logits.safetensors")
    logits.write_bytes(b"not a safetensors file")
    result = _slimtune("search", "tiny.yaml", "--num-trials", "2", cwd=work)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "no trial finished" in result.stderr
    assert "registry: the front is empty: registered model 'tiny' and its aliases unchanged" in result.stdout
    search = tracker.latest_search()
    assert search.run_id != before.run_id and search.status == "FINISHED"
    trials = tracker.children(search.run_id, role="trial")
    assert len(trials) == 2
    assert all(r.status == "FAILED" and "error" in r.tags for r in trials)
    assert tracker.get(before.run_id).status == "FINISHED"
    assert len(tracker.children(before.run_id, role="trial")) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["search", "missing.yaml"], "missing.yaml"),
        (["pareto", "quickstart"], "no searches in"),
        (["fetch", "tiny", "--max-macs", "lots"], "--max-macs"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = _slimtune(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("slimtune: error:") and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_methods_lists_every_registered_option(tmp_path: Path) -> None:
    from pipelines.budgets import BUDGETS
    from pipelines.distill import LOSSES
    from pipelines.importance import CRITERIA
    from pipelines.schedules import SCHEDULES

    result = _slimtune("methods", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for registry in (CRITERIA, BUDGETS, SCHEDULES, LOSSES):
        for name in registry.names():
            assert f"  {name} " in result.stdout, name
    assert "gating" in result.stdout


def test_gpus_on_a_machine_without_them_is_a_one_line_error_before_anything_trains(searched: dict) -> None:
    work: Path = searched["work"]
    tracker: Tracker = searched["tracker"]
    before = tracker.latest_search().run_id
    space = yaml.safe_load((work / "tiny.yaml").read_text())
    space["search"]["gpus_per_trial"] = 1
    (work / "gpu.yaml").write_text(yaml.safe_dump(space))
    result = _slimtune("search", "gpu.yaml", cwd=work)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "search.gpus_per_trial: 1 GPU per trial" in result.stderr
    assert tracker.latest_search().run_id == before  # no parent run, no teacher, no trial


def test_runs_lists_every_trial_sorted_and_as_json(searched: dict) -> None:
    import json

    result = _slimtune("runs", "tiny", "--sort", "val", "--search", searched["search_id"], cwd=searched["work"])  # not a later test's
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trial "))
    assert lines[header].split()[:4] == ["trial", "status", "from", "target"]
    body = lines[header + 2 : header + 5]
    assert len(body) == 3 and all(" finished " in line for line in body)
    assert "3 finished, 0 stopped, 0 failed, 0 killed" in result.stdout
    rows = json.loads(_slimtune("runs", "tiny", "--json", "--search", searched["search_id"], cwd=searched["work"]).stdout)
    assert len(rows) == 3 and {"knobs", "metrics", "front"} <= set(rows[0])
    assert [row["macs"] for row in rows] == sorted(row["macs"] for row in rows)  # the default sort
    assert sum(row["front"] for row in rows) >= 1


def test_pareto_shows_the_newest_finished_search_and_names_a_newer_unfinished_one(searched: dict) -> None:
    tracker: Tracker = searched["tracker"]
    finished = tracker.latest_search(status="FINISHED")
    running = tracker.start_run("search-in-progress", role="search")
    try:
        result = _slimtune("pareto", "tiny", cwd=searched["work"])
        assert result.returncode == 0, result.stderr
        assert finished.run_id in result.stdout and f"a newer search, {running}, is RUNNING" in result.stdout
        partial = _slimtune("pareto", "tiny", "--search", running, cwd=searched["work"])
        assert partial.returncode == 0 and "RUNNING: a partial front" in partial.stdout
    finally:
        tracker.end_run(running, "KILLED")


def test_an_unreadable_file_is_skipped_named_and_listed_on_the_search_run(searched: dict) -> None:
    assert "data: skipped 1 unreadable file(s): mixed/broken.png" in searched["stdout"]
    tracker: Tracker = searched["tracker"]
    listed = tracker.download(searched["search_id"], "skipped_files.txt", searched["work"] / "skipped").read_text()
    assert listed.startswith("mixed/broken.png (")
    assert "data: 11 classes" in searched["stdout"]  # .ipynb_checkpoints is no class
    assert re.search(r"^data: warning: class '\w+' has \d val images \(< 30\)", searched["stdout"], re.M)  # ~3 val images per class


def test_an_architecture_the_preflight_refuses_is_a_one_line_error_before_anything_trains(searched: dict) -> None:
    work: Path = searched["work"]
    tracker: Tracker = searched["tracker"]
    before = tracker.latest_search().run_id
    space = yaml.safe_load((work / "tiny.yaml").read_text())
    space["model"] = {"arch": "squeezenet1_0", "weights": None}
    (work / "squeeze.yaml").write_text(yaml.safe_dump(space))
    result = _slimtune("search", "squeeze.yaml", cwd=work)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "model.arch: squeezenet1_0 fails the pre-flight at 'build it with a new classifier" in result.stderr
    assert tracker.latest_search().run_id == before  # no parent run, no teacher, no trial


def test_front_members_get_cpu_latency_metrics_once_and_runs_shows_them(searched: dict) -> None:
    import json

    from pipelines.latency import BATCHES, RUNTIMES, metric_name
    from search.latency import CPU_TAG, LATENCY_PREFIX, THREADS_TAG, measure_front_latency
    from search.report import run_columns, runs_table

    tracker: Tracker = searched["tracker"]
    trials = tracker.children(searched["search_id"], role="trial")
    members = [r for r in trials if r.tags[PARETO_TAG] == "true"]
    assert members and f"latency: measuring {len(members)} front model(s) on the CPU (1 thread;" in searched["stdout"]
    names = {metric_name(runtime, batch, stat=stat) for runtime in RUNTIMES for batch in BATCHES for stat in ("median", "p90")}
    for run in trials:
        latency = {k: v for k, v in run.metrics.items() if k.startswith(LATENCY_PREFIX)}
        if run in members:
            assert set(latency) == names and all(v > 0 for v in latency.values()), run.tags["slimtune.trial_id"]
            assert run.tags[THREADS_TAG] == "1" and run.tags[CPU_TAG]
            assert f"  trial {run.tags['slimtune.trial_id']}: torch " in searched["stdout"]
        else:
            assert latency == {}
    said: list[str] = []
    assert measure_front_latency(tracker, members, log=said.append) == 0 and said == []  # a re-published front is not re-measured
    result = _slimtune("runs", "tiny", "--json", "--sort", "torch_b1_ms", "--search", searched["search_id"], cwd=searched["work"])
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    for row in rows:
        values = [row[c] for c in ("torch_b1_ms", "onnx_b1_ms", "torch_b32_ms", "onnx_b32_ms")]
        assert all(v > 0 for v in values) if row["front"] else values == [None] * 4
    timed = [row["torch_b1_ms"] for row in rows if row["front"]]
    assert [row["front"] for row in rows] == sorted((row["front"] for row in rows), reverse=True) and timed == sorted(timed)  # unmeasured last
    lines = runs_table(rows, columns=run_columns()).splitlines()
    assert "torch b1 ms" in lines[0] and "onnx b1 ms" in lines[0] and "b32" not in lines[0]
    start = lines[0].index("torch b1 ms")
    cells = [line[start:].split()[0] for line in lines[2:]]  # blank ("-") for trials off the front
    assert [cell != "-" for cell in cells] == [row["front"] for row in rows] and all(float(c) > 0 for c in cells if c != "-")


@pytest.mark.parametrize(("name", "magic"), [("front.html", b"<!DOCTYPE html>"), ("front.png", b"\x89PNG")])
def test_pareto_plot_writes_the_format_its_suffix_names(searched: dict, name: str, magic: bytes) -> None:
    work: Path = searched["work"]
    result = _slimtune("pareto", "tiny", "--plot", name, "--search", searched["search_id"], cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"plot: wrote {name}" and (work / name).read_bytes().startswith(magic)
    if name.endswith(".html"):
        text = (work / name).read_text()
        for run in _front_members(searched):
            assert f'data-trial="{run.tags["slimtune.trial_id"]}" data-front="true"' in text


def test_pareto_plot_with_another_suffix_is_a_one_line_error(searched: dict) -> None:
    result = _slimtune("pareto", "tiny", "--plot", "front.txt", "--search", searched["search_id"], cwd=searched["work"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("slimtune: error: --plot front.txt:") and ".html, .png" in result.stderr
    assert not (searched["work"] / "front.txt").exists()


def test_the_search_logs_front_html_and_a_width_chart_on_each_front_member(searched: dict) -> None:
    tracker: Tracker = searched["tracker"]
    logged = {a.path for a in tracker.client.list_artifacts(searched["search_id"])}
    assert {"front.png", "front.html"} <= logged
    members = {r.run_id for r in _front_members(searched)}
    assert members
    for run in tracker.children(searched["search_id"], role="trial"):
        has_chart = "widths.png" in {a.path for a in tracker.client.list_artifacts(run.run_id)}
        assert has_chart == (run.run_id in members), run.tags["slimtune.trial_id"]
    chart = tracker.download(next(iter(members)), "widths.png", searched["work"] / "widths")
    assert chart.read_bytes().startswith(b"\x89PNG")


# What Ray and Tune print on stdout by default (and with --verbose): Tune's boxes and tables (its
# new output engine), its legacy status table, the trial workers' output "(run_tune_trial pid=...)".
# Ray's own log lines ("Started a local Ray instance", ...) go to stderr.
RAY_OUTPUT = ("Configuration for experiment", "View detailed results here", "Trial status:", "Logical resource usage",
              "started with configuration", "completed after", "== Status ==", "pid=")


def test_a_piped_search_prints_none_of_rays_banners_or_tables_nor_control_characters(searched: dict) -> None:
    out = searched["stdout"]
    assert [s for s in RAY_OUTPUT if s in out] == [], out[-3000:]
    assert "\x1b" not in out and "\r" not in out
    assert re.search(r"^\[3/3\] trial \w+: .*; 3/3 done$", out, re.M)  # piped: the count on each completion line
