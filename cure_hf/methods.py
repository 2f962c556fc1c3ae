"""One training objective per method, built from the blocks in ``attacks``.

A method says which attack crafts its adversarial batch and how its loss is computed from
the logits of the clean batch (``z_nat``), the adversarial batch (``z_adv``) and, for CURE,
the revision model's logits on both (``r_nat``, ``r_adv``). Losses return ``(loss, parts)``;
``parts`` are detached scalars for logging.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .attacks import cross_entropy_loss, kl_divergence

__all__ = [
    "Method",
    "METHODS",
    "clean_loss",
    "pgd_at_loss",
    "trades_loss",
    "mart_loss",
    "cure_loss",
    "cure_paper_loss",
]

Parts = Dict[str, torch.Tensor]


def clean_loss(z_nat: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Parts]:
    loss = cross_entropy_loss(z_nat, labels)
    return loss, {"ce_nat": loss.detach()}


def pgd_at_loss(z_adv: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Parts]:
    """Madry et al.: cross-entropy on the adversarial batch only."""
    loss = cross_entropy_loss(z_adv, labels)
    return loss, {"ce_adv": loss.detach()}


def trades_loss(z_nat, z_adv, labels, beta: float) -> Tuple[torch.Tensor, Parts]:
    """Zhang et al.: CE(z_nat, y) + beta * KL(softmax z_nat || softmax z_adv)."""
    ce = cross_entropy_loss(z_nat, labels)
    kl = kl_divergence(z_adv, z_nat)
    return ce + beta * kl, {"ce_nat": ce.detach(), "kl_adv": kl.detach()}


def mart_loss(z_nat, z_adv, labels, beta: float) -> Tuple[torch.Tensor, Parts]:
    """Wang et al. (MART): boosted CE on the adversarial batch + beta * KL weighted by (1 - p_true(x))."""
    z_nat, z_adv = z_nat.float(), z_adv.float()
    adv_probs = F.softmax(z_adv, dim=1)
    top2 = adv_probs.argsort(dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(z_adv, labels) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), runner_up)
    nat_probs = F.softmax(z_nat, dim=1)
    true_probs = nat_probs.gather(1, labels[:, None]).squeeze(1)
    kl_per_example = (nat_probs * (torch.log(nat_probs + 1e-12) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    robust = (kl_per_example * (1.0000001 - true_probs)).mean()
    return boosted_ce + beta * robust, {"ce_adv": boosted_ce.detach(), "kl_adv": robust.detach()}


def _consistency(z_nat, z_adv, r_nat, r_adv) -> torch.Tensor:
    """The revision term: KL(softmax r_nat || softmax z_nat) + KL(softmax r_adv || softmax z_adv)."""
    return kl_divergence(z_nat, r_nat) + kl_divergence(z_adv, r_adv)


def cure_loss(z_nat, z_adv, r_nat, r_adv, labels, alpha: float, gamma: float) -> Tuple[torch.Tensor, Parts]:
    """The released code: alpha * CE_nat + (1 - alpha) * CE_adv + gamma * consistency."""
    ce_nat = cross_entropy_loss(z_nat, labels)
    ce_adv = cross_entropy_loss(z_adv, labels)
    consistency = _consistency(z_nat, z_adv, r_nat, r_adv)
    loss = alpha * ce_nat + (1.0 - alpha) * ce_adv + gamma * consistency
    return loss, {"ce_nat": ce_nat.detach(), "ce_adv": ce_adv.detach(), "consistency": consistency.detach()}


def cure_paper_loss(z_nat, z_adv, r_nat, r_adv, labels, gamma: float) -> Tuple[torch.Tensor, Parts]:
    """The paper: TRADES with beta = 1, CE_nat + KL(z_nat || z_adv), plus gamma * consistency."""
    ce_nat = cross_entropy_loss(z_nat, labels)
    kl = kl_divergence(z_adv, z_nat)
    consistency = _consistency(z_nat, z_adv, r_nat, r_adv)
    loss = ce_nat + kl + gamma * consistency
    return loss, {"ce_nat": ce_nat.detach(), "kl_adv": kl.detach(), "consistency": consistency.detach()}


@dataclass(frozen=True)
class Method:
    """What a training method needs: which attack (None for clean training), which passes."""

    name: str
    attack: Optional[str]  # "pgd_ce", "pgd_kl", "fgsm_rs" or None
    attack_init: str  # random start of the attack: "uniform" or "normal"
    uses_clean_pass: bool
    uses_revision: bool


METHODS: Dict[str, Method] = {
    "clean": Method("clean", None, "none", True, False),
    "pgd": Method("pgd", "pgd_ce", "uniform", False, False),
    "trades": Method("trades", "pgd_kl", "normal", True, False),
    "mart": Method("mart", "pgd_ce", "normal", True, False),
    "fgsm_rs": Method("fgsm_rs", "fgsm_rs", "uniform", False, False),
    "cure": Method("cure", "pgd_kl", "normal", True, True),
}


def method_loss(
    method: str,
    labels: torch.Tensor,
    *,
    z_nat: Optional[torch.Tensor] = None,
    z_adv: Optional[torch.Tensor] = None,
    r_nat: Optional[torch.Tensor] = None,
    r_adv: Optional[torch.Tensor] = None,
    beta: float = 6.0,
    alpha: float = 0.1,
    gamma: float = 1.0,
    prominence: str = "loss",
) -> Tuple[torch.Tensor, Parts]:
    """Dispatch to the loss of ``method`` with the hyperparameters it uses."""
    if method == "clean":
        return clean_loss(z_nat, labels)
    if method in ("pgd", "fgsm_rs"):
        return pgd_at_loss(z_adv, labels)
    if method == "trades":
        return trades_loss(z_nat, z_adv, labels, beta)
    if method == "mart":
        return mart_loss(z_nat, z_adv, labels, beta)
    if method == "cure":
        if prominence == "paper":
            return cure_paper_loss(z_nat, z_adv, r_nat, r_adv, labels, gamma)
        return cure_loss(z_nat, z_adv, r_nat, r_adv, labels, alpha, gamma)
    raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
