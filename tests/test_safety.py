"""Never silently wrong: one test per row of the table in docs/safety.md (what used to go on silently, or fail
far from its cause, now stops with a message that names the value and the fix)."""

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from conftest import make_tiny_model

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import collate_pixels, image_transform, load_digits_dataset
from cure_hf.evaluation import evaluate_robustness, predict_under_attack
from cure_hf.safety import (
    MAX_EPSILON,
    NonFiniteTrainingError,
    OutputDirInUseError,
    OutputDirLock,
    check_attack_budget,
)

EPS = 8 / 255


@pytest.fixture(scope="module")
def tiny():
    """16 training and 8 test digits at 16x16 pixels, no augmentation."""
    data = load_digits_dataset()
    train, test = data["train"].select(range(16)), data["test"].select(range(8))
    train.set_transform(image_transform(16, train=True))
    test.set_transform(image_transform(16, train=False))
    return train, test


def _args(output_dir, **overrides):
    fields = dict(
        output_dir=str(output_dir),
        adv_method="pgd",
        max_steps=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        eval_pgd_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    fields.update(overrides)
    return CURETrainingArguments(**fields)


def _all_finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in safetensors.torch.load_file(str(folder)).values())


# ------------------------------------------------------------------------------------------ divergence
def test_learning_rate_1e6_stops_training_names_the_step_and_cause_and_saves_no_nan(tmp_path, tiny, one_thread):
    train, test = tiny
    args = _args(tmp_path, adv_method="cure", learning_rate=1e6, max_steps=6, save_strategy="steps", save_steps=1)
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train, eval_dataset=test)
    with pytest.raises(NonFiniteTrainingError) as info:
        trainer.train()
    message = str(info.value)
    stopped = trainer.state.global_step + 1
    assert f"diverged at step {stopped}:" in message and "learning_rate=1000000.0" in message
    assert "nonfinite_policy='skip'" in message and "fp16" in message and "bad data" in message
    assert stopped < 6, "stopped at the first non-finite gradient, not at the end"
    saved = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-"))
    assert saved == [f"checkpoint-{s}" for s in range(1, stopped)], "no checkpoint of the diverged step"
    assert all(_all_finite(tmp_path / s / "model.safetensors") for s in saved)
    # whatever the model holds now is never published with numbers: NaN weights are refused, NaN logits too
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="refusing to save"):
        trainer.save_model(str(tmp_path / "final"))
    assert not os.path.exists(tmp_path / "final" / "README.md")
    with pytest.raises(NonFiniteTrainingError, match="NaN or infinite logits"):
        trainer.evaluate()


def test_nan_gradient_stops_before_the_update_and_skip_policy_drops_only_that_step(tmp_path, tiny, one_thread):
    train, _ = tiny
    for policy in ("stop", "skip"):
        model = make_tiny_model("test_resnet")
        trainer = CURETrainer(model, _args(tmp_path / policy, nonfinite_policy=policy), train_dataset=train)
        first = next(model.parameters())
        first.register_hook(lambda g: g * float("nan") if trainer.state.global_step == 0 else g)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        if policy == "stop":
            with pytest.raises(
                NonFiniteTrainingError,
                match=r"diverged at step 1: NaN or infinite gradient in \d+ "
                r"parameter tensors \(e\.g\. model\.conv1\.0\.weight",
            ):
                trainer.train()
            assert all(torch.equal(p, initial[n]) for n, p in model.named_parameters()), "the NaN step was applied"
            with OutputDirLock(str(tmp_path / policy)):  # released on error
                pass
        else:
            trainer.train()
            assert trainer.state.global_step == 2 and trainer.nonfinite_guard.skipped_steps == [1]
            assert all(torch.isfinite(p).all() for p in model.parameters())
            moved = [n for n, p in model.named_parameters() if not torch.equal(p, initial[n])]
            assert moved, "step 2 was taken"
            # step 1 was dropped whole: the optimizer holds state from one step only (SGD momentum buffers exist
            # after the first taken step; a second taken step would leave the same keys, so check the LR schedule)
            assert trainer.lr_scheduler.last_epoch == 2


@pytest.mark.parametrize("policy", ["maybe", "STOP"])
def test_nonfinite_policy_is_validated(tmp_path, policy):
    with pytest.raises(ValueError, match=r"nonfinite_policy=.* one of \('stop', 'skip'\)"):
        _args(tmp_path, nonfinite_policy=policy)


# ----------------------------------------------------------------------------- evaluation input and budgets
@pytest.mark.parametrize(
    "budget, needle",
    [
        (dict(steps=0), "steps=0 is invalid"),
        (dict(restarts=0), "restarts=0 is invalid"),
        (dict(step_size=0.0), "step_size=0.0 is invalid"),
        (dict(eps=1.0), r"Did you mean 1/255"),
        (dict(eps=-0.1), "eps=-0.1 is invalid"),
    ],
)
def test_pure_evaluation_refuses_budgets_that_make_attacks_a_no_op(digits_batch, budget, needle):
    model = make_tiny_model("test_resnet").eval()
    x, y = digits_batch["pixel_values"][:4], digits_batch["labels"][:4]
    kwargs = dict(eps=EPS, step_size=EPS / 4, steps=2, restarts=1)
    kwargs.update(budget)
    with pytest.raises(ValueError, match=needle):
        predict_under_attack(model, x, y, "pgd", **kwargs)
    with pytest.raises(ValueError, match=needle):
        evaluate_robustness(model, [{"pixel_values": x, "labels": y}], "clean,pgd", **kwargs)


def test_epsilon_in_intensity_levels_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"epsilon=1 is invalid.*Did you mean 1/255 = 0\.0039"):
        _args(tmp_path, epsilon=1)
    with pytest.raises(ValueError, match=r"eval_epsilon=0\.5 is invalid.*64/255"):
        _args(tmp_path, eval_epsilon=0.5)
    assert _args(tmp_path, epsilon="64/255").epsilon == pytest.approx(MAX_EPSILON)
    assert _args(tmp_path, adv_method="clean", epsilon=1, eval_epsilon="8/255").epsilon == 1.0  # never used
    check_attack_budget(eps=0.0, step_size=0.0, steps=1, restarts=1)  # a zero ball: the clean accuracy, honestly


def _relabelled(dataset, pixels=lambda x: x, labels=lambda y: y):
    pipeline = image_transform(16, train=False)
    return dataset.with_transform(
        lambda b: {
            "pixel_values": [pixels(p) for p in pipeline(b)["pixel_values"]],
            "labels": [labels(y) for y in b["label"]],
        }
    )


@pytest.mark.parametrize(
    "case, needle",
    [
        ("intensities", r"range from 0\.000 to 25[0-9]\.000.*divide by 255"),
        ("labels", r"range from 1[0-9] to 1[0-9], but the model has 10 classes"),
        ("uint8", "got torch.uint8"),
        ("nan", "NaN or infinite"),
    ],
)
def test_evaluate_refuses_input_that_training_refuses(tmp_path, tiny, case, needle):
    train, test = tiny
    broken = {
        "intensities": dict(pixels=lambda p: p * 255),
        "labels": dict(labels=lambda y: y + 10),
        "uint8": dict(pixels=lambda p: (p * 255).to(torch.uint8)),
        "nan": dict(pixels=lambda p: torch.where(p > 0.5, float("nan"), p)),
    }[case]
    eval_set = _relabelled(test, **broken)
    # the trainer's evaluate(), with the collator and with a pass-through collator that checks nothing
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path), train_dataset=train)
    with pytest.raises(ValueError, match=needle):
        trainer.evaluate(eval_set)
    raw = lambda examples: {
        k: torch.stack([torch.as_tensor(e[k]) for e in examples])  # noqa: E731
        for k in ("pixel_values", "labels")
    }
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path), train_dataset=train, data_collator=raw)
    with pytest.raises(ValueError, match=needle):
        trainer.evaluate(eval_set)
    # the pure function the CLI calls
    batch = raw([eval_set[i] for i in range(8)])
    with pytest.raises(ValueError, match=needle):
        evaluate_robustness(make_tiny_model("test_resnet"), [batch], "clean,pgd", steps=1)


def test_float_labels_raw_images_and_nan_pixels_are_refused_by_the_collator(digits):
    example = digits["test"][0]
    with pytest.raises(ValueError, match=r"non-integer values such as \[3\.7"):
        collate_pixels([{"pixel_values": example["pixel_values"], "labels": 3.7}])
    assert collate_pixels([{"pixel_values": example["pixel_values"], "labels": 3.0}])["labels"].dtype == torch.long
    raw = load_digits_dataset()["test"]
    with pytest.raises(ValueError, match=r"raw image column 'image'.*set_transform"):
        collate_pixels([raw[0]])
    with pytest.raises(ValueError, match=r"raw image column 'img'"):
        collate_pixels([{"img": raw[0]["image"], "label": 1}])
    nan = example["pixel_values"].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="contain 1 NaN or infinite values"):
        collate_pixels([{"pixel_values": nan, "labels": 1}])
    with pytest.raises(ValueError, match="normalise inside the model"):
        collate_pixels([{"pixel_values": example["pixel_values"] * 4 - 2, "labels": 1}])


# ------------------------------------------------------------------------------------- models up front
class _FeaturesAndLogits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.model.forward_head(self.model.model.forward_features(x), pre_logits=True), self.model(x)


def test_unsaveable_and_ambiguous_models_are_refused_at_construction(tmp_path, tiny):
    train, _ = tiny
    sequential = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(TypeError, match=r"cannot save a Sequential.*cure_hf\.create_model"):
        CURETrainer(sequential, _args(tmp_path), train_dataset=train)
    assert not os.path.exists(tmp_path / "checkpoint-1")

    ambiguous = _FeaturesAndLogits(make_tiny_model("test_resnet"))
    ambiguous.pretrained_cfg, ambiguous.num_classes = {}, 10  # saveable as far as the hub goes: the output is the issue
    with pytest.raises(ValueError, match=r"which part of the model's output is the logits.*tuple of 2 items"):
        CURETrainer(ambiguous, _args(tmp_path), train_dataset=train)

    with pytest.raises(ValueError, match=r"the model has 5 outputs but the training set has 10 classes"):
        CURETrainer(make_tiny_model("test_resnet", num_classes=5), _args(tmp_path), train_dataset=train)


def test_the_up_front_check_leaves_the_random_stream_alone(tmp_path, digits):
    augmented = load_digits_dataset()["train"].select(range(8))
    augmented.set_transform(image_transform(16, train=True, augment="crop_flip"))
    import random

    import numpy as np
    from transformers import set_seed

    CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path, seed=5), train_dataset=augmented)
    after = torch.rand(3), random.random(), np.random.rand()
    set_seed(5)  # what the Trainer does at construction, before the check ran a random crop on example 0
    assert torch.equal(after[0], torch.rand(3)) and after[1:] == (random.random(), np.random.rand())


# ------------------------------------------------------------------------------------------ resuming
@pytest.fixture(scope="module")
def cure_run(tiny, tmp_path_factory):
    """A 2-step CURE run with checkpoint-1 and checkpoint-2, trained once; each test resumes from its own copy."""
    folder = tmp_path_factory.mktemp("cure_run")
    args = _args(folder, adv_method="cure", save_strategy="steps", save_steps=1)
    CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=tiny[0]).train()
    return folder


def _two_checkpoints(tmp_path, tiny, cure_run):
    import shutil

    shutil.copytree(cure_run, tmp_path, dirs_exist_ok=True)
    return tiny[0]


def test_resume_true_skips_a_half_written_checkpoint_with_a_warning(tmp_path, tiny, cure_run, caplog, one_thread):
    train = _two_checkpoints(tmp_path, tiny, cure_run)
    half = tmp_path / "checkpoint-2"
    for name in ("optimizer.pt", "trainer_state.json", "revision.safetensors"):
        os.remove(half / name)  # what a SIGKILL during the Trainer's own save used to leave
    resumed = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, adv_method="cure", max_steps=3), train_dataset=train
    )
    with caplog.at_level(logging.WARNING, logger="cure_hf.base_trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3 and resumed.revision.step == 3  # from checkpoint-1 (revision step 1)
    warning = next(r.getMessage() for r in caplog.records if "skips" in r.getMessage())
    assert str(half) in warning and "optimizer.pt" in warning and "trainer_state.json" in warning


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt", "revision.safetensors"])
def test_resume_without_optimizer_scheduler_or_revision_state_is_refused_unless_allowed(
    tmp_path, tiny, cure_run, caplog, one_thread, missing
):
    train = _two_checkpoints(tmp_path, tiny, cure_run)
    os.remove(tmp_path / "checkpoint-2" / missing)
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, adv_method="cure", max_steps=3), train_dataset=train
    )
    with pytest.raises(ValueError, match=rf"lacks {missing}.*allow_partial_resume=True"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    allowed = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path, adv_method="cure", max_steps=3, allow_partial_resume=True),
        train_dataset=train,
    )
    with caplog.at_level(logging.WARNING, logger="cure_hf.base_trainer"):
        allowed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert allowed.state.global_step == 3
    assert any(f"lacks {missing}" in r.getMessage() and "start afresh" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "changed",
    [
        dict(adv_method="trades"),
        dict(conserve_fraction=0.5),
        dict(revision_decay=0.99),
        dict(epsilon="4/255"),
        dict(attack_steps=3),
        dict(clean_weight=0.2),
        dict(prominence="paper"),
    ],
)
def test_resume_with_other_method_settings_is_refused_naming_both_values(tmp_path, tiny, cure_run, changed):
    train = _two_checkpoints(tmp_path, tiny, cure_run)
    ((name, value),) = changed.items()
    saved = json.loads((tmp_path / "checkpoint-2" / "training_args.json").read_text())[name]
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path, **{"adv_method": "cure", "max_steps": 3, **changed}),
        train_dataset=train,
    )
    with pytest.raises(ValueError, match="other method settings") as info:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert f"{name}={getattr(trainer.args, name)!r} (checkpoint: {saved!r})" in str(info.value)


def test_resume_with_another_learning_rate_warns_that_it_is_not_used(tmp_path, tiny, cure_run, caplog, one_thread):
    train = _two_checkpoints(tmp_path, tiny, cure_run)
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path, adv_method="cure", max_steps=3, learning_rate=0.5),
        train_dataset=train,
    )
    with caplog.at_level(logging.WARNING, logger="cure_hf.base_trainer"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert any(
        "learning_rate=0.5 differs from the checkpoint's 0.05" in r.getMessage() and "not used" in r.getMessage()
        for r in caplog.records
    )
    # and indeed: the restored schedule runs from the checkpoint's base learning rate (linear decay to 0 at step 2
    # of 2 in the first run), not from 0.5
    assert trainer.lr_scheduler.base_lrs == [0.05] * len(trainer.lr_scheduler.base_lrs)


# ---------------------------------------------------------------------------------- one writer per folder
def test_a_second_trainer_on_the_same_output_dir_stops_naming_the_folder_and_holder(tmp_path, tiny):
    from transformers import TrainerCallback

    train, _ = tiny
    refused = []

    class StartSecondTrainer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                second = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path), train_dataset=train)
                with pytest.raises(OutputDirInUseError) as info:
                    second.train()
                refused.append(str(info.value))

    first = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path), train_dataset=train, callbacks=[StartSecondTrainer()]
    )
    first.train()
    assert first.state.global_step == 2
    (message,) = refused
    assert f"output_dir={str(tmp_path)!r} is in use by pid {os.getpid()}" in message and "own output_dir" in message
    # released at the end (and on error): the folder can be trained in again
    CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path, max_steps=1), train_dataset=train).train()


def test_the_lock_of_a_killed_process_does_not_block(tmp_path, tiny):
    train, _ = tiny
    import cure_hf.safety

    # cure_hf.safety alone (not the whole package): the child only needs the lock, and starts in seconds
    code = (
        "import importlib.util, sys, time; spec = importlib.util.spec_from_file_location('safety', sys.argv[2]); "
        "safety = importlib.util.module_from_spec(spec); spec.loader.exec_module(safety); "
        "lock = safety.OutputDirLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(120)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), cure_hf.safety.__file__], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path, max_steps=1), train_dataset=train)
        with pytest.raises(OutputDirInUseError, match=f"in use by pid {child.pid} on host"):
            trainer.train()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    trainer.train()  # the OS released the dead process's lock: nothing to clean up by hand
    assert trainer.state.global_step == 1
    lock = OutputDirLock(str(tmp_path))
    with lock:
        assert lock.held


# ------------------------------------------------------------------------------------------------ push
def test_push_to_hub_saves_locally_before_the_upload_fails(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, _ = tiny
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, hub_model_id="someone/robust-digits"), train_dataset=train
    )
    with pytest.raises(Exception) as info:
        trainer.push_to_hub()
    assert "offline" in f"{type(info.value).__name__} {info.value}".lower()
    assert {"model.safetensors", "config.json", "README.md"} <= set(os.listdir(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the deferred verdict is the GPU path")
def test_on_a_gpu_the_divergence_verdict_is_read_a_step_late_without_a_host_sync():
    """policy='stop' on CUDA: the check makes no host synchronisation; the next check (or flush) raises, naming the
    step the gradient went non-finite in."""
    from cure_hf.safety import NonFiniteGuard, NonFiniteTrainingError

    layer = nn.Linear(4, 2).cuda()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    guard = NonFiniteGuard("stop", lambda: layer, lambda: {"step": 8, "learning_rate": 0.1}, deferred=True)
    layer.weight.grad = torch.full_like(layer.weight, float("nan"))
    layer.bias.grad = torch.zeros_like(layer.bias)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        guard.check(optimizer)  # step 7's gradient: no sync, no error yet
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(NonFiniteTrainingError, match=r"diverged at step 7.*applied in memory"):
        guard.check(optimizer)  # the next step reads step 7's verdict
    with pytest.raises(ValueError, match="can only stop"):
        NonFiniteGuard("skip", lambda: layer, lambda: {}, deferred=True)
