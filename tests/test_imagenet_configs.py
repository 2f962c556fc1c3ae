"""Every ImageNet config (recipes/configs/imagenet/*.yaml, found by glob) parses through the recipe's parser, builds
its model untrained at a small size, and makes a training batch through its augmentation from tiny images; the
header cites its paper, and CURE's revision decay fits the run's length as its comment says."""

import functools
import glob
import math
import os
import re
import sys

import pytest
import torch
import yaml

from cure_hf.data import collate_pixels, load_image_dataset, set_preprocessing
from cure_hf.models import create_model

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
CONFIGS = sorted(glob.glob(os.path.join(RECIPES, "configs", "imagenet", "*.yaml")))
MULTI_NODE = os.path.join(RECIPES, "accelerate_configs", "imagenet_multi_node.yaml")
IMAGENET_TRAIN_IMAGES = 1_281_167
SMALL = 32
sys.path.insert(0, RECIPES)
import train_vit  # noqa: E402


def test_every_architecture_start_and_method_has_a_config():
    names = {os.path.basename(c)[: -len(".yaml")] for c in CONFIGS}
    expected = {
        f"{arch}_{start}_{method}"
        for arch in ("vit_b16", "convnext_b", "swin_b")
        for start in ("scratch", "finetune")
        for method in ("pgd", "trades", "cure")
    }
    assert names == expected


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """An imagefolder of 3 classes x 2 PNGs per split, 60x45 (not square, not the model's size)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_imagenet")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for label in ("n01440764", "n01443537", "n01484850"):
            os.makedirs(root / split / label)
            for i in range(2):
                pixels = (torch.rand(45, 60, 3, generator=generator) * 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")
    return root


@functools.cache
def small_model(name, num_classes, patch_size):
    """The config's architecture, untrained (no download), at SMALL pixels: built once per name for all methods."""
    return create_model(name, num_classes, pretrained=False, image_size=SMALL, patch_size=patch_size)


def parse(config, tmp_path, *flags):
    return train_vit.parse_arguments([config, "--use_cpu", "true", "--output_dir", str(tmp_path), *flags])


def read(config):
    with open(config, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_parses_builds_its_model_and_a_training_batch(config, tmp_path, tiny_imagenet):
    model_args, data_args, stage_args, training_args = parse(config, tmp_path)
    # what a real run reads: ImageNet-1k from the Hub, evaluated on its labelled validation split, at 4/255
    assert data_args.dataset_name == "ILSVRC/imagenet-1k" and data_args.test_split == "validation"
    assert (data_args.image_column, data_args.label_column) == ("image", "label")
    assert model_args.image_size is None and model_args.patch_size is None  # the model's own 224, not the recipe's 32
    assert training_args.epsilon == pytest.approx(4 / 255) and training_args.bf16
    assert stage_args.natural_epochs == 0 and data_args.augment == "timm"
    assert training_args.mixup_alpha > 0 and training_args.per_device_train_batch_size % 2 == 0
    assert training_args.dataloader_drop_last and training_args.label_smoothing_factor == 0.1
    assert training_args.weight_averaging_decay in (0.9998, 0.9999) and training_args.optim == "adamw_torch"
    assert model_args.pretrained == ("_finetune_" in config)

    is_vit = "vit_" in model_args.model_name_or_path
    model = small_model(model_args.model_name_or_path, 3, 8 if is_vit else None)
    # the recipe's data steps (train_vit.main), on local images instead of the Hub's
    data, num_classes = load_image_dataset(
        "imagefolder",
        train_dir=str(tiny_imagenet / "train"),
        test_dir=str(tiny_imagenet / "test"),
        augment=data_args.augment,
        augment_options=data_args.augment_options(),
        image_column=data_args.image_column,
        label_column=data_args.label_column,
    )
    set_preprocessing(data, model)
    transform = data["train"].format["format_kwargs"]["transform"]
    assert transform.augment_options["auto_augment"] == data_args.auto_augment
    assert transform.augment_options["random_erasing"] == data_args.random_erasing
    batch = collate_pixels([data["train"][i] for i in range(len(data["train"]))])
    assert num_classes == 3 and batch["pixel_values"].shape == (6, 3, SMALL, SMALL)
    assert 0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
    with torch.no_grad():
        assert model.eval()(batch["pixel_values"]).shape == (6, 3)


def _global_batch(values):
    with open(MULTI_NODE, encoding="utf-8") as f:
        processes = yaml.safe_load(f)["num_processes"]
    return values["per_device_train_batch_size"] * processes


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_header_cites_its_paper_and_states_the_run(config):
    text, values = read(config), yaml.safe_load(read(config))
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert ("Singh, Croce & Hein" in header and "nmndeep/revisiting-at" in header) or (
        "ARES 2.0" in header and "thu-ml/ares" in header
    )
    assert re.search(r"Theirs \(.*AutoAttack at 4/255", header)
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // _global_batch(values)  # drop_last
    assert f"Global batch {_global_batch(values)} = " in header
    assert f"{steps_per_epoch:,} steps per epoch, {steps_per_epoch * values['num_train_epochs']:,} in all" in header
    assert f"recipes/configs/imagenet/{os.path.basename(config)}" in header


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.endswith("_cure.yaml")], ids=os.path.basename)
def test_cure_revision_horizon_keeps_the_papers_share_of_the_run(config):
    """The revision model's horizon 1 / (r (1 - d)) takes the share of the run that the spec's 5,000 steps take of
    the CIFAR-10 run (200 epochs x 391 steps), within a few per cent, and the comment states the computation."""
    text, values = read(config), yaml.safe_load(read(config))
    steps = IMAGENET_TRAIN_IMAGES // _global_batch(values) * values["num_train_epochs"]
    horizon = 1 / (values["revision_rate"] * (1 - values["revision_decay"]))
    assert horizon / steps == pytest.approx(5000 / (200 * 391), rel=0.06)
    assert f"= {horizon:,.0f} steps" in text and f"the run's {steps:,}" in text
    exact = 1 - 1 / (values["revision_rate"] * 5000 / (200 * 391) * steps)
    assert f"= {exact:.6f}" in text and math.isclose(values["revision_decay"], exact, rel_tol=0, abs_tol=2e-5)


def test_the_multi_node_config_is_bf16_ddp_over_8_gpus_per_node():
    with open(MULTI_NODE, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    assert values["distributed_type"] == "MULTI_GPU" and values["mixed_precision"] == "bf16"
    assert values["num_processes"] == 8 * values["num_machines"] and values["num_machines"] >= 2
