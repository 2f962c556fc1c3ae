"""Data: the embedded digits default, Hub/imagefolder datasets, transforms to pixels in [0, 1], collator.

The default needs no network: scikit-learn ships the UCI digits (1797 real 8x8 grey images); they are
upsampled to 32x32x3 and split once, with a fixed seed, into train (1437) and test (360).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np
import torch

__all__ = ["load_digits_dataset", "image_transform", "collate_pixels", "check_pixel_range"]


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
    """Stack ``pixel_values`` and ``labels`` into a batch."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long),
    }


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
