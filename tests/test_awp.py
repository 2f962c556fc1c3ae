"""Adversarial weight perturbation (`awp_gamma`): the layer-wise perturbation against independent computations,
the update gradient taken at the perturbed weights, its exact removal, the hook order with hard conservation,
once per optimizer step under gradient accumulation, the warm-up, bf16, and the arguments."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from transformers import TrainerCallback

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.awp import AdversarialWeightPerturbation
from cure_hf.data import image_transform

GAMMA = 5e-3


@pytest.fixture(scope="module")
def small_train():
    from cure_hf.data import load_digits_dataset

    train = load_digits_dataset()["train"].select(range(32))
    train.set_transform(image_transform(16, train=False))
    return train


@pytest.fixture
def batch(small_train):
    from cure_hf.data import collate_pixels

    return collate_pixels([small_train[i] for i in range(8)])


def _args(output_dir, **overrides):
    # Plain SGD: no momentum, no weight decay, no clipping, constant lr, so a step is w - lr * grad.
    kwargs = dict(
        output_dir=str(output_dir),
        adv_method="pgd",
        max_steps=2,
        per_device_train_batch_size=8,
        attack_steps=1,
        optim="sgd",
        sgd_momentum=0.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        awp_gamma=GAMMA,
        awp_warmup_epochs=0,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return CURETrainingArguments(**kwargs)


def _model():
    """test_resnet with non-zero BatchNorm scales: timm starts each residual branch's last BatchNorm at 0, which gives
    the branch's convolutions a zero gradient (and so a zero perturbation) until training moves it."""
    model = make_tiny_model("test_resnet")
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
    return model


def _conv_linear_weights(model):
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def _grad_at(model, weights, x, labels):
    """The gradient of CE(model(x)) in train mode at ``weights``, on a separate copy of the model."""
    copy_ = copy.deepcopy(model).train()
    copy_.load_state_dict(weights)
    loss = F.cross_entropy(copy_(x), labels)
    names = [n for n, _ in copy_.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(copy_.parameters()))))


def test_perturbation_is_layerwise_gamma_times_the_weight_norm_along_the_loss_gradient(batch, one_thread):
    model = _model().train()
    x, labels = batch["pixel_values"], batch["labels"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    awp = AdversarialWeightPerturbation(GAMMA)
    perturbation, _ = awp.perturb_(model, lambda proxy: F.cross_entropy(proxy(x), labels))

    # which tensors: the kernels of every conv and linear layer, nothing else (BatchNorm affine, biases)
    layers = _conv_linear_weights(model)
    assert set(perturbation) == {f"{layer}.weight" for layer in layers}
    gradient = _grad_at(model, before, x, labels)
    for name, p in model.state_dict().items():
        if name not in perturbation:
            assert torch.equal(p, before[name]), f"{name} changed (not a conv/linear weight, or a buffer)"
            continue
        w, v = before[name].double().numpy(), (p - before[name]).double().numpy()
        np.testing.assert_allclose(np.linalg.norm(v), GAMMA * np.linalg.norm(w), rtol=1e-4)
        g = gradient[name].double().numpy()
        cosine = np.sum(v * g) / (np.linalg.norm(v) * np.linalg.norm(g))
        assert cosine == pytest.approx(1.0, abs=1e-5), f"{name}: not along the loss gradient"
    awp.restore_()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # exactly back, buffers untouched


class Spy(TrainerCallback):
    """Per optimizer step: the weights at its start, the weights and gradients the optimizer sees, the weights after."""

    def __init__(self):
        self.trainer, self.start, self.pre_step, self.grads, self.after = None, [], [], [], []

    def _weights(self):
        return {
            k: v.detach().clone()
            for k, v in self.trainer.accelerator.unwrap_model(self.trainer.model).state_dict().items()
        }

    def on_step_begin(self, args, state, control, **kwargs):
        self.start.append(self._weights())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        net = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.pre_step.append(self._weights())
        self.grads.append({n: p.grad.detach().clone() for n, p in net.named_parameters()})

    def on_step_end(self, args, state, control, **kwargs):
        self.after.append(self._weights())


def _spied_trainer(tmp_path, small_train, **overrides):
    spy = Spy()
    trainer = CURETrainer(_model(), _args(tmp_path, **overrides), train_dataset=small_train, callbacks=[spy])
    spy.trainer = trainer
    crafted, perturbations = [], []
    craft, perturb = trainer.craft_adversarial, trainer.awp.perturb_

    def craft_spy(model, x, labels, clean_logits=None):
        x_adv = craft(model, x, labels, clean_logits)
        crafted.append((x_adv.clone(), labels.clone()))
        return x_adv

    def perturb_spy(*a, **k):
        out = perturb(*a, **k)
        perturbations.append({n: v.clone() for n, v in out[0].items()})
        return out

    trainer.craft_adversarial, trainer.awp.perturb_ = craft_spy, perturb_spy
    return trainer, spy, crafted, perturbations


def test_the_update_uses_the_gradient_at_the_perturbed_weights(tmp_path, small_train, one_thread):
    trainer, spy, crafted, perturbations = _spied_trainer(tmp_path, small_train)
    trainer.train()
    net = trainer.accelerator.unwrap_model(trainer.model)
    lr = trainer.args.learning_rate
    assert len(perturbations) == len(crafted) == len(spy.after) == 2
    for step, ((x_adv, labels), v, start, pre, grads, after) in enumerate(
        zip(crafted, perturbations, spy.start, spy.pre_step, spy.grads, spy.after)
    ):
        # v, computed again here: gamma ||w|| g / ||g|| with g at the unperturbed weights
        g0 = _grad_at(net, start, x_adv, labels)
        for name in v:
            w = start[name]
            expected = GAMMA * w.norm() / g0[name].norm() * g0[name]
            torch.testing.assert_close(v[name], expected, rtol=1e-4, atol=1e-8)
            assert torch.equal(pre[name], w + v[name].to(w.dtype))  # the optimizer is called at w + v
        # the update gradient is the one at w + v, computed here on a separate copy
        perturbed = {k: (t + v[k] if k in v else t) for k, t in start.items()}
        g1 = _grad_at(net, perturbed, x_adv, labels)
        g_unperturbed = _grad_at(net, start, x_adv, labels)
        for name, g in grads.items():
            torch.testing.assert_close(g, g1[name], rtol=1e-4, atol=1e-6)
        assert any(not torch.allclose(grads[n], g_unperturbed[n], rtol=1e-4, atol=1e-6) for n in grads)
        # the step starts from the unperturbed w: w - lr * grad, bit for bit (SGD's own arithmetic, add with alpha)
        for name, _ in net.named_parameters():
            assert torch.equal(after[name], start[name].add(grads[name], alpha=-lr)), f"step {step}: {name}"


def test_the_perturbation_is_removed_bit_for_bit(tmp_path, small_train, one_thread):
    # With lr 0 the step changes nothing, so the weights after it must be the unperturbed ones exactly, which
    # subtracting v after the step (the reference code) would not give: (w + v) - v != w in floating point.
    trainer, spy, _, perturbations = _spied_trainer(tmp_path, small_train, learning_rate=0.0, max_steps=1)
    trainer.train()
    start, after, v = spy.start[0], spy.after[0], perturbations[0]
    assert all(torch.equal(after[k], start[k]) for k in v)
    assert any(not torch.equal((start[k] + v[k]) - v[k], start[k]) for k in v)


def test_hard_conservation_keeps_the_unperturbed_values(tmp_path, small_train, one_thread):
    trainer, spy, _, perturbations = _spied_trainer(
        tmp_path, small_train, adv_method="cure", conservation="hard", max_steps=1
    )
    conserved = []
    conserve = trainer.component("conservation").before_optimizer_step

    def conserve_spy(*hook_args):
        conserve(*hook_args)
        conserved.extend((p, saved.clone()) for p, saved in trainer.component("conservation")._conserved)

    trainer.component("conservation").before_optimizer_step = conserve_spy
    trainer.train()
    net = trainer.accelerator.unwrap_model(trainer.model)
    names = {id(p): n for n, p in net.named_parameters()}
    start, after, v = spy.start[0], spy.after[0], perturbations[0]
    checked = 0
    for p, saved in conserved:
        name = names[id(p)]
        kept = ~saved.isnan()
        # the values kept (and left after the step) are the unperturbed ones, not w + v
        assert torch.equal(saved[kept], start[name][kept]) and torch.equal(after[name][kept], start[name][kept])
        if name in v and kept.any():
            checked += 1
            assert not torch.equal(saved[kept], (start[name] + v[name])[kept])
    assert checked > 0


def test_gradient_accumulation_perturbs_once_per_optimizer_step(tmp_path, small_train, one_thread):
    trainer, spy, crafted, perturbations = _spied_trainer(
        tmp_path, small_train, gradient_accumulation_steps=2, per_device_train_batch_size=4
    )
    seen = []  # the weights each micro-batch's update forward runs at
    net = trainer.accelerator.unwrap_model(trainer.model)
    # (the proxy, a deep copy, carries the hook too: only the working model's own training forwards count)
    handle = net.register_forward_pre_hook(
        lambda module, inputs: (
            seen.append(module.model.fc.weight.detach().clone()) if module is net and module.training else None
        )
    )
    trainer.train()
    handle.remove()
    assert trainer.state.global_step == 2 and len(crafted) == 4  # 2 optimizer steps of 2 micro-batches
    assert len(perturbations) == 2
    for step in range(2):
        perturbed_fc = spy.start[step]["model.fc.weight"] + perturbations[step]["model.fc.weight"]
        assert torch.equal(spy.pre_step[step]["model.fc.weight"], perturbed_fc)
        micro = [w for w in seen[step * len(seen) // 2 : (step + 1) * len(seen) // 2]]
        assert micro and all(torch.equal(w, perturbed_fc) for w in micro)  # both micro-batches at w + v


def test_no_perturbation_during_the_warmup(tmp_path, small_train, one_thread):
    # 32 examples, batch 16: 2 steps per epoch; AWP from epoch 1 on
    trainer, _, _, perturbations = _spied_trainer(
        tmp_path, small_train, per_device_train_batch_size=16, max_steps=4, awp_warmup_epochs=1
    )
    steps = []
    perturb = trainer.awp.perturb_
    trainer.awp.perturb_ = lambda *a, **k: (steps.append(trainer.state.global_step), perturb(*a, **k))[1]
    trainer.train()
    assert steps == [2, 3]


def test_bf16_autocast_keeps_the_layerwise_norm_and_restores(tmp_path, one_thread):
    from cure_hf.data import load_digits_dataset

    # 32x32 as tests/test_mixed_precision.py: at 16x16 the last stage's BatchNorm sees 1x1 maps, and CPU bf16 then
    # gives non-finite gradients with or without AWP
    train = load_digits_dataset()["train"].select(range(8))
    train.set_transform(image_transform(32, train=False))
    trainer, spy, _, perturbations = _spied_trainer(tmp_path, train, bf16=True, adv_method="trades", max_steps=1)
    trainer.train()
    start, pre = spy.start[0], spy.pre_step[0]
    for name, v in perturbations[0].items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
        assert v.norm().item() == pytest.approx(GAMMA * start[name].norm().item(), rel=1e-4)
        assert torch.equal(pre[name], start[name] + v)


@pytest.mark.parametrize(
    "method, gamma, warmup",
    [("pgd", 1e-2, 0.0), ("fgsm_rs", 1e-2, 0.0), ("trades", 5e-3, 10.0), ("mart", 5e-3, 10.0), ("cure", 5e-3, 10.0)],
)
def test_published_defaults_per_method(tmp_path, method, gamma, warmup):
    args = _args(tmp_path, adv_method=method, awp_gamma=True, awp_warmup_epochs=None)
    assert args.resolved_awp_gamma == gamma and args.resolved_awp_warmup_epochs == warmup
    assert _args(tmp_path, adv_method=method, awp_gamma="2e-3").resolved_awp_gamma == 2e-3
    assert _args(tmp_path, adv_method=method, awp_gamma=0, awp_warmup_epochs=None).resolved_awp_gamma is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"adv_method": "clean"}, "awp_gamma=.* is invalid with adv_method='clean'"),
        ({"fp16": True}, "is invalid with fp16=True.*bf16"),
        (
            {"adv_method": "trades", "attack_reuse_clean_logits": True},
            "attack_reuse_clean_logits=True is invalid with awp",
        ),
        (
            {"awp_gamma": None, "awp_warmup_epochs": 3},
            "awp_warmup_epochs=3 is invalid: allowed only together with awp_gamma",
        ),
        ({"awp_gamma": 1.5}, r"awp_gamma=1.5 is invalid: allowed True"),
        ({"awp_gamma": "strong"}, r"awp_gamma='strong' is invalid"),
        ({"awp_warmup_epochs": -1}, "awp_warmup_epochs=-1 is invalid"),
    ],
)
def test_refused_combinations(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **overrides)
