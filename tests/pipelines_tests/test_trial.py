"""`run_trial` in process, on a tiny real teacher: what a trial reports, and what it reproduces."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipelines.config import DataConfig, FinetuneConfig, ModelConfig, TrialParams
from pipelines.data import prepare_animal_mnist
from pipelines.trial import run_trial, train_teacher

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
    from pipelines.trial import _selection_indices, _subset

    params = replace(TARGET, schedule="iterative", rounds=2, max_drop=1.0)  # max_drop 1: never revert, keep the last round
    metrics, _ = _run(teacher, params, "iterative")
    splits = load_data(teacher["data"])
    _, held_out = _selection_indices(splits.train)
    model, _ = load_model(teacher["work"] / "iterative")
    assert len(held_out) == len(splits.classes)  # 1 in 10 of ~8 train images per class: the last one
    assert metrics["round2_accuracy"] == pytest.approx(evaluate(model, _subset(splits.train, held_out)))
    assert metrics["val_accuracy"] == pytest.approx(evaluate(model, splits.val))


class _Died(Exception):
    pass


@pytest.mark.parametrize("died_after", [2, 3], ids=["mid-training", "after-the-last-epoch"])
def test_a_trial_resumed_from_its_checkpoint_ends_as_if_never_interrupted(teacher: dict, died_after: int) -> None:
    """The process 'dies' right after epoch `died_after` was checkpointed; the resumed trial runs
    only the later epochs and ends with the same metrics and weights, bit for bit."""
    from safetensors.torch import load_file

    finetune = replace(FINETUNE, epochs=3)
    params = replace(TARGET, bn_sparsity=1e-4)  # the sparsity epoch is epoch 1: the checkpoint must count it
    uninterrupted, _ = _run(teacher, params, "whole", finetune=finetune)
    checkpoint = teacher["work"] / f"checkpoint-{died_after}"

    def die(metrics: dict) -> None:
        if metrics["epoch"] == died_after:
            raise _Died

    with pytest.raises(_Died):
        run_trial(
            params, data=teacher["data"], model=ModelConfig(), finetune=finetune, teacher_dir=teacher["dir"],
            output_dir=teacher["work"] / "died", on_epoch_end=die, checkpoint_dir=checkpoint,
        )  # fmt: skip
    resumed, epochs = _run(teacher, params, f"resumed-{died_after}", finetune=finetune, resume_from=checkpoint)
    assert [e["epoch"] for e in epochs] == list(range(died_after + 1, 4))
    assert resumed == uninterrupted
    whole, again = load_file(teacher["work"] / "whole" / "model.safetensors"), load_file(teacher["work"] / f"resumed-{died_after}" / "model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


def test_only_trials_whose_state_a_checkpoint_holds_resume(teacher: dict) -> None:
    from pipelines.trial import can_resume

    assert can_resume(TARGET) and not can_resume(replace(TARGET, schedule="iterative"))
    assert not can_resume(replace(TARGET, losses={"l2sp": {"alpha": 0.1, "beta": 0.01}}))
    with pytest.raises(ValueError, match="resume_from needs"):
        _run(teacher, replace(TARGET, schedule="iterative"), "refused", resume_from=teacher["work"] / "checkpoint-2")
