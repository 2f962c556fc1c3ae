"""Data: the embedded digits default, Hub/imagefolder datasets, transforms to pixels in [0, 1], collator.

The default needs no network: scikit-learn ships the UCI digits (1797 real 8x8 grey images); they are
upsampled to 32x32x3 and split once, with a fixed seed, into train (1437) and test (360).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

__all__ = ["load_digits_dataset", "load_image_dataset", "image_transform", "collate_pixels", "check_pixel_range",
           "split_validation"]


def load_digits_dataset(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """The embedded default: a ``DatasetDict`` with "train"/"test", columns "image" (PIL RGB) and "label"."""
    import torch.nn.functional as F
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
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
            {"image": [PILImage.fromarray(pixels[i]) for i in idx], "label": labels[idx].tolist()}, features=features
        )

    return DatasetDict(train=subset(train_idx), test=subset(test_idx))


def image_transform(
    image_size: int,
    *,
    train: bool,
    augment: str = "none",
    image_column: str = "image",
    label_column: str = "label",
) -> Callable[[Dict[str, List]], Dict[str, List]]:
    """A ``datasets.set_transform`` function: images -> "pixel_values" (3xHxW floats in [0, 1]), "labels".

    ``augment``: "none", or "crop_flip" (random crop with 4-pixel padding and horizontal flip, the paper's).
    No normalisation here: it lives inside the model.
    """
    from torchvision import transforms as T

    if augment not in ("none", "crop_flip"):
        raise ValueError(f"augment={augment!r} is not one of 'none', 'crop_flip'")
    steps = [T.Resize((image_size, image_size))]
    if train and augment == "crop_flip":
        steps += [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()]
    steps += [T.ToTensor()]
    pipeline = T.Compose(steps)

    def transform(batch: Dict[str, List]) -> Dict[str, List]:
        return {
            "pixel_values": [pipeline(img.convert("RGB")) for img in batch[image_column]],
            "labels": list(batch[label_column]),
        }

    return transform


def collate_pixels(examples: List[Dict]) -> Dict[str, torch.Tensor]:
    """``{"pixel_values", "labels"}`` batches through transformers' ``default_data_collator``.

    Accepts what it accepts (``labels``, or ``label``/``label_ids`` renamed to ``labels``; tensors, arrays or
    lists) and refuses, with the fix, what would otherwise train silently wrong or fail deep inside torch:
    examples without ``pixel_values`` (raw ``image``/``img`` columns need a transform), non-integer labels
    (a float label 3.7 would otherwise become class 3, or a soft target), and pixels that are not floats, NaN or
    infinite, or outside [0, 1] (checked here on the CPU batch, so the training step needs no device sync for it).
    """
    from .safety import check_class_labels, check_pixel_values

    from transformers import default_data_collator

    first = examples[0]
    if "pixel_values" not in first:
        images = [k for k in ("image", "img", "pixel_values") if k in first]
        hint = (f" The dataset has the raw image column {images[0]!r}: add a transform that turns it into pixel "
                "tensors in [0, 1], e.g. dataset.set_transform(cure_hf.image_transform(32, train=True)).") if images \
            else ""
        raise ValueError(f"a training example needs 'pixel_values'; this one has the keys {sorted(first)}.{hint}")
    if not any(k in first for k in ("labels", "label", "label_ids")):
        raise ValueError(f"a training example needs 'labels' (or 'label'); this one has the keys {sorted(first)}")
    kept = [{k: v for k, v in e.items() if k in ("pixel_values", "labels", "label", "label_ids")} for e in examples]
    batch = default_data_collator(kept, return_tensors="pt")
    labels = check_class_labels(batch["labels"])
    pixels = torch.as_tensor(batch["pixel_values"])
    check_pixel_values(pixels)
    return {"pixel_values": pixels, "labels": labels}


def check_pixel_range(pixel_values: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Raise if pixels leave [0, 1]: that usually means a normaliser ran outside the model."""
    low, high = torch.aminmax(pixel_values.detach())
    low, high = float(low), float(high)
    if low < -tolerance or high > 1.0 + tolerance:
        raise ValueError(
            f"pixel_values range from {low:.3f} to {high:.3f}, outside [0, 1]. Attacks work in pixel space: "
            "remove Normalize() from the data transform and normalise inside the model "
            "(cure_hf.models.PixelNormalized / create_model does this)."
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
    image_size: int = 32,
    augment: str = "none",
    config_name: Optional[str] = None,
    train_dir: Optional[str] = None,
    test_dir: Optional[str] = None,
    train_split: str = "train",
    test_split: str = "test",
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    seed: int = 0,
):
    """Train/test datasets yielding {"pixel_values" in [0, 1], "labels"}, and the number of classes.

    ``name``: "digits" (embedded, no network), "imagefolder" (with ``train_dir``/``test_dir``), or any
    ``datasets.load_dataset`` name such as "uoft-cs/cifar10".
    """
    from datasets import ClassLabel, DatasetDict, load_dataset

    if name == "digits":
        raw = load_digits_dataset(image_size=image_size)
        train_split, test_split = "train", "test"
    elif name == "imagefolder":
        if not train_dir:
            raise ValueError("dataset_name='imagefolder' needs --train_dir (and usually --test_dir)")
        files = {"train": os.path.join(train_dir, "**")}
        if test_dir:
            files["test"] = os.path.join(test_dir, "**")
        raw = load_dataset("imagefolder", data_files=files)
        train_split, test_split = "train", "test" if test_dir else None
    else:
        raw = load_dataset(name, config_name)
    if train_split not in raw:
        raise ValueError(f"split {train_split!r} not in the dataset; splits are {list(raw)}; pass --train_split")
    if test_split is None or test_split not in raw:
        # No test split: carve a fixed 10% out of the training split.
        parts = raw[train_split].train_test_split(test_size=0.1, seed=seed)
        raw = DatasetDict(train=parts["train"], test=parts["test"])
        train_split, test_split = "train", "test"
    train, test = raw[train_split], raw[test_split]
    names = list(train.column_names)
    image_column = _pick_column(names, image_column, ("image", "img", "pixel_values"), "image")
    label_column = _pick_column(names, label_column, ("label", "labels", "fine_label"), "label")
    feature = train.features[label_column]
    num_classes = feature.num_classes if isinstance(feature, ClassLabel) else len(set(train[label_column]))
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        test = test.select(range(min(max_eval_samples, len(test))))
    common = dict(augment=augment, image_column=image_column, label_column=label_column)
    train.set_transform(image_transform(image_size, train=True, **common))
    test.set_transform(image_transform(image_size, train=False, **common))
    return DatasetDict(train=train, test=test), num_classes


# --- robust evaluation (issue 3): a validation split for model selection, carved from the training set
def split_validation(dataset, fraction: float, seed: int = 0, eval_transform: Optional[Callable] = None):
    """``(train, validation)``: a seeded, stratified (when the label is a ``ClassLabel``) hold-out of ``dataset``.

    Robust overfitting makes the best epoch matter; choosing it on the test set inflates the reported
    number, so select on this split instead. ``eval_transform`` (e.g. ``image_transform(size, train=False)``)
    replaces the training augmentation on the validation split; otherwise both keep ``dataset``'s format.
    """
    from datasets import ClassLabel

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r} is invalid: allowed 0 < fraction < 1, e.g. 0.1 for a 10% validation split")
    if not hasattr(dataset, "train_test_split"):
        raise TypeError(f"split_validation needs a datasets.Dataset, got {type(dataset).__name__}")
    label_column = next((c for c in ("label", "labels") if c in dataset.column_names), None)
    stratify = label_column if label_column and isinstance(dataset.features[label_column], ClassLabel) else None
    parts = dataset.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    train, validation = parts["train"], parts["test"]
    if eval_transform is not None:
        validation.set_transform(eval_transform)
    return train, validation
