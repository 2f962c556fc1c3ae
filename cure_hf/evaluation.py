"""Robust evaluation: accuracy under clean inputs and white-box attacks, per example, then averaged.

An example counts as robust only if it is classified correctly under every attack that was run
(``robust_accuracy`` is that worst case). Attacks run with gradients enabled even when the caller
is inside ``torch.no_grad()``, in eval mode, in fp32 unless the caller's autocast says otherwise.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from .attacks import logits_of, pgd

__all__ = ["correct_under_attack", "robust_evaluate", "attack_metric_name"]


def attack_metric_name(attack: str, steps: int) -> str:
    """Metric key of an attack: accuracy, pgd20_accuracy, cw_accuracy, autoattack_accuracy."""
    return {"clean": "accuracy", "pgd": f"pgd{steps}_accuracy"}.get(attack, f"{attack}_accuracy")


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return logits_of(model(x)).argmax(dim=1)


def correct_under_attack(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    attack: str,
    *,
    eps: float,
    step_size: float,
    steps: int = 20,
    restarts: int = 1,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Boolean per example: still correct after ``attack`` ("clean", "pgd" with CE, "cw" with the margin loss).

    With restarts, an example is correct only if it survives every restart.
    """
    was_training = model.training
    model.eval()
    try:
        if attack == "clean":
            return _predict(model, x) == labels
        if attack not in ("pgd", "cw"):
            raise ValueError(f"attack={attack!r} is not one of 'clean', 'pgd', 'cw'")
        correct = torch.ones_like(labels, dtype=torch.bool)
        for _ in range(restarts):
            with torch.enable_grad():
                x_adv = pgd(
                    model, x, labels, eps=eps, step_size=step_size, steps=steps,
                    loss="ce" if attack == "pgd" else "margin", init="uniform", generator=generator,
                )
            correct &= _predict(model, x_adv) == labels
        return correct
    finally:
        model.train(was_training)


def robust_evaluate(
    model: nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    attacks: Sequence[str] = ("clean", "pgd"),
    *,
    eps: float = 8 / 255,
    step_size: Optional[float] = None,
    steps: int = 20,
    restarts: int = 1,
    max_examples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    device: Optional[torch.device] = None,
    progress: bool = False,
) -> Dict[str, float]:
    """Accuracy under each attack over ``batches`` of {"pixel_values", "labels"}.

    ``gather`` (e.g. ``accelerator.gather_for_metrics``) collects per-example results from all
    processes so that each example counts once. ``max_examples`` caps the examples per process.
    """
    step_size = eps / 4 if step_size is None else step_size
    results: Dict[str, List[torch.Tensor]] = {a: [] for a in attacks}
    seen = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="robust eval", leave=False)
    for batch in iterator:
        x, y = batch["pixel_values"], batch["labels"]
        if device is not None:
            x, y = x.to(device), y.to(device)
        if max_examples is not None:
            if seen >= max_examples:
                break
            x, y = x[: max_examples - seen], y[: max_examples - seen]
        seen += len(y)
        for attack in attacks:
            correct = correct_under_attack(
                model, x, y, attack, eps=eps, step_size=step_size, steps=steps, restarts=restarts, generator=generator
            )
            results[attack].append(gather(correct) if gather is not None else correct)
    metrics: Dict[str, float] = {}
    per_attack = {a: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for a, v in results.items()}
    n = len(next(iter(per_attack.values()))) if per_attack else 0
    for attack, correct in per_attack.items():
        metrics[attack_metric_name(attack, steps)] = correct.float().mean().item() if n else float("nan")
    if per_attack and n:
        worst = torch.stack(list(per_attack.values())).all(dim=0)
        metrics["robust_accuracy"] = worst.float().mean().item()
    metrics["n_examples"] = n
    return metrics
