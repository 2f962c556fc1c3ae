"""ImageNet-scale training augmentation (augment="timm"): timm's own training transform without its normalisation,
random erasing in the model's normalised space, the options' refusals, the CIFAR crops unchanged, and the
data-pipeline benchmark's smoke run."""

import io
import os
import random
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from torchvision import transforms as T

from cure_hf.augmentation import AUGMENT_OPTIONS, resolve_augment_options
from cure_hf.data import image_transform, set_preprocessing
from cure_hf.parser import ConfigArgumentParser, DataTrainingArguments

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIG = {"input_size": (3, 48, 48), "interpolation": "bicubic", "mean": MEAN, "std": STD, "crop_pct": 0.875}


@pytest.fixture(scope="module")
def photo():
    """A 90x70 RGB image with structure (a gradient, a block and noise), so crops, flips and colour ops all show."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:70, 0:90]
    pixels = np.stack([xx * 2.5, yy * 3.0, (xx + yy) * 1.5], axis=-1) + rng.normal(0, 10, (70, 90, 3))
    pixels[10:30, 50:80] = (250, 20, 30)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def seeded(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ours(photo, seed, **options):
    transform = image_transform(CONFIG, train=True, augment="timm", augment_options=options)
    seeded(seed)
    return transform({"image": [photo], "label": [3]})["pixel_values"][0]


def timm_reference(photo, seed, normalize, **kwargs):
    """timm's own training transform at the same size, interpolation, mean and std."""
    reference = timm.data.create_transform(
        input_size=CONFIG["input_size"],
        is_training=True,
        interpolation=CONFIG["interpolation"],
        mean=MEAN,
        std=STD,
        normalize=normalize,
        **kwargs,
    )
    seeded(seed)
    return reference(photo)


TIMM_SETTINGS = [
    ({}, {}),  # timm's defaults: scale (0.08, 1), ratio (3/4, 4/3), flip 0.5, colour jitter 0.4
    ({"auto_augment": "rand-m9-mstd0.5-inc1"}, {"auto_augment": "rand-m9-mstd0.5-inc1"}),
    (
        {"crop_scale": "0.3,0.9", "crop_ratio": [0.5, 2.0], "hflip": 1.0, "color_jitter": "0.3,0.2,0.1,0.05"},
        {"scale": (0.3, 0.9), "ratio": (0.5, 2.0), "hflip": 1.0, "color_jitter": (0.3, 0.2, 0.1, 0.05)},
    ),
    ({"auto_augment": "augmix-m5-w4-d2", "hflip": 0.0}, {"auto_augment": "augmix-m5-w4-d2", "hflip": 0.0}),
]


@pytest.mark.parametrize("options, timm_kwargs", TIMM_SETTINGS, ids=["defaults", "randaugment", "custom", "augmix"])
def test_timm_training_transform_is_timms_own_without_its_normalize(photo, options, timm_kwargs):
    for seed in (0, 1, 2):
        got = ours(photo, seed, **options)
        reference = timm_reference(photo, seed, normalize=False, **timm_kwargs)  # uint8: timm's pixels, no Normalize
        assert reference.dtype == torch.uint8 and got.dtype == torch.float32
        assert torch.equal(got, reference.float() / 255)
        assert got.shape == (3, 48, 48) and 0 <= got.min() and got.max() <= 1
    assert not torch.equal(ours(photo, 0, **options), ours(photo, 1, **options))  # random per draw


def test_full_image_crop_equals_a_plain_resize_of_the_photo(photo):
    """An independent oracle: with the crop fixed to the whole image and no flip or jitter, the pixels are PIL's own
    bicubic resize of the photo, divided by 255 (no normalisation anywhere)."""
    aspect = photo.width / photo.height
    got = ours(photo, 0, crop_scale="1,1", crop_ratio=(aspect, aspect), hflip=0, color_jitter=0)
    expected = np.asarray(photo.resize((48, 48), Image.BICUBIC), dtype=np.float32) / 255
    assert torch.equal(got, torch.from_numpy(expected).permute(2, 0, 1))


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_is_timms_in_the_models_normalised_space(photo, mode):
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    erased_somewhere = False
    for seed in range(4):
        options = dict(random_erasing=1.0, random_erasing_mode=mode, random_erasing_count=2)
        got = ours(photo, seed, **options)
        reference = timm_reference(photo, seed, normalize=True, re_prob=1.0, re_mode=mode, re_count=2)
        # what the model (it normalises inside) sees is timm's normalised, erased tensor, clipped to valid pixels
        assert torch.allclose(got, (reference * std + mean).clamp(0, 1), atol=1e-6, rtol=0)
        assert 0 <= got.min() and got.max() <= 1
        plain = ours(photo, seed)  # the same draws without erasing: pixels outside the boxes are exactly these
        changed = (got != plain).any(0)
        erased_somewhere |= bool(changed.any())
        assert torch.equal(got[:, ~changed], plain[:, ~changed])
        if mode == "const" and changed.any():  # the box holds the mean colour, which the model sees as 0
            assert torch.allclose(got[:, changed], mean.view(3, 1).expand(3, int(changed.sum())), atol=1e-6)
    assert erased_somewhere


def test_pixel_noise_is_clipped_to_the_pixel_range(photo):
    got = torch.stack([ours(photo, s, random_erasing=1.0, random_erasing_mode="pixel") for s in range(6)])
    assert got.min() == 0 and got.max() == 1  # mean + std N(0, 1) leaves [0, 1] often: clipped, not wrapped


def test_the_model_data_config_decides_size_and_interpolation(photo):
    from cure_hf.models import create_model, model_preprocessing

    model = create_model("test_vit", 5, image_size=40, patch_size=8)
    transform = image_transform(model, train=True, augment="timm", augment_options={"hflip": 0})
    config = model_preprocessing(model)
    reference = timm.data.create_transform(**config, is_training=True, hflip=0, normalize=False)
    seeded(5)
    got = transform({"image": [photo], "label": [0]})["pixel_values"][0]
    seeded(5)
    assert torch.equal(got, reference(photo).float() / 255) and got.shape == (3, 40, 40)
    defaults = {**AUGMENT_OPTIONS, "hflip": 0.0, "random_erasing_mode": None, "random_erasing_count": None}
    assert transform.augment == "timm" and transform.augment_options == defaults  # what ran, for the model card
    evaluation = image_transform(model, train=False, augment="timm", augment_options={"hflip": 0})
    first = evaluation({"image": [photo], "label": [0]})["pixel_values"][0]
    assert torch.equal(first, evaluation({"image": [photo], "label": [0]})["pixel_values"][0])  # no augmentation


def test_set_preprocessing_keeps_the_options(photo):
    from datasets import Dataset

    data = Dataset.from_dict({"image": [photo, photo], "label": [0, 1]})
    options = {"auto_augment": "rand-m7-n1", "random_erasing": 0.5, "random_erasing_mode": "rand"}
    data.set_transform(image_transform(32, train=True, augment="timm", augment_options=options))
    set_preprocessing(data, CONFIG)
    transform = data.format["format_kwargs"]["transform"]
    assert transform.preprocessing["input_size"] == (3, 48, 48)
    assert transform.augment_options == resolve_augment_options("timm", options)
    assert (
        transform.augment_options["random_erasing_mode"] == "rand" and transform.augment_options["color_jitter"] is None
    )
    assert data[0]["pixel_values"].shape == (3, 48, 48)


def test_an_image_processor_gives_its_size_resample_and_mean(photo):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(
        size={"height": 36, "width": 44}, resample=Image.BILINEAR, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    transform = image_transform(processor, train=True, augment="timm", augment_options={"random_erasing": 1.0})
    got = transform({"image": [photo], "label": [0]})["pixel_values"][0]
    assert got.shape == (3, 36, 44) and 0 <= got.min() and got.max() <= 1
    seeded(2)
    got = image_transform(processor, train=True, augment="timm")({"image": [photo], "label": [0]})["pixel_values"][0]
    reference = timm.data.create_transform(
        (3, 36, 44), is_training=True, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3, normalize=False
    )
    seeded(2)
    assert torch.equal(got, reference(photo).float() / 255)


def test_an_image_processor_without_a_fixed_size_is_refused(photo):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"shortest_edge": 40})
    with pytest.raises(ValueError, match="augment='timm' needs an image processor with a fixed output size"):
        image_transform(processor, train=True, augment="timm")


REFUSED = [
    ("crop_flip", {"auto_augment": "rand-m9"}, r"only apply to augment='timm'.*augment='crop_flip' does not read"),
    ("none", {"random_erasing": 0.25, "hflip": 0.5}, r"random_erasing=0.25, hflip=0.5 only apply.*drop them"),
    ("timm", {"crop_scale": "0.5"}, r"crop_scale='0.5' is invalid: allowed two numbers min,max"),
    ("timm", {"crop_scale": "0,1"}, r"crop_scale=\(0.0, 1.0\) is invalid: allowed 0 < min <= max <= 1"),
    ("timm", {"crop_scale": "0.9,0.2"}, r"crop_scale=\(0.9, 0.2\) is invalid"),
    ("timm", {"crop_ratio": "1,x"}, r"crop_ratio='x' is invalid: allowed a number"),
    ("timm", {"hflip": 1.5}, r"hflip=1.5 is invalid: allowed a probability in \[0, 1\]"),
    ("timm", {"color_jitter": -0.1}, r"color_jitter=-0.1 is invalid: allowed factors >= 0"),
    ("timm", {"color_jitter": "0.1,0.2"}, r"color_jitter='0.1,0.2' is invalid: allowed one factor, or 3 or 4"),
    (
        "timm",
        {"color_jitter": 0.4, "auto_augment": "rand-m9-mstd0.5-inc1"},
        r"timm switches colour jitter off under an auto_augment policy.*drop color_jitter",
    ),
    ("timm", {"auto_augment": "randaugment"}, r"auto_augment='randaugment' is not a timm augmentation policy"),
    ("timm", {"auto_augment": "rand-q3"}, r"auto_augment='rand-q3' is not a timm augmentation policy"),
    ("timm", {"random_erasing": 2}, r"random_erasing=2.0 is invalid: allowed a probability in \[0, 1\]"),
    ("timm", {"random_erasing": 0.2, "random_erasing_mode": "zeros"}, r"random_erasing_mode='zeros' is invalid"),
    ("timm", {"random_erasing": 0.2, "random_erasing_count": 0}, r"random_erasing_count=0 is invalid: allowed an int"),
    ("timm", {"random_erasing_mode": "pixel"}, r"random_erasing_mode='pixel' without random erasing does nothing"),
    ("timm", {"erasing": 0.25}, r"unknown augmentation option 'erasing'; the options are crop_scale"),
]


@pytest.mark.parametrize("augment, options, message", REFUSED, ids=[m[:28] for _, _, m in REFUSED])
def test_invalid_or_unused_options_are_refused_with_the_fix(augment, options, message):
    with pytest.raises(ValueError, match=message):
        image_transform(CONFIG, train=True, augment=augment, augment_options=options)


def test_the_command_line_refuses_them_when_parsing():
    parser = ConfigArgumentParser(DataTrainingArguments)
    with pytest.raises(ValueError, match=r"auto_augment='rand-m9' only apply to augment='timm'"):
        parser.parse_args_and_config(["--augment", "crop", "--auto_augment", "rand-m9"])
    (args,) = parser.parse_args_and_config(["--augment", "timm", "--crop_scale", "0.35,1", "--random_erasing", "0.25"])
    assert args.augment_options() == {"crop_scale": "0.35,1", "random_erasing": 0.25}
    transform = image_transform(CONFIG, train=True, augment=args.augment, augment_options=args.augment_options())
    assert (
        transform.augment_options["crop_scale"] == (0.35, 1.0) and transform.augment_options["random_erasing"] == 0.25
    )


@pytest.mark.parametrize("augment", ["crop_flip", "crop"])
def test_the_cifar_crops_are_unchanged(photo, augment):
    """The 4-pixel pad crop (and flip) on the evaluation pixels, draw for draw as torchvision's own transforms."""
    evaluation = image_transform(32, train=False)
    transform = image_transform(32, train=True, augment=augment)
    assert transform.augment_options == {}
    flip = [T.RandomHorizontalFlip()] if augment == "crop_flip" else []
    crop = T.Compose([T.RandomCrop((32, 32), padding=4), *flip])
    for seed in range(4):
        torch.manual_seed(seed)
        got = transform({"image": [photo], "label": [0]})["pixel_values"][0]
        torch.manual_seed(seed)
        expected = crop(evaluation({"image": [photo], "label": [0]})["pixel_values"][0])
        assert torch.equal(got, expected)


def test_the_data_pipeline_benchmark_smoke_run_prints_its_lines():
    sys.path.insert(0, BENCHMARKS)
    import bench_data_pipeline

    output = io.StringIO()
    with redirect_stdout(output):
        results = bench_data_pipeline.main(["--smoke", "--workers", "1,2", "--gpu-images-per-second", "500"])
    text = output.getvalue()
    assert "workers   1:" in text and "workers   2:" in text and "RATIO workers 2 / workers 1:" in text
    assert results["workers_1"] > 0 and results["workers_2"] > 0
    assert results["ratio"] == pytest.approx(results["workers_2"] / results["workers_1"])
    per_core = 1000 / (results["decode_ms"] + results["augment_ms"] + results["collate_ms"])
    assert results["decode_ms"] > 0 and results["augment_ms"] > 0 and f"{per_core:.1f} images/s per core" in text
    assert results["workers_needed"] == int(np.ceil(500 / per_core))
    assert f"needs {results['workers_needed']} loader workers" in text
    assert "'auto_augment': 'rand-m9-mstd0.5-inc1'" in text  # the augmentation of the ImageNet config it reads


def test_posterize_to_zero_bits_does_not_stop_a_run(photo):
    """RandAugment 'inc1' at magnitude 10 posterizes to 0 bits, which this Pillow refuses inside timm's own op;
    here every draw goes through, and draws that do not hit it are timm's pixels exactly."""
    policy = "rand-m10-n3-mstd0-inc1"
    transform = image_transform(CONFIG, train=True, augment="timm", augment_options={"auto_augment": policy})
    refused = 0
    for seed in range(40):
        seeded(seed)
        got = transform({"image": [photo], "label": [0]})["pixel_values"][0]
        assert 0 <= got.min() and got.max() <= 1
        try:
            reference = timm_reference(photo, seed, normalize=False, auto_augment=policy)
        except ValueError as error:
            assert "bits" in str(error)
            refused += 1
            continue
        assert torch.equal(got, reference.float() / 255)
    assert refused > 0 or _pillow_keeps_zero_bits(photo)  # the case the repair is for did occur


def _pillow_keeps_zero_bits(photo) -> bool:
    from PIL import ImageOps

    try:
        ImageOps.posterize(photo, 0)
    except ValueError:
        return False
    return True


def test_zero_bit_posterize_is_the_old_pillow_black_image(photo):
    from PIL import ImageOps

    from cure_hf.augmentation import _posterize

    for bits in range(1, 8):
        assert np.array_equal(np.asarray(_posterize(photo, bits)), np.asarray(ImageOps.posterize(photo, bits)))
    # old Pillow's lookup table for 0 bits: i & ~(2**8 - 1) == 0 for every 8-bit value
    assert np.array_equal(np.asarray(_posterize(photo, 0)), np.zeros((70, 90, 3), dtype=np.uint8))


def test_the_model_card_records_the_training_augmentation(tmp_path):
    from conftest import make_tiny_model, tiny_run_arguments

    from cure_hf import CURETrainer
    from cure_hf.data import load_image_dataset, set_preprocessing

    options = {"auto_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25}
    data, _ = load_image_dataset("digits", augment="timm", augment_options=options, max_train_samples=8)
    model = make_tiny_model("test_vit")
    set_preprocessing(data, model)
    trainer = CURETrainer(model, tiny_run_arguments(tmp_path, adv_method="pgd"), train_dataset=data["train"])
    rows = trainer.model_card_info()["hyperparameters"]
    assert rows["augment"] == "timm" and rows["auto_augment"] == "rand-m9-mstd0.5-inc1"
    assert rows["random_erasing"] == 0.25 and rows["crop_scale"] == [0.08, 1.0]  # timm's default, as it ran
    plain, _ = load_image_dataset("digits", max_train_samples=8)
    trainer = CURETrainer(model, tiny_run_arguments(tmp_path / "b", adv_method="pgd"), train_dataset=plain["train"])
    assert "augment" not in trainer.model_card_info()["hyperparameters"]
