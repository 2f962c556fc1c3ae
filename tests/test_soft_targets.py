"""Mixup/cutmix soft targets through every method's loss and training attack, against hand formulas and timm.

The oracles: numpy in float64 for the losses and for the attack's first step on a linear model (whose input
gradient is W^T (softmax(z) - t)), and timm's own `Mixup` called directly for the batches and targets.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import make_tiny_model, stop_after_save, tiny_run_arguments
from timm.data import Mixup

from cure_hf import CURETrainer, register_method
from cure_hf import methods as methods_module
from cure_hf.attacks import margin_loss, pgd
from cure_hf.methods import PGDAT, AdversarialMethod, AttackSettings, AttackSpec, LossInputs, get_method, mart_loss

C = 5


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _soft_ce(z, t):
    """-mean_i sum_c t_ic log softmax(z)_ic."""
    log_p = z - z.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(-(t * log_p).sum(axis=1).mean())


def _kl(z_teacher, z_student):
    """mean_i KL(softmax teacher || softmax student)."""
    p, q = _softmax(z_teacher), _softmax(z_student)
    return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())


@pytest.fixture
def soft_batch():
    g = torch.Generator().manual_seed(3)
    z_nat, z_adv = torch.randn(6, C, generator=g, dtype=torch.float64), torch.randn(6, C, generator=g).double()
    r_nat, r_adv = torch.randn(6, C, generator=g).double(), torch.randn(6, C, generator=g).double()
    targets = torch.softmax(torch.randn(6, C, generator=g).double() * 2, dim=1)  # rows sum to 1
    return z_nat, z_adv, r_nat, r_adv, targets


HP = {"trades_beta": 6.0, "clean_weight": 0.3, "prominence": "loss"}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", ["clean", "pgd", "fgsm_rs", "trades", "cure", "cure_paper"])
def test_every_methods_loss_with_a_soft_target_is_the_hand_formula(soft_batch, name, smoothing):
    z_nat, z_adv, _, _, t = soft_batch
    hp = {**HP, "label_smoothing_factor": smoothing}
    method = get_method("cure" if name == "cure_paper" else name)
    if name == "cure_paper":
        hp["prominence"] = "paper"
    loss, _ = method.loss(LossInputs(t, z_nat, z_adv), hp)
    zn, za, tn = z_nat.numpy(), z_adv.numpy(), t.numpy()
    ts = (1 - smoothing) * tn + smoothing / C  # PyTorch's smoothing of a soft target
    expected = {
        "clean": _soft_ce(zn, ts),
        "pgd": _soft_ce(za, ts),
        "fgsm_rs": _soft_ce(za, ts),
        "trades": _soft_ce(zn, ts) + 6.0 * _kl(zn, za),
        "cure": 0.3 * _soft_ce(zn, ts) + 0.7 * _soft_ce(za, ts),
        "cure_paper": _soft_ce(zn, ts) + _kl(zn, za),
    }[name]
    assert float(loss) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_smoothing_a_mixed_target_in_the_loss_is_timms_smoothed_mixup_target():
    """label_smoothing_factor stays in the losses; on a mixed target it gives exactly the target timm's Mixup
    builds with label_smoothing (so the two compose as in timm)."""
    x = torch.rand(8, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    np.random.seed(0)
    _, unsmoothed = Mixup(mixup_alpha=0.8, label_smoothing=0.0, num_classes=C)(x.clone(), y)
    np.random.seed(0)
    _, timm_smoothed = Mixup(mixup_alpha=0.8, label_smoothing=0.1, num_classes=C)(x.clone(), y)
    z = torch.randn(8, C, generator=torch.Generator().manual_seed(1))
    ours, _ = get_method("pgd").loss(LossInputs(unsmoothed, None, z), {"label_smoothing_factor": 0.1})
    assert float(ours) == pytest.approx(_soft_ce(z.double().numpy(), timm_smoothed.double().numpy()), rel=1e-6)


def test_mart_refuses_soft_targets_in_its_loss_and_at_construction(soft_batch, tmp_path):
    z_nat, z_adv, _, _, t = soft_batch
    with pytest.raises(ValueError, match="class indices"):
        mart_loss(z_nat, z_adv, t, beta=6.0)
    with pytest.raises(ValueError, match=r"mixup_alpha=0.4 is invalid.*adv_method='mart'.*one true class"):
        _args(tmp_path, adv_method="mart", mixup_alpha=0.4)


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, C)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _ce_input_gradient_sign(model, x, t):
    """sign of d/dx sum_i CE(Wx_i + b, t_i) = W^T (softmax(z_i) - t_i), in numpy."""
    w = model.fc.weight.detach().double().numpy()
    b = model.fc.bias.detach().double().numpy()
    flat = x.double().flatten(1).numpy()
    p = _softmax(flat @ w.T + b)
    return np.sign((p - t.double().numpy()) @ w).reshape(x.shape)


def test_the_ce_attack_ascends_the_soft_cross_entropy():
    torch.manual_seed(0)
    model, x = _Linear(), torch.rand(4, 3, 4, 4) * 0.8 + 0.1
    t = torch.softmax(torch.randn(4, C) * 3, dim=1)
    eps = step = 0.05
    settings = AttackSettings(eps=eps, step_size=step, steps=1, random_start=False)
    x_adv = PGDAT.attack.craft(model, x, t, settings)
    expected = np.clip(x.double().numpy() + step * _ce_input_gradient_sign(model, x, t), 0, 1)
    np.testing.assert_allclose(x_adv.double().numpy(), expected, atol=1e-6)
    # and it is not the attack on the target's most likely class: the whole target reaches the attack
    assert not torch.equal(PGDAT.attack.craft(model, x, t.argmax(1), settings), x_adv)


def test_fgsm_rs_ascends_the_soft_cross_entropy_from_its_uniform_start():
    torch.manual_seed(0)
    model, x = _Linear(), torch.rand(4, 3, 4, 4) * 0.8 + 0.1
    t = torch.softmax(torch.randn(4, C) * 3, dim=1)
    eps = 0.04
    torch.manual_seed(7)
    x_adv = get_method("fgsm_rs").attack.craft(model, x, t, AttackSettings(eps=eps, step_size=0.0, steps=1))
    torch.manual_seed(7)
    start = (x + eps * (torch.rand(x.shape) * 2 - 1)).clamp(0, 1)  # the uniform start, same draws
    moved = start.double().numpy() + 1.25 * eps * _ce_input_gradient_sign(model, start, t)
    xd = x.double().numpy()
    expected = np.clip(np.clip(moved, xd - eps, xd + eps), 0, 1)
    np.testing.assert_allclose(x_adv.double().numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["trades", "cure"])
def test_the_kl_attack_does_not_read_the_target(name):
    """TRADES' and CURE's attack ascends KL(clean || adversarial): the same with a soft and a hard target."""
    torch.manual_seed(0)
    model, x = _Linear(), torch.rand(4, 3, 4, 4)
    t = torch.softmax(torch.randn(4, C) * 3, dim=1)
    settings = AttackSettings(eps=0.03, step_size=0.01, steps=3)
    spec = get_method(name).attack
    torch.manual_seed(1)
    soft = spec.craft(model, x, t, settings)
    torch.manual_seed(1)
    hard = spec.craft(model, x, t.argmax(1), settings)
    assert torch.equal(soft, hard)


def test_the_margin_objective_refuses_a_soft_target():
    with pytest.raises(ValueError, match="margin_loss needs class indices"):
        margin_loss(torch.randn(4, C), torch.full((4, C), 1.0 / C))
    with pytest.raises(ValueError, match="margin_loss needs class indices"):
        pgd(_Linear(), torch.rand(2, 3, 4, 4), torch.full((2, C), 0.2), eps=0.1, step_size=0.1, steps=1, loss="margin")


# ------------------------------------------------------------------------------------------- through the trainer
def _args(tmp_path, **kwargs):
    return tiny_run_arguments(tmp_path, **{"dataloader_drop_last": True, **kwargs})  # mixup needs full batches


@pytest.fixture(scope="module")
def train_set():
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(32))
    train.set_transform(image_transform(16, train=False))
    return train


def _one_batch(train_set):
    from cure_hf.data import collate_pixels

    return collate_pixels([train_set[i] for i in range(8)])


MIXES = {
    "mixup": dict(mixup_alpha=0.8),
    "cutmix": dict(cutmix_alpha=1.0),
    "both_elem": dict(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_mode="elem", mixup_prob=0.7, mixup_switch_prob=0.3),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("name", ["pgd", "trades", "cure"])
def test_the_attack_and_the_loss_receive_timms_mixed_batch_and_soft_target(tmp_path, train_set, name, mix, monkeypatch):
    """Pass-through spies on the attack and on the method's loss; the reference is timm's Mixup called on the same
    batch with the same numpy seed."""
    args = _args(tmp_path, adv_method=name, label_smoothing_factor=0.1, **MIXES[mix])
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train_set)
    seen = {}
    method = trainer.method
    craft, loss = type(method.attack).craft, type(method).loss

    def spy_craft(spec, model, x, labels, settings, **kw):
        seen["attack"] = (x.clone(), labels.clone())
        return craft(spec, model, x, labels, settings, **kw)

    def spy_loss(self, inputs, hp):
        seen["loss"] = (inputs.labels.clone(), hp["label_smoothing_factor"])
        return loss(self, inputs, hp)

    monkeypatch.setattr(type(method.attack), "craft", spy_craft)
    monkeypatch.setattr(type(method), "loss", spy_loss)
    batch = _one_batch(train_set)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets for each step
    np.random.seed(11)
    trainer.training_step(trainer.model, dict(batch))
    np.random.seed(11)
    options = MIXES[mix]
    reference = Mixup(
        mixup_alpha=options.get("mixup_alpha", 0.0),
        cutmix_alpha=options.get("cutmix_alpha", 0.0),
        mode=options.get("mixup_mode", "batch"),
        switch_prob=options.get("mixup_switch_prob", 0.5),
        prob=options.get("mixup_prob", 1.0),
        label_smoothing=0.0,
        num_classes=10,
    )
    x_ref, t_ref = reference(batch["pixel_values"].clone(), batch["labels"].clone())
    x_attacked, t_attacked = seen["attack"]
    assert torch.equal(x_attacked, x_ref) and torch.equal(t_attacked, t_ref)
    assert not torch.equal(x_ref, batch["pixel_values"])  # the batch really was mixed
    t_loss, smoothing = seen["loss"]
    assert torch.equal(t_loss, t_ref) and smoothing == 0.1  # smoothed in the loss, once
    assert torch.allclose(t_ref.sum(1), torch.ones(8)) and t_ref.shape == (8, 10)
    assert torch.equal(batch["labels"], _one_batch(train_set)["labels"])  # the loader's tensors are not written


def test_a_run_with_mixup_resumes_bit_identical(tmp_path, train_set):
    """Mixup draws from numpy's global generator, which the Trainer's checkpoint keeps."""

    def run(folder, resume=None, callbacks=None):
        args = _args(folder, adv_method="trades", max_steps=4, mixup_alpha=0.8, cutmix_alpha=1.0, save_strategy="steps")
        args.save_steps = 2
        trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train_set, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", callbacks=[stop_after_save(2)])
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_mixup_settings_are_on_the_card_and_in_the_resume_check(tmp_path, train_set):
    from cure_hf.components import method_argument_names

    args = _args(tmp_path, adv_method="pgd", cutmix_alpha=1.0, mixup_prob=0.5)
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train_set)
    hyperparameters = trainer.model_card_info()["hyperparameters"]
    assert hyperparameters["cutmix_alpha"] == 1.0 and hyperparameters["mixup_prob"] == 0.5
    assert {"mixup_alpha", "cutmix_alpha", "mixup_prob", "mixup_mode"} <= set(method_argument_names(args))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(mixup_alpha=-0.1), r"mixup_alpha=-0.1 is invalid.*a Beta\(alpha, alpha\) alpha >= 0 \(0: off\)"),
        (dict(cutmix_alpha=float("inf")), r"cutmix_alpha=inf is invalid.*a Beta\(alpha, alpha\) alpha >= 0"),
        (dict(mixup_alpha=0.5, mixup_prob=1.5), r"mixup_prob=1.5 is invalid.*a probability in \[0, 1\]"),
        (dict(mixup_alpha=0.5, mixup_switch_prob=-0.5), r"mixup_switch_prob=-0.5 is invalid.*a probability in"),
        (
            dict(mixup_alpha=0.5, mixup_mode="pairs"),
            r"mixup_mode='pairs' is invalid.*one of \('batch', 'pair', 'elem'\)",
        ),
        (dict(mixup_prob=0.5), r"mixup_prob=0.5 is invalid with adv_method='pgd'.*silently ignored"),
        (
            dict(mixup_alpha=0.5, per_device_train_batch_size=7),
            r"^mixup_alpha=0.5 is invalid: .*even batch.*per_device_train_batch_size=7.*Fix: use an even "
            r"per_device_train_batch_size and dataloader_drop_last=True$",
        ),
        (dict(cutmix_alpha=1.0, dataloader_drop_last=False), r"^cutmix_alpha=1.0 is invalid: .*drop_last=False"),
    ],
)
def test_mixup_arguments_are_checked(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, adv_method="pgd", **changes)


class _HardLabelPairing(AdversarialMethod):
    name, title = "hard_label_pairing", "hard-label pairing"
    attack = AttackSpec("pgd", "ce", "uniform")

    def loss(self, inputs, hp):
        return nn.functional.cross_entropy(inputs.z_adv, inputs.labels), {}


class _MarginMethod(_HardLabelPairing):
    name, title = "margin_method", "margin method"
    attack = AttackSpec("pgd", "margin", "uniform")
    soft_targets = True


@pytest.mark.parametrize(
    "method, message",
    [
        (
            _HardLabelPairing,
            r"^cutmix_alpha=0.4 is invalid: .*does not take them: its loss reads class indices. Fix: drop "
            r"mixup_alpha/cutmix_alpha \(label_smoothing_factor keeps hard labels\), or use a method whose loss takes "
            r"soft targets \(clean, pgd, fgsm_rs, trades, cure; a method of yours: soft_targets = True\)$",
        ),
        (
            _MarginMethod,
            r"^cutmix_alpha=0.4 is invalid: adv_method='margin_method' attacks the margin of the true class, and a "
            r"mixed target has two. Fix: drop mixup_alpha/cutmix_alpha, or use a method whose attack ascends CE or KL$",
        ),
    ],
)
def test_a_method_of_yours_gets_soft_targets_only_when_it_says_so(tmp_path, method, message):
    register_method(method, replace=True)
    try:
        with pytest.raises(ValueError, match=message):
            _args(tmp_path, adv_method=method.name, cutmix_alpha=0.4)
        _args(tmp_path, adv_method=method.name)  # without mixup it trains on class indices
    finally:
        methods_module._REGISTRY.pop(method.name, None)


def test_an_odd_batch_at_run_time_is_refused_with_the_fix(tmp_path, train_set):
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, adv_method="pgd", mixup_alpha=0.4), train_dataset=train_set
    )
    batch = _one_batch(train_set)
    odd = {k: v[:7] for k, v in batch.items()}
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(ValueError, match=r"batch of 7 examples.*Fix: an even per_device_train_batch_size with "):
        trainer.training_step(trainer.model, odd)


@pytest.mark.parametrize(
    "name, extra",
    [
        ("clean", dict(conservation="soft", revision=True, weight_averaging="0.9")),
        (
            "pgd",
            dict(conservation="hard", revision=True, awp_gamma="5e-3", awp_warmup_epochs=0, weight_averaging="0.9"),
        ),
        ("fgsm_rs", dict(awp_gamma="5e-3", awp_warmup_epochs=0)),
        ("trades", dict(conservation="soft", revision=True, awp_gamma="5e-3", awp_warmup_epochs=0)),
        ("cure", dict(prominence="paper", clean_weight=0.3, weight_averaging="0.9")),
        (
            "cure",
            dict(
                natural_warmup_epochs=0.25, max_steps=-1, num_train_epochs=0.75, awp_gamma="5e-3", awp_warmup_epochs=0
            ),
        ),
    ],
)
def test_every_method_trains_with_mixup_and_the_components(tmp_path, train_set, name, extra):
    """Every method that takes soft targets, with the components on (the paper's prominence reads the soft target
    in its cross-entropy gradients; the efficient variant mixes its clean warm-up steps too)."""
    extra = {"max_steps": 3, **extra}  # 32 examples at batch 8: 3 steps are 0.75 epochs
    args = _args(tmp_path, adv_method=name, mixup_alpha=0.8, cutmix_alpha=1.0, logging_steps=1, **extra)
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train_set)
    assert trainer.components[1].name == "mixup"  # after the divergence guard, before everything that reads the batch
    trainer.train()
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_mixup_without_a_class_count_says_how_to_give_one(tmp_path):
    model = make_tiny_model()
    model.model.num_classes = None  # declares no class count, and there is no data to probe it on
    with pytest.raises(
        ValueError,
        match=r"^mixup/cutmix need the number of classes for their soft targets, and the model declares none and "
        r"could not be probed on a training example. Fix: give the model num_classes \(timm\) or config.num_labels "
        r"\(transformers\), or train on a dataset whose first example can be read$",
    ):
        CURETrainer(model, _args(tmp_path, adv_method="pgd", mixup_alpha=0.4))


@pytest.mark.parametrize("probabilities", [dict(mixup_prob=0.0, mixup_switch_prob=0.0), dict(mixup_switch_prob=1.0)])
def test_mixup_probabilities_at_their_bounds_are_accepted(tmp_path, probabilities):
    args = _args(tmp_path, adv_method="pgd", mixup_alpha=0.5, cutmix_alpha=1.0, **probabilities)
    assert all(getattr(args, k) == v for k, v in probabilities.items())
