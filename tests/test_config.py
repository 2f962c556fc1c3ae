import json

import pytest
from transformers import HfArgumentParser

from cure_hf import CURETrainingArguments
from cure_hf.config import RobustEvaluationArguments, parse_pixel_value


def make(**kwargs):
    return CURETrainingArguments(output_dir="/tmp/cure_hf_test_config", report_to="none", **kwargs)


def test_defaults_follow_the_spec():
    args = make()
    assert args.adv_method == "cure"
    assert args.epsilon == pytest.approx(8 / 255) and args.attack_step_size == pytest.approx(2 / 255)
    assert args.attack_steps == 10
    assert (args.conserve_fraction, args.clean_weight, args.consistency_weight) == (0.3, 0.1, 1.0)
    assert (args.revision_rate, args.revision_decay) == (0.2, 0.999)
    from cure_hf.components import resolved_conservation, resolved_revision

    assert (args.prominence, resolved_conservation(args), resolved_revision(args)) == ("loss", "soft", True)
    trades = make(adv_method="trades")
    assert (resolved_conservation(trades), resolved_revision(trades)) == ("none", False)
    assert args.optim == "sgd" and args.learning_rate == 0.1 and args.weight_decay == 5e-4
    assert args.max_grad_norm == 0.0 and args.ddp_broadcast_buffers is False
    assert args.resolved_eval_step_size == pytest.approx(2 / 255)


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.5", 0.5), (0.25, 0.25), (" 4/255 ", 4 / 255)])
def test_parse_pixel_value(text, value):
    assert parse_pixel_value(text, "epsilon") == pytest.approx(value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("adv_method", "awp"),
        ("epsilon", 8),  # pixel units forgotten: must not be clamped silently
        ("epsilon", "8/0"),
        ("epsilon", "eight"),
        ("epsilon", -0.1),
        ("epsilon", 0.0),
        ("attack_step_size", 2.0),
        ("attack_steps", 0),
        ("trades_beta", -1.0),
        ("conserve_fraction", 1.0),
        ("conserve_fraction", -0.1),
        ("clean_weight", 1.5),
        ("consistency_weight", -1.0),
        ("revision_rate", 1.2),
        ("revision_decay", 1.0),
        ("revision_rate_schedule", "exponential"),
        ("prominence", "grad"),
        ("conservation", "strict"),
        ("head_modules", "head"),
        ("eval_attacks", "clean,fgsm"),
        ("eval_attacks", ""),
        ("eval_epsilon", 16),
        ("eval_step_size", 3),
        ("eval_pgd_steps", 0),
        ("eval_restarts", 0),
        ("eval_max_examples", 0),
        ("sgd_momentum", 1.0),
    ],
)
def test_every_invalid_argument_raises_naming_the_field(field, value):
    with pytest.raises(ValueError) as err:
        make(**{field: value})
    assert field in str(err.value)


def test_epsilon_error_names_the_fix():
    with pytest.raises(ValueError, match="8/255"):
        make(epsilon=8)


def test_evaluation_epsilon_in_intensity_levels_is_refused_with_the_fix():
    # RobustEvaluationArguments alone is what `cure-hf evaluate` builds: it must refuse what training refuses.
    with pytest.raises(ValueError, match=r"eval_epsilon=8\.0 is invalid.*eval_epsilon=8/255"):
        RobustEvaluationArguments(eval_epsilon=8)
    with pytest.raises(ValueError, match=r"eval_epsilon=0\.5 is invalid.*64/255.*Write it as eval_epsilon=0\.5/255"):
        RobustEvaluationArguments(eval_epsilon=0.5)  # in [0, 1], but 127.5 intensity levels: an L-inf eps mistyped
    with pytest.raises(ValueError, match=r"eval_epsilon=0\.5 is invalid"):
        make(eval_epsilon=0.5)


@pytest.mark.parametrize("value,expected", [("8/255", 8 / 255), ("64/255", 64 / 255), (0, 0.0), (None, None)])
def test_evaluation_epsilon_in_pixel_units_is_accepted(value, expected):
    assert RobustEvaluationArguments(eval_epsilon=value).eval_epsilon == pytest.approx(expected)
    assert make(eval_epsilon=value).eval_epsilon == pytest.approx(expected)


def test_l2_evaluation_radius_has_no_linf_bound():
    # An L2 radius grows with the image size (0.5 is the CIFAR-10 standard), so 64/255 does not bound it.
    l2 = dict(eval_norm="L2", eval_attacks="clean,autoattack", eval_epsilon=0.5)
    assert RobustEvaluationArguments(**l2).eval_epsilon == 0.5
    assert make(**l2).eval_epsilon == 0.5


def test_clean_training_allows_zero_epsilon():
    assert make(adv_method="clean", epsilon=0.0).epsilon == 0.0


def test_hf_argument_parser_flags_and_yaml(tmp_path):
    parser = HfArgumentParser(CURETrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--epsilon",
            "4/255",
            "--adv_method",
            "trades",
            "--conservation",
            "soft",
            "--head_modules",
            "head",
            "fc",
            "--revision",
            "true",
        ]
    )
    assert (
        args.epsilon == pytest.approx(4 / 255) and args.adv_method == "trades" and args.head_modules == ["head", "fc"]
    )
    assert args.conservation == "soft" and args.revision is True
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path}\nepsilon: 2/255\nconservation: hard\nreport_to: none\n")
    (args,) = parser.parse_yaml_file(str(config))
    assert args.epsilon == pytest.approx(2 / 255) and args.conservation == "hard"
    json.dumps(args.to_dict())  # serialisable for checkpoints
