"""Robust checkpoints anyone can load: one folder that timm and transformers both read, a model card, a push.

The folder (``save_pretrained``) holds ``model.safetensors`` (the timm network's own state dict, no
wrapper prefix), ``config.json`` in timm's Hub format and ``README.md``. It loads with

- ``timm.create_model("local-dir:<dir>", pretrained=True)`` / ``timm.create_model("hf-hub:<repo>", pretrained=True)``;
- ``transformers.AutoModelForImageClassification.from_pretrained(<dir or repo>)`` (a
  ``TimmWrapperForImageClassification``; transformers adds the ``timm_model.`` prefix on load);
- ``cure_hf.hub.load_model(<dir or repo>)`` (normalisation inside, pixels in [0, 1]).

Why the config is not timm's ``save_for_hf`` output verbatim: timm 1.0.31 records ``num_classes`` in
``model_args`` and transformers 5.24's wrapper calls ``timm.create_model(arch, num_classes=num_labels,
**model_args)``, a duplicate keyword (TypeError). ``num_classes`` stays at the config's root, where both
read it (timm as the default of its build kwargs, transformers as ``num_labels``). The in-model
normalisation becomes ``pretrained_cfg`` mean/std, the training image size becomes ``input_size`` with
``crop_pct=1``: timm's data config and transformers' ``TimmWrapperImageProcessor`` then reproduce the
trained model's logits on [0, 1] inputs.
"""
from __future__ import annotations

import datetime
import fnmatch
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import safetensors.torch
import torch
import torch.nn as nn

from .models import load_model, unwrap_normalized

__all__ = [
    "load_model", "save_pretrained", "write_model_card", "push_folder", "export_files", "CURE_CITATION",
    "WEIGHTS_NAME", "CONFIG_NAME", "MODEL_CARD_NAME",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
PREPROCESSOR_NAME = "preprocessor_config.json"

CURE_CITATION = (
    "@inproceedings{gowda2024conserve,\n  title={Conserve-Update-Revise to Cure Generalization and Robustness "
    "Trade-off in Adversarial Training},\n  author={Gowda, Shruthi and Zonooz, Bahram and Arani, Elahe},\n"
    "  booktitle={International Conference on Learning Representations},\n  year={2024}\n}"
)


def save_pretrained(
    model: nn.Module,
    output_dir: str,
    *,
    card: Optional[Dict[str, Any]] = None,
    image_size: Optional[Sequence[int]] = None,
    label_names: Optional[Sequence[str]] = None,
) -> List[str]:
    """Write ``model`` to ``output_dir`` in the format timm and transformers both load; returns the file names.

    ``model`` is a :class:`PixelNormalized` (or bare) timm model, a ``TimmWrapperForImageClassification``,
    or another transformers image-classification model (saved with its own ``save_pretrained``: transformers
    and cure_hf load it, timm has no such architecture). ``image_size`` (``(h, w)`` or an int) is the
    input size written to the config (default: the model's ``input_size``, else its pretrained config's).
    ``card``: the fields of :func:`write_model_card`; a README.md is written in any case.
    """
    from transformers import PreTrainedModel

    inner, normalized = unwrap_normalized(model)
    mean = normalized.mean.flatten().tolist() if normalized is not None else [0.0, 0.0, 0.0]
    std = normalized.std.flatten().tolist() if normalized is not None else [1.0, 1.0, 1.0]
    if image_size is None and normalized is not None:
        image_size = normalized.input_size
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    os.makedirs(output_dir, exist_ok=True)

    timm_model, config_labels = inner, None
    if type(inner).__name__ in ("TimmWrapperForImageClassification", "TimmWrapperModel"):
        timm_model = inner.timm_model
        config_labels = [inner.config.id2label[i] for i in sorted(inner.config.id2label)]
    if hasattr(timm_model, "pretrained_cfg") and hasattr(timm_model, "num_classes"):
        files = _save_timm(timm_model, output_dir, mean, std, image_size, label_names or config_labels)
        library = "timm"
    elif isinstance(inner, PreTrainedModel):
        files = _save_transformers(inner, normalized, output_dir, mean, std, image_size)
        library = "transformers"
    else:
        raise TypeError(
            f"cannot save a {type(inner).__name__}: save_pretrained writes timm models (cure_hf.load_model / "
            "timm.create_model) and transformers image-classification models; wrap yours in one of those"
        )
    info = dict(card or {})
    info.setdefault("library_name", library)
    info.setdefault("architecture", _architecture_name(timm_model if library == "timm" else inner))
    info.setdefault("image_size", list(image_size) if image_size else None)
    info.setdefault("mean", [round(v, 6) for v in mean])
    info.setdefault("std", [round(v, 6) for v in std])
    write_model_card(output_dir, info)
    return files + [MODEL_CARD_NAME]


def _architecture_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        return cfg["architecture"]
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def _save_timm(model: nn.Module, output_dir: str, mean, std, image_size, label_names) -> List[str]:
    from timm.models._hub import save_config_for_hf

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    data_config: Dict[str, Any] = {"mean": tuple(mean), "std": tuple(std), "crop_pct": 1.0, "crop_mode": "center"}
    if image_size:
        data_config["input_size"] = (int(model.pretrained_cfg.get("input_size", (3,))[0]), *map(int, image_size))
    model_config: Dict[str, Any] = {}
    if label_names:
        model_config["label_names"] = [str(name) for name in label_names]
    config_path = os.path.join(output_dir, CONFIG_NAME)
    save_config_for_hf(model, config_path, model_config=model_config, data_config=data_config)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    # transformers passes num_classes=config.num_labels itself: a second one in model_args is a TypeError.
    config.get("model_args", {}).pop("num_classes", None)
    pretrained_cfg = config["pretrained_cfg"]
    pretrained_cfg["mean"], pretrained_cfg["std"] = list(mean), list(std)
    pretrained_cfg.pop("tag", None)  # the source checkpoint's tag does not describe these weights
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return [WEIGHTS_NAME, CONFIG_NAME]


def _save_transformers(model, normalized, output_dir: str, mean, std, image_size) -> List[str]:
    model.save_pretrained(output_dir)
    files = [f for f in os.listdir(output_dir) if f == CONFIG_NAME or f.endswith(".safetensors")
             or f == "model.safetensors.index.json"]
    processor = getattr(normalized, "image_processor", None) if normalized is not None else None
    if processor is not None and hasattr(processor, "image_mean"):
        processor.image_mean, processor.image_std = list(mean), list(std)
        if image_size and hasattr(processor, "size"):
            processor.size = {"height": int(image_size[0]), "width": int(image_size[1])}
        processor.save_pretrained(output_dir)
        files.append(PREPROCESSOR_NAME)
    return sorted(set(files))


def export_files(output_dir: str) -> List[str]:
    """The files of an exported model in ``output_dir``: what a push uploads (nothing of training state)."""
    keep = (WEIGHTS_NAME, CONFIG_NAME, MODEL_CARD_NAME, PREPROCESSOR_NAME, "model.safetensors.index.json")
    return sorted(f for f in os.listdir(output_dir) if f in keep or fnmatch.fnmatch(f, "model-*-of-*.safetensors"))


# ------------------------------------------------------------------------------------------ model card
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
    card = ModelCard.from_template(data, template_str=_CARD_TEMPLATE, **_card_text(info, robustness, model_name))
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
        "citation": CURE_CITATION,
        "date": datetime.date.today().isoformat(),
    }


_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

An adversarially trained image classifier: **{{ architecture }}** trained with **{{ method }}** on
**{{ dataset }}** with cure_hf (adversarial training in the transformers `Trainer`; CURE, ICLR 2024).

## Robustness ({{ threat_model }}, eps = {{ eps }}, pixels in [0, 1])

| clean | {{ pgd_name }} | AutoAttack |
|---|---|---|
| {{ clean }} | {{ pgd }} | {{ autoattack }} |

Accuracies in percent on the evaluation split; n/a: not evaluated. eps is measured on [0, 1] pixels,
*before* the normalisation (mean {{ mean }}, std {{ std }}, stored in `config.json`).

## Training hyperparameters

| name | value |
|---|---|
{{ hyper_rows }}

## How to load

Input: RGB images at {{ image_size }}. timm (cure_hf's CIFAR networks need `import cure_hf` first):

```python
import timm, torch
model = timm.create_model("{{ timm_name }}", pretrained=True).eval()
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)   # resize to input_size, then (x - mean) / std
```

transformers:

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained("{{ repo }}").eval()
processor = AutoImageProcessor.from_pretrained("{{ repo }}")
logits = model(**processor(images)).logits
```

cure_hf (normalisation inside the model, so attacks see [0, 1] pixels):

```python
from cure_hf.hub import load_model
model = load_model("{{ repo }}")   # model(x) with x in [0, 1]
```

## Citation

```bibtex
{{ citation }}
```

_Card written by cure_hf on {{ date }}._
"""


# ------------------------------------------------------------------------------------------------ push
def push_folder(
    folder: str,
    repo_id: str,
    *,
    files: Optional[Sequence[str]] = None,
    token: Optional[str] = None,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload robust model (cure_hf)",
    run_as_future: bool = False,
):
    """Upload ``files`` of ``folder`` (default: :func:`export_files`) to the model repo ``repo_id``, created if needed.

    Uploads exactly the exported model (weights, config, card), never optimizer or RNG state. Returns the
    ``CommitInfo`` (or a ``Future`` with ``run_as_future=True``).
    """
    from huggingface_hub import HfApi

    files = list(files) if files is not None else export_files(folder)
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing or not files:
        raise FileNotFoundError(
            f"push_folder: {missing or 'no model files'} not in {folder}; write it with cure_hf.hub.save_pretrained first"
        )
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=getattr(repo_url, "repo_id", repo_id), folder_path=folder, allow_patterns=files, token=token,
        revision=revision, commit_message=commit_message, run_as_future=run_as_future,
    )


def read_config(folder: str) -> Dict[str, Any]:
    """The config.json of a saved folder."""
    with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as f:
        return json.load(f)


def load_weights_into(model: nn.Module, folder: str) -> None:
    """Load a saved folder's safetensors weights (and normalisation) into ``model`` in place, strictly.

    The inverse of :func:`save_pretrained` for a model of the same architecture: used to resume training
    and to load the best checkpoint. Refuses folders without safetensors weights.
    """
    from .models import _require_safetensors

    _require_safetensors("folder", folder)
    inner, normalized = unwrap_normalized(model)
    is_timm = type(inner).__name__.startswith("TimmWrapper") or hasattr(inner, "pretrained_cfg")
    if is_timm:
        target = inner.timm_model if type(inner).__name__.startswith("TimmWrapper") else inner
        target.load_state_dict(_read_safetensors(folder), strict=True)
    else:  # transformers renames keys between its saved and in-memory layouts: let it read its own folder
        saved = type(inner).from_pretrained(folder, use_safetensors=True)
        inner.load_state_dict(saved.state_dict(), strict=True)
    if normalized is None:
        return
    mean = std = None
    if is_timm:
        cfg = read_config(folder).get("pretrained_cfg", {})
        mean, std = cfg.get("mean"), cfg.get("std")
    elif os.path.isfile(os.path.join(folder, PREPROCESSOR_NAME)):
        with open(os.path.join(folder, PREPROCESSOR_NAME), encoding="utf-8") as f:
            processor = json.load(f)
        mean, std = processor.get("image_mean"), processor.get("image_std")
    if mean is not None and std is not None:
        normalized.mean.copy_(torch.tensor(mean, dtype=normalized.mean.dtype).view_as(normalized.mean))
        normalized.std.copy_(torch.tensor(std, dtype=normalized.std.dtype).view_as(normalized.std))


def _read_safetensors(folder: str) -> Dict[str, torch.Tensor]:
    """The state dict of ``model.safetensors``, or of the shards listed in ``model.safetensors.index.json``."""
    single = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(single):
        return safetensors.torch.load_file(single, device="cpu")
    with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    state: Dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(safetensors.torch.load_file(os.path.join(folder, shard), device="cpu"))
    return state
