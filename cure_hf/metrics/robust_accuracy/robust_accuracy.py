"""Robust accuracy (worst case over attacks), as an `evaluate` metric module that loads offline.

Each example comes with its predicted label under every evaluation (clean, then each attack); it
counts as robust only if all of them are correct:

    import evaluate
    from cure_hf.metrics import metric_path
    robust = evaluate.load(metric_path("robust_accuracy"))
    robust.compute(predictions=[[3, 3], [1, 7]], references=[3, 1], attack_names=["clean", "pgd20"])
    # {"robust_accuracy": 0.5, "clean_accuracy": 1.0, "pgd20_accuracy": 0.5}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    "Fraction of examples classified correctly under every attack (the worst case per example), "
    "and, when attack names are given, the accuracy under each attack."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per example, the predicted label under each attack, in a fixed order.
    references (`list` of `int`): true labels.
    attack_names (`list` of `str`, optional): names of the columns of `predictions`; adds `<name>_accuracy`.
Returns:
    robust_accuracy (`float`): in [0, 1]; NaN when there are no examples.
    <name>_accuracy (`float`): accuracy under each named attack.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RobustAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, attack_names=None):
        references = np.asarray(references, dtype=np.int64)
        if references.size == 0:
            return {"robust_accuracy": float("nan")}
        predictions = np.asarray(predictions, dtype=np.int64).reshape(len(references), -1)
        correct = predictions == references[:, None]
        result = {"robust_accuracy": float(correct.all(axis=1).mean())}
        if attack_names is not None:
            if len(attack_names) != correct.shape[1]:
                raise ValueError(
                    f"attack_names has {len(attack_names)} names but predictions have {correct.shape[1]} columns; "
                    "give one name per column"
                )
            for column, name in enumerate(attack_names):
                result[f"{name}_accuracy"] = float(correct[:, column].mean())
        return result
