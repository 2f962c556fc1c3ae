"""Adversarial weight perturbation (AWP; Wu, Xia and Wang, NeurIPS 2020) for every adversarial method.

Once per optimizer step, before the gradient of the update is computed:

1. a proxy copy of the model (its weights *and* BatchNorm buffers, so the model's own running statistics
   stay untouched, as in the reference code) computes the gradient g of the method's own training loss at
   the current weights w, on the batch and its adversarial examples;
2. every perturbed tensor gets v = gamma * ||w|| * g / ||g||: one normalised ascent step whose norm is gamma
   times the norm of that tensor (layer-wise). The perturbed tensors follow the reference's
   ``diff_in_weights``: parameters whose name contains "weight" and that have more than one dimension, i.e.
   conv and linear kernels (and embeddings); biases and the affine parameters of BatchNorm/LayerNorm are left
   alone. With plain SGD the reference's proxy step ``w + lr * g`` normalised to ``||w||`` is the same
   direction, so its proxy learning rate cancels out;
3. the update gradient is taken at w + v; :meth:`AdversarialWeightPerturbation.restore_` copies the saved w
   back right before the optimizer step (an optimizer pre-step hook), so the step moves exactly w, with the
   gradient taken at w + v. The reference subtracts v after the step instead, which leaves w + v - v + step:
   not bit-identical to w + step in floating point.

Under DDP every process must perturb the same way, so the proxy's gradient is averaged over the processes
(the batches differ per process; accelerate's ``reduce``) before v is formed.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "AdversarialWeightPerturbation",
    "perturbed_weights",
    "weight_perturbation",
    "averaged_over_processes",
]

# The reference's guard against a zero gradient (utils_awp.py: EPS = 1E-20).
_EPS = 1e-20


def perturbed_weights(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs AWP perturbs: trainable, more than one dimension, "weight" in the name."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1 and "weight" in n]


def weight_perturbation(
    weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], gamma: float
) -> List[torch.Tensor]:
    """v = gamma * ||w|| * g / (||g|| + 1e-20) per tensor (Frobenius norms), in fp32."""
    out = []
    for w, g in zip(weights, grads):
        w, g = w.detach().float(), g.detach().float()
        out.append(g * (gamma * w.norm() / (g.norm() + _EPS)))
    return out


def averaged_over_processes(tensors: Sequence[torch.Tensor], reduce: Optional[Callable] = None) -> List[torch.Tensor]:
    """``tensors`` averaged over the DDP processes in one collective, by ``reduce`` (accelerate's
    ``Accelerator.reduce``: ``reduce(tensor, reduction="mean")``); unchanged when ``reduce`` is None."""
    if reduce is None or not tensors:
        return list(tensors)
    flat = reduce(torch.cat([t.reshape(-1) for t in tensors]), reduction="mean")
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class AdversarialWeightPerturbation:
    """Perturbs a model's weights against a loss (:meth:`perturb_`) and puts them back exactly (:meth:`restore_`)."""

    def __init__(self, gamma: float):
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"gamma={gamma!r} is invalid: allowed 0 < gamma < 1 (the AWP paper uses 5e-3 to 1e-2)")
        self.gamma = gamma
        self.step: Optional[int] = None  # the trainer's global_step when the perturbation was applied
        self._proxy: Optional[nn.Module] = None
        self._saved: List[Tuple[nn.Parameter, torch.Tensor]] = []

    @property
    def applied(self) -> bool:
        """Whether the model currently holds perturbed weights."""
        return bool(self._saved)

    def _proxy_for(self, model: nn.Module) -> nn.Module:
        if self._proxy is None:
            self._proxy = copy.deepcopy(model)
        self._proxy.load_state_dict(model.state_dict())
        self._proxy.train()
        return self._proxy

    def perturb_(
        self,
        model: nn.Module,
        loss_of: Callable[[nn.Module], torch.Tensor],
        step: Optional[int] = None,
        reduce: Optional[Callable] = None,
    ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Add v to ``model``'s perturbed weights, with g the gradient of ``loss_of(proxy)`` at its weights, averaged
        over the processes by ``reduce`` (``Accelerator.reduce``) so that every DDP process perturbs the same way.

        Returns the perturbation by parameter name and the proxy's loss (detached).
        """
        if self.applied:
            raise RuntimeError("AWP: the weights are already perturbed; call restore_() before perturbing again")
        named = perturbed_weights(model)
        proxy = self._proxy_for(model)
        proxy_params = dict(proxy.named_parameters())
        targets = [proxy_params[name] for name, _ in named]
        with torch.enable_grad():
            loss = loss_of(proxy)
            grads = torch.autograd.grad(loss, targets, allow_unused=True)
        grads = [
            torch.zeros_like(t, dtype=torch.float32) if g is None else g.detach().float()
            for t, g in zip(targets, grads)
        ]
        grads = averaged_over_processes(grads, reduce)
        perturbation = weight_perturbation([p for _, p in named], grads, self.gamma)
        with torch.no_grad():
            self._saved = [(p, p.detach().clone()) for _, p in named]
            for (_, p), v in zip(named, perturbation):
                p.add_(v.to(p.dtype))
        self.step = step
        return {name: v for (name, _), v in zip(named, perturbation)}, loss.detach()

    @torch.no_grad()
    def restore_(self) -> None:
        """Copy the unperturbed weights back, bit for bit (nothing if none is applied)."""
        for p, saved in self._saved:
            p.copy_(saved)
        self._saved = []
        self.step = None
