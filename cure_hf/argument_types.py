"""Type checks of argument dataclasses: every field against its annotation, before any other check runs.

A value from Python, a YAML file or a JSON file reaches the dataclass as it was written: ``conserve_fraction: "0.3"``
(quoted) is text, ``attack_steps: 2.5`` is a float. :func:`check_field_types` refuses such values up front, naming
the field, the value and its type, what is expected and how to write it, instead of a raw ``TypeError: '<='
not supported`` later or a silently wrong run.

The rules, per annotation (``Optional``/``Union``/``X | None``, ``list[X]``, ``dict``, ``Literal`` and enums are
taken apart):

* ``int``: a Python ``int``; never a bool, never a float -- not even an integral one such as ``3.0`` (write ``3``:
  a count, a seed or a step is a whole number, and nothing is rounded silently), never text, never a numpy integer
  (the arguments are saved as JSON: pass ``int(x)``).
* ``float``: a Python ``int`` or ``float``; never a bool, never text, never a numpy number; and never NaN, which
  compares false with every bound and so would pass any range check (that one is a ``ValueError``).
* ``bool``: ``True`` or ``False`` only (``HfArgumentParser`` and YAML both give real bools); not ``0``/``1``, not
  ``"false"``.
* ``str``: text only (``os.PathLike`` too for the path fields, :data:`PATH_FIELDS`).
* an enum (e.g. ``IntervalStrategy``): a member, or the text of one of its values.
* ``list[X]``: a list or tuple of X; ``dict[...]``: a dict; ``Literal[...]``: one of the values; another class: an
  instance. Anything else (an annotation this module does not know): accepted.

Where a field is documented to take more than its annotation says, :data:`DOCUMENTED_TYPES` gives what it takes:
cure_hf's pixel sizes (``epsilon="8/255"`` or ``0.0314``), its switch-or-number fields (``weight_averaging``,
``awp_gamma``) and a few of ``TrainingArguments``' own (``fsdp``, ``accelerator_config``, ``debug``).

The errors are :class:`ArgumentTypeError`: a ``TypeError``, and also a ``ValueError``, so code that catches the
``ValueError`` of an invalid argument (the command line, scripts) goes on catching it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import math
import numbers
import os
import re
import types
import typing
from typing import Any, Dict, List, Literal, Optional, Union

from transformers.debug_utils import DebugOption
from transformers.training_args import OptimizerNames

__all__ = ["ArgumentTypeError", "check_field_types", "field_types", "DOCUMENTED_TYPES", "PATH_FIELDS"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (also a ``ValueError``, as every other invalid argument)."""


class _AcceleratorConfig:
    """Stands for ``transformers.trainer_pt_utils.AcceleratorConfig`` in :data:`DOCUMENTED_TYPES` (imported lazily)."""


# Fields that take more than their annotation says, as their documentation does.
DOCUMENTED_TYPES: Dict[str, Any] = {
    # cure_hf (config.py): pixel sizes are "8/255", "0.0314" or a number, annotated `str` for the command line.
    "epsilon": Union[str, float],
    "attack_step_size": Union[str, float],
    "eval_epsilon": Optional[Union[str, float]],
    "eval_step_size": Optional[Union[str, float]],
    # cure_hf: a switch or a number, `bool`, `float` or `str` ("true", "0.998").
    "weight_averaging": Optional[Union[bool, float, str]],
    "awp_gamma": Optional[Union[bool, float, str]],
    # cure_hf: one milestone may be a bare number (YAML `lr_step_epochs: 100`); lr_step_milestones reads str(value).
    "lr_step_epochs": Optional[Union[str, float]],
    # cure_hf: "name=value,..." or a mapping (AdversarialMethod.resolve_options reads both, e.g. a YAML mapping).
    "method_options": Optional[Union[str, dict]],
    # TrainingArguments: documented `bool`, annotated `str | None`; it reads the legacy str / list of options and
    # __post_init__ sets it to True (so a copy of the arguments, dataclasses.replace, holds a bool).
    "fsdp": Optional[Union[bool, str, List[str]]],
    # TrainingArguments: "`str`, `dict`, or `AcceleratorConfig`" (a JSON text or file path, a dict, an instance);
    # __post_init__ turns it into an AcceleratorConfig.
    "accelerator_config": Optional[Union[dict, str, _AcceleratorConfig]],
    # TrainingArguments: `str | list[DebugOption]`, and its __post_init__ reads None as [].
    "debug": Optional[Union[str, List[DebugOption]]],
    # TrainingArguments: `OptimizerNames | str` (its __post_init__ converts the text), re-annotated `str` by
    # CURETrainingArguments to change the default.
    "optim": Union[OptimizerNames, str],
}

# `str` fields that name a file or folder: an os.PathLike (pathlib.Path) is accepted too.
PATH_FIELDS = frozenset(
    {"output_dir", "logging_dir", "resume_from_checkpoint", "deepspeed", "fsdp_config", "accelerator_config"}
)

_UNION_TYPES = (Union,) + ((types.UnionType,) if hasattr(types, "UnionType") else ())
_NONE = type(None)
_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


@functools.cache
def field_types(cls: type) -> Dict[str, Any]:
    """Each init field of the dataclass ``cls`` -> the type its values are checked against (annotation, or the
    :data:`DOCUMENTED_TYPES` entry). An annotation that cannot be resolved gives ``Any`` (accepted)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation naming something not importable here: resolve class by class
        hints = {}
        for klass in reversed(cls.__mro__):
            for name, annotation in vars(klass).get("__annotations__", {}).items():
                hints[name] = Any if isinstance(annotation, str) else annotation
            try:
                hints.update(typing.get_type_hints(klass))
            except Exception:  # a forward reference that cannot be resolved: the raw annotations above stand
                pass
    return {f.name: DOCUMENTED_TYPES.get(f.name, hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}


def check_field_types(args: Any, cls: Optional[type] = None) -> None:
    """Refuse every field of the dataclass instance ``args`` whose value does not fit its type (module docstring).

    ``cls``: the dataclass whose fields are checked (default: ``type(args)``). Raises :class:`ArgumentTypeError`
    (a ``TypeError`` and a ``ValueError``) naming the field, or ``ValueError`` for a NaN in a number field.
    """
    cls = type(args) if cls is None else cls
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, expected in field_types(cls).items():
        value = getattr(args, name)
        if not _matches(value, expected, name):
            enums = _enums(expected)
            if enums and isinstance(value, str):
                allowed = " or ".join(_enum_values(e, most=100) for e in enums)
                raise ArgumentTypeError(f"{name}={value!r} is invalid: allowed {allowed}.")
            raise ArgumentTypeError(_type_message(name, value, expected, defaults.get(name, dataclasses.MISSING)))
        if isinstance(value, float) and math.isnan(value) and _admits(expected, float):
            raise ValueError(
                f"{name}={value!r} is invalid: allowed a number, not NaN. NaN compares false with every "
                f"bound, so it would pass every range check; set {name} to a number."
            )


# ------------------------------------------------------------------------------------------ matching
def _matches(value: Any, tp: Any, name: str) -> bool:
    if tp is Any or tp is object:
        return True
    if tp is None or tp is _NONE:
        return value is None
    origin = typing.get_origin(tp)
    if origin in _UNION_TYPES:
        enums = _enums(tp)
        if enums and isinstance(value, str) and not isinstance(value, enum.Enum):
            # `IntervalStrategy | str`: TrainingArguments converts the text to the enum, refusing any other text
            return any(_matches(value, e, name) for e in enums)
        return any(_matches(value, arg, name) for arg in typing.get_args(tp))
    if origin is Literal:
        return any(value is a or (type(value) is type(a) and value == a) for a in typing.get_args(tp))
    if origin in _SEQUENCES:
        items = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        return isinstance(value, (list, tuple)) and all(any(_matches(v, a, name) for a in items) for v in value)
    if origin in _MAPPINGS:
        return isinstance(value, dict)
    if origin is not None:  # another generic (Callable, ...): not checked
        return True
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str) or (name in PATH_FIELDS and isinstance(value, os.PathLike))
    if tp is _AcceleratorConfig:
        try:
            from transformers.trainer_pt_utils import AcceleratorConfig
        except ImportError:
            return False
        return isinstance(value, AcceleratorConfig)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or (isinstance(value, str) and value in {m.value for m in tp})
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a TypeVar, a forward reference, ...: not checked


def _alternatives(tp: Any) -> List[Any]:
    """The members of a union (``Optional[X]`` -> [X, NoneType]); [tp] otherwise."""
    if typing.get_origin(tp) in _UNION_TYPES:
        return [a for arg in typing.get_args(tp) for a in _alternatives(arg)]
    return [tp]


def _enums(tp: Any) -> List[type]:
    return [a for a in _alternatives(tp) if isinstance(a, type) and issubclass(a, enum.Enum)]


def _admits(tp: Any, kind: type) -> bool:
    return any(a is kind for a in _alternatives(tp))


# ------------------------------------------------------------------------------------------ messages
def _kind(value: Any) -> str:
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _describe(tp: Any) -> str:
    if tp is None or tp is _NONE:
        return "None"
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin in _UNION_TYPES:
        parts, enums = [], _enums(tp)
        for a in _alternatives(tp):
            if a is str and enums:  # the text of an enum value
                continue
            text = _describe(a)
            if text not in parts:
                parts.append(text)
        parts.sort(key=lambda p: p == "None")  # None last
        return " or ".join(parts)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in _SEQUENCES:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not args or args[0] is Any:
            return "a list"
        item = args[0]
        if item is str:
            return "a list of text (list[str])"
        return f"a list of {_describe(item)}"
    if origin in _MAPPINGS or tp is dict:
        return "a mapping (dict)"
    if tp is bool:
        return "True or False (bool)"
    if tp is int:
        return "an integer (int)"
    if tp is float:
        return "a number (float)"
    if tp is str:
        return "text (str)"
    if tp is _AcceleratorConfig:
        return "an AcceleratorConfig"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_values(tp)
    return f"a {getattr(tp, '__name__', str(tp))}"


def _enum_values(tp: type, most: int = 12) -> str:
    values = [repr(m.value) for m in tp]
    if len(values) > most:
        return f"one of {', '.join(values[: most - 2])}, ... (the {len(values)} values of {tp.__name__})"
    return f"one of {', '.join(values)} ({tp.__name__})"


def _parse_number(text: str) -> Optional[Union[int, float, str]]:
    """'3' -> 3, '0.3' -> 0.3, '8/255' -> '8/255' (Python reads it as the number), else None."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
        return number if math.isfinite(number) else None
    except ValueError:
        pass
    if re.fullmatch(r"\d+(\.\d*)?\s*/\s*\d+(\.\d*)?", text) and float(re.split(r"\s*/\s*", text)[1]) != 0:
        return text.replace(" ", "")
    return None


def _example(value: Any, tp: Any, default: Any) -> Optional[str]:
    """How the value is written in the expected type (as Python source), or None when there is no good one."""
    kinds = _alternatives(tp)
    wants_int, wants_float, wants_bool, wants_str = (int in kinds), (float in kinds), (bool in kinds), (str in kinds)
    usable_default = default not in (dataclasses.MISSING, None, "") and _matches(default, tp, "")
    if (
        isinstance(value, (list, tuple))
        and len(value) == 1
        and not any(typing.get_origin(k) in _SEQUENCES for k in kinds)
    ):
        return _example(value[0], tp, default)  # [0.3] for 0.3
    if isinstance(value, str):
        number = _parse_number(value)
        if isinstance(number, int) and (wants_int or wants_float):
            return repr(number)
        if isinstance(number, float) and wants_float:
            return repr(number)
        if isinstance(number, float) and wants_int and number.is_integer():
            return repr(int(number))
        if isinstance(number, str) and wants_float:
            return number  # 8/255
        if wants_bool and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return repr(value.strip().lower() in ("true", "yes", "on", "1"))
        if any(typing.get_origin(k) in _SEQUENCES for k in kinds):
            return repr([value])
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if wants_float or (wants_int and float(value).is_integer()):
            return repr(int(value) if not wants_float else float(value) if type(value).__module__ == "numpy" else value)
        if wants_bool and value in (0, 1):
            return repr(bool(value))
        if wants_str and not (usable_default and isinstance(default, str)):
            return repr(str(value))
    elif isinstance(value, bool) and wants_str:
        words = ("yes", "true", "on") if value else ("no", "false", "off")  # what YAML read as the bool
        for e in _enums(tp):
            named = [w for w in words if w in {m.value for m in e}]
            if named:
                return repr(named[0])  # save_strategy: no -> 'no'
        if not (usable_default and isinstance(default, str)):
            return repr(str(value).lower())
    return repr(default) if usable_default else None


def _hint(value: Any, tp: Any) -> Optional[str]:
    kinds = _alternatives(tp)
    numeric = int in kinds or float in kinds
    if value is None:
        return "leave the argument out for its default"
    if isinstance(value, str) and (numeric or bool in kinds):
        reads = _parse_number(value) is not None if numeric else False
        reads = reads or (bool in kinds and value.strip().lower() in ("true", "false", "yes", "no", "on", "off"))
        if not reads:
            return None
        if _yaml_reads_as_text(value):
            return (
                f"PyYAML reads {value.strip()} as text, quoted or not (a YAML 1.1 float needs a decimal point and "
                f"a signed exponent): write {_yaml_float(value)}"
            )
        return "a JSON/YAML value in quotes is read as text"
    if isinstance(value, bool) and numeric:
        return "True/False is not a number here"
    if isinstance(value, numbers.Real) and type(value).__module__ == "numpy" and numeric:
        return "a numpy number: pass a Python one, int(x) or float(x) (the arguments are saved as JSON)"
    if isinstance(value, bool) and str in kinds:
        return "unquoted, YAML reads true/false, yes/no and on/off as True/False: put the value in quotes"
    if isinstance(value, float) and int in kinds and float not in kinds:
        return (
            "a whole number is written without a decimal point"
            if value.is_integer()
            else "this argument takes whole numbers only"
        )
    if isinstance(value, numbers.Number) and not isinstance(value, bool) and bool in kinds and not numeric:
        return "write True or False (in YAML/JSON: true or false, unquoted)"
    if isinstance(value, numbers.Number) and str in kinds and not numeric:
        return "in a YAML/JSON file, put the value in quotes"
    return None


def _yaml_reads_as_text(text: str) -> bool:
    """'1e-3' and '5e4' are floats to Python and JSON, but text to PyYAML (YAML 1.1)."""
    return bool(re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+\s*", text)) and not re.fullmatch(
        r"\s*[-+]?(\d+\.\d*|\.\d+)[eE][-+]\d+\s*", text
    )


def _yaml_float(text: str) -> str:
    mantissa, exponent = re.split(r"[eE]", text.strip())
    if "." not in mantissa:
        mantissa += ".0"
    if exponent[:1] not in "+-":
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}"


def _type_message(name: str, value: Any, tp: Any, default: Any) -> str:
    if value is None:
        message = f"{name}=None is not allowed; expected {_describe(tp)}"
    else:
        message = f"{name}={value!r} is {_kind(value)}; expected {_describe(tp)}"
    items = [
        a
        for k in _alternatives(tp)
        if typing.get_origin(k) in _SEQUENCES
        for a in (typing.get_args(k) or (Any,))
        if a is not Ellipsis
    ]
    if isinstance(value, (list, tuple)) and items:
        wrong = [v for v in value if not any(_matches(v, a, name) for a in items)]
        if wrong:
            message += f" (the item {wrong[0]!r} is {_kind(wrong[0])})"
    example = _example(value, tp, default)
    if example is not None:
        message += f", e.g. {name}={example}"
    hint = _hint(value, tp)
    return message + (f" — {hint}" if hint else "")


def check_argument(condition: bool, name: str, value, allowed: str, fix: str = "") -> None:
    """A range check's error: the field, the value, what is allowed and the fix."""
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}." + (f" {fix}" if fix else ""))


def check_seed(name: str, value) -> None:
    if value is not None:
        check_argument(
            0 <= value < 2**32,
            name,
            value,
            "an integer 0 <= seed < 2**32 (as TrainingArguments' seed)",
            f"Use e.g. {name}=0.",
        )
