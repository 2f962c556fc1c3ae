"""First contact: what a new user hits in the first hour, each fixed where it starts.

- saved files are readable by whoever the umask allows (safetensors writes 0600 by itself);
- a network returning (features, logits) is refused with a fix that trains, saves and loads again;
- the robust-evaluation progress bar leaves no cursor moves in a log file;
- speed_preset="fast" on a CPU does not compile for minutes, and says so.
"""

import json
import logging
import os
import stat
import sys

import pytest
import timm
import torch
import torch.nn as nn
from conftest import make_tiny_model
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from cure_hf import CURETrainer, CURETrainingArguments, load_model
from cure_hf.data import collate_pixels, image_transform, load_digits_dataset
from cure_hf.evaluation import evaluate_robustness
from cure_hf.hub import copy_export, save_pretrained
from cure_hf.models import SelectLogits, create_model


@pytest.fixture(scope="module")
def tiny():
    """16 training and 8 test digits at 16x16 pixels, no augmentation."""
    data = load_digits_dataset()
    train, test = data["train"].select(range(16)), data["test"].select(range(8))
    train.set_transform(image_transform(16, train=True))
    test.set_transform(image_transform(16, train=False))
    return train, test


def _args(output_dir, **overrides):
    fields = dict(
        output_dir=str(output_dir),
        adv_method="pgd",
        max_steps=1,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        eval_pgd_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    fields.update(overrides)
    return CURETrainingArguments(**fields)


# ------------------------------------------------------------------------------------------ permissions
@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one comes back after it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _modes(folder):
    """{relative path: permission bits} of every file and folder under ``folder``."""
    modes = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            modes[os.path.relpath(path, folder)] = stat.S_IMODE(os.stat(path).st_mode)
    return modes


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_files_get_the_permissions_of_the_umask(tmp_path, tiny, umask, mask, file_mode, dir_mode, one_thread):
    umask(mask)
    folder = tmp_path / "saved"
    files = save_pretrained(make_tiny_model("test_resnet"), str(folder))
    assert "model.safetensors" in files
    assert _modes(folder) == {name: file_mode for name in files}
    copied = tmp_path / "copied"
    copy_export(str(folder), str(copied))
    assert set(_modes(copied).values()) == {file_mode}

    # A CURE checkpoint (model, revision model, weight average, optimizer, RNG state...) and the final save.
    run = tmp_path / "run"
    args = _args(run, adv_method="cure", weight_averaging=0.5, save_strategy="steps", save_steps=1)
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=tiny[0])
    trainer.train()
    trainer.save_model()
    checkpoint = _modes(run / "checkpoint-1")
    assert {"model.safetensors", "revision.safetensors", "optimizer.pt"} <= set(checkpoint)
    assert any(
        name.endswith(".safetensors") and name not in ("model.safetensors", "revision.safetensors")
        for name in checkpoint
    ), "the weight average's file"
    wrong = {name: oct(mode) for name, mode in checkpoint.items() if mode != file_mode}
    assert wrong == {}, f"checkpoint files not {oct(file_mode)}"
    assert stat.S_IMODE(os.stat(run / "checkpoint-1").st_mode) == dir_mode
    final = {
        name: oct(mode)
        for name, mode in _modes(run).items()
        if not name.startswith("checkpoint-1") and os.path.isfile(run / name) and mode != file_mode
    }
    assert final == {}, f"files of the final save not {oct(file_mode)}"


# ------------------------------------------------------------------------------------------ tuple outputs
class FeaturesAndLogitsNet(nn.Module):
    """A timm-style network whose forward returns (pooled features, logits), as many research codes do."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8, **kwargs):
        super().__init__()
        self.num_classes, self.num_features = num_classes, width
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return torch.relu(self.bn(self.conv(x)))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward(self, x):
        features = self.forward_head(self.forward_features(x), pre_logits=True)
        return features, self.fc(features)


default_cfgs = generate_default_cfgs(
    {
        "first_contact_features_and_logits": {  # read by register_model
            "num_classes": 10,
            "input_size": (3, 16, 16),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": (0.5, 0.5, 0.5),
            "std": (0.25, 0.25, 0.25),
            "first_conv": "conv",
            "classifier": "fc",
        }
    }
)


@register_model
def first_contact_features_and_logits(pretrained: bool = False, **kwargs):
    return build_model_with_cfg(FeaturesAndLogitsNet, "first_contact_features_and_logits", pretrained, **kwargs)


def test_a_features_and_logits_network_is_refused_with_a_fix_that_trains_saves_and_loads(tmp_path, tiny, one_thread):
    train, test = tiny
    torch.manual_seed(0)
    model = create_model("first_contact_features_and_logits", 10)  # PixelNormalized(FeaturesAndLogitsNet)
    with pytest.raises(
        ValueError,
        match=r"tuple of 2 items.*from cure_hf\.models import SelectLogits; "
        r"model = SelectLogits\(model, index=1\)",
    ) as refused:
        CURETrainer(model, _args(tmp_path / "refused"), train_dataset=train)
    assert "LogitsOnly" not in str(refused.value)

    # what the message says, verbatim: trains one CURE step, checkpoints and saves
    model = SelectLogits(model, index=1)
    args = _args(tmp_path / "run", adv_method="cure", save_strategy="steps", save_steps=1)
    trainer = CURETrainer(model, args, train_dataset=train)
    trainer.train()
    assert os.path.isfile(tmp_path / "run" / "checkpoint-1" / "model.safetensors")
    out = tmp_path / "run" / "final"
    trainer.save_model(str(out))
    with open(out / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["architecture"] == "first_contact_features_and_logits" and config["cure_hf"]["logits_index"] == 1

    pixels = collate_pixels([test[i] for i in range(8)])["pixel_values"]
    model.eval()
    with torch.no_grad():
        expected = model(pixels)
        reloaded = load_model(str(out)).eval()  # the wrapper comes back: the logits alone
        assert torch.equal(reloaded(pixels), expected)
        # timm loads the network as it is (both outputs), with the folder's normalisation
        net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        mean = torch.tensor(net.pretrained_cfg["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(net.pretrained_cfg["std"]).view(1, -1, 1, 1)
        features, logits = net((pixels - mean) / std)
        torch.testing.assert_close(logits, expected)
    # resuming from the checkpoint loads its weights into the wrapped model
    resumed = CURETrainer(
        SelectLogits(create_model("first_contact_features_and_logits", 10), 1),
        _args(tmp_path / "run", adv_method="cure", max_steps=2),
        train_dataset=train,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))


def test_a_wrapper_of_ones_own_is_pointed_to_select_logits(tmp_path, tiny):
    class LogitsOnly(nn.Module):  # what the message used to suggest, which could not be saved
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)[1]

    model = LogitsOnly(create_model("first_contact_features_and_logits", 10))
    with pytest.raises(TypeError, match=r"cannot save a LogitsOnly.*cure_hf\.models\.SelectLogits\(model, index=1\)"):
        CURETrainer(model, _args(tmp_path), train_dataset=tiny[0])


# ------------------------------------------------------------------------------------------------ logs
def test_robust_evaluation_progress_leaves_no_cursor_moves_in_a_log(capsys, tiny):
    from tqdm.auto import tqdm

    model = make_tiny_model("test_resnet").eval()
    batches = [collate_pixels([tiny[1][i] for i in range(j, j + 4)]) for j in (0, 4)]
    assert not sys.stderr.isatty()  # captured: what a log file sees
    outer = tqdm(total=2, desc="training")  # the Trainer's bar, under which evaluation runs
    evaluate_robustness(model, batches, "clean,pgd", steps=1, progress=True)
    outer.update(2)
    outer.close()
    err = capsys.readouterr().err
    assert "training" in err
    assert "\x1b[A" not in err


# ----------------------------------------------------------------------------------------------- speed
def test_fast_preset_on_a_cpu_does_not_compile_and_says_how_to(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cure_hf.speed"):
        args = CURETrainingArguments(output_dir=str(tmp_path), use_cpu=True, speed_preset="fast", report_to="none")
    assert args.torch_compile is False and args.bf16 is False and args.channels_last is False
    assert args.dataloader_drop_last is True and args.logging_nan_inf_filter is False
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "cure_hf.speed")
    assert "speed_preset='fast' on a CPU (use_cpu=True)" in message and "torch_compile=True" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cure_hf.speed"):
        forced = CURETrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, speed_preset="fast", report_to="none", torch_compile=True
        )
    assert forced.torch_compile is True and forced.bf16 is False
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "cure_hf.speed")
    assert "bf16, channels_last left off" in message and "torch_compile" not in message.split("left off")[0]


def test_fast_preset_without_a_gpu_counts_as_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    from cure_hf.speed import _trains_on_cpu

    class Fields:
        use_cpu = False

    assert _trains_on_cpu(Fields()) == "no GPU found"


# ------------------------------------------------------------------------------ arguments of another method
def test_cure_arguments_given_to_trades_switch_on_what_reads_them_or_are_refused(tmp_path):
    """The reported run: TRADES with conservation='hard', conserve_fraction=0.5 and revision_rate=0.9 trained plain
    TRADES without a word. Conservation is a component now: conservation='hard' switches CURE's mask on for TRADES
    (and conserve_fraction is then read); revision_rate is read only by a revision model, which is off: refused."""
    from cure_hf import CURETrainingArguments
    from cure_hf.components import components_for

    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, adv_method="trades")
    with pytest.raises(
        ValueError,
        match=r"revision_rate=0.9 is invalid with adv_method='trades': it is read by the "
        r"revision component, which this run does not use.*revision=True",
    ):
        CURETrainingArguments(conservation="hard", conserve_fraction=0.5, revision_rate=0.9, **common)
    args = CURETrainingArguments(conservation="hard", conserve_fraction=0.5, **common)
    assert "conservation" in [c.name for c in components_for(args)]
    with pytest.raises(ValueError, match="conserve_fraction=0.5 is invalid with adv_method='trades'"):
        CURETrainingArguments(conserve_fraction=0.5, **common)  # the mask is off for TRADES unless switched on


def test_a_cpu_run_does_not_pin_memory(tmp_path):
    """torch warns at every DataLoader that pins memory without an accelerator; pinning only helps copies to a GPU."""
    import warnings

    import torch

    from cure_hf import CURETrainingArguments

    args = CURETrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert args.dataloader_pin_memory is False
    if not torch.cuda.is_available():
        assert CURETrainingArguments(output_dir=str(tmp_path), report_to=[]).dataloader_pin_memory is False
    loader = torch.utils.data.DataLoader(list(range(4)), pin_memory=args.dataloader_pin_memory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(loader)


def test_the_evaluation_docs_name_the_test_metrics_of_a_validation_run():
    import os

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "evaluation.md"), encoding="utf-8").read()
    assert "eval_test_" in text and "eval_validation_" in text
