"""Per-layer telemetry of CURE's conserve / update step: which blocks get updated, and how hard they are pushed.

With ``layer_telemetry=True`` the trainer calls :class:`LayerTelemetry` from its optimizer pre-step hook,
where the masks exist. Per block of the network (stem, ``layer1`` ..., see :mod:`cure_hf.layerwise`) and
per optimizer step it keeps, on the device (no host synchronisation in the step):

- ``updated_fraction``: the fraction of the block's entries whose gradient survives the mask, in [0, 1];
- ``grad_share``: the block's share of the total gradient magnitude (L1, before masking), in [0, 1],
  summing to 1 over the blocks;
- ``kept_grad_fraction``: the fraction of the block's gradient magnitude that survives the mask, in [0, 1];
- ``grad_mean_abs``: the block's mean |gradient| (before masking).

``flush()`` (called by the trainer's ``log()``) averages the steps since the last log, copies them to
the host once, and returns them as ``telemetry/<quantity>/<block>`` entries, plus
``telemetry/updated_fraction/all``, which equals the entry-weighted mean of the blocks' fractions.
:func:`plot_layer_telemetry` draws them from a Trainer's ``log_history``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .layerwise import model_blocks, parameter_blocks

__all__ = ["LayerTelemetry", "telemetry_series", "plot_layer_telemetry", "TELEMETRY_PREFIX"]

TELEMETRY_PREFIX = "telemetry/"
_QUANTITIES = ("updated_fraction", "grad_share", "kept_grad_fraction", "grad_mean_abs")


class LayerTelemetry:
    """Collects per-block mask statistics inside the optimizer step; see the module docstring."""

    def __init__(self) -> None:
        self._block_index: Dict[int, int] = {}  # id(parameter) -> block index
        self.blocks: List[str] = []
        self._numel: Optional[torch.Tensor] = None  # entries per block
        self._steps: List[torch.Tensor] = []  # one (4, n_blocks) tensor per optimizer step
        self._pending: Dict[str, Any] = {}

    def _index(self, net: nn.Module, params: Sequence[torch.Tensor]) -> None:
        ids = {id(p) for p in params}
        names = parameter_blocks(net)
        order = [b for b in model_blocks(net)]
        by_id = {id(p): names[n] for n, p in net.named_parameters() if id(p) in ids}
        self.blocks = [b for b in order if b in set(by_id.values())]
        position = {b: i for i, b in enumerate(self.blocks)}
        self._block_index = {pid: position[b] for pid, b in by_id.items()}

    @torch.no_grad()
    def begin(self, net: nn.Module, params: Sequence[torch.Tensor]) -> None:
        """Before masking: the gradient magnitude of each parameter (one batched kernel)."""
        live = [p for p in params if p.grad is not None]
        if not live:
            self._pending = {}
            return
        if any(id(p) not in self._block_index for p in live):
            self._index(net, params)
        device = live[0].grad.device
        index = torch.tensor([self._block_index[id(p)] for p in live], device=device)
        numel = torch.tensor([float(p.numel()) for p in live], device=device)
        l1 = torch.stack(torch._foreach_norm([p.grad.float() for p in live], 1)).float()
        self._pending = {"live": live, "index": index, "numel": numel, "l1": l1, "conserved": {}}

    def observe(self, param: torch.Tensor, conserved_mask: torch.Tensor) -> None:
        """One mask, as ``mask_gradients_``'s ``on_mask`` callback: count its conserved entries (on the device)."""
        if self._pending:
            self._pending["conserved"][id(param)] = conserved_mask.sum()

    @torch.no_grad()
    def end(self) -> None:
        """After masking: aggregate per block and keep the step's (4, n_blocks) tensor on the device."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        live, index, numel, l1 = pending["live"], pending["index"], pending["numel"], pending["l1"]
        zero = torch.zeros((), device=l1.device)
        conserved = torch.stack([pending["conserved"].get(id(p), zero).float() for p in live])
        kept_l1 = torch.stack(torch._foreach_norm([p.grad.float() for p in live], 1)).float()
        n = len(self.blocks)

        def per_block(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n, device=values.device).index_add_(0, index, values)

        block_numel, block_l1 = per_block(numel), per_block(l1)
        updated = per_block(numel - conserved)
        total_l1 = block_l1.sum().clamp_min(torch.finfo(torch.float32).tiny)
        self._numel = block_numel
        self._steps.append(
            torch.stack(
                [
                    updated / block_numel,
                    block_l1 / total_l1,
                    torch.where(
                        block_l1 > 0,
                        per_block(kept_l1) / block_l1.clamp_min(torch.finfo(torch.float32).tiny),
                        torch.ones_like(block_l1),
                    ),
                    block_l1 / block_numel,
                ]
            )
        )

    def flush(self) -> Dict[str, float]:
        """The mean of every quantity over the steps since the last flush, as log entries (one host copy)."""
        if not self._steps:
            return {}
        mean = torch.stack(self._steps).mean(0).cpu()
        numel = self._numel.cpu()
        self._steps = []
        logs = {}
        for q, quantity in enumerate(_QUANTITIES):
            for b, block in enumerate(self.blocks):
                logs[f"{TELEMETRY_PREFIX}{quantity}/{block}"] = round(float(mean[q, b]), 6)
        logs[f"{TELEMETRY_PREFIX}updated_fraction/all"] = round(float((mean[0] * numel).sum() / numel.sum()), 6)
        return logs


def telemetry_series(history: Sequence[Mapping[str, Any]], quantity: str = "updated_fraction") -> Dict[str, List]:
    """``{block: [(step, value), ...]}`` of one telemetry quantity from a Trainer ``log_history``."""
    if quantity not in _QUANTITIES:
        raise ValueError(f"quantity={quantity!r} is not one of {_QUANTITIES}")
    prefix = f"{TELEMETRY_PREFIX}{quantity}/"
    series: Dict[str, List] = {}
    for entry in history:
        for key, value in entry.items():
            if key.startswith(prefix):
                series.setdefault(key[len(prefix) :], []).append((entry.get("step", len(series)), value))
    return series


def plot_layer_telemetry(
    history: Union[str, Sequence[Mapping[str, Any]]], output_path: str, title: Optional[str] = None
) -> str:
    """A PNG of the updated fraction and the gradient share of every block against the training step.

    ``history``: a ``trainer.state.log_history`` or a path accepted by ``cure_hf.plots.load_log_history``.
    """
    from .plots import _pyplot, _save, load_log_history

    history = load_log_history(history)
    panels = [("updated_fraction", "fraction of entries updated"), ("grad_share", "share of |gradient| (L1)")]
    if not telemetry_series(history, "updated_fraction"):
        raise ValueError(
            "no telemetry/* entries in the log history: train CURE with layer_telemetry=True "
            "and logging_steps small enough to log during training"
        )
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (quantity, label) in zip(axes, panels):
        for block, points in telemetry_series(history, quantity).items():
            steps, values = zip(*points)
            ax.plot(
                steps,
                values,
                marker="o",
                markersize=3,
                label=block,
                linestyle="--" if block == "all" else "-",
                color="black" if block == "all" else None,
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title or "CURE per-layer telemetry")
    fig.tight_layout()
    return _save(fig, plt, output_path)
