"""Label smoothing (`TrainingArguments.label_smoothing_factor`): every method's loss against a numpy oracle written
out per example, the constructor with a timm and a transformers model, and a spy that the factor reaches the loss.

Smoothing applies to the cross-entropy terms against the labels only: (1 - s) * (-log p_y) + s * mean_k(-log p_k)
per example; the KL terms (TRADES, MART, CURE's consistency) compare two distributions of the model's own.
"""

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.methods import method_loss

BETA, ALPHA, GAMMA = 6.0, 0.1, 1.0


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _smoothed_ce(z: np.ndarray, y: np.ndarray, s: float) -> float:
    log_p = _log_softmax(z)
    per_example = [(1 - s) * -log_p[i, y[i]] + s * np.mean(-log_p[i]) for i in range(len(y))]
    return float(np.mean(per_example))


def _kl(teacher: np.ndarray, student: np.ndarray) -> float:
    """KL(softmax teacher || softmax student), summed over classes, averaged over the batch."""
    log_t, log_s = _log_softmax(teacher), _log_softmax(student)
    return float(np.mean([np.sum(np.exp(log_t[i]) * (log_t[i] - log_s[i])) for i in range(len(teacher))]))


def _mart(z_nat, z_adv, y, s) -> float:
    p_adv, p_nat = np.exp(_log_softmax(z_adv)), np.exp(_log_softmax(z_nat))
    boosted = _smoothed_ce(z_adv, y, s)
    for i in range(len(y)):
        order = np.argsort(p_adv[i])
        runner_up = order[-2] if order[-1] == y[i] else order[-1]
        boosted += -np.log(1.0001 - p_adv[i, runner_up] + 1e-12) / len(y)
    kl = [np.sum(p_nat[i] * (np.log(p_nat[i] + 1e-12) - np.log(p_adv[i] + 1e-12))) for i in range(len(y))]
    robust = np.mean([kl[i] * (1.0000001 - p_nat[i, y[i]]) for i in range(len(y))])
    return boosted + BETA * robust


ORACLES = {
    "clean": lambda z, s: _smoothed_ce(z["z_nat"], z["y"], s),
    "pgd": lambda z, s: _smoothed_ce(z["z_adv"], z["y"], s),
    "fgsm_rs": lambda z, s: _smoothed_ce(z["z_adv"], z["y"], s),
    "trades": lambda z, s: _smoothed_ce(z["z_nat"], z["y"], s) + BETA * _kl(z["z_nat"], z["z_adv"]),
    "mart": lambda z, s: _mart(z["z_nat"], z["z_adv"], z["y"], s),
    "cure": lambda z, s: (
        ALPHA * _smoothed_ce(z["z_nat"], z["y"], s)
        + (1 - ALPHA) * _smoothed_ce(z["z_adv"], z["y"], s)
        + GAMMA * (_kl(z["r_nat"], z["z_nat"]) + _kl(z["r_adv"], z["z_adv"]))
    ),
    "cure_paper": lambda z, s: (
        _smoothed_ce(z["z_nat"], z["y"], s)
        + _kl(z["z_nat"], z["z_adv"])
        + GAMMA * (_kl(z["r_nat"], z["z_nat"]) + _kl(z["r_adv"], z["z_adv"]))
    ),
}


@pytest.fixture(scope="module")
def logits():
    generator = torch.Generator().manual_seed(0)
    tensors = {name: 3 * torch.randn(16, 10, generator=generator) for name in ("z_nat", "z_adv", "r_nat", "r_adv")}
    tensors["y"] = torch.randint(0, 10, (16,), generator=generator)
    return tensors


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("method", sorted(ORACLES))
def test_each_method_loss_matches_the_smoothed_formula(logits, method, smoothing):
    name, prominence = ("cure", "paper") if method == "cure_paper" else (method, "loss")
    loss, _ = method_loss(
        name,
        logits["y"],
        z_nat=logits["z_nat"],
        z_adv=logits["z_adv"],
        r_nat=logits["r_nat"],
        r_adv=logits["r_adv"],
        beta=BETA,
        alpha=ALPHA,
        gamma=GAMMA,
        prominence=prominence,
        label_smoothing=smoothing,
    )
    expected = ORACLES[method]({k: v.double().numpy() if k != "y" else v.numpy() for k, v in logits.items()}, smoothing)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if smoothing:  # the factor changes the loss: not silently ignored
        assert (
            abs(
                expected
                - ORACLES[method]({k: v.double().numpy() if k != "y" else v.numpy() for k, v in logits.items()}, 0.0)
            )
            > 1e-3
        )


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        attack_steps=1,
        label_smoothing_factor=0.1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    kwargs.update(overrides)
    return CURETrainingArguments(**kwargs)


def test_constructor_keeps_the_factor_with_a_timm_and_a_transformers_model(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    for model in (make_tiny_model("test_resnet"), ViTForImageClassification(config)):
        args = _args(tmp_path)
        trainer = CURETrainer(model, args)
        assert trainer.args.label_smoothing_factor == 0.1  # restored after the Trainer's own set-up
        assert trainer.label_smoother is None  # the Trainer's smoother (needs model.config) stays unused


@pytest.fixture(scope="module")
def tiny_train():
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(8))
    train.set_transform(image_transform(16, train=False))
    return train


@pytest.mark.parametrize(
    "method", ["clean", "pgd", "trades", "mart", "fgsm_rs", "cure", "cure_paper", "natural_warmup"]
)
def test_the_factor_reaches_every_cross_entropy_from_the_trainer(tmp_path, tiny_train, monkeypatch, method, one_thread):
    import cure_hf.components
    import cure_hf.methods

    calls = []
    original = cure_hf.methods.smoothed_cross_entropy

    def spy(logits, labels, smoothing=0.0):
        calls.append(smoothing)
        return original(logits, labels, smoothing)

    monkeypatch.setattr(cure_hf.methods, "smoothed_cross_entropy", spy)
    monkeypatch.setattr(cure_hf.components, "smoothed_cross_entropy", spy)  # the paper's prominence
    overrides = {"adv_method": method}
    if method == "cure_paper":
        overrides = {"adv_method": "cure", "prominence": "paper"}
    if method == "natural_warmup":
        overrides = {"adv_method": "cure", "natural_warmup_epochs": 1.0, "max_steps": -1, "num_train_epochs": 1}
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path, **overrides), train_dataset=tiny_train)
    trainer.train()
    expected_calls = {"cure": 2, "cure_paper": 3}.get(method, 1)  # per optimizer step
    assert calls and all(s == 0.1 for s in calls)
    assert len(calls) == expected_calls * trainer.state.global_step
