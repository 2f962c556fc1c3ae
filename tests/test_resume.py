"""Resume: a run interrupted at a checkpoint and resumed ends bit-identical to an uninterrupted run (CPU).

The checkpoint carries the model (safetensors), optimizer/scheduler/RNG states (the Trainer's), and the
revision model: its weights, step counter and generator state (revision.safetensors).
"""

import os

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import make_tiny_model, stop_after_save
from transformers import TrainerCallback

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import image_transform


@pytest.fixture(scope="module")
def small_train():
    from cure_hf.data import load_digits_dataset

    train = load_digits_dataset()["train"].select(range(24))
    # 16x16 pixels keep the test fast. No random augmentation: accelerate prefetches one batch ahead, so
    # augmentation drawing from the global RNG in the main process cannot be replayed exactly (see docs/hub.md);
    # the attacks' random starts and the revision draws do use RNGs, and those must be restored.
    train.set_transform(image_transform(16, train=True))
    return train


def _args(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        adv_method="cure",
        max_steps=3,
        per_device_train_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=3,
        revision_rate=0.5,
        dataloader_num_workers=0,
        disable_tqdm=True,
        eval_strategy="no",
    )
    kwargs.update(overrides)
    return CURETrainingArguments(**kwargs)


def _state(trainer):
    net = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _assert_bit_identical(a, b, what):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ after resume, e.g. {different[:3]}"


def test_interrupted_then_resumed_is_bit_identical(tmp_path, small_train):
    full = CURETrainer(make_tiny_model("test_resnet", seed=1), _args(tmp_path / "full"), train_dataset=small_train)
    full.train()

    interrupted = CURETrainer(
        make_tiny_model("test_resnet", seed=1),
        _args(tmp_path / "cut"),
        train_dataset=small_train,
        callbacks=[stop_after_save(2)],
    )
    interrupted.train()
    assert interrupted.state.global_step == 2
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert (checkpoint / "revision.safetensors").is_file() and (checkpoint / "model.safetensors").is_file()
    with safetensors.safe_open(str(checkpoint / "revision.safetensors"), framework="pt") as f:
        assert int(f.metadata()["step"]) == 2

    # a fresh process: different initial weights, the checkpoint must overwrite them all
    resumed = CURETrainer(make_tiny_model("test_resnet", seed=99), _args(tmp_path / "cut"), train_dataset=small_train)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == full.state.global_step == 3
    _assert_bit_identical(_state(full), _state(resumed), "model")
    _assert_bit_identical(full.revision.module.state_dict(), resumed.revision.module.state_dict(), "revision model")
    assert resumed.revision.step == full.revision.step == 3
    assert torch.equal(resumed.revision.generator.get_state(), full.revision.generator.get_state())
    # the losses logged after the resume point are the same numbers
    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e and e["step"] > 2]  # noqa: E731
    assert losses(full) == losses(resumed)


def test_resume_without_revision_state_is_refused(tmp_path, small_train):
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path / "run", max_steps=1, save_steps=1), train_dataset=small_train
    )
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    os.remove(checkpoint / "revision.safetensors")
    fresh = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path / "run", max_steps=2), train_dataset=small_train)
    with pytest.raises(ValueError, match="revision.safetensors"):
        fresh.train(resume_from_checkpoint=str(checkpoint))


def test_resume_from_pickled_checkpoint_is_refused(tmp_path, small_train):
    checkpoint = tmp_path / "checkpoint-7"
    checkpoint.mkdir()
    model = make_tiny_model("test_resnet")
    torch.save(model.model.state_dict(), checkpoint / "pytorch_model.bin")
    (checkpoint / "config.json").write_text("{}")
    trainer = CURETrainer(model, _args(tmp_path / "run"), train_dataset=small_train)
    with pytest.raises(ValueError, match=r"no safetensors weights.*pytorch_model\.bin.*safetensors only"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


class _FirstStepIsBest(TrainerCallback):
    """Makes step 1 the best evaluation, so the best checkpoint differs from the final weights."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_robust_accuracy"] = 1.0 if state.global_step == 1 else 0.0


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, small_train):
    """The Trainer's own best-model loader would silently load nothing (our checkpoint keys are timm's)."""
    eval_set = small_train.select(range(8))
    args = _args(
        tmp_path / "best",
        max_steps=2,
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="robust_accuracy",
        eval_pgd_steps=1,
        eval_max_examples=8,
        per_device_eval_batch_size=8,
    )
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        args,
        train_dataset=small_train,
        eval_dataset=eval_set,
        callbacks=[_FirstStepIsBest()],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "best" / "checkpoint-1")
    current = trainer.accelerator.unwrap_model(trainer.model).model.state_dict()
    best = safetensors.torch.load_file(str(tmp_path / "best" / "checkpoint-1" / "model.safetensors"))
    last = safetensors.torch.load_file(str(tmp_path / "best" / "checkpoint-2" / "model.safetensors"))
    _assert_bit_identical(best, current, "best model")
    assert any(not torch.equal(last[k], current[k]) for k in last)
