#!/usr/bin/env python
"""Adversarially train an image classifier with CURE (or TRADES, PGD-AT, MART, FGSM-RS) and report
clean and robust accuracy.

    accelerate launch recipes/train_vit.py                       # embedded digits, tiny ViT, ~minutes on CPU
    accelerate launch recipes/train_vit.py recipes/configs/digits_vit.yaml
    accelerate launch recipes/train_vit.py --model_name_or_path hf-hub:timm/vit_small_patch16_224.augreg_in21k \
        --pretrained --dataset_name uoft-cs/cifar10 --image_size 224 --patch_size 16 --output_dir outputs/vit_cifar

Any flag of CURETrainingArguments / TrainingArguments works (``--adv_method trades --epsilon 4/255``),
or one YAML/JSON file as the only argument. With ``--natural_epochs N`` the recipe first trains
naturally (stage 0, spec section 5), then runs the adversarial method from those weights with a fresh
optimizer; the revision model starts as a copy of the stage-0 weights.
"""
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import transformers
from transformers import HfArgumentParser, set_seed

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import load_image_dataset, set_preprocessing
from cure_hf.models import create_model

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="test_vit",
        metadata={"help": "timm name, 'hf-hub:<id>', 'local-dir:<dir>' or a folder saved by cure_hf."},
    )
    pretrained: bool = field(default=False, metadata={
        "help": "Load pretrained weights of a timm name (needs the Hub); a folder (e.g. a stage-0 output_dir), "
                "'local-dir:' or 'hf-hub:' source always loads its weights."})
    image_size: int = field(default=32, metadata={"help": "Input resolution; ViTs are adapted to it."})
    patch_size: Optional[int] = field(default=8, metadata={"help": "ViT patch size (None keeps the model's)."})


@dataclass
class DataTrainingArguments:
    dataset_name: str = field(
        default="digits",
        metadata={"help": "'digits' (embedded, no network), a Hub dataset id, or 'imagefolder' with --train_dir."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_dir: Optional[str] = field(default=None, metadata={"help": "imagefolder: training images."})
    test_dir: Optional[str] = field(default=None, metadata={"help": "imagefolder: test images."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Image column (auto: image/img)."})
    label_column: Optional[str] = field(default=None, metadata={"help": "Label column (auto: label/labels)."})
    augment: str = field(default="none", metadata={"help": "'none' or 'crop_flip' (4-pixel pad crop + flip)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the test set."})


@dataclass
class NaturalStageArguments:
    """Stage 0 (spec section 5): natural training before the adversarial method, with its own optimizer."""

    natural_epochs: float = field(default=0.0, metadata={"help": "Natural epochs before the method (0: none)."})
    natural_optim: str = field(default="adamw_torch", metadata={"help": "Stage-0 optimizer."})
    natural_learning_rate: float = field(default=5e-3, metadata={"help": "Stage-0 learning rate."})


# The default run: embedded digits, a tiny ViT, natural stage then CURE; minutes on 2 CPU cores.
RECIPE_DEFAULTS = dict(
    output_dir="outputs/train_vit",
    adv_method="cure",
    natural_epochs=30,
    num_train_epochs=10,
    per_device_train_batch_size=64,
    per_device_eval_batch_size=180,
    learning_rate=0.05,
    lr_scheduler_type="cosine",
    warmup_steps=0,
    logging_steps=10,
    eval_strategy="no",
    save_strategy="no",
    report_to="none",
    seed=0,
)


def parse_arguments(argv):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, NaturalStageArguments, CURETrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        values = dict(RECIPE_DEFAULTS)
        values.update(_read_config(os.path.abspath(argv[0])))
        return parser.parse_dict(values)
    parser.set_defaults(**RECIPE_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def _read_config(path):
    import yaml

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)


def train_stage(model, args, data, name, dataset_name):
    trainer = CURETrainer(model, args, train_dataset=data["train"], eval_dataset=data["test"])
    embedded = dataset_name == "digits"
    trainer.card_overrides = {
        "dataset": "scikit-learn digits, 32x32x3 (embedded)" if embedded else dataset_name,
        "dataset_id": None if embedded or dataset_name == "imagefolder" else dataset_name,
    }
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    metrics = trainer.evaluate()
    metrics["train_seconds"] = seconds
    trainer.log_metrics(name, metrics)
    return trainer, metrics


def main(argv=None):
    model_args, data_args, stage_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    data, num_classes = load_image_dataset(
        data_args.dataset_name, image_size=model_args.image_size, augment=data_args.augment,
        config_name=data_args.dataset_config_name, train_dir=data_args.train_dir, test_dir=data_args.test_dir,
        train_split=data_args.train_split, test_split=data_args.test_split,
        image_column=data_args.image_column, label_column=data_args.label_column,
        max_train_samples=data_args.max_train_samples, max_eval_samples=data_args.max_eval_samples,
        seed=training_args.seed,
    )
    # A folder (e.g. a stage-0 output_dir) or hub id carries weights: load them unless told otherwise.
    model = create_model(
        model_args.model_name_or_path, num_classes, pretrained=model_args.pretrained or None,
        image_size=model_args.image_size, patch_size=model_args.patch_size,
    )
    set_preprocessing(data, model)  # pixels as the model's own preprocessing (and its saved folder) make them

    results = {}
    if stage_args.natural_epochs > 0 and training_args.adv_method != "clean":
        natural_args = replace(
            training_args, adv_method="clean", num_train_epochs=stage_args.natural_epochs,
            optim=stage_args.natural_optim, learning_rate=stage_args.natural_learning_rate, max_steps=-1,
            output_dir=os.path.join(training_args.output_dir, "stage0_natural"), push_to_hub=False,
        )
        _, results["natural"] = train_stage(model, natural_args, data, "stage0_natural", data_args.dataset_name)

    trainer, results[training_args.adv_method] = train_stage(model, training_args, data, training_args.adv_method, data_args.dataset_name)
    trainer.save_model()

    if trainer.is_world_process_zero():
        steps = training_args.eval_pgd_steps
        print("\n" + "=" * 64)
        print(f"{'stage':<18}{'clean acc':>12}{f'PGD-{steps} acc':>14}{'train s':>10}")
        for stage, m in results.items():
            print(f"{stage:<18}{m['eval_accuracy']:>12.4f}{m[f'eval_pgd{steps}_accuracy']:>14.4f}{m['train_seconds']:>10.1f}")
        print(f"eps = {training_args.resolved_eval_epsilon:.5f} (L-inf, pixels in [0, 1]); "
              f"{results[training_args.adv_method]['eval_n_examples']} test examples; model saved to {training_args.output_dir}")
        print("=" * 64)
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return results


if __name__ == "__main__":
    main()
