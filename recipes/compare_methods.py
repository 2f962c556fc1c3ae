#!/usr/bin/env python
"""Every method on the same model and budget: clean, PGD-AT, TRADES, MART, FGSM-RS, CURE, CURE (paper variant).

    python recipes/compare_methods.py                                   # embedded digits, 3 seeds, CPU, minutes
    python recipes/compare_methods.py --autoattack --autoattack_examples 100
    python recipes/compare_methods.py --methods trades,cure --epochs 10 --seeds 0 --output_dir outputs/cmp

The protocol follows the paper's two stages (spec section 5): one natural stage 0 (that is the "clean" row),
then every adversarial method fine-tunes a copy of those weights for the same number of epochs with a fresh
optimizer of the same settings (``--from_scratch`` trains each method from the same random initialisation
instead). Every model is evaluated on the same test examples: clean accuracy, PGD-20 (CE, uniform start,
eval mode) and, with ``--autoattack``, AutoAttack (standard) on the first ``--autoattack_examples``.
The whole comparison runs once per seed of ``--seeds`` (data order, initialisation, attacks); the table shows
the mean over the seeds and, in brackets, the lowest and highest value. The defaults put the natural model near 0%
PGD-20 accuracy (eps 24/255 on 16x16 digits: at 8/255 a natural test_resnet keeps about 75%, so the table could not
separate the methods). Writes ``results.md`` (Markdown table), ``results.json`` (every seed's rows and the summary)
and ``tradeoff.png`` (the means) to ``--output_dir``.
A YAML/JSON file of these flags given first (or as ``--config FILE``) works too; flags after it override it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import load_image_dataset, set_preprocessing
from cure_hf.models import create_model
from cure_hf.parser import ConfigArgumentParser
from cure_hf.runtime import use_available_cpu_threads

logger = logging.getLogger(__name__)

# name -> (label, CURETrainingArguments overrides)
METHODS: Dict[str, tuple] = {
    "clean": ("natural (stage 0)", {"adv_method": "clean"}),
    "pgd": ("PGD-AT", {"adv_method": "pgd"}),
    "trades": ("TRADES (beta 6)", {"adv_method": "trades", "trades_beta": 6.0}),
    "mart": ("MART (beta 6)", {"adv_method": "mart", "trades_beta": 6.0}),
    "fgsm_rs": ("FGSM-RS", {"adv_method": "fgsm_rs"}),
    "cure": ("CURE (released code)", {"adv_method": "cure"}),
    "cure_paper": (
        "CURE (paper variant)",
        {"adv_method": "cure", "prominence": "paper", "revision_rate_schedule": "linear"},
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ConfigArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--dataset_name", default="digits", help="'digits' (embedded), a Hub id or 'imagefolder'")
    parser.add_argument("--train_dir", default=None, help="imagefolder: training images")
    parser.add_argument("--test_dir", default=None, help="imagefolder: test images")
    parser.add_argument("--model", default="test_resnet", help="timm name (default: the tiny test_resnet)")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--natural_epochs", type=float, default=8, help="stage 0 epochs (the 'clean' row)")
    parser.add_argument("--epochs", type=float, default=4, help="epochs of every adversarial method")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--learning_rate", type=float, default=0.05, help="every adversarial method (SGD, momentum 0.9)"
    )
    parser.add_argument("--natural_learning_rate", type=float, default=0.1)
    parser.add_argument("--epsilon", default="24/255", help="training and evaluation budget (L-inf, pixels in [0, 1])")
    parser.add_argument("--attack_steps", type=int, default=5, help="training attack steps (the paper: 10)")
    parser.add_argument("--attack_step_size", default="12/255", help="5 steps of eps/2: 2.5 eps in all, as 10 x eps/4")
    parser.add_argument("--eval_pgd_steps", type=int, default=20)
    parser.add_argument("--max_eval_examples", type=int, default=None, help="test examples (default: all)")
    parser.add_argument("--autoattack", action="store_true", help="also run AutoAttack (standard), on a subset")
    parser.add_argument("--autoattack_examples", type=int, default=100)
    parser.add_argument("--from_scratch", action="store_true", help="no shared stage 0: each method from the same init")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the comparison runs once per seed")
    parser.add_argument(
        "--cpu_threads",
        type=int,
        default=0,
        help="torch threads on a machine without GPU: 0 = every core available, N pins N",
    )
    parser.add_argument("--output_dir", default="outputs/compare_methods")
    args = parser.parse_args_and_config(argv)[0]
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; allowed {list(METHODS)}")
    try:
        args.seed_list = [int(v) for v in str(args.seeds).split(",") if v.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if not args.seed_list:
        parser.error("--seeds is empty: give at least one seed, e.g. 0")
    return args


def training_arguments(
    args, name: str, overrides: dict, epochs: float, learning_rate: float, seed: int
) -> CURETrainingArguments:
    return CURETrainingArguments(
        output_dir=os.path.join(args.output_dir, f"seed{seed}", name),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        lr_scheduler_type="cosine",
        epsilon=args.epsilon,
        attack_step_size=args.attack_step_size,
        attack_steps=args.attack_steps,
        eval_attacks=f"clean,pgd{args.eval_pgd_steps}",
        eval_pgd_steps=args.eval_pgd_steps,
        eval_max_examples=args.max_eval_examples,
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        **overrides,
    )


def run_method(args, name: str, model: torch.nn.Module, data, epochs: float, learning_rate: float, seed: int) -> dict:
    label, overrides = METHODS[name]
    training_args = training_arguments(args, name, overrides, epochs, learning_rate, seed)
    trainer = CURETrainer(model, training_args, train_dataset=data["train"], eval_dataset=data["test"])
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    metrics = trainer.evaluate()
    row = {
        "method": name,
        "label": label,
        "epochs": epochs,
        "seed": seed,
        "clean": metrics["eval_accuracy"],
        f"pgd{args.eval_pgd_steps}": metrics[f"eval_pgd{args.eval_pgd_steps}_accuracy"],
        "seconds_per_epoch": seconds / epochs,
        "n_eval": int(metrics["eval_n_examples"]),
    }
    if args.autoattack:
        aa_args = copy.copy(training_args)
        aa_args.eval_attacks, aa_args.eval_max_examples = "clean,autoattack", args.autoattack_examples
        trainer.args = aa_args
        aa = trainer.evaluate(metric_key_prefix="aa")
        row["autoattack"], row["n_autoattack"] = aa["aa_autoattack_accuracy"], int(aa["aa_n_examples"])
        trainer.args = training_args
    logger.info("%s: %s", name, row)
    return row


def summarize(rows: List[dict], pgd_key: str) -> List[dict]:
    """One row per method over the seeds: mean, min and max of each accuracy, mean seconds per epoch."""
    summary = []
    for name in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == name]
        row = {
            "method": name,
            "label": runs[0]["label"],
            "seeds": [r["seed"] for r in runs],
            "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in runs),
        }
        for key in ("clean", pgd_key, "autoattack"):
            values = [r[key] for r in runs if key in r]
            if values:
                row[key], row[f"{key}_min"], row[f"{key}_max"] = statistics.mean(values), min(values), max(values)
        if "n_autoattack" in runs[0]:
            row["n_autoattack"] = runs[0]["n_autoattack"]
        summary.append(row)
    return summary


def markdown_table(rows: List[dict], args) -> str:
    """Rows of :func:`summarize` (or single runs): accuracies in %, "mean [min, max]" when over several seeds."""
    steps = args.eval_pgd_steps
    header = (
        ["method", "clean acc", f"PGD-{steps} acc"]
        + (["AutoAttack acc"] if args.autoattack else [])
        + ["seconds / epoch"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(r, key):
        text = f"{100 * r[key]:.2f}"
        if f"{key}_min" in r and len(r.get("seeds", ())) > 1:
            text += f" [{100 * r[f'{key}_min']:.2f}, {100 * r[f'{key}_max']:.2f}]"
        return text

    for r in rows:
        cells = [r["label"], cell(r, "clean"), cell(r, f"pgd{steps}")]
        if args.autoattack:
            cells.append(f"{cell(r, 'autoattack')} (n={r['n_autoattack']})" if "autoattack" in r else "-")
        cells.append(f"{r['seconds_per_epoch']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_once(args, seed: int, data, num_classes: int) -> List[dict]:
    """Every method of ``--methods`` with one seed: stage 0, then each method from its weights (or from scratch)."""
    torch.manual_seed(seed)
    initial = create_model(args.model, num_classes, image_size=args.image_size)
    set_preprocessing(data, initial)
    methods = args.methods.split(",")
    rows = []
    start_weights = initial
    if not args.from_scratch or "clean" in methods:
        natural = copy.deepcopy(initial)
        rows.append(run_method(args, "clean", natural, data, args.natural_epochs, args.natural_learning_rate, seed))
        if not args.from_scratch:
            start_weights = natural
    for name in methods:
        if name == "clean":
            continue
        rows.append(run_method(args, name, copy.deepcopy(start_weights), data, args.epochs, args.learning_rate, seed))
    if "clean" not in methods:
        rows = [r for r in rows if r["method"] != "clean"]
    return rows


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    # accelerate launch writes OMP_NUM_THREADS=1 on a machine without GPU; a CPU run takes every core instead
    logger.info("torch threads: %d", use_available_cpu_threads(args.cpu_threads))
    os.makedirs(args.output_dir, exist_ok=True)
    wall = time.time()
    runs = []
    for seed in args.seed_list:
        # the test examples are the same for every seed (max_eval_examples keeps the first ones)
        data, num_classes = load_image_dataset(
            args.dataset_name,
            image_size=args.image_size,
            train_dir=args.train_dir,
            test_dir=args.test_dir,
            max_eval_samples=args.max_eval_examples,
            seed=seed,
        )
        runs.extend(compare_once(args, seed, data, num_classes))
    wall = time.time() - wall
    pgd_key = f"pgd{args.eval_pgd_steps}"
    rows = summarize(runs, pgd_key)

    from cure_hf.plots import plot_robustness_tradeoff

    table = markdown_table(rows, args)
    start = (
        "each method from the same initialisation"
        if args.from_scratch
        else f"stage 0: {args.natural_epochs:g} natural epochs, then {args.epochs:g} epochs per method from its weights"
    )
    seeds = ", ".join(map(str, args.seed_list))
    setup = (
        f"{args.dataset_name} at {args.image_size}x{args.image_size}, model {args.model}, eps {args.epsilon} "
        f"(L-inf), training attack {args.attack_steps} steps of {args.attack_step_size}; {start}; "
        f"{runs[-1]['n_eval']} test examples; seeds {seeds}"
        + (" (mean [min, max] over the seeds)" if len(args.seed_list) > 1 else "")
        + f"; total wall time {wall:.0f} s"
    )
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + setup + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "rows": rows,
                "runs": runs,
                "setup": {k: v for k, v in vars(args).items() if k != "seed_list"},
                "seeds": args.seed_list,
                "wall_seconds": wall,
            },
            f,
            indent=2,
        )
    plot = plot_robustness_tradeoff(
        rows,
        os.path.join(args.output_dir, "tradeoff.png"),
        robust_key=pgd_key,
        title=f"{args.dataset_name} / {args.model}, eps {args.epsilon}: clean vs "
        f"PGD-{args.eval_pgd_steps} (mean over seeds {seeds})",
    )
    print("\n" + table + "\n\n" + setup + f"\nwritten: {args.output_dir}/results.md, results.json, {plot}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
