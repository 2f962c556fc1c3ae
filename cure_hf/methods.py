"""The training methods: one table that says, per method, which attack crafts its adversarial batch,
which forward passes it needs, its loss and its paper.

A loss reads the logits of the clean batch (``z_nat``), the adversarial batch (``z_adv``) and, for CURE,
the revision model's logits on both (``r_nat``, ``r_adv``), and returns ``(loss, parts)``; ``parts`` are
detached scalars for logging.

Label smoothing (``TrainingArguments.label_smoothing_factor``) applies to the cross-entropy terms against
the labels, and only to them: the clean CE of natural training, TRADES and CURE, the adversarial CE of
PGD-AT, FGSM-RS and CURE, and the CE part of MART's boosted CE. The KL terms (TRADES' robustness term,
MART's weighted KL, CURE's consistency) compare two distributions of the model's own and stay unsmoothed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .attacks import fgsm_rs, kl_divergence, pgd

__all__ = [
    "Method",
    "METHODS",
    "LossInputs",
    "AttackSettings",
    "warmed_up_attack",
    "method_loss",
    "smoothed_cross_entropy",
    "clean_loss",
    "pgd_at_loss",
    "trades_loss",
    "mart_loss",
    "cure_loss",
    "cure_paper_loss",
]

Parts = Dict[str, torch.Tensor]


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy in fp32 against labels smoothed by ``smoothing`` (PyTorch's definition)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def clean_loss(z_nat: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    loss = smoothed_cross_entropy(z_nat, labels, smoothing)
    return loss, {"ce_nat": loss.detach()}


def pgd_at_loss(z_adv: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """Madry et al.: cross-entropy on the adversarial batch only."""
    loss = smoothed_cross_entropy(z_adv, labels, smoothing)
    return loss, {"ce_adv": loss.detach()}


def trades_loss(z_nat, z_adv, labels, beta: float, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """Zhang et al.: CE(z_nat, y) + beta * KL(softmax z_nat || softmax z_adv)."""
    ce = smoothed_cross_entropy(z_nat, labels, smoothing)
    kl = kl_divergence(z_adv, z_nat)
    return ce + beta * kl, {"ce_nat": ce.detach(), "kl_adv": kl.detach()}


def mart_loss(z_nat, z_adv, labels, beta: float, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """Wang et al. (MART): boosted CE on the adversarial batch + beta * KL weighted by (1 - p_true(x))."""
    z_nat, z_adv = z_nat.float(), z_adv.float()
    adv_probs = F.softmax(z_adv, dim=1)
    top2 = adv_probs.argsort(dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
    boosted_ce = smoothed_cross_entropy(z_adv, labels, smoothing) + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), runner_up)
    nat_probs = F.softmax(z_nat, dim=1)
    true_probs = nat_probs.gather(1, labels[:, None]).squeeze(1)
    kl_per_example = (nat_probs * (torch.log(nat_probs + 1e-12) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    robust = (kl_per_example * (1.0000001 - true_probs)).mean()
    return boosted_ce + beta * robust, {"ce_adv": boosted_ce.detach(), "kl_adv": robust.detach()}


def _consistency(z_nat, z_adv, r_nat, r_adv) -> torch.Tensor:
    """The revision term: KL(softmax r_nat || softmax z_nat) + KL(softmax r_adv || softmax z_adv)."""
    return kl_divergence(z_nat, r_nat) + kl_divergence(z_adv, r_adv)


def cure_loss(z_nat, z_adv, r_nat, r_adv, labels, alpha: float, gamma: float,
              smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """The released code: alpha * CE_nat + (1 - alpha) * CE_adv + gamma * consistency."""
    ce_nat = smoothed_cross_entropy(z_nat, labels, smoothing)
    ce_adv = smoothed_cross_entropy(z_adv, labels, smoothing)
    consistency = _consistency(z_nat, z_adv, r_nat, r_adv)
    loss = alpha * ce_nat + (1.0 - alpha) * ce_adv + gamma * consistency
    return loss, {"ce_nat": ce_nat.detach(), "ce_adv": ce_adv.detach(), "consistency": consistency.detach()}


def cure_paper_loss(z_nat, z_adv, r_nat, r_adv, labels, gamma: float,
                    smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """The paper: TRADES with beta = 1, CE_nat + KL(z_nat || z_adv), plus gamma * consistency."""
    ce_nat = smoothed_cross_entropy(z_nat, labels, smoothing)
    kl = kl_divergence(z_adv, z_nat)
    consistency = _consistency(z_nat, z_adv, r_nat, r_adv)
    loss = ce_nat + kl + gamma * consistency
    return loss, {"ce_nat": ce_nat.detach(), "kl_adv": kl.detach(), "consistency": consistency.detach()}


@dataclass(frozen=True)
class LossInputs:
    """Everything a method's loss may read: the logits of one step and the hyperparameters from the arguments."""

    labels: torch.Tensor
    z_nat: Optional[torch.Tensor] = None
    z_adv: Optional[torch.Tensor] = None
    r_nat: Optional[torch.Tensor] = None
    r_adv: Optional[torch.Tensor] = None
    beta: float = 6.0
    alpha: float = 0.1
    gamma: float = 1.0
    prominence: str = "loss"
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class AttackSettings:
    """The training attack's budget, from the arguments."""

    eps: float
    step_size: float
    steps: int
    random_start: bool = True


def warmed_up_attack(settings: AttackSettings, epoch: float, warmup_epochs: float) -> AttackSettings:
    """``attack_warmup_epochs``: eps and step size times min(1, epoch / warmup_epochs), the number of steps kept.

    The step shrinks with eps so that the attack keeps its shape (steps x step / eps) while the ball grows.
    """
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return settings
    fraction = max(0.0, float(epoch)) / warmup_epochs
    return replace(settings, eps=settings.eps * fraction, step_size=settings.step_size * fraction)


def _craft_pgd(loss: str, init: str) -> Callable:
    def craft(model, x, labels, settings: AttackSettings, clean_logits=None, pgd_fn: Callable = pgd):
        """``pgd_fn``: ``attacks.pgd`` or a drop-in with its signature (e.g. a CUDA-graph replay of the K steps)."""
        return pgd_fn(model, x, labels, eps=settings.eps, step_size=settings.step_size, steps=settings.steps,
                      loss=loss, init=init if settings.random_start else "none", clean_logits=clean_logits)

    return craft


def _craft_fgsm_rs(model, x, labels, settings: AttackSettings, clean_logits=None, pgd_fn: Callable = pgd):
    return fgsm_rs(model, x, labels, eps=settings.eps)


def _cure_step_loss(i: LossInputs) -> Tuple[torch.Tensor, Parts]:
    if i.prominence == "paper":
        return cure_paper_loss(i.z_nat, i.z_adv, i.r_nat, i.r_adv, i.labels, i.gamma, i.label_smoothing)
    return cure_loss(i.z_nat, i.z_adv, i.r_nat, i.r_adv, i.labels, i.alpha, i.gamma, i.label_smoothing)


CURE_CITATION = (
    "@inproceedings{gowda2024conserve,\n  title={Conserve-Update-Revise to Cure Generalization and Robustness "
    "Trade-off in Adversarial Training},\n  author={Gowda, Shruthi and Zonooz, Bahram and Arani, Elahe},\n"
    "  booktitle={International Conference on Learning Representations},\n  year={2024}\n}"
)
PGD_AT_CITATION = (
    "@inproceedings{madry2018towards,\n  title={Towards Deep Learning Models Resistant to Adversarial Attacks},\n"
    "  author={Madry, Aleksander and Makelov, Aleksandar and Schmidt, Ludwig and Tsipras, Dimitris and Vladu, "
    "Adrian},\n  booktitle={International Conference on Learning Representations},\n  year={2018}\n}"
)
TRADES_CITATION = (
    "@inproceedings{zhang2019theoretically,\n  title={Theoretically Principled Trade-off between Robustness and "
    "Accuracy},\n  author={Zhang, Hongyang and Yu, Yaodong and Jiao, Jiantao and Xing, Eric and El Ghaoui, Laurent "
    "and Jordan, Michael},\n  booktitle={International Conference on Machine Learning},\n  year={2019}\n}"
)
MART_CITATION = (
    "@inproceedings{wang2020improving,\n  title={Improving Adversarial Robustness Requires Revisiting Misclassified "
    "Examples},\n  author={Wang, Yisen and Zou, Difan and Yi, Jinfeng and Bailey, James and Ma, Xingjun and Gu, "
    "Quanquan},\n  booktitle={International Conference on Learning Representations},\n  year={2020}\n}"
)
FGSM_RS_CITATION = (
    "@inproceedings{wong2020fast,\n  title={Fast is better than free: Revisiting adversarial training},\n"
    "  author={Wong, Eric and Rice, Leslie and Kolter, J. Zico},\n"
    "  booktitle={International Conference on Learning Representations},\n  year={2020}\n}"
)


@dataclass(frozen=True)
class Method:
    """A training method: which attack crafts the adversarial batch, which passes it needs, its loss, its paper."""

    name: str
    title: str  # as people write it: "PGD-AT", "TRADES", ...
    attack: Optional[str]  # "pgd_ce", "pgd_kl", "fgsm_rs" or None (clean training)
    attack_init: str  # random start of the attack: "uniform", "normal" or "none"
    uses_clean_pass: bool
    uses_revision: bool
    craft: Optional[Callable]  # craft(model, x, labels, AttackSettings, clean_logits=None, pgd_fn=pgd) -> x_adv
    loss: Callable[[LossInputs], Tuple[torch.Tensor, Parts]]
    citation: Optional[str] = None  # BibTeX of the method's paper (the model card cites it)
    paper_id: Optional[str] = None  # arXiv id


METHODS: Dict[str, Method] = {
    m.name: m for m in (
        Method("clean", "natural training", None, "none", True, False, None,
               lambda i: clean_loss(i.z_nat, i.labels, i.label_smoothing)),
        Method("pgd", "PGD-AT", "pgd_ce", "uniform", False, False, _craft_pgd("ce", "uniform"),
               lambda i: pgd_at_loss(i.z_adv, i.labels, i.label_smoothing), PGD_AT_CITATION, "1706.06083"),
        Method("trades", "TRADES", "pgd_kl", "normal", True, False, _craft_pgd("kl", "normal"),
               lambda i: trades_loss(i.z_nat, i.z_adv, i.labels, i.beta, i.label_smoothing), TRADES_CITATION,
               "1901.08573"),
        Method("mart", "MART", "pgd_ce", "normal", True, False, _craft_pgd("ce", "normal"),
               lambda i: mart_loss(i.z_nat, i.z_adv, i.labels, i.beta, i.label_smoothing), MART_CITATION, None),
        Method("fgsm_rs", "FGSM-RS", "fgsm_rs", "uniform", False, False, _craft_fgsm_rs,
               lambda i: pgd_at_loss(i.z_adv, i.labels, i.label_smoothing), FGSM_RS_CITATION, "2001.03994"),
        Method("cure", "CURE", "pgd_kl", "normal", True, True, _craft_pgd("kl", "normal"), _cure_step_loss,
               CURE_CITATION, "2401.14948"),
    )
}


def method_loss(method: str, labels: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, Parts]:
    """The loss of ``method`` from keyword logits and hyperparameters (the fields of :class:`LossInputs`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method].loss(LossInputs(labels=labels, **kwargs))
