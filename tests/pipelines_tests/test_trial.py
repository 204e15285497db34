"""`run_trial` in process, on a tiny real teacher: what a trial reports, and what it reproduces."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipelines.config import DataConfig, FinetuneConfig, ModelConfig, TrialParams
from pipelines.data import prepare_animal_mnist
from pipelines.teacher import train_teacher
from pipelines.trial import run_trial

FINETUNE = FinetuneConfig(epochs=2, bn_recalibration_batches=2)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("trial")
    data = DataConfig(path=str(prepare_animal_mnist(work / "animal_mnist")), image_size=32, max_images_per_class=12)
    train_teacher(data=data, model=ModelConfig(), finetune=FinetuneConfig(epochs=1), output_dir=work / "teacher")
    return {"data": data, "dir": work / "teacher", "work": work}


def _run(teacher: dict, params: TrialParams, name: str, **kwargs) -> tuple[dict, list[dict]]:
    epochs: list[dict] = []
    metrics = run_trial(
        params, data=teacher["data"], model=ModelConfig(), finetune=kwargs.pop("finetune", FINETUNE), teacher_dir=teacher["dir"],
        output_dir=teacher["work"] / name, on_epoch_end=epochs.append, **kwargs,
    )  # fmt: skip
    return metrics, epochs


TARGET = TrialParams(budget={"target_macs": 0.3, "depth_tilt": 0.0, "residual_tilt": 0.0}, parametrisation="target", criterion="l1")


def test_the_same_trial_twice_gives_the_same_metrics_bit_for_bit(teacher: dict) -> None:
    first, _ = _run(teacher, TARGET, "a")
    second, _ = _run(teacher, TARGET, "b")
    assert first == second


def test_a_loss_choice_does_not_shift_the_training_random_stream(teacher: dict) -> None:
    """A source-KD head of weight 0 is built (drawing random numbers) but changes no gradient."""
    plain, _ = _run(teacher, replace(TARGET, losses={}), "plain")
    with_head, _ = _run(teacher, replace(TARGET, losses={"source_kd": {"weight": 0.0, "temperature": 4.0}}), "head")
    for name in ("val_accuracy", "test_accuracy", "macs"):
        assert with_head[name] == plain[name], name


def test_the_sparsity_epoch_is_one_of_the_trials_epochs(teacher: dict) -> None:
    metrics, epochs = _run(teacher, replace(TARGET, bn_sparsity=1e-4), "sparse")
    assert metrics["train_epochs_used"] == FINETUNE.epochs
    assert [e["epoch"] for e in epochs] == [1, 2] and "loss_bn_l1" in epochs[0] and "loss_bn_l1" not in epochs[1]
    assert all("macs" in e and "macs_ratio" in e for e in epochs)


def test_warm_start_prunes_the_earlier_model_and_caps_channels_by_it(teacher: dict) -> None:
    parent, _ = _run(teacher, replace(TARGET, budget={**TARGET.budget, "target_macs": 0.5}), "parent")
    child, _ = _run(teacher, replace(TARGET, budget={**TARGET.budget, "depth_tilt": 2.0}), "child", start_from=teacher["work"] / "parent")
    assert child["macs_ratio"] == pytest.approx(0.3, rel=0.02) and child["macs_ratio"] < parent["macs_ratio"]
    assert child["keep_max"] <= parent["keep_max"]
    with pytest.raises(ValueError, match="start_from needs"):
        _run(teacher, replace(TARGET, losses={"l2sp": {"alpha": 0.1, "beta": 0.01}}), "refused", start_from=teacher["work"] / "parent")


def test_iterative_schedules_decide_on_a_selection_split_held_out_of_train_not_on_val(teacher: dict) -> None:
    from pipelines.data import load_data
    from pipelines.export import load_model
    from pipelines.train import evaluate
    from pipelines._fit import selection_indices, subset

    params = replace(TARGET, schedule="iterative", rounds=2, max_drop=1.0)  # max_drop 1: never revert, keep the last round
    metrics, _ = _run(teacher, params, "iterative")
    splits = load_data(teacher["data"])
    _, held_out = selection_indices(splits.train)
    model, _ = load_model(teacher["work"] / "iterative")
    assert len(held_out) == len(splits.classes)  # 1 in 10 of ~8 train images per class: the last one
    assert metrics["round2_accuracy"] == pytest.approx(evaluate(model, subset(splits.train, held_out)))
    assert metrics["val_accuracy"] == pytest.approx(evaluate(model, splits.val))


class _Died(Exception):
    pass


_SOURCE_KD = {"source_kd": {"weight": 0.5, "temperature": 4.0}}
_RESUMABLE = [
    # The sparsity epoch is epoch 1: the checkpoint must count it.
    pytest.param(replace(TARGET, bn_sparsity=1e-4), 2, id="one-shot-mid-training"),
    pytest.param(replace(TARGET, bn_sparsity=1e-4), 3, id="one-shot-after-the-last-epoch"),
    # trial.augment flip: the flips come from each epoch's seeded batch stream, the KD from the
    # mirror logits of the train images kept after the selection split.
    pytest.param(replace(TARGET, schedule="iterative", rounds=2, max_drop=0.0), 2, {"augment": "flip"}, id="iterative-flip-mid-round-2"),
    # An online teacher is rebuilt from its folder, not checkpointed; crops come from the batch stream.
    pytest.param(TARGET, 2, {"augment": "crop_flip", "teacher_logits": "online"}, id="one-shot-online-crop-flip-mid-training"),
    # Round 1 is epoch 1, round 2 epochs 2-3: dies mid-round 2, with the round-1 model kept for a
    # revert and the source-KD head and AFD attention trained since epoch 1.
    pytest.param(
        replace(TARGET, schedule="iterative", rounds=2, max_drop=0.0, losses={**_SOURCE_KD, "afd": {"weight": 0.1}}),
        2,
        id="iterative-source-kd-afd-mid-round-2",
    ),
    # Dies at the end of round 1, before the schedule decided on it; trajectory snapshots are still needed.
    pytest.param(
        replace(TARGET, schedule="iterative", rounds=2, criterion="trajectory", losses={"l2sp": {"alpha": 0.1, "beta": 0.01}, "delta": {"weight": 0.1}}),
        1,
        {"batch_size": 8},  # DELTA measures its channel weights on one batch, one forward per channel: a small one
        id="iterative-trajectory-l2sp-delta-at-a-round-end",
    ),
    pytest.param(replace(TARGET, densities={"stride_8": 0.5, "stride_16": 0.5}), 2, id="gated-mid-training"),
]


@pytest.mark.parametrize(("params", "died_after", "recipe"), [p if len(p.values) == 3 else pytest.param(*p.values, {}, id=p.id) for p in _RESUMABLE])
def test_a_trial_resumed_from_its_checkpoint_ends_as_if_never_interrupted(
    teacher: dict, params: TrialParams, died_after: int, recipe: dict
) -> None:
    """The process 'dies' right after epoch `died_after` was checkpointed; the resumed trial runs
    only the later epochs and ends with the same metrics and weights, bit for bit."""
    from safetensors.torch import load_file

    finetune = replace(FINETUNE, epochs=3, **recipe)
    work = teacher["work"] / f"resume-{abs(hash((str(params), died_after, str(recipe))))}"
    uninterrupted, whole_epochs = _run(teacher, params, f"{work.name}/whole", finetune=finetune)
    checkpoint = work / "checkpoint"

    def die(metrics: dict) -> None:
        if metrics["epoch"] == died_after:
            raise _Died

    with pytest.raises(_Died):
        run_trial(
            params, data=teacher["data"], model=ModelConfig(), finetune=finetune, teacher_dir=teacher["dir"],
            output_dir=work / "died", on_epoch_end=die, checkpoint_dir=checkpoint,
        )  # fmt: skip
    resumed, epochs = _run(teacher, params, f"{work.name}/resumed", finetune=finetune, resume_from=checkpoint)
    assert [e["epoch"] for e in epochs] == list(range(died_after + 1, 4))
    assert epochs == whole_epochs[died_after:]
    assert resumed == uninterrupted
    whole, again = load_file(work / "whole" / "model.safetensors"), load_file(work / "resumed" / "model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


def _teacher_copy(teacher: dict, name: str, **logits: torch.Tensor | None) -> dict:
    """The teacher folder copied, with its stored train logits replaced (a None value: left out)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pipelines.teacher import TEACHER_LOGITS_FILE

    copy = teacher["work"] / name
    shutil.copytree(teacher["dir"], copy)
    stored = {**load_file(copy / TEACHER_LOGITS_FILE), **logits}
    save_file({k: v for k, v in stored.items() if v is not None}, copy / TEACHER_LOGITS_FILE)
    return {**teacher, "dir": copy}


def test_an_older_teacher_without_mirror_logits_runs_augment_none_and_refuses_flip(teacher: dict) -> None:
    older = _teacher_copy(teacher, "teacher-without-mirror-logits", mirror_logits=None)
    plain, _ = _run(teacher, TARGET, "plain-none")
    from_older, _ = _run(older, TARGET, "older-none")
    assert from_older == plain
    with pytest.raises(ValueError, match=r"trial\.augment: flip needs the teacher's logits of the mirrored train images.*set trial\.augment: none"):
        _run(older, TARGET, "older-flip", finetune=replace(FINETUNE, augment="flip"))


def test_a_flip_trial_distils_from_the_stored_mirror_logits(teacher: dict) -> None:
    """Mirror logits rolled to other classes train another student; augment none never reads them."""
    from safetensors.torch import load_file

    from pipelines.teacher import TEACHER_LOGITS_FILE

    mirror = load_file(teacher["dir"] / TEACHER_LOGITS_FILE)["mirror_logits"]
    wrong = _teacher_copy(teacher, "teacher-with-wrong-mirror-logits", mirror_logits=mirror.roll(1, dims=1).contiguous())
    flip = replace(FINETUNE, augment="flip")
    _run(teacher, TARGET, "flip-right", finetune=flip)
    _run(wrong, TARGET, "flip-wrong", finetune=flip)
    right, other = (load_file(teacher["work"] / name / "model.safetensors") for name in ("flip-right", "flip-wrong"))
    assert not all(torch.equal(right[k], other[k]) for k in right)


def test_an_online_teacher_trains_the_stored_flip_trial_again(teacher: dict) -> None:
    """The same flips, distilled from the teacher run on each batch instead of its stored logits:
    the same losses, up to float rounding between batch sizes (which AdamW's steps carry on: 0.2%
    after two epochs)."""
    flip = replace(FINETUNE, augment="flip")
    stored, stored_epochs = _run(teacher, TARGET, "flip-stored", finetune=flip)
    online, online_epochs = _run(teacher, TARGET, "flip-online", finetune=replace(flip, teacher_logits="online"))
    for a, b in zip(stored_epochs, online_epochs):
        assert b["loss_kd"] == pytest.approx(a["loss_kd"], rel=1e-2) and b["loss_total"] == pytest.approx(a["loss_total"], rel=1e-2)
    assert online["macs"] == stored["macs"]
    # A stored teacher has logits of two views only; crops need the teacher online.
    with pytest.raises(ValueError, match=r"trial\.augment: crop_flip .* needs trial\.teacher_logits: online"):
        _run(teacher, TARGET, "crop-stored", finetune=replace(FINETUNE, augment="crop_flip"))


def test_a_source_kd_head_is_trained_across_rounds_not_rebuilt(teacher: dict) -> None:
    """One head for the whole trial: after round 2's cut it still holds what round 1 taught it."""
    from pipelines.distill import ExtraHead

    heads: list[ExtraHead] = []
    original = ExtraHead.remove
    ExtraHead.remove = lambda self: (heads.append(self), original(self))[1]  # type: ignore[method-assign]
    try:
        _run(teacher, replace(TARGET, schedule="iterative", rounds=2, max_drop=1.0, losses=_SOURCE_KD), "two-rounds")
    finally:
        ExtraHead.remove = original  # type: ignore[method-assign]
    assert len(heads) == 2 and heads[0] is heads[1]
    assert heads[1].inputs is not None and len(heads[1].inputs) < heads[1].fc.in_features  # reads the kept inputs


def _stages_and_groups(teacher: dict) -> tuple[list[str], list[str]]:
    from pipelines.export import load_model
    from pipelines.prune import prunable_groups

    groups = prunable_groups(load_model(teacher["dir"])[0], image_size=teacher["data"].image_size)
    return sorted({g.stage for g in groups}), [g.name for g in groups]


# With _RESUMABLE, every criterion, parametrisation, schedule and loss runs in one real trial.
_EVERY_CHOICE = [
    replace(TARGET, criterion="bn_gamma"),
    replace(TARGET, criterion="activation", class_weighted=True),
    replace(TARGET, criterion="taylor", min_channels=16),
    replace(TARGET, parametrisation="group", budget={"keep.*": 0.5}),
    replace(TARGET, parametrisation="stage", budget={"keep.*": 0.5}),
    replace(TARGET, parametrisation="theta", budget={"theta": 0.3}),
    replace(TARGET, parametrisation="global_percentile", criterion="bn_gamma", budget={"percentile": 0.5}),
    replace(TARGET, schedule="priority", rounds=2),
]


def test_every_registered_choice_is_run_by_a_trial_here() -> None:
    from pipelines.budgets import BUDGETS
    from pipelines.distill import LOSSES
    from pipelines.importance import CRITERIA
    from pipelines.schedules import SCHEDULES

    params = _EVERY_CHOICE + [p.values[0] for p in _RESUMABLE]
    assert {p.criterion for p in params} == set(CRITERIA.names())
    assert {p.parametrisation for p in params} == set(BUDGETS.names())
    assert {p.schedule for p in params} == set(SCHEDULES.names())
    assert set().union(*(p.losses for p in params)) == set(LOSSES.names())


@pytest.mark.parametrize("params", _EVERY_CHOICE, ids=lambda p: f"{p.criterion}-{p.parametrisation}-{p.schedule}")
def test_a_trial_with_each_choice_prunes_trains_and_reports(teacher: dict, params: TrialParams) -> None:
    stages, groups = _stages_and_groups(teacher)
    if "keep.*" in params.budget:
        names = groups if params.parametrisation == "group" else stages
        params = replace(params, budget=dict.fromkeys(names, params.budget["keep.*"]))
    metrics, epochs = _run(teacher, params, f"choice-{params.criterion}-{params.parametrisation}-{params.schedule}")
    assert [e["epoch"] for e in epochs] == [1, 2] and metrics["train_epochs_used"] == 2
    assert 0 < metrics["macs_ratio"] < 1 and metrics["keep_min"] < 1
    assert all(math.isfinite(v) for v in metrics.values())
