"""The model card (README.md) of a saved robust model: YAML metadata with `model-index` results and the
RobustBench fields, then prose from the template file `templates/modelcard_template.md`."""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, Optional

from .methods import METHODS

__all__ = ["write_model_card", "card_value", "MODEL_CARD_NAME", "TEMPLATE_FILE"]

MODEL_CARD_NAME = "README.md"
TEMPLATE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "modelcard_template.md")


def _percent(value: Optional[float]) -> Optional[float]:
    """Accuracy as a percentage with two decimals (RobustBench style), from a fraction or a percentage."""
    if value is None:
        return None
    value = float(value)
    return round(value * 100.0 if value <= 1.0 else value, 2)


def write_model_card(output_dir: str, info: Dict[str, Any]) -> str:
    """Write ``README.md``: YAML metadata with ``model-index`` results and RobustBench-like fields, then prose.

    ``info`` keys (all optional): ``model_name``, ``architecture``, ``method``, ``hyperparameters`` (dict),
    ``dataset`` (name), ``dataset_id`` (Hub id), ``dataset_split``, ``threat_model`` ("Linf"), ``eps``
    ("8/255" or a float), ``clean_accuracy``, ``pgd20_accuracy``, ``autoattack_accuracy`` (fractions or
    percentages), ``pgd_steps``, ``additional_data`` (bool), ``base_model``, ``license``, ``tags``,
    ``library_name``, ``image_size``, ``mean``, ``std``, ``repo_id``. Returns the path written.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    method = info.get("method") or "unknown"
    dataset = info.get("dataset") or "unknown"
    dataset_id = info.get("dataset_id") or dataset
    threat_model = info.get("threat_model", "Linf")
    eps = info.get("eps")
    eps_str = eps if isinstance(eps, str) or eps is None else f"{float(eps):.6g}"
    pgd_steps = int(info.get("pgd_steps", 20))
    accuracies = [
        ("clean", "Clean accuracy", info.get("clean_accuracy")),
        (f"pgd{pgd_steps}", f"PGD-{pgd_steps} accuracy ({threat_model}, eps={eps_str})", info.get(f"pgd{pgd_steps}_accuracy",
                                                                                        info.get("pgd_accuracy"))),
        ("autoattack", f"AutoAttack accuracy ({threat_model}, eps={eps_str})", info.get("autoattack_accuracy")),
    ]
    eval_results = [
        EvalResult(
            task_type="image-classification", task_name="Image Classification", dataset_type=dataset_id,
            dataset_name=dataset, dataset_split=info.get("dataset_split", "test"), metric_type="accuracy",
            metric_name=name, metric_value=_percent(value), metric_config=key,
            metric_args={"threat_model": threat_model, "eps": eps_str} if key != "clean" else None,
        )
        for key, name, value in accuracies if value is not None
    ]
    tags = ["image-classification", "adversarial-training", "robustness", "cure_hf", "timm", "transformers",
            f"method-{method}"]
    for tag in info.get("tags") or []:
        if tag not in tags:
            tags.append(tag)
    robustness = {
        "architecture": info.get("architecture"),
        "threat_model": threat_model,
        "eps": eps_str,
        "clean_acc": _percent(info.get("clean_accuracy")),
        f"pgd{pgd_steps}_acc": _percent(accuracies[1][2]),
        "autoattack_acc": _percent(info.get("autoattack_accuracy")),
        "additional_data": bool(info.get("additional_data", False)),
        "dataset": dataset,
        "method": method,
    }
    model_name = info.get("model_name") or os.path.basename(os.path.abspath(output_dir))
    data = ModelCardData(
        model_name=model_name, library_name=info.get("library_name", "timm"), license=info.get("license", "apache-2.0"),
        pipeline_tag="image-classification", tags=tags, datasets=[dataset_id] if dataset != "unknown" else None,
        base_model=info.get("base_model"), metrics=["accuracy"], eval_results=eval_results or None,
        robustness=robustness,
    )
    card = ModelCard.from_template(data, template_path=TEMPLATE_FILE, **_card_text(info, robustness, model_name))
    path = os.path.join(output_dir, MODEL_CARD_NAME)
    card.save(path)
    return path


def _card_text(info: Dict[str, Any], robustness: Dict[str, Any], model_name: str) -> Dict[str, str]:
    hyper = info.get("hyperparameters") or {}
    hyper_rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in hyper.items()) or "| (not recorded) | |"

    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    pgd_key = next(k for k in robustness if k.startswith("pgd"))
    repo = info.get("repo_id") or "<repo or folder>"
    timm_name = f"hf-hub:{repo}" if info.get("repo_id") else "local-dir:<folder>"
    size = info.get("image_size")
    return {
        "model_name": model_name,
        "method": robustness["method"],
        "architecture": str(robustness["architecture"]),
        "dataset": robustness["dataset"],
        "threat_model": robustness["threat_model"],
        "eps": str(robustness["eps"]),
        "clean": fmt(robustness["clean_acc"]),
        "pgd": fmt(robustness[pgd_key]),
        "pgd_name": pgd_key.replace("_acc", "").upper(),
        "autoattack": fmt(robustness["autoattack_acc"]),
        "hyper_rows": hyper_rows,
        "timm_name": timm_name,
        "repo": repo,
        "image_size": "x".join(map(str, size)) if size else "the size in config.json",
        "mean": str(info.get("mean")),
        "std": str(info.get("std")),
        "citation": (METHODS[robustness["method"]].citation if robustness["method"] in METHODS else None) or "",
        "date": datetime.date.today().isoformat(),
    }


def card_value(value: Any, pixel: bool = False) -> Any:
    """A hyperparameter as people write it: 8/255 rather than 0.0313..., 'sgd' rather than OptimizerNames.SGD."""
    value = getattr(value, "value", value)
    if pixel and isinstance(value, float) and abs(value * 255 - round(value * 255)) < 1e-6:
        return f"{round(value * 255)}/255"
    return value
