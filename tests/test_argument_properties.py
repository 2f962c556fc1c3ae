"""Every argument is type-checked at construction: property-based tests over all fields.

Every field of `CURETrainingArguments` and `RobustEvaluationArguments` (enumerated with `dataclasses.fields`, so a
new field is covered as soon as it exists) gets values of a type its annotation does not allow, and every numeric
field of cure_hf's own gets values out of its range: each must fail at construction with a ValueError or TypeError
whose message names the field. None may pass silently.

The wrong values are derived here from the annotations, independently of `cure_hf.argument_types`; only the fields
documented to take more than their annotation says are listed (DOCUMENTED_EXTRA_KINDS).
"""

import dataclasses
import enum
import glob
import math
import os
import re
import tempfile
import types
import typing

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TrainingArguments

from cure_hf import CURETrainingArguments
from cure_hf.config import RobustEvaluationArguments

OUTPUT_DIR = os.path.join(tempfile.gettempdir(), "cure_hf_test_argument_properties")
BASE = dict(output_dir=OUTPUT_DIR, report_to=[], use_cpu=True)
RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
# Few examples per field: a refused value costs microseconds (refused before TrainingArguments' __post_init__).
PROPERTY = settings(max_examples=20, deadline=None, database=None)

# The allow-list: fields documented to take more than their annotation says; the wrong-type strategies skip these
# kinds (the values of these kinds are range-checked below instead, where the field is cure_hf's own).
DOCUMENTED_EXTRA_KINDS = {
    # cure_hf pixel sizes: annotated `str` (for "8/255" on the command line), documented "`str` or `float`".
    "epsilon": {"int", "float"},
    "attack_step_size": {"int", "float"},
    "eval_epsilon": {"int", "float"},
    "eval_step_size": {"int", "float"},
    # cure_hf switch-or-number fields: annotated `Optional[str]`, documented "`bool`, `float` or `str`".
    "weight_averaging": {"bool", "int", "float"},
    "awp_gamma": {"bool", "int", "float"},
    # cure_hf: one milestone as a bare number (YAML `lr_step_epochs: 100`), read as str(value) by lr_step_milestones.
    "lr_step_epochs": {"int", "float"},
    # cure_hf: annotated `Optional[str]` ("name=value,..."); AdversarialMethod.resolve_options also reads a mapping.
    "method_options": {"dict"},
    # TrainingArguments: annotated `str | None`, documented `bool`; it also reads a list of FSDP options, and its
    # __post_init__ sets True (so a copy of the arguments, dataclasses.replace, holds a bool).
    "fsdp": {"bool", "list[str]"},
    # TrainingArguments: annotated `str | list[DebugOption]`, but its __post_init__ reads None as [].
    "debug": {"none"},
}

# Bounds of cure_hf's own numeric fields: (low, high, low_included, high_included, integer). Every numeric field of
# cure_hf's own must be here (test_every_own_numeric_field_has_a_range), so a new one gets out-of-range tests too.
INF = math.inf
MAX_EPS = 64 / 255
SEED_MAX = 2**32 - 1
RANGES = {
    "eval_pgd_steps": (1, INF, True, False, True),
    "eval_restarts": (1, INF, True, False, True),
    "eval_max_examples": (1, INF, True, False, True),
    "eval_attack_batch_size": (1, INF, True, False, True),
    "eval_seed": (0, SEED_MAX, True, True, True),
    "revision_seed": (0, SEED_MAX, True, True, True),
    "attack_steps": (1, INF, True, False, True),
    "epsilon": (0, MAX_EPS, False, True, False),  # > 0 for the (default) adversarial method
    "attack_step_size": (0, MAX_EPS, False, True, False),
    "eval_epsilon": (0, MAX_EPS, True, True, False),  # L-inf (the default eval_norm)
    "eval_step_size": (0, 1, False, True, False),
    "trades_beta": (0, INF, True, False, False),
    "conserve_fraction": (0, 1, True, False, False),
    "clean_weight": (0, 1, True, True, False),
    "consistency_weight": (0, INF, True, False, False),
    "revision_rate": (0, 1, True, True, False),
    "revision_decay": (0, 1, True, False, False),
    "validation_fraction": (0, 1, True, False, False),
    "natural_warmup_epochs": (0, INF, True, False, False),
    "lr_step_epochs": (0, INF, False, False, False),
    "lr_step_factor": (0, 1, False, True, False),
    "sgd_momentum": (0, 1, True, False, False),
    "weight_averaging": (0, 1, False, False, False),  # a decay; True/False switch it (not numbers here)
    "awp_gamma": (0, 1, True, False, False),  # 0 = off
    "awp_warmup_epochs": (0, INF, True, False, False),
    "attack_warmup_epochs": (0, INF, True, False, False),
    "mixup_alpha": (0, INF, True, False, False),
    "cutmix_alpha": (0, INF, True, False, False),
    "mixup_prob": (0, 1, True, True, False),
    "mixup_switch_prob": (0, 1, True, True, False),
}
# What a field's range check needs around it to run (else another check refuses the value first).
CONTEXT = {"awp_warmup_epochs": {"awp_gamma": True}}
TEXT_NUMBER_FIELDS = {
    "epsilon",
    "attack_step_size",
    "eval_epsilon",
    "eval_step_size",
    "weight_averaging",
    "awp_gamma",
    "lr_step_epochs",
}  # documented to take numbers written as text too

TRAINING_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
CURE_FIELDS = [f.name for f in dataclasses.fields(CURETrainingArguments) if f.init]
EVAL_FIELDS = [f.name for f in dataclasses.fields(RobustEvaluationArguments) if f.init]
CURE_HINTS = typing.get_type_hints(CURETrainingArguments)
EVAL_HINTS = typing.get_type_hints(RobustEvaluationArguments)


# ------------------------------------------------------------------------------------------ kinds of annotations
def kinds(tp) -> set:
    """The kinds of value an annotation admits: none, bool, int, float, str, false, list[str], list[int], list,
    dict, other."""
    if tp is typing.Any:
        return {"any"}
    if tp is type(None) or tp is None:
        return {"none"}
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is getattr(types, "UnionType", typing.Union):
        return set().union(*(kinds(a) for a in typing.get_args(tp)))
    if origin is typing.Literal:
        return {"false" if a is False else "literal" for a in typing.get_args(tp)}
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        if item is str or (isinstance(item, type) and issubclass(item, enum.Enum)):
            return {"list[str]"}
        return {"list[int]"} if item is int else {"list"}
    if origin is dict or tp is dict:
        return {"dict"}
    if tp is float:
        return {"float", "int"}
    if tp in (int, bool, str):
        return {tp.__name__}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"str"}  # the text of its values (a wrong text is a wrong value, not a wrong type)
    return {"other"}


def accepted_kinds(name: str, hints: dict) -> set:
    return kinds(hints[name]) | DOCUMENTED_EXTRA_KINDS.get(name, set())


SCALARS = st.one_of(st.integers(-(10**6), 10**6), st.floats(allow_nan=False), st.text(max_size=5), st.booleans())


def wrong_values(accepted: set):
    """Values of every kind `accepted` leaves out (None when the annotation admits everything)."""
    if "any" in accepted:
        return None
    options = []
    if "none" not in accepted:
        options.append(st.none())
    if "bool" not in accepted:
        options.append(st.just(True) if "false" in accepted else st.booleans())
    if "int" not in accepted:
        options.append(st.integers(-(10**12), 10**12))
    if "float" not in accepted:
        # an int field refuses every float, 3.0 included; a bool or str field too
        options.append(st.floats(allow_nan=True, allow_infinity=True))
    if "str" not in accepted:
        options.append(
            st.one_of(
                st.text(max_size=8),
                st.sampled_from(["0.3", "3", "8/255", "1e-3", "true", "false", "none", "[1]"]),
                st.integers(-1000, 1000).map(str),
                st.floats(allow_nan=False).map(repr),
            )
        )
    if not accepted & {"list", "list[str]", "list[int]"}:
        options.append(st.lists(SCALARS, max_size=3))
    elif "list" not in accepted:
        # a list with at least one item of a wrong type
        bad_item = (
            st.one_of(st.integers(), st.floats(), st.booleans(), st.none())
            if "list[str]" in accepted
            else st.one_of(st.text(max_size=3), st.floats(), st.booleans(), st.none())
        )
        options.append(st.tuples(st.lists(SCALARS, max_size=2), bad_item).map(lambda t: [*t[0], t[1]]))
    if "dict" not in accepted:
        options.append(st.dictionaries(st.text(max_size=3), SCALARS, max_size=2))
    return st.one_of(options)


def names_the_field(message: str, name: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) is not None


def assert_refused(build, name: str, value) -> None:
    try:
        build()
    except (TypeError, ValueError) as error:
        assert names_the_field(str(error), name), f"{name}={value!r}: the error does not name the field: {error}"
    else:
        pytest.fail(f"{name}={value!r} ({type(value).__name__}) was accepted silently")


# ------------------------------------------------------------------------------------------ wrong types
@pytest.mark.parametrize("name", CURE_FIELDS)
@PROPERTY
@given(data=st.data())
def test_every_training_argument_refuses_a_wrong_type(name, data):
    strategy = wrong_values(accepted_kinds(name, CURE_HINTS))
    if strategy is None:
        pytest.skip(f"{name} is annotated Any")
    value = data.draw(strategy, label=name)
    assert_refused(lambda: CURETrainingArguments(**{**BASE, name: value}), name, value)


@pytest.mark.parametrize("name", EVAL_FIELDS)
@PROPERTY
@given(data=st.data())
def test_every_evaluation_argument_refuses_a_wrong_type(name, data):
    # RobustEvaluationArguments alone is what `cure-hf evaluate` builds.
    value = data.draw(wrong_values(accepted_kinds(name, EVAL_HINTS)), label=name)
    assert_refused(lambda: RobustEvaluationArguments(**{name: value}), name, value)


# ------------------------------------------------------------------------------------------ out of range
def out_of_range(name: str):
    low, high, low_in, high_in, integer = RANGES[name]
    if integer:
        options = [st.integers(low - 10**9, low - 1)]
        if high != INF:
            options.append(st.integers(high + 1, high + 2**70))
        return st.one_of(options)
    # (the filters drop -0.0, which hypothesis counts as below 0.0 but every check reads as 0)
    below = st.floats(-1e12, low, exclude_max=low_in).filter(lambda x: x < low if low_in else x <= low)
    options = [below, st.sampled_from([math.nan, -math.inf, math.inf])]
    if high != INF:
        options.append(st.floats(high, 1e12, exclude_min=high_in).filter(lambda x: x > high if high_in else True))
    numbers = st.one_of(options)
    if name in TEXT_NUMBER_FIELDS:
        return st.one_of(numbers, numbers.filter(math.isfinite).map(repr))  # "-0.5", "2.0"
    return numbers


def own_numeric_fields():
    fields = [n for n in CURE_FIELDS if n not in TRAINING_FIELDS]
    return [n for n in fields if accepted_kinds(n, CURE_HINTS) & {"int", "float"}]


def test_every_own_numeric_field_has_a_range():
    missing = sorted(set(own_numeric_fields()) - set(RANGES))
    assert not missing, f"add the bounds of {missing} to RANGES (and their checks to config.py's _validate_*)"
    assert set(RANGES) <= set(own_numeric_fields())


@pytest.mark.parametrize("name", sorted(RANGES))
@PROPERTY
@given(data=st.data())
def test_every_own_numeric_field_refuses_out_of_range_values(name, data):
    value = data.draw(out_of_range(name), label=name)
    assert_refused(lambda: CURETrainingArguments(**{**BASE, **CONTEXT.get(name, {}), name: value}), name, value)
    if name in EVAL_FIELDS:
        assert_refused(lambda: RobustEvaluationArguments(**{name: value}), name, value)


@pytest.mark.parametrize(
    "name",
    [n for n in CURE_FIELDS if "float" in kinds(CURE_HINTS[n]) or DOCUMENTED_EXTRA_KINDS.get(n, set()) & {"float"}],
)
def test_nan_is_refused_in_every_number_field(name):
    # NaN compares false with every bound, so it would pass `low <= value <= high` checks written as `not (...)`.
    assert_refused(lambda: CURETrainingArguments(**{**BASE, name: math.nan}), name, math.nan)


def test_the_allow_list_is_what_the_docstrings_say():
    """Each cure_hf field documented with more types than its annotation is in DOCUMENTED_EXTRA_KINDS, and back."""
    documented = {}
    for cls in (CURETrainingArguments, RobustEvaluationArguments):
        for name, spec in re.findall(r"^\s+(\w+) \((`[^)]*?`(?: or |, )`[^)]*?)\)", cls.__doc__, re.M):
            documented[name] = spec
    wider = {n for n, spec in documented.items() if "`float`" in spec and "`str`" in spec}
    assert wider == {"epsilon", "attack_step_size", "eval_epsilon", "eval_step_size", "weight_averaging", "awp_gamma"}
    assert wider <= set(DOCUMENTED_EXTRA_KINDS)


# ------------------------------------------------------------------------------------------ the reported cases
def test_conserve_fraction_as_text_names_the_field_and_the_fix():
    with pytest.raises(TypeError) as error:
        CURETrainingArguments(**BASE, conserve_fraction="0.3")
    message = str(error.value)
    assert message.startswith(
        "conserve_fraction='0.3' is a str; expected a number (float), e.g. conserve_fraction=0.3"
    ), message
    assert "quotes" in message
    assert isinstance(error.value, ValueError)  # also a ValueError, as every other invalid argument


def test_fractional_attack_steps_names_the_field():
    with pytest.raises(TypeError, match=r"^attack_steps=2\.5 is a float; expected an integer \(int\)"):
        CURETrainingArguments(**BASE, attack_steps=2.5)
    with pytest.raises(TypeError, match=r"attack_steps=3\.0 is a float.*e\.g\. attack_steps=3 "):
        CURETrainingArguments(**BASE, attack_steps=3.0)  # integral floats too: nothing is rounded silently


def test_pyyaml_exponent_without_a_dot_is_explained():
    values = yaml.safe_load("learning_rate: 1e-3\n")
    assert values == {"learning_rate": "1e-3"}  # PyYAML (YAML 1.1) reads it as text
    with pytest.raises(TypeError, match=r"learning_rate='1e-3' is a str.*PyYAML reads 1e-3 as text.*write 1\.0e-3"):
        CURETrainingArguments(**BASE, **values)


def test_a_yaml_config_with_correct_types_constructs():
    values = yaml.safe_load("""
        adv_method: cure
        epsilon: 8/255
        attack_step_size: 2/255
        attack_steps: 10
        attack_random_start: true
        conserve_fraction: 0.3
        clean_weight: 0.1
        revision_rate: 0.2
        revision_seed: 7
        learning_rate: 0.1
        weight_decay: 5.0e-4
        num_train_epochs: 2
        per_device_train_batch_size: 128
        warmup_steps: 0.1
        eval_strategy: epoch
        save_strategy: "no"
        lr_scheduler_type: cosine
        lr_scheduler_kwargs: {}
        lr_step_epochs: "1,2"
        head_modules: [fc]
        weight_averaging: true
        awp_gamma: 5.0e-3
        eval_epsilon: 8/255
        eval_pgd_steps: 20
        eval_max_examples: null
        eval_seed: 0
        seed: 1
        report_to: none
    """)
    args = CURETrainingArguments(output_dir=OUTPUT_DIR, use_cpu=True, **values)
    assert args.epsilon == pytest.approx(8 / 255) and args.attack_steps == 10 and args.head_modules == ["fc"]
    assert args.weight_averaging_decay == 0.999 and args.resolved_awp_gamma == 5e-3
    json_args = CURETrainingArguments(
        output_dir=OUTPUT_DIR,
        use_cpu=True,
        epsilon=0.0314,
        eval_epsilon=0,
        weight_averaging=0.998,
        lr_step_epochs=100,
        conserve_fraction=0,
    )
    assert json_args.lr_step_milestones == [100.0] and json_args.weight_averaging_decay == 0.998
    assert dataclasses.replace(args, output_dir=OUTPUT_DIR + "_copy").attack_steps == 10  # converted values pass


CONFIGS = sorted(glob.glob(os.path.join(RECIPES, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.relpath(c, RECIPES))
def test_every_recipe_config_constructs_as_written(config, tmp_path):
    # As a hand-written file reaches the dataclass without the command line's conversions: the values as YAML reads them.
    with open(config, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    fields = set(CURE_FIELDS)
    kwargs = {k: v for k, v in values.items() if k in fields}
    # use_cpu: the ImageNet configs set bf16, which TrainingArguments refuses on a machine without a GPU
    CURETrainingArguments(**{**kwargs, "output_dir": str(tmp_path), "use_cpu": True})
