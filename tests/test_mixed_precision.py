"""Mixed precision on CPU: bf16 (and fp16) autocast for training and attacks, fp32 evaluation by default."""

import math

import pytest
import torch
from transformers import TrainerCallback

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.attacks import attack_mode, kl_divergence, pgd
from cure_hf.data import image_transform, load_digits_dataset

STEPS = 2


@pytest.fixture(scope="module")
def data():
    ds = load_digits_dataset()
    train, test = ds["train"].select(range(8 * STEPS)), ds["test"].select(range(8))
    train.set_transform(image_transform(32, train=True))
    test.set_transform(image_transform(32, train=False))
    return train, test


def _record_conv_dtypes(model):
    """(training?, output dtype) of every forward through the model's first convolution."""
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    conv.register_forward_hook(lambda module, inputs, output: seen.append((module.training, output.dtype)))
    return seen


def _trainer(tiny_model, data, tmp_path, use_cpu=True, **fields):
    train, test = data
    args = CURETrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=STEPS,
        attack_steps=2,
        learning_rate=0.05,
        eval_pgd_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=use_cpu,
        seed=0,
        **({"revision_rate": 1.0} if fields.get("adv_method", "cure") == "cure" else {}),
        **fields,
    )
    model = tiny_model("test_resnet")
    return CURETrainer(model=model, args=args, train_dataset=train, eval_dataset=test), model


METHODS = [
    dict(adv_method="clean"),
    dict(adv_method="pgd"),
    dict(adv_method="trades"),
    dict(adv_method="mart"),
    dict(adv_method="fgsm_rs"),
    dict(adv_method="cure"),
    dict(adv_method="cure", prominence="paper", conservation="hard"),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(m.values()))
def test_bf16_autocast_trains_every_method(tiny_model, data, tmp_path, one_thread, method):
    trainer, model = _trainer(tiny_model, data, tmp_path, bf16=True, **method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = _record_conv_dtypes(model)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    train_dtypes = {dtype for training, dtype in seen if training}
    attack_dtypes = {dtype for training, dtype in seen if not training}
    assert train_dtypes == {torch.bfloat16}, "the training forward did not run under bf16 autocast"
    if method["adv_method"] != "clean":
        assert attack_dtypes == {torch.bfloat16}, "the attack did not run under bf16 autocast"
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights must stay fp32"
    if method["adv_method"] == "cure":
        assert trainer.revision.step == STEPS


def test_evaluation_runs_in_fp32_unless_asked(tiny_model, data, tmp_path, one_thread):
    trainer, model = _trainer(tiny_model, data, tmp_path, bf16=True, adv_method="trades")
    trainer.train()
    seen = _record_conv_dtypes(model)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert seen and {dtype for _, dtype in seen} == {torch.float32}, "evaluation must default to fp32"
    seen.clear()
    trainer.args.eval_mixed_precision = True
    trainer.evaluate()
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    seen.clear()  # the autocast wrapper is back in place for training after an fp32 evaluation
    trainer.args.eval_mixed_precision = False
    trainer.evaluate()
    trainer.model_wrapped(torch.rand(2, 3, 32, 32))
    assert seen[-1][1] == torch.bfloat16


def test_fp16_attack_gradients_do_not_underflow(tiny_model):
    """TRADES/CURE's first attack step: KL gradients near 1e-3 at the logits vanish in fp16 unless rescaled."""
    torch.manual_seed(0)
    model = tiny_model("test_resnet").eval()
    x = 0.1 + 0.8 * torch.rand(8, 3, 32, 32)  # interior pixels: a step is never undone by the [0, 1] clamp
    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = model(x)
    with torch.autocast("cpu", dtype=torch.float16):
        x_adv = pgd(
            model,
            x,
            None,
            eps=8 / 255,
            step_size=1 / 255,
            steps=1,
            loss="kl",
            init="normal",
            clean_logits=clean,
            generator=torch.Generator().manual_seed(1),
        )
        # The control: the plain gradient of the same objective, as an unprotected attack would take it.
        with attack_mode(model):
            probe = start.clone().requires_grad_(True)
            (plain,) = torch.autograd.grad(kl_divergence(model(probe), clean, reduction="sum"), probe)
    moved = ((x_adv - start).abs() > 0.5 / 255).float().mean().item()
    assert (plain != 0).float().mean().item() < 0.5, "control: fp16 no longer underflows here, the test is moot"
    assert moved > 0.99, f"only {moved:.1%} of the pixels moved: the fp16 attack gradient underflowed"
    with attack_mode(model):  # and the fp16 signs agree with fp32 on most pixels
        probe = start.clone().requires_grad_(True)
        (exact,) = torch.autograd.grad(kl_divergence(model(probe), clean, reduction="sum"), probe)
    agree = ((x_adv - start).sign() == exact.sign()).float().mean().item()
    assert agree > 0.6, f"fp16 attack direction agrees with fp32 on only {agree:.1%} of pixels"


class _CountSkippedSteps(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.skipped = trainer, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.skipped += int(self.trainer.accelerator.optimizer_step_was_skipped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate runs fp16 (autocast + GradScaler) on GPUs only")
@pytest.mark.parametrize("prominence", ["loss", "paper"])
def test_fp16_scaler_skipped_step_runs_no_mask_and_no_revision(tiny_model, data, tmp_path, prominence):
    trainer, model = _trainer(
        tiny_model,
        data,
        tmp_path,
        use_cpu=False,
        fp16=True,
        adv_method="cure",
        prominence=prominence,
        conservation="hard",
    )
    scaler = trainer.accelerator.scaler
    assert scaler is not None and scaler.is_enabled()
    seen = _record_conv_dtypes(model)
    # Step 0's gradient overflows inside backward (before the scaler unscales), as an fp16 overflow would.
    next(model.parameters()).register_hook(lambda g: g * float("inf") if trainer.state.global_step == 0 else g)
    counter = _CountSkippedSteps(trainer)
    trainer.add_callback(counter)
    masks = []
    conserve = trainer.component("conservation").before_optimizer_step

    def counted(*hook_args):  # returns None, as an optimizer pre-step hook must
        masks.append(trainer.state.global_step)
        conserve(*hook_args)

    trainer.component("conservation").before_optimizer_step = counted
    trainer.train()
    assert trainer.state.global_step == STEPS and counter.skipped >= 1 and 0 not in masks
    taken = STEPS - counter.skipped
    assert len(masks) == trainer.revision.step == taken, "mask and revision must run on taken steps only"
    assert trainer.component("conservation")._paper_grads is None, (
        "the paper scores' gradient sums must be consumed by the step"
    )
    assert {dtype for _, dtype in seen} == {torch.float16}
    assert all(torch.isfinite(p).all() for p in model.parameters())
