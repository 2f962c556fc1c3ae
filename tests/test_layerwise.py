"""The layer-wise study: blocks by name, settings such as U-23, frozen blocks bit-identical through training."""

import pytest
import torch
from conftest import make_tiny_model

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.layerwise import (
    block_of,
    freeze_for_setting,
    model_blocks,
    parameter_blocks,
    parse_setting,
    reinitialize_blocks,
)


def test_blocks_of_resnet_and_vit():
    resnet = make_tiny_model("test_resnet")
    assert model_blocks(resnet) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert block_of("model.layer3.0.conv1.weight") == "layer3"
    assert block_of("module.model.fc.weight") == "head"
    vit = make_tiny_model("test_vit")
    blocks = model_blocks(vit)
    assert blocks[0] == "stem" and blocks[-2:] == ["neck", "head"] and "blocks.0" in blocks
    assert parameter_blocks(vit)["model.cls_token"] == "stem"


def test_parse_setting():
    model = make_tiny_model("test_resnet")
    assert parse_setting("U-1", model) == ["layer1"]
    assert parse_setting("U-234", model) == ["layer2", "layer3", "layer4"]
    assert parse_setting("stem,layer4", model) == ["stem", "layer4"]
    assert parse_setting("U-all", model) == model_blocks(model)
    with pytest.raises(ValueError, match="stage numbers 1..4"):
        parse_setting("U-5", model)
    with pytest.raises(ValueError, match="unknown blocks"):
        parse_setting("layer9", model)


def test_frozen_blocks_stay_bit_identical_through_adversarial_training(digits, tmp_path):
    model = make_tiny_model("test_resnet")
    trainable = freeze_for_setting(model, "U-23")
    assert trainable == ["layer2", "layer3", "head"]
    blocks = parameter_blocks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = CURETrainingArguments(
        output_dir=str(tmp_path),
        adv_method="pgd",
        max_steps=2,
        per_device_train_batch_size=16,
        attack_steps=1,
        learning_rate=0.1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
    )
    CURETrainer(model, args, train_dataset=digits["train"].select(range(32))).train()
    after = model.state_dict()
    changed = set()
    for key, value in before.items():
        if key.endswith("num_batches_tracked"):
            continue
        block = blocks.get(key) or blocks.get(key.rsplit(".", 1)[0] + ".weight")
        if block in (None, "head") and key in ("mean", "std"):
            continue
        same = torch.equal(value, after[key])
        if block in ("stem", "layer1", "layer4"):
            assert same, f"frozen {key} ({block}) changed"
        elif not same:
            changed.add(block)
    assert {"layer2", "layer3", "head"} <= changed  # the updated blocks did move


def test_reinitialize_only_the_named_blocks():
    model = make_tiny_model("test_resnet")
    blocks = parameter_blocks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert reinitialize_blocks(model, ["layer4"], seed=1) > 0
    for name, parameter in model.named_parameters():
        if blocks[name] == "layer4" and name.endswith("conv1.weight"):
            assert not torch.equal(before[name], parameter)
        elif blocks[name] != "layer4":
            assert torch.equal(before[name], parameter)
    with pytest.raises(ValueError, match="not blocks of this model"):
        reinitialize_blocks(model, ["layer7"])
