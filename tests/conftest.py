"""Shared fixtures: the embedded digits data and tiny timm models (CPU, seconds each)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def digits():
    """DatasetDict(train=1437, test=360) yielding {"pixel_values": 3x32x32 in [0, 1], "labels"}."""
    from cure_hf.data import image_transform, load_digits_dataset

    ds = load_digits_dataset()
    ds["train"].set_transform(image_transform(32, train=True))
    ds["test"].set_transform(image_transform(32, train=False))
    return ds


@pytest.fixture
def digits_batch(digits):
    """A fixed batch of 32 test examples."""
    from cure_hf.data import collate_pixels

    return collate_pixels([digits["test"][i] for i in range(32)])


def make_tiny_model(name: str = "test_resnet", num_classes: int = 10, seed: int = 0):
    """A tiny timm model taking pixels in [0, 1] (ViTs adapted to 32x32 with patch 8)."""
    from cure_hf.models import create_model

    torch.manual_seed(seed)
    kwargs = {"image_size": 32, "patch_size": 8} if "vit" in name else {}
    return create_model(name, num_classes, **kwargs)


@pytest.fixture
def tiny_model():
    return make_tiny_model
