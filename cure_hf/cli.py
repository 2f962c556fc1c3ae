"""The ``cure-hf`` command line.

    cure-hf evaluate --model_name_or_path <folder | timm name | hf-hub:<repo>> --dataset_name digits \\
        --eval_attacks clean,pgd20,cw,autoattack --eval_max_examples 1000 --eval_epsilon 8/255
    cure-hf evaluate ... --eval_epsilon 0,2/255,4/255,8/255 --plot eps.png   # robust accuracy against eps
    cure-hf evaluate EVAL.yaml --eval_restarts 5                             # a config file, then overrides
    cure-hf evaluate --model_name_or_path <folder> --protocol robustbench-imagenet --test_dir <ImageNet val>
    cure-hf evaluate --model_name_or_path <folder> --protocol robustbench-cifar10   # RobustBench's numbers
    cure-hf plot-history <training output_dir> --output history.png         # clean / robust accuracy over training
    cure-hf --version

``evaluate`` speaks the names of the rest of cure_hf: the evaluation flags are
:class:`~cure_hf.config.RobustEvaluationArguments` (as in ``CURETrainingArguments``), the model and dataset
flags are the recipes' (:mod:`cure_hf.parser`). Only ``--eval_epsilon`` takes more here: a comma-separated
list runs one evaluation per radius. It prints a table and writes JSON (metrics, AutoAttack per attack,
warnings, settings) to ``--output_file``, by default next to the model: ``<folder>/robust_eval.json`` for a
local folder, ``./robust_eval/<name>.json`` for a timm name or Hub id (``/`` and ``:`` become ``--``).
``--protocol`` runs one of RobustBench's protocols instead (:mod:`cure_hf.protocols`: its data, pixels, AutoAttack
standard at its eps) and writes RobustBench's result fields to ``<folder>/<protocol>.json``.
A timm name builds an untrained model (no network) with the dataset's number of classes; a folder or Hub id
loads its weights (safetensors only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from .config import RobustEvaluationArguments
from .parser import ConfigArgumentParser, DatasetArguments, ModelArguments
from .protocols import ProtocolArguments

__all__ = [
    "main",
    "build_parser",
    "build_evaluate_parser",
    "run_evaluate",
    "run_protocol",
    "format_table",
    "default_output_file",
    "EvaluationSweepArguments",
    "EvaluationOutputArguments",
]

RESULT_FILE_NAME = "robust_eval.json"
EVALUATE_HELP = "Clean / PGD / CW / AutoAttack accuracy of a model on a dataset, or a RobustBench protocol."
# A standalone evaluation reports the number of record by default; the trainer's default stays cheap.
EVALUATE_DEFAULTS = {"eval_attacks": "clean,pgd20,cw,autoattack", "eval_attack_batch_size": 128}

# The flags of the first `cure-hf evaluate`, and the names that replaced them.
RENAMED_FLAGS = {
    "--model": "--model_name_or_path",
    "--dataset": "--dataset_name",
    "--data-dir": "--test_dir (and --train_dir)",
    "--split": "--test_split",
    "--attacks": "--eval_attacks",
    "--eps": "--eval_epsilon",
    "--step-size": "--eval_step_size",
    "--steps": "--eval_pgd_steps",
    "--restarts": "--eval_restarts",
    "--n-examples": "--eval_max_examples",
    "--batch-size": "--eval_attack_batch_size",
    "--norm": "--eval_norm",
    "--seed": "--eval_seed",
    "--output": "--output_file",
}


@dataclass
class EvaluationSweepArguments(RobustEvaluationArguments):
    """:class:`RobustEvaluationArguments`, except that ``eval_epsilon`` may list several radii (an eps sweep)."""

    eval_epsilon: Optional[str] = field(
        default=None,
        metadata={
            "help": "Radius in pixel units of [0, 1] (default 8/255), or a comma-separated list for a sweep, "
            "e.g. 0,4/255,8/255: one evaluation per radius."
        },
    )

    def __post_init__(self):
        value = self.eval_epsilon
        text = "" if value is None else ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        radii = [part.strip() for part in text.split(",") if part.strip()]
        # Every radius through the shared checks; the fields keep the first, as a single-radius run has it.
        self.eval_epsilons = [
            RobustEvaluationArguments(
                eval_epsilon=radius, eval_norm=self.eval_norm, eval_attacks=self.eval_attacks
            ).eval_epsilon
            for radius in radii
        ]
        self.eval_epsilon = radii[0] if radii else None
        super().__post_init__()
        if not self.eval_epsilons:
            self.eval_epsilons = [self.resolved_eval_epsilon]


@dataclass
class EvaluationOutputArguments:
    """What ``cure-hf evaluate`` writes, and where it runs."""

    output_file: Optional[str] = field(
        default=None,
        metadata={
            "help": f"JSON result file (default: <model folder>/{RESULT_FILE_NAME} for a local folder, "
            "./robust_eval/<name>.json for a timm name or Hub id)."
        },
    )
    device: Optional[str] = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda if available)."}
    )
    plot: Optional[str] = field(
        default=None, metadata={"help": "PNG of robust accuracy against eps (with several --eval_epsilon values)."}
    )


class _RenamedFlag(argparse.Action):
    """An old flag of ``cure-hf evaluate``: an error naming its new name, never a silent reinterpretation."""

    def __init__(self, option_strings, dest, new_flag, **kwargs):
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        self.new_flag = new_flag

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            f"{option_string} is now {self.new_flag}: cure-hf evaluate uses the argument names of "
            "CURETrainingArguments and the recipes (cure-hf evaluate --help lists them)"
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``cure-hf`` command: ``--version`` and the commands (``evaluate`` has its own parser)."""
    parser = argparse.ArgumentParser(prog="cure-hf", description="Robust image classifiers: evaluation tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    # Listed here for `cure-hf --help`; main() parses its arguments with build_evaluate_parser().
    commands.add_parser("evaluate", help=EVALUATE_HELP, add_help=False)

    ph = commands.add_parser("plot-history", help="PNG of clean and robust accuracy over training.")
    ph.add_argument("run", help="A training output_dir (or its trainer_state.json).")
    ph.add_argument("--output", default=None, help="PNG path (default: <run>/accuracy_history.png).")
    ph.add_argument("--prefix", default="eval", help="Metric prefix (default: eval).")
    return parser


def build_evaluate_parser() -> ConfigArgumentParser:
    """``cure-hf evaluate``: the model, dataset, evaluation and output dataclasses, or a config file of them."""
    parser = ConfigArgumentParser(
        (ModelArguments, DatasetArguments, EvaluationSweepArguments, EvaluationOutputArguments, ProtocolArguments),
        prog="cure-hf evaluate",
        description=f"{EVALUATE_HELP} A YAML/JSON file given first (or with --config) sets any of these arguments; "
        "flags after it override it.",
    )
    parser.set_defaults(**EVALUATE_DEFAULTS)
    for old, new in RENAMED_FLAGS.items():
        parser.add_argument(old, action=_RenamedFlag, new_flag=new)
    return parser


def _is_timm_name(spec: str) -> bool:
    return not (spec.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(spec) or "/" in spec)


def default_output_file(model_name_or_path: str, protocol: Optional[str] = None) -> str:
    """Next to a local model (``<folder>/robust_eval.json``); ``robust_eval/<name>.json`` for a timm name or Hub id.

    With a ``protocol``: ``<folder>/<protocol>.json``, ``robust_eval/<name>.<protocol>.json``.
    """
    folder = model_name_or_path.removeprefix("local-dir:")
    if os.path.isdir(folder):
        return os.path.join(folder, f"{protocol}.json" if protocol else RESULT_FILE_NAME)
    name = model_name_or_path.removeprefix("hf-hub:").replace("/", "--").replace(":", "--")
    return os.path.join("robust_eval", f"{name}.{protocol}.json" if protocol else f"{name}.json")


def _weights_files(spec: str) -> List[str]:
    folder = spec.removeprefix("local-dir:")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".safetensors"))


def _load_model(model_args: ModelArguments, num_classes: Optional[int], image_size: Optional[int]):
    """The model to attack, through cure_hf's loader (timm names, Hub ids, local folders; safetensors only)."""
    from safetensors import SafetensorError

    from .models import load_model

    spec = model_args.model_name_or_path
    try:
        if _is_timm_name(spec):
            return load_model(
                spec,
                num_classes,
                pretrained=model_args.pretrained,
                image_size=image_size or 32,
                patch_size=model_args.patch_size,
            )
        return load_model(spec, image_size=image_size)
    except SafetensorError as error:
        files = ", ".join(_weights_files(spec)) or f"the safetensors weights of {spec}"
        raise ValueError(
            f"{files}: truncated or corrupt ({error}); re-download it (for a Hub model: delete it "
            "from the Hugging Face cache and load again) or re-save it (trainer.save_model() or "
            "cure_hf.hub.save_pretrained)"
        ) from None


def _load_split(data_args: DatasetArguments, image_size: int, max_examples: Optional[int]):
    """The split to evaluate (``test_split``) and the number of classes."""
    from .data import load_image_dataset

    name, split = data_args.dataset_name, data_args.test_split
    kwargs: Dict[str, Any] = dict(
        image_size=image_size,
        config_name=data_args.dataset_config_name,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
    )
    if name in ("digits", "imagefolder"):  # fixed split names: the embedded train/test, or the two folders
        if split not in ("train", "test"):
            raise ValueError(f"test_split={split!r} is invalid for dataset_name={name!r}: allowed 'train' or 'test'")
        if name == "imagefolder":
            if not (data_args.train_dir or data_args.test_dir):
                raise ValueError("dataset_name='imagefolder' needs --test_dir (a folder of class sub-folders)")
            kwargs.update(
                train_dir=data_args.train_dir or data_args.test_dir, test_dir=data_args.test_dir or data_args.train_dir
            )
    else:  # only the evaluated split needs to exist
        kwargs.update(train_split=split, test_split=split)
        split = "test"
    splits, num_classes = load_image_dataset(name, **kwargs)
    dataset = splits[split]
    if max_examples is not None:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    return dataset, num_classes


def _output_classes(model, dataset, device) -> int:
    """How many classes the model scores: its logits on the first example."""
    import torch

    from .attacks import logits_of
    from .data import collate_pixels

    with torch.no_grad():
        return logits_of(model(collate_pixels([dataset[0]])["pixel_values"].to(device))).shape[-1]


def _write_json(path: str, result: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def run_evaluate(
    evaluation: EvaluationSweepArguments,
    model_args: ModelArguments,
    data_args: DatasetArguments,
    output: EvaluationOutputArguments,
) -> Dict[str, Any]:
    """``cure-hf evaluate``: returns the result written to ``output.output_file`` (or its default)."""
    import torch

    from .data import collate_pixels, set_preprocessing
    from .evaluation import evaluate_robustness, log_evaluation_warnings

    device = torch.device(output.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from .runtime import use_available_cpu_threads

    use_available_cpu_threads(model_args.cpu_threads, device)  # a launcher's OMP_NUM_THREADS=1 would idle the cores
    spec = model_args.model_name_or_path

    # The model decides the input size; a timm name needs the dataset's number of classes first.
    probe_size = model_args.image_size or 32
    model = None
    if not _is_timm_name(spec):
        model = _load_model(model_args, None, model_args.image_size)
        size = getattr(model, "input_size", None)
        probe_size = model_args.image_size or (int(size[-1]) if size else 32)
    dataset, num_classes = _load_split(data_args, probe_size, evaluation.eval_max_examples)
    if model is None:
        model = _load_model(model_args, num_classes, probe_size)
    set_preprocessing(dataset, model)  # the pixels the model was evaluated on in training (its saved preprocessing)
    model.to(device).eval()
    out_classes = _output_classes(model, dataset, device)
    if out_classes != num_classes:
        raise ValueError(
            f"--model_name_or_path {spec} has {out_classes} outputs but --dataset_name "
            f"{data_args.dataset_name} has {num_classes} classes; evaluate it on a dataset with the "
            "classes it was trained on"
        )

    runs = []
    for eps in evaluation.eval_epsilons:
        generator = torch.Generator(device=device).manual_seed(evaluation.eval_seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=evaluation.eval_attack_batch_size, collate_fn=collate_pixels
        )
        start = time.perf_counter()
        result = evaluate_robustness(
            model,
            loader,
            evaluation.eval_attack_list,
            eps=eps,
            step_size=evaluation.eval_step_size,
            steps=evaluation.eval_pgd_steps,
            restarts=evaluation.eval_restarts,
            generator=generator,
            device=device,
            autoattack=evaluation.autoattack_config(),
            progress=sys.stderr.isatty(),
        )
        log_evaluation_warnings(result, f"eps={eps:.5f}")
        runs.append({"eps": eps, "seconds": round(time.perf_counter() - start, 2), **result.to_dict()})

    result = {
        "model": spec,
        "dataset": data_args.dataset_name,
        "dataset_config_name": data_args.dataset_config_name,
        "split": data_args.test_split,
        "device": str(device),
        "runs": runs,
        "warnings": sorted({w for run in runs for w in run["warnings"]}),
    }
    print(format_table(runs))
    for warning in result["warnings"]:
        print(f"WARNING: {warning}")
    _write_json(output.output_file or default_output_file(spec), result)
    if output.plot:
        from .plots import plot_accuracy_vs_eps

        plot_accuracy_vs_eps(
            {run["eps"]: run["metrics"] for run in runs}, output.plot, title=f"{spec} on {data_args.dataset_name}"
        )
        print(f"wrote {output.plot}")
    return result


def run_protocol(
    protocol_args: ProtocolArguments,
    evaluation: EvaluationSweepArguments,
    model_args: ModelArguments,
    data_args: DatasetArguments,
    output: EvaluationOutputArguments,
) -> Dict[str, Any]:
    """``cure-hf evaluate --protocol``: RobustBench's evaluation; returns the record written to the output file."""
    import torch

    from .data import collate_pixels
    from .evaluation import AutoAttackConfig, evaluate_robustness, log_evaluation_warnings
    from .protocols import (
        PROTOCOLS,
        check_model_for_protocol,
        check_protocol_arguments,
        load_protocol_data,
        robustbench_record,
    )
    from .runtime import use_available_cpu_threads

    protocol = PROTOCOLS[protocol_args.protocol]
    check_protocol_arguments(protocol, evaluation, model_args, data_args, output, EVALUATE_DEFAULTS["eval_attacks"])
    device = torch.device(output.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_available_cpu_threads(model_args.cpu_threads, device)
    # The data first: a missing image is found before a large model is loaded.
    dataset, data, subset, incomplete = load_protocol_data(
        protocol, protocol_args, data_args, evaluation.eval_max_examples
    )
    spec = model_args.model_name_or_path
    if _is_timm_name(spec):  # an untrained timm model, built for the protocol's classes and images
        model = _load_model(model_args, protocol.num_classes, protocol.image_size)
    else:
        model = _load_model(model_args, None, model_args.image_size)
    warnings = check_model_for_protocol(model, protocol)
    model.to(device).eval()
    out_classes = _output_classes(model, dataset, device)
    if out_classes != protocol.num_classes:
        raise ValueError(
            f"--model_name_or_path {spec} has {out_classes} outputs, but --protocol {protocol.name} has "
            f"{protocol.num_classes} classes; evaluate a {protocol.dataset} model"
        )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=evaluation.eval_attack_batch_size, collate_fn=collate_pixels
    )
    start = time.perf_counter()
    result = evaluate_robustness(
        model,
        loader,
        "clean,autoattack",
        eps=protocol.eps_value,
        device=device,
        autoattack=AutoAttackConfig(version="standard", norm=protocol.threat_model, seed=evaluation.eval_seed),
        progress=sys.stderr.isatty(),
    )
    seconds = time.perf_counter() - start
    log_evaluation_warnings(result, protocol.name)
    record = robustbench_record(
        protocol,
        result,
        model=model,
        model_name_or_path=spec,
        data=data,
        seed=evaluation.eval_seed,
        batch_size=evaluation.eval_attack_batch_size,
        device=str(device),
        seconds=seconds,
        subset=subset,
        incomplete=incomplete,
        warnings=warnings,
    )
    print(format_table([{"eps": protocol.eps_value, "seconds": round(seconds, 2), **result.to_dict()}]))
    print(
        f"{protocol.name}: clean_acc {record['clean_acc']}, autoattack_acc {record['autoattack_acc']} "
        f"({record['n_examples']} images, eps {protocol.eps}, AutoAttack standard)"
    )
    if incomplete:
        print(f"NOT the protocol (protocol_complete false): {incomplete}")
    for warning in record["warnings"]:
        print(f"WARNING: {warning}")
    _write_json(output.output_file or default_output_file(spec, protocol.name), record)
    return record


def format_table(runs: Sequence[Dict[str, Any]]) -> str:
    """One row per eps: n, then each accuracy in percent; AutoAttack's per-attack accuracies below."""
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run["metrics"] if k.endswith("accuracy") and k not in keys]
    keys = sorted(keys, key=lambda k: (k != "accuracy", k == "robust_accuracy"))
    header = ["eps", "n"] + [k.replace("_accuracy", "") if k != "accuracy" else "clean" for k in keys] + ["seconds"]
    rows = [header]
    for run in runs:
        eps = run["eps"]
        eps_text = f"{round(eps * 255)}/255" if abs(eps * 255 - round(eps * 255)) < 1e-6 else f"{eps:.4f}"
        rows.append(
            [eps_text, str(run["metrics"].get("n_examples", ""))]
            + [f"{100 * run['metrics'][k]:.2f}" if k in run["metrics"] else "-" for k in keys]
            + [f"{run['seconds']:.1f}"]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for run in runs:
        if run.get("autoattack_stages"):
            stages = ", ".join(f"{name} {100 * acc:.2f}" for name, acc in run["autoattack_stages"].items())
            lines.append(f"AutoAttack at eps {run['eps']:.5f}, robust accuracy after each attack: {stages}")
    return "\n".join(lines)


def run_plot_history(args) -> str:
    from .plots import plot_training_history

    output = args.output or os.path.join(
        args.run if os.path.isdir(args.run) else os.path.dirname(args.run), "accuracy_history.png"
    )
    path = plot_training_history(args.run, output, prefix=args.prefix)
    print(f"wrote {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs a command; returns the exit status (2 for a usage error, printed as one line)."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cure_hf").setLevel(logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "evaluate":  # parsed by its own parser, which also reads a config file
            parsed = build_evaluate_parser().parse_args_and_config(argv[1:])
            model_args, data_args, evaluation, output, protocol = parsed
            if protocol.protocol:
                run_protocol(protocol, evaluation, model_args, data_args, output)
            else:
                run_evaluate(evaluation, model_args, data_args, output)
        else:
            run_plot_history(build_parser().parse_args(argv))
    except SystemExit as exit_:  # --help, --version, argparse's usage errors (already printed)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except (ValueError, FileNotFoundError) as error:
        print(f"cure-hf {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
