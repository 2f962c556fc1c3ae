"""The WA/AWP recipes (CIFAR-10 ResNet-18 and WRN-34-10, CURE and TRADES) and the robust-ViT fine-tuning recipe:
each parses, carries the published settings its comments cite, and builds its trainer offline (models built with
pretrained=False); the ablation script runs end to end on a sliver of the digits."""

import glob
import json
import os
import sys

import pytest
import torch
import yaml

from cure_hf import CURETrainer

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
CONFIGS = sorted(glob.glob(os.path.join(RECIPES, "configs", "*_wa_awp.yaml")))
VIT_CONFIGS = sorted(glob.glob(os.path.join(RECIPES, "configs", "robust_vit", "*.yaml")))
sys.path.insert(0, RECIPES)
import train_vit  # noqa: E402


def _read(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _architecture(values) -> str:
    """The timm name the config trains: its own, or its stage-0 config's when it starts from a stage-0 folder."""
    name = values["model_name_or_path"]
    if name.startswith("./"):
        stage0 = [
            c
            for c in glob.glob(os.path.join(RECIPES, "configs", "*.yaml"))
            if _read(c).get("output_dir") == name.removeprefix("./")
        ]
        assert len(stage0) == 1, f"no config writes the stage-0 folder {name}"
        name = _read(stage0[0])["model_name_or_path"]
    return name


@pytest.fixture(scope="module")
def digits_data():
    from cure_hf.data import load_image_dataset

    data, _ = load_image_dataset("digits", image_size=32, max_train_samples=8, max_eval_samples=8, seed=0)
    return data


EXPECTED = {  # file -> (method, AWP gamma, AWP warm-up, from scratch)
    "cifar10_resnet18_cure_wa_awp.yaml": ("cure", 5e-3, 10.0, False),
    "cifar10_wrn34_10_cure_wa_awp.yaml": ("cure", 5e-3, 10.0, False),
    "cifar10_resnet18_trades_wa_awp.yaml": ("trades", 5e-3, 10.0, True),
    "cifar10_wrn34_10_trades_wa_awp.yaml": ("trades", 5e-3, 10.0, True),
}


def test_every_wa_awp_recipe_is_listed():
    assert sorted(os.path.basename(c) for c in CONFIGS) == sorted(EXPECTED)
    assert [os.path.basename(c) for c in VIT_CONFIGS] == ["cifar10_vit_small_trades_wa.yaml"]


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_cifar_recipe_parses_and_builds_its_trainer(config, digits_data, tmp_path):
    from dataclasses import replace

    from cure_hf.models import create_model

    method, gamma, warmup, scratch = EXPECTED[os.path.basename(config)]
    model_args, data_args, stage_args, args = train_vit.parse_arguments([config])
    values = _read(config)
    assert args.adv_method == method and args.weight_averaging_decay == 0.999
    assert args.resolved_awp_gamma == gamma and args.resolved_awp_warmup_epochs == warmup
    # the published optimisation: SGD 0.1, momentum 0.9, wd 5e-4, batch 128, 200 epochs, x0.1 at 100 and 150
    assert (args.learning_rate, args.resolved_sgd_momentum, args.weight_decay) == (0.1, 0.9, 5e-4)
    assert args.per_device_train_batch_size == 128 and args.num_train_epochs == 200
    assert args.lr_step_milestones == [100.0, 150.0] and (args.epsilon, args.attack_steps) == (8 / 255, 10)
    assert values["model_name_or_path"].startswith("./") != scratch and stage_args.natural_epochs == 0
    if method == "cure" and "wrn" in config:
        assert (args.conserve_fraction, args.clean_weight, args.consistency_weight) == (0.5, 0.3, 0.5)
    model = create_model(_architecture(values), 10, image_size=model_args.image_size)
    args = replace(args, output_dir=str(tmp_path), dataloader_num_workers=0, use_cpu=True)
    trainer = CURETrainer(model, args, train_dataset=digits_data["train"], eval_dataset=digits_data["test"])
    trainer.create_optimizer_and_scheduler(num_training_steps=200)
    assert trainer.awp is not None and trainer.awp.gamma == gamma
    assert trainer.weight_average is not None and trainer.weight_average.decay == 0.999
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.MultiStepLR)


def test_vit_recipe_follows_the_robust_vit_practice_and_builds_offline(digits_data, tmp_path):
    from dataclasses import replace

    from cure_hf.models import create_model

    model_args, data_args, stage_args, args = train_vit.parse_arguments([VIT_CONFIGS[0]])
    assert model_args.pretrained and "vit_small_patch16_224" in model_args.model_name_or_path
    assert (model_args.image_size, model_args.patch_size) == (32, 4)
    assert args.adv_method == "trades" and str(getattr(args.optim, "value", args.optim)) == "adamw_torch"
    assert args.learning_rate < 1e-3 and args.weight_decay == 0.5 and not args.weight_decay_all_parameters
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "cosine_with_min_lr"
    assert args.warmup_steps == 0.25 and args.attack_warmup_epochs == 5 and args.num_train_epochs == 20
    assert args.weight_averaging_decay == 0.999 and args.resolved_awp_gamma is None
    # offline: the architecture without the Hub weights
    name = model_args.model_name_or_path.split(".")[0]
    model = create_model(name, 10, image_size=model_args.image_size, patch_size=model_args.patch_size)
    args = replace(args, output_dir=str(tmp_path), dataloader_num_workers=0, use_cpu=True)
    trainer = CURETrainer(model, args, train_dataset=digits_data["train"], eval_dataset=digits_data["test"])
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    assert isinstance(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, torch.optim.AdamW
    )
    lrs = []
    for _ in range(20):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(args.learning_rate) and lrs.index(max(lrs)) == 5  # warm-up
    assert lrs[-1] > trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.1 * args.learning_rate)  # cosine to min
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups} == {0.5, 0.0}  # biases and norm weights undecayed


def test_ablation_script_runs_end_to_end(tmp_path, one_thread):
    import ablation_wa_awp

    out = tmp_path / "ablation"
    rows = ablation_wa_awp.main(
        [
            "--seeds",
            "0",
            "--variants",
            "cure,cure_wa_awp",
            "--natural_epochs",
            "1",
            "--epochs",
            "1",
            "--max_train_examples",
            "32",
            "--max_eval_examples",
            "16",
            "--autoattack_examples",
            "4",
            "--attack_steps",
            "1",
            "--eval_pgd_steps",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    assert [r["variant"] for r in rows] == ["cure", "cure_wa_awp"]
    for name in ("ablation_wa_awp.md", "ablation_wa_awp.json", "ablation_wa_awp.png"):
        assert (out / name).is_file()
    with open(out / "ablation_wa_awp.json", encoding="utf-8") as f:
        saved = json.load(f)
    summary = {s["variant"]: s for s in saved["summary"]}
    for variant in ("cure", "cure_wa_awp"):
        entry = summary[variant]
        for key in ("clean", "pgd", "autoattack", "best_robust", "last_robust", "best_minus_last", "seconds_per_epoch"):
            assert key in entry and entry[key]["n"] == 1
    with open(out / "ablation_wa_awp.md", encoding="utf-8") as f:
        table = f.read()
    assert "CURE + WA + AWP" in table and "AutoAttack" in table
