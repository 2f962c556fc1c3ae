"""Each method's loss against a direct, per-example computation on a fixed batch."""

import math

import pytest
import torch

from cure_hf.methods import METHODS, method_loss

B, C = 6, 4


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    make = lambda: torch.randn(B, C, generator=g) * 2  # noqa: E731
    return dict(z_nat=make(), z_adv=make(), r_nat=make(), r_adv=make(), labels=torch.tensor([0, 1, 2, 3, 0, 1]))


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _ce(z, y):
    return sum(-math.log(_softmax(z[i].tolist())[y[i]]) for i in range(len(y))) / len(y)


def _kl(teacher, student):
    """KL(softmax teacher || softmax student), summed over classes, averaged over the batch."""
    total = 0.0
    for t, s in zip(teacher.tolist(), student.tolist()):
        p, q = _softmax(t), _softmax(s)
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    return total / len(teacher)


def test_clean(logits):
    loss, _ = method_loss("clean", logits["labels"], z_nat=logits["z_nat"])
    assert loss.item() == pytest.approx(_ce(logits["z_nat"], logits["labels"]), rel=1e-5)


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs"])
def test_pgd_and_fgsm(logits, method):
    loss, _ = method_loss(method, logits["labels"], z_adv=logits["z_adv"])
    assert loss.item() == pytest.approx(_ce(logits["z_adv"], logits["labels"]), rel=1e-5)


def test_trades(logits):
    y = logits["labels"]
    loss, parts = method_loss("trades", y, z_nat=logits["z_nat"], z_adv=logits["z_adv"], beta=6.0)
    expected = _ce(logits["z_nat"], y) + 6.0 * _kl(logits["z_nat"], logits["z_adv"])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["kl_adv"].item() == pytest.approx(_kl(logits["z_nat"], logits["z_adv"]), rel=1e-5)


def test_mart(logits):
    y, z_nat, z_adv = logits["labels"], logits["z_nat"], logits["z_adv"]
    boosted, robust = 0.0, 0.0
    for i in range(B):
        p_adv, p_nat = _softmax(z_adv[i].tolist()), _softmax(z_nat[i].tolist())
        wrong = max((p, k) for k, p in enumerate(p_adv) if k != y[i])[1]  # most likely wrong class
        boosted += -math.log(p_adv[y[i]]) - math.log(1.0001 - p_adv[wrong] + 1e-12)
        kl = sum(pn * (math.log(pn + 1e-12) - math.log(pa + 1e-12)) for pn, pa in zip(p_nat, p_adv))
        robust += kl * (1.0000001 - p_nat[y[i]])
    expected = boosted / B + 5.0 * robust / B
    loss, _ = method_loss("mart", y, z_nat=z_nat, z_adv=z_adv, beta=5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_cure_released_code(logits):
    y = logits["labels"]
    loss, parts = method_loss("cure", y, **{k: v for k, v in logits.items() if k != "labels"}, alpha=0.1, gamma=0.7)
    consistency = _kl(logits["r_nat"], logits["z_nat"]) + _kl(logits["r_adv"], logits["z_adv"])
    expected = 0.1 * _ce(logits["z_nat"], y) + 0.9 * _ce(logits["z_adv"], y) + 0.7 * consistency
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["consistency"].item() == pytest.approx(consistency, rel=1e-5)


def test_cure_paper_variant(logits):
    y = logits["labels"]
    loss, _ = method_loss(
        "cure", y, **{k: v for k, v in logits.items() if k != "labels"}, gamma=0.5, prominence="paper"
    )
    consistency = _kl(logits["r_nat"], logits["z_nat"]) + _kl(logits["r_adv"], logits["z_adv"])
    expected = _ce(logits["z_nat"], y) + _kl(logits["z_nat"], logits["z_adv"]) + 0.5 * consistency
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_flow_to_both_views_but_never_to_revision(logits):
    z_nat = logits["z_nat"].clone().requires_grad_(True)
    z_adv = logits["z_adv"].clone().requires_grad_(True)
    loss, _ = method_loss(
        "cure", logits["labels"], z_nat=z_nat, z_adv=z_adv, r_nat=logits["r_nat"], r_adv=logits["r_adv"]
    )
    loss.backward()
    assert z_nat.grad.abs().sum() > 0 and z_adv.grad.abs().sum() > 0


def test_registry_and_unknown_method(logits):
    from cure_hf.methods import AttackSpec

    assert {"clean", "pgd", "trades", "mart", "fgsm_rs", "cure"} <= set(METHODS)
    assert METHODS["cure"].attack == AttackSpec("pgd", "kl", "normal")
    assert METHODS["cure"].default_components == ("conservation", "revision")
    assert METHODS["clean"].attack is None and METHODS["fgsm_rs"].attack.kind == "fgsm"
    with pytest.raises(ValueError, match=r"adv_method='awp' is invalid: allowed one of \[.*'cure'"):
        method_loss("awp", logits["labels"], z_nat=logits["z_nat"])
