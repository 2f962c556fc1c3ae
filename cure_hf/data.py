"""Data: the embedded digits default, Hub/imagefolder datasets, transforms to pixels in [0, 1], collator.

The default needs no network: scikit-learn ships the UCI digits (1797 real 8x8 grey images); they are
upsampled to 32x32x3 and split once, with a fixed seed, into train (1437) and test (360).

One preprocessing truth: the transforms come from the model (``image_transform(model, ...)``,
``set_preprocessing(data, model)``): timm's data config through timm's own ``create_transform``, or a transformers
model's image processor, without the normalisation, which lives inside the model. The saved folder records the
same preprocessing, so timm, transformers and cure_hf reproduce the evaluation pixels of training.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "load_digits_dataset",
    "load_image_dataset",
    "image_transform",
    "set_preprocessing",
    "dataset_preprocessing",
    "dataset_augmentation",
    "dataset_label_feature",
    "dataset_card_fields",
    "collate_pixels",
    "split_validation",
    "DIGITS_DATASET_NAME",
]

logger = logging.getLogger(__name__)

# The card's name of the embedded default: it has no Hub id, so the card gets no `datasets:` entry for it.
DIGITS_DATASET_NAME = "scikit-learn digits (UCI, embedded in cure_hf)"


def load_digits_dataset(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """The embedded default: a ``DatasetDict`` with "train"/"test", columns "image" (PIL RGB) and "label";
    ``info.dataset_name`` is :data:`DIGITS_DATASET_NAME`."""
    import torch.nn.functional as F
    from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    big = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
    pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})

    def subset(idx):
        return Dataset.from_dict(
            {"image": [PILImage.fromarray(pixels[i]) for i in idx], "label": labels[idx].tolist()},
            info=DatasetInfo(dataset_name=DIGITS_DATASET_NAME, features=features),
        )

    return DatasetDict(train=subset(train_idx), test=subset(test_idx))


Preprocessing = Union[int, Sequence[int], Dict[str, Any], Any]


AUGMENTATIONS = ("none", "crop_flip", "crop", "timm")


def image_transform(
    preprocessing: Preprocessing,
    *,
    train: bool,
    augment: str = "none",
    augment_options: Optional[Dict[str, Any]] = None,
    image_column: str = "image",
    label_column: str = "label",
) -> Callable[[Dict[str, List]], Dict[str, List]]:
    """A ``datasets.set_transform`` function: images -> "pixel_values" (3xHxW floats in [0, 1]), "labels".

    ``preprocessing`` says how pixels are made, best straight from the model:

    - a model (timm, :class:`~cure_hf.models.PixelNormalized`, transformers): its own preprocessing
      (:func:`cure_hf.models.model_preprocessing`), the one its saved folder records;
    - a timm data config (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``): ``timm.data.create_transform``;
    - a transformers image processor: the processor itself, with ``do_normalize=False``;
    - an int or ``(height, width)``: a bilinear resize of the whole image to that size (what earlier versions did).

    ``augment``: "none", "crop_flip" (random crop with 4-pixel padding and horizontal flip, the paper's), or
    "crop" (the same crop without the flip: for digits and text, whose mirror image is another symbol),
    on top of the evaluation pixels; or "timm", ImageNet-style: timm's training transform
    (``timm.data.create_transform(is_training=True)``: random-resized crop, flip, colour jitter or RandAugment,
    random erasing) at the input size and interpolation of the same preprocessing, in place of the evaluation
    pixels (:mod:`cure_hf.augmentation`). ``augment_options`` set its options (``crop_scale``, ``crop_ratio``,
    ``hflip``, ``color_jitter``, ``auto_augment``, ``random_erasing``, ``random_erasing_mode``,
    ``random_erasing_count``; unset: timm's defaults); they are refused with any other ``augment``. Evaluation
    transforms (``train=False``) never augment. No normalisation here: it lives inside the model. The returned
    function keeps its settings as attributes (``preprocessing``, ``train``, ``augment``, ``augment_options`` (every
    option "timm" ran with, defaults included; ``{}`` for the others), ``image_column``, ``label_column``).
    """
    from torchvision import transforms as T

    from .augmentation import TIMM_AUGMENT, resolve_augment_options

    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r} is not one of {', '.join(map(repr, AUGMENTATIONS))}")
    options = resolve_augment_options(augment, augment_options)
    preprocessing = _resolve_preprocessing(preprocessing)
    timm_format = isinstance(preprocessing, dict)
    if train and augment == TIMM_AUGMENT:
        pixels = _timm_train_pixels(preprocessing, options)
    else:
        pixels = _timm_pixels(preprocessing) if timm_format else _processor_pixels(preprocessing)
    augmentation = None
    if train and augment not in ("none", TIMM_AUGMENT):
        size = (
            tuple(preprocessing["input_size"][-2:]) if timm_format else _processor_output_size(preprocessing, augment)
        )
        flip = [T.RandomHorizontalFlip()] if augment == "crop_flip" else []
        augmentation = T.Compose([T.RandomCrop(size, padding=4), *flip])

    def transform(batch: Dict[str, List]) -> Dict[str, List]:
        images = pixels([img.convert("RGB") for img in batch[image_column]])
        if augmentation is not None:
            images = [augmentation(x) for x in images]
        return {"pixel_values": images, "labels": list(batch[label_column])}

    transform.preprocessing = preprocessing
    transform.train, transform.augment, transform.augment_options = train, augment, options
    transform.image_column, transform.label_column = image_column, label_column
    return transform


def _resolve_preprocessing(preprocessing: Preprocessing):
    """A timm data config (dict, every key resolved) or a transformers image processor."""
    import timm.data

    if isinstance(preprocessing, torch.nn.Module):
        from .models import model_preprocessing

        return model_preprocessing(preprocessing)
    if isinstance(preprocessing, (int, tuple, list)):
        from .models import _height_width

        height, width = _height_width(preprocessing, "image_size")
        # a plain resize of the whole image: no crop, whatever the aspect ratio
        preprocessing = {
            "input_size": (3, height, width),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "squash",
        }
    if isinstance(preprocessing, dict):
        return timm.data.resolve_data_config(args=dict(preprocessing))
    if callable(getattr(preprocessing, "preprocess", None)) and hasattr(preprocessing, "to_dict"):
        return preprocessing
    raise TypeError(
        f"preprocessing={preprocessing!r}: pass a model, a timm data config (dict), a transformers image "
        "processor, or an image size (int or (height, width))"
    )


def _timm_pixels(data_config: Dict[str, Any]) -> Callable[[List], List[torch.Tensor]]:
    """timm's evaluation transform, stopping before its normalisation: uint8 -> float in [0, 1], as ToTensor does."""
    import timm.data

    pipeline = timm.data.create_transform(**data_config, is_training=False, normalize=False)
    return lambda images: [pipeline(img).float().div(255) for img in images]


def _timm_train_pixels(preprocessing, options: Dict[str, Any]) -> Callable[[List], List[torch.Tensor]]:
    """timm's training transform at the model's input size (a timm data config, or an image processor's)."""
    from .augmentation import processor_data_config, timm_train_pixels

    data_config = preprocessing if isinstance(preprocessing, dict) else processor_data_config(preprocessing)
    pipeline = timm_train_pixels(data_config, options)
    return lambda images: [pipeline(img) for img in images]


def _processor_pixels(processor) -> Callable[[List], List[torch.Tensor]]:
    def pixels(images):
        return list(processor(images, do_normalize=False, return_tensors="pt")["pixel_values"])

    return pixels


def _processor_output_size(processor, augment: str = "crop") -> tuple:
    """The processor's fixed output (height, width); ``augment`` only names the caller's need in the error."""
    settings = processor.to_dict()
    size = settings.get("crop_size") if settings.get("do_center_crop") else settings.get("size")
    if not size or "height" not in size:
        raise ValueError(
            f"augment={augment!r} needs an image processor with a fixed output size (height and width); "
            f"{type(processor).__name__} has size={size}"
        )
    return int(size["height"]), int(size["width"])


def set_preprocessing(data, preprocessing: Preprocessing):
    """Rebuild the transform of every split of ``data`` (a ``Dataset`` or ``DatasetDict`` from
    :func:`load_image_dataset` / :func:`image_transform`) from ``preprocessing`` (usually the model), keeping each
    split's augmentation and columns. Returns ``data``.

    Data is loaded before the model (its classes decide the head); this makes its pixels the model's afterwards.
    """
    splits = data.values() if hasattr(data, "values") else [data]
    for split in splits:
        current = _cure_hf_transform(split)
        if current is None:
            raise ValueError(
                "set_preprocessing: a split has no cure_hf transform, so its columns and augmentation are "
                "unknown; set one with dataset.set_transform(cure_hf.data.image_transform(model, "
                "train=...))"
            )
        split.set_transform(
            image_transform(
                preprocessing,
                train=current.train,
                augment=current.augment,
                augment_options=getattr(current, "augment_options", None),
                image_column=current.image_column,
                label_column=current.label_column,
            )
        )
    return data


def _cure_hf_transform(dataset) -> Optional[Callable]:
    fmt = getattr(dataset, "format", None) or {}
    transform = fmt.get("format_kwargs", {}).get("transform") if fmt.get("type") == "custom" else None
    return transform if hasattr(transform, "preprocessing") else None


def dataset_augmentation(dataset) -> Dict[str, Any]:
    """The training augmentation a dataset's cure_hf transform runs: ``{"augment": ..., <option>: value, ...}``
    (every option it ran with, defaults included), or ``{}`` without augmentation or a cure_hf transform."""
    transform = _cure_hf_transform(dataset)
    if transform is None or not transform.train or transform.augment == "none":
        return {}
    return {"augment": transform.augment, **(getattr(transform, "augment_options", None) or {})}


def dataset_preprocessing(*datasets):
    """The preprocessing (timm data config or image processor) of the first dataset whose transform is cure_hf's;
    dicts of datasets are searched too. None when none is: the pixels came from a transform cure_hf cannot read."""
    for dataset in datasets:
        candidates = dataset.values() if isinstance(dataset, dict) else [dataset]
        for candidate in candidates:
            transform = _cure_hf_transform(candidate)
            if transform is not None:
                return transform.preprocessing
    return None


def dataset_label_feature(dataset):
    """The ``datasets.ClassLabel`` of the label column that ``dataset``'s transform reads, else None.

    The column is the one the transform records (``image_transform(..., label_column=...)`` keeps it as
    ``transform.label_column``, e.g. CIFAR-100's ``fine_label``); without such a transform, ``labels`` then
    ``label``. Dicts of datasets (a ``DatasetDict``) give their first split's that has one. Its ``names`` are the
    class names, its ``num_classes`` the class count; None when that column is not a ``ClassLabel`` (or ``dataset``
    has no ``datasets`` features, e.g. a torch Dataset). Needs no ``datasets`` import: a dataset without
    ``features`` (a torch Dataset on a machine without ``datasets``) has no label feature.
    """
    candidates = dataset.values() if isinstance(dataset, dict) else [dataset]
    for candidate in candidates:
        features = getattr(candidate, "features", None)
        if not hasattr(features, "get"):
            continue
        fmt = getattr(candidate, "format", None) or {}
        transform = fmt.get("format_kwargs", {}).get("transform") if fmt.get("type") == "custom" else None
        recorded = getattr(transform, "label_column", None)
        # the transform's own column only: another ClassLabel column beside it (a coarse label) is not the target
        for column in [recorded] if recorded else ["labels", "label"]:
            feature = features.get(column)
            if type(feature).__name__ == "ClassLabel" and hasattr(feature, "names"):
                return feature
    return None


def dataset_card_fields(dataset) -> Dict[str, Any]:
    """The model card's ``dataset`` (a name) and ``dataset_id`` (a Hub id, only for Hub datasets) of a training set.

    Read from ``dataset.info``: :func:`load_image_dataset` records a Hub dataset's id in ``info.dataset_name``; the
    embedded digits, image folders and local paths carry a name without a "/" and get no Hub id.
    """
    dataset_info = getattr(dataset, "info", None)
    name = getattr(dataset_info, "dataset_name", None)
    builder = getattr(dataset_info, "builder_name", None)
    fields: Dict[str, Any] = {}
    if name:
        fields["dataset"] = name
        if "/" in str(name) and builder != "imagefolder":
            fields["dataset_id"] = name
    return fields


def collate_pixels(examples: List[Dict]) -> Dict[str, torch.Tensor]:
    """``{"pixel_values", "labels"}`` batches through transformers' ``default_data_collator``.

    Accepts what it accepts (``labels``, or ``label``/``label_ids`` renamed to ``labels``; tensors, arrays or
    lists) and refuses, with the fix, what would otherwise train silently wrong or fail deep inside torch:
    examples without ``pixel_values`` (raw ``image``/``img`` columns need a transform), labels that are strings
    or other non-numbers (checked before ``default_data_collator``, which would drop them), non-integer labels
    (a float label 3.7 would otherwise become class 3, or a soft target), and pixels that are not floats, NaN or
    infinite, or outside [0, 1] (checked here on the CPU batch, so the training step needs no device sync for it).
    """
    from transformers import default_data_collator

    from .safety import check_class_labels, check_pixel_values

    first = examples[0]
    if "pixel_values" not in first:
        images = [k for k in ("image", "img", "pixel_values") if k in first]
        hint = (
            (
                f" The dataset has the raw image column {images[0]!r}: add a transform that turns it into pixel "
                "tensors in [0, 1], e.g. dataset.set_transform(cure_hf.image_transform(32, train=True))."
            )
            if images
            else ""
        )
        raise ValueError(f"a training example needs 'pixel_values'; this one has the keys {sorted(first)}.{hint}")
    if not any(k in first for k in ("labels", "label", "label_ids")):
        raise ValueError(f"a training example needs 'labels' (or 'label'); this one has the keys {sorted(first)}")
    _refuse_non_numeric_labels(examples)  # before default_data_collator, which silently drops string labels
    kept = [{k: v for k, v in e.items() if k in ("pixel_values", "labels", "label", "label_ids")} for e in examples]
    batch = default_data_collator(kept, return_tensors="pt")
    labels = check_class_labels(batch["labels"])
    pixels = torch.as_tensor(batch["pixel_values"])
    check_pixel_values(pixels)
    return {"pixel_values": pixels, "labels": labels}


def _is_numeric_label(value) -> bool:
    """A class index or something ``default_data_collator`` turns into numbers (floats are judged after it)."""
    if isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
        return True
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        return value.dtype != object and getattr(value.dtype, "kind", "i") not in "USO"
    if isinstance(value, (list, tuple)):
        return all(_is_numeric_label(v) for v in value)
    return False


def _refuse_non_numeric_labels(examples: List[Dict]) -> None:
    """Refuse, with the fix, labels that are not class indices (strings such as "cat", None, objects)."""
    key = next(k for k in ("labels", "label", "label_ids") if k in examples[0])
    bad = [e.get(key) for e in examples if not _is_numeric_label(e.get(key))]
    if not bad:
        return
    samples = list(dict.fromkeys(repr(v) for v in bad))[:3]
    kind = "strings" if all(isinstance(v, str) for v in bad) else "values that are not numbers"
    raise ValueError(
        f"the label column {key!r} holds {kind} ({len(bad)} of {len(examples)} examples in this batch, e.g. "
        f"{', '.join(samples)}; type {type(bad[0]).__name__}); training needs integer class indices "
        "0..num_classes-1. Fix: encode the dataset's label column as classes before setting its transform, e.g. "
        'dataset = dataset.class_encode_column("label") (with the name of your label column; it becomes a '
        "datasets ClassLabel with the sorted names, which the saved model keeps as its label names), or load the data with cure_hf.data.load_image_dataset, which does it"
    )


def _pick_column(names, wanted: Optional[str], candidates, what: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{what}_column={wanted!r} is not a column of the dataset; columns are {names}")
        return wanted
    for name in candidates:
        if name in names:
            return name
    raise ValueError(f"cannot find the {what} column among {names}; pass --{what}_column")


def load_image_dataset(
    name: str = "digits",
    *,
    preprocessing: Preprocessing = None,
    image_size: Optional[int] = None,
    augment: str = "none",
    augment_options: Optional[Dict[str, Any]] = None,
    config_name: Optional[str] = None,
    train_dir: Optional[str] = None,
    test_dir: Optional[str] = None,
    train_split: str = "train",
    test_split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    seed: int = 0,
):
    """Train/test datasets yielding {"pixel_values" in [0, 1], "labels"}, and the number of classes.

    ``name``: "digits" (embedded, no network), "imagefolder" (with ``train_dir``/``test_dir``), or any
    ``datasets.load_dataset`` name such as "uoft-cs/cifar10" (its id is recorded in ``info.dataset_name`` for the
    model card's ``datasets:``).

    ``augment``/``augment_options``: the training split's augmentation (:func:`image_transform`).

    ``preprocessing``: the model (or its data config / image processor, see :func:`image_transform`); when the model
    is built after the data (it needs ``num_classes``), call :func:`set_preprocessing` with it. ``image_size``
    (default 32): without ``preprocessing``, a plain resize to that size; it is also the size the embedded digits
    are drawn at.

    ``test_split``: the split to evaluate on; a named split that does not exist is refused. Unset (None), it is
    "test"; a dataset without a "test" split then gives up a seeded 10% of the training split (said in the log).

    A label column of strings ("cat", "dog": CSV/JSON/parquet metadata) is class-encoded in both splits: it becomes
    a ``datasets.ClassLabel`` with the sorted names (as ``Dataset.class_encode_column`` makes them), so
    ``num_classes`` counts them and ``dataset_label_feature(data["train"]).names`` (which the saved model keeps as
    its label names) lists them.
    """
    from datasets import ClassLabel, DatasetDict, load_dataset

    if name == "digits":
        if train_split != "train" or test_split not in (None, "test"):
            raise ValueError(
                f"train_split={train_split!r}, test_split={test_split!r}: the embedded digits have only "
                "the splits 'train' and 'test'; leave both unset"
            )
        raw = load_digits_dataset(image_size=image_size or _square_side(preprocessing) or 32)
        test_split = "test"
    elif name == "imagefolder":
        if not train_dir:
            raise ValueError("dataset_name='imagefolder' needs --train_dir (and usually --test_dir)")
        if test_split not in (None, "test"):
            raise ValueError(
                f"test_split={test_split!r}: an image folder's test split is the folder given as "
                "test_dir; pass --test_dir and leave test_split unset"
            )
        files = {"train": os.path.join(train_dir, "**")}
        if test_dir:
            files["test"] = os.path.join(test_dir, "**")
        raw = load_dataset("imagefolder", data_files=files)
        train_split, test_split = "train", "test" if test_dir else None
        _record_name(raw, f"imagefolder {os.path.basename(os.path.normpath(train_dir))}")
    else:
        raw = load_dataset(name, config_name)
        # a Hub id names the card's dataset; a local path is only a name, without a "/" the card would read as an id
        _record_name(raw, os.path.basename(os.path.normpath(name)) if os.path.exists(name) else name)
        if test_split is None and "test" in raw:
            test_split = "test"
    if train_split not in raw:
        raise ValueError(
            f"train_split={train_split!r} is not a split of {name!r}; its splits are {list(raw)}; "
            "pass --train_split with one of them"
        )
    if test_split is not None and test_split not in raw:
        raise ValueError(
            f"test_split={test_split!r} is not a split of {name!r}; its splits are {list(raw)}; pass "
            "--test_split with one of them, or leave it unset to evaluate on a seeded 10% of the "
            "training split when the dataset has no test split"
        )
    if test_split is None:
        logger.info(
            "%s has no test split (splits: %s): evaluating on a seeded 10%% of %r (seed %d), trained on the other 90%%",
            name,
            list(raw),
            train_split,
            seed,
        )
        parts = raw[train_split].train_test_split(test_size=0.1, seed=seed)
        raw = DatasetDict(train=parts["train"], test=parts["test"])
        train_split, test_split = "train", "test"
    train, test = raw[train_split], raw[test_split]
    names = list(train.column_names)
    image_column = _pick_column(names, image_column, ("image", "img", "pixel_values"), "image")
    label_column = _pick_column(names, label_column, ("label", "labels", "fine_label"), "label")
    train, test = _class_encode_strings(train, test, label_column)
    feature = train.features[label_column]
    num_classes = feature.num_classes if isinstance(feature, ClassLabel) else len(set(train[label_column]))
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        test = test.select(range(min(max_eval_samples, len(test))))
    if preprocessing is None:
        preprocessing = image_size or 32
    elif image_size is not None and name != "digits":
        raise ValueError(
            f"image_size={image_size} and preprocessing=... both set the input size; the model's "
            "preprocessing decides it: leave image_size unset"
        )
    common = dict(
        augment=augment, augment_options=augment_options, image_column=image_column, label_column=label_column
    )
    train.set_transform(image_transform(preprocessing, train=True, **common))
    test.set_transform(image_transform(preprocessing, train=False, **common))
    return DatasetDict(train=train, test=test), num_classes


def _class_encode_strings(train, test, column: str):
    """String labels ("cat", "dog": CSV/JSON/parquet metadata) as a ``ClassLabel`` shared by both splits.

    The names are what ``datasets.Dataset.class_encode_column`` gives (the sorted distinct strings; missing values
    stay missing), taken over both splits so that a class the test split alone has keeps one index in both.
    Other columns are returned unchanged."""
    from datasets import ClassLabel, Value

    def is_string(split):
        feature = split.features.get(column)
        return isinstance(feature, Value) and feature.dtype in ("string", "large_string")

    if not is_string(train):
        return train, test
    values = set(train.unique(column)) | (set(test.unique(column)) if is_string(test) else set())
    feature = ClassLabel(names=sorted(str(value) for value in values if value is not None))
    logger.info(
        "the label column %r holds strings: encoded as %d classes %s (sorted)",
        column,
        feature.num_classes,
        feature.names if feature.num_classes <= 20 else feature.names[:20] + ["..."],
    )
    train = train.cast_column(column, feature)
    if is_string(test):
        test = test.cast_column(column, feature)
    return train, test


def _record_name(splits, dataset_name: str) -> None:
    for split in splits.values():
        split.info.dataset_name = dataset_name


def _square_side(preprocessing) -> Optional[int]:
    """The side of a square input size, to draw the embedded digits at; None for anything else."""
    if preprocessing is None:
        return None
    resolved = _resolve_preprocessing(preprocessing)
    if isinstance(resolved, dict):
        height, width = resolved["input_size"][-2:]
    else:
        try:
            height, width = _processor_output_size(resolved)
        except ValueError:
            return None
    return int(height) if height == width else None


# --- robust evaluation: a validation split for model selection, carved from the training set
def split_validation(dataset, fraction: float, seed: int = 0, eval_transform: Optional[Callable] = None):
    """``(train, validation)``: a seeded, stratified (when the label is a ``ClassLabel``) hold-out of ``dataset``.

    Robust overfitting makes the best epoch matter; choosing it on the test set inflates the reported
    number, so select on this split instead. ``eval_transform`` (e.g. ``image_transform(model, train=False)``)
    replaces the training augmentation on the validation split; otherwise both keep ``dataset``'s format.
    """
    from datasets import ClassLabel

    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"fraction={fraction!r} is invalid: allowed 0 < fraction < 1, e.g. 0.1 for a 10% validation split"
        )
    if not hasattr(dataset, "train_test_split"):
        raise TypeError(f"split_validation needs a datasets.Dataset, got {type(dataset).__name__}")
    label_column = next((c for c in ("label", "labels") if c in dataset.column_names), None)
    stratify = label_column if label_column and isinstance(dataset.features[label_column], ClassLabel) else None
    parts = dataset.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    train, validation = parts["train"], parts["test"]
    if eval_transform is not None:
        validation.set_transform(eval_transform)
    return train, validation
