"""Labels at first contact: string labels, a label column other than `label`, and labels the model has no class for
each stop with the fix (or just work), before the first step and without a device sync in it."""

import json

import pytest
import torch
from datasets import ClassLabel

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import collate_pixels, dataset_label_feature, image_transform, load_digits_dataset, load_image_dataset
from cure_hf.safety import check_model_output
from cure_hf.speed import CheckingCollator
from tests.conftest import make_tiny_model

ANIMALS = ["dog", "cat", "bird"]
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def digits16():
    """16 raw digits (columns "image", "label": a ClassLabel), no transform."""
    return load_digits_dataset()["train"].select(range(16))


def _relabel(dataset, column, values, feature=None):
    """``dataset`` with its "label" column replaced by ``column`` holding ``values`` (cast to ``feature``)."""
    out = dataset.remove_columns("label").add_column(column, values)
    return out.cast_column(column, feature) if feature is not None else out


def _args(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path),
        adv_method="trades",
        max_steps=2,
        per_device_train_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
    )
    fields.update(overrides)
    return CURETrainingArguments(**fields)


def _tiny_vit(num_labels=10):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


# ----------------------------------------------------------------------------------------- string labels
STRING_FIX = r"label column 'labels' holds strings.*'dog'.*class_encode_column\(\"label\"\).*load_image_dataset"


def test_collate_pixels_refuses_string_labels_before_the_default_collator_drops_them(digits16):
    strings = _relabel(digits16, "label", [ANIMALS[i % 3] for i in range(16)])
    strings.set_transform(image_transform(16, train=False))
    examples = [strings[i] for i in range(4)]
    assert examples[0]["labels"] == "dog"
    with pytest.raises(ValueError, match=STRING_FIX):  # was a bare KeyError: 'labels'
        collate_pixels(examples)
    pixels = examples[0]["pixel_values"]
    with pytest.raises(ValueError, match=r"label column 'label' holds values that are not numbers.*None"):
        collate_pixels([{"pixel_values": pixels, "label": None}])
    # numbers still pass: ints, numpy ints, 0-d tensors, integral floats
    import numpy as np

    batch = collate_pixels([{"pixel_values": pixels, "labels": v} for v in (1, np.int64(2), torch.tensor(3), 4.0)])
    assert batch["labels"].tolist() == [1, 2, 3, 4] and batch["labels"].dtype == torch.long


def test_trainer_with_string_labels_stops_with_the_fix_before_the_first_step(tmp_path, digits16):
    strings = _relabel(digits16, "label", [ANIMALS[i % 3] for i in range(16)])
    strings.set_transform(image_transform(16, train=True))
    trainer = CURETrainer(make_tiny_model("test_resnet", 3), _args(tmp_path), train_dataset=strings)
    with pytest.raises(ValueError, match=STRING_FIX):
        trainer.train()
    assert trainer.state.global_step == 0


def test_load_image_dataset_class_encodes_string_labels_in_both_splits(tmp_path, digits16):
    folder = tmp_path / "animals"
    folder.mkdir()
    # the test split has a class ("emu") the training split lacks: it still gets one index in both
    _relabel(digits16.select(range(12)), "label", [ANIMALS[i % 3] for i in range(12)]).to_parquet(
        str(folder / "train.parquet")
    )
    _relabel(digits16.select(range(12, 16)), "label", ["cat", "emu", "dog", "cat"]).to_parquet(
        str(folder / "test.parquet")
    )
    data, num_classes = load_image_dataset(str(folder), image_size=16)
    names = ["bird", "cat", "dog", "emu"]  # sorted, as datasets' class_encode_column sorts them
    assert num_classes == 4
    assert data["train"].features["label"] == ClassLabel(names=names) == data["test"].features["label"]
    assert dataset_label_feature(data["train"]).names == names
    # the same names and indices datasets' own class_encode_column gives
    encoded = _relabel(digits16.select(range(12)), "label", [ANIMALS[i % 3] for i in range(12)]).class_encode_column(
        "label"
    )
    assert encoded.features["label"].names == ["bird", "cat", "dog"]
    assert [data["train"][i]["labels"] for i in range(12)] == [
        names.index(encoded.features["label"].int2str(v)) for v in encoded["label"]
    ]
    assert [data["test"][i]["labels"] for i in range(4)] == [1, 3, 2, 1]
    assert collate_pixels([data["train"][i] for i in range(4)])["labels"].tolist() == [2, 1, 0, 2]
    # and training works, the saved folder naming the classes
    trainer = CURETrainer(
        make_tiny_model("test_resnet", num_classes), _args(tmp_path / "run"), train_dataset=data["train"]
    )
    trainer.train()
    trainer.save_model()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["label_names"] == names


# ------------------------------------------------------------------- label names from the transform's column
def _fine_labelled(digits16, coarse=True):
    """CIFAR-100's layout: the target in "fine_label" (what the transform reads), a "coarse_label" beside it."""
    fine = _relabel(digits16, "fine_label", list(digits16["label"]), ClassLabel(names=DIGIT_NAMES))
    if coarse:
        fine = fine.add_column("coarse_label", [v % 2 for v in digits16["label"]]).cast_column(
            "coarse_label", ClassLabel(names=["even", "odd"])
        )
    fine.set_transform(image_transform(16, train=True, label_column="fine_label"))
    return fine


def test_dataset_label_feature_reads_the_transforms_column(digits16):
    fine = _fine_labelled(digits16)
    assert dataset_label_feature(fine).names == DIGIT_NAMES
    assert dataset_label_feature({"train": fine}).names == DIGIT_NAMES
    # without a transform that records a column: "labels", then "label"
    assert dataset_label_feature(digits16).names == [str(i) for i in range(10)]
    plain = digits16.with_transform(lambda batch: batch)
    assert dataset_label_feature(plain).names == [str(i) for i in range(10)]
    # the transform's column is not a ClassLabel: no names, not another column's
    ints = (
        _relabel(digits16, "fine_label", list(digits16["label"]))
        .add_column("label", [0] * 16)
        .cast_column("label", ClassLabel(names=["x", "y"]))
    )
    ints.set_transform(image_transform(16, train=True, label_column="fine_label"))
    assert dataset_label_feature(ints) is None
    assert dataset_label_feature(torch.utils.data.TensorDataset(torch.zeros(2))) is None


@pytest.mark.parametrize("kind", ["timm", "transformers"])
def test_saved_config_names_the_classes_of_the_transforms_column(tmp_path, digits16, kind):
    fine = _fine_labelled(digits16)
    model = make_tiny_model("test_resnet") if kind == "timm" else _tiny_vit()
    trainer = CURETrainer(model, _args(tmp_path), train_dataset=fine)
    assert trainer._label_names() == DIGIT_NAMES
    trainer.train()
    trainer.save_model()
    config = json.loads((tmp_path / "config.json").read_text())
    if kind == "timm":
        assert config["label_names"] == DIGIT_NAMES  # was null
    else:
        assert config["id2label"] == {str(i): name for i, name in enumerate(DIGIT_NAMES)}  # was LABEL_i
        assert config["label2id"] == {name: i for i, name in enumerate(DIGIT_NAMES)}


def test_the_transforms_column_decides_the_class_count_checked_at_construction(tmp_path, digits16):
    with pytest.raises(ValueError, match=r"the model has 5 outputs but the training set has 10 classes"):
        CURETrainer(make_tiny_model("test_resnet", 5), _args(tmp_path), train_dataset=_fine_labelled(digits16))


# ------------------------------------------------------------------- training labels checked like evaluation's
OUT_OF_RANGE = (
    r"labels range from 10 to 12, but the model has 10 classes \(0\.\.9\): 10, 11, 12 are no class of "
    r"the model; give the model a head with as many outputs as the dataset has classes"
)


def test_training_labels_the_model_lacks_stop_in_the_collator(tmp_path, digits16):
    # plain int labels (no ClassLabel): the dataset cannot tell its class count, only the model's output can
    bad = _relabel(digits16, "label", [10 + i % 3 for i in range(16)])
    bad.set_transform(image_transform(16, train=True))
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path), train_dataset=bad)
    assert trainer.model_num_classes == 10  # the probe's logits width
    assert isinstance(trainer.data_collator, CheckingCollator) and trainer.data_collator.num_classes == 10
    with pytest.raises(ValueError, match=OUT_OF_RANGE):  # on the CPU batch, in the collator
        trainer.data_collator([bad[i] for i in range(8)])
    with pytest.raises(ValueError, match=OUT_OF_RANGE):  # was IndexError: Target 10 is out of bounds
        trainer.train()
    assert trainer.state.global_step == 0
    # a batch with some good labels names only the bad ones
    mixed = [{"pixel_values": bad[0]["pixel_values"], "labels": v} for v in (0, 9, 12)]
    with pytest.raises(ValueError, match=r"range from 0 to 12, but the model has 10 classes \(0\.\.9\): 12 is no "):
        trainer.data_collator(mixed)
    assert trainer.data_collator(mixed[:2])["labels"].tolist() == [0, 9]


def test_an_iterable_training_set_is_checked_against_the_models_declared_classes(tmp_path, digits16):
    examples = _relabel(digits16, "label", [10 + i % 3 for i in range(16)])
    examples.set_transform(image_transform(16, train=True))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return (examples[i] for i in range(len(examples)))

    for model in (make_tiny_model("test_resnet"), _tiny_vit()):  # timm's num_classes, transformers' num_labels
        trainer = CURETrainer(model, _args(tmp_path), train_dataset=Stream())
        assert trainer.model_num_classes == 10
        with pytest.raises(ValueError, match=OUT_OF_RANGE):
            trainer.train()


def test_check_model_output_returns_the_class_count_and_soft_labels_are_left_alone():
    model = make_tiny_model("test_resnet", 7)
    assert check_model_output(model, torch.rand(1, 3, 16, 16)) == 7
    collator = CheckingCollator(
        lambda examples: {"pixel_values": torch.rand(2, 3, 4, 4), "labels": torch.tensor([[0.2, 0.8], [1.0, 0.0]])},
        num_classes=2,
    )
    assert collator([None])["labels"].shape == (2, 2)  # float targets of a collator of one's own: not indices
