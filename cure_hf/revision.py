"""The revision model of CURE: a stochastic moving average of the working model.

After every optimizer step the step counter t grows by one, and with probability r (drawn
from a generator of its own, seeded identically on every process, so all replicas agree)
each *parameter* is averaged: g <- m * g + (1 - m) * f with m = min(1 - 1 / (t + 1), d).
Buffers (BatchNorm statistics) are not averaged: the revision model keeps its own.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["revision_decay", "ema_update_", "RevisionModel"]


def revision_decay(step: int, decay: float) -> float:
    """m = min(1 - 1 / (t + 1), d): a plain average early on, the decay d later."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update_(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], momentum: float) -> None:
    """ema <- momentum * ema + (1 - momentum) * param, for every pair, in place."""
    ema_params, params = list(ema_params), [p.detach() for p in params]
    if len(ema_params) != len(params):
        raise ValueError(f"revision model has {len(ema_params)} parameters, the model {len(params)}")
    if not ema_params:
        return
    torch._foreach_mul_(ema_params, momentum)
    torch._foreach_add_(ema_params, [p.to(e.dtype) for p, e in zip(params, ema_params)], alpha=1.0 - momentum)


class RevisionModel(nn.Module):
    """Holds the revision copy g, its step counter and its own random generator."""

    def __init__(self, model: nn.Module, rate: float = 0.2, decay: float = 0.999, seed: int = 0, train_mode: bool = True):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.train(train_mode)
        self.rate = rate
        self.decay = decay
        self.train_mode = train_mode
        self.step = 0
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        return self.module(x)

    @torch.no_grad()
    def step_(self, model: nn.Module, rate: Optional[float] = None) -> bool:
        """Advance t; with probability r average ``model``'s parameters in. Returns whether it did."""
        self.step += 1
        rate = self.rate if rate is None else rate
        draw = torch.rand((), generator=self.generator).item()
        if draw >= rate:
            return False
        ema_update_(self.module.parameters(), model.parameters(), revision_decay(self.step, self.decay))
        return True

    def state(self) -> Dict[str, Any]:
        """What a checkpoint needs to resume bit-identically (the weights are saved separately)."""
        return {"step": self.step, "generator": self.generator.get_state(), "rate": self.rate, "decay": self.decay}

    def load_state(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])
