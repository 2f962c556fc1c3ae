"""Plots (PNG) of robust evaluation: accuracy over training, and robust accuracy against eps (CURE, Fig. 5b).

matplotlib runs headless (Agg); every function returns the path it wrote.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

__all__ = ["load_log_history", "plot_training_history", "plot_accuracy_vs_eps"]

_LABELS = {
    "accuracy": "clean",
    "robust_accuracy": "robust (worst case)",
    "cw_accuracy": "CW-inf",
    "autoattack_accuracy": "AutoAttack",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def load_log_history(source: Union[str, Sequence[Mapping[str, Any]]]) -> List[Mapping[str, Any]]:
    """A Trainer ``log_history``: given as a list, or read from a ``trainer_state.json`` (file, run folder or
    the latest ``checkpoint-*`` inside it)."""
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    path = str(source)
    if os.path.isdir(path):
        candidates = [os.path.join(path, "trainer_state.json")]
        checkpoints = sorted(
            (d for d in os.listdir(path) if d.startswith("checkpoint-")),
            key=lambda d: int(d.split("-")[-1]) if d.split("-")[-1].isdigit() else -1,
        )
        candidates += [os.path.join(path, d, "trainer_state.json") for d in reversed(checkpoints)]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            raise FileNotFoundError(
                f"no trainer_state.json in {path} or its checkpoint-* folders; save a checkpoint during training "
                "(save_strategy='steps' or 'epoch') or pass trainer.state.log_history"
            )
        path = found
    with open(path, encoding="utf-8") as f:
        return json.load(f)["log_history"]


def plot_training_history(
    history: Union[str, Sequence[Mapping[str, Any]]],
    output_path: str,
    *,
    prefix: str = "eval",
    title: Optional[str] = None,
) -> str:
    """Clean and robust accuracies at every evaluation against the training step; the best robust point marked.

    Each ``{prefix}_*accuracy`` series gets a line (e.g. eval_accuracy, eval_pgd20_accuracy,
    eval_validation_robust_accuracy); the gap between the best and the last robust accuracy is the
    robust overfitting.
    """
    log_history = load_log_history(history)
    series: Dict[str, List[tuple]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith(prefix + "_") and key.endswith("accuracy") and isinstance(value, (int, float)):
                series.setdefault(key[len(prefix) + 1 :], []).append((entry.get("step", 0), float(value)))
    if not series:
        raise ValueError(
            f"no '{prefix}_*accuracy' entries in the log history: run trainer.evaluate() during training "
            "(eval_strategy='steps' or 'epoch')"
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    colors = {}
    for name in sorted(series, key=lambda n: (n.startswith("validation_"), n != "accuracy", n)):
        split, metric = ("validation", name[len("validation_") :]) if name.startswith("validation_") else ("", name)
        color = colors.setdefault(metric, f"C{len(colors)}")  # one colour per metric, one line style per split
        steps, values = zip(*series[name])
        label = " ".join(filter(None, [split, _LABELS.get(metric, metric.replace("_accuracy", ""))]))
        robust = metric == "robust_accuracy"
        if robust:
            best = max(range(len(values)), key=lambda i: values[i])
            label += f" (best {100 * values[best]:.1f} at step {steps[best]}, last {100 * values[-1]:.1f})"
            ax.scatter([steps[best]], [100 * values[best]], s=90, facecolors="none", edgecolors="black", zorder=3)
        ax.plot(
            steps,
            [100 * v for v in values],
            ":" if split else "-",
            color=color,
            marker="o",
            markersize=3,
            linewidth=2.2 if robust else 1.3,
            label=label,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Clean and robust accuracy over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, output_path)


def plot_accuracy_vs_eps(
    results: Union[Mapping[float, Mapping[str, float]], Mapping[str, Mapping[float, Mapping[str, float]]]],
    output_path: str,
    *,
    metric: str = "robust_accuracy",
    title: Optional[str] = None,
) -> str:
    """Accuracy against the attack radius eps (in 1/255 units on the x-axis), one line per model.

    ``results``: ``{eps: metrics}`` for one model, or ``{model_label: {eps: metrics}}`` for several, where
    metrics are those of :func:`cure_hf.evaluation.evaluate_robustness` (``metric`` picks the y value).
    """
    first = next(iter(results.values()), None)
    if first is None:
        raise ValueError("results is empty: evaluate at least one eps")
    curves = results if isinstance(next(iter(first.values())), Mapping) else {"model": results}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for label, by_eps in curves.items():
        points = sorted((float(eps), float(metrics[metric])) for eps, metrics in by_eps.items())
        ax.plot([255 * e for e, _ in points], [100 * v for _, v in points], marker="o", label=str(label))
    ax.set_xlabel("eps (x / 255, L-inf)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title(title or "Robust accuracy against the attack radius")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, output_path)


def _save(fig, plt, output_path: str) -> str:
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(output_path, dpi=120)
    plt.close(fig)
    return output_path


# --- recipes: the clean / robust trade-off of several methods (recipes/compare_methods.py)
def plot_robustness_tradeoff(
    rows: Sequence[Mapping[str, Any]],
    output_path: str,
    *,
    robust_key: str = "pgd20",
    title: Optional[str] = None,
) -> str:
    """Clean accuracy (x) against robust accuracy (y), one labelled point per method; the marker area grows
    with the training cost (``seconds_per_epoch``). ``rows``: dicts with ``label`` (or ``method``), ``clean``
    and ``robust_key``, accuracies as fractions."""
    if not rows:
        raise ValueError("rows is empty: pass one dict per method with 'label', 'clean' and the robust accuracy")
    missing = [r.get("label", r.get("method")) for r in rows if "clean" not in r or robust_key not in r]
    if missing:
        raise ValueError(f"rows {missing} lack 'clean' or {robust_key!r}; pass robust_key= the robust column's name")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    costs = [float(r.get("seconds_per_epoch", 1.0)) for r in rows]
    largest = max(costs) or 1.0
    for r, cost in zip(rows, costs):
        x, y = 100 * float(r["clean"]), 100 * float(r[robust_key])
        ax.scatter([x], [y], s=40 + 260 * cost / largest, alpha=0.7)
        ax.annotate(str(r.get("label", r.get("method"))), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("clean accuracy (%)")
    name = robust_key.upper()
    ax.set_ylabel(
        f"{name[:3]}-{name[3:]} accuracy (%)"
        if name.startswith("PGD") and name[3:].isdigit()
        else f"{name} accuracy (%)"
    )
    ax.margins(x=0.25, y=0.15)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    ax.set_title(title or "clean vs robust accuracy (marker area: seconds per epoch)", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, output_path)
