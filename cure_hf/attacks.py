"""Adversarial attacks in pixel space [0, 1] as pure functions.

Nothing here knows about the Trainer. Every attack:
- runs the model in eval mode (BatchNorm uses running statistics) and restores its mode,
- takes input gradients with ``torch.autograd.grad``, which accumulates nothing into ``.grad``,
- turns off parameter gradients while it runs: not needed against leaks (see above), but a model compiled with
  ``torch.compile`` otherwise computes every weight gradient in its compiled backward pass and throws them away
  (the compiled graphs for frozen and trainable parameters are both cached, so the switch costs no recompilation),
- makes no host synchronisation between its steps, so its K steps can be captured as one CUDA graph
  (``cure_hf.speed.GraphedAttack`` replays ``pgd_steps`` that way),
- returns a detached tensor inside the eps-ball around ``x`` and inside [0, 1].
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "logits_of",
    "attack_mode",
    "cross_entropy_loss",
    "kl_divergence",
    "margin_loss",
    "project_linf",
    "random_start",
    "clean_logits_of",
    "pgd",
    "pgd_steps",
    "fgsm_rs",
]


def logits_of(output) -> torch.Tensor:
    """Logits from a timm module (a tensor) or a transformers model (an output with ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the duration of an attack; both restored afterwards."""
    was_training = model.training
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)
        model.train(was_training)


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in fp32 against class indices (B,) or class probabilities (B, C) (mixup/cutmix targets)."""
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "batchmean"
) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)), summed over classes; "batchmean" averages over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=1),
        F.softmax(teacher_logits.float(), dim=1),
        reduction=reduction,
    )


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Carlini-Wagner margin: best wrong logit minus the true logit (positive means misclassified)."""
    if labels.dim() != 1:
        raise ValueError(
            f"margin_loss needs class indices (B,), got labels of shape {tuple(labels.shape)} (soft targets): the "
            "margin is that of one true class"
        )
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    # A comparison, not F.one_hot: one_hot reads the labels' range back to the host on CPU tensors.
    is_true = labels[:, None] == torch.arange(logits.shape[1], device=logits.device)
    wrong = logits.masked_fill(is_true, float("-inf")).amax(dim=1)
    margin = wrong - true
    return margin.sum() if reduction == "sum" else margin.mean() if reduction == "mean" else margin


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Closest point to ``x_adv`` inside the L-inf eps-ball around ``x`` and inside [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, init: str, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The attack's starting point: ``x`` ("none"), uniform in the eps-ball ("uniform"), or x + 0.001 N(0, I) ("normal")."""
    if init == "none":
        return x.clone()
    if init == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return project_linf(x + eps * noise, x, eps)
    if init == "normal":  # TRADES/CURE: x + 0.001 * N(0, I)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return project_linf(x + 0.001 * noise, x, eps)
    raise ValueError(f"init={init!r} is not one of 'uniform', 'normal', 'none'")


_random_start = random_start  # the name before it was public


def _attack_objective(logits, labels, clean_logits, loss: str) -> torch.Tensor:
    # Summed over the batch, so each example's step does not depend on the batch size.
    if loss == "ce":
        return cross_entropy_loss(logits, labels, reduction="sum")
    if loss == "kl":
        return kl_divergence(logits, clean_logits, reduction="sum")
    if loss == "margin":
        return margin_loss(logits, labels, reduction="sum")
    raise ValueError(f"loss={loss!r} is not one of 'ce', 'kl', 'margin'")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss: str = "ce",
    init: str = "uniform",
    clean_logits: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """L-inf projected gradient ascent on ``loss`` ("ce", "kl" as in TRADES, or "margin" as in CW-inf).

    For "kl" the clean logits are computed once (in eval mode) unless given.
    """
    if loss in ("ce", "margin") and labels is None:
        raise ValueError(f"pgd with loss={loss!r} needs labels")
    with attack_mode(model):
        x = x.detach()
        if loss == "kl" and clean_logits is None:
            clean_logits = clean_logits_of(model, x)
        if clean_logits is not None:
            clean_logits = clean_logits.detach()
        x_adv = random_start(x, eps, init, generator)
        x_adv = pgd_steps(
            model, x, x_adv, labels, eps=eps, step_size=step_size, steps=steps, loss=loss, clean_logits=clean_logits
        )
    return x_adv.detach()


def clean_logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``x`` without gradient: what the KL attack starts from."""
    with torch.no_grad():
        return logits_of(model(x)).detach()


def pgd_steps(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss: str = "ce",
    clean_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The K projected ascent steps of :func:`pgd` from ``x_adv``, nothing else.

    The caller owns the model's mode (``attack_mode``) and the random start. ``x_adv`` is read, never written, and
    nothing in the loop reads a value back to the host, so the loop can be captured and replayed as a CUDA graph.
    """
    for _ in range(steps):
        grad = _input_gradient(model, x_adv.detach().requires_grad_(True), labels, clean_logits, loss)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv


def _input_gradient(model, x_adv, labels, clean_logits, loss: str) -> torch.Tensor:
    """Gradient of the attack objective w.r.t. ``x_adv``, safe from fp16 underflow.

    Only its sign is used, so each example's gradient at the logits (computed in fp32) is first multiplied by
    the power of two that brings its largest entry into [0.5, 1). Under fp16 autocast the backward pass through
    the network then neither underflows (the TRADES KL gradient starts near 1e-3 and is far smaller on
    confidently classified examples) nor overflows. Power-of-two scaling is exact and examples are independent
    in eval mode, so in fp32 and bf16 the signs are those of the plain gradient.
    """
    with torch.enable_grad():
        logits = logits_of(model(x_adv)).float()
        objective = _attack_objective(logits, labels, clean_logits, loss)
        (grad_logits,) = torch.autograd.grad(objective, logits)
        peak = grad_logits.detach().abs().reshape(len(grad_logits), -1).amax(dim=1)
        exponent = torch.frexp(peak).exponent.clamp(-100, 100)  # peak = mantissa * 2**exponent, 0 -> 0
        scale = torch.ldexp(torch.ones_like(peak), -exponent).view(-1, *([1] * (grad_logits.dim() - 1)))
        (grad,) = torch.autograd.grad(logits, x_adv, grad_outputs=grad_logits * scale)
    return grad


def fgsm_rs(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    step_size: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """FGSM with a uniform random start ("Fast is better than free"); step defaults to 1.25 * eps."""
    return pgd(
        model,
        x,
        labels,
        eps=eps,
        step_size=1.25 * eps if step_size is None else step_size,
        steps=1,
        loss="ce",
        init="uniform",
        generator=generator,
    )
