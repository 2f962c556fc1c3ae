"""Accuracy, as an `evaluate` metric module that loads offline from this file.

`evaluate.load("accuracy")` fetches its script from the Hub; this one ships with cure_hf:

    import evaluate
    from cure_hf.metrics import metric_path
    accuracy = evaluate.load(metric_path("accuracy"))
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {"accuracy": 0.666...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of examples whose predicted label equals the reference label."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
    sample_weight (`list` of `float`, optional): a weight per example.
Returns:
    accuracy (`float`): in [0, 1]; NaN when there are no examples.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        if correct.size == 0:
            return {"accuracy": float("nan")}
        weights = np.ones(correct.shape) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        return {"accuracy": float((correct * weights).sum() / weights.sum())}
