"""Streamed training data (cure_hf.streaming): parquet shards written here, read through `datasets` as a stream.

The key case: a CURE (and a PGD-AT) run on a shuffled, randomly augmented stream, interrupted at a checkpoint in its
second pass and resumed, ends with every weight tensor equal to the uninterrupted run's.
"""

import os
import re

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, stop_after_save, tiny_run_arguments
from PIL import Image as PILImage

from cure_hf import CURETrainer, set_preprocessing
from cure_hf.data import collate_pixels, image_transform
from cure_hf.streaming import StreamingImageDataset, _card_name, load_streaming_image_dataset

CLASSES = ["ant", "bee", "cat", "dog"]
TRAIN_EXAMPLES, EVAL_EXAMPLES, SHARDS = 40, 12, 4


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return [PILImage.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(n)]


def _write_split(folder, prefix, images, labels, shards, label_feature=None):
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features(image=Image(), label=label_feature or ClassLabel(names=CLASSES))
    split = Dataset.from_dict({"image": images, "label": labels}, features=features)
    for shard in range(shards):
        split.shard(shards, shard, contiguous=True).to_parquet(os.path.join(folder, f"{prefix}-{shard}.parquet"))


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    """40 training images in 4 parquet shards, 12 validation images in one; 12x10 pixels, 4 classes."""
    folder = str(tmp_path_factory.mktemp("parquet"))
    train_labels = [i % len(CLASSES) for i in range(TRAIN_EXAMPLES)]
    _write_split(folder, "train", _images(TRAIN_EXAMPLES, 0), train_labels, SHARDS)
    _write_split(folder, "validation", _images(EVAL_EXAMPLES, 1), [i % 4 for i in range(EVAL_EXAMPLES)], 1)
    files = {
        "train": os.path.join(folder, "train-*.parquet"),
        "validation": os.path.join(folder, "validation-*.parquet"),
    }
    return {"folder": folder, "files": files, "labels": train_labels}


@pytest.fixture(autouse=True)
def short_parquet_wait(monkeypatch):
    """`datasets` waits 5 s after each pass over parquet files read by arrow's threads (a pyarrow crash with
    threads alive at shutdown); these files are read in microseconds, and the tests make dozens of passes."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.1)


def _load(parquet, **overrides):
    kwargs = dict(data_files=parquet["files"], test_split="validation", image_size=16, shuffle_buffer=8, seed=3)
    kwargs.update(overrides)
    return load_streaming_image_dataset("parquet", **kwargs)


def _oracle_pixels(image):
    """What the evaluation pixels must be: PIL's bilinear resize to 16x16, as uint8 / 255 (the plain-resize
    preprocessing of an int image size)."""
    array = np.asarray(image.convert("RGB").resize((16, 16), PILImage.BILINEAR))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def _args(output_dir, **overrides):
    fields = dict(adv_method="cure", max_steps=9, save_strategy="steps", save_steps=7, seed=3, eval_strategy="no")
    return tiny_run_arguments(output_dir, **{**fields, **overrides})


def _weights(trainer):
    net = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------------- the loader
def test_classes_come_from_the_class_label_and_evaluation_is_sized(parquet):
    data, num_classes = _load(parquet, max_eval_samples=5)
    train, evaluation = data["train"], data["test"]
    assert num_classes == len(CLASSES)
    assert isinstance(train, StreamingImageDataset) and isinstance(train, torch.utils.data.IterableDataset)
    assert not hasattr(train, "__len__") and train.num_shards == SHARDS
    assert train.features["label"].names == CLASSES
    assert len(evaluation) == 5 and str(evaluation.split) == "validation"
    # the evaluation set is the split's first 5 images, with the evaluation pixels
    from datasets import load_dataset

    stored = load_dataset("parquet", data_files=parquet["files"], split="validation", streaming=True)
    for index, example in zip(range(5), stored):
        assert torch.equal(evaluation[index]["pixel_values"], _oracle_pixels(example["image"]))
        assert evaluation[index]["labels"] == example["label"]
    assert len(_load(parquet)[0]["test"]) == EVAL_EXAMPLES  # unset: the whole split


def test_a_pass_is_shuffled_per_epoch_reproducibly_and_ignores_the_process_random_state(parquet):
    train = _load(parquet, augment="crop_flip")[0]["train"]

    def one_pass(epoch, torch_seed):
        train.set_epoch(epoch)
        torch.manual_seed(torch_seed)
        batches = list(torch.utils.data.DataLoader(train, batch_size=8, collate_fn=collate_pixels))
        return torch.cat([b["pixel_values"] for b in batches]), torch.cat([b["labels"] for b in batches])

    pixels, labels = one_pass(0, torch_seed=0)
    again, again_labels = one_pass(0, torch_seed=123)  # another process random state: the same pass
    assert torch.equal(pixels, again) and torch.equal(labels, again_labels)
    assert sorted(labels.tolist()) == sorted(parquet["labels"])  # every example once
    second, second_labels = one_pass(1, torch_seed=0)
    assert not torch.equal(labels, second_labels)  # a new order in the next pass
    assert sorted(second_labels.tolist()) == sorted(parquet["labels"])
    # reading an example leaves the process's random state as it was (the main process trains with it)
    state = torch.random.get_rng_state()
    next(iter(train))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_set_preprocessing_rebuilds_the_stream_transform_from_the_model(parquet):
    data, num_classes = _load(parquet, augment="crop")
    model = make_tiny_model("test_vit", num_classes=num_classes)  # 32x32 input
    set_preprocessing(data, model)
    assert data["train"].first_example()["pixel_values"].shape == (3, 32, 32)
    assert data["test"][0]["pixel_values"].shape == (3, 32, 32)
    assert data["train"].format["format_kwargs"]["transform"].augment == "crop"  # the augmentation kept


class _RecordingTransform:
    """The evaluation transform, leaving one file per call named after the process that decoded the image."""

    def __init__(self, folder):
        self.folder, self.inner = folder, image_transform(16, train=False)
        self.preprocessing, self.train, self.augment = self.inner.preprocessing, False, "none"
        self.image_column, self.label_column = "image", "label"

    def __call__(self, batch):
        assert all(isinstance(image, PILImage.Image) for image in batch["image"])  # decoded here
        with open(os.path.join(self.folder, f"{os.getpid()}-{os.urandom(4).hex()}"), "w"):
            pass
        return self.inner(batch)


def test_two_dataloader_workers_decode_their_own_shards(parquet, tmp_path):
    train = _load(parquet)[0]["train"]
    calls = tmp_path / "calls"
    calls.mkdir()
    train.set_transform(_RecordingTransform(str(calls)))
    trainer = CURETrainer(
        make_tiny_model(num_classes=len(CLASSES)),
        _args(tmp_path / "run", dataloader_num_workers=2),
        train_dataset=train,
    )
    probe_calls = len(os.listdir(calls))
    batches = list(trainer.get_train_dataloader())
    pids = {name.split("-")[0] for name in os.listdir(calls)}
    assert probe_calls == 1  # the model check's probe, in this process
    assert len(pids - {str(os.getpid())}) == 2  # the others: the two workers
    assert len(os.listdir(calls)) == probe_calls + TRAIN_EXAMPLES
    # one pass: every stored image once, with its evaluation pixels
    from datasets import load_dataset

    stored = load_dataset("parquet", data_files=parquet["files"], split="train", streaming=True)
    expected = sorted(_oracle_pixels(e["image"]).numpy().tobytes() for e in stored)
    seen = sorted(x.numpy().tobytes() for b in batches for x in b["pixel_values"])
    assert seen == expected


def test_persistent_workers_read_each_new_pass(parquet):
    """With `dataloader_persistent_workers` the workers keep their copy of the dataset between passes; the pass
    number reaches them (through the stream's shared epoch), so their second pass is the one fresh workers read."""
    train = _load(parquet, augment="crop_flip")[0]["train"]

    def loader(persistent):
        return torch.utils.data.DataLoader(
            train, batch_size=8, num_workers=2, persistent_workers=persistent, collate_fn=collate_pixels
        )

    def pixels(batches):
        return torch.cat([b["pixel_values"] for b in batches])

    persistent = loader(True)
    train.set_epoch(0)
    first = pixels(persistent)
    train.set_epoch(1)
    second = pixels(persistent)
    assert torch.equal(second, pixels(loader(False)))  # fresh workers, pass 1
    train.set_epoch(0)
    assert torch.equal(first, pixels(loader(False))) and not torch.equal(first, second)


def test_nothing_reads_the_stream_whole_at_start_up(tmp_path):
    """A generator-backed stream that fails past a few examples: building the trainer reads one (the model check),
    one training step reads a batch and the one prefetched after it."""
    from datasets import ClassLabel, Features, Image, IterableDataset

    reads = []
    images = _images(4, 2)

    def examples():
        for index in range(10**6):
            if len(reads) >= 20:
                raise RuntimeError("read past the start-up budget: something iterates the whole stream")
            reads.append(index)
            yield {"image": images[index % 4], "label": index % 4}

    features = Features(image=Image(), label=ClassLabel(names=CLASSES))
    source = IterableDataset.from_generator(examples, features=features)
    train = StreamingImageDataset(source, image_transform(16, train=True, augment="crop_flip"), shuffle_buffer=0)
    trainer = CURETrainer(
        make_tiny_model(num_classes=len(CLASSES)),
        _args(tmp_path / "run", max_steps=1, per_device_train_batch_size=4, save_strategy="no"),
        train_dataset=train,
    )
    assert len(reads) == 1 and trainer.model_num_classes == len(CLASSES)
    reads.clear()
    trainer.train()
    assert trainer.state.global_step == 1 and len(reads) <= 2 * 4 + 1


def test_the_model_check_probes_a_stream_with_one_example(parquet, tmp_path):
    """A head too small for the stream's classes (its ClassLabel) is refused when the trainer is built; a plain
    `datasets.IterableDataset` of one's own, with its own transform, is probed with one example of a fresh iterator,
    and training then runs on it."""
    from datasets import load_dataset

    with pytest.raises(ValueError, match="3 outputs but the training set has 4 classes"):
        CURETrainer(make_tiny_model(num_classes=3), _args(tmp_path / "small"), train_dataset=_load(parquet)[0]["train"])
    transform, calls = image_transform(16, train=True, augment="crop_flip"), []

    def counted(batch):
        calls.append(len(batch["label"]))
        return transform(batch)

    stream = load_dataset("parquet", data_files=parquet["files"], split="train", streaming=True)
    stream = stream.shuffle(seed=0, buffer_size=8).map(counted, batched=True, batch_size=1, remove_columns=["image"])
    trainer = CURETrainer(
        make_tiny_model(num_classes=len(CLASSES)),
        _args(tmp_path / "run", max_steps=2, save_strategy="no"),
        train_dataset=stream,
    )
    assert calls == [1]  # the probe, and nothing more
    trainer.train()
    assert trainer.state.global_step == 2


# --------------------------------------------------------------------------------------------- the key case
@pytest.mark.parametrize("method,workers,streaming", [("cure", 0, True), ("pgd", 2, False)])
def test_a_streamed_run_resumed_in_its_second_pass_is_bit_identical(parquet, tmp_path, method, workers, streaming):
    """40 examples in batches of 8: 5 batches a pass in one process (6 with two workers, each ending on a short
    batch), so the checkpoint of step 7 lies in the second pass, which the Trainer alone would replay from its
    start. Shuffled (buffer 8, shards), randomly cropped and flipped; streamed parquet, or memory-mapped and cut
    into 4 shards (`to_iterable_dataset`)."""

    arguments = dict(adv_method=method, dataloader_num_workers=workers)
    if method == "cure":
        arguments["revision_rate"] = 0.5  # revisions on most steps: the revision model's generator is in the check

    def trainer(folder, model_seed, callbacks=()):
        memory_mapped = {} if streaming else dict(num_shards=SHARDS, cache_dir=str(tmp_path / "cache"))
        train = _load(parquet, augment="crop_flip", streaming=streaming, **memory_mapped)[0]["train"]
        return CURETrainer(
            make_tiny_model(num_classes=len(CLASSES), seed=model_seed),
            _args(tmp_path / folder, **arguments),
            train_dataset=train,
            callbacks=list(callbacks),
        )

    full = trainer("full", 1)
    full.train()
    interrupted = trainer("cut", 1, [stop_after_save(7)])
    interrupted.train()
    assert interrupted.state.global_step == 7 and 1 < interrupted.state.epoch < 2  # in the second pass
    resumed = trainer("cut", 99)  # other initial weights: the checkpoint must overwrite them all
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-7"))

    assert resumed.state.global_step == full.state.global_step == 9
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after the resume, e.g. {different[:3]}"

    def after_resume(t, key):
        return [e[key] for e in t.state.log_history if "loss" in e and e["step"] > 7]

    assert after_resume(resumed, "loss") == after_resume(full, "loss")
    assert after_resume(resumed, "epoch") == after_resume(full, "epoch")  # the same pass and place in it


# ------------------------------------------------------------------------------------------------ the card
def test_the_card_names_the_hub_dataset_and_the_evaluated_split(parquet, tmp_path):
    """A local parquet copy of ImageNet-1k: the card's `datasets:` is the Hub id, its results name the split."""
    from huggingface_hub import ModelCard

    data, num_classes = _load(parquet, dataset_id="ILSVRC/imagenet-1k")
    args = _args(tmp_path / "run", eval_max_examples=4, eval_pgd_steps=1, per_device_eval_batch_size=4)
    trainer = CURETrainer(
        make_tiny_model(num_classes=num_classes), args, train_dataset=data["train"], eval_dataset=data["test"]
    )
    trainer.evaluate()
    trainer.save_model()
    card = ModelCard.load(str(tmp_path / "run" / "README.md"))
    assert card.data.datasets == ["ILSVRC/imagenet-1k"]
    results = card.data.eval_results
    assert results and {(r.dataset_type, r.dataset_split) for r in results} == {("ILSVRC/imagenet-1k", "validation")}
    # the saved config keeps the stream's class names
    import json

    with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["label_names"] == CLASSES


def test_the_name_datasets_records_for_imagenet_gives_the_card_its_hub_id(parquet, tmp_path):
    train = _load(parquet)[0]["train"]
    train.info.dataset_name = "imagenet-1k"  # what `datasets` records for load_dataset("ILSVRC/imagenet-1k")
    trainer = CURETrainer(make_tiny_model(num_classes=4), _args(tmp_path / "run"), train_dataset=train)
    info = trainer.model_card_info()
    assert (info["dataset"], info["dataset_id"]) == ("imagenet-1k", "ILSVRC/imagenet-1k")


def test_card_names_of_hub_ids_and_local_files():
    assert _card_name("imagenet-1k", None, None) == "ILSVRC/imagenet-1k"  # the id the Hub lists today
    assert _card_name("ILSVRC/imagenet-1k", None, None) == "ILSVRC/imagenet-1k"
    assert _card_name("parquet", {"train": "/data/imagenet/train-*.parquet"}, None) == "parquet imagenet"
    assert "/" not in _card_name("imagefolder", None, "/data/pets")


# -------------------------------------------------------------------------------------------------- refusals
def test_a_stream_without_max_steps_is_refused_with_the_number_of_steps(parquet, tmp_path):
    # memory-mapped and sharded: the split's size is known, so the fix names the steps of 3 epochs
    data, _ = _load(parquet, streaming=False, num_shards=SHARDS, cache_dir=str(tmp_path / "cache"))
    assert data["train"].num_shards == SHARDS and data["train"].num_examples == TRAIN_EXAMPLES
    args = _args(tmp_path / "run", max_steps=-1, num_train_epochs=3)
    with pytest.raises(ValueError, match=r"max_steps=-1: the training set is a stream .*Fix: set max_steps; e.g\. "):
        CURETrainer(make_tiny_model(num_classes=4), args, train_dataset=data["train"])
    with pytest.raises(ValueError, match=r"max_steps=15 is 3 epochs of its 40 examples at 8 per optimizer step"):
        CURETrainer(make_tiny_model(num_classes=4), args, train_dataset=data["train"])  # ceil(3 * 40 / 8)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(validation_fraction=0.1), r"validation_fraction=0.1 splits the training set.*Fix: set validation_frac"),
        (dict(attack_warmup_epochs=2.0), r"attack_warmup_epochs=2 counts epochs.*Fix: set attack_warmup_epochs=0"),
        (dict(adv_method="trades", awp_gamma=True), r"awp_warmup_epochs=10 counts epochs.*awp_warmup_epochs=0"),
    ],
)
def test_what_a_stream_cannot_serve_is_refused_with_the_fix(parquet, tmp_path, overrides, message):
    train = _load(parquet)[0]["train"]
    with pytest.raises(ValueError, match=message):
        CURETrainer(make_tiny_model(num_classes=4), _args(tmp_path / "run", **overrides), train_dataset=train)


def test_loader_refusals_name_the_fix(parquet, tmp_path):
    from datasets import Value

    with pytest.raises(ValueError, match=r"test_split='test' is not a split .*'validation'"):
        _load(parquet, test_split=None)
    with pytest.raises(ValueError, match=r"num_shards=4 shards a memory-mapped dataset.*Fix: drop num_shards"):
        _load(parquet, num_shards=4)
    for wrong in (0, 2.5):
        with pytest.raises(ValueError, match=rf"max_eval_samples={wrong} is invalid: allowed an int >= 1, or None"):
            _load(parquet, max_eval_samples=wrong)
    folder = str(tmp_path)
    _write_split(folder, "train", _images(4, 3), [0, 1, 2, 3], 1, label_feature=Value("int64"))
    _write_split(folder, "test", _images(4, 4), [0, 1, 2, 3], 1, label_feature=Value("int64"))
    files = {"train": os.path.join(folder, "train-*.parquet"), "test": os.path.join(folder, "test-*.parquet")}
    with pytest.raises(ValueError, match=r"not a datasets ClassLabel.*cast_column\('label', datasets.ClassLabel"):
        load_streaming_image_dataset("parquet", data_files=files)


def test_a_streamed_evaluation_set_is_refused_with_the_fix(parquet, tmp_path):
    data = _load(parquet)[0]
    for eval_dataset, where in ((data["train"], "eval_dataset"), ({"test": data["train"]}, "eval_dataset['test']")):
        with pytest.raises(ValueError, match=rf"^{re.escape(where)} is a stream .*Fix: evaluate on a map-style Data"):
            CURETrainer(
                make_tiny_model(num_classes=4),
                _args(tmp_path / "run"),
                train_dataset=data["train"],
                eval_dataset=eval_dataset,
            )


# ------------------------------------------------------------------------------------------------ the recipe
def _train_vit():
    import sys

    recipes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
    if recipes not in sys.path:
        sys.path.insert(0, recipes)
    import train_vit

    return train_vit


def test_the_recipe_trains_on_a_stream_of_parquet_shards(parquet, tmp_path):
    out = tmp_path / "run"
    flags = ["--streaming", "--dataset_name", "parquet", "--train_dir", parquet["folder"], "--test_split"]
    flags += ["validation", "--dataset_id", "ILSVRC/imagenet-1k", "--model_name_or_path", "test_resnet"]
    flags += ["--image_size", "16", "--natural_epochs", "0", "--max_steps", "3", "--per_device_train_batch_size", "8"]
    flags += ["--attack_steps", "1", "--eval_pgd_steps", "2", "--shuffle_buffer", "16", "--output_dir", str(out)]
    flags += ["--use_cpu", "--dataloader_num_workers", "0", "--logging_steps", "1"]
    results = _train_vit().main(flags)
    metrics = results["cure"]
    assert metrics["eval_n_examples"] == EVAL_EXAMPLES and 0.0 <= metrics["eval_pgd2_accuracy"] <= 1.0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "ILSVRC/imagenet-1k" in card


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--streaming", "--dataset_name", "parquet"], r"--streaming with a natural stage 0.*--natural_epochs 0"),
        (["--shuffle_buffer", "5"], r"shuffle_buffer=5 is invalid without --streaming.*add --streaming"),
        (["--stream_shards", "4"], r"stream_shards=4 is invalid without --streaming"),
        (["--streaming", "--max_train_samples", "10"], r"max_train_samples=10 is invalid with --streaming"),
        (["--streaming", "--stream_shards", "0"], r"stream_shards=0 is invalid"),
    ],
)
def test_the_recipes_stream_flags_are_checked(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        _train_vit().main([*flags, "--output_dir", str(tmp_path), "--use_cpu", "--max_steps", "2"])
