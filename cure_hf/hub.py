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

import fnmatch
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import safetensors.torch
import torch
import torch.nn as nn

from .modelcard import MODEL_CARD_NAME, write_model_card
from .models import load_model, unwrap_normalized

__all__ = [
    "load_model", "save_pretrained", "push_folder", "export_files", "load_weights_into", "read_config",
    "WEIGHTS_NAME", "CONFIG_NAME", "MODEL_CARD_NAME", "PREPROCESSOR_NAME",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"

def save_pretrained(
    model: nn.Module,
    output_dir: str,
    *,
    card: Optional[Dict[str, Any]] = None,
    image_size: Optional[Sequence[int]] = None,
    label_names: Optional[Sequence[str]] = None,
    processing_class: Any = None,
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
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(output_dir)
        files = sorted(set(files) | {PREPROCESSOR_NAME} & set(os.listdir(output_dir)))
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
