"""The captured whole step (cure_hf.capture) computes CURETrainer's step, and the benchmark's plain loop's.

Off CUDA the step runs eagerly, through the capture's plumbing (``EagerStepGraph``: warm-up, then static batch
buffers replayed, gradients allocated by the captured backward), on the CPU, in fp32, with the same random draws.
The weights, BatchNorm statistics and revision weights must then be bit for bit the trainer's: every operation is
the same kernel on the same inputs in the same order, and the revision update's device arithmetic (momentum and
coin as float64 tensors, ``addcmul_``) rounds as ``ema_update_``'s Python floats do.
"""

import os
import sys
import types

import pytest
import torch
from conftest import make_tiny_model
from test_speed import _args

from cure_hf import CURETrainer
from cure_hf.capture import CapturedStep, EagerStepGraph
from cure_hf.speed import TensorImageDataset

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
METHODS = ("cure", "trades", "pgd", "mart")
STEPS = 3


def _dataset(n=4 * STEPS, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator)
    return TensorImageDataset(images, torch.randint(0, 10, (n,), generator=generator))


def _arguments(tmp_path, method, **fields):
    # the captured step bakes its learning rate in: a constant schedule
    return _args(
        tmp_path,
        adv_method=method,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        attack_steps=2,
        lr_scheduler_type="constant",
        **fields,
    )


def _state(model, revision=None):
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    if revision is not None:
        state.update({f"revision.{k}": v.detach().clone() for k, v in revision.module.state_dict().items()})
    return state


def _assert_same(got, expected):
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}: " + ", ".join(
        f"{k} max |difference| {(got[k].float() - expected[k].float()).abs().max():.3g}" for k in different[:3]
    )


@pytest.mark.parametrize("method", METHODS)
def test_captured_step_gives_the_trainers_weights(tmp_path, one_thread, method):
    """3 CURETrainer steps (eager, CPU) against 3 captured steps on the batches and random state the trainer saw:
    one warm-up step, the capture, then replays of the static buffers."""
    args = _arguments(tmp_path, method)
    trainer = CURETrainer(make_tiny_model("test_resnet", seed=1), args, train_dataset=_dataset())
    seen = []
    original = trainer.training_step

    def recording(model, inputs, num_items_in_batch=None):
        seen.append((inputs["pixel_values"].clone(), inputs["labels"].clone(), torch.get_rng_state()))
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = recording
    trainer.train()
    assert len(seen) == STEPS
    expected = _state(trainer.model, trainer.revision)

    model = make_tiny_model("test_resnet", seed=1)
    # the trainer's optimizer: SGD, momentum 0.9, weight decay on every parameter (the released code's defaults)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9, weight_decay=args.weight_decay)
    step = CapturedStep.from_arguments(args, model, optimizer, capture=True, graph_factory=EagerStepGraph, warmup=1)
    assert (step.revision is not None) == (method == "cure") and (step.conserve_fraction is not None) == (
        method == "cure"
    )
    for x, labels, rng in seen:
        torch.set_rng_state(rng)  # the attack's random start: the trainer's draw
        loss = step(x, labels)
        assert loss.dim() == 0 and bool(step.finite)
    assert step.calls == STEPS and step.replays == STEPS - 1  # one eager warm-up step, then the graph
    step.sync_host_state()
    _assert_same(_state(model, step.revision), expected)
    if step.revision is not None:  # the host-side state a checkpoint saves: the eager revision model's
        assert step.revision.step == trainer.revision.step == STEPS
        assert torch.equal(step.revision.generator.get_state(), trainer.revision.generator.get_state())


def test_revision_coin_and_momentum_are_the_eager_revision_models():
    """Over 60 steps, r = 0.5, d = 0.9 (the momentum caps at step 9) and blocks of 7 draws: the device coin agrees
    with RevisionModel.step_'s every step, and the revision weights stay bit-identical."""
    from cure_hf.revision import RevisionModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights change by hand below
    eager = RevisionModel(model, rate=0.5, decay=0.9, seed=3)
    captured = CapturedStep(
        model,
        "clean",
        optimizer,
        attack_settings=None,
        hyperparameters={"label_smoothing_factor": 0.0},
        revision=RevisionModel(model, rate=0.5, decay=0.9, seed=3),
        revision_block=7,
    )
    coins = []
    for _ in range(60):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        captured._before_step()
        updated = captured._revise()
        coins.append(bool(updated))
        assert bool(updated) == eager.step_(model)
        for a, b in zip(captured.revision.module.parameters(), eager.module.parameters()):
            assert torch.equal(a, b)
    assert 15 < sum(coins) < 45  # both outcomes occur


def test_refused_fields_name_the_reason(tmp_path):
    model = make_tiny_model("test_resnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for fields, name in (
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
        (dict(conservation="hard"), "conservation"),
        (dict(max_grad_norm=1.0), "max_grad_norm"),
        (dict(revision_rate_schedule="cosine"), "revision_rate_schedule"),
    ):
        with pytest.raises(ValueError, match=f"{name}=.* is not part of the captured step"):
            CapturedStep.from_arguments(_arguments(tmp_path, "cure", **fields), model, optimizer)
    with pytest.raises(ValueError, match="capture=True needs a CUDA device"):
        CapturedStep.from_arguments(_arguments(tmp_path, "pgd"), model, optimizer, capture=True)


def test_a_learning_rate_changed_after_the_capture_is_refused():
    """The captured update bakes a float learning rate in: a schedule that changes it must not be silently ignored."""
    model = make_tiny_model("test_resnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = CapturedStep(
        model,
        "clean",
        optimizer,
        attack_settings=None,
        hyperparameters={"label_smoothing_factor": 0.0},
        capture=True,
        graph_factory=EagerStepGraph,
        warmup=0,
    )
    x, labels = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    step(x, labels)
    optimizer.param_groups[0]["lr"] = 0.05
    with pytest.raises(ValueError, match=r"learning rate changed from \[0.1\] to \[0.05\] after the step was captured"):
        step(x, labels)


def _bench():
    sys.path.insert(0, BENCHMARKS)
    try:
        import bench_step
    finally:
        sys.path.remove(BENCHMARKS)
    return bench_step


@pytest.mark.parametrize("method", METHODS)
def test_captured_configuration_of_the_plain_loop_is_its_fp32_step(one_thread, method):
    """The benchmark's "captured_fp32" configuration (the whole step captured, fp32 kernels) against its eager
    fp32 loop, on the same batches and random state: the same weights, bit for bit."""
    bench = _bench()
    cfg = types.SimpleNamespace(device=torch.device("cpu"), attack_steps=2, compile_backend="eager")
    dataset = _dataset()
    batches = [bench.collate_pixels([dataset[i] for i in range(s * 4, s * 4 + 4)]) for s in range(STEPS)]
    states = {}
    for config in ("fp32", "captured_fp32"):
        model = make_tiny_model("test_resnet", seed=2)
        step = bench.PlainStep(cfg, model, method, config)
        torch.manual_seed(5)
        for batch in batches:
            step(batch)
        if config == "captured_fp32":
            assert step.captured.replays == STEPS - step.captured.warmup
            step.captured.sync_host_state()
        states[config] = _state(model, step.revision if config == "fp32" else step.captured.revision)
    _assert_same(states["captured_fp32"], states["fp32"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_run.sh runs this)")
def test_cuda_graph_step_replays_the_eager_step_on_the_gpu():
    """On a GPU: 5 CURE steps (no random start, deterministic cuDNN) eagerly and as 2 warm-up steps, a capture and
    replays give the same weights; the replayed steps make no host synchronisation (sync debug mode "error")."""
    from cure_hf.methods import AttackSettings
    from cure_hf.models import head_parameter_names
    from cure_hf.revision import RevisionModel

    generator = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator))]
    batches = [(x.cuda(), y.cuda()) for x, y in batches * 5]
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        states = {}
        for capture in (False, True):
            model = make_tiny_model("test_resnet", seed=1).cuda()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            step = CapturedStep(
                model,
                "cure",
                optimizer,
                attack_settings=AttackSettings(eps=8 / 255, step_size=2 / 255, steps=3, random_start=False),
                hyperparameters={"clean_weight": 0.1, "prominence": "loss", "label_smoothing_factor": 0.0},
                conserve_fraction=0.3,
                head_names=head_parameter_names(model),
                revision=RevisionModel(model, rate=0.5, seed=0),
                capture=capture,
                warmup=2,
            )
            for number, (x, y) in enumerate(batches):
                if capture and number >= 3:  # replays only: nothing may wait for the device
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    step(x, y)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            assert step.replays == (3 if capture else 0) and bool(step.finite)
            step.sync_host_state()
            states[capture] = _state(model, step.revision)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    for key, value in states[False].items():
        assert torch.allclose(states[True][key].float(), value.float(), rtol=1e-5, atol=1e-6), key
