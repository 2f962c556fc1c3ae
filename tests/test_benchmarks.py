"""Issue 7: the step benchmark runs and reports its ratios; the speed paths it measures keep CURE's semantics.

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


def test_bench_step_prints_every_ratio(capsys):
    sys.path.insert(0, BENCHMARKS)
    try:
        import bench_step
    finally:
        sys.path.remove(BENCHMARKS)
    threads = torch.get_num_threads()
    try:
        results = bench_step.main([
            "--device", "cpu", "--model", "test_resnet", "--image-size", "16", "--batch-size", "2",
            "--attack-steps", "1", "--warmup", "1", "--steps", "1", "--methods", "pgd", "--options", "",
            "--check-entries", "1001", "--threads", "1",
        ])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for name in ("trainer_overhead[pgd]", "trainer_overhead[trades]", "trainer_overhead[cure]", "cure_vs_trades",
                 "mask_revision_share", "peak_memory_cure_vs_trades"):
        line = next((l for l in out.splitlines() if l.startswith(f"RATIO {name} = ")), None)
        assert line is not None, f"no RATIO line for {name} in:\n{out}"
        if name != "peak_memory_cure_vs_trades":
            assert re.search(r"target <= [\d.]+x?%?: (met|NOT met)\)$", line), line
    assert "matches" in out and "MISMATCH" not in out
    # every part of a CURE step was timed, and the numbers are usable
    assert {"attack", "forward f (clean, adv)", "forward g (revision)", "backward", "mask", "optimizer",
            "revision update"} <= set(results["cure_parts_s"])
    assert all(math.isfinite(v) and v > 0 for v in results["trainer_step_s"].values())
    # CURE holds a revision copy of the model on top of TRADES' state: its peak cannot be lower
    assert results["peak_memory_cure_vs_trades"] > 1.0


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
    from cure_hf import CURETrainer, CURETrainingArguments
    from conftest import make_tiny_model

    args = CURETrainingArguments(output_dir=str(tmp_path), conservation="hard", channels_last=True, use_cpu=True,
                                 report_to=[], max_steps=1)
    trainer = CURETrainer(make_tiny_model("test_resnet"), args)
    convs = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)

    params = trainer._maskable_parameters()
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    scores = [p.grad.abs().clone() for p in params]
    before = [p.detach().clone() for p in params]
    trainer._ensure_revision()
    trainer._conserve_and_update()
    with torch.no_grad():  # stands in for an optimizer step that moves every entry (as weight decay does)
        for p in params:
            p.add_(1.0)
    trainer._after_optimizer_step()
    for p, score, old in zip(params, scores, before):
        conserved = conserve_mask(score, args.conserve_fraction)
        assert torch.equal(p.detach()[conserved], old[conserved])  # bit-identical
        assert torch.equal(p.detach()[~conserved], old[~conserved] + 1.0)
    assert trainer._conserved == []  # the parameter-sized buffer is released after the step


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
