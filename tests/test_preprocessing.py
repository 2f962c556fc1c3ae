"""One preprocessing truth: the pixels of training/evaluation come from the model's own preprocessing, and the saved
folder records exactly that, so timm, transformers and cure_hf each reproduce the trained model's logits through
their own preprocessing, on images of any size. Also: datasets' split handling, the embedded default unchanged.

The expected logits always come from the training side (the trainer's evaluation transform and the trained model
in memory); each library's logits come from its own loader and preprocessing reading the saved folder.
"""

import json
import logging

import numpy as np
import pytest
import timm
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from huggingface_hub import ModelCard
from PIL import Image as PILImage
from transformers import AutoImageProcessor, AutoModelForImageClassification

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import (
    DIGITS_DATASET_NAME,
    image_transform,
    load_digits_dataset,
    load_image_dataset,
    set_preprocessing,
)
from cure_hf.hub import load_model
from cure_hf.models import PixelNormalized, create_model

MEAN, STD = (0.2, 0.3, 0.4), (0.4, 0.3, 0.2)
LABELS = ["cat", "dog", "bird"]


def _pil_images(n, width, height, seed=0):
    generator = np.random.default_rng(seed)
    return [PILImage.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def _image_dataset(n, width=64, height=40, seed=0):
    features = Features({"image": Image(), "label": ClassLabel(names=LABELS)})
    return Dataset.from_dict(
        {"image": _pil_images(n, width, height, seed), "label": [i % 3 for i in range(n)]}, features=features
    )


def _trained(model, tmp_path, train, test, processing_class=None):
    args = dict(
        output_dir=str(tmp_path / "run"),
        adv_method="trades",
        max_steps=1,
        per_device_train_batch_size=4,
        attack_steps=1,
        learning_rate=0.05,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        eval_strategy="no",
    )
    trainer = CURETrainer(
        model, CURETrainingArguments(**args), train_dataset=train, eval_dataset=test, processing_class=processing_class
    )
    trainer.train()
    return trainer


def _eval_inputs(test, count=4):
    """The trainer's evaluation pixels of the first examples, and the raw PIL images they came from."""
    pixels = torch.stack(test[:count]["pixel_values"])
    images = test.with_format(None)[:count]["image"]
    return pixels, images


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_non_square_model_reloads_with_the_trained_logits_in_timm_transformers_and_cure_hf(tmp_path, arch):
    kwargs = {"patch_size": 8} if arch == "test_vit" else {}
    torch.manual_seed(0)
    model = create_model(arch, 3, image_size=(48, 32), mean=MEAN, std=STD, **kwargs)
    train, test = _image_dataset(8), _image_dataset(4, seed=1)  # 64x40 images, another size than the model's
    train.set_transform(image_transform(model, train=True))
    test.set_transform(image_transform(model, train=False))
    trainer = _trained(model, tmp_path, train, test)
    folder = tmp_path / "run" / "final"
    trainer.save_model(str(folder))

    config = json.loads((folder / "config.json").read_text())
    saved = config["pretrained_cfg"]
    assert (
        saved["input_size"] == [3, 48, 32]
        and saved["mean"] == pytest.approx(MEAN)
        and saved["std"] == pytest.approx(STD)
    )
    assert saved["crop_pct"] == 1.0 and config["label_names"] == LABELS

    pixels, images = _eval_inputs(test)
    assert pixels.shape == (4, 3, 48, 32)
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(pixels)
        tm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        timm_transform = timm.data.create_transform(**timm.data.resolve_data_config(model=tm))
        torch.testing.assert_close(
            tm(torch.stack([timm_transform(img) for img in images])), expected, rtol=1e-5, atol=1e-5
        )

        hf = AutoModelForImageClassification.from_pretrained(folder).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        torch.testing.assert_close(hf(**processor(images)).logits, expected, rtol=1e-5, atol=1e-5)
        assert [hf.config.id2label[i] for i in range(3)] == LABELS

        ours = load_model(str(folder)).eval()
        ours_pixels = image_transform(ours, train=False)({"image": images, "label": [0] * 4})["pixel_values"]
        torch.testing.assert_close(ours(torch.stack(ours_pixels)), expected, rtol=1e-5, atol=1e-5)


def _tiny_vit(num_labels=3, image_size=(48, 32)):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def test_transformers_model_keeps_its_processor_and_label_names_through_trainer_save(tmp_path, caplog):
    from transformers import ViTImageProcessor

    model = PixelNormalized(_tiny_vit(), MEAN, STD, input_size=(48, 32))  # wrapped by hand: no processor of its own
    users_processor = ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # 224x224, mean/std 0.5
    train, test = _image_dataset(8), _image_dataset(4, seed=1)
    train.set_transform(image_transform(model, train=True))
    test.set_transform(image_transform(model, train=False))
    trainer = _trained(model, tmp_path, train, test, processing_class=users_processor)
    folder = tmp_path / "run" / "final"
    with caplog.at_level(logging.WARNING, logger="cure_hf"):
        trainer.save_model(str(folder))

    # the user's processor disagreed with the model: a copy with the model's values was saved, with a warning
    assert "disagrees with the model" in caplog.text and "image_mean" in caplog.text
    assert list(users_processor.image_mean) == [0.5] * 3 and users_processor.size.height == 224  # untouched
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == pytest.approx(MEAN) and saved["image_std"] == pytest.approx(STD)
    assert saved["size"] == {"height": 48, "width": 32}
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "bird"} and config["label2id"]["bird"] == 2
    card = ModelCard.load(folder / "README.md")  # a transformers-native folder: no timm loading code
    assert card.data.library_name == "transformers" and "timm.create_model" not in card.text
    assert card.data.robustness["architecture"] == "ViTForImageClassification"

    pixels, images = _eval_inputs(test)
    with torch.no_grad():
        expected = trainer.model.eval()(pixels).logits
        hf = AutoModelForImageClassification.from_pretrained(folder).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        torch.testing.assert_close(hf(**processor(images, return_tensors="pt")).logits, expected, rtol=1e-5, atol=1e-5)
        assert hf.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
        ours = load_model(str(folder)).eval()
        assert ours.mean.flatten().tolist() == pytest.approx(MEAN)
        ours_pixels = image_transform(ours, train=False)({"image": images, "label": [0] * 4})["pixel_values"]
        torch.testing.assert_close(ours(torch.stack(ours_pixels)).logits, expected, rtol=1e-5, atol=1e-5)


def test_hand_wrapped_transformers_model_gets_a_processor_and_a_folder_without_one_warns(tmp_path):
    from cure_hf.hub import save_pretrained

    folder = tmp_path / "saved"
    save_pretrained(PixelNormalized(_tiny_vit(image_size=16), MEAN, STD, input_size=16), folder)
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == pytest.approx(MEAN) and saved["size"] == {"height": 16, "width": 16}

    bare = tmp_path / "bare"
    _tiny_vit(image_size=16).save_pretrained(bare)  # transformers' own save: no processor
    with pytest.warns(UserWarning, match=r"assumes mean=\(0.5, 0.5, 0.5\).*load_model\(\.\.\., mean="):
        assumed = load_model(str(bare))
    assert assumed.mean.flatten().tolist() == [0.5] * 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        given = load_model(str(bare), mean=MEAN, std=STD)
    assert given.mean.flatten().tolist() == pytest.approx(MEAN) and given.std.flatten().tolist() == pytest.approx(STD)


# ----------------------------------------------------------------------------------------------- data
def test_embedded_digits_pixels_are_unchanged_at_32x32(tmp_path):
    """The main job's pixels: at the model's own 32x32 the transform only converts, as before (numpy oracle)."""
    data, num_classes = load_image_dataset("digits")
    raw = load_digits_dataset()
    oracle = [
        torch.from_numpy(np.asarray(raw["test"][i]["image"].convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        for i in range(16)
    ]
    assert num_classes == 10
    assert all(torch.equal(data["test"][i]["pixel_values"], oracle[i]) for i in range(16))
    set_preprocessing(data, create_model("test_vit", 10, image_size=32, patch_size=8))  # the main job's model
    assert all(torch.equal(data["test"][i]["pixel_values"], oracle[i]) for i in range(16))
    assert data["train"].info.dataset_name == DIGITS_DATASET_NAME


@pytest.fixture
def hub_dataset(monkeypatch):
    """`datasets.load_dataset` answering for a Hub id with in-memory splits (no network); records its calls."""
    import datasets

    calls = []

    def load_dataset(name, config_name=None, **kwargs):
        calls.append(name)
        return DatasetDict(train=_image_dataset(20, 32, 32), validation=_image_dataset(4, 32, 32, seed=1))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_unknown_split_is_refused_and_a_missing_test_split_is_carved_with_a_log_line(hub_dataset, caplog):
    with pytest.raises(ValueError, match=r"test_split='test' is not a split of 'me/shapes'.*\['train', 'validation'\]"):
        load_image_dataset("me/shapes", test_split="test")
    with pytest.raises(ValueError, match=r"train_split='training'.*\['train', 'validation'\]"):
        load_image_dataset("me/shapes", train_split="training")
    data, _ = load_image_dataset("me/shapes", test_split="validation")
    assert len(data["train"]) == 20 and len(data["test"]) == 4
    with caplog.at_level(logging.INFO, logger="cure_hf.data"):
        data, _ = load_image_dataset("me/shapes")
    assert len(data["train"]) == 18 and len(data["test"]) == 2 and "no test split" in caplog.text
    assert data["train"].info.dataset_name == "me/shapes"  # the Hub id, for the model card's datasets:
    with pytest.raises(ValueError, match="test_dir"):
        load_image_dataset("imagefolder", train_dir="/nonexistent", test_split="validation")
    with pytest.raises(ValueError, match="test_split='validation'.*only the splits 'train' and 'test'"):
        load_image_dataset("digits", test_split="validation")
