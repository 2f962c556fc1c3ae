#!/usr/bin/env python
"""Ablation: CURE alone, with weight averaging (WA), with AWP, with both, and TRADES with both; several seeds.

    python recipes/ablation_wa_awp.py                # embedded digits, CPU: 52 min on 2 shared cores (docs/beyond.md)
    python recipes/ablation_wa_awp.py --seeds 0 --variants cure,cure_wa_awp --epochs 3

Protocol (spec section 5, as recipes/compare_methods.py): per seed one natural stage 0, then every variant fine-tunes
a copy of those weights for the same epochs with a fresh SGD optimizer (cosine schedule). Every epoch the model is
evaluated (clean and PGD-20, the weight average when WA is on) on the test examples, which gives the best and the
last robust accuracy and their gap (robust overfitting; a measurement, nothing is selected with it). The final
model is also attacked with AutoAttack (standard) on the first ``--autoattack_examples`` test images.

The default eps is where the natural model is broken: with ``test_resnet`` on the digits at 16x16 its PGD-20
accuracy is 78% at 8/255, 18% at 16/255 and below 1% at 24/255 (measured, see docs/beyond.md), so 24/255.
AutoAttack takes most of the time (~2.5 of each run's ~3.5 min); ``--autoattack_examples 50`` halves it. The
script records the stage-0 model's own clean and PGD-20 accuracy at that eps in the JSON.

Writes ``ablation_wa_awp.md`` (table: mean and standard deviation over the seeds), ``ablation_wa_awp.json`` (every
run, every epoch, the summary, the settings) and ``ablation_wa_awp.png`` (clean vs AutoAttack, and robust accuracy
per epoch) to ``--output_dir``. Seconds per epoch are training only (no evaluation), as measured on this machine.
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
from transformers import TrainerCallback

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import load_image_dataset
from cure_hf.models import create_model
from cure_hf.runtime import use_available_cpu_threads

logger = logging.getLogger(__name__)

# name -> (label, CURETrainingArguments overrides); WA and AWP at their own defaults (decay 0.999; AWP gamma
# 5e-3 for CURE and TRADES), AWP's warm-up given by --awp_warmup_epochs.
VARIANTS: Dict[str, tuple] = {
    "cure": ("CURE", {"adv_method": "cure"}),
    "cure_wa": ("CURE + WA", {"adv_method": "cure", "weight_averaging": True}),
    "cure_awp": ("CURE + AWP", {"adv_method": "cure", "awp_gamma": True}),
    "cure_wa_awp": ("CURE + WA + AWP", {"adv_method": "cure", "weight_averaging": True, "awp_gamma": True}),
    "trades_wa_awp": ("TRADES + WA + AWP", {"adv_method": "trades", "weight_averaging": True, "awp_gamma": True}),
}
METRICS = ("clean", "pgd", "autoattack", "best_robust", "last_robust", "best_minus_last", "seconds_per_epoch")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (stage 0, init, data order, attacks)")
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--image_size", type=int, default=16, help="the digits are 8x8 images; 16 loses nothing")
    parser.add_argument("--natural_epochs", type=float, default=8)
    parser.add_argument("--natural_learning_rate", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=6, help="epochs of every variant")
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epsilon", default="24/255")
    parser.add_argument("--attack_step_size", default="12/255", help="5 steps of eps/2: 2.5 eps in all, as 10 x eps/4")
    parser.add_argument("--attack_steps", type=int, default=5)
    parser.add_argument(
        "--awp_warmup_epochs", type=float, default=1.0, help="AWP's warm-up (the reference delays it 10 of 200 epochs)"
    )
    parser.add_argument("--eval_pgd_steps", type=int, default=20)
    parser.add_argument("--autoattack_examples", type=int, default=100)
    parser.add_argument("--max_train_examples", type=int, default=None)
    parser.add_argument("--max_eval_examples", type=int, default=None, help="test examples (default: all 360)")
    parser.add_argument(
        "--cpu_threads",
        type=int,
        default=0,
        help="torch threads on a machine without GPU: 0 = every core available, N pins N",
    )
    parser.add_argument("--output_dir", default="outputs/ablation_wa_awp", help="the table, JSON and plot")
    parser.add_argument("--work_dir", default=None, help="the runs' own folders (default: output_dir/runs)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed {list(VARIANTS)}")
    return args


class EpochTimer(TrainerCallback):
    """Wall time of every training epoch, evaluation excluded (the Trainer evaluates after on_epoch_end)."""

    def __init__(self):
        self.seconds: List[float] = []
        self._start = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def training_arguments(
    args, name: str, seed: int, epochs: float, learning_rate: float, overrides: dict, evaluate_every_epoch: bool
) -> CURETrainingArguments:
    return CURETrainingArguments(
        output_dir=os.path.join(args.work_dir, f"seed{seed}", name),
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=360,
        lr_scheduler_type="cosine",
        epsilon=args.epsilon,
        attack_step_size=args.attack_step_size,
        attack_steps=args.attack_steps,
        eval_attacks=f"clean,pgd{args.eval_pgd_steps}",
        eval_pgd_steps=args.eval_pgd_steps,
        eval_strategy="epoch" if evaluate_every_epoch else "no",
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        **overrides,
    )


def run_variant(args, name: str, seed: int, natural: torch.nn.Module, data) -> dict:
    label, overrides = VARIANTS[name]
    overrides = dict(overrides)
    if overrides.get("awp_gamma"):
        overrides["awp_warmup_epochs"] = args.awp_warmup_epochs
    training_args = training_arguments(args, name, seed, args.epochs, args.learning_rate, overrides, True)
    timer = EpochTimer()
    trainer = CURETrainer(
        copy.deepcopy(natural), training_args, train_dataset=data["train"], eval_dataset=data["test"], callbacks=[timer]
    )
    trainer.train()
    steps = args.eval_pgd_steps
    epochs = [
        {
            "epoch": e["epoch"],
            "clean": e["eval_accuracy"],
            "pgd": e[f"eval_pgd{steps}_accuracy"],
            "robust": e["eval_robust_accuracy"],
        }
        for e in trainer.state.log_history
        if "eval_robust_accuracy" in e
    ]
    overfitting = trainer.robust_overfitting_summary()["eval_robust_accuracy"]
    aa_args = copy.copy(training_args)
    aa_args.eval_attacks, aa_args.eval_max_examples = "clean,autoattack", args.autoattack_examples
    trainer.args = aa_args
    aa = trainer.evaluate(metric_key_prefix="aa")  # the weight average when WA is on, as every evaluation
    row = {
        "variant": name,
        "label": label,
        "seed": seed,
        "clean": epochs[-1]["clean"],
        "pgd": epochs[-1]["pgd"],
        "autoattack": aa["aa_autoattack_accuracy"],
        "n_autoattack": int(aa["aa_n_examples"]),
        "best_robust": overfitting["best"],
        "last_robust": overfitting["last"],
        "best_minus_last": overfitting["gap"],
        "seconds_per_epoch": statistics.mean(timer.seconds),
        "epoch_seconds": timer.seconds,
        "epochs": epochs,
        "n_eval": len(data["test"]),
    }
    logger.info("%s seed %d: %s", name, seed, {k: row[k] for k in METRICS})
    return row


def natural_stage(args, seed: int, data, num_classes: int):
    torch.manual_seed(seed)
    model = create_model(args.model, num_classes, image_size=args.image_size)
    training_args = training_arguments(
        args, "natural", seed, args.natural_epochs, args.natural_learning_rate, {"adv_method": "clean"}, False
    )
    trainer = CURETrainer(model, training_args, train_dataset=data["train"], eval_dataset=data["test"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    return model, {
        "seed": seed,
        "clean": metrics["eval_accuracy"],
        "pgd": metrics[f"eval_pgd{args.eval_pgd_steps}_accuracy"],
        "seconds": seconds,
    }


def summarize(rows: List[dict], variants: List[str]) -> List[dict]:
    summary = []
    for name in variants:
        runs = [r for r in rows if r["variant"] == name]
        entry = {"variant": name, "label": VARIANTS[name][0]}
        for key in METRICS:
            values = [r[key] for r in runs]
            entry[key] = {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
        summary.append(entry)
    return summary


def markdown_table(summary: List[dict], args, n_autoattack: int) -> str:
    steps = args.eval_pgd_steps

    def cell(entry, key, scale=100.0, digits=1):
        m, s = entry[key]["mean"] * scale, entry[key]["std"] * scale
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    header = [
        "variant",
        "clean",
        f"PGD-{steps}",
        f"AutoAttack (first {n_autoattack})",
        f"best PGD-{steps}",
        f"last PGD-{steps}",
        "best − last",
        "s / epoch",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in summary:
        lines.append(
            "| "
            + " | ".join(
                [
                    e["label"],
                    cell(e, "clean"),
                    cell(e, "pgd"),
                    cell(e, "autoattack"),
                    cell(e, "best_robust"),
                    cell(e, "last_robust"),
                    cell(e, "best_minus_last"),
                    cell(e, "seconds_per_epoch", 1.0, 1),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot(summary: List[dict], rows: List[dict], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for e in summary:
        left.errorbar(
            100 * e["clean"]["mean"],
            100 * e["autoattack"]["mean"],
            xerr=100 * e["clean"]["std"],
            yerr=100 * e["autoattack"]["std"],
            fmt="o",
            capsize=3,
            label=e["label"],
        )
    left.set_xlabel("clean accuracy (%)")
    left.set_ylabel("AutoAttack accuracy (%)")
    left.set_title("final model (mean ± std over seeds)")
    left.legend(fontsize=8)
    for e in summary:
        runs = [r for r in rows if r["variant"] == e["variant"]]
        length = min(len(r["epochs"]) for r in runs)
        epochs = [runs[0]["epochs"][i]["epoch"] for i in range(length)]
        robust = [100 * statistics.mean(r["epochs"][i]["robust"] for r in runs) for i in range(length)]
        right.plot(epochs, robust, marker="o", label=e["label"])
    right.set_xlabel("epoch")
    right.set_ylabel("PGD robust accuracy (%)")
    right.set_title("robust accuracy per epoch (mean over seeds)")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    args.work_dir = args.work_dir or os.path.join(args.output_dir, "runs")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    threads = use_available_cpu_threads(args.cpu_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    wall = time.perf_counter()
    rows, naturals = [], []
    for seed in seeds:
        data, num_classes = load_image_dataset(
            "digits",
            image_size=args.image_size,
            seed=seed,
            max_train_samples=args.max_train_examples,
            max_eval_samples=args.max_eval_examples,
        )
        natural, natural_row = natural_stage(args, seed, data, num_classes)
        naturals.append(natural_row)
        logger.info("stage 0, seed %d: %s", seed, natural_row)
        rows.extend(run_variant(args, name, seed, natural, data) for name in variants)
    wall = time.perf_counter() - wall

    summary = summarize(rows, variants)
    n_autoattack = rows[0]["n_autoattack"]
    table = markdown_table(summary, args, n_autoattack)
    natural_pgd = statistics.mean(n["pgd"] for n in naturals)
    command = "python recipes/ablation_wa_awp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (
        f"digits ({rows[0]['n_eval']} test images, {args.image_size}x{args.image_size}), model {args.model}, "
        f"L-inf eps {args.epsilon}; training attack {args.attack_steps} steps of {args.attack_step_size}; stage 0: "
        f"{args.natural_epochs:g} natural epochs (its PGD-{args.eval_pgd_steps} accuracy at this eps: "
        f"{100 * natural_pgd:.1f}%), then {args.epochs:g} epochs per variant (SGD lr {args.learning_rate}, cosine); "
        f"AWP from epoch {args.awp_warmup_epochs:g}; seeds {args.seeds}; mean ± std in percent (seconds for s / epoch, "
        f"training only, {threads} thread{'s' if threads > 1 else ''}); total wall time {wall / 60:.1f} min.\n\nCommand: `{command.strip()}`"
    )
    with open(os.path.join(args.output_dir, "ablation_wa_awp.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + setup + "\n")
    with open(os.path.join(args.output_dir, "ablation_wa_awp.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "summary": summary,
                "runs": rows,
                "natural": naturals,
                "settings": vars(args),
                "wall_seconds": wall,
                "command": command.strip(),
            },
            f,
            indent=2,
        )
    path = plot(
        summary,
        rows,
        os.path.join(args.output_dir, "ablation_wa_awp.png"),
        f"digits / {args.model}, eps {args.epsilon}: WA and AWP on CURE and TRADES",
    )
    print("\n" + table + "\n\n" + setup + f"\nwritten: {args.output_dir}/ablation_wa_awp.md, .json, {path}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
