"""The revision model of CURE: a stochastic moving average of the working model.

After every optimizer step the step counter t grows by one, and with probability r (drawn
from a generator of its own, seeded identically on every process, so all replicas agree)
each *parameter* is averaged: g <- m * g + (1 - m) * f with m = min(1 - 1 / (t + 1), d).
Buffers (BatchNorm statistics) are not averaged: the revision model keeps its own.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Iterable, Optional

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

__all__ = ["revision_decay", "ema_update_", "RevisionModel", "REVISION_WEIGHTS_NAME"]

# The revision model's file in a checkpoint folder: its weights and buffers, its generator state, and (as
# metadata) its step counter and whatever schedule state the trainer hands over (e.g. where the method began).
REVISION_WEIGHTS_NAME = "revision.safetensors"


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

    def __init__(
        self, model: nn.Module, rate: float = 0.2, decay: float = 0.999, seed: int = 0, train_mode: bool = True
    ):
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

    def save(self, folder: str, schedule: Optional[Dict[str, Any]] = None) -> str:
        """Write ``REVISION_WEIGHTS_NAME`` into ``folder``: weights, buffers, generator, step and ``schedule``
        (JSON-serialisable state of the method's schedule, returned again by :meth:`load`)."""
        tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        tensors["generator_state"] = self.generator.get_state()
        metadata = {
            "format": "pt",
            "step": str(self.step),
            "rate": repr(self.rate),
            "decay": repr(self.decay),
            "schedule": json.dumps(schedule or {}),
        }
        path = os.path.join(folder, REVISION_WEIGHTS_NAME)
        safetensors.torch.save_file(tensors, path, metadata=metadata)
        from .files import chmod_as_umask

        chmod_as_umask(path)  # safetensors writes 0600: give what open() would
        return path

    @staticmethod
    def read_schedule(folder: str) -> Dict[str, Any]:
        """The schedule state that :meth:`save` wrote into ``folder``, without loading the weights."""
        with safetensors.safe_open(os.path.join(folder, REVISION_WEIGHTS_NAME), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("schedule", "{}"))

    def load(self, folder: str) -> Dict[str, Any]:
        """Restore what :meth:`save` wrote (strictly: every weight and buffer); returns the schedule state."""
        path = os.path.join(folder, REVISION_WEIGHTS_NAME)
        tensors = safetensors.torch.load_file(path, device="cpu")
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        module_state = {k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")}
        self.module.load_state_dict(module_state, strict=True)
        self.load_state({"step": int(metadata["step"]), "generator": tensors["generator_state"]})
        return json.loads(metadata.get("schedule", "{}"))
