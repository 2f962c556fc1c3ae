"""The gradient-prominence mask of CURE (conserve / update), as pure functions.

For each parameter tensor, the entries whose prominence score lies strictly below the
tensor's ``fraction``-quantile are *conserved* (their gradient is zeroed); the rest are
updated. The quantile interpolates linearly between order statistics, like numpy's default.

Speed and memory (``benchmarks/bench_mask.py`` compares the alternatives):
- Nothing waits for the device: the quantile's position comes from the shape alone, so there
  is no host synchronisation per tensor (the released code copies every gradient to the CPU
  for ``numpy.percentile``).
- Tensors of equal size are stacked into chunks of at most ``CHUNK_ENTRIES`` entries and share
  one batched selection, so a ResNet-18's 60 maskable tensors cost about 15 selections.
- The selection: on accelerators one segmented sort per chunk (``kthvalue`` runs one thread
  block per row there, tens of times slower on large tensors; ``torch.quantile`` refuses
  inputs above 2**24 entries in some releases); on the CPU numpy's introselect
  (``numpy.partition``), which finds both order statistics in one pass. Both are exact for any
  size, beyond 2**24 entries included.
- Scratch memory, freed before the next chunk: the stacked float32 scores (4 bytes per entry),
  the sort's values and indices (12 bytes per entry; on the CPU a 4-byte partition copy) and a
  bool mask (1 byte), for one chunk, i.e. ``max(CHUNK_ENTRIES, largest tensor)`` entries.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["quantile_threshold", "quantile_thresholds", "conserve_mask", "paper_score", "mask_gradients_"]

# Equal-size tensors are stacked for one selection up to this many entries per chunk (bounds scratch memory).
CHUNK_ENTRIES = 1 << 22


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")


def _row_quantiles(rows: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``fraction``-quantile of every row of a 2-D float32 tensor (numpy's linear interpolation)."""
    n = rows.shape[1]
    position = fraction * (n - 1)
    lower = int(math.floor(position))
    upper = min(lower + 1, n - 1)
    weight = position - lower
    if rows.device.type == "cpu":
        ordered = torch.from_numpy(np.partition(rows.numpy(), (lower, upper), axis=1))
    else:
        ordered = rows.sort(dim=1).values
    low, high = ordered[:, lower], ordered[:, upper]
    if weight == 0.0:
        return low.clone()
    return torch.lerp(low, high, weight)  # numpy's formula, in one kernel


def quantile_threshold(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``fraction``-quantile of ``score`` (all entries), numpy's linear interpolation; a 0-d float32 tensor."""
    _check_fraction(fraction)
    if score.numel() == 0:
        raise ValueError("cannot take a quantile of an empty tensor")
    # Scores are compared in float32: selections are not implemented for half precision on every device.
    return _row_quantiles(score.detach().reshape(1, -1).float(), fraction)[0]


def _chunks(tensors: Sequence[torch.Tensor]) -> Iterator[List[int]]:
    """Indices of tensors grouped by (size, device), each group cut into chunks of at most CHUNK_ENTRIES entries."""
    groups: Dict[Tuple[int, torch.device], List[int]] = defaultdict(list)
    for i, tensor in enumerate(tensors):
        groups[(tensor.numel(), tensor.device)].append(i)
    for (numel, _), indices in groups.items():
        per_chunk = max(1, CHUNK_ENTRIES // max(numel, 1))
        for start in range(0, len(indices), per_chunk):
            yield indices[start : start + per_chunk]


def _stack_rows(tensors: Sequence[torch.Tensor], absolute: bool) -> torch.Tensor:
    """Float32 rows, one per tensor (a fresh buffer, so it can be modified in place)."""
    if len(tensors) == 1:
        flat = tensors[0].detach().reshape(1, -1)
        return flat.abs().float() if absolute else flat.float().clone()
    rows = torch.stack([t.detach().reshape(-1) for t in tensors]).float()
    return rows.abs_() if absolute else rows


def quantile_thresholds(scores: Sequence[torch.Tensor], fraction: float) -> List[torch.Tensor]:
    """``quantile_threshold`` of every tensor in ``scores`` (0-d float32 tensors, in order), batched by size."""
    _check_fraction(fraction)
    if any(s.numel() == 0 for s in scores):
        raise ValueError("cannot take a quantile of an empty tensor")
    thresholds: List[Optional[torch.Tensor]] = [None] * len(scores)
    for chunk in _chunks(scores):
        values = _row_quantiles(_stack_rows([scores[i] for i in chunk], absolute=False), fraction)
        for i, value in zip(chunk, values.unbind()):
            thresholds[i] = value
    return thresholds


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
    on_mask: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
) -> List[Optional[torch.Tensor]]:
    """Zero the conserved entries of each ``param.grad`` in place; return the conserve masks.

    The score defaults to ``|grad|`` (the released code's behaviour). Parameters without a
    gradient are skipped (their mask is None). With ``on_mask``, ``on_mask(param, mask)`` is
    called as each mask is made (in an order of the implementation's choosing) and the masks
    are not kept (the returned list holds None), so a caller that consumes them one by one
    never holds all of them at once.
    """
    _check_fraction(fraction)
    masks: List[Optional[torch.Tensor]] = [None] * len(params)
    live = [i for i, p in enumerate(params) if p.grad is not None]

    def apply(i: int, mask: torch.Tensor) -> None:
        params[i].grad.masked_fill_(mask, 0.0)
        if on_mask is not None:
            on_mask(params[i], mask)
        else:
            masks[i] = mask

    if fraction <= 0.0:  # nothing is conserved
        for i in live:
            apply(i, torch.zeros_like(params[i].grad, dtype=torch.bool))
        return masks

    sources = [params[i].grad if scores is None else scores[i] for i in live]
    for chunk in _chunks(sources):
        rows = _stack_rows([sources[j] for j in chunk], absolute=scores is None)
        conserved = rows < _row_quantiles(rows, fraction)[:, None]
        del rows
        for j, mask in zip(chunk, conserved.unbind()):
            apply(live[j], mask.view(params[live[j]].grad.shape))
    return masks
