"""Recipes: every YAML config parses and builds its trainer; imagefolder data with the paper's augmentation;
the two-stage flow (stage-0 weights, fresh optimizer); the efficient variant; the step schedule."""

import glob
import os
import sys
from dataclasses import replace

import pytest
import torch
import yaml
from conftest import make_tiny_model
from transformers import TrainerCallback

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import load_image_dataset

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
CONFIGS = sorted(glob.glob(os.path.join(RECIPES, "configs", "*.yaml")))
sys.path.insert(0, RECIPES)
import train_vit  # noqa: E402


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A generated imagefolder: 2 classes x 4 asymmetric 32x32 PNGs per split."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            os.makedirs(root / split / label)
            for i in range(4):
                pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8)
                pixels[:, :8] = 255 if label == "cat" else 0  # a left band: flips and crops move it
                Image.fromarray(pixels.numpy()).save(root / split / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_data(image_folder):
    return load_image_dataset(
        "imagefolder", train_dir=str(image_folder / "train"), test_dir=str(image_folder / "test"), augment="crop_flip"
    )


def test_imagefolder_through_datasets_with_the_papers_augmentation(folder_data):
    data, num_classes = folder_data
    assert num_classes == 2 and len(data["train"]) == 8 and len(data["test"]) == 8
    draws = torch.stack([data["train"][0]["pixel_values"] for _ in range(12)])
    assert draws.shape == (12, 3, 32, 32) and draws.min() >= 0 and draws.max() <= 1
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crop / flip at every access
    test_a, test_b = data["test"][0]["pixel_values"], data["test"][0]["pixel_values"]
    assert torch.equal(test_a, test_b)  # no augmentation on the test split
    assert set(int(data["train"][i]["labels"]) for i in range(8)) == {0, 1}


def _read(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _architecture(config_path: str, values: dict) -> str:
    name = values["model_name_or_path"]
    if name.startswith("./"):  # stage 1: the stage-0 run's architecture
        stage0 = [c for c in CONFIGS if _read(c).get("output_dir") == name.removeprefix("./")]
        assert len(stage0) == 1, f"{config_path}: no config writes its stage-0 folder {name}"
        name = _read(stage0[0])["model_name_or_path"]
    return name


_MODELS = {}


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if not c.endswith("digits_vit.yaml")], ids=lambda c: os.path.basename(c)
)
def test_config_parses_and_builds_its_trainer(config, folder_data, tmp_path):
    from cure_hf.models import create_model

    model_args, data_args, stage_args, training_args = train_vit.parse_arguments([config])
    with open(config, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    assert training_args.adv_method == values["adv_method"] and data_args.augment == "crop_flip"
    assert data_args.dataset_name in ("uoft-cs/cifar10", "uoft-cs/cifar100", "ufldl-stanford/svhn")
    assert training_args.lr_step_milestones == [100.0, 150.0] and training_args.num_train_epochs == 200
    if training_args.adv_method == "cure":
        assert 0 < training_args.conserve_fraction < 1 and training_args.revision_rate == 0.2
    assert stage_args.natural_epochs == 0  # stage 0 is its own config, or the efficient variant's warm-up
    num_classes = 100 if "cifar100" in data_args.dataset_name else 10
    arch = _architecture(config, values)
    if (arch, num_classes) not in _MODELS:
        _MODELS[(arch, num_classes)] = create_model(arch, num_classes, image_size=model_args.image_size)
    data, _ = folder_data
    args = replace(training_args, output_dir=str(tmp_path), dataloader_num_workers=0, use_cpu=True)
    trainer = CURETrainer(_MODELS[(arch, num_classes)], args, train_dataset=data["train"], eval_dataset=data["test"])
    trainer.create_optimizer_and_scheduler(num_training_steps=200)
    scheduler = trainer.lr_scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert sorted(scheduler.milestones) == [100, 150]  # 8 images, batch 128: one step per epoch
    assert trainer.optimizer.param_groups[0]["lr"] == training_args.learning_rate


class _Record(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.lrs, self.snapshots = trainer, [], {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        self.snapshots[state.global_step] = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}


def test_two_stage_flow_loads_stage0_weights_with_a_fresh_optimizer(image_folder, tmp_path, monkeypatch):
    import safetensors.torch

    common = dict(
        model_name_or_path="test_resnet",
        dataset_name="imagefolder",
        train_dir=str(image_folder / "train"),
        test_dir=str(image_folder / "test"),
        augment="crop_flip",
        natural_epochs=0,
        max_steps=2,
        per_device_train_batch_size=4,
        eval_attacks="clean,pgd2",
        eval_pgd_steps=2,
        logging_steps=1,
        lr_scheduler_type="constant",
        disable_tqdm=True,
        use_cpu=True,
    )
    stage0_dir, stage1_dir = tmp_path / "stage0", tmp_path / "stage1"
    for path, values in (
        (tmp_path / "stage0.yaml", dict(common, adv_method="clean", output_dir=str(stage0_dir))),
        (
            tmp_path / "stage1.yaml",
            dict(
                common,
                model_name_or_path=str(stage0_dir),
                adv_method="cure",
                revision_rate=0.0,
                attack_steps=1,
                learning_rate=0.05,
                output_dir=str(stage1_dir),
            ),
        ),
    ):
        path.write_text(yaml.safe_dump(values))
    train_vit.main([str(tmp_path / "stage0.yaml")])
    saved = safetensors.torch.load_file(str(stage0_dir / "model.safetensors"))

    seen = {}
    original = train_vit.train_stage

    def spying_train_stage(model, *rest, **kwargs):
        seen["entry"] = {k: v.clone() for k, v in model.model.state_dict().items()}
        trainer, metrics = original(model, *rest, **kwargs)
        seen["trainer"] = trainer
        return trainer, metrics

    monkeypatch.setattr(train_vit, "train_stage", spying_train_stage)
    train_vit.main([str(tmp_path / "stage1.yaml")])
    assert set(seen["entry"]) == set(saved)
    assert all(torch.equal(seen["entry"][k], saved[k]) for k in saved)  # stage 1 starts from the stage-0 weights
    trainer = seen["trainer"]
    revision = trainer.revision.module.model.state_dict()
    assert all(
        torch.equal(revision[k], saved[k])
        for k in saved
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    # A fresh optimizer and schedule: its own learning rate from step 1, the step count from 0.
    first = next(e for e in trainer.state.log_history if "learning_rate" in e)
    assert first["learning_rate"] == pytest.approx(0.05) and first["step"] == 1
    assert trainer.state.global_step == 2


def test_efficient_variant_warmup_then_cure_with_step_schedule(digits, tmp_path, monkeypatch):
    import cure_hf.components as trainer_module

    mask_calls = []
    real_mask = trainer_module.mask_gradients_
    monkeypatch.setattr(trainer_module, "mask_gradients_", lambda *a, **k: mask_calls.append(1) or real_mask(*a, **k))
    args = CURETrainingArguments(
        output_dir=str(tmp_path),
        adv_method="cure",
        num_train_epochs=2,
        natural_warmup_epochs=1,
        per_device_train_batch_size=8,
        attack_steps=1,
        revision_rate=0.0,
        lr_step_epochs="1",
        learning_rate=0.1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_drop_last=True,
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=digits["train"].select(range(16)))
    record = _Record(trainer)
    trainer.add_callback(record)
    trainer.train()
    assert record.lrs == pytest.approx([0.1, 0.1, 0.01, 0.01])  # x0.1 at epoch 1 (2 steps per epoch)
    assert len(mask_calls) == 2  # masks only after the switch
    assert trainer._method_start_step == 2
    warm = [e for e in trainer.state.log_history if "loss" in e and e["step"] <= 2]
    cure = [e for e in trainer.state.log_history if "loss" in e and e["step"] > 2]
    assert all("ce_adv" not in e for e in warm) and all("ce_adv" in e for e in cure)
    # The revision model was created from the warmed-up weights (r = 0: never revised since).
    at_switch = record.snapshots[2]
    revision = dict(trainer.revision.module.named_parameters())
    assert all(torch.equal(revision[n], at_switch[n]) for n in revision)
    assert not all(torch.equal(revision[n], p) for n, p in trainer.model.named_parameters())


def test_revision_rate_schedules_decay_from_the_switch(tmp_path):
    args = CURETrainingArguments(
        output_dir=str(tmp_path), revision_rate=0.2, revision_rate_schedule="cosine", report_to="none", use_cpu=True
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args)
    trainer.state.max_steps, trainer._method_start_step = 10, 2
    rates = []
    for step in (2, 6, 10):
        trainer.state.global_step = step
        rates.append(trainer.component("revision").rate())
    assert rates == pytest.approx([0.2, 0.1, 0.0], abs=1e-9)
    trainer.args.revision_rate_schedule = "linear"
    trainer.state.global_step = 4
    assert trainer.component("revision").rate() == pytest.approx(0.2 * 0.75)
    with pytest.raises(ValueError, match="lr_step_epochs"):
        CURETrainingArguments(output_dir=str(tmp_path), lr_step_epochs="150,100", report_to="none")
    with pytest.raises(ValueError, match="natural_warmup_epochs"):
        CURETrainingArguments(output_dir=str(tmp_path), natural_warmup_epochs=2, max_steps=5, report_to="none")


def test_compare_methods_table_and_tradeoff_plot(tmp_path):
    import compare_methods

    args = compare_methods.parse_args(["--autoattack", "--methods", "clean,cure", "--output_dir", str(tmp_path)])
    rows = [
        {"method": "clean", "label": "natural (stage 0)", "clean": 0.99, "pgd20": 0.10, "seconds_per_epoch": 3.0},
        {
            "method": "cure",
            "label": "CURE (released code)",
            "clean": 0.95,
            "pgd20": 0.61,
            "autoattack": 0.5,
            "n_autoattack": 100,
            "seconds_per_epoch": 30.0,
        },
    ]
    table = compare_methods.markdown_table(rows, args).splitlines()
    assert table[0] == "| method | clean acc | PGD-20 acc | AutoAttack acc | seconds / epoch |"
    assert table[2] == "| natural (stage 0) | 99.00 | 10.00 | - | 3.0 |"
    assert table[3] == "| CURE (released code) | 95.00 | 61.00 | 50.00 (n=100) | 30.0 |"
    from cure_hf.plots import plot_robustness_tradeoff

    assert os.path.getsize(plot_robustness_tradeoff(rows, str(tmp_path / "tradeoff.png"))) > 1000
    with pytest.raises(ValueError, match="robust_key"):
        plot_robustness_tradeoff(rows, str(tmp_path / "x.png"), robust_key="pgd10")
    with pytest.raises(SystemExit):
        compare_methods.parse_args(["--methods", "clean,adamw"])


def test_digits_vit_yaml_is_the_default_run_written_out():
    """`train_vit.py recipes/configs/digits_vit.yaml` and `train_vit.py` with no argument train the same way."""
    path = os.path.join(RECIPES, "configs", "digits_vit.yaml")
    from_yaml = train_vit.parse_arguments([path])
    from_defaults = train_vit.parse_arguments([])
    for yaml_args, default_args in zip(from_yaml, from_defaults):
        for key in _read(path):
            if hasattr(yaml_args, key):
                assert getattr(yaml_args, key) == getattr(default_args, key), key
    assert from_yaml[-1].adv_method == "cure" and from_yaml[-1].epsilon == pytest.approx(8 / 255)


# --------------------------------------------------------------------------- command line: config file + flags
def test_train_vit_config_file_then_flags(tmp_path):
    """`train_vit.py CONFIG.yaml --seed 1`: flags win over the file, the file over RECIPE_DEFAULTS and the dataclasses."""
    half = train_vit.RECIPE_DEFAULTS["learning_rate"] / 2  # whatever the recipe's default is, the file's differs
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed": 5,
                "learning_rate": half,
                "attack_steps": 3,
                "output_dir": "x",
                "dataset_config_name": "cropped_digits",
            }
        )
    )
    for argv in (
        [str(config), "--seed", "1", "--attack_steps", "2"],
        ["--seed", "1", "--config", str(config), "--attack_steps", "2"],
    ):
        model_args, data_args, _, training_args = train_vit.parse_arguments(argv)
        assert training_args.seed == 1 and training_args.attack_steps == 2  # the flags
        assert training_args.learning_rate == half and training_args.output_dir == "x"  # the file
        assert data_args.dataset_config_name == "cropped_digits"
        assert training_args.adv_method == train_vit.RECIPE_DEFAULTS["adv_method"]  # the recipe's default
        assert model_args.model_name_or_path == train_vit.RECIPE_DEFAULTS["model_name_or_path"]
        assert training_args.trades_beta == CURETrainingArguments.trades_beta  # the dataclass default
    training_args = train_vit.parse_arguments([str(config)])[-1]
    assert training_args.seed == 5 and training_args.attack_steps == 3


def test_train_vit_refuses_an_unknown_config_key(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("lerning_rate: 0.1\nseed: 0\n")
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown key 'lerning_rate' \(did you mean learning_rate"):
        train_vit.parse_arguments([str(config), "--seed", "1"])


# ------------------------------------------------------------------------------------- resume across stages
def test_plan_resume_picks_the_stage_of_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    stage0 = out / "stage0_natural"
    for folder in (stage0 / "checkpoint-2", stage0 / "checkpoint-10", tmp_path / "elsewhere" / "checkpoint-1"):
        os.makedirs(folder)
    plan = train_vit.plan_resume
    assert plan(None, str(out), True) == (True, None, None)
    assert plan("True", str(out), True) == (True, str(stage0 / "checkpoint-10"), None)  # numeric, not text, order
    assert plan(str(stage0 / "checkpoint-2"), str(out), True) == (True, str(stage0 / "checkpoint-2"), None)
    os.makedirs(out / "checkpoint-3")
    for latest in ("true", True):
        assert plan(latest, str(out), True) == (False, None, str(out / "checkpoint-3"))  # stage 0 is finished
    assert plan(str(out / "checkpoint-3") + "/", str(out), True) == (False, None, str(out / "checkpoint-3") + "/")
    assert plan(str(stage0 / "checkpoint-2"), str(out), True)[0]  # an earlier stage-0 checkpoint still runs it
    with pytest.raises(ValueError, match="neither in .*run .*nor in .*stage0_natural"):
        plan(str(tmp_path / "elsewhere" / "checkpoint-1"), str(out), True)
    assert plan(str(tmp_path / "elsewhere" / "checkpoint-1"), str(out), False) == (
        False,
        None,
        str(tmp_path / "elsewhere" / "checkpoint-1"),
    )  # one stage: any checkpoint is the method's
    with pytest.raises(ValueError, match="is not a folder"):
        plan(str(out / "checkpoint-99"), str(out), True)
    with pytest.raises(ValueError, match="no checkpoint-<step> folder .*save_strategy"):
        plan("True", str(tmp_path / "empty"), True)


class _Crash(Exception):
    pass


def _recording_trainer(steps_run, crash_dir=None, crash_step=None):
    """CURETrainer that records (stage folder, step) of every optimizer step it runs, and dies right after writing
    checkpoint ``crash_step`` in ``crash_dir`` (a killed job)."""

    class RecordAndCrash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append((os.path.basename(args.output_dir), state.global_step))

        def on_save(self, args, state, control, **kwargs):
            if (
                os.path.normpath(args.output_dir) == os.path.normpath(str(crash_dir))
                and state.global_step == crash_step
            ):
                raise _Crash(f"killed after checkpoint-{crash_step} of {crash_dir}")

    class RecordingTrainer(CURETrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(RecordAndCrash())

    return RecordingTrainer


def test_resume_from_checkpoint_across_the_two_stages(tmp_path, monkeypatch, one_thread):
    """Killed in stage 0, resumed (stage 0 from its checkpoint, then the method); killed in the method, resumed
    (stage 0 skipped): every optimizer step runs exactly once, in order."""
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path="test_resnet",
                dataset_name="digits",
                max_train_samples=32,
                max_eval_samples=16,
                per_device_train_batch_size=16,
                natural_epochs=2,
                adv_method="fgsm_rs",
                max_steps=4,
                save_strategy="steps",
                save_steps=2,
                logging_steps=1,
                eval_attacks="clean,pgd2",
                eval_pgd_steps=2,
                output_dir=str(out),
                disable_tqdm=True,
                use_cpu=True,
                dataloader_num_workers=0,
                report_to="none",
            )
        )
    )
    calls, steps_run = [], []
    original = train_vit.train_stage

    def spying_train_stage(model, args, data, name, dataset_name, resume_from_checkpoint=None):
        calls.append((name, resume_from_checkpoint))
        return original(model, args, data, name, dataset_name, resume_from_checkpoint=resume_from_checkpoint)

    monkeypatch.setattr(train_vit, "train_stage", spying_train_stage)
    stage0 = out / "stage0_natural"
    monkeypatch.setattr(train_vit, "CURETrainer", _recording_trainer(steps_run, stage0, 2))
    with pytest.raises(_Crash):
        train_vit.main([str(config)])
    assert steps_run == [("stage0_natural", 1), ("stage0_natural", 2)]
    assert sorted(os.listdir(stage0)) == ["checkpoint-2"] and not (out / "checkpoint-2").exists()

    calls.clear(), steps_run.clear()
    monkeypatch.setattr(train_vit, "CURETrainer", _recording_trainer(steps_run, out, 2))
    with pytest.raises(_Crash):
        train_vit.main([str(config), "--resume_from_checkpoint", "True"])
    # stage 0 from its checkpoint (steps 1 and 2 not rerun), then the method from its start
    assert calls == [("stage0_natural", str(stage0 / "checkpoint-2")), ("fgsm_rs", None)]
    assert steps_run == [("stage0_natural", 3), ("stage0_natural", 4), ("run", 1), ("run", 2)]
    stage0_files = {p: p.stat().st_mtime_ns for p in stage0.rglob("*")}

    calls.clear(), steps_run.clear()
    monkeypatch.setattr(train_vit, "CURETrainer", _recording_trainer(steps_run))
    results = train_vit.main([str(config), "--resume_from_checkpoint", "True"])
    assert calls == [("fgsm_rs", str(out / "checkpoint-2"))]  # stage 0 finished: skipped
    assert steps_run == [("run", 3), ("run", 4)]
    assert list(results) == ["fgsm_rs"] and (out / "model.safetensors").is_file()
    assert {p: p.stat().st_mtime_ns for p in stage0.rglob("*")} == stage0_files  # stage 0 untouched


def test_compare_methods_and_layerwise_study_read_a_config_file(tmp_path):
    import compare_methods
    import layerwise_study

    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"methods": "clean,cure", "epochs": 2, "autoattack": True}))
    args = compare_methods.parse_args([str(config), "--epochs", "3"])
    assert (args.methods, args.epochs, args.autoattack) == ("clean,cure", 3.0, True)  # the flag won for epochs
    assert args.batch_size == compare_methods.parse_args([]).batch_size  # untouched: the script's default
    config.write_text(yaml.safe_dump({"settings": "U-1", "reinit": True, "epochs": "2"}))
    args = layerwise_study.parse_args(["--config", str(config)])
    assert (args.settings, args.reinit, args.epochs) == ("U-1", True, 2.0)  # "2" read by the flag's type
    config.write_text(yaml.safe_dump({"setting": "U-1"}))
    with pytest.raises(ValueError, match=r"unknown key 'setting' \(did you mean settings"):
        layerwise_study.parse_args([str(config)])


def test_cpu_threads_flag_sets_torchs_threads(monkeypatch):
    """`--cpu_threads 1` pins one thread; auto takes the cores available, not a launcher's OMP_NUM_THREADS=1."""
    from cure_hf.runtime import use_available_cpu_threads

    before = torch.get_num_threads()

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop(torch.get_num_threads())

    monkeypatch.setattr(train_vit, "load_image_dataset", stop)  # stop right after the thread setting
    try:
        torch.set_num_threads(2)
        with pytest.raises(Stop) as seen:
            train_vit.main(["--cpu_threads", "1", "--use_cpu", "true", "--output_dir", "unused"])
        assert seen.value.args == (1,) and torch.get_num_threads() == 1
        assert train_vit.parse_arguments([])[0].cpu_threads == 0  # the default: auto

        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
        for key in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION"):
            monkeypatch.delenv(key, raising=False)
        assert use_available_cpu_threads(3) == 3 == torch.get_num_threads()
        assert use_available_cpu_threads() == 4  # auto: every core this process may use
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")  # under accelerate launch ...
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # ... which writes 1 by default: ignored
        assert use_available_cpu_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # any other value was chosen by someone: honoured
        assert use_available_cpu_threads() == 2
        monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a plain python run: OMP_NUM_THREADS=1 is the user's
        assert use_available_cpu_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this node share the cores
        assert use_available_cpu_threads(0) == 2
        with pytest.raises(ValueError, match="cpu_threads"):
            use_available_cpu_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_main_job_grid_runs_every_seed_and_thread_and_summarizes(tmp_path, monkeypatch):
    import json
    import subprocess

    import reproduce_main_job as grid

    # Six runs by hand: final PGD sorted 0.65 0.66 0.68 0.70 0.71 0.72 -> median (0.68 + 0.70) / 2, range 0.07.
    final_pgd = {(0, 1): 0.70, (0, 2): 0.65, (1, 1): 0.72, (1, 2): 0.68, (2, 1): 0.66, (2, 2): 0.71}
    commands = []

    def fake_run(command, env, stdout, stderr, cwd):
        commands.append((command, env["OMP_NUM_THREADS"]))
        seed, threads = int(command[command.index("--seed") + 1]), int(command[command.index("--cpu_threads") + 1])
        out = command[command.index("--output_dir") + 1]
        results = {
            "natural": {"eval_accuracy": 0.98, "eval_pgd20_accuracy": 0.0, "train_seconds": 60.0},
            "cure": {
                "eval_accuracy": 0.97 + 0.001 * seed,
                "eval_pgd20_accuracy": final_pgd[seed, threads],
                "train_seconds": 120.0,
            },
        }
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(grid.subprocess, "run", fake_run)
    report = grid.run_main_job_grid([0, 1, 2], [1, 2], str(tmp_path), extra_args=["--num_train_epochs", "2"])
    assert [(r["seed"], r["threads"]) for r in report["runs"]] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    command, omp = commands[1]
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and omp == "2"
    assert (
        command[command.index("--num_train_epochs") + 1] == "2" and command[command.index("--cpu_threads") + 1] == "2"
    )
    assert command[command.index("--output_dir") + 1] == str(tmp_path / "seed0_threads2")
    summary = report["summary"]
    assert summary["final_pgd"]["median"] == pytest.approx(0.69)
    assert summary["final_pgd"]["range"] == pytest.approx(0.07)
    assert summary["final_clean"]["median"] == pytest.approx(0.971) and summary["final_clean"][
        "range"
    ] == pytest.approx(0.002)
    assert summary["stage0_clean"]["range"] == 0 and summary["stage0_pgd"]["median"] == 0
    with open(tmp_path / "main_job_grid.json") as f:
        assert json.load(f)["summary"]["final_pgd"]["range"] == pytest.approx(0.07)
    table = grid.format_table(report).splitlines()
    assert table[0].split() == [
        "seed",
        "threads",
        "stage-0",
        "clean",
        "stage-0",
        "PGD",
        "final",
        "clean",
        "final",
        "PGD",
        "wall",
        "s",
    ]
    assert table[-2].split()[:5] == ["median", "0.9800", "0.0000", "0.9710", "0.6900"]
    assert table[-1].split()[:5] == ["range", "0.0000", "0.0000", "0.0020", "0.0700"]
    assert grid.summarize([{"final_pgd": None}], ["final_pgd"]) == {"final_pgd": None}


def test_compare_methods_summarizes_the_seeds_as_mean_and_range():
    import compare_methods

    args = compare_methods.parse_args(["--autoattack", "--methods", "clean,cure", "--seeds", "0,1,2"])
    assert args.seed_list == [0, 1, 2]
    runs = []
    for seed, (clean, pgd, aa) in enumerate([(0.90, 0.50, 0.40), (0.92, 0.70, 0.60), (0.94, 0.60, 0.50)]):
        runs.append(
            {
                "method": "clean",
                "label": "natural (stage 0)",
                "seed": seed,
                "clean": 0.98 + 0.005 * seed,
                "pgd20": 0.0,
                "seconds_per_epoch": 1.0 + seed,
            }
        )
        runs.append(
            {
                "method": "cure",
                "label": "CURE (released code)",
                "seed": seed,
                "clean": clean,
                "pgd20": pgd,
                "autoattack": aa,
                "n_autoattack": 100,
                "seconds_per_epoch": 10.0,
            }
        )
    rows = compare_methods.summarize(runs, "pgd20")
    assert [r["method"] for r in rows] == ["clean", "cure"] and rows[1]["seeds"] == [0, 1, 2]
    # by hand: clean (0.90 + 0.92 + 0.94) / 3 = 0.92, PGD (0.5 + 0.7 + 0.6) / 3 = 0.6, AutoAttack 0.5
    table = compare_methods.markdown_table(rows, args).splitlines()
    assert table[2] == "| natural (stage 0) | 98.50 [98.00, 99.00] | 0.00 [0.00, 0.00] | - | 2.0 |"
    assert (
        table[3]
        == "| CURE (released code) | 92.00 [90.00, 94.00] | 60.00 [50.00, 70.00] | 50.00 [40.00, 60.00] (n=100) | 10.0 |"
    )
    for bad in ("a,b", ","):
        with pytest.raises(SystemExit):
            compare_methods.parse_args(["--seeds", bad])


def test_readme_band_checks_each_promise_on_hand_made_runs():
    import reproduce_main_job
    import reproduce_readme

    def runs(stage0_clean=(0.97,) * 6, final_clean=(0.97,) * 6, final_pgd=(0.70,) * 6, stage0_pgd=(0.0,) * 6):
        return [
            {"stage0_clean": a, "final_clean": b, "final_pgd": c, "stage0_pgd": d}
            for a, b, c, d in zip(stage0_clean, final_clean, final_pgd, stage0_pgd)
        ]

    def checks(rows):
        return reproduce_readme.band_checks(reproduce_main_job.summarize(rows), rows)

    assert all(checks(runs()).values())
    # one run below 0.95 clean in stage 0 (0.949), everything else inside
    low = checks(runs(stage0_clean=(0.97, 0.97, 0.949, 0.97, 0.97, 0.97)))
    assert not low["stage0_clean_at_least_0.95_in_every_run"] and low["clean_range_at_most_0.03"]
    # clean range 0.031 > 0.03 (final stage), PGD range 0.05 exactly allowed, 0.051 not
    assert not checks(runs(final_clean=(0.95, 0.981, 0.96, 0.96, 0.96, 0.96)))["clean_range_at_most_0.03"]
    assert checks(runs(final_pgd=(0.70, 0.65, 0.68, 0.68, 0.68, 0.68)))["pgd_range_at_most_0.05"]
    assert not checks(runs(final_pgd=(0.70, 0.649, 0.68, 0.68, 0.68, 0.68)))["pgd_range_at_most_0.05"]
    # CURE must beat the natural model by 0.30 in every run: 0.29 above it in one run fails
    gain = checks(runs(final_pgd=(0.70, 0.70, 0.70, 0.70, 0.70, 0.35), stage0_pgd=(0.0,) * 5 + (0.06,)))
    assert not gain["cure_pgd_at_least_0.30_above_stage0_in_every_run"]


def test_readme_blocks_are_rewritten_only_between_their_markers():
    import reproduce_readme

    text = (
        "intro 1.5\n<!-- numbers:gpu -->\nold 9.9\n<!-- /numbers:gpu -->\noutro\n<!-- numbers:methods -->\n"
        "<!-- /numbers:methods -->\n"
    )
    results = {
        "gpu": {
            "command": "bash benchmarks/gpu_run.sh",
            "epoch_examples": 50000,
            "batch_size": 128,
            "machine": {"gpu": "H100", "torch": "2"},
            "date": "2026-01-01",
            "wall_seconds": None,
            "runs": [
                {
                    "source": "x.json",
                    "steps": 5,
                    "trainer_s_per_step": {
                        c: {m: 0.1 for m in ("cure", "trades", "pgd", "clean")} for c in ("fp32", "fast")
                    },
                    "plain_s_per_step": {
                        c: {m: 0.05 for m in ("cure", "trades", "pgd", "clean")} for c in ("fp32", "fast")
                    },
                }
            ],
        }
    }
    out = reproduce_readme.render_document(text, results)
    assert out.startswith("intro 1.5\n<!-- numbers:gpu -->\n```") and "old 9.9" not in out
    assert "+100.0%" in out and "39.1 s" in out  # 0.1 s / 0.05 s - 1; 0.1 s x 391 steps (50,000 / 128, rounded up)
    assert out.endswith("outro\n<!-- numbers:methods -->\n<!-- /numbers:methods -->\n")  # no results: kept
    with pytest.raises(ValueError, match="unknown numbers block 'speed'"):
        reproduce_readme.render_document("<!-- numbers:speed -->\n<!-- /numbers:speed -->", results)


def test_under_accelerate_launch_the_recipes_use_every_core(tmp_path):
    """accelerate launch writes OMP_NUM_THREADS=1 on a machine without GPU; the recipes' thread setting ignores
    that default and takes every core this process may use (here: as many as the test process may use)."""
    import subprocess

    script = tmp_path / "threads.py"
    script.write_text(
        "import os, torch\nfrom cure_hf.runtime import use_available_cpu_threads\n"
        "print('OMP', os.environ.get('OMP_NUM_THREADS'), 'threads', use_available_cpu_threads(), "
        "torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("ACCELERATE_")}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cores = len(os.sched_getaffinity(0))
    assert f"OMP 1 threads {cores} {cores}" in done.stdout
