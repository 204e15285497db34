"""The bad-input corpus, at the CLI: what a new user's space files, folders, disks and model folders
do to `slimtune`, called in-process as `main([...])`.

Every bad input ends in exactly one stderr line, `slimtune: error: <field or file>: <what is wrong>,
<what would be valid>`, with exit code 2, and nothing already computed is lost: an earlier search's
output folder (its MLflow store, teacher and config) is byte for byte as it was, and a fetch leaves
its destination as it was. Inputs slimtune accepts (16-bit, RGBA, CMYK and palette images, non-ASCII
and spaces in class names, a broken file in the default `on_bad_file: skip`) are shown to get past
data loading: the data is decoded and reported *before* the architecture pre-flight, so these rows
use an architecture the pre-flight refuses at once (squeezenet1_0, no nn.Linear head) and check the
data line printed before that refusal. The same formats and names then go through a real search,
the corpus's only one (`test_a_diverging_trial_fails_alone_and_the_search_goes_on`), which also
checks a NaN loss: one trial FAILED with the epoch and the advice in its error, the other FINISHED.
The space loader is fuzzed with Hypothesis at the end: it loads or raises one SpaceError line.
"""
from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from PIL import Image

from _space_helpers import QUICKSTART
from pipelines.export import SPEC_FILE, save_model
from search.cli import main
from search.layout import Layout
from search.space import SpaceError, load_space
from search.tracking import TRIAL_TAG, Tracker

NAME = "corpus"  # the experiment of every row, and of the earlier search they must leave alone
# The pre-flight refuses squeezenet at its first step (no nn.Linear classifier), right after the
# data line: a search row can never train, whatever its data.
REFUSED = {"arch": "squeezenet1_0", "weights": None}
DATA_LINE = re.compile(r"^data: (\d+) classes, (\d+)/(\d+)/(\d+) train/val/test images", re.MULTILINE)


# ---------------------------------------------------------------- images and folders


def _pixels(value: int) -> np.ndarray:
    """A 12x12 gradient, different per `value`, so that every file decodes to its own image."""
    ramp = np.add.outer(np.arange(12), np.arange(12)) * 4
    return ((ramp + value * 37) % 256).astype(np.uint8)


def write_image(path: Path, kind: str = "rgb", value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = _pixels(value)
    if kind == "rgb":
        Image.fromarray(np.stack([gray, 255 - gray, gray // 2], axis=-1), mode="RGB").save(path)
    elif kind == "16bit":  # a 16-bit greyscale PNG (mode I;16)
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    elif kind == "rgba":  # half transparent
        Image.fromarray(np.stack([gray, gray, 255 - gray, np.full_like(gray, 128)], axis=-1), mode="RGBA").save(path)
    elif kind == "cmyk":  # a CMYK JPEG, as print workflows write them
        Image.fromarray(np.stack([gray, 255 - gray, gray // 3, gray // 4], axis=-1), mode="CMYK").save(path, "JPEG")
    elif kind == "palette":  # palette PNG with a transparent index
        image = Image.fromarray(gray // 32, mode="P")
        image.putpalette([c for i in range(8) for c in (i * 32, 255 - i * 32, 90)])
        image.save(path, transparency=0)
    elif kind == "truncated":
        full = path.with_suffix(".full.png")
        write_image(full, "rgb", value)
        path.write_bytes(full.read_bytes()[:60])
        full.unlink()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("label,file\ncat,1.png\n")
    else:
        raise ValueError(kind)
    return path


def image_folder(root: Path, classes: dict[str, list[str]]) -> Path:
    """`root/<class>/<i>.<ext>` for each kind listed per class; [] makes an empty class folder."""
    extensions = {"cmyk": "jpg", "empty": "jpg", "text": "csv"}
    for c, (name, kinds) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, kind in enumerate(kinds):
            write_image(root / name / f"{i:02d}.{extensions.get(kind, 'png')}", kind, value=c * 16 + i)
    return root


def plain(n: int = 6) -> list[str]:
    return ["rgb"] * n


def two_classes(**changes: list[str]) -> dict[str, list[str]]:
    return {"cat": plain(), "dog": plain(), **changes}


# ---------------------------------------------------------------- the earlier output and the finished search


@dataclass(frozen=True)
class Store:
    runs: Path  # an output folder holding one finished search of NAME: mlflow.db, mlartifacts/, NAME/


def _model_folder(tmp: Path, arch: str) -> Path:
    """A real, loadable slimtune model folder: `arch` at random init with 2 classes. resnet18 (45 MB)
    is the one fetched: the ONNX exporter takes it in seconds (mobilenet_v3_small: 3x longer)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=2).eval()
    metadata = {"classes": ["cat", "dog"], "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "metrics": {}}
    return save_model(model, tmp / arch, arch=arch, metadata=metadata)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A finished search of NAME as `slimtune search` leaves it, built directly: a teacher run and
    three front trials whose `model` artifacts are (a) a clean model, (b) a clean model with a pickle
    planted beside it, (c) a pickle saved as model.safetensors; plus a teacher folder and config."""
    tmp = tmp_path_factory.mktemp("store")
    layout = Layout.at(tmp / "runs", NAME).make()
    tracker = Tracker(layout.tracking_uri, NAME, create=True, local_artifacts=layout.artifacts)
    search = tracker.start_run("search-20260101-000000", role="search")
    teacher = tracker.start_run("teacher", role="teacher", parent_id=search)
    tracker.log_metrics(teacher, {"val_accuracy": 0.9, "test_accuracy": 0.9, "macs": 1e6, "params": 1e6})
    tracker.end_run(teacher)
    fetched, small = _model_folder(tmp, "resnet18"), _model_folder(tmp, "mobilenet_v3_small")
    for trial_id, macs, accuracy in (("a", 1e5, 0.6), ("b", 2e5, 0.7), ("c", 3e5, 0.8)):
        folder = tmp / f"model-{trial_id}"
        shutil.copytree(fetched if trial_id == "a" else small, folder)
        (folder / "config.yaml").write_text(f"name: {NAME}\n")
        if trial_id == "b":  # a pickle beside clean weights: nothing reads it, but whoever torch.loads it runs it
            (folder / "model.pt").write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
        if trial_id == "c":  # torch.save's pickle under the safetensors name
            torch.save({"w": torch.zeros(2)}, folder / "model.safetensors")
        run = tracker.start_run(f"trial-{trial_id}", role="trial", parent_id=search, tags={TRIAL_TAG: trial_id})
        tracker.log_metrics(run, {"val_accuracy": accuracy, "test_accuracy": accuracy, "macs": macs, "params": 1e4})
        tracker.log_artifacts(run, folder, "model")
        tracker.end_run(run)
    tracker.end_run(search)
    shutil.copytree(small, layout.directory / "teacher-0123456789-abcdef01")
    (layout.directory / "teacher-0123456789-abcdef01" / "train_logits.safetensors").write_bytes(b"logits")
    layout.config_file.write_text(f"name: {NAME}\n")
    return Store(runs=layout.root)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha1 of its bytes)."""
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def statuses(runs: Path) -> dict[str, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    return {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}


# ---------------------------------------------------------------- the table


@dataclass
class Context:
    """What a row prepares its input in: tmp (the cwd), the finished search, tmpfs mounts."""

    tmp: Path
    store: Store
    mount: Callable[..., Path]
    watched: list[Path]  # folders that must hold exactly the same files afterwards


def earlier_output(ctx: Context) -> str:
    """A copy of the finished search's output folder (without artifacts) as --output, watched."""
    runs = ctx.tmp / "runs"
    shutil.copytree(ctx.store.runs, runs, ignore=shutil.ignore_patterns("mlartifacts"))
    ctx.watched.append(runs)
    return "runs"


Setup = Callable[[Context], list[str]]


def space_text(text: str | bytes) -> Setup:
    """`search` of a space file with exactly this content."""

    def setup(ctx: Context) -> list[str]:
        path = ctx.tmp / "space.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["search", "space.yaml", "--output", earlier_output(ctx)]

    return setup


def space(
    changes: dict[str, Any] | None = None, *, classes: dict[str, list[str]] | None = None, flags: tuple[str, ...] = (), output: Setup | None = None
) -> Setup:
    """`search` of the base space (the folder `images` with `classes`, an architecture the pre-flight
    refuses) with dotted `changes`; `output`: prepares --output instead of the earlier output."""

    def setup(ctx: Context) -> list[str]:
        image_folder(ctx.tmp / "images", classes if classes is not None else two_classes())
        raw: dict[str, Any] = {"name": NAME, "data": {"path": "images", "image_size": 16}, "model": dict(REFUSED)}
        for dotted, value in (changes or {}).items():
            *parents, last = dotted.split(".")
            node = raw
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value(ctx) if callable(value) else value
        (ctx.tmp / "space.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
        destination = output(ctx) if output is not None else ["--output", earlier_output(ctx)]
        return ["search", "space.yaml", *destination, *flags]

    return setup


def empty_folder(name: str) -> Callable[[Context], str]:
    def make(ctx: Context) -> str:
        (ctx.tmp / name).mkdir()
        return name

    return make


def read_only_output(ctx: Context) -> list[str]:
    """The earlier output on a file system remounted read-only (root writes through chmod)."""
    disk = ctx.mount(ctx.tmp / "ro", "64m")
    shutil.copytree(ctx.store.runs, disk / "runs", ignore=shutil.ignore_patterns("mlartifacts"))
    ctx.watched.append(disk / "runs")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    return ["--output", "ro/runs"]


def output_under_a_file(ctx: Context) -> list[str]:
    (ctx.tmp / "notes.txt").write_text("not a folder")
    ctx.watched.append(ctx.tmp)
    return ["--output", "notes.txt/runs"]


def fetch(budget: str, *, to: Callable[[Context], str] | None = None, keeps_destination: bool = True) -> Setup:
    """`fetch` from the finished search into `to` (default: ./model). The store is watched, and the
    destination's parent too unless the row expects the safetensors model to arrive there."""

    def setup(ctx: Context) -> list[str]:
        destination = to(ctx) if to is not None else "model"
        ctx.watched += [ctx.store.runs, *([(ctx.tmp / destination).parent] if keeps_destination else [])]
        return ["fetch", NAME, "--max-macs", budget, "-o", destination, "--output", str(ctx.store.runs)]

    return setup


def fetch_alias(alias: str) -> Setup:
    """`fetch --alias` from the finished search, which registered nothing (made before the registry)."""

    def setup(ctx: Context) -> list[str]:
        ctx.watched += [ctx.store.runs, ctx.tmp]
        return ["fetch", NAME, "--alias", alias, "-o", "model", "--output", str(ctx.store.runs)]

    return setup


def small_disk(size: str) -> Callable[[Context], str]:
    """A file system of `size` (the fetched model is 45 MB, its ONNX copy as much again) whose
    destination folder already holds a file of the user's."""

    def to(ctx: Context) -> str:
        disk = ctx.mount(ctx.tmp / "small", size)
        (disk / "model").mkdir()
        (disk / "model" / "notes.txt").write_text("mine")
        return "small/model"

    return to


@dataclass(frozen=True)
class Case:
    setup: Setup
    expected: tuple[str, ...]  # in the one stderr line: the field or file, what is wrong, what is valid
    accepted: int = 0  # > 0: the folder is accepted; that many images on the data line, none skipped
    printed: tuple[str, ...] = ()  # also on stdout
    files: tuple[str, ...] | None = None  # what the fetch destination holds afterwards, if it is not watched


def row(case_id: str, setup: Setup, *expected: str, accepted: int = 0, printed: tuple[str, ...] = (), files: tuple[str, ...] | None = None) -> Any:
    return pytest.param(Case(setup, expected, accepted, printed, files), id=case_id)


PREFLIGHT = "model.arch: squeezenet1_0 fails the pre-flight at 'build it with a new classifier"
ON_ERROR = {"data.on_bad_file": "error"}

CASES = [
    # ---- the space file
    row("yaml-syntax-error", space_text("name: corpus\ndata: {path: images\n"), "space.yaml: not valid YAML at line 3", "expected ',' or '}'"),
    row("yaml-tab-indentation", space_text("name: corpus\ndata:\n\tpath: images\n"), "space.yaml: not valid YAML at line 3", "'\\t'"),
    row("not-utf8", space_text(b"name: corpus\ndata: {path: caf\xe9}\n"), "space.yaml: not UTF-8 text (byte 29)", "save the space file as UTF-8"),
    row("a-list-not-a-mapping", space_text("- name: corpus\n"), "the space file: expected a mapping"),
    row("unknown-key-did-you-mean", space({"serach": {"num_trials": 4}}), "serach: unknown key (did you mean search?)", "valid keys: name, data"),
    row("unknown-nested-key-did-you-mean", space({"search.kd_alfa": 0.5}), "search.kd_alfa: unknown key (did you mean kd_alpha?)", "kd_temperature"),
    row("string-for-integer", space({"trial.epochs": "two"}), "trial.epochs: expected an integer, got 'two'"),
    row("range-for-a-number", space({"teacher.lr": [1e-3, 1e-2]}), "teacher.lr: expected a number, got [0.001, 0.01]"),
    row("string-for-boolean", space({"trial.amp": "yes"}), "trial.amp: expected true or false, got 'yes'"),
    row("nan-for-a-number", space({"search.kd_temperature": float("nan")}), "search.kd_temperature: expected a finite number"),
    row("image-size-too-small", space({"data.image_size": 8}), "data.image_size: 8 is outside [16, 1024]"),
    row("no-images-left-to-train", space({"data.val_fraction": 0.5, "data.test_fraction": 0.5}), "data.test_fraction: val_fraction + test_fraction must leave images"),
    row("lr-above-10", space({"search.lr": 50}), "search.lr: 50 is outside (0, 10]"),
    row("negative-seed", space({"search.seed": -1}), "search.seed: must be in [0, 2**32 - 1], got -1"),
    row("seed-beyond-32-bits", space({"data.seed": 2**40}), "data.seed: must be in [0, 2**32 - 1]"),
    row("negative-weight-decay", space({"trial.weight_decay": -0.1}), "trial.weight_decay: must be >= 0"),
    row("zero-trials-flag", space(flags=("--num-trials", "0")), "search.num_trials: must be at least 1, got 0"),
    row("unknown-model", space({"model": {"arch": "resnet19"}}), "model.arch: unknown torchvision model 'resnet19' (did you mean resnet18?)", "valid: alexnet"),
    row("unknown-weights", space({"model": {"arch": "resnet18", "weights": "IMAGENET1K_V9"}}), "model.weights: 'IMAGENET1K_V9' is not a weights name of resnet18; valid: IMAGENET1K_V1, null"),
    row("unknown-criterion", space({"search.importance": ["l1", "activations"]}), "search.importance: unknown criterion 'activations' (did you mean activation?)", "valid: "),
    row("unknown-distillation-teacher", space({"search.teacher": ["target", "hinton"]}), "search.teacher[1]: expected one of none, target, source_classifier, source_features, got 'hinton'"),
    row("unknown-feature-loss", space({"search.feature_loss": "mse"}), "search.feature_loss: expected one of afd, delta, got 'mse'"),
    # ---- the image folder
    row("dataset-folder-missing", space({"data.path": "nowhere"}), "data.path: folder 'nowhere' does not exist; give an ImageFolder root"),
    row("dataset-path-too-long", space({"data.path": "x" * 300}), "data.path: cannot read 'xxx", "([Errno 36] File name too long); give an ImageFolder root"),
    row("dataset-path-is-a-file", space({"data.path": "images/cat/00.png"}), "data.path: folder 'images/cat/00.png' does not exist (it is a file)"),
    row("dataset-folder-empty", space({"data.path": empty_folder("void")}), "data.path: 'void' needs at least two class sub-folders"),
    row("only-hidden-second-class", space(classes={"cat": plain(), ".ipynb_checkpoints": plain()}), "data.path: 'images' needs at least two class sub-folders"),
    row("empty-class-folder", space(classes=two_classes(dog=[])), "data.path: class 'dog'", "has 0 readable image(s); need at least 3"),
    row("class-with-one-image", space(classes=two_classes(dog=plain(1))), "data.path: class 'dog'", "has 1 readable image(s); need at least 3"),
    row("bad-files-leave-a-class-too-small", space(classes=two_classes(dog=[*plain(2), "truncated", "empty"])), "data.path: class 'dog'", "has 2 readable image(s)"),
    row("truncated-png-on-bad-file-error", space(ON_ERROR, classes=two_classes(dog=[*plain(), "truncated"])), "data.path: unreadable file dog/06.png", "set data.on_bad_file: skip"),
    row("zero-byte-jpg-on-bad-file-error", space(ON_ERROR, classes=two_classes(dog=[*plain(), "empty"])), "data.path: unreadable file dog/06.jpg", "set data.on_bad_file: skip"),
    row("non-image-file-on-bad-file-error", space(ON_ERROR, classes=two_classes(cat=[*plain(), "text"])), "data.path: unreadable file cat/06.csv", "set data.on_bad_file: skip"),
    row("bad-file-skipped-by-default", space(classes=two_classes(dog=[*plain(), "truncated"])), PREFLIGHT, accepted=12, printed=("data: skipped 1 unreadable file(s): dog/06.png",)),
    # ---- accepted folders: decoded and reported, then the pre-flight refuses squeezenet
    row("16-bit-png", space(classes=two_classes(dog=["16bit"] * 6)), PREFLIGHT, accepted=12),
    row("rgba-png", space(classes=two_classes(dog=["rgba"] * 6)), PREFLIGHT, accepted=12),
    row("cmyk-jpeg", space(classes=two_classes(dog=["cmyk"] * 6)), PREFLIGHT, accepted=12),
    row("palette-png", space(classes=two_classes(dog=["palette"] * 6)), PREFLIGHT, accepted=12),
    row("non-ascii-class-name", space(classes={"cat": plain(), "café": plain(), "猫": plain()}), PREFLIGHT, accepted=18),
    row("space-in-class-name", space(classes={"cat": plain(), "sea lion": plain()}), PREFLIGHT, accepted=12),
    # ---- the output folder
    row("output-read-only", space(output=read_only_output), "--output: cannot write to", "ro/runs ([Errno 30] Read-only file system); pass --output DIR"),
    row("output-under-a-file", space(output=output_under_a_file), "--output: cannot write to", "notes.txt/runs ([Errno 20] Not a directory)"),
    # ---- fetch
    row("fetch-no-model-under-budget", fetch("50K"), "--max-macs: no Pareto model has at most 50.00K MACs; the smallest model on the front has 100.00K MACs"),
    row("fetch-disk-too-small", fetch("150K", to=small_disk("1m")), "-o small/model: the model of trial a needs 44.", "MB are free there; nothing was written"),
    row(
        "fetch-disk-fills-during-onnx-export", fetch("150K", to=small_disk("50m"), keeps_destination=False),
        "-o small/model/model.onnx: not written ([Errno 28] No space left on device); the safetensors model in small/model is complete",
        printed=("wrote small/model/ : trial a",), files=("channel_spec.json", "config.yaml", "model.safetensors", "notes.txt"),
    ),  # fmt: skip
    row("fetch-planted-pickle", fetch("250K"), "/model/model.pt: refusing to load a model folder that holds this file", "never pickles"),
    row("fetch-pickle-as-safetensors", fetch("350K"), "/model/model.safetensors: not a safetensors file"),
    row("fetch-alias-without-a-registered-model", fetch_alias("knee"), "--alias: no registered model 'corpus' in this store", "fetch with --max-macs"),
]


@pytest.fixture
def mounts() -> Iterator[Callable[..., Path]]:
    """tmpfs mounts (size-limited folders), unmounted afterwards whatever happened."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"this row needs a tmpfs mount (root): {result.stderr.strip()}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_loses_nothing(
    case: Case, store: Store, mounts: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ctx = Context(tmp=tmp_path, store=store, mount=mounts, watched=[])
    argv = case.setup(ctx)
    before = {folder: snapshot(folder) for folder in ctx.watched}
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out[-2000:], err[-2000:])
    assert err.count("\n") == 1 and err.startswith("slimtune: error: "), err
    for part in case.expected:
        assert part in err, err
    assert "Traceback" not in out + err
    for folder, files in before.items():  # nothing computed before is lost or changed, nothing half-written is left
        assert snapshot(folder) == files, folder
    if case.accepted:
        (line,) = DATA_LINE.findall(out)
        assert int(line[0]) == len(list((tmp_path / "images").iterdir()))
        assert sum(map(int, line[1:])) == case.accepted, out
        assert ("data: skipped" in out) == any("skipped" in p for p in case.printed), out
    for part in case.printed:
        assert part in out, out
    if argv[0] == "fetch":
        destination = tmp_path / argv[argv.index("-o") + 1]
        assert not any(p.name.endswith(".download") for p in destination.parent.iterdir())  # no staging left
        assert set(statuses(store.runs).values()) == {"FINISHED"}
        if case.files is not None:
            assert sorted(p.name for p in destination.iterdir()) == list(case.files)


def test_the_store_serves_a_clean_model(store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The fetch rows' control: with room and a clean model, the same store fetches fine."""
    import pipelines.export

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipelines.export, "export_onnx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("skipped in this test")))  # 3-6 s
    assert main(["fetch", NAME, "--max-macs", "150K", "-o", "model", "--output", str(store.runs)]) == 0
    out = capsys.readouterr().out
    assert "wrote model/ : trial a" in out and "model/model.onnx: not written, the ONNX exporter failed (RuntimeError)" in out
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["channel_spec.json", "config.yaml", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ---------------------------------------------------------------- a NaN loss in one trial of a real search


def test_a_diverging_trial_fails_alone_and_the_search_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A real tiny search (local Ray, SQLite MLflow, 2 trials) over a folder of the accepted formats
    and names. Its only searched knob is search.lr (log-uniform in [1e-5, 10]): the uniform anchor
    gets the middle, 0.01, the random sampler's seed 4 draws 6.3 for the other trial. With
    trial.weight_decay 10, AdamW's decoupled decay multiplies every weight by 1 - lr * wd per
    step: 0.9 for the anchor, -62 for the other, whose weights overflow within a few steps."""
    monkeypatch.chdir(tmp_path)
    formats = ["16bit", "rgba", "cmyk", "palette", "rgb"]
    image_folder(tmp_path / "images", {"grey 16-bit": ["16bit"] * 10, "café au lait": ["rgb"] * 10, "mixed": [formats[i % 5] for i in range(10)]})
    raw = {
        "name": "diverge",
        "data": {"path": "images", "image_size": 64},  # >= 64 px: a batch of one still has 2x2 values per channel for BatchNorm
        "model": {"arch": "mobilenet_v3_small", "weights": None},
        "teacher": {"epochs": 1, "batch_size": 8, "bn_recalibration_batches": 1},
        "trial": {"epochs": 1, "batch_size": 1, "bn_recalibration_batches": 1, "weight_decay": 10.0},
        "search": {
            "num_trials": 2, "max_concurrent": 1, "sampler": "random", "seed": 4, "uniform_anchors": [0.5], "warm_start": "teacher",
            "budgets": {"granularity": "target", "target_macs": 0.5, "depth_tilt": 0.0, "residual_tilt": 0.0},
            "lr": {"low": 1e-5, "high": 10, "log": True}, "kd_alpha": 0.5, "kd_temperature": 4.0,
        },
    }  # fmt: skip
    (tmp_path / "diverge.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    code = main(["search", "diverge.yaml", "--output", "runs"])
    out, err = capsys.readouterr()
    assert code == 0, (out[-3000:], err[-3000:])  # a search with a finished trial succeeds
    assert "Traceback" not in out + err
    (line,) = DATA_LINE.findall(out)
    assert line[0] == "3" and sum(map(int, line[1:])) == 30 and "data: skipped" not in out  # every 16-bit, RGBA, CMYK, palette file
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "diverge")
    search = tracker.latest_search()
    assert search.status == "FINISHED" and search.metrics["failed_trials"] == 1 and search.metrics["finished_trials"] == 1
    trials = {r.status: r for r in tracker.children(search.run_id, role="trial")}
    assert sorted(trials) == ["FAILED", "FINISHED"]
    failed, finished = trials["FAILED"], trials["FINISHED"]
    assert float(failed.params["lr"]) > 1 and float(finished.params["lr"]) == pytest.approx(0.01)
    assert re.fullmatch(
        r"FloatingPointError: loss is (nan|inf|-inf) at step \d+ of epoch 1: the fine-tune diverged; lower the learning rate"
        r" \(search\.lr for the trials, teacher\.lr for the teacher\)",
        failed.tags["error"],
    ), failed.tags["error"]
    assert f"trial {failed.tags[TRIAL_TAG]}: FAILED" in out and f"trial {finished.tags[TRIAL_TAG]}: val acc" in out
    assert {r.status for r in tracker.children(search.run_id, role="teacher")} == {"FINISHED"}
    spec = json.loads(tracker.download(finished.run_id, f"model/{SPEC_FILE}", tmp_path / "spec").read_text())
    assert spec["classes"] == ["café au lait", "grey 16-bit", "mixed"]

    # The same folder with a teacher that diverges: one line naming teacher.lr, nothing left RUNNING.
    raw["teacher"].update(lr=10.0, weight_decay=10.0, batch_size=1)
    (tmp_path / "diverge.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True))
    code = main(["search", "diverge.yaml", "--output", "runs"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err, (out[-3000:], err[-3000:])
    assert re.fullmatch(r"slimtune: error: teacher\.lr: 10 makes the teacher's fine-tune diverge \(loss is \S+ at step \d+ of epoch 1\); try a lower teacher\.lr\n", err), err
    diverged = tracker.latest_search()
    assert diverged.run_id != search.run_id and diverged.status == "FAILED"
    assert [r.status for r in tracker.children(diverged.run_id, role="teacher")] == ["FAILED"]
    assert all(r.info.status != "RUNNING" for r in tracker.client.search_runs([tracker.experiment_id], max_results=50))
    assert tracker.latest_search(status="FINISHED").run_id == search.run_id  # still the one pareto and fetch read


# ---------------------------------------------------------------- the space loader, fuzzed


def _leaves(raw: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested mapping, mappings included."""
    if not isinstance(raw, dict):
        return []
    return [path for key, value in raw.items() for path in ((*prefix, key), *_leaves(value, (*prefix, key)))]


_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**31, max_value=2**80) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["", "~", "null", "1e400", "-0", ".inf", "gp", "target", "l1", "./", "\x00", "../..", "é" * 300]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)  # fmt: skip


@st.composite
def _mutated_quickstart(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    """The quickstart space with 1-3 fields set to junk, deleted, or added (unicode keys too)."""
    raw = copy.deepcopy(base)
    paths = _leaves(raw)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        action = draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete":
            node.pop(path[-1], None)
        elif action == "add":
            node[draw(st.text(min_size=1, max_size=8))] = draw(_JUNK)
        else:
            node[path[-1]] = draw(_JUNK)
    return raw


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    work = tmp_path_factory.mktemp("fuzz")
    image_folder(work / "images", {"a": [], "b": []})  # two class folders: the loader's own checks pass
    base = yaml.safe_load(QUICKSTART.read_text())
    base["data"]["path"] = str(work / "images")
    return work, base


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_space_loader_loads_or_says_one_line(data: st.DataObject, fuzz_base: tuple[Path, dict[str, Any]]) -> None:
    work, base = fuzz_base
    kind = data.draw(st.sampled_from(["mutated quickstart", "junk document", "text", "bytes"]))
    if kind == "mutated quickstart":
        content = yaml.safe_dump(data.draw(_mutated_quickstart(base)), allow_unicode=True).encode()
    elif kind == "junk document":
        content = yaml.safe_dump(data.draw(_JUNK), allow_unicode=True).encode()
    elif kind == "text":
        content = data.draw(st.text(alphabet=st.sampled_from(list("name:data{}[]-,'\"&*!|>#\t\n %@`?é0123456789.e+")), max_size=80)).encode()
    else:
        content = data.draw(st.binary(max_size=80))
    path = work / "space.yaml"
    path.write_bytes(content)
    try:
        load_space(path)
    except SpaceError as error:  # anything else fails the test, with Hypothesis's smallest example
        message = str(error)
        assert message and "\n" not in message, message
