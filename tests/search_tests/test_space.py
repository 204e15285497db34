from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.config import DataConfig, ModelConfig, TeacherConfig
from search.space import (
    BudgetSpace,
    Experiment,
    Range,
    SearchConfig,
    SpaceError,
    load_space,
    parse_space,
    to_dict,
)

from _space_helpers import QUICKSTART, REPO, apply_mutations, make_classes, setting


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("relative", ["images", "./images", "sub/../images"])
def test_relative_data_path_is_made_absolute(
    raw: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str
) -> None:
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    raw["data"]["path"] = relative
    assert parse_space(raw).data.path == str((tmp_path / "images").resolve())


# ---------------------------------------------------------------- valid forms


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, Range(0.5, 0.5)),
        (1, Range(1.0, 1.0)),
        ("0.25", Range(0.25, 0.25)),
        ([0.2, 0.8], Range(0.2, 0.8)),
        ((0.2, 0.8), Range(0.2, 0.8)),
        ([0, 1], Range(0.0, 1.0)),
        (["0.1", "1"], Range(0.1, 1.0)),
        ({"low": 0.2, "high": 0.8}, Range(0.2, 0.8)),
        ({"low": 0.2, "high": 0.8, "log": True}, Range(0.2, 0.8, log=True)),
        ({"low": 0.5, "high": 0.5, "log": False}, Range(0.5, 0.5)),
    ],
)
def test_range_forms(raw: dict[str, Any], value: Any, expected: Range) -> None:
    raw["search"] = {"kd_alpha": value}
    assert parse_space(raw).search.kd_alpha == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3e-4", Range(3e-4, 3e-4)),
        (["3e-4", "3e-3"], Range(3e-4, 3e-3)),
        ({"low": "3e-4", "high": "3e-3", "log": True}, Range(3e-4, 3e-3, log=True)),
        (1e-3, Range(1e-3, 1e-3)),
    ],
)
def test_lr_range_accepts_yaml_exponent_strings(raw: dict[str, Any], value: Any, expected: Range) -> None:
    raw["search"] = {"lr": value}
    assert parse_space(raw).search.lr == expected


@pytest.mark.parametrize("yaml_value", ["3e-4", "3.0e-4", "0.0003", "'3e-4'"])
def test_float_from_yaml_text(raw: dict[str, Any], yaml_value: str) -> None:
    raw["teacher"] = yaml.safe_load(f"lr: {yaml_value}")
    lr = parse_space(raw).teacher.lr
    assert isinstance(lr, float)
    assert lr == pytest.approx(3e-4)


def test_range_fields_are_floats(raw: dict[str, Any]) -> None:
    raw["search"] = {"kd_temperature": [1, 8]}
    value = parse_space(raw).search.kd_temperature
    assert isinstance(value.low, float)
    assert isinstance(value.high, float)


def test_int_accepted_for_float_field(raw: dict[str, Any]) -> None:
    raw["search"] = {"cpus_per_trial": 2}
    value = parse_space(raw).search.cpus_per_trial
    assert value == 2.0
    assert isinstance(value, float)


@pytest.mark.parametrize(
    ("dotted", "value", "attribute", "expected"),
    [
        ("model.weights", None, "model.weights", None),
        ("model.weights", "IMAGENET1K_V2", "model.weights", "IMAGENET1K_V2"),
        ("data.max_images_per_class", None, "data.max_images_per_class", None),
        ("data.max_images_per_class", 3, "data.max_images_per_class", 3),
        ("data.image_size", 16, "data.image_size", 16),
        ("data.image_size", 1024, "data.image_size", 1024),
        ("search.sampler", "tpe", "search.sampler", "tpe"),
        ("search.metric", "balanced_accuracy", "search.objective", "val_balanced_accuracy"),
        ("search.budgets.granularity", "stage", "search.budgets.granularity", ["stage"]),
        ("search.budgets.keep", {"features.0.0": 1.0}, "search.budgets.keep", {"features.0.0": Range(1.0, 1.0)}),
        ("search.budgets.keep", {"classifier": [0.5, 1]}, "search.budgets.keep", {"classifier": Range(0.5, 1.0)}),
        ("search.budgets.keep_ratio", 1, "search.budgets.keep_ratio", Range(1.0, 1.0)),
        ("search.kd_alpha", 0, "search.kd_alpha", Range(0.0, 0.0)),
        ("search.kd_temperature", 100, "search.kd_temperature", Range(100.0, 100.0)),
        ("search.gpus_per_trial", 0.5, "search.gpus_per_trial", 0.5),
        ("trial.lr", 1e-3, "trial.lr", 1e-3),
        ("trial.epochs", 4, "trial.epochs", 4),
        ("name", "my_exp-1.2", "name", "my_exp-1.2"),
        ("model.arch", "resnet18", "model.arch", "resnet18"),
    ],
)
def test_valid_field(raw: dict[str, Any], tmp_path: Path, dotted: str, value: Any, attribute: str, expected: Any) -> None:
    parsed: Any = parse_space(apply_mutations(raw, tmp_path, setting(dotted, value)))
    for part in attribute.split("."):
        parsed = getattr(parsed, part)
    assert parsed == expected


def test_keep_keys_with_dots_are_kept_whole(raw: dict[str, Any]) -> None:
    raw["search"] = {"budgets": {"keep": {"features.0.0": 1.0, "features.1": 0.5}}}
    keep = parse_space(raw).search.budgets.keep
    assert set(keep) == {"features.0.0", "features.1"}


def test_parse_does_not_mutate_input(raw: dict[str, Any]) -> None:
    raw["search"] = {"kd_alpha": [0.2, 0.4]}
    before = copy.deepcopy(raw)
    parse_space(raw)
    assert raw == before


# ---------------------------------------------------------------- load_space


def test_load_space_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent_space.yaml"
    with pytest.raises(SpaceError, match="absent_space.yaml") as info:
        load_space(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["a: [1, 2", "name: t\ndata: {path: x\n", "a: b: c", "- a\nb: c"])
def test_load_space_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken_space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert "broken_space.yaml" in message
    assert "not valid YAML" in message
    assert re.search(r"at line \d+", message)
    assert "\n" not in message


def test_load_space_accepts_str_path(tmp_path: Path, raw: dict[str, Any]) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_space(str(path)) == parse_space(raw)


def test_load_space_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpaceError, match="expected a mapping"):
        load_space(path)


def test_load_space_reads_exponent_without_dot(tmp_path: Path, folder: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(f"name: t\ndata:\n  path: {folder}\nteacher:\n  lr: 3e-4\nsearch:\n  lr: {{low: 1e-4, high: 1e-2, log: true}}\n")
    experiment = load_space(path)
    assert experiment.teacher.lr == pytest.approx(3e-4)
    assert experiment.search.lr == Range(1e-4, 1e-2, log=True)


def _quickstart_copy(tmp_path: Path) -> Path:
    images = make_classes(tmp_path / "animals", "cat", "dog")
    text = QUICKSTART.read_text()
    rewritten, count = re.subn(r"(?m)^(\s*path:\s*)data/animal_mnist", lambda m: m.group(1) + str(images), text)
    assert count == 1, "quickstart.yaml no longer has `path: data/animal_mnist`"
    path = tmp_path / "quickstart.yaml"
    path.write_text(rewritten)
    return path


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("name", "quickstart"),
        ("model.arch", "mobilenet_v2"),
        ("model.weights", "IMAGENET1K_V1"),
        ("data.image_size", 64),
        ("teacher.epochs", 8),
        ("teacher.lr", 1e-3),
        ("trial.epochs", 4),
        ("search.num_trials", 16),
        ("search.sampler", "gp"),
        ("search.metric", "accuracy"),
        ("search.importance", ["activation"]),
        ("search.budgets.granularity", ["target"]),
        ("search.lr", Range(1e-3, 1e-3)),
        ("search.kd_temperature", Range(1.0, 8.0)),
    ],
)
def test_quickstart_space_parses(tmp_path: Path, attribute: str, expected: Any) -> None:
    value: Any = load_space(_quickstart_copy(tmp_path))
    for part in attribute.split("."):
        value = getattr(value, part)
    assert value == expected


def test_quickstart_space_from_repoas_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    if (REPO / "data" / "animal_mnist").is_dir() and sum(p.is_dir() for p in (REPO / "data" / "animal_mnist").iterdir()) >= 2:
        assert load_space(Path("spaces") / "quickstart.yaml").name == "quickstart"
    else:
        with pytest.raises(SpaceError, match=r"^data\.path: "):
            load_space(Path("spaces") / "quickstart.yaml")


# ---------------------------------------------------------------- smoke


@pytest.fixture
def experiment(raw: dict[str, Any]) -> Experiment:
    return parse_space(raw)


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        ("data.image_size", 32),
        ("data.max_images_per_class", 20),
        ("teacher.epochs", 1),
        ("trial.epochs", 1),
        ("teacher.bn_recalibration_batches", 2),
        ("trial.bn_recalibration_batches", 2),
        ("search.num_trials", 2),
    ],
)
def test_smoke_shrinks(experiment: Experiment, attribute: str, expected: Any) -> None:
    value: Any = experiment.smoke()
    for part in attribute.split("."):
        value = getattr(value, part)
    assert value == expected


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [("name", "t"), ("model", ModelConfig()), ("search.sampler", "gp"), ("search.lr", Range(3e-4, 3e-3, log=True))],
)
def test_smoke_keeps_the_rest(experiment: Experiment, attribute: str, expected: Any) -> None:
    value: Any = experiment.smoke()
    for part in attribute.split("."):
        value = getattr(value, part)
    assert value == expected


def test_smoke_returns_a_new_experiment(experiment: Experiment) -> None:
    smoke = experiment.smoke()
    assert smoke is not experiment
    assert experiment.trial.epochs == 3


@pytest.mark.parametrize("image_size", [16, 24, 32])
def test_smoke_keeps_smaller_images(raw: dict[str, Any], image_size: int) -> None:
    raw["data"]["image_size"] = image_size
    assert parse_space(raw).smoke().data.image_size == image_size


def test_smoke_caps_unlimited_images(raw: dict[str, Any]) -> None:
    raw["data"]["max_images_per_class"] = None
    assert parse_space(raw).smoke().data.max_images_per_class == 20


@pytest.mark.parametrize(
    ("dotted", "value", "attribute"),
    [
        ("data.max_images_per_class", 5, "data.max_images_per_class"),
        ("search.num_trials", 1, "search.num_trials"),
    ],
)
def test_smoke_never_grows_a_setting(raw: dict[str, Any], tmp_path: Path, dotted: str, value: int, attribute: str) -> None:
    smoke: Any = parse_space(apply_mutations(raw, tmp_path, setting(dotted, value))).smoke()
    for part in attribute.split("."):
        smoke = getattr(smoke, part)
    assert smoke <= value


def test_smoke_is_still_valid(experiment: Experiment) -> None:
    assert parse_space(yaml.safe_load(yaml.safe_dump(to_dict(experiment.smoke())))) == experiment.smoke()


# ---------------------------------------------------------------- to_dict


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Range(0.1, 1.0), {"low": 0.1, "high": 1.0, "log": False}),
        ({"a": Range(1.0, 1.0)}, {"a": {"low": 1.0, "high": 1.0, "log": False}}),
        (3, 3),
        ("x", "x"),
        (None, None),
    ],
)
def test_to_dict_values(value: Any, expected: Any) -> None:
    assert to_dict(value) == expected


def test_to_dict_has_every_section(experiment: Experiment) -> None:
    assert list(to_dict(experiment)) == ["name", "data", "model", "teacher", "trial", "search"]


def _custom_raw(raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["data"].update({"image_size": 48, "max_images_per_class": None, "val_fraction": 0.2})
    raw["model"] = {"weights": None}
    raw["teacher"] = {"epochs": 2, "lr": "3e-4"}
    raw["search"] = {
        "sampler": "tpe",
        "gpus_per_trial": 0.5,
        "budgets": {"granularity": "stage", "keep_ratio": 0.5, "keep": {"features.0.0": 1.0}},
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "kd_alpha": 0,
    }
    return raw


@pytest.mark.parametrize("variant", ["defaults", "custom"])
def test_to_dict_round_trips_through_yaml(raw: dict[str, Any], variant: str) -> None:
    experiment = parse_space(raw if variant == "defaults" else _custom_raw(raw))
    dumped = yaml.safe_dump(to_dict(experiment))
    assert parse_space(yaml.safe_load(dumped)) == experiment


def test_to_dict_round_trips_quickstart(tmp_path: Path) -> None:
    experiment = load_space(_quickstart_copy(tmp_path))
    assert parse_space(yaml.safe_load(yaml.safe_dump(to_dict(experiment)))) == experiment


def test_to_dict_is_plain_data(raw: dict[str, Any]) -> None:
    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                assert isinstance(key, str)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        else:
            assert value is None or isinstance(value, (str, int, float, bool)), value

    walk(to_dict(parse_space(_custom_raw(raw))))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("class_balance: off", "off"), ("class_balance: auto", "auto"), ("keep: best", "best"), ("augment: flip", "flip"),
     ("warmup_epochs: 2", 2), ("label_smoothing: 0.2", 0.2)],
)  # fmt: skip
def test_teacher_recipe_keys_parse(raw: dict[str, Any], text: str, expected: Any) -> None:
    """A bare YAML `off` is a boolean to PyYAML: read as the choice it spells."""
    raw["teacher"] = yaml.safe_load(text)
    (key,) = raw["teacher"]
    assert getattr(parse_space(raw).teacher, key) == expected


def test_trial_augment_parses_and_stays_a_trial_key(raw: dict[str, Any]) -> None:
    raw["trial"] = yaml.safe_load("augment: flip")
    experiment = parse_space(raw)
    assert experiment.trial.augment == "flip" and experiment.teacher.augment == TeacherConfig().augment


def test_dataclass_defaults_match_module_defaults() -> None:
    assert SearchConfig().budgets == BudgetSpace()
    assert Experiment(name="x", data=DataConfig(path="p")).teacher == TeacherConfig()
