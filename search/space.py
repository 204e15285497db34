"""Search spaces: a YAML file parsed into a typed, frozen `Experiment`, validated field by field.

Every problem is reported as one `SpaceError` line that names the field and what would be valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipelines.config import DataConfig, FinetuneConfig, ModelConfig, TeacherConfig, TrainConfig
from search._helpers import UsageError

__all__ = ["Range", "BudgetSpace", "SearchConfig", "Experiment", "SpaceError", "load_space", "parse_space", "to_dict"]


class SpaceError(UsageError):
    """An invalid space file or field."""


@dataclass(frozen=True)
class Range:
    """A searched interval; low == high fixes the value. YAML: `0.5`, `[0.1, 1.0]` or `{low, high, log}`."""

    low: float
    high: float
    log: bool = False  # sample uniformly in log space (learning rates)


Parametrisation = Literal["target", "group", "stage", "theta", "global_percentile"]
Schedule = Literal["one_shot", "iterative", "priority"]
TeacherChoice = Literal["none", "target", "source_classifier", "source_features"]


@dataclass(frozen=True)
class BudgetSpace:
    # target: a MACs target met by scaling an allocation shape (every trial lands where it was asked);
    # group: a ratio per dependency group; stage: per stage (fewer knobs); theta: Zhong's single
    # cumulative-share knob; global_percentile: one global cut (network slimming). A list is searched.
    granularity: list[Parametrisation] = field(default_factory=lambda: ["target"])
    # MACs / dense MACs. Log-uniform: the front's accuracy changes fastest at the low end, where the
    # hypervolume is won or lost; 0.005 is ~2.5x MobileNetV2's one-channel-per-group floor at 64 px.
    target_macs: Range = Range(0.005, 0.8, log=True)
    depth_tilt: Range = Range(-1.0, 2.0)  # log keep ratio, last group minus first (measured: keeping the late layers wins at <= 0.05x)
    residual_tilt: Range = Range(-0.5, 1.5)  # log keep ratio of residual-stream groups minus the others (measured: +5 points at 0.05x at +1)
    keep_ratio: Range = Range(0.1, 1.0)  # group/stage: AMC's per-layer ratios in a wide range
    keep: dict[str, Range] = field(default_factory=dict)  # group or stage name -> the range of its knob keep.<name>, instead of keep_ratio
    min_channels: int = 0  # groups with at most this many channels are never pruned (TASCNet: 128)
    theta: Range = Range(0.05, 0.6)  # share of each layer's summed scores whose channels are cut
    percentile: Range = Range(0.2, 0.9)  # fraction of all channels cut by the global threshold


@dataclass(frozen=True)
class SearchConfig:
    num_trials: int = 16  # trials started (with `rungs`, some stop early)
    # The objective (with MACs) on the val split: what the study, successive halving, the front and
    # `fetch` select on. balanced_accuracy (mean per-class recall) for imbalanced classes, where
    # always answering the majority class scores its share in accuracy but only 1 / classes here.
    # Both are logged for the teacher and every trial either way.
    metric: Literal["accuracy", "balanced_accuracy"] = "accuracy"
    # Trials at once; null: as many as the cluster's CPUs (and GPUs) allow, e.g. 2 one-thread trials on 2 cores.
    max_concurrent: int | None = None
    # gp: Optuna's GPSampler (LogEHVI), in range at 16-64 trials; tpe: multivariate TPE;
    # nsga2: evolutionary, needs 100s of trials; random: the baseline every sampler must beat.
    sampler: Literal["gp", "tpe", "nsga2", "random"] = "gp"
    seed: int = 0  # seeds the sampler: the same space proposes the same trials
    cpus_per_trial: float = 1  # also the trial's torch threads; more threads than cores slows CPU training 10x
    gpus_per_trial: float = 0  # fractional values share a GPU between trials
    # A trial whose process or node died is retried this often, on any node, from its last
    # epoch's checkpoint, in the same MLflow run.
    max_failures: int = 3
    importance: list[str] = field(default_factory=lambda: ["l1"])  # criteria; a list is searched
    # MACs targets (fractions of the dense MACs) tried first with a uniform keep ratio, largest first:
    # the plain uniform-pruning baseline on every front, spread over the MACs range, and the
    # sampler's first points. At most num_trials of them.
    uniform_anchors: list[float] = field(default_factory=lambda: [0.5, 0.15, 0.05, 0.015])
    # Trials whose MACs target is fixed on this many log-spaced points of budgets.target_macs,
    # run with the anchors, largest target first; the sampler picks their other knobs. 0: it picks
    # every trial's target too.
    target_grid: int = 0
    # front: a trial with a MACs target prunes the finished front model with the fewest MACs above
    # its target (NetAdapt-style: its epochs add to that model's), else the teacher; teacher: always
    # from the teacher. Measured: +3 to +6 points at <= 0.2x MACs at equal compute.
    warm_start: Literal["front", "teacher"] = "front"
    # Successive halving (multi-objective): after each epoch listed, a trial continues only if it is
    # in the best 1/eta by val accuracy of the trials within 1.5x its MACs at that epoch. [] = off.
    rungs: list[int] = field(default_factory=list)
    eta: float = 2.0
    epoch_budget: int | None = None  # total fine-tune epochs over the search (equal-compute runs); null = no cap
    budgets: BudgetSpace = BudgetSpace()
    schedule: list[Schedule] = field(default_factory=lambda: ["one_shot"])
    rounds: int = 3  # iterative / priority: prune -> fine-tune rounds sharing the trial's epochs
    max_drop: float = 0.02  # iterative / priority: stop when val accuracy falls this far below the best round
    bn_sparsity: Range = Range(0.0, 0.0)  # network slimming's L1 on BN scales for one epoch before the cut; 0 = off
    lr: Range = Range(3e-4, 3e-3, log=True)  # AdamW fine-tune of the pruned student
    teacher: list[TeacherChoice] = field(default_factory=lambda: ["target"])  # who the student learns from
    kd_alpha: Range = Range(0.0, 1.0)  # teacher=target: Hinton KD weight
    kd_temperature: Range = Range(1.0, 8.0)  # teacher=target or source_classifier
    source_kd_weight: Range = Range(0.1, 1.0)  # teacher=source_classifier: Liu et al.'s source-KD weight
    feature_loss: Literal["afd", "delta"] = "afd"  # teacher=source_features: AFDS's AFD or DELTA
    feature_weight: Range = Range(1e-3, 1e-1, log=True)  # its weight (AFDS uses ~0.01)
    l2sp_alpha: Range = Range(0.0, 0.0)  # L2-SP towards the pretrained weights (replaces weight decay); 0 = off
    l2sp_beta: float = 0.01  # L2-SP's plain L2 on the classifier head
    gating_density: Range | None = None  # AFS dynamic gating: per-stage density range; null = no gating
    gating_warmup: int = 0  # epochs stepping the density down from 1 (FBS); 0 = the target from the start
    class_weighted: bool = False  # TASCNet: class-weighted cross-entropy
    # MACs budgets (fractions of the teacher's MACs) that get a registry alias under-<b>x (0.1 ->
    # under-0p1x): the best front member within each. Half, a quarter, a tenth: one alias per common
    # deployment question ("how good at half the cost?"); a budget no member meets gets none.
    alias_budgets: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1])

    @property
    def objective(self) -> str:
        """The val metric the search maximises: `val_accuracy` or `val_balanced_accuracy`."""
        return f"val_{self.metric}"


@dataclass(frozen=True)
class Experiment:
    name: str  # the MLflow experiment name and the output sub-folder
    data: DataConfig
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig = TeacherConfig()  # the fuller recipe of pipelines.config.TeacherConfig: every trial's ceiling
    trial: FinetuneConfig = FinetuneConfig()
    search: SearchConfig = SearchConfig()

    def smoke(self) -> Experiment:
        """The same experiment shrunk to seconds (`--smoke-test`): tiny data, one epoch, two trials."""
        return dataclasses.replace(
            self,
            data=dataclasses.replace(
                self.data,
                image_size=min(32, self.data.image_size),
                max_images_per_class=min(20, self.data.max_images_per_class or 20),
            ),
            teacher=dataclasses.replace(self.teacher, epochs=1, bn_recalibration_batches=2, warmup_epochs=0),
            trial=dataclasses.replace(self.trial, epochs=1, bn_recalibration_batches=2),
            search=dataclasses.replace(self.search, num_trials=min(2, self.search.num_trials), rungs=[], epoch_budget=None),
        )


def to_dict(value: Any) -> Any:
    """A config as plain YAML-able data (the resolved config saved with every run)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_dict(v) for k, v in value.items()}
    return value


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if hint is Range:
        return "a number or [low, high]"
    if origin is list:
        return f"{_type_name(typing.get_args(hint)[0])} (or a list of them)"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _coerce(hint: Any, value: Any, where: str) -> Any:
    def bad() -> SpaceError:
        return SpaceError(f"{where}: expected {_type_name(hint)}, got {value!r}")

    origin = typing.get_origin(hint)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(hint):
            value = "on" if value else "off"  # YAML 1.1 reads a bare `off` (or `on`) as a boolean
        if value not in typing.get_args(hint):
            raise bad()
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in typing.get_args(hint):
                return None
            raise bad()
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        try:
            return _coerce(inner, value, where)
        except SpaceError:
            if dataclasses.is_dataclass(inner):
                raise  # keep the nested field's own message
            raise bad() from None
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single choice is a one-element list
        (item_hint,) = typing.get_args(hint)
        return [_coerce(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        _, value_hint = typing.get_args(hint)
        return {str(k): _coerce(value_hint, v, f"{where}.{k}") for k, v in value.items()}
    if hint is Range:
        return _range(value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            number = float(value)  # strings too: YAML 1.1 reads `3e-4` (no dot) as a string
        except ValueError:
            raise bad() from None
        if not math.isfinite(number):
            raise SpaceError(f"{where}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def _range(value: Any, where: str) -> Range:
    if isinstance(value, dict):
        return _build(Range, value, where)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = (_coerce(float, v, where) for v in value)
        return Range(low, high)
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        fixed = _coerce(float, value, where)
        return Range(fixed, fixed)
    raise SpaceError(f"{where}: expected a number, [low, high] or {{low, high, log}}, got {value!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    label = where or "the space file"
    if not isinstance(raw, dict):
        raise SpaceError(f"{label}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        raise SpaceError(f"{_join(where, _key_text(unknown[0]))}: unknown key{_did_you_mean(unknown[0], fields)}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpaceError(f"{_join(where, name)}: required key is missing")
    return cls(**values)


def _did_you_mean(given: Any, valid: typing.Iterable[str]) -> str:
    """' (did you mean kd_alpha?)' for a near miss of one of `valid`, else ''."""
    close = difflib.get_close_matches(given, list(valid), n=1, cutoff=0.75) if isinstance(given, str) else []
    return f" (did you mean {close[0]}?)" if close else ""


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) and key.isprintable() else repr(key)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_range(value: Range, where: str, *, low: float, high: float, open_low: bool = False) -> None:
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
    for bound in (value.low, value.high):
        if bound > high or bound < low or (open_low and bound == low):
            raise SpaceError(f"{where}: {bound:g} is outside {interval}")
    if value.low > value.high:
        raise SpaceError(f"{where}: low {value.low:g} is above high {value.high:g}")
    if value.log and value.low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0")


def _check_positive(value: float, where: str) -> None:
    if value <= 0:
        raise SpaceError(f"{where}: must be > 0, got {value:g}")


def validate(experiment: Experiment) -> Experiment:
    """Checks beyond types: value ranges, the data folder, the model and weights names. Returns the
    experiment with `data.path` made absolute."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", experiment.name):
        raise SpaceError(f"name: {experiment.name!r} must be letters, digits, '_', '.', '-' (it names a folder)")
    experiment = _checked_data(experiment)
    _check_model(experiment.model)
    _check_training(experiment)
    _check_search(experiment.search, trial_epochs=experiment.trial.epochs)
    return experiment


def _checked_data(experiment: Experiment) -> Experiment:
    data = experiment.data
    folder = Path(data.path)
    try:
        if not folder.is_dir():
            what = " (it is a file)" if folder.is_file() else ""
            raise SpaceError(
                f"data.path: folder {data.path!r} does not exist{what}; give an ImageFolder root (one sub-folder per class)"
                " or run `slimtune prepare-data animal-mnist DIR` for the embedded dataset"
            )
        classes = sum(1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))  # hidden folders are no classes
    except OSError as error:  # a name too long, a folder it may not read
        raise SpaceError(f"data.path: cannot read {data.path!r} ([Errno {error.errno}] {error.strerror}); give an ImageFolder root") from None
    if classes < 2:
        raise SpaceError(f"data.path: {data.path!r} needs at least two class sub-folders (ImageFolder layout)")
    # Absolute, so that Ray workers (which run in their own folders) and the saved config agree.
    experiment = dataclasses.replace(experiment, data=dataclasses.replace(data, path=str(folder.resolve())))
    data = experiment.data
    if not 16 <= data.image_size <= 1024:
        raise SpaceError(f"data.image_size: {data.image_size} is outside [16, 1024]")
    for name in ("val_fraction", "test_fraction"):
        if not 0 < getattr(data, name) < 1:
            raise SpaceError(f"data.{name}: must be in (0, 1), got {getattr(data, name)}")
    if data.val_fraction + data.test_fraction >= 1:
        raise SpaceError("data.test_fraction: val_fraction + test_fraction must leave images to train on (< 1)")
    if data.max_images_per_class is not None and data.max_images_per_class < 3:
        raise SpaceError("data.max_images_per_class: must be at least 3 (train, val and test need one each)")
    return experiment


def _check_model(model: ModelConfig) -> None:
    from pipelines.models import available_archs, available_weights

    archs = available_archs()
    if model.arch not in archs:
        raise SpaceError(f"model.arch: unknown torchvision model {model.arch!r}{_did_you_mean(model.arch, archs)}; valid: {', '.join(archs)}")
    weights = available_weights(model.arch)
    if model.weights is not None and model.weights not in weights:
        raise SpaceError(
            f"model.weights: {model.weights!r} is not a weights name of {model.arch};"
            f" valid: {', '.join(weights + ['null'])}"
        )


def _check_training(experiment: Experiment) -> None:
    """The teacher's and the trial's training settings, and every seed."""
    data = experiment.data
    for stage in ("teacher", "trial"):
        config: TrainConfig = getattr(experiment, stage)
        for name in ("epochs", "batch_size"):
            if getattr(config, name) < 1:
                raise SpaceError(f"{stage}.{name}: must be at least 1, got {getattr(config, name)}")
        _check_positive(config.lr, f"{stage}.lr")
        if config.weight_decay < 0:
            raise SpaceError(f"{stage}.weight_decay: must be >= 0 (AdamW's decoupled decay), got {config.weight_decay:g}")
    teacher = experiment.teacher
    if not 0 <= teacher.warmup_epochs < teacher.epochs:
        raise SpaceError(f"teacher.warmup_epochs: must be in [0, teacher.epochs - 1 = {teacher.epochs - 1}], got {teacher.warmup_epochs}")
    if not 0 <= teacher.label_smoothing < 1:
        raise SpaceError(f"teacher.label_smoothing: must be in [0, 1), got {teacher.label_smoothing:g}")
    for where, seed in (("data.seed", data.seed), ("teacher.seed", experiment.teacher.seed), ("trial.seed", experiment.trial.seed), ("search.seed", experiment.search.seed)):
        if not 0 <= seed < 2**32:  # what numpy's and Optuna's generators take
            raise SpaceError(f"{where}: must be in [0, 2**32 - 1], got {seed}")
    if experiment.trial.augment == "crop_flip" and experiment.trial.teacher_logits == "stored":
        raise SpaceError("trial.augment: crop_flip draws new views every step, so it needs trial.teacher_logits: online (stored logits exist for none and flip only)")
    if experiment.trial.lr != FinetuneConfig.lr:
        raise SpaceError("trial.lr: a trial's learning rate is searched; set search.lr instead (a number fixes it)")


def _check_search(search: SearchConfig, *, trial_epochs: int) -> None:
    from pipelines.importance import CRITERIA

    for name in ("num_trials", "max_concurrent"):
        if getattr(search, name) is not None and getattr(search, name) < 1:
            raise SpaceError(f"search.{name}: must be at least 1, got {getattr(search, name)}")
    _check_positive(search.cpus_per_trial, "search.cpus_per_trial")
    if search.gpus_per_trial < 0:
        raise SpaceError(f"search.gpus_per_trial: must be >= 0, got {search.gpus_per_trial:g}")
    if search.max_failures < 0:
        raise SpaceError(f"search.max_failures: must be >= 0 (0: a lost trial is not retried), got {search.max_failures}")
    for name in search.importance:
        if name not in CRITERIA:
            raise SpaceError(f"search.importance: unknown criterion {name!r}{_did_you_mean(name, CRITERIA.names())}; valid: {', '.join(CRITERIA.names())}")
    for name in ("importance", "schedule", "teacher"):
        if not getattr(search, name):
            raise SpaceError(f"search.{name}: give at least one choice")
    if not search.budgets.granularity:
        raise SpaceError("search.budgets.granularity: give at least one choice")
    incomparable = sorted(set(search.importance) - {"bn_gamma"})
    if "global_percentile" in search.budgets.granularity and incomparable:
        raise SpaceError(
            f"search.budgets.granularity: global_percentile puts one threshold on scores of all layers, which only"
            f" bn_gamma's are comparable across; search.importance also has {', '.join(incomparable)}"
            " (use importance: bn_gamma with it, or another granularity such as target)"
        )
    if search.gating_density is not None:
        _check_range(search.gating_density, "search.gating_density", low=0, high=1, open_low=True)
        if search.schedule != ["one_shot"]:
            raise SpaceError("search.schedule: dynamic gating (search.gating_density) needs schedule one_shot")
        if search.l2sp_alpha.high > 0:
            raise SpaceError("search.l2sp_alpha: L2-SP cannot be combined with dynamic gating (search.gating_density); set it to 0")
    if search.gating_warmup < 0:
        raise SpaceError(f"search.gating_warmup: must be 0 or more epochs, got {search.gating_warmup}")
    if search.rounds < 1:
        raise SpaceError(f"search.rounds: must be at least 1, got {search.rounds}")
    if not 0 <= search.max_drop <= 1:
        raise SpaceError(f"search.max_drop: must be in [0, 1], got {search.max_drop:g}")
    _check_range(search.budgets.theta, "search.budgets.theta", low=0, high=1)
    _check_range(search.budgets.percentile, "search.budgets.percentile", low=0, high=1)
    for name in ("bn_sparsity", "l2sp_alpha", "source_kd_weight", "feature_weight"):
        _check_range(getattr(search, name), f"search.{name}", low=0, high=100)
    _check_range(search.budgets.keep_ratio, "search.budgets.keep_ratio", low=0, high=1, open_low=True)
    _check_range(search.budgets.target_macs, "search.budgets.target_macs", low=0, high=1, open_low=True)
    for name in ("depth_tilt", "residual_tilt"):
        _check_range(getattr(search.budgets, name), f"search.budgets.{name}", low=-5, high=5)
    epochs = trial_epochs
    for i, rung in enumerate(search.rungs):
        if not 1 <= rung < epochs or (i and rung <= search.rungs[i - 1]):
            raise SpaceError(f"search.rungs[{i}]: {rung} must rise and lie in [1, trial.epochs - 1 = {epochs - 1}]")
    if search.target_grid < 0:
        raise SpaceError(f"search.target_grid: must be 0 or more trials, got {search.target_grid}")
    if search.target_grid and "target" not in search.budgets.granularity:
        raise SpaceError("search.target_grid: needs search.budgets.granularity target (the grid fixes MACs targets)")
    if search.bn_sparsity.high > 0 and epochs < 2:
        raise SpaceError("search.bn_sparsity: its sparsity epoch is one of trial.epochs, which must then be at least 2")
    if search.eta <= 1:
        raise SpaceError(f"search.eta: must be > 1 (1/eta of the trials continue at each rung), got {search.eta:g}")
    if search.epoch_budget is not None and search.epoch_budget < epochs:
        raise SpaceError(f"search.epoch_budget: {search.epoch_budget} is below one trial's epochs ({epochs}); or null for no cap")
    for key, value in search.budgets.keep.items():
        _check_range(value, f"search.budgets.keep.{key}", low=0, high=1, open_low=True)
    for i, ratio in enumerate(search.uniform_anchors):
        if not 0 < ratio <= 1:
            raise SpaceError(f"search.uniform_anchors[{i}]: {ratio:g} is outside (0, 1]")
    for i, ratio in enumerate(search.alias_budgets):
        if not 1e-6 <= ratio <= 1:
            raise SpaceError(f"search.alias_budgets[{i}]: {ratio:g} is outside [1e-06, 1] (fractions of the teacher's MACs)")
    _check_range(search.kd_alpha, "search.kd_alpha", low=0, high=1)
    _check_range(search.kd_temperature, "search.kd_temperature", low=0, high=100, open_low=True)
    _check_range(search.lr, "search.lr", low=0, high=10, open_low=True)


def parse_space(raw: Any) -> Experiment:
    return validate(_build(Experiment, raw, ""))


def load_space(path: str | Path) -> Experiment:
    path = Path(path)
    try:
        if not path.is_file():
            raise SpaceError(f"space file {str(path)!r} not found; see spaces/ for examples")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SpaceError(f"space file {str(path)!r}: cannot read it ([Errno {error.errno}] {error.strerror})") from None
    except UnicodeDecodeError as error:
        raise SpaceError(f"{path}: not UTF-8 text (byte {error.start}); save the space file as UTF-8 YAML") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())  # one line, whatever PyYAML wrote
        raise SpaceError(f"{path}: not valid YAML{line}: {problem}") from None
    return parse_space(raw)
