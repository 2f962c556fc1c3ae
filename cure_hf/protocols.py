"""RobustBench's L-inf protocols for ``cure-hf evaluate --protocol``: the data, pixels, attack and result file.

    cure-hf evaluate --model_name_or_path MODEL --protocol robustbench-imagenet --test_dir IMAGENET/val
    cure-hf evaluate --model_name_or_path MODEL --protocol robustbench-cifar10 [--dataset_name uoft-cs/cifar10]

What each protocol fixes, as RobustBench's ``robustbench.eval.benchmark`` does it:

- ``robustbench-imagenet``: the 5,000 ImageNet validation images of RobustBench's list (shipped here, see
  ``protocol_data/NOTICE``), in its order; each image opened with PIL and converted to RGB (no EXIF rotation),
  then torchvision's ``Resize(256)`` (bilinear, shorter side to 256), ``CenterCrop(224)`` and ``ToTensor()``
  (pixels in [0, 1]), RobustBench's ``Res256Crop224``; labels are the index of the image's WordNet id among the
  1,000 sorted ones (RobustBench's and torchvision's ImageFolder's order); AutoAttack standard at eps 4/255.
- ``robustbench-cifar10``: the 10,000 CIFAR-10 test images, ``ToTensor()`` only; AutoAttack standard at 8/255.

Everything else that could change the number is refused (another eps, attack, norm, an image size). A run on
fewer images (``--eval_max_examples``, another ``--subset_ids`` list) says so: ``"protocol_complete": false``.
The result file has RobustBench's ``model_info`` fields (``clean_acc`` and ``autoattack_acc`` in percent as the
strings its ``update_json`` writes, ``eps`` as "4/255"), with the fields only a submitter knows (paper, link)
left null, and how it was computed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = [
    "Protocol",
    "PROTOCOLS",
    "ProtocolArguments",
    "CIFAR10_CLASSES",
    "robustbench_imagenet_ids_file",
    "read_subset_ids",
    "imagenet_class_names",
    "protocol_transform",
    "load_imagenet_subset",
    "load_cifar10_test",
    "subset_digest",
    "load_protocol_data",
    "check_protocol_arguments",
    "check_model_for_protocol",
    "robustbench_record",
    "robustbench_percent",
]

DATA_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protocol_data")
IMAGENET_IDS_FILE_NAME = "robustbench_imagenet_test_image_ids.txt"
# sha256 of RobustBench's robustbench/helper_files/imagenet_test_image_ids.txt (protocol_data/NOTICE)
IMAGENET_IDS_SHA256 = "d4121626d07722a0126c35b1563042e46a546f1a05ce705f2cdc635896d58574"
# torchvision's CIFAR10.classes, the label order RobustBench (and the Hub's uoft-cs/cifar10) use
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_DEFAULT_DATASET = "uoft-cs/cifar10"
# The dataset_name a user did not set (DatasetArguments' default): a protocol picks its own data instead.
UNSET_DATASET_NAME = "digits"


@dataclass(frozen=True)
class Protocol:
    """One RobustBench evaluation: its data set, threat model, radius, number of images and pixels."""

    name: str
    dataset: str  # RobustBench's BenchmarkDataset value
    threat_model: str
    eps: str
    n_examples: int
    image_size: int
    num_classes: int
    preprocessing: str  # RobustBench's name of the transform (robustbench.data.PREPROCESSINGS)

    @property
    def eps_value(self) -> float:
        numerator, denominator = self.eps.split("/")
        return int(numerator) / int(denominator)


PROTOCOLS: Dict[str, Protocol] = {
    "robustbench-imagenet": Protocol(
        "robustbench-imagenet", "imagenet", "Linf", "4/255", 5000, 224, 1000, "Res256Crop224"
    ),
    "robustbench-cifar10": Protocol("robustbench-cifar10", "cifar10", "Linf", "8/255", 10000, 32, 10, "ToTensor"),
}


@dataclass
class ProtocolArguments:
    """``cure-hf evaluate --protocol``: a RobustBench protocol instead of the flags' own evaluation."""

    protocol: Optional[str] = field(
        default=None,
        metadata={
            "help": "robustbench-imagenet (AutoAttack standard at 4/255 on RobustBench's 5,000 ImageNet validation "
            "images, from --test_dir) or robustbench-cifar10 (AutoAttack standard at 8/255 on the 10,000 CIFAR-10 "
            "test images); writes RobustBench's result fields.",
            "choices": list(PROTOCOLS),
        },
    )
    subset_ids: Optional[str] = field(
        default=None,
        metadata={
            "help": "robustbench-imagenet: a file of '<wnid>/<file name>' lines to evaluate instead of RobustBench's "
            "list (default: RobustBench's, shipped with cure_hf); another list is marked protocol_complete false."
        },
    )

    def __post_init__(self):
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol={self.protocol!r} is unknown: allowed {', '.join(PROTOCOLS)}")
        if self.subset_ids is not None and self.protocol != "robustbench-imagenet":
            raise ValueError(
                f"subset_ids={self.subset_ids!r} is only read by --protocol robustbench-imagenet "
                f"(protocol={self.protocol!r}); drop --subset_ids or add --protocol robustbench-imagenet"
            )


# ------------------------------------------------------------------------------------ ImageNet ids
def robustbench_imagenet_ids_file() -> str:
    """The shipped copy of RobustBench's list of its 5,000 ImageNet validation images."""
    return os.path.join(DATA_FOLDER, IMAGENET_IDS_FILE_NAME)


def imagenet_class_names() -> List[str]:
    """The 1,000 ImageNet WordNet ids in class-index order (sorted, as RobustBench and torchvision number them)."""
    import timm.data

    return list(timm.data.ImageNetInfo().label_names())


def read_subset_ids(path: str) -> List[str]:
    """The ``<wnid>/<file name>`` lines of an ids file, in order; blank lines skipped, anything else refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subset_ids={path!r}: no such file (a text file of '<wnid>/<file name>' lines)")
    known = set(imagenet_class_names())
    ids: List[str] = []
    seen = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            entry = line.strip()
            if not entry:
                continue
            wnid, _, name = entry.partition("/")
            if not name or "/" in name or wnid not in known:
                raise ValueError(
                    f"{path}, line {number}: {entry!r} is not '<wnid>/<file name>' with one of ImageNet's 1,000 "
                    "WordNet ids (e.g. n09468604/ILSVRC2012_val_00015253.JPEG, as RobustBench's list has them)"
                )
            if entry in seen:
                raise ValueError(f"{path}, line {number}: {entry!r} is listed twice; list each image once")
            seen.add(entry)
            ids.append(entry)
    if not ids:
        raise ValueError(f"subset_ids={path!r} lists no image; give a file of '<wnid>/<file name>' lines")
    return ids


def subset_digest(ids: Sequence[str]) -> str:
    """sha256 of the ids as RobustBench's file writes them (newline-separated, no newline after the last)."""
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def _find_image(root: str, entry: str) -> Optional[str]:
    """``root/<wnid>/<file>`` (the class folders of torchvision's and RobustBench's layout), else ``root/<file>``."""
    wnid, name = entry.split("/")
    for path in (os.path.join(root, wnid, name), os.path.join(root, name)):
        if os.path.isfile(path):
            return path
    return None


# ------------------------------------------------------------------------------------ pixels
def protocol_transform(protocol: Protocol) -> Callable:
    """RobustBench's transform of the protocol's PIL images (torchvision, as ``robustbench.data.PREPROCESSINGS``)."""
    from torchvision import transforms as T

    if protocol.preprocessing == "Res256Crop224":
        return T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224), T.ToTensor()])
    return T.ToTensor()


def _imagenet_pixels(protocol: Protocol) -> Callable[[Dict[str, List]], Dict[str, List]]:
    """Files -> pixels as RobustBench's loader reads them: PIL, ``convert("RGB")``, no EXIF rotation (datasets'
    ``Image`` feature would rotate some images), then the protocol's transform."""
    from PIL import Image

    pipeline = protocol_transform(protocol)

    def transform(batch):
        pixels = []
        for path in batch["image_path"]:
            with open(path, "rb") as f, Image.open(f) as image:
                pixels.append(pipeline(image.convert("RGB")))
        return {"pixel_values": pixels, "labels": list(batch["label"])}

    return transform


def load_imagenet_subset(val_dir: str, ids: Sequence[str], max_examples: Optional[int] = None):
    """The protocol's ImageNet images as a ``datasets.Dataset`` of {"pixel_values", "labels"}: the first
    ``max_examples`` (all when None) of ``ids``, found under ``val_dir``. A missing image is refused, naming how
    many are missing and one of them; only the images to evaluate need to be there."""
    from datasets import ClassLabel, Dataset, Features, Value

    protocol = PROTOCOLS["robustbench-imagenet"]
    if not os.path.isdir(val_dir):
        raise FileNotFoundError(
            f"test_dir={val_dir!r} is no folder; give the ImageNet validation folder (<wnid>/ILSVRC2012_val_*.JPEG)"
        )
    wanted = list(ids if max_examples is None else ids[:max_examples])
    found = [_find_image(val_dir, entry) for entry in wanted]
    missing = [entry for entry, path in zip(wanted, found) if path is None]
    if missing:
        wnid, name = missing[0].split("/")
        nested = os.path.join(val_dir, "val")
        hint = (
            f" It holds a folder 'val': RobustBench's data_dir layout; pass --test_dir {nested}."
            if os.path.isdir(nested)
            else ""
        )
        raise FileNotFoundError(
            f"{len(missing)} of the {len(wanted)} images to evaluate are missing from test_dir={val_dir!r}, e.g. "
            f"{missing[0]} (looked for {os.path.join(val_dir, wnid, name)} and {os.path.join(val_dir, name)}). "
            f"--test_dir must be the ImageNet validation folder, with class folders (<wnid>/ILSVRC2012_val_*.JPEG, "
            f"as torchvision's ImageNet and RobustBench read it) or every file in one folder.{hint}"
        )
    names = imagenet_class_names()
    index = {wnid: i for i, wnid in enumerate(names)}
    dataset = Dataset.from_dict(
        {"image_path": found, "label": [index[entry.split("/")[0]] for entry in wanted]},
        features=Features({"image_path": Value("string"), "label": ClassLabel(names=names)}),
    )
    dataset.set_transform(_imagenet_pixels(protocol))
    return dataset


# ------------------------------------------------------------------------------------ CIFAR-10
def _cifar10_pixels(protocol: Protocol, image_column: str, label_column: str):
    pipeline = protocol_transform(protocol)
    side = protocol.image_size

    def transform(batch):
        pixels = []
        for image in batch[image_column]:
            if image.size != (side, side):
                raise ValueError(
                    f"robustbench-cifar10 takes CIFAR-10's {side}x{side} images as they are (ToTensor only); an image "
                    f"of column {image_column!r} is {image.size[0]}x{image.size[1]}: give the CIFAR-10 test set itself"
                )
            pixels.append(pipeline(image.convert("RGB")))
        return {"pixel_values": pixels, "labels": list(batch[label_column])}

    return transform


def load_cifar10_test(data_args, max_examples: Optional[int] = None):
    """CIFAR-10's test split as a ``datasets.Dataset`` of {"pixel_values", "labels"} (its first ``max_examples``).

    Read with ``datasets.load_dataset``: ``dataset_name`` (default uoft-cs/cifar10, from the Hub or its local cache;
    or a local dataset folder) with ``dataset_config_name``, or ``imagefolder`` with ``test_dir`` (class folders
    named as CIFAR-10's classes). A full run needs exactly 10,000 images, 1,000 per class, as CIFAR-10's test set
    has; class names, when the dataset has them, must be CIFAR-10's in its order.
    """
    from collections import Counter

    from datasets import load_dataset

    from .data import _pick_column

    protocol = PROTOCOLS["robustbench-cifar10"]
    name = data_args.dataset_name
    name = CIFAR10_DEFAULT_DATASET if name == UNSET_DATASET_NAME else name
    try:
        if name == "imagefolder":
            split = load_dataset("imagefolder", data_files={"test": os.path.join(data_args.test_dir, "**")})["test"]
        else:
            split = load_dataset(name, data_args.dataset_config_name, split=data_args.test_split)
    except Exception as error:  # a missing cache offline, an unknown split: one line with the fix
        raise ValueError(
            f"robustbench-cifar10 could not read the test split of dataset_name={name!r} ({type(error).__name__}: "
            f"{error}). Give a local copy: a dataset folder (--dataset_name FOLDER, e.g. parquet files of "
            "uoft-cs/cifar10), --dataset_name imagefolder --test_dir FOLDER (class folders airplane, automobile, "
            "...), or uoft-cs/cifar10 once downloaded into the Hugging Face cache"
        ) from error
    columns = split.column_names
    image_column = _pick_column(columns, data_args.image_column, ("img", "image"), "image")
    label_column = _pick_column(columns, data_args.label_column, ("label", "labels"), "label")
    feature = split.features[label_column]
    names = getattr(feature, "names", None)
    if names is not None and tuple(n.lower() for n in names) != CIFAR10_CLASSES:
        raise ValueError(
            f"the label column {label_column!r} of {name!r} has the classes {names}; robustbench-cifar10 needs "
            f"CIFAR-10's, in its order: {list(CIFAR10_CLASSES)}"
        )
    if max_examples is None or max_examples >= protocol.n_examples:
        counts = Counter(split[label_column])
        if len(split) != protocol.n_examples or sorted(counts.values()) != [1000] * 10:
            raise ValueError(
                f"robustbench-cifar10 evaluates the 10,000 CIFAR-10 test images (1,000 per class); the test split of "
                f"{name!r} has {len(split)} images ({dict(sorted(counts.items()))} per label). Give the full test "
                "set, or add --eval_max_examples N for a smoke run (its result is marked protocol_complete false)"
            )
    elif len(split) < max_examples:
        raise ValueError(
            f"eval_max_examples={max_examples}, but the test split of {name!r} has only {len(split)} images"
        )
    else:
        split = split.select(range(max_examples))
    split.set_transform(_cifar10_pixels(protocol, image_column, label_column))
    return split


def load_protocol_data(protocol: Protocol, protocol_args: ProtocolArguments, data_args, max_examples: Optional[int]):
    """The images to evaluate and what they are: ``(dataset, data, subset, incomplete)``.

    ``data`` names where they came from, ``subset`` describes an ImageNet ids list (None for CIFAR-10), and
    ``incomplete`` says why the run is not the whole protocol (None when it is).
    """
    reasons = []
    subset = None
    if protocol.dataset == "imagenet":
        path = protocol_args.subset_ids or robustbench_imagenet_ids_file()
        ids = read_subset_ids(path)
        digest = subset_digest(ids)
        subset = {
            "file": "RobustBench's list, shipped with cure_hf" if protocol_args.subset_ids is None else path,
            "n_ids": len(ids),
            "sha256": digest,
            "robustbench_list": digest == IMAGENET_IDS_SHA256,
        }
        if not subset["robustbench_list"]:
            reasons.append(f"--subset_ids {path} is not RobustBench's list of {protocol.n_examples} images")
        dataset = load_imagenet_subset(data_args.test_dir, ids, max_examples)
        data = data_args.test_dir
    else:
        dataset = load_cifar10_test(data_args, max_examples)
        name = data_args.dataset_name
        data = CIFAR10_DEFAULT_DATASET if name == UNSET_DATASET_NAME else name
        data = f"imagefolder {data_args.test_dir}" if name == "imagefolder" else data
    if max_examples is not None and len(dataset) < protocol.n_examples:
        reasons.append(
            f"--eval_max_examples {max_examples}: {len(dataset)} of the protocol's {protocol.n_examples} images"
        )
    return dataset, data, subset, ("; ".join(reasons) or None)


# ------------------------------------------------------------------------------------ checks
def _refuse(protocol: Protocol, flag: str, value: Any, why: str) -> None:
    raise ValueError(f"{flag} {value} contradicts --protocol {protocol.name}: {why}")


def check_protocol_arguments(protocol: Protocol, evaluation, model_args, data_args, output, default_attacks) -> None:
    """Refuse every flag that would change what the protocol measures, with what to do instead.

    ``default_attacks``: ``eval_attacks`` when the user left it unset (the CLI's default, replaced by the protocol's
    clean + AutoAttack).
    """
    other_run = "run cure-hf evaluate without --protocol for that"
    epsilons = getattr(evaluation, "eval_epsilons", [evaluation.eval_epsilon])
    if evaluation.eval_epsilon is not None and (len(epsilons) != 1 or abs(epsilons[0] - protocol.eps_value) > 1e-8):
        shown = ",".join(
            f"{round(e * 255)}/255" if abs(e * 255 - round(e * 255)) < 1e-6 else f"{e:.6g}" for e in epsilons
        )
        _refuse(
            protocol,
            "--eval_epsilon",
            shown,
            f"the protocol's radius is {protocol.eps}; drop --eval_epsilon, or {other_run}",
        )
    attacks = [a.strip() for a in str(evaluation.eval_attacks).split(",") if a.strip()]
    if evaluation.eval_attacks != default_attacks and sorted(attacks) not in (["autoattack"], ["autoattack", "clean"]):
        _refuse(
            protocol,
            "--eval_attacks",
            evaluation.eval_attacks,
            f"the protocol runs clean accuracy and AutoAttack (standard); drop --eval_attacks, or {other_run}",
        )
    if evaluation.autoattack_version != "standard" or evaluation.autoattack_attacks:
        value = evaluation.autoattack_version + (
            f" ({evaluation.autoattack_attacks})" if evaluation.autoattack_attacks else ""
        )
        _refuse(protocol, "--autoattack_version", value, "RobustBench's number is AutoAttack's standard version")
    if evaluation.eval_norm != protocol.threat_model:
        _refuse(
            protocol, "--eval_norm", evaluation.eval_norm, f"the protocol's threat model is {protocol.threat_model}"
        )
    defaults = {f.name: f.default for f in fields(evaluation)}
    for name in ("eval_pgd_steps", "eval_step_size", "eval_restarts"):
        flag, value = f"--{name}", getattr(evaluation, name)
        if value != defaults[name]:
            _refuse(protocol, flag, value, "no PGD/CW runs, and AutoAttack standard fixes its own steps and restarts")
    if evaluation.eval_max_examples is not None and evaluation.eval_max_examples > protocol.n_examples:
        _refuse(
            protocol,
            "--eval_max_examples",
            evaluation.eval_max_examples,
            f"the protocol has {protocol.n_examples} images; leave it unset for all of them",
        )
    if model_args.image_size not in (None, protocol.image_size):
        _refuse(
            protocol,
            "--image_size",
            model_args.image_size,
            f"the protocol's images are {protocol.image_size}x{protocol.image_size}",
        )
    if output.plot:
        _refuse(protocol, "--plot", output.plot, "a protocol has one radius, there is no eps curve to draw")
    if data_args.test_split != "test":
        _refuse(protocol, "--test_split", data_args.test_split, "the protocol evaluates the test images")
    if data_args.train_dir is not None:
        _refuse(protocol, "--train_dir", data_args.train_dir, "no training images are read; give --test_dir only")
    if protocol.dataset == "imagenet":
        if data_args.dataset_name not in (UNSET_DATASET_NAME, "imagefolder"):
            _refuse(
                protocol,
                "--dataset_name",
                data_args.dataset_name,
                "the ImageNet validation images come from --test_dir (a folder); drop --dataset_name",
            )
        for flag, value in (
            ("--dataset_config_name", data_args.dataset_config_name),
            ("--image_column", data_args.image_column),
            ("--label_column", data_args.label_column),
        ):
            if value is not None:
                _refuse(protocol, flag, value, "the images are files under --test_dir, labelled by RobustBench's list")
        if not data_args.test_dir:
            raise ValueError(
                "--protocol robustbench-imagenet needs --test_dir: the ImageNet validation folder "
                "(<wnid>/ILSVRC2012_val_*.JPEG, or every file in one folder)"
            )
    elif data_args.dataset_name == "imagefolder" and not data_args.test_dir:
        raise ValueError("--protocol robustbench-cifar10 with --dataset_name imagefolder needs --test_dir")
    elif data_args.dataset_name != "imagefolder" and data_args.test_dir:
        _refuse(protocol, "--test_dir", data_args.test_dir, "it is read with --dataset_name imagefolder only")


def _input_size(preprocessing) -> Optional[tuple]:
    if isinstance(preprocessing, dict):
        return tuple(int(s) for s in preprocessing["input_size"][-2:])
    from .data import _processor_output_size

    try:
        return _processor_output_size(preprocessing)
    except ValueError:  # a processor without one fixed size takes any
        return None


def check_model_for_protocol(model, protocol: Protocol) -> List[str]:
    """Refuse a model built for another input size; return warnings where its own preprocessing differs.

    RobustBench feeds every model of a leaderboard the protocol's pixels; a model trained on other pixels (another
    interpolation or crop) is evaluated on them all the same, which can cost it clean accuracy: said in the result.
    """
    from .models import model_preprocessing

    preprocessing = model_preprocessing(model)
    size = _input_size(preprocessing)
    wanted = (protocol.image_size, protocol.image_size)
    if size is not None and size != wanted:
        raise ValueError(
            f"the model takes {size[0]}x{size[1]} images, but --protocol {protocol.name} feeds {wanted[0]}x{wanted[1]} "
            "(RobustBench's pixels); evaluate a model built for that size"
        )
    if not isinstance(preprocessing, dict) or protocol.dataset != "imagenet":
        return []
    own = {key: preprocessing.get(key) for key in ("interpolation", "crop_pct", "crop_mode")}
    if (
        own["interpolation"] == "bilinear"
        and abs(float(own["crop_pct"]) - 224 / 256) < 1e-9
        and own["crop_mode"] == "center"
    ):
        return []
    return [
        f"the model's own preprocessing (interpolation {own['interpolation']}, crop_pct {own['crop_pct']}, crop_mode "
        f"{own['crop_mode']}) differs from the protocol's {protocol.preprocessing} (bilinear resize to 256, center "
        "crop 224): it is evaluated on the protocol's pixels, as RobustBench does"
    ]


# ------------------------------------------------------------------------------------ the result
def robustbench_percent(accuracy: float) -> str:
    """An accuracy in [0, 1] as RobustBench's ``update_json`` writes it: percent, rounded to 2 decimals, a string."""
    return str(round(accuracy * 100, 2))


def _architecture(model) -> Optional[str]:
    from .models import unwrap_normalized

    inner, _ = unwrap_normalized(model)
    timm_model = getattr(inner, "timm_model", inner)
    cfg = getattr(timm_model, "pretrained_cfg", None)
    if cfg and cfg.get("architecture"):
        return cfg["architecture"]
    architectures = getattr(getattr(inner, "config", None), "architectures", None)
    return architectures[0] if architectures else type(inner).__name__


def robustbench_record(
    protocol: Protocol,
    result,
    *,
    model,
    model_name_or_path: str,
    data: str,
    seed: int,
    batch_size: int,
    device: str,
    seconds: float,
    subset: Optional[Dict[str, Any]] = None,
    incomplete: Optional[str] = None,
    warnings: Sequence[str] = (),
) -> Dict[str, Any]:
    """The result file: RobustBench's ``model_info`` fields in its order (``robustbench.utils.ModelInfo``), the
    ones only a submitter knows null, then the threat model and how the numbers were computed."""
    import datetime

    import pyautoattack
    import torch

    from . import __version__

    metrics = result.metrics
    record: Dict[str, Any] = {
        "link": None,
        "name": None,
        "authors": None,
        "additional_data": None,
        "number_forward_passes": 1,
        "dataset": protocol.dataset,
        "venue": None,
        "architecture": _architecture(model),
        "eps": protocol.eps,
        "clean_acc": robustbench_percent(metrics["accuracy"]),
        "reported": None,
        "autoattack_acc": robustbench_percent(metrics["autoattack_accuracy"]),
        "footnote": None,
        "threat_model": protocol.threat_model,
        "protocol": protocol.name,
        "protocol_complete": incomplete is None,
        "n_examples": metrics["n_examples"],
        "protocol_n_examples": protocol.n_examples,
        "preprocessing": protocol.preprocessing,
        "autoattack": {
            "version": "standard",
            "norm": protocol.threat_model,
            "eps": protocol.eps_value,
            "standard": bool(result.settings.get("autoattack", {}).get("standard")),
            "accuracy_after_each_attack": {k: robustbench_percent(v) for k, v in result.autoattack_stages.items()},
        },
        "seed": seed,
        "batch_size": batch_size,
        "model": model_name_or_path,
        "data": data,
        "cure_hf_version": __version__,
        "pyautoattack_version": getattr(pyautoattack, "__version__", None),
        "torch_version": torch.__version__,
        "device": device,
        "seconds": round(seconds, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "warnings": sorted(set(result.warnings) | set(warnings)),
    }
    if subset is not None:
        record["subset_ids"] = subset
    if incomplete is not None:
        record["protocol_incomplete"] = incomplete
    return record
