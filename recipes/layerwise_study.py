#!/usr/bin/env python
"""The layer-wise study of the CURE paper (section 3): adversarial training that updates only some blocks.

    python recipes/layerwise_study.py                                   # embedded digits, tiny ResNet, CPU
    python recipes/layerwise_study.py --settings U-all,U-1,U-23,U-234 --reinit
    python recipes/layerwise_study.py --model cifar_resnet18 --dataset_name uoft-cs/cifar10 --augment crop_flip \\
        --natural_epochs 100 --epochs 100 --output_dir outputs/layerwise_cifar10

A naturally trained network (stage 0, trained here, or ``--natural_model <folder>``) is adversarially
trained once per setting: ``U-23`` updates the second and third residual stages (and the classifier head,
unless ``--freeze_head``) and freezes the rest bit for bit (weights and BatchNorm statistics); with
``--reinit`` the updated blocks are re-initialised first. Writes ``layerwise.md``, ``layerwise.json``.
A YAML/JSON file of these flags given first (or as ``--config FILE``) works too; flags after it override it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from typing import List

import torch

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import load_image_dataset, set_preprocessing
from cure_hf.layerwise import freeze_for_setting, model_blocks, reinitialize_blocks
from cure_hf.models import create_model
from cure_hf.parser import ConfigArgumentParser
from cure_hf.runtime import use_available_cpu_threads

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ConfigArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--settings",
        default="U-all,U-1,U-2,U-3,U-4,U-23,U-234",
        help="comma-separated settings: U-<stage numbers> or U-all",
    )
    parser.add_argument("--method", default="pgd", help="adversarial method of every setting (pgd, trades, cure, ...)")
    parser.add_argument("--reinit", action="store_true", help="re-initialise the updated blocks before training")
    parser.add_argument("--freeze_head", action="store_true", help="freeze the classifier head too (default: trained)")
    parser.add_argument("--dataset_name", default="digits")
    parser.add_argument("--train_dir", default=None)
    parser.add_argument("--test_dir", default=None)
    parser.add_argument("--augment", default="none", help="'none' or 'crop_flip'")
    parser.add_argument("--model", default="test_resnet", help="timm name")
    parser.add_argument("--natural_model", default=None, help="a saved stage-0 folder instead of training one here")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--natural_epochs", type=float, default=8)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--attack_steps", type=int, default=5)
    parser.add_argument("--max_eval_examples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu_threads",
        type=int,
        default=0,
        help="torch threads on a machine without GPU: 0 = every core available, N pins N",
    )
    parser.add_argument("--output_dir", default="outputs/layerwise_study")
    return parser.parse_args_and_config(argv)[0]


def train_and_evaluate(model, args, name: str, data, **overrides) -> dict:
    training_args = CURETrainingArguments(
        output_dir=os.path.join(args.output_dir, name),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        lr_scheduler_type="cosine",
        attack_steps=args.attack_steps,
        eval_attacks="clean,pgd20",
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        **overrides,
    )
    trainer = CURETrainer(model, training_args, train_dataset=data["train"], eval_dataset=data["test"])
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    metrics = trainer.evaluate()
    return {
        "clean": metrics["eval_accuracy"],
        "pgd20": metrics["eval_pgd20_accuracy"],
        "train_seconds": seconds,
        "n_eval": int(metrics["eval_n_examples"]),
    }


def markdown_table(rows: List[dict]) -> str:
    lines = ["| setting | updated blocks | trainable params | clean acc | PGD-20 acc |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {', '.join(r['trainable'])} | {100 * r['trainable_fraction']:.1f}% | "
            f"{100 * r['clean']:.2f} | {100 * r['pgd20']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    # accelerate launch writes OMP_NUM_THREADS=1 on a machine without GPU; a CPU run takes every core instead
    logger.info("torch threads: %d", use_available_cpu_threads(args.cpu_threads))
    os.makedirs(args.output_dir, exist_ok=True)
    data, num_classes = load_image_dataset(
        args.dataset_name,
        image_size=args.image_size,
        augment=args.augment,
        train_dir=args.train_dir,
        test_dir=args.test_dir,
        max_eval_samples=args.max_eval_examples,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    rows = []
    if args.natural_model:
        natural = create_model(args.natural_model, num_classes, pretrained=None, image_size=args.image_size)
        set_preprocessing(data, natural)
    else:
        natural = create_model(args.model, num_classes, image_size=args.image_size)
        set_preprocessing(data, natural)
        result = train_and_evaluate(
            natural,
            args,
            "stage0_natural",
            data,
            adv_method="clean",
            num_train_epochs=args.natural_epochs,
            learning_rate=0.1,
        )
        rows.append({"setting": "natural (stage 0)", "trainable": ["all"], "trainable_fraction": 1.0, **result})
    logger.info("blocks: %s", model_blocks(natural))
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        model = copy.deepcopy(natural)
        trainable = freeze_for_setting(model, setting, train_head=not args.freeze_head)
        if args.reinit:
            reinitialize_blocks(model, [b for b in trainable if b != "head"], seed=args.seed)
        total = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        result = train_and_evaluate(
            model,
            args,
            setting,
            data,
            adv_method=args.method,
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
        )
        rows.append(
            {
                "setting": setting + (" (re-init)" if args.reinit else ""),
                "trainable": trainable,
                "trainable_fraction": n_trainable / total,
                **result,
            }
        )
        logger.info("%s: %s", setting, rows[-1])
    table = markdown_table(rows)
    note = (
        f"{args.dataset_name}, {args.natural_model or args.model}; {args.method} for {args.epochs:g} epochs per "
        f"setting from the natural weights; PGD-20 at eps 8/255 on {rows[-1]['n_eval']} test examples"
    )
    with open(os.path.join(args.output_dir, "layerwise.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n\n" + note + "\n")
    with open(os.path.join(args.output_dir, "layerwise.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "setup": vars(args)}, f, indent=2)
    print("\n" + table + "\n\n" + note)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
