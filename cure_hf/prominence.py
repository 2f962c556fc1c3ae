"""The gradient-prominence mask of CURE (conserve / update), as pure functions.

For each parameter tensor, the entries whose prominence score lies strictly below the
tensor's ``fraction``-quantile are *conserved* (their gradient is zeroed); the rest are
updated. The quantile interpolates linearly between order statistics, like numpy's default.
It uses ``kthvalue`` rather than ``torch.quantile``, which refuses inputs above 2**24 entries
in some PyTorch releases; the quantile position comes from the shape alone, so there is no
host synchronisation per tensor.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import torch

__all__ = ["quantile_threshold", "conserve_mask", "paper_score", "mask_gradients_"]


def quantile_threshold(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``fraction``-quantile of ``score`` (all entries), numpy's linear interpolation."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flat = score.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot take a quantile of an empty tensor")
    position = fraction * (n - 1)
    lower = int(math.floor(position))
    upper = min(lower + 1, n - 1)
    weight = position - lower
    # kthvalue is not implemented for half precision on every device; scores are compared in fp32.
    flat = flat.float()
    low_value = flat.kthvalue(lower + 1).values
    if weight == 0.0 or upper == lower:
        return low_value
    high_value = flat.kthvalue(upper + 1).values
    return low_value + weight * (high_value - low_value)


def conserve_mask(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask, True where the entry is conserved: score strictly below the fraction-quantile."""
    if fraction <= 0.0:
        return torch.zeros_like(score, dtype=torch.bool)
    return score.float() < quantile_threshold(score, fraction)


def paper_score(clean_grad: torch.Tensor, adv_grad: torch.Tensor, clean_weight: float) -> torch.Tensor:
    """The paper's prominence: alpha * |dCE_nat/dw| + (1 - alpha) * |dCE_adv/dw|."""
    return clean_weight * clean_grad.abs() + (1.0 - clean_weight) * adv_grad.abs()


@torch.no_grad()
def mask_gradients_(
    params: Sequence[torch.Tensor],
    fraction: float,
    scores: Optional[Sequence[torch.Tensor]] = None,
) -> List[Optional[torch.Tensor]]:
    """Zero the conserved entries of each ``param.grad`` in place; return the conserve masks.

    The score defaults to ``|grad|`` (the released code's behaviour). Parameters without a
    gradient are skipped (their mask is None).
    """
    masks: List[Optional[torch.Tensor]] = []
    for i, p in enumerate(params):
        if p.grad is None:
            masks.append(None)
            continue
        score = p.grad.abs() if scores is None else scores[i]
        mask = conserve_mask(score, fraction)
        p.grad.masked_fill_(mask, 0.0)
        masks.append(mask)
    return masks
