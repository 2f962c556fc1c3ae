"""Weight averaging (WA): an exponential moving average of the working model, parameters and buffers.

After every optimizer step t = 1, 2, ... (t counts the updates since the average started as a copy of the model):

    decay_t = min(decay, (1 + t) / (10 + t))
    average <- decay_t * average + (1 - decay_t) * model

for every parameter and every floating-point buffer (BatchNorm running mean and variance); integer buffers
(BatchNorm's ``num_batches_tracked``) are copied. The warm-up of the decay follows the PyTorch reproduction of the
weight averaging of Gowal et al. 2020 ("Uncovering the limits of adversarial training"):
imrahulr/adversarial_robustness_pytorch, ``gowal21uncovering/utils/watrain.py::ema_update``, with the same t (it is
TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule). That code copies the BatchNorm statistics into the
average once per epoch; here they are averaged like the weights after every step (as timm's ``ModelEmaV3``), so the
average never pairs its weights with statistics of other weights.

The average is a ``torch.optim.swa_utils.AveragedModel`` (``use_buffers=True``) whose update function applies
the warmed-up decay; the update is a lerp, so tensors that do not change (frozen weights, the normalisation
buffers) stay bit-identical in the average.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from typing import Iterator, List

import safetensors
import safetensors.torch
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["DEFAULT_DECAY", "WEIGHT_AVERAGE_NAME", "warmed_up_decay", "WeightAverage"]

logger = logging.getLogger(__name__)

# weight_averaging=True: an average over ~1/(1 - 0.999) = 1000 optimizer steps, about 2.5 CIFAR-10 epochs at batch
# 128; the reproduction above uses 0.995 at batch 1024, an average over ~200 steps, about 4 epochs.
DEFAULT_DECAY = 0.999
# A checkpoint's file of the averaged model and the working weights; the checkpoint's model.safetensors holds the
# average (what evaluation and saving use), so resuming needs the working weights from here.
WEIGHT_AVERAGE_NAME = "weight_average.safetensors"


def warmed_up_decay(decay: float, step: int) -> float:
    """decay_t = min(decay, (1 + t) / (10 + t)): a short memory early in training, ``decay`` later."""
    return min(decay, (1.0 + step) / (10.0 + step))


def _ema_update_fn(decay: float):
    @torch.no_grad()
    def update(averaged: List[torch.Tensor], current: List[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # AveragedModel counts its first call, which copies the model, so num_averaged is t for update t.
        if not (averaged[0].is_floating_point() or averaged[0].is_complex()):
            torch._foreach_copy_(averaged, current)  # step counters: the model's own
            return
        torch._foreach_lerp_(averaged, current, 1.0 - warmed_up_decay(decay, int(num_averaged)))

    return update


def _tensors(module: nn.Module) -> List[torch.Tensor]:
    """Parameters then buffers, in the order AveragedModel(use_buffers=True) pairs them."""
    return list(itertools.chain(module.parameters(), module.buffers()))


class WeightAverage:
    """The averaged copy of a model: updated after each optimizer step, swapped in to evaluate and save."""

    def __init__(self, model: nn.Module, decay: float = DEFAULT_DECAY):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay!r} is invalid: allowed 0 < decay < 1, e.g. {DEFAULT_DECAY}")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=_ema_update_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        self.averaged.update_parameters(model)  # the first call copies: the average starts as the model

    @property
    def module(self) -> nn.Module:
        """The averaged model (same architecture as the working one)."""
        return self.averaged.module

    @property
    def step(self) -> int:
        """t: updates folded in since the average started as a copy of the model."""
        return int(self.averaged.n_averaged) - 1

    @torch.no_grad()
    def update_(self, model: nn.Module) -> None:
        """One step t += 1 of the moving average towards ``model``'s current parameters and buffers."""
        self.averaged.update_parameters(model)

    @torch.no_grad()
    def restart_(self, model: nn.Module) -> None:
        """Start again from a copy of ``model`` (t = 0)."""
        self.averaged.n_averaged.zero_()
        self.averaged.update_parameters(model)

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds the average (parameters and buffers); on exit its own values come back
        bit for bit, also on error."""
        targets, averaged = _tensors(model), _tensors(self.module)
        if len(targets) != len(averaged):
            raise ValueError(f"the model has {len(targets)} parameters and buffers, its average {len(averaged)}")
        with torch.no_grad():
            saved = [t.detach().clone() for t in targets]
            for t, a in zip(targets, averaged):
                t.copy_(a)
        try:
            yield model
        finally:
            with torch.no_grad():
                for t, s in zip(targets, saved):
                    t.copy_(s)

    def save(self, folder: str, working: nn.Module) -> str:
        """Write ``WEIGHT_AVERAGE_NAME``: the average (``average.*``), its step counter, and ``working``'s state
        (``working.*``: the weights training continues from)."""
        tensors = {f"average.{k}": v for k, v in self.module.state_dict().items()}
        tensors.update({f"working.{k}": v for k, v in working.state_dict().items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        tensors["n_averaged"] = self.averaged.n_averaged.detach().cpu().reshape(1)
        path = os.path.join(folder, WEIGHT_AVERAGE_NAME)
        safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "decay": repr(self.decay)})
        from .files import chmod_as_umask

        chmod_as_umask(path)  # safetensors writes 0600: give what open() would
        return path

    def load(self, folder: str, working: nn.Module) -> None:
        """Restore what :meth:`save` wrote, strictly: the average, its counter, and ``working``'s state."""
        path = os.path.join(folder, WEIGHT_AVERAGE_NAME)
        tensors = safetensors.torch.load_file(path, device="cpu")
        with safetensors.safe_open(path, framework="pt") as f:
            saved_decay = float((f.metadata() or {}).get("decay", self.decay))
        if saved_decay != self.decay:
            logger.warning(
                "%s was averaged with decay %s; continuing with weight_averaging=%s", path, saved_decay, self.decay
            )
        self.module.load_state_dict(_prefixed(tensors, "average."), strict=True)
        working.load_state_dict(_prefixed(tensors, "working."), strict=True)
        self.averaged.n_averaged.copy_(tensors["n_averaged"].reshape(()))


def _prefixed(tensors, prefix: str):
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
