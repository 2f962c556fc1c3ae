"""`cure-hf evaluate` / `cure-hf plot-history` on a checkpoint folder CURETrainer saved."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cure_hf.cli import main
from cure_hf.data import collate_pixels

from conftest import make_tiny_model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits):
    """A 4-step FGSM-RS run with one evaluation, saved by the trainer at step 4: (run dir, checkpoint, trainer)."""
    from cure_hf import CURETrainer, CURETrainingArguments

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("cli") / "run"
    args = CURETrainingArguments(
        output_dir=str(run), adv_method="fgsm_rs", max_steps=4, per_device_train_batch_size=16, learning_rate=0.05,
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=4, eval_attacks="clean,pgd2",
        eval_pgd_steps=2, eval_max_examples=8, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=digits["train"].select(range(64)),
                          eval_dataset=digits["test"])
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
        command + ["evaluate", "--model", str(checkpoint), "--dataset", "digits",
                   "--attacks", "clean,pgd5,cw,autoattack", "--autoattack-version", "custom",
                   "--autoattack-attacks", "apgd-ce", "--n-examples", "16", "--eps", "8/255", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
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
    assert main(["evaluate", "--model", str(checkpoint), "--attacks", "clean,pgd3", "--n-examples", "8",
                 "--eps", "0,4/255,8/255", "--output", str(tmp_path / "sweep.json"), "--plot", str(plot)]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [round(r["eps"] * 255) for r in sweep["runs"]] == [0, 4, 8] and plot.stat().st_size > 5000
    accuracies = [r["metrics"]["pgd3_accuracy"] for r in sweep["runs"]]
    assert accuracies[0] == sweep["runs"][0]["metrics"]["accuracy"]
    assert main(["plot-history", str(run), "--output", str(tmp_path / "history.png")]) == 0
    assert (tmp_path / "history.png").stat().st_size > 5000
    capsys.readouterr()
    assert main(["evaluate", "--model", str(checkpoint), "--attacks", "clean,fgsm"]) == 2
    assert "fgsm" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "missing"), "--attacks", "clean"]) == 2
    assert main(["evaluate", "--model", str(checkpoint), "--eps", "8"]) == 2  # not a pixel size in [0, 1]
    assert "8/255" in capsys.readouterr().err
