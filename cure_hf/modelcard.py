"""The model card (README.md) of a saved robust model: YAML metadata with `model-index` results and the
RobustBench fields, then prose from the template file `templates/modelcard_template.md`.

Every piece of user text (model and dataset names, hyperparameter values, ...) is escaped before it reaches the
markdown body, so a name cannot inject HTML or markdown; the YAML front matter is written by huggingface_hub.
"""

from __future__ import annotations

import datetime
import html
import logging
import os
import re
from typing import Any, Dict, Optional

from .methods import registered_methods

__all__ = ["write_model_card", "card_value", "escape_markdown", "MODEL_CARD_NAME", "MODEL_CARD_MARKER", "TEMPLATE_FILE"]

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
# In every card cure_hf writes: a README.md without it is the user's, and cure_hf never overwrites it.
MODEL_CARD_MARKER = "<!-- cure_hf model card -->"
TEMPLATE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "modelcard_template.md")

_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]|~#{}])")
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_.,+\-/() ]*$")


def escape_markdown(value: Any) -> str:
    """``value`` as literal text in markdown: HTML escaped, markdown control characters backslash-escaped, one line."""
    text = " ".join(str(value).split())
    return _MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(text, quote=True))


def _percent(value: Optional[float]) -> Optional[float]:
    """Accuracy as a percentage with two decimals (RobustBench style), from a fraction or a percentage."""
    if value is None:
        return None
    value = float(value)
    return round(value * 100.0 if value <= 1.0 else value, 2)


def _hub_id(value: Any) -> Optional[str]:
    """``value`` if it is a valid Hub repo id (what `datasets:` and `base_model` must hold), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value:
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def write_model_card(output_dir: str, info: Dict[str, Any]) -> str:
    """Write ``README.md``: YAML metadata with ``model-index`` results and RobustBench-like fields, then prose.

    ``info`` keys (all optional): ``model_name``, ``architecture``, ``method`` (the name of a registered method:
    the card cites that method's paper), ``hyperparameters`` (dict), ``dataset`` (name), ``dataset_id`` (Hub id:
    the card's ``datasets:``), ``dataset_split``, ``threat_model`` ("Linf"), ``eps`` ("8/255" or a float),
    ``clean_accuracy``, ``pgd20_accuracy``, ``autoattack_accuracy`` (fractions or percentages), ``pgd_steps``,
    ``additional_data`` (bool), ``base_model`` (Hub id), ``license``, ``tags``, ``library_name`` (the folder's
    format, "timm" or "transformers": the loading snippets follow it), ``image_size``, ``mean``, ``std``,
    ``repo_id``, ``weight_averaging`` (how the published weights were averaged: a description or a dict).
    Refuses to overwrite a README.md that cure_hf did not write. Returns the path written.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    path = os.path.join(output_dir, MODEL_CARD_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            if MODEL_CARD_MARKER not in f.read():
                raise FileExistsError(
                    f"{path} exists and cure_hf did not write it; the model card would overwrite "
                    "it. Save into another folder, or move your README.md away first."
                )
    method = info.get("method") or "unknown"
    dataset = info.get("dataset") or "unknown"
    dataset_id = _hub_id(info.get("dataset_id"))
    threat_model = info.get("threat_model", "Linf")
    eps = info.get("eps")
    eps_str = eps if isinstance(eps, str) or eps is None else f"{float(eps):.6g}"
    pgd_steps = int(info.get("pgd_steps", 20))
    accuracies = [
        ("clean", "Clean accuracy", info.get("clean_accuracy")),
        (
            f"pgd{pgd_steps}",
            f"PGD-{pgd_steps} accuracy ({threat_model}, eps={eps_str})",
            info.get(f"pgd{pgd_steps}_accuracy", info.get("pgd_accuracy")),
        ),
        ("autoattack", f"AutoAttack accuracy ({threat_model}, eps={eps_str})", info.get("autoattack_accuracy")),
    ]
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_id or dataset,
            dataset_name=dataset,
            dataset_split=info.get("dataset_split", "test"),
            metric_type="accuracy",
            metric_name=name,
            metric_value=_percent(value),
            metric_config=key,
            metric_args={"threat_model": threat_model, "eps": eps_str} if key != "clean" else None,
        )
        for key, name, value in accuracies
        if value is not None
    ]
    library = info.get("library_name", "timm")
    tags = ["image-classification", "adversarial-training", "robustness", "cure_hf"]
    tags += ["timm", "transformers"] if library == "timm" else ["transformers"]
    for tag in [f"method-{method}"] + list(info.get("tags") or []):
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
    base_model = _hub_id(info.get("base_model"))
    if info.get("base_model") and base_model is None:
        logger.warning("base_model=%r is not a Hub repo id; the card leaves base_model out", info.get("base_model"))
    model_name = info.get("model_name") or os.path.basename(os.path.abspath(output_dir))
    data = ModelCardData(
        model_name=model_name,
        library_name=library,
        license=info.get("license", "apache-2.0"),
        pipeline_tag="image-classification",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        base_model=base_model,
        metrics=["accuracy"],
        eval_results=eval_results or None,
        robustness=robustness,
    )
    card = ModelCard.from_template(data, template_path=TEMPLATE_FILE, **_card_text(info, robustness, model_name))
    card.save(path)
    return path


def _card_text(info: Dict[str, Any], robustness: Dict[str, Any], model_name: str) -> Dict[str, str]:
    """The template's variables: user text escaped, code-block values only from validated ids."""
    hyper = info.get("hyperparameters") or {}
    hyper_rows = "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in hyper.items()) or "| (not recorded) | |"

    def fmt(v):
        return "n/a" if v is None else f"{v:.2f}"

    pgd_key = next(k for k in robustness if k.startswith("pgd"))
    repo_id = _hub_id(info.get("repo_id"))
    size = info.get("image_size")
    method = registered_methods().get(robustness["method"])
    return {
        "marker": MODEL_CARD_MARKER,
        "model_name": escape_markdown(model_name),
        "method": escape_markdown(method.title if method else robustness["method"]),
        "architecture": escape_markdown(robustness["architecture"]),
        "dataset": escape_markdown(robustness["dataset"]),
        "threat_model": escape_markdown(robustness["threat_model"]),
        "eps": escape_markdown(robustness["eps"]),
        "clean": fmt(robustness["clean_acc"]),
        "pgd": fmt(robustness[pgd_key]),
        "pgd_name": "PGD-" + pgd_key[len("pgd") : -len("_acc")],
        "autoattack": fmt(robustness["autoattack_acc"]),
        "hyper_rows": hyper_rows,
        "weight_averaging": _describe(info.get("weight_averaging")),
        "library_name": info.get("library_name", "timm"),
        "timm_name": f"hf-hub:{repo_id}" if repo_id else "local-dir:<folder>",
        "repo": repo_id or "<repo or folder>",
        "image_size": "x".join(escape_markdown(v) for v in size) if size else "the size the folder records",
        "mean": escape_markdown(info.get("mean")),
        "std": escape_markdown(info.get("std")),
        "versions": _framework_versions(),
        "citation": (method.citation if method else None) or "",
        "date": datetime.date.today().isoformat(),
    }


def _cell(value: Any) -> str:
    """A table cell: plain identifiers and numbers as code, anything else as escaped text."""
    text = str(value)
    return f"`{text}`" if _PLAIN_VALUE.match(text) else escape_markdown(text)


def _describe(value: Any) -> str:
    """The weight averaging as escaped text ("" when the weights are not averaged)."""
    if not value:
        return ""
    if isinstance(value, dict):
        value = ", ".join(f"{k}={v}" for k, v in value.items())
    return "yes" if value is True else escape_markdown(value)


def _framework_versions() -> str:
    import timm
    import torch
    import transformers

    from . import __version__

    return "\n".join(
        f"- {name} {version}"
        for name, version in (
            ("cure_hf", __version__),
            ("PyTorch", torch.__version__),
            ("transformers", transformers.__version__),
            ("timm", timm.__version__),
        )
    )


def card_value(value: Any, pixel: bool = False) -> Any:
    """A hyperparameter as people write it: 8/255 rather than 0.0313..., 'sgd' rather than OptimizerNames.SGD."""
    value = getattr(value, "value", value)
    if pixel and isinstance(value, float) and abs(value * 255 - round(value * 255)) < 1e-6:
        return f"{round(value * 255)}/255"
    return value
