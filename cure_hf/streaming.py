"""Streamed training data: ImageNet-scale image datasets through a `datasets` IterableDataset.

ImageNet-1k (1.28M images) comes through `datasets` as parquet shards. Read as a stream
(``load_dataset(..., streaming=True)``: from the Hub or local files, nothing converted up front) or memory-mapped
and sharded (``Dataset.to_iterable_dataset(num_shards=N)``: after the usual one-time arrow conversion), it never has
to sit in memory, and nothing reads it whole before training starts:

- the class count and the label names come from the label column's ``ClassLabel``, not from a pass over the data;
- decoding and the training transform (:func:`cure_hf.data.image_transform`) run lazily, example by example, in the
  DataLoader workers; each worker reads its own shards;
- the order is ``IterableDataset.shuffle``'s (shards shuffled, then a buffer of ``shuffle_buffer`` examples), new in
  every pass through ``set_epoch`` (the Trainer calls it), and the same for the same seed;
- the random augmentation of each example is drawn from a seed of its own (the run's seed, the pass, the worker,
  the example's place in that worker's stream), not from the process's random state: a pass reads the same pixels
  whatever happened before it, so a run resumed mid-pass replays the interrupted one bit for bit.

Evaluation needs a sized set (the Trainer's evaluation loop, ``eval_max_examples``, the attacks' batching): the
evaluation split is the first ``max_eval_samples`` examples of its stream (all of it when unset), held in memory as
the encoded images, with the evaluation transform.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .data import Preprocessing, _pick_column, image_transform

__all__ = ["StreamingImageDataset", "load_streaming_image_dataset", "hub_dataset_id", "DEFAULT_SHUFFLE_BUFFER"]

logger = logging.getLogger(__name__)

# Examples held by the shuffle buffer: about 1.3 GB of encoded ImageNet images (~130 KB each), per DataLoader worker.
DEFAULT_SHUFFLE_BUFFER = 10_000

# Datasets whose Hub id moved into an organisation; the old id still loads (the Hub redirects), and the card's
# `datasets:` entry names the id the Hub lists today.
_MOVED_HUB_IDS = {"imagenet-1k": "ILSVRC/imagenet-1k", "cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
_LOCAL_BUILDERS = ("parquet", "imagefolder", "arrow", "webdataset")


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """A `datasets.IterableDataset` of images as training examples ``{"pixel_values", "labels"}``, shuffled per pass.

    ``source``: the stream (``load_dataset(..., streaming=True)[split]`` or ``Dataset.to_iterable_dataset(...)``),
    with an image column and a ``ClassLabel`` label column. ``transform``: a batch transform in the format of
    ``Dataset.set_transform`` (best :func:`cure_hf.data.image_transform`), applied to one example at a time where
    the example is read (a DataLoader worker). ``shuffle_buffer``: the size of ``IterableDataset.shuffle``'s buffer
    (0: the stream's own order). ``dataset_name``: the name (a Hub id gives the model card its ``datasets:``).
    ``num_examples``: the size of a pass when known (else the split's metadata tells it, or nothing does).

    Like a map-style split with a transform, it has ``features``, ``info``, ``format`` and ``set_transform``, so
    :func:`cure_hf.data.set_preprocessing`, the saved label names and the model card treat it as one. It has no
    length: train it with ``max_steps``. ``first_example()`` reads the stream's first example (before shuffling),
    for the trainer's up-front model check.
    """

    def __init__(
        self,
        source,
        transform: Callable,
        *,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        seed: int = 0,
        dataset_name: Optional[str] = None,
        num_examples: Optional[int] = None,
    ):
        from datasets import IterableDataset

        if not isinstance(source, IterableDataset):
            raise TypeError(
                f"StreamingImageDataset needs a datasets.IterableDataset, got {type(source).__name__}; for a map-style "
                "datasets.Dataset pass dataset.to_iterable_dataset(num_shards=...)"
            )
        if type(shuffle_buffer) is not int or shuffle_buffer < 0:
            raise ValueError(
                f"shuffle_buffer={shuffle_buffer!r} is invalid: allowed an int >= 0 (0: no shuffling), e.g. "
                f"{DEFAULT_SHUFFLE_BUFFER}"
            )
        self.source = source
        self.seed = int(seed)
        self.shuffle_buffer = shuffle_buffer
        self.stream = source.shuffle(seed=self.seed, buffer_size=shuffle_buffer) if shuffle_buffer else source
        self.info = source.info.copy()
        if dataset_name:
            self.info.dataset_name = dataset_name
        self._transform = transform
        self._num_examples = num_examples

    # -- what a map-style split with a transform offers
    @property
    def features(self):
        return self.source.features

    @property
    def split(self):
        return self.source.split

    @property
    def column_names(self):
        return self.source.column_names

    @property
    def format(self) -> Dict[str, Any]:
        """As ``Dataset.format`` after ``set_transform``: where cure_hf reads the transform's settings."""
        return {"type": "custom", "format_kwargs": {"transform": self._transform}, "columns": None}

    def set_transform(self, transform: Callable) -> None:
        """Replace the transform (``Dataset.set_transform``); :func:`cure_hf.data.set_preprocessing` calls it."""
        self._transform = transform

    # -- the stream
    @property
    def num_shards(self) -> int:
        """Shards of the stream: at most this many DataLoader workers read in parallel."""
        return self.stream.num_shards

    @property
    def num_examples(self) -> Optional[int]:
        """The examples of a pass: as given, else as the split's metadata records them (``info.splits``, e.g. the
        Hub's ImageNet-1k), else None. Only a message uses it (the steps of an epoch); training never needs it."""
        if self._num_examples is not None:
            return self._num_examples
        splits = self.info.splits or {}
        entry = splits.get(str(self.split)) if self.split is not None else None
        return int(entry.num_examples) if entry is not None and entry.num_examples else None

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        """The pass about to start: a new shuffle of the shards and the buffer, and new augmentation draws."""
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        epoch = self.epoch  # the stream reads its own epoch the same way (shared with persistent workers)
        for index, example in enumerate(self.stream):  # in a worker, datasets hands it its own shards
            yield self._transformed(example, example_seed(self.seed, epoch, worker_id, index))

    def first_example(self) -> Dict[str, Any]:
        """The transformed first example of the stream as stored (no shuffle buffer to fill), for a probe; the
        process's random state is left as it was."""
        example = next(iter(self.source.take(1)))
        return self._transformed(example, example_seed(self.seed, -1, 0, 0))

    def _transformed(self, example: Dict[str, Any], seed: int) -> Dict[str, Any]:
        with preserved_random_state(seed):
            batch = self._transform({key: [value] for key, value in example.items()})
        return {key: values[0] for key, values in batch.items()}

    def __repr__(self) -> str:
        return (
            f"StreamingImageDataset(name={self.info.dataset_name!r}, split={self.split!r}, features="
            f"{list(self.features or {})}, num_shards={self.num_shards}, shuffle_buffer={self.shuffle_buffer}, "
            f"seed={self.seed})"
        )


def example_seed(seed: int, epoch: int, worker: int, index: int) -> int:
    """The seed of one example's augmentation: a hash of the run's seed, the pass, the worker and the example's
    place in that worker's stream (numpy's SeedSequence: neighbouring inputs give unrelated seeds)."""
    words = [int(seed) % 2**32, int(epoch) + 1, int(worker), int(index)]  # epoch -1: the probe
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def preserved_random_state(seed: Optional[int] = None):
    """Python's, numpy's and torch's CPU random state restored after the block; inside it, seeded with ``seed``
    when given (torchvision's transforms draw from torch, timm's from Python and numpy)."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def load_streaming_image_dataset(
    name: str,
    *,
    preprocessing: Preprocessing = None,
    image_size: Optional[int] = None,
    augment: str = "none",
    augment_options: Optional[Dict[str, Any]] = None,
    config_name: Optional[str] = None,
    data_files=None,
    data_dir: Optional[str] = None,
    train_split: str = "train",
    test_split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    max_eval_samples: Optional[int] = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    seed: int = 0,
    streaming: bool = True,
    num_shards: Optional[int] = None,
    dataset_id: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> Tuple[Dict[str, Any], int]:
    """``({"train": StreamingImageDataset, "test": datasets.Dataset}, num_classes)`` without reading the data whole.

    ``name``: a Hub id ("ILSVRC/imagenet-1k"), a packaged builder with ``data_files``/``data_dir`` ("parquet",
    "imagefolder"), or a local folder; ``config_name`` goes to ``load_dataset``. ``streaming=True`` (default)
    reads it as a stream (``load_dataset(..., streaming=True)``); ``streaming=False`` loads it memory-mapped (the
    one-time conversion to arrow of ``load_dataset``) and streams the training split with
    ``to_iterable_dataset(num_shards=num_shards)`` (default: 64 shards, or one per example below that).

    ``preprocessing``/``image_size``/``augment``/``augment_options``: as :func:`cure_hf.data.load_image_dataset`
    (a model built after the data takes over its pixels with :func:`cure_hf.data.set_preprocessing`).

    ``test_split``: the split to evaluate on; unset, "test" (ImageNet-1k's "test" split has no labels: pass
    "validation"). Its first ``max_eval_samples`` examples (all when unset) are held in memory, encoded, as a
    map-style ``Dataset`` whose ``split`` the model card reports.

    The label column must be a ``ClassLabel`` (its names and count are the model's classes). ``shuffle_buffer``,
    ``seed``: ``IterableDataset.shuffle``'s buffer and seed (also the augmentation's). ``dataset_id``: the Hub id
    the model card names for a local copy of a Hub dataset (e.g. parquet files of "ILSVRC/imagenet-1k").
    """
    from datasets import ClassLabel, load_dataset

    if max_eval_samples is not None and (type(max_eval_samples) is not int or max_eval_samples < 1):
        raise ValueError(f"max_eval_samples={max_eval_samples!r} is invalid: allowed an int >= 1, or None for all")
    if streaming and num_shards is not None:
        raise ValueError(
            f"num_shards={num_shards} shards a memory-mapped dataset (streaming=False); a stream's shards are its "
            "files (parquet: stream.reshard() splits them into row groups). Fix: drop num_shards, or set "
            "streaming=False"
        )
    if num_shards is not None and (type(num_shards) is not int or num_shards < 1):
        raise ValueError(f"num_shards={num_shards!r} is invalid: allowed an int >= 1")
    raw = load_dataset(
        name, config_name, data_files=data_files, data_dir=data_dir, streaming=streaming, cache_dir=cache_dir
    )
    test_split = test_split if test_split is not None else "test"
    for role, split in (("train_split", train_split), ("test_split", test_split)):
        if split not in raw:
            raise ValueError(
                f"{role}={split!r} is not a split of {name!r}; its splits are {list(raw)}; pass --{role} with one "
                "of them (a stream cannot carve a test split out of its training split without reading it whole)"
            )
    train, test = raw[train_split], raw[test_split]
    names = list(train.features or {})
    image_column = _pick_column(names, image_column, ("image", "img", "pixel_values"), "image")
    label_column = _pick_column(names, label_column, ("label", "labels", "fine_label"), "label")
    feature = train.features[label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"the label column {label_column!r} of {name!r} is {feature}, not a datasets ClassLabel, so its classes "
            "are unknown without a pass over the data. Fix: cast it with its class names first, e.g. "
            f"stream.cast_column({label_column!r}, datasets.ClassLabel(names=[...])), and wrap the stream in "
            "cure_hf.streaming.StreamingImageDataset, or load the data map-style with cure_hf.load_image_dataset"
        )
    if preprocessing is None:
        preprocessing = image_size or 32
    elif image_size is not None:
        raise ValueError(
            f"image_size={image_size} and preprocessing=... both set the input size; the model's preprocessing "
            "decides it: leave image_size unset"
        )
    size = None
    if not streaming:
        size = len(train)
        train = train.to_iterable_dataset(num_shards=min(num_shards or 64, size))
    common: Dict[str, Any] = dict(augment=augment, image_column=image_column, label_column=label_column)
    if augment_options is not None:  # image_transform's options of the "timm" augmentation
        common["augment_options"] = augment_options
    card_name = dataset_id or _card_name(name, data_files, data_dir)
    stream = StreamingImageDataset(
        train,
        image_transform(preprocessing, train=True, **common),
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        dataset_name=card_name,
        num_examples=size,
    )
    evaluation = _evaluation_set(test, max_eval_samples, test_split)
    evaluation.info.dataset_name = card_name
    evaluation.set_transform(image_transform(preprocessing, train=False, **common))
    logger.info(
        "streaming %s: %s; evaluating on %d examples of %r",
        name,
        stream,
        len(evaluation),
        test_split,
    )
    return {"train": stream, "test": evaluation}, int(feature.num_classes)


def _evaluation_set(split, limit: Optional[int], split_name: str):
    """The first ``limit`` examples of ``split`` as a map-style ``Dataset``: a memory-mapped split is cut, a stream's
    examples are read undecoded (the encoded image bytes) and kept in memory."""
    from datasets import Dataset, IterableDataset, NamedSplit

    if not isinstance(split, IterableDataset):
        return split.select(range(min(limit, len(split)))) if limit is not None else split
    rows = split.decode(False)
    if limit is not None:
        rows = rows.take(limit)
    examples = list(rows)
    if not examples:
        raise ValueError(f"the evaluation split {split_name!r} is empty")
    return Dataset.from_list(examples, features=split.features, info=split.info.copy(), split=NamedSplit(split_name))


def _card_name(name: str, data_files, data_dir: Optional[str]) -> str:
    """The dataset's name for the model card: a Hub id as the Hub lists it today; local data by its folder, without
    a "/" (the card gives it no `datasets:` entry)."""
    if name in _LOCAL_BUILDERS or os.path.exists(name):
        where = data_dir or (name if os.path.exists(name) else None)
        if where is None and data_files is not None:
            first = data_files if isinstance(data_files, str) else next(iter(_flat_files(data_files)), "")
            where = os.path.dirname(first)
        folder = os.path.basename(os.path.normpath(where)) if where else ""
        builder = name if name in _LOCAL_BUILDERS else "local"
        return f"{builder} {folder}".strip()
    return hub_dataset_id(name) or name


def hub_dataset_id(name: Optional[str]) -> Optional[str]:
    """The Hub id of a dataset name: an id with its namespace as it is, the old id of a dataset that moved into an
    organisation (also the name `datasets` records for it, e.g. "imagenet-1k") as the Hub lists it today; else None."""
    if not name:
        return None
    return str(name) if "/" in str(name) else _MOVED_HUB_IDS.get(str(name))


def _flat_files(data_files) -> list:
    if isinstance(data_files, dict):
        return [f for value in data_files.values() for f in ([value] if isinstance(value, str) else value)]
    return list(data_files)
