"""Weight averaging (`weight_averaging`): the average equals the EMA formula computed here in numpy (decay warm-up,
BatchNorm buffers included); evaluation and saving use it and put the working weights back exactly; checkpoints
resume bit-identically; best-model loading and the efficient variant's switch restart it."""

import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import make_tiny_model, stop_after_save
from transformers import TrainerCallback

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import image_transform


@pytest.fixture(scope="module")
def small_train():
    from cure_hf.data import load_digits_dataset

    train = load_digits_dataset()["train"].select(range(32))
    train.set_transform(image_transform(16, train=False))  # no augmentation: resume must replay the batches
    return train


def _args(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        adv_method="pgd",
        max_steps=10,
        per_device_train_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        weight_averaging=0.5,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=3,
        dataloader_num_workers=0,
        disable_tqdm=True,
        eval_strategy="no",
        eval_attacks="clean,pgd2",
        eval_max_examples=8,
        per_device_eval_batch_size=8,
    )
    kwargs.update(overrides)
    return CURETrainingArguments(**kwargs)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _working(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


class RecordWeights(TrainerCallback):
    """The working model's state before training and after every optimizer step (its hooks have run by then)."""

    def __init__(self):
        self.trainer, self.states = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.states.append(_state(_working(self.trainer)))

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(_state(_working(self.trainer)))


def test_average_is_the_ema_formula_with_decay_warmup_and_batchnorm_buffers(tmp_path, small_train, one_thread):
    decay, steps = 0.5, 10  # (1 + t) / (10 + t) < 0.5 for t < 8: the warm-up and the cap both act
    record = RecordWeights()
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path, weight_averaging=decay, max_steps=steps),
        train_dataset=small_train,
        callbacks=[record],
    )
    record.trainer = trainer
    trainer.train()
    assert len(record.states) == steps + 1 and trainer.weight_average.step == steps

    expected = {k: v.double().numpy() for k, v in record.states[0].items()}
    for t in range(1, steps + 1):
        d = min(decay, (1 + t) / (10 + t))
        for k, w in record.states[t].items():
            if w.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * w.double().numpy()
            else:  # num_batches_tracked: the model's own count
                expected[k] = w.numpy()
    averaged = trainer.weight_average.module.state_dict()
    assert averaged.keys() == expected.keys()
    for k, v in averaged.items():
        np.testing.assert_allclose(v.double().numpy(), expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the BatchNorm statistics are averaged (not copied from the model), the weights too
    final = record.states[-1]
    bn_mean = next(k for k in final if k.endswith("running_mean"))
    assert not torch.allclose(averaged[bn_mean], final[bn_mean])
    assert torch.equal(
        averaged[bn_mean.replace("running_mean", "num_batches_tracked")],
        final[bn_mean.replace("running_mean", "num_batches_tracked")],
    )
    assert not torch.allclose(averaged["model.fc.weight"], final["model.fc.weight"])
    # the normalisation buffers never change: the average keeps them bit for bit
    assert torch.equal(averaged["mean"], final["mean"]) and torch.equal(averaged["std"], final["std"])


def _accuracy(model, dataset, n):
    x = torch.stack([dataset[i]["pixel_values"] for i in range(n)])
    y = torch.tensor([int(dataset[i]["labels"]) for i in range(n)])
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_evaluate_save_and_card_use_the_average_and_restore_the_working_weights(tmp_path, small_train, one_thread):
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path / "run", max_steps=6),
        train_dataset=small_train,
        eval_dataset=small_train,
    )
    trainer.train()
    working = _working(trainer)
    before = _state(working)
    average = _state(trainer.weight_average.module)
    assert any(not torch.equal(before[k], average[k]) for k in before)

    # Every forward during evaluate() (clean pass and PGD) sees the averaged weights.
    seen = []
    handle = working.register_forward_pre_hook(
        lambda module, inputs: seen.append(torch.equal(module.model.fc.weight, average["model.fc.weight"]))
    )
    metrics = trainer.evaluate()
    handle.remove()
    assert len(seen) > 2 and all(seen)
    reference = make_tiny_model("test_resnet")
    reference.load_state_dict(average)
    assert metrics["eval_accuracy"] == pytest.approx(_accuracy(reference, small_train, 8))
    after = _state(working)
    assert all(torch.equal(before[k], after[k]) for k in before), "evaluate() did not restore the working weights"

    trainer.save_model(str(tmp_path / "saved"))
    saved = safetensors.torch.load_file(str(tmp_path / "saved" / "model.safetensors"))
    timm_average = {k.removeprefix("model."): v for k, v in average.items() if k.startswith("model.")}
    assert saved.keys() == timm_average.keys()
    assert all(torch.equal(saved[k], timm_average[k]) for k in saved)
    assert all(torch.equal(before[k], v) for k, v in _state(working).items())
    # the card: the decay as a field and as a hyperparameter
    info = trainer.model_card_info()
    assert info["weight_averaging"]["decay"] == 0.5 and info["hyperparameters"]["weight_averaging"] == 0.5
    with open(tmp_path / "saved" / "README.md", encoding="utf-8") as f:
        assert "weight_averaging" in f.read()


def test_push_to_hub_uploads_the_average(tmp_path, small_train, monkeypatch, one_thread):
    import cure_hf.base_trainer

    uploaded = {}

    def fake_push(folder, repo_id, files, **kwargs):  # only the network call is replaced
        uploaded.update(safetensors.torch.load_file(os.path.join(folder, "model.safetensors")))
        uploaded["files"] = files

    monkeypatch.setattr(cure_hf.base_trainer, "push_folder", fake_push)
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path, max_steps=3), train_dataset=small_train)
    trainer.train()
    trainer.hub_model_id = "me/cure-wa"  # an existing repo: no call to create one
    before = _state(_working(trainer))
    trainer.push_to_hub()
    assert "model.safetensors" in uploaded.pop("files")
    average = trainer.weight_average.module.state_dict()
    assert uploaded and all(torch.equal(v, average[f"model.{k}"]) for k, v in uploaded.items())
    assert any(not torch.equal(v, before[f"model.{k}"]) for k, v in uploaded.items())
    assert all(torch.equal(before[k], v) for k, v in _state(_working(trainer)).items())


def test_without_weight_averaging_nothing_is_swapped(tmp_path, small_train, one_thread):
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, max_steps=2, weight_averaging=None), train_dataset=small_train
    )
    trainer.train()
    assert trainer.weight_average is None
    with trainer.averaged_weights() as model:
        assert model is trainer.model


def test_interrupted_then_resumed_is_bit_identical_with_weight_averaging(tmp_path, small_train, one_thread):
    overrides = dict(
        adv_method="cure",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        revision_rate=0.5,
        awp_gamma=True,
        awp_warmup_epochs=0,
    )
    full = CURETrainer(
        make_tiny_model("test_resnet", seed=1), _args(tmp_path / "full", **overrides), train_dataset=small_train
    )
    full.train()
    cut = CURETrainer(
        make_tiny_model("test_resnet", seed=1),
        _args(tmp_path / "cut", **overrides),
        train_dataset=small_train,
        callbacks=[stop_after_save(2)],
    )
    cut.train()
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    # the checkpoint's model file is the average (what a push or best-model loading takes)
    saved = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    average = cut.weight_average.module.state_dict()
    assert all(torch.equal(v, average[f"model.{k}"]) for k, v in saved.items())
    assert (checkpoint / "weight_average.safetensors").is_file()

    resumed = CURETrainer(
        make_tiny_model("test_resnet", seed=99), _args(tmp_path / "cut", **overrides), train_dataset=small_train
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, a, b in [
        ("working model", _working(full), _working(resumed)),
        ("average", full.weight_average.module, resumed.weight_average.module),
        ("revision", full.revision.module, resumed.revision.module),
    ]:
        a, b = a.state_dict(), b.state_dict()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {different[:3]} differ after resume"
    assert resumed.weight_average.step == full.weight_average.step == 4

    off = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path / "cut", **{**overrides, "weight_averaging": None}),
        train_dataset=small_train,
    )
    with pytest.raises(ValueError, match="weight_averaging"):
        off.train(resume_from_checkpoint=str(checkpoint))


def test_best_model_loading_keeps_the_best_checkpoints_average(tmp_path, small_train, one_thread):
    args = _args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=False,
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=small_train, eval_dataset=small_train)
    trainer.train()
    best = safetensors.torch.load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    average = trainer.weight_average.module.state_dict()
    assert all(torch.equal(v, average[f"model.{k}"]) for k, v in best.items())
    trainer.save_model(str(tmp_path / "final"))
    final = safetensors.torch.load_file(str(tmp_path / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in best)


def test_the_average_starts_at_the_efficient_variants_switch(tmp_path, small_train, one_thread):
    args = _args(
        tmp_path,
        adv_method="cure",
        max_steps=-1,
        num_train_epochs=2,
        natural_warmup_epochs=1,
        per_device_train_batch_size=16,
    )  # 2 steps per epoch: 2 natural steps, then 2 CURE steps
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=small_train)
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.weight_average.step == 2


@pytest.mark.parametrize(
    "value, decay",
    [(True, 0.999), ("true", 0.999), ("0.998", 0.998), (0.9, 0.9), (None, None), (False, None), ("false", None)],
)
def test_weight_averaging_argument(tmp_path, value, decay):
    assert _args(tmp_path, weight_averaging=value).weight_averaging_decay == decay


@pytest.mark.parametrize("value", [0, 1.0, 1.5, "often"])
def test_weight_averaging_argument_refused(tmp_path, value):
    with pytest.raises(ValueError, match=r"weight_averaging=.* is invalid: allowed True \(decay 0.999\)"):
        _args(tmp_path, weight_averaging=value)


def test_weight_averaging_round_trips_through_the_arguments_json(tmp_path):
    args = _args(tmp_path, weight_averaging=True)
    assert json.loads(args.to_json_string())["weight_averaging"] is True
