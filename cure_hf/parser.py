"""Command lines of the recipes and of ``cure-hf``: `HfArgumentParser` over dataclasses, plus a config file.

    python recipes/train_vit.py CONFIG.yaml                     # the file's values
    python recipes/train_vit.py CONFIG.yaml --seed 1            # flags after it override the file
    python recipes/train_vit.py --config CONFIG.yaml --seed 1   # the same, in TRL's spelling

:class:`ConfigArgumentParser` follows TRL's ``TrlParser``: the file's values become the parser's defaults,
so what the command line says wins. Precedence, lowest first: the dataclass defaults, a script's
``parser.set_defaults(...)`` (e.g. a recipe's own defaults), the config file, the flags. The file (YAML or JSON)
maps argument names, spelled as the flags without their dashes, to values; a key that is no argument is an
error naming it, the file and the closest names. An ``env:`` mapping in the file sets environment variables.

The model and data arguments are shared by ``recipes/train_vit.py`` and ``cure-hf evaluate``, so the same
flag means the same thing in both.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from transformers import HfArgumentParser

__all__ = [
    "ConfigArgumentParser",
    "DefaultsOnceHelpFormatter",
    "read_config_file",
    "ModelArguments",
    "DatasetArguments",
    "DataTrainingArguments",
]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Keys the config file itself uses: a dataclass field of the same name could not be told apart.
_RESERVED_NAMES = ("config", "env")


# A default the help text states itself: "(default: X)", "(default X, ...)", "(default)"; one level of nested brackets.
_STATED_DEFAULT = re.compile(r"\s*\(default(?:[:\s][^()]*(?:\([^()]*\)[^()]*)*)?\)")


class DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`ArgumentDefaultsHelpFormatter` that states each default once.

    A help text that already says its default ("Step of PGD/CW (default: eps / 4).") is left as it is, rather
    than getting a second "(default: None)". When a script's ``set_defaults`` (or a config file) has changed the
    default, the help's own statement is no longer true: it is replaced by the value in force.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:  # no default to state ("(default: None)" would read as optional)
            return text
        if not _STATED_DEFAULT.search(text):
            return super()._get_help_string(action)
        if not getattr(action, "_cure_default_changed", False) or action.default is argparse.SUPPRESS:
            return text
        return _STATED_DEFAULT.sub("", text) + " (default: %(default)s)"


def read_config_file(path: str) -> Dict[str, Any]:
    """The mapping of a YAML (``.yaml``/``.yml``) or JSON file; an empty file is an empty mapping."""
    import yaml

    with open(path, encoding="utf-8") as f:
        values = json.load(f) if path.lower().endswith(".json") else yaml.safe_load(f)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"config file {path}: expected a mapping of argument names to values (name: value), "
            f"got a {type(values).__name__}"
        )
    return values


class ConfigArgumentParser(HfArgumentParser):
    """An `HfArgumentParser` that also reads a YAML/JSON file, given first or as ``--config FILE``.

    Unlike argparse, flags are never abbreviated (``--eval_pgd`` is not ``--eval_pgd_steps``): a mistyped flag
    is an error rather than another argument.
    """

    def __init__(self, dataclass_types=None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsOnceHelpFormatter)  # HfArgumentParser's would repeat defaults
        types = (
            []
            if dataclass_types is None
            else ([dataclass_types] if isinstance(dataclass_types, type) else list(dataclass_types))
        )
        for dtype in types:
            taken = [name for name in _RESERVED_NAMES if name in dtype.__dataclass_fields__]
            if taken:
                raise ValueError(
                    f"{dtype.__name__} has a field named {taken[0]!r}, which ConfigArgumentParser "
                    f"reserves for the config file; rename the field"
                )
        super().__init__(types, **kwargs)
        self.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="YAML/JSON file of argument values (or give it as the first argument); flags override it.",
        )

    def set_defaults(self, **kwargs) -> None:
        """argparse's ``set_defaults``; an argument that gets a default is no longer required, and its help shows
        the new default."""
        for action in self._actions:
            if action.dest in kwargs and kwargs[action.dest] != action.default:
                action._cure_default_changed = True  # noqa: SLF001 (read by DefaultsOnceHelpFormatter)
        super().set_defaults(**kwargs)
        for action in self._actions:
            if action.dest in kwargs:
                action.required = False

    def parse_args_and_config(self, args: Optional[Sequence[str]] = None) -> Tuple[Any, ...]:
        """The dataclasses (and a namespace of any plain arguments), from a config file and the flags after it.

        ``args`` defaults to ``sys.argv[1:]``. A first argument ending in .yaml/.yml/.json, or ``--config FILE``
        anywhere, names the file.
        """
        args = list(sys.argv[1:] if args is None else args)
        path, args = self._take_config_path(args)
        if path is not None:
            values = read_config_file(path)
            self._set_environment(values.pop("env", None), path)
            self._set_defaults_from_file(values, path)
        return self.parse_args_into_dataclasses(args=args)

    @staticmethod
    def _take_config_path(args: List[str]) -> Tuple[Optional[str], List[str]]:
        paths, rest = [], []
        if args and not args[0].startswith("-") and args[0].lower().endswith(CONFIG_SUFFIXES):
            paths.append(args.pop(0))
        tokens = iter(args)
        for token in tokens:
            if token == "--config":
                value = next(tokens, None)
                if value is None:
                    raise ValueError("--config needs a file: --config CONFIG.yaml")
                paths.append(value)
            elif token.startswith("--config="):
                paths.append(token.split("=", 1)[1])
            else:
                rest.append(token)
        if len(paths) > 1:
            raise ValueError(
                f"several config files {paths}: give one (first, or with --config) and put other "
                "values on the command line, where they override the file"
            )
        return (paths[0] if paths else None), rest

    @staticmethod
    def _set_environment(env: Any, path: str) -> None:
        """The file's ``env:`` mapping, as TRL's parser applies it (the file's value replaces the shell's)."""
        if env is None:
            return
        if not isinstance(env, dict):
            raise ValueError(f"config file {path}: 'env' must map variable names to values, got {env!r}")
        for name, value in env.items():
            os.environ[str(name)] = str(value)

    def _set_defaults_from_file(self, values: Dict[str, Any], path: str) -> None:
        known = sorted(
            {
                action.dest
                for action in self._actions
                if action.dest not in (argparse.SUPPRESS, "help", "config")
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
            }
        )
        unknown = [key for key in values if key not in known]
        if unknown:
            described = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=3)
                described.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ValueError(
                f"config file {path}: unknown key{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(described)}; fix the spelling or remove "
                f"{'them' if len(unknown) > 1 else 'it'} (--help lists every argument)"
            )
        self.set_defaults(**values)


@dataclass
class ModelArguments:
    """The model: trained by the recipes, attacked by ``cure-hf evaluate``."""

    model_name_or_path: str = field(
        metadata={
            "help": "timm name (untrained unless --pretrained), 'hf-hub:<id>', 'local-dir:<dir>', a Hub id, or a "
            "folder saved by cure_hf (its weights are loaded)."
        }
    )
    pretrained: bool = field(
        default=False,
        metadata={
            "help": "Load pretrained weights of a timm name (needs the Hub); a folder (e.g. a stage-0 output_dir), "
            "'local-dir:' or 'hf-hub:' source always loads its weights."
        },
    )
    image_size: Optional[int] = field(
        default=None,
        metadata={"help": "Input resolution; ViTs are adapted to it (default: the model's, 32 for a timm name)."},
    )
    patch_size: Optional[int] = field(
        default=None, metadata={"help": "ViT patch size of a timm name built here (default: the model's)."}
    )
    cpu_threads: int = field(
        default=0,
        metadata={
            "help": "Torch threads when running on CPU: 0 = every core this process may use (divided by the processes "
            "on this node; OMP_NUM_THREADS when set by hand, except a launcher's default 1), N pins N."
        },
    )


@dataclass
class DatasetArguments:
    """Which images and labels: shared by training and evaluation."""

    dataset_name: str = field(
        default="digits",
        metadata={
            "help": "'digits' (embedded, no network), a Hub dataset id or a local dataset folder (datasets."
            "load_dataset), or 'imagefolder' with --train_dir / --test_dir."
        },
    )
    dataset_config_name: Optional[str] = field(
        default=None,
        metadata={"help": "Dataset configuration (the 'name' of datasets.load_dataset), e.g. cropped_digits for SVHN."},
    )
    train_dir: Optional[str] = field(default=None, metadata={"help": "imagefolder: training images."})
    test_dir: Optional[str] = field(default=None, metadata={"help": "imagefolder: test images."})
    test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (auto: image/img)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (auto: label/labels)."})


@dataclass
class DataTrainingArguments(DatasetArguments):
    """The data of a training run: the dataset, plus the training split, augmentation and truncation."""

    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    test_split: Optional[str] = field(
        default=None,
        metadata={
            "help": "Split to evaluate on; unset: 'test', or, for a dataset without one, a fixed 10%% carved from the "
            "training split (said in the log). A named split that does not exist is refused."
        },
    )
    augment: str = field(
        default="none",
        metadata={
            "help": "'none', 'crop_flip' (4-pixel pad crop + horizontal flip, the paper's), 'crop' (no flip: digits), "
            "or 'timm' (ImageNet: timm's training transform, with the options below)."
        },
    )
    # augment='timm' only (refused otherwise); unset: timm.data.create_transform's defaults (cure_hf.augmentation)
    crop_scale: Optional[str] = field(
        default=None,
        metadata={"help": "augment='timm': random-resized crop's area range min,max (default: 0.08,1.0)."},
    )
    crop_ratio: Optional[str] = field(
        default=None,
        metadata={"help": "augment='timm': random-resized crop's aspect-ratio range min,max (default: 0.75,1.3333)."},
    )
    hflip: Optional[float] = field(
        default=None, metadata={"help": "augment='timm': horizontal-flip probability (default: 0.5)."}
    )
    color_jitter: Optional[str] = field(
        default=None,
        metadata={
            "help": "augment='timm': colour-jitter factor, or brightness,contrast,saturation[,hue] (default: 0.4; "
            "off under an auto_augment policy, as in timm)."
        },
    )
    auto_augment: Optional[str] = field(
        default=None,
        metadata={"help": "augment='timm': timm policy, e.g. 'rand-m9-mstd0.5-inc1' (RandAugment) (default: none)."},
    )
    random_erasing: Optional[float] = field(
        default=None, metadata={"help": "augment='timm': probability of random erasing (default: 0)."}
    )
    random_erasing_mode: Optional[str] = field(
        default=None,
        metadata={
            "help": "augment='timm': erased boxes' fill, 'const' (mean colour), 'rand' (a colour per box) or 'pixel' "
            "(noise per pixel), in the model's normalised space as timm, clipped to [0, 1] (default: const)."
        },
    )
    random_erasing_count: Optional[int] = field(
        default=None, metadata={"help": "augment='timm': most boxes erased per image (default: 1)."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the test set."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Train on a stream: the training split read as training goes (a datasets IterableDataset of "
            "parquet shards or the Hub, decoded in the loader workers, no full pass at start-up); needs max_steps. "
            "The test split's first max_eval_samples examples are held in memory (cure_hf.streaming)."
        },
    )
    stream_shards: Optional[int] = field(
        default=None,
        metadata={
            "help": "--streaming: load the dataset memory-mapped (arrow, converted once) and stream it as this many "
            "shards (at least one per loader worker), instead of reading the source as a stream."
        },
    )
    shuffle_buffer: int = field(
        default=10000, metadata={"help": "--streaming: examples in the shuffle buffer (IterableDataset.shuffle)."}
    )
    dataset_id: Optional[str] = field(
        default=None,
        metadata={
            "help": "The Hub id the model card names for a local copy (e.g. ILSVRC/imagenet-1k for its parquet)."
        },
    )

    def __post_init__(self):
        from .augmentation import resolve_augment_options

        resolve_augment_options(self.augment, self.augment_options())  # refuse bad or unused options at parse time
        if not self.streaming:
            for name, default in (("stream_shards", None), ("shuffle_buffer", 10000)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is invalid without --streaming: only a streamed training "
                        f"set reads it. Fix: add --streaming, or drop --{name}"
                    )
        elif self.max_train_samples is not None:
            raise ValueError(
                f"max_train_samples={self.max_train_samples} is invalid with --streaming: a stream is not truncated "
                "by count; max_steps sets how much of it a run reads. Fix: drop --max_train_samples"
            )
        if self.stream_shards is not None and self.stream_shards < 1:
            raise ValueError(f"stream_shards={self.stream_shards} is invalid: an integer >= 1")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} is invalid: an integer >= 1 (1: no shuffling)")

    def augment_options(self) -> Dict[str, Any]:
        """The augmentation options that were set (unset ones are left to their defaults)."""
        from .augmentation import AUGMENT_OPTIONS

        return {name: getattr(self, name) for name in AUGMENT_OPTIONS if getattr(self, name) is not None}
