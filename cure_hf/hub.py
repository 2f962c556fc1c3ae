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
normalisation becomes ``pretrained_cfg`` mean/std and the preprocessing of training (input size, interpolation,
``crop_pct``, ``crop_mode``) the rest of the data config: timm's ``create_transform`` and transformers'
``TimmWrapperImageProcessor`` then reproduce the trained model's pixels, hence its logits.

A transformers-native model is saved by its own ``save_pretrained`` with a ``preprocessor_config.json`` that
carries the in-model mean/std and the training size. ``config.json`` records which files the save wrote
(key ``cure_hf``): a later save replaces exactly those, refuses to overwrite files cure_hf did not write, and a
push uploads only them.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import safetensors.torch
import torch
import torch.nn as nn

from .files import chmod_as_umask
from .modelcard import MODEL_CARD_MARKER, MODEL_CARD_NAME, write_model_card
from .models import (
    _height_width,
    _in_model_normalisation,
    conform_image_processor,
    load_model,
    logits_index,
    model_data_config,
    model_preprocessing,
    unwrap_normalized,
)

__all__ = [
    "load_model",
    "save_pretrained",
    "copy_export",
    "push_folder",
    "export_files",
    "export_preprocessing",
    "card_fields",
    "load_weights_into",
    "read_config",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "MODEL_CARD_NAME",
    "PREPROCESSOR_NAME",
    "EXPORT_MARKER",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SHARD_PATTERN = "model-*-of-*.safetensors"
# config.json key of a cure_hf save: {"version": ..., "files": [the files that save wrote]}
EXPORT_MARKER = "cure_hf"


def save_pretrained(
    model: nn.Module,
    output_dir: str,
    *,
    card: Optional[Dict[str, Any]] = None,
    image_size: Optional[Union[int, Sequence[int]]] = None,
    label_names: Optional[Sequence[str]] = None,
    processing_class: Any = None,
    preprocessing: Any = None,
    max_shard_size: Optional[Union[int, str]] = None,
) -> List[str]:
    """Write ``model`` to ``output_dir`` in the format timm and transformers both load; returns the file names.

    ``model`` is a :class:`PixelNormalized` (or bare) timm model, a ``TimmWrapperForImageClassification``,
    or another transformers image-classification model (saved with its own ``save_pretrained``: transformers
    and cure_hf load it, timm has no such architecture), optionally inside a :class:`cure_hf.models.SelectLogits`
    (the network inside is saved; config.json records the logits index for :func:`load_model`).

    The folder records the preprocessing: ``preprocessing`` (what the data pipeline did, e.g.
    ``cure_hf.data.dataset_preprocessing(train)``: a timm data config or an image processor), else the model's own
    (:func:`cure_hf.models.model_preprocessing`) with ``image_size`` (``(h, w)`` or an int: whole images resized to
    it) when given. ``processing_class``: an image processor saved with a transformers-native model, as a copy with
    the model's mean/std/size (a warning names what had to change); a timm folder's processor is its config.json.
    ``label_names`` become timm's ``label_names`` and transformers' ``id2label``/``label2id``. ``max_shard_size``
    (transformers-native only) splits the weights. ``card``: the fields of :func:`write_model_card`.

    Files from an earlier cure_hf save in ``output_dir`` are replaced and those this save does not write (e.g. old
    weight shards) removed; files cure_hf did not write (a README.md, config.json, weights of your own) are
    never overwritten: the save is refused.
    """
    os.makedirs(output_dir, exist_ok=True)
    previous = _previous_export(output_dir)
    library, exported = export_preprocessing(model, preprocessing, image_size)
    inner, _ = unwrap_normalized(model)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".cure_hf-save-") as staging:
        if library == "timm":
            if max_shard_size is not None:
                raise ValueError(
                    f"max_shard_size={max_shard_size!r}: a timm folder holds one model.safetensors "
                    "(timm loads no shards); leave max_shard_size unset"
                )
            timm_model = getattr(inner, "timm_model", inner)
            config_labels = None
            if timm_model is not inner:  # TimmWrapper: its config has the label names
                config_labels = [inner.config.id2label[i] for i in sorted(inner.config.id2label)]
            _save_timm(timm_model, staging, exported, label_names or config_labels)
            _warn_unsaved_processor(processing_class)
        else:
            _save_transformers(inner, staging, label_names, max_shard_size)
            processor = _consistent_processor(processing_class, exported) if processing_class is not None else exported
            processor.save_pretrained(staging)
        info = {**card_fields(model, (library, exported)), **(card or {})}
        write_model_card(staging, info)
        files = sorted(os.listdir(staging))
        _mark_export(staging, files, logits_index(model))
        for name in files:
            chmod_as_umask(os.path.join(staging, name))  # safetensors writes 0600: give what open() would
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    for name in sorted(set(previous) - set(files)):
        os.remove(os.path.join(output_dir, name))  # e.g. weight shards of an earlier, larger save
    return files


def export_preprocessing(
    model: nn.Module, preprocessing: Any = None, image_size: Optional[Union[int, Sequence[int]]] = None
) -> Tuple[str, Any]:
    """``("timm", data config)`` or ``("transformers", image processor)``: the format a save writes and the
    preprocessing it records, with the model's in-model mean/std (see :func:`save_pretrained`)."""
    from transformers import PreTrainedModel

    inner, normalized = unwrap_normalized(model)
    mean, std = _in_model_normalisation(normalized)
    size = _height_width(image_size, "image_size")
    if hasattr(getattr(inner, "timm_model", inner), "pretrained_cfg"):
        if isinstance(preprocessing, dict):
            data_config = dict(preprocessing)
        else:
            if preprocessing is not None:
                logger.warning(
                    "the data was made by a %s, but a timm folder records a timm data config; saving "
                    "the model's own preprocessing",
                    type(preprocessing).__name__,
                )
            data_config = model_data_config(model)
            if size is not None:
                data_config.update(input_size=(data_config["input_size"][0], *size), crop_pct=1.0)
        data_config.update(mean=tuple(mean), std=tuple(std))
        return "timm", data_config
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(
            f"cannot save a {type(inner).__name__}: save_pretrained writes timm models (cure_hf.load_model / "
            "timm.create_model) and transformers image-classification models; wrap yours in one of those"
        )
    if isinstance(preprocessing, dict):
        processor, size = _processor_from_data_config(preprocessing), size or tuple(preprocessing["input_size"][-2:])
    elif preprocessing is not None:
        processor = preprocessing
    else:
        processor = model_preprocessing(model)
    processor, _ = conform_image_processor(
        processor, mean, std, size or (normalized.input_size if normalized else None)
    )
    return "transformers", processor


def _processor_from_data_config(data_config: Dict[str, Any]):
    """A transformers processor that resizes whole images as the timm data config says (it cannot crop like timm)."""
    from PIL import Image
    from transformers import ViTImageProcessor

    if data_config.get("crop_mode") != "squash":
        logger.warning(
            "the data was cropped (crop_mode=%s, crop_pct=%s), which a transformers image processor "
            "cannot record; preprocessor_config.json resizes whole images. Build the data transform from "
            "the model (cure_hf.data.set_preprocessing(data, model)) to save what training did",
            data_config.get("crop_mode"),
            data_config.get("crop_pct"),
        )
    height, width = data_config["input_size"][-2:]
    resample = Image.Resampling[str(data_config.get("interpolation", "bilinear")).upper()]
    return ViTImageProcessor(size={"height": int(height), "width": int(width)}, resample=resample)


def _consistent_processor(processing_class: Any, exported):
    """The user's image processor, as a copy with the model's mean/std/size; a warning names what changed."""
    if not hasattr(processing_class, "to_dict") or not callable(getattr(processing_class, "preprocess", None)):
        logger.warning(
            "processing_class is a %s, not an image processor: it is not saved; the folder's "
            "preprocessor_config.json comes from the model",
            type(processing_class).__name__,
        )
        return exported
    settings = exported.to_dict()
    size = settings["size"]
    size = (size["height"], size["width"]) if "height" in size else None
    processor, changes = conform_image_processor(processing_class, settings["image_mean"], settings["image_std"], size)
    if changes:
        logger.warning(
            "processing_class (%s) disagrees with the model, which normalises inside and was trained at "
            "its input size; saved a copy with the model's values (%s). Your object is unchanged.",
            type(processing_class).__name__,
            "; ".join(changes),
        )
    return processor


def _warn_unsaved_processor(processing_class: Any) -> None:
    if processing_class is None or type(processing_class).__name__ == "TimmWrapperImageProcessor":
        return
    logger.warning(
        "processing_class (%s) is not saved: a timm folder's preprocessing is config.json's pretrained_cfg, which "
        "timm and transformers (AutoImageProcessor -> TimmWrapperImageProcessor) both read; a preprocessor_config.json "
        "would make transformers preprocess differently from timm",
        type(processing_class).__name__,
    )


def card_fields(model: nn.Module, exported: Optional[Tuple[str, Any]] = None) -> Dict[str, Any]:
    """The model card's fields that come from the model and its saved preprocessing: ``library_name`` (the folder's
    format), ``architecture``, ``image_size``, ``mean``, ``std``, ``base_model``."""
    library, preprocessing = exported or export_preprocessing(model)
    inner, normalized = unwrap_normalized(model)
    if library == "timm":
        timm_model = getattr(inner, "timm_model", inner)
        architecture = timm_model.pretrained_cfg.get("architecture") or type(timm_model).__name__
        size, mean, std = preprocessing["input_size"][-2:], preprocessing["mean"], preprocessing["std"]
    else:
        archs = getattr(inner.config, "architectures", None)
        architecture = archs[0] if archs else type(inner).__name__
        settings = preprocessing.to_dict()
        size = settings.get("crop_size") if settings.get("do_center_crop") else settings.get("size")
        size = (size["height"], size["width"]) if size and "height" in size else None
        mean, std = settings["image_mean"], settings["image_std"]
    return {
        "library_name": library,
        "architecture": architecture,
        "image_size": [int(v) for v in size] if size else None,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "base_model": getattr(normalized, "source", None),
    }


def _save_timm(model: nn.Module, output_dir: str, data_config: Dict[str, Any], label_names) -> None:
    from timm.models._hub import save_config_for_hf

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(output_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    model_config: Dict[str, Any] = {}
    if label_names:
        model_config["label_names"] = [str(name) for name in label_names]
    config_path = os.path.join(output_dir, CONFIG_NAME)
    save_config_for_hf(model, config_path, model_config=model_config, data_config=data_config)
    config = read_config(output_dir)
    # transformers passes num_classes=config.num_labels itself: a second one in model_args is a TypeError.
    config.get("model_args", {}).pop("num_classes", None)
    pretrained_cfg = config["pretrained_cfg"]
    pretrained_cfg["mean"], pretrained_cfg["std"] = list(data_config["mean"]), list(data_config["std"])
    pretrained_cfg.pop("tag", None)  # the source checkpoint's tag does not describe these weights
    _write_config(output_dir, config)


def _save_transformers(model, output_dir: str, label_names, max_shard_size) -> None:
    model.save_pretrained(output_dir, **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))
    if not label_names:
        return
    config = read_config(output_dir)
    names = [str(name) for name in label_names]
    if len(names) != model.config.num_labels:
        logger.warning(
            "%d label names for a model with %d outputs: config.json keeps its id2label",
            len(names),
            model.config.num_labels,
        )
        return
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    _write_config(output_dir, config)


def _write_config(folder: str, config: Dict[str, Any]) -> None:
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def _mark_export(folder: str, files: List[str], index: Optional[int] = None) -> None:
    from . import __version__

    config = read_config(folder)
    config[EXPORT_MARKER] = {"version": __version__, "files": files}
    if index is not None:  # a SelectLogits: cure_hf.load_model wraps the loaded network in one again
        config[EXPORT_MARKER]["logits_index"] = index
    _write_config(folder, config)


def _is_export_name(name: str) -> bool:
    return name in (
        WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        CONFIG_NAME,
        MODEL_CARD_NAME,
        PREPROCESSOR_NAME,
    ) or fnmatch.fnmatch(name, SHARD_PATTERN)


def _previous_export(output_dir: str) -> List[str]:
    """The files of an earlier cure_hf save in ``output_dir`` (a new save replaces them); raises when the folder
    holds export-named files (README.md, config.json, weights, processor) that cure_hf did not write."""
    present = [name for name in sorted(os.listdir(output_dir)) if _is_export_name(name)]
    ours = set()
    config_path = os.path.join(output_dir, CONFIG_NAME)
    if os.path.isfile(config_path):
        try:
            marked = EXPORT_MARKER in read_config(output_dir)
        except (ValueError, UnicodeDecodeError):
            marked = False
        if marked:  # the weights and processor beside a cure_hf config.json are that save's (or a copy's)
            ours = {name for name in present if name != MODEL_CARD_NAME}
    card_path = os.path.join(output_dir, MODEL_CARD_NAME)
    if os.path.isfile(card_path):
        with open(card_path, encoding="utf-8", errors="replace") as f:
            if MODEL_CARD_MARKER in f.read():
                ours.add(MODEL_CARD_NAME)
    foreign = [name for name in present if name not in ours]
    if foreign:
        raise FileExistsError(
            f"{output_dir} already holds {foreign}, which cure_hf did not write (no cure_hf marker); saving there "
            "would overwrite them or leave them contradicting the new model. Save into another folder (e.g. a new "
            "output_dir), or move these files away first."
        )
    return sorted(ours)


def copy_export(source_folder: str, output_dir: str) -> List[str]:
    """Copy the exported model of ``source_folder`` (e.g. a checkpoint) into ``output_dir``; returns the file names.

    The same rule as :func:`save_pretrained`: files of an earlier cure_hf save in ``output_dir`` are replaced and
    those the copy does not bring removed; files cure_hf did not write are never overwritten: the copy is refused
    (FileExistsError) before any file is touched.
    """
    os.makedirs(output_dir, exist_ok=True)
    previous = _previous_export(output_dir)
    files = export_files(source_folder)
    for name in files:
        shutil.copy(os.path.join(source_folder, name), os.path.join(output_dir, name))
        chmod_as_umask(os.path.join(output_dir, name))  # not the source's mode (an older save's may be 0600)
    for name in sorted(set(previous) - set(files)):
        os.remove(os.path.join(output_dir, name))  # e.g. weight shards of an earlier, larger save
    return files


def export_files(output_dir: str) -> List[str]:
    """The files of the exported model in ``output_dir``: what a push uploads (nothing of training state).

    Those the last cure_hf save wrote (listed in its config.json); for a folder without that record, the model
    files by name.
    """
    try:
        listed = read_config(output_dir).get(EXPORT_MARKER, {}).get("files")
    except (OSError, ValueError):
        listed = None
    if listed is not None:
        return sorted(name for name in listed if os.path.isfile(os.path.join(output_dir, name)))
    return sorted(name for name in os.listdir(output_dir) if _is_export_name(name))


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
        repo_id=getattr(repo_url, "repo_id", repo_id),
        folder_path=folder,
        allow_patterns=files,
        token=token,
        revision=revision,
        commit_message=commit_message,
        run_as_future=run_as_future,
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
