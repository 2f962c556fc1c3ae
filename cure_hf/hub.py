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


class HubCheckpointMixin:
    """`CURETrainer`'s saving: every save writes this module's folder (model.safetensors + timm config.json +
    README.md), which loads in timm, transformers and cure_hf; checkpoints add the revision model
    (revision.safetensors: weights, step counter, generator); pushes upload the exported folder only.
    """

    # Every save writes cure_hf.hub's folder (model.safetensors + timm config.json + README.md), which loads
    # in timm, transformers and cure_hf; checkpoints add revision.safetensors; pushes upload that folder only.
    revision_weights_name = "revision.safetensors"
    card_overrides: Optional[Dict[str, Any]] = None  # model-card fields, e.g. {"dataset": "CIFAR-10", "dataset_id": ...}

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_pretrained(self.accelerator.unwrap_model(self.model), output_dir, card=self.model_card_info(),
                        image_size=self._export_image_size(), label_names=self._label_names())
        # The arguments as JSON, not the Trainer's pickled training_args.bin: nothing here needs torch.load.
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    def _save_rng_state(self, output_dir: str) -> None:
        """Checkpoints only: with the RNG states, the revision model (weights, step counter, generator)."""
        super()._save_rng_state(output_dir)
        if self.revision is None or not self.args.should_save:
            return
        import safetensors.torch

        tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.revision.module.state_dict().items()}
        tensors["generator_state"] = self.revision.generator.get_state()
        metadata = {"format": "pt", "step": str(self.revision.step), "rate": repr(self.revision.rate),
                    "decay": repr(self.revision.decay)}
        safetensors.torch.save_file(tensors, os.path.join(output_dir, self.revision_weights_name), metadata=metadata)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Weights from the checkpoint's safetensors (refusing pickles); the revision model follows lazily."""
        load_weights_into(model if model is not None else self.model, resume_from_checkpoint)
        revision_file = os.path.join(resume_from_checkpoint, self.revision_weights_name)
        self._revision_checkpoint = revision_file if os.path.isfile(revision_file) else None
        # (a checkpoint written during a natural warm-up has no revision yet: it is created at the switch)
        if self.method.uses_revision and self._revision_checkpoint is None and not self.args.natural_warmup_epochs:
            raise ValueError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} has no {self.revision_weights_name}, which "
                f"adv_method={self.args.adv_method!r} needs to resume its revision model; resume from a checkpoint "
                "written by CURETrainer with save_only_model=False"
            )
        if self.revision is not None:
            self._restore_revision()

    def _restore_revision(self) -> None:
        path = getattr(self, "_revision_checkpoint", None)
        if path is None or self.revision is None:
            return
        import safetensors
        import safetensors.torch

        tensors = safetensors.torch.load_file(path, device="cpu")
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        module_state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        self.revision.module.load_state_dict(module_state, strict=True)
        self.revision.load_state({"step": int(metadata["step"]), "generator": tensors["generator_state"]})
        self._revision_checkpoint = None

    def _load_best_model(self) -> None:
        load_weights_into(self.model, self.state.best_model_checkpoint)

    def _export_image_size(self) -> Optional[tuple]:
        """The training image size, written to config.json so timm/transformers preprocessing resize to it."""
        _, normalized = unwrap_normalized(self.accelerator.unwrap_model(self.model))
        if normalized is not None and normalized.input_size is not None:
            return normalized.input_size
        for dataset in (self.train_dataset, self.eval_dataset):
            if isinstance(dataset, dict):
                dataset = next(iter(dataset.values()), None)
            try:
                pixels = dataset[0]["pixel_values"]
                return tuple(int(v) for v in pixels.shape[-2:])
            except (TypeError, KeyError, IndexError, AttributeError):
                continue
        return None

    def _label_names(self) -> Optional[List[str]]:
        dataset = self.train_dataset
        features = getattr(dataset, "features", None) or {}
        for key in ("labels", "label"):
            names = getattr(features.get(key), "names", None) if hasattr(features, "get") else None
            if names:
                return list(names)
        return None

    def _latest_eval_metrics(self) -> Dict[str, float]:
        for entry in reversed(self.state.log_history):
            if any(k.startswith("eval_") and k.endswith("accuracy") for k in entry):
                return entry
        return {}

    def model_card_info(self, **overrides) -> Dict[str, Any]:
        """The fields of the model card (see `cure_hf.hub.write_model_card`), from the arguments and last evaluation."""
        args, eval_metrics = self.args, self._latest_eval_metrics()
        # with a validation split the test numbers are eval_test_*; the card reports test accuracy
        prefix = "eval_test_" if "eval_test_accuracy" in eval_metrics else "eval_"
        steps = args.eval_pgd_steps
        hyper_names = ["adv_method", "epsilon", "attack_step_size", "attack_steps", "learning_rate", "weight_decay",
                       "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                       "optim", "seed"]
        if self.method.uses_revision:
            hyper_names += ["conserve_fraction", "clean_weight", "consistency_weight", "revision_rate",
                            "revision_decay", "prominence", "conservation"]
        elif args.adv_method in ("trades", "mart"):
            hyper_names += ["trades_beta"]
        eps = args.resolved_eval_epsilon
        _, normalized = unwrap_normalized(self.accelerator.unwrap_model(self.model))
        source = getattr(normalized, "source", None)
        dataset = getattr(getattr(self.train_dataset, "info", None), "dataset_name", None)
        info = {
            "model_name": (self.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))).split("/")[-1],
            "repo_id": self.hub_model_id,
            "method": args.adv_method,
            "hyperparameters": {name: _card_value(getattr(args, name), pixel=name in ("epsilon", "attack_step_size"))
                                for name in hyper_names if hasattr(args, name)},
            "dataset": dataset or "unknown",
            "threat_model": "Linf",
            "eps": _card_value(eps, pixel=True),
            "pgd_steps": steps,
            "clean_accuracy": eval_metrics.get(f"{prefix}accuracy"),
            f"pgd{steps}_accuracy": eval_metrics.get(f"{prefix}pgd{steps}_accuracy"),
            "autoattack_accuracy": eval_metrics.get(f"{prefix}autoattack_accuracy"),
            "additional_data": False,
            "base_model": source,
            "tags": [f"method-{args.adv_method}"] + list(self._tag_names),
        }
        info.update(self.card_overrides or {})
        info.update(overrides)
        return info

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:
        """The cure_hf model card in `output_dir/README.md` (also written with every save)."""
        if not self.is_world_process_zero():
            return
        overrides = {k: v for k, v in dict(license=license, model_name=model_name, base_model=finetuned_from,
                                           dataset=dataset, **kwargs).items() if v is not None}
        info = self.model_card_info(**overrides)
        if tags:
            info["tags"] = list(info["tags"]) + ([tags] if isinstance(tags, str) else list(tags))
        info.setdefault("image_size", self._export_image_size())
        write_model_card(self.args.output_dir, info)

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None, private: Optional[bool] = None,
                    **kwargs):
        """Save the model folder to `output_dir` and upload exactly its exported files (weights, config, card).

        Keyword arguments go to the model card (`finetuned_from`, `dataset`, `tags`, `license`, `model_name`).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        card = {k: v for k, v in dict(base_model=kwargs.pop("finetuned_from", None), **kwargs).items() if v is not None}
        self.card_overrides = {**(self.card_overrides or {}), **card}
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        return push_folder(
            self.args.output_dir, self.hub_model_id, files=export_files(self.args.output_dir), token=token,
            private=private, revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message, run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """During training (hub_strategy every_save/checkpoint/all_checkpoints): the checkpoint's model folder."""
        import shutil

        from huggingface_hub import HfApi
        from transformers.trainer_utils import HubStrategy
        from transformers.utils.hub import PushInProgress

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        files = export_files(checkpoint_folder)
        for name in files:
            shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
        message = f"Training in progress, step {self.state.global_step}"
        jobs = [push_folder(self.args.output_dir, self.hub_model_id, files=files, token=self.args.hub_token,
                            revision=self.args.hub_revision, commit_message=message, run_as_future=True)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else os.path.basename(
                checkpoint_folder)
            jobs.append(HfApi().upload_folder(
                repo_id=self.hub_model_id, folder_path=checkpoint_folder, path_in_repo=path_in_repo,
                commit_message=message + ", checkpoint", token=self.args.hub_token, run_as_future=True,
                revision=self.args.hub_revision,
            ))
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)


def _card_value(value: Any, pixel: bool = False) -> Any:
    """A hyperparameter as people write it: 8/255 rather than 0.0313..., 'sgd' rather than OptimizerNames.SGD."""
    value = getattr(value, "value", value)
    if pixel and isinstance(value, float) and abs(value * 255 - round(value * 255)) < 1e-6:
        return f"{round(value * 255)}/255"
    return value
