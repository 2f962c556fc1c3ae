"""The step benchmark (and benchmarks/gpu_run.sh) runs and reports its ratios; the speed paths it
measures keep CURE's semantics.

No timing is asserted here (the CI machine is shared); the benchmark's numbers live in docs/benchmarks.md.
"""

import math
import os
import re
import sys

import numpy as np
import pytest
import torch

from cure_hf.attacks import logits_of, pgd
from cure_hf.prominence import conserve_mask, mask_gradients_, quantile_threshold, quantile_thresholds

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


BLOCKED = ("datasets", "evaluate", "pyautoattack", "autoattack")  # absent on the GPU machine


def test_gpu_run_dry_run_on_cpu_without_datasets(tmp_path):
    """benchmarks/gpu_run.sh end to end in its CPU dry-run mode, with datasets/evaluate/pyautoattack unimportable
    (as on the GPU machine): every job runs, the targets report ends with the TARGET/RATIO lines, the ViT line is
    printed, and $OUT holds at most 6 plain files with plain names, each under 16 MiB."""
    import json
    import subprocess

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in BLOCKED)
    )
    out = tmp_path / "out"
    root = os.path.dirname(BENCHMARKS)
    env = dict(
        os.environ, OUT=str(out), DRY_RUN="1", PYTHONPATH=str(site), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )
    result = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= {"targets.txt", "targets.json", "profiles.txt", "vit.txt", "vit.json", "tests.txt"}, files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).stat().st_size < 16 * 2**20 for f in files)
    text = (out / "targets.txt").read_text()
    assert "FAILED" not in text and "SKIPPED" not in text and "Traceback" not in text, text[-6000:]
    tail = text[text.index("## ratios and targets") :].splitlines()[1:]
    assert tail and all(line.startswith(("RATIO ", "TARGET ")) for line in tail if line.strip()), tail
    for name in (
        "cure_epoch_fast",
        "gpu_busy[plain captured cure]",
        "bf16_speedup[captured]",
        "trainer_overhead[cure fast]",
        "trainer_overhead[pgd fast]",
        "robust_accuracy[fp32 vs preset, 2 seeds]",
    ):
        assert any(line.startswith(f"TARGET {name} = ") for line in tail), name
    assert re.search(r"TARGET trainer_overhead\[pgd fast\] = [-+][\d.]+% \(medians; windows [-+][\d.]+% to ", text)
    # 2 alternating windows per configuration: A B C D E A B C D E
    order = re.findall(r"window (\d)/2 (\S+ \S+)\s+cure ", text)
    assert [w for w, _ in order] == ["1"] * 5 + ["2"] * 5 and [n for _, n in order[:5]] == [n for _, n in order[5:]]
    results = json.loads((out / "targets.json").read_text())
    assert results["failed"] == [] and results["skipped"] == []
    for name in ("trainer fast cure", "plain fast cure", "plain captured cure", "plain captured_fp32 cure"):
        assert len(results["cure"][name]) == 2 and all(math.isfinite(v) and v > 0 for v in results["cure"][name])
    assert results["flops_per_step"]["cure"] > 0
    assert {"natural fp32", "pgd fp32 seed 0", "pgd fast seed 1"} <= set(results["robust"])
    assert "=== profile plain captured cure" in (out / "profiles.txt").read_text()
    vit = (out / "vit.txt").read_text()
    assert re.search(
        r"^VIT test_vit 32x32 batch 2 cure PGD-3 4/255 .*fp32 [\d.]+ img/s.*bf16 .*fast [\d.]+ img/s", vit, re.M
    )
    assert "# bench_vit_b: done" in vit and "Traceback" not in vit, vit[-3000:]


def test_synthetic_task_separates_natural_from_adversarial_training(tmp_path, one_thread):
    """The robust-accuracy check can fail: on the synthetic task natural training (which fits the clean data beyond
    what the robust features allow) has PGD-20 accuracy about 0, and PGD-AT is well above chance and below 100%."""
    sys.path.insert(0, BENCHMARKS)
    try:
        from synthetic_task import RobustTask
    finally:
        sys.path.remove(BENCHMARKS)
    from conftest import make_tiny_model
    from test_speed import _args

    from cure_hf import CURETrainer
    from cure_hf.speed import TensorImageDataset

    task = RobustTask()
    train, (test_x, test_y) = task.sample(2048, seed=1), task.sample(500, seed=2)
    test_x = test_x.permute(0, 3, 1, 2).contiguous()
    accuracy = {}
    for method, epochs in (("clean", 10), ("pgd", 3)):
        args = _args(
            tmp_path / method,
            adv_method=method,
            num_train_epochs=epochs,
            per_device_train_batch_size=64,
            learning_rate=0.05,
            lr_scheduler_type="constant",
            epsilon=task.eps,
            attack_steps=3,
            attack_step_size=task.eps / 2,
        )
        trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=TensorImageDataset(*train))
        trainer.train()
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        attacked = pgd(
            model, test_x, test_y, eps=task.eps, step_size=2 / 255, steps=20, generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            accuracy[method] = [
                (logits_of(model(x)).argmax(1) == test_y).float().mean().item() for x in (test_x, attacked)
            ]
    (natural_clean, natural_pgd), (robust_clean, robust_pgd) = accuracy["clean"], accuracy["pgd"]
    assert natural_clean > task.robust_ceiling + 0.1, accuracy  # it uses the non-robust features
    assert natural_pgd <= 0.05, accuracy
    assert 0.4 <= robust_pgd <= task.robust_ceiling + 0.05 < 1.0, accuracy  # well above chance (0.1), below 100%
    assert robust_clean < natural_clean, accuracy  # the robust model gave the non-robust features up


def test_time_budget_skips_the_tail_and_says_which(capsys):
    sys.path.insert(0, BENCHMARKS)
    try:
        import bench_step
    finally:
        sys.path.remove(BENCHMARKS)
    threads = torch.get_num_threads()
    try:
        results = bench_step.main(
            [
                "--device",
                "cpu",
                "--model",
                "test_resnet",
                "--image-size",
                "16",
                "--batch-size",
                "2",
                "--attack-steps",
                "1",
                "--warmup",
                "1",
                "--steps",
                "1",
                "--methods",
                "cure,pgd",
                "--configs",
                "fp32,bf16",
                "--base-workers",
                "0",
                "--robust-steps",
                "0",
                "--check-entries",
                "1001",
                "--threads",
                "1",
                "--time-budget-s",
                "0.001",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "SKIPPED (time budget): trainer fp32 cure +profile; plain fp32 cure +profile" in out
    assert results["plain"] == {} and "## ratios and targets" in out


def test_quantile_thresholds_batched_equal_one_by_one():
    generator = torch.Generator().manual_seed(0)
    scores = [torch.rand(shape, generator=generator) for shape in [(64,), (64,), (3, 3), (5000,), (64,), (7, 11)]]
    for fraction in (0.0, 0.3, 0.999):
        batched = quantile_thresholds(scores, fraction)
        for score, value in zip(scores, batched):
            assert torch.equal(value, quantile_threshold(score, fraction))
            expected = np.quantile(score.numpy().astype(np.float64), fraction)
            assert value.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_mask_gradients_streams_masks_with_on_mask():
    generator = torch.Generator().manual_seed(1)
    shapes = [(8, 3, 3, 3), (8,), (8,), (16, 8, 1, 1), (8,), (10, 8)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    seen = {}
    returned = mask_gradients_(params, 0.3, on_mask=lambda p, m: seen.__setitem__(id(p), m.clone()))
    assert returned == [None] * len(params)  # nothing kept: the caller consumed them
    assert set(seen) == {id(p) for p in params}
    for p, g in zip(params, grads):
        expected = conserve_mask(g.abs(), 0.3)
        assert torch.equal(seen[id(p)], expected)
        assert torch.equal(p.grad, g.masked_fill(expected, 0.0))


def test_hard_conservation_restores_conserved_entries_and_channels_last(tmp_path):
    from conftest import make_tiny_model

    from cure_hf import CURETrainer, CURETrainingArguments

    args = CURETrainingArguments(
        output_dir=str(tmp_path), conservation="hard", channels_last=True, use_cpu=True, report_to=[], max_steps=1
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args)
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)

    params = trainer.component("conservation").maskable_parameters()
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    scores = [p.grad.abs().clone() for p in params]
    before = [p.detach().clone() for p in params]
    trainer.component("revision").ensure()
    trainer.component("conservation").before_optimizer_step(None)
    with torch.no_grad():  # stands in for an optimizer step that moves every entry (as weight decay does)
        for p in params:
            p.add_(1.0)
    trainer._after_optimizer_step()
    for p, score, old in zip(params, scores, before):
        conserved = conserve_mask(score, args.conserve_fraction)
        assert torch.equal(p.detach()[conserved], old[conserved])  # bit-identical
        assert torch.equal(p.detach()[~conserved], old[~conserved] + 1.0)
    assert trainer.component("conservation")._conserved == []  # the parameter-sized buffer is released after the step


def test_reused_clean_logits_give_the_same_attack_on_a_batchnorm_free_model():
    from conftest import make_tiny_model

    model = make_tiny_model("test_vit")  # LayerNorm only, drop rates 0: train and eval forwards agree
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    model.train()
    z_nat = logits_of(model(x))
    kwargs = dict(eps=8 / 255, step_size=2 / 255, steps=2, loss="kl", init="normal")
    own = pgd(model, x, labels, generator=torch.Generator().manual_seed(1), **kwargs)
    reused = pgd(model, x, labels, clean_logits=z_nat.detach(), generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.allclose(own, reused, atol=1e-6)
