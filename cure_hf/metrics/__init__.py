"""`evaluate` metric modules shipped with cure_hf, loadable offline by path.

`evaluate.load("accuracy")` downloads its script from the Hub; these load from the installed package.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["METRIC_NAMES", "metric_path", "load_metric"]

METRIC_NAMES = ("accuracy", "robust_accuracy")


def metric_path(name: str) -> str:
    """Path of the metric script ``cure_hf/metrics/<name>/<name>.py`` for ``evaluate.load(path)``."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric name={name!r} is not shipped with cure_hf; choose one of {METRIC_NAMES}")
    return str(Path(__file__).resolve().parent / name / f"{name}.py")


@functools.cache
def load_metric(name: str):
    """The metric loaded with ``evaluate.load`` from its shipped script (no network), kept in memory."""
    import evaluate

    return evaluate.load(metric_path(name), keep_in_memory=True)
