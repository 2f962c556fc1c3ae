"""CURETrainer keeps the Trainer's contract: its evaluation, model selection, optimizer settings and resume all
work as the Trainer documents them, with the adversarial parts added, never replacing them."""

import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import TrainerCallback

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import image_transform, load_digits_dataset
from tests.conftest import make_tiny_model, stop_after_save


@pytest.fixture(scope="module")
def small():
    """24 training and 16 test digits at 16x16 pixels, no augmentation."""
    data = load_digits_dataset()
    train, test = data["train"].select(range(24)), data["test"].select(range(16))
    train.set_transform(image_transform(16, train=True))
    test.set_transform(image_transform(16, train=False))
    return train, test


def _args(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path),
        adv_method="trades",
        max_steps=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        eval_pgd_steps=2,
        report_to="none",
        use_cpu=True,
        seed=3,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
    )
    fields.update(overrides)
    return CURETrainingArguments(**fields)


class _PredictionSteps(TrainerCallback):
    def __init__(self):
        self.calls = 0

    def on_prediction_step(self, args, state, control, **kwargs):
        self.calls += 1


def test_evaluate_is_the_trainers_evaluation_plus_robust_metrics(tmp_path, small):
    train, test = small
    seen = {}

    def compute_metrics(prediction):
        seen["logits"], seen["labels"] = prediction.predictions, prediction.label_ids
        return {"top1": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    steps = _PredictionSteps()
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path),
        train_dataset=train,
        eval_dataset=test,
        compute_metrics=compute_metrics,
        callbacks=[steps],
    )
    metrics = trainer.evaluate()
    # the Trainer's own parts
    assert {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_top1"} <= set(
        metrics
    )
    assert steps.calls == 2, "one prediction step per evaluation batch (16 examples, 8 per batch)"
    # compute_metrics saw every example once
    assert seen["logits"].shape == (16, 10) and sorted(seen["labels"].tolist()) == sorted(
        test[i]["labels"] for i in range(16)
    )
    # the robust parts, on the same examples: clean accuracy from the attacks' pass equals numpy's from the logits
    assert {"eval_accuracy", "eval_pgd2_accuracy", "eval_robust_accuracy", "eval_n_examples"} <= set(metrics)
    assert metrics["eval_accuracy"] == pytest.approx(np.mean(seen["logits"].argmax(-1) == seen["labels"]))
    assert metrics["eval_top1"] == pytest.approx(metrics["eval_accuracy"])
    # eval_loss is the mean cross-entropy of those logits, computed independently
    logits = torch.tensor(seen["logits"], dtype=torch.float64)
    labels = torch.tensor(seen["labels"])
    expected = -(logits.log_softmax(-1).gather(1, labels[:, None])).mean().item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)


def test_predict_does_not_attack(tmp_path, small):
    train, test = small
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path), train_dataset=train)
    output = trainer.predict(test)
    assert output.predictions.shape == (16, 10)
    assert not any("pgd" in k or "robust" in k for k in output.metrics)


class _FirstStepIsBest(TrainerCallback):
    """Step 1's evaluation is the best, so the selected checkpoint differs from the last weights."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_robust_accuracy"] = 1.0 if state.global_step == 1 else 0.0


def test_load_best_model_at_end_without_a_metric_selects_on_robust_accuracy(tmp_path, small):
    train, test = small
    args = _args(
        tmp_path, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True
    )
    assert args.metric_for_best_model == "robust_accuracy" and args.greater_is_better is True
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), args, train_dataset=train, eval_dataset=test, callbacks=[_FirstStepIsBest()]
    )
    trainer.train()  # used to crash at the first save: KeyError 'eval_loss'
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    best = safetensors.torch.load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    current = trainer.accelerator.unwrap_model(trainer.model).model.state_dict()
    assert all(torch.equal(best[k], current[k]) for k in best)
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


def test_sgd_defaults_come_through_the_trainers_optimizer_factory(tmp_path, small):
    train, _ = small
    model = make_tiny_model("test_resnet")
    trainer = CURETrainer(model, _args(tmp_path, optim_args="nesterov=True"), train_dataset=train)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"] is True
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters()}, "weight decay on every parameter (the released code)"

    model = make_tiny_model("test_resnet")
    trainer = CURETrainer(
        model, _args(tmp_path, optim_args="momentum=0.5", weight_decay_all_parameters=False), train_dataset=train
    )
    optimizer = trainer.create_optimizer()
    assert optimizer.defaults["momentum"] == 0.5
    no_decay = {
        n
        for n, p in model.named_parameters()
        if any(g["weight_decay"] == 0.0 and any(q is p for q in g["params"]) for g in optimizer.param_groups)
    }
    assert no_decay and all("bias" in n or "bn" in n or "norm" in n for n in no_decay), "the Trainer's grouping"

    model = make_tiny_model("test_resnet")
    trainer = CURETrainer(model, _args(tmp_path, optim="adamw_torch", learning_rate=1e-3), train_dataset=train)
    assert isinstance(trainer.create_optimizer(), torch.optim.AdamW)


@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(optim="adamw_torch", sgd_momentum=0.8), "only applies to optim='sgd'"),
        (dict(optim_args="momentum=0.5", sgd_momentum=0.8), "disagree"),
        (dict(optim_args="weight_decay=0.1"), "set --weight_decay instead"),
        (dict(optim_args="nesterov"), "key=value"),
    ],
)
def test_optimizer_settings_that_would_be_dropped_are_refused(tmp_path, fields, needle):
    with pytest.raises(ValueError, match=needle):
        _args(tmp_path, **fields)


def test_a_label_keyed_dataset_trains(tmp_path, small):
    """The transformers image-classification example's transform yields 'label', not 'labels'."""
    train, _ = small
    pipeline = image_transform(16, train=True)
    relabelled = train.with_transform(
        lambda batch: {"pixel_values": pipeline(batch)["pixel_values"], "label": batch["label"]}
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path, max_steps=1), train_dataset=relabelled)
    trainer.train()
    assert trainer.state.global_step == 1


def test_resume_of_the_efficient_variant_keeps_the_revision_rate_schedule(tmp_path, small):
    """A decaying revision rate counts from the switch to the method; a resume must not restart the count."""
    train, _ = small
    fields = dict(
        adv_method="cure",
        max_steps=-1,
        num_train_epochs=3,
        natural_warmup_epochs=1,
        revision_rate_schedule="linear",
        revision_rate=0.9,
        save_strategy="steps",
        save_steps=5,
    )
    full = CURETrainer(make_tiny_model("test_resnet", seed=1), _args(tmp_path / "full", **fields), train_dataset=train)
    full.train()
    assert full._method_start_step == 3  # 3 steps per epoch, one warm-up epoch

    cut = CURETrainer(
        make_tiny_model("test_resnet", seed=1),
        _args(tmp_path / "cut", **fields),
        train_dataset=train,
        callbacks=[stop_after_save(5)],
    )
    cut.train()
    resumed = CURETrainer(
        make_tiny_model("test_resnet", seed=7), _args(tmp_path / "cut", **fields), train_dataset=train
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-5"))
    assert resumed._method_start_step == 3
    assert resumed.state.global_step == full.state.global_step == 9
    assert resumed.revision.step == full.revision.step
    full_state = full.accelerator.unwrap_model(full.model).state_dict()
    resumed_state = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
    assert all(
        torch.equal(a, b)
        for a, b in zip(full.revision.module.state_dict().values(), resumed.revision.module.state_dict().values())
    )
