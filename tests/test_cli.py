"""`cure-hf evaluate` / `cure-hf plot-history` on a checkpoint folder CURETrainer saved; the config-file parser."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_model

from cure_hf.cli import EvaluationSweepArguments, default_output_file, main
from cure_hf.data import collate_pixels
from cure_hf.parser import ConfigArgumentParser


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits):
    """A 4-step FGSM-RS run with one evaluation, saved by the trainer at step 4: (run dir, checkpoint, trainer)."""
    from cure_hf import CURETrainer, CURETrainingArguments

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("cli") / "run"
    args = CURETrainingArguments(
        output_dir=str(run),
        adv_method="fgsm_rs",
        max_steps=4,
        per_device_train_batch_size=16,
        learning_rate=0.05,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=4,
        eval_attacks="clean,pgd2",
        eval_pgd_steps=2,
        eval_max_examples=8,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        args,
        train_dataset=digits["train"].select(range(64)),
        eval_dataset=digits["test"],
    )
    trainer.train()
    torch.set_num_threads(threads)
    return run, run / "checkpoint-4", trainer


def test_cli_evaluates_a_trainer_checkpoint(trained_run, digits, tmp_path):
    from cure_hf.evaluation import evaluate_robustness

    _, checkpoint, trainer = trained_run
    assert (checkpoint / "model.safetensors").is_file()
    out = tmp_path / "result.json"
    installed = shutil.which("cure-hf")  # the console script setup.py declares
    command = [installed] if installed else [sys.executable, "-m", "cure_hf.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        command
        + [
            "evaluate",
            "--model_name_or_path",
            str(checkpoint),
            "--dataset_name",
            "digits",
            "--eval_attacks",
            "clean,pgd5,cw,autoattack",
            "--autoattack_version",
            "custom",
            "--autoattack_attacks",
            "apgd-ce",
            "--eval_max_examples",
            "16",
            "--eval_epsilon",
            "8/255",
            "--output_file",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header = result.stdout.splitlines()[0].split()
    assert header == ["eps", "n", "clean", "pgd5", "cw", "autoattack", "robust", "seconds"]
    saved = json.loads(out.read_text())
    metrics = saved["runs"][0]["metrics"]
    assert metrics["n_examples"] == 16 and saved["runs"][0]["settings"]["autoattack"]["attacks"] == ["apgd-ce"]
    assert max(metrics["pgd5_accuracy"], metrics["cw_accuracy"], metrics["autoattack_accuracy"]) <= metrics["accuracy"]
    # The folder holds the trainer's weights: the CLI's clean accuracy is the trained model's.
    batch = collate_pixels([digits["test"][i] for i in range(16)])
    model = trainer.accelerator.unwrap_model(trainer.model)  # the weights saved at the last step
    reference = evaluate_robustness(model, [batch], "clean").metrics["accuracy"]
    assert metrics["accuracy"] == pytest.approx(reference)


def test_cli_eps_sweep_plot_history_and_errors(trained_run, tmp_path, capsys):
    run, checkpoint, _ = trained_run
    plot = tmp_path / "eps.png"
    assert (
        main(
            [
                "evaluate",
                "--model_name_or_path",
                str(checkpoint),
                "--eval_attacks",
                "clean,pgd3",
                "--eval_max_examples",
                "8",
                "--eval_epsilon",
                "0,4/255,8/255",
                "--output_file",
                str(tmp_path / "sweep.json"),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [round(r["eps"] * 255) for r in sweep["runs"]] == [0, 4, 8] and plot.stat().st_size > 5000
    assert [round(r["settings"]["step_size"] * 255 * 4) for r in sweep["runs"]] == [0, 4, 8]  # eps / 4 each
    accuracies = [r["metrics"]["pgd3_accuracy"] for r in sweep["runs"]]
    assert accuracies[0] == sweep["runs"][0]["metrics"]["accuracy"]
    assert main(["plot-history", str(run), "--output", str(tmp_path / "history.png")]) == 0
    assert (tmp_path / "history.png").stat().st_size > 5000
    capsys.readouterr()
    assert main(["evaluate", "--model_name_or_path", str(checkpoint), "--eval_attacks", "clean,fgsm"]) == 2
    assert "fgsm" in capsys.readouterr().err
    assert main(["evaluate", "--model_name_or_path", str(tmp_path / "missing"), "--eval_attacks", "clean"]) == 2
    # not a pixel size in [0, 1], in the middle of a sweep
    assert main(["evaluate", "--model_name_or_path", str(checkpoint), "--eval_epsilon", "0,8"]) == 2
    assert "eval_epsilon=8.0" in capsys.readouterr().err
    # A radius of 0 (e.g. `eval_epsilon: 0` in a YAML file) is a radius, not "unset"; a YAML list is a sweep.
    assert EvaluationSweepArguments(eval_epsilon=0).eval_epsilons == [0.0]
    assert EvaluationSweepArguments(eval_epsilon=[0, "4/255"]).eval_epsilons == [0.0, 4 / 255]
    assert EvaluationSweepArguments().eval_epsilons == [8 / 255]


# ----------------------------------------------------------------------------------- the command line itself
def test_version_is_the_package_version(capsys):
    setup = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.py"), encoding="utf-8").read()
    version = re.search(r'version="([^"]+)"', setup).group(1)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"cure-hf {version}\n"


# Written out here rather than imported: the test states what each old flag became.
OLD_FLAGS = [
    ("--eps", "8/255", "--eval_epsilon"),
    ("--attacks", "clean", "--eval_attacks"),
    ("--n-examples", "16", "--eval_max_examples"),
    ("--steps", "5", "--eval_pgd_steps"),
    ("--restarts", "2", "--eval_restarts"),
    ("--batch-size", "8", "--eval_attack_batch_size"),
    ("--dataset", "digits", "--dataset_name"),
    ("--model", "test_resnet", "--model_name_or_path"),
    ("--output", "out.json", "--output_file"),
    ("--split", "train", "--test_split"),
    ("--data-dir", "images", "--test_dir"),
    ("--step-size", "2/255", "--eval_step_size"),
    ("--norm", "L2", "--eval_norm"),
    ("--seed", "1", "--eval_seed"),
]


@pytest.mark.parametrize("old,value,new", OLD_FLAGS, ids=[f[0] for f in OLD_FLAGS])
def test_old_flags_are_refused_with_their_new_name(old, value, new, tmp_path, capsys):
    argv = ["evaluate", "--model_name_or_path", str(tmp_path / "never_loaded"), old, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{old} is now {new}" in err
    assert main(["evaluate", "--model_name_or_path", "test_resnet", f"{old}={value}"]) == 2  # the = form too
    assert f"{old} is now {new}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--eval_restarts", "--eval_pgd_steps", "--eval_max_examples"])
def test_zero_evaluation_budget_is_refused_with_the_field_named(flag, tmp_path, capsys):
    # Refused while parsing: the (missing) model is never loaded.
    assert main(["evaluate", "--model_name_or_path", str(tmp_path / "never_loaded"), flag, "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag[2:]}=0 is invalid" in err and ">= 1" in err and "Traceback" not in err


def test_results_are_written_next_to_the_model(trained_run, tmp_path, monkeypatch, capsys):
    _, checkpoint, _ = trained_run
    folder = tmp_path / "my_model"
    shutil.copytree(checkpoint, folder)
    monkeypatch.chdir(tmp_path)
    assert (
        main(["evaluate", "--model_name_or_path", str(folder), "--eval_attacks", "clean", "--eval_max_examples", "8"])
        == 0
    )
    written = folder / "robust_eval.json"
    assert json.loads(written.read_text())["runs"][0]["metrics"]["n_examples"] == 8
    assert f"wrote {written}" in capsys.readouterr().out
    assert (
        main(
            [
                "evaluate",
                "--model_name_or_path",
                f"local-dir:{folder}",
                "--eval_attacks",
                "clean",
                "--eval_max_examples",
                "4",
            ]
        )
        == 0
    )
    assert json.loads(written.read_text())["runs"][0]["metrics"]["n_examples"] == 4
    # A timm name (an untrained model) or a Hub id has no folder: ./robust_eval/<name>.json, "/" and ":" as "--".
    assert (
        main(["evaluate", "--model_name_or_path", "test_resnet", "--eval_attacks", "clean", "--eval_max_examples", "8"])
        == 0
    )
    assert (tmp_path / "robust_eval" / "test_resnet.json").is_file()
    assert "wrote robust_eval/test_resnet.json" in capsys.readouterr().out
    assert default_output_file("hf-hub:timm/resnet18.a1_in1k") == os.path.join(
        "robust_eval", "timm--resnet18.a1_in1k.json"
    )
    assert default_output_file("someone/robust-vit") == os.path.join("robust_eval", "someone--robust-vit.json")
    assert sorted(os.listdir(tmp_path)) == ["my_model", "robust_eval"]  # nothing else in the working directory


def test_truncated_safetensors_is_one_line_naming_the_file_and_the_fix(trained_run, tmp_path, capsys):
    _, checkpoint, _ = trained_run
    folder = tmp_path / "broken"
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    assert main(["evaluate", "--model_name_or_path", str(folder), "--eval_attacks", "clean"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(weights) in err and "truncated or corrupt" in err and "re-download" in err and "re-save" in err


def _predict_by_hand(model, images):
    """Classes the model predicts for PIL images: numpy pixels in [0, 1], channels first, argmax of the logits."""
    pixels = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(pixels))
    return getattr(logits, "logits", logits).argmax(-1).numpy()


@pytest.fixture(scope="module")
def svhn_like(tmp_path_factory, trained_run):
    """A local dataset folder laid out like SVHN on the Hub: two configs in README.md, parquet files, and
    columns named neither image nor label. The labels are the trained model's own predictions, except for rows
    12-15 of config "cropped_digits" (another class): its clean accuracy is 12/16, and "extra"'s (8 rows) 1, only
    if every image reaches the model in its row, with its pixels. Returns (folder, {config: (images, labels)})."""
    from datasets import ClassLabel, Dataset, Features, Image

    from cure_hf.data import load_digits_dataset

    trainer = trained_run[2]
    model = trainer.accelerator.unwrap_model(trainer.model)
    root = tmp_path_factory.mktemp("svhn_like")
    test = load_digits_dataset()["test"]
    features = Features({"picture": Image(), "digit": ClassLabel(names=[str(i) for i in range(10)])})
    content = {"cropped_digits": range(0, 16), "extra": range(100, 108)}
    examples = {}
    for config, indices in content.items():
        images = [test[i]["image"] for i in indices]
        predicted = _predict_by_hand(model, images)
        labels = [int(p) if i < 12 else int(p + 1) % 10 for i, p in enumerate(predicted)]
        os.makedirs(root / config)
        Dataset.from_dict({"picture": images, "digit": labels}, features=features).to_parquet(
            str(root / config / "test-00000-of-00001.parquet")
        )
        examples[config] = (images, labels)
    front_matter = {
        "configs": [
            {"config_name": c, "data_files": [{"split": "test", "path": f"{c}/test-*.parquet"}]} for c in content
        ]
    }
    (root / "README.md").write_text(f"---\n{yaml.safe_dump(front_matter)}---\n# digits laid out like SVHN\n")
    return root, examples


def test_cli_evaluates_a_dataset_config_with_custom_columns(trained_run, svhn_like, tmp_path, monkeypatch):
    """The SVHN configs' checkpoints: --dataset_config_name and --image_column/--label_column, offline, with the
    dataset settings in a config file (as recipes/configs/svhn_*.yaml) and a flag that overrides it."""
    import datasets

    # datasets caches a local folder's configs by folder and config name, not by content: a fresh cache, so an
    # earlier run's folder of the same name cannot answer for this one.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    _, checkpoint, trainer = trained_run
    root, examples = svhn_like
    config = tmp_path / "eval_svhn.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset_name": str(root),
                "dataset_config_name": "cropped_digits",
                "image_column": "picture",
                "label_column": "digit",
                "eval_attacks": "clean,pgd3",
                "eval_pgd_steps": 2,
            }
        )
    )
    out = tmp_path / "svhn.json"
    assert (
        main(
            [
                "evaluate",
                str(config),
                "--model_name_or_path",
                str(checkpoint),
                "--eval_attacks",
                "clean,pgd2",
                "--output_file",
                str(out),
            ]
        )
        == 0
    )
    saved = json.loads(out.read_text())
    metrics = saved["runs"][0]["metrics"]
    assert saved["dataset_config_name"] == "cropped_digits" and metrics["n_examples"] == 16  # not extra's 8
    assert set(metrics) == {"accuracy", "pgd2_accuracy", "robust_accuracy", "n_examples"}  # the flag won
    images, labels = examples["cropped_digits"]
    by_hand = float(np.mean(_predict_by_hand(trainer.accelerator.unwrap_model(trainer.model), images) == labels))
    assert by_hand == 12 / 16 and metrics["accuracy"] == pytest.approx(by_hand)
    assert metrics["pgd2_accuracy"] <= metrics["accuracy"]
    assert (
        main(
            [
                "evaluate",
                str(config),
                "--model_name_or_path",
                str(checkpoint),
                "--eval_attacks",
                "clean",
                "--dataset_config_name",
                "extra",
                "--output_file",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())["runs"][0]["metrics"]
    assert metrics["n_examples"] == 8 and metrics["accuracy"] == 1.0  # its 8 labels are all the predictions


# --------------------------------------------------------------------------------- cure_hf.parser, on its own
@dataclass
class _Toy:
    name: str = field(metadata={"help": "required"})
    a: int = 1
    b: int = 2
    c: int = 3
    d: float = 4.0
    note: Optional[str] = None


def _toy_parser():
    parser = ConfigArgumentParser(_Toy)
    parser.set_defaults(b=20, c=30)  # as a recipe's own defaults
    return parser


@pytest.mark.parametrize("form", ["first", "--config", "--config=", "json"])
def test_config_file_then_flags_precedence(form, tmp_path):
    values = {"name": "from-file", "c": 300, "d": "5e-4"}  # a required field and a string the flag's type reads
    path = tmp_path / ("config.json" if form == "json" else "config.yaml")
    path.write_text(json.dumps(values) if form == "json" else yaml.safe_dump(values))
    flags = ["--d", "0.25", "--note", "flag"]
    argv = {
        "first": [str(path)] + flags,
        "--config": flags + ["--config", str(path)],
        "--config=": [f"--config={path}"] + flags,
        "json": [str(path)] + flags,
    }[form]
    (toy,) = _toy_parser().parse_args_and_config(argv)
    # dataclass default < set_defaults < file < flag
    assert (toy.name, toy.a, toy.b, toy.c, toy.d, toy.note) == ("from-file", 1, 20, 300, 0.25, "flag")
    (toy,) = _toy_parser().parse_args_and_config([str(path)])
    assert toy.d == 5e-4 and isinstance(toy.d, float)
    (toy,) = _toy_parser().parse_args_and_config(["--name", "x"])
    assert (toy.b, toy.c, toy.d) == (20, 30, 4.0)


def test_config_file_errors_name_the_key_and_the_file(tmp_path, monkeypatch):
    path = tmp_path / "typo.yaml"
    path.write_text("name: x\nnotes: y\nzzz: 1\n")
    with pytest.raises(ValueError, match=r"typo.yaml: unknown keys 'notes' \(did you mean note\?\), 'zzz';"):
        _toy_parser().parse_args_and_config([str(path)])
    (tmp_path / "other.yaml").write_text("name: y\n")
    with pytest.raises(ValueError, match="several config files"):
        _toy_parser().parse_args_and_config([str(path), "--config", str(tmp_path / "other.yaml")])
    with pytest.raises(ValueError, match="not used"):  # no abbreviations: --not is not --note
        _toy_parser().parse_args_and_config(["--name", "x", "--not", "y"])
    with pytest.raises(ValueError, match="reserves"):
        ConfigArgumentParser(dataclass(type("WithConfig", (), {"__annotations__": {"config": str}, "config": "x"})))
    monkeypatch.delenv("CURE_HF_PARSER_TEST", raising=False)
    (tmp_path / "env.yaml").write_text("env:\n  CURE_HF_PARSER_TEST: 7\nname: z\n")
    (toy,) = _toy_parser().parse_args_and_config([str(tmp_path / "env.yaml")])
    assert toy.name == "z" and os.environ["CURE_HF_PARSER_TEST"] == "7"


def test_an_l2_sweep_checks_each_radius_under_the_l2_norm():
    """Each radius of a sweep is checked with the sweep's norm: 0.5 is a fine L2 radius but no L-inf one."""
    sweep = EvaluationSweepArguments(eval_epsilon="0.25,0.5", eval_norm="L2", eval_attacks="clean,autoattack")
    assert sweep.eval_epsilons == [0.25, 0.5]
    with pytest.raises(ValueError, match="64/255"):
        EvaluationSweepArguments(eval_epsilon="4/255,0.5", eval_norm="Linf")
