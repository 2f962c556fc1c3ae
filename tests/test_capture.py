"""The captured whole step (cure_hf.capture) computes CURETrainer's step, and the benchmark's plain loop's; with
``capture_step=True`` CURETrainer trains through it, to the same weights, logs and checkpoints as its eager step.

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
import safetensors
import safetensors.torch
import torch
from conftest import make_tiny_model, stop_after_save
from test_speed import _args

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.capture import CapturedStep, EagerStepGraph
from cure_hf.revision import REVISION_WEIGHTS_NAME
from cure_hf.safety import NonFiniteTrainingError
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


# ------------------------------------------------------------------------------- capture_step in CURETrainer
RUNTIME_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second")


def _trainer(tmp_path, method, capture, steps=STEPS, callbacks=(), **fields):
    """CURETrainer on the tiny ResNet with the Trainer's default (linear) schedule, logging every step."""
    args = _args(
        tmp_path,
        adv_method=method,
        max_steps=steps,
        per_device_train_batch_size=4,
        attack_steps=2,
        logging_strategy="steps",
        logging_steps=1,
        capture_step=capture,
        **fields,
    )
    return CURETrainer(
        make_tiny_model("test_resnet", seed=1), args, train_dataset=_dataset(4 * steps), callbacks=list(callbacks)
    )


def _train(tmp_path, method, capture, steps=STEPS, resume=None, callbacks=(), **fields):
    trainer = _trainer(tmp_path, method, capture, steps, callbacks, **fields)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _trained(trainer):
    """Every tensor of the run's end: weights, BatchNorm statistics, the revision model and its host-side state."""
    revision = trainer.revision
    state = _state(trainer.model, revision)
    if revision is not None:
        state["revision step"] = torch.tensor(revision.step)
        state["revision generator"] = revision.generator.get_state()
    return state


def _logs(trainer):
    return [{k: v for k, v in entry.items() if k not in RUNTIME_KEYS} for entry in trainer.state.log_history]


@pytest.mark.parametrize(
    "method, fields",
    [(m, {}) for m in METHODS] + [("cure", dict(mixup_alpha=0.8, dataloader_drop_last=True))],
    ids=list(METHODS) + ["cure-mixup"],
)
def test_capture_step_trains_to_the_eager_steps_weights_and_logs(tmp_path, one_thread, method, fields):
    """capture_step=True through CURETrainer.train(): the same weights, BatchNorm statistics, revision model (its
    step and generator too) and logged values (loss, parts, grad_norm, learning rate, revision_updated) as the eager
    step, bit for bit, with a learning rate that changes every step (linear decay) and mixup before the step."""
    eager = _train(tmp_path / "eager", method, False, **fields)
    captured = _train(tmp_path / "captured", method, True, **fields)
    assert eager._captured_step is None and captured._captured_step.step.calls == STEPS  # the captured path ran
    _assert_same(_trained(captured), _trained(eager))
    logs = _logs(captured)
    assert logs == _logs(eager)
    learning_rates = [entry["learning_rate"] for entry in logs if "learning_rate" in entry]
    assert len(set(learning_rates)) == STEPS  # the schedule reached every captured update
    assert all("grad_norm" in entry and entry["grad_norm"] > 0 for entry in logs if "loss" in entry)


def test_capture_step_resumes_from_a_mid_run_checkpoint_bit_identically(tmp_path, one_thread):
    """CURE with capture_step, checkpoint at step 2 of 4, a new trainer resumed from it: the final weights, revision
    model (step, generator) and optimizer state are those of the uninterrupted eager run."""
    fields = dict(save_strategy="steps", save_steps=2, revision_rate=0.5)
    full = _train(tmp_path / "full", "cure", False, steps=4, **fields)
    _train(tmp_path / "cut", "cure", True, steps=4, callbacks=[stop_after_save(2)], **fields)
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    # the revision state on disk is the eager run's at the same step: synced from the captured step before the save
    for name in ("model.safetensors", REVISION_WEIGHTS_NAME):
        eager_file = safetensors.torch.load_file(str(tmp_path / "full" / "checkpoint-2" / name))
        _assert_same(safetensors.torch.load_file(str(checkpoint / name)), eager_file)
    with safetensors.safe_open(str(checkpoint / REVISION_WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()["step"] == "2"
    resumed = _train(tmp_path / "cut", "cure", True, steps=4, resume=str(checkpoint), **fields)
    assert resumed._captured_step.step.calls == 2  # rebuilt for the resumed run, from the loaded state
    _assert_same(_trained(resumed), _trained(full))
    momentum = [resumed.optimizer.state[p]["momentum_buffer"] for p in resumed.model.parameters()]
    assert all(
        torch.equal(a, full.optimizer.state[p]["momentum_buffer"]) for a, p in zip(momentum, full.model.parameters())
    )


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
        (dict(nonfinite_policy="skip"), "nonfinite_policy"),
        (dict(awp_gamma="true"), "awp_gamma"),
        (dict(weight_averaging="true"), "weight_averaging"),
        (dict(natural_warmup_epochs=1.0), "natural_warmup_epochs"),
        (dict(attack_warmup_epochs=1.0), "attack_warmup_epochs"),
        (dict(max_grad_norm=1.0), "max_grad_norm"),
        (dict(revision_rate_schedule="cosine"), "revision_rate_schedule"),
        (dict(conservation="hard"), "conservation"),
        (dict(prominence="paper"), "prominence"),
        (dict(layer_telemetry=True), "layer_telemetry"),
        (dict(attack_reuse_clean_logits=True, adv_method="pgd"), "attack_reuse_clean_logits"),
    ],
)
def test_capture_step_refuses_what_the_captured_step_cannot_do(tmp_path, fields, name):
    """Each refusal at construction names the field, says why, and gives the fix (including capture_step=False)."""
    with pytest.raises(ValueError, match=f"{name}=.* is not part of the captured step: .+Fix: .*capture_step=False"):
        _args(tmp_path, capture_step=True, **{"adv_method": "cure", **fields})
    _args(tmp_path, capture_step=False, **{"adv_method": "cure", **fields})  # the eager step takes it


@pytest.mark.parametrize(
    "fields, name, reason",
    [
        (dict(lr_scheduler_type="linear"), "lr_scheduler_type", "bakes a float learning rate into the graph"),
        (dict(warmup_steps=2), "warmup_steps", "bakes a float learning rate"),
        (dict(lr_step_epochs="1"), "lr_step_epochs", "bakes a float learning rate"),
        (dict(optim="adamw_torch"), "optim", "capturable"),
    ],
)
def test_a_graph_refuses_a_changing_learning_rate_and_uncapturable_optimizers(tmp_path, fields, name, reason):
    """On CUDA (graph=True) the update is replayed with the captured learning rate: what would change it is refused;
    off CUDA (graph=False) the step reads it live, and the same arguments pass."""
    args = _args(tmp_path, capture_step=True, **{"lr_scheduler_type": "constant", **fields})
    with pytest.raises(ValueError, match=f"{name}=.* is not part of the captured step: .*{reason}"):
        CapturedStep.check_arguments(args, graph=True)
    CapturedStep.check_arguments(args, graph=False)


def test_capture_step_refuses_several_processes(tmp_path, monkeypatch):
    args = _args(tmp_path, capture_step=True)
    monkeypatch.setattr(CURETrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="world_size=2 is not part of the captured step: one process"):
        CapturedStep.check_arguments(args, graph=False)


def test_a_divergence_in_the_captured_step_stops_training_before_a_save(tmp_path, one_thread):
    """A NaN weight makes the first captured step's gradient non-finite: training stops there with the captured
    step's message, and no checkpoint is written."""
    trainer = _trainer(tmp_path, "pgd", True, steps=2, save_strategy="steps", save_steps=1)
    with torch.no_grad():
        next(trainer.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="training diverged at step 1: .*captured step's finite flag"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-*"))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_run.sh runs this)")
def test_capture_step_on_cuda_replays_the_graph_inside_the_trainer(tmp_path):
    """On a GPU: 6 CURE steps of CURETrainer with capture_step=True (2 eager warm-up steps, the capture, 3 replays;
    no random start, deterministic cuDNN) end at the eager trainer's weights within 1e-5."""
    # on the GPU, no random start (the graph's draws are the device generator's), a constant learning rate
    fields = dict(use_cpu=False, attack_random_start=False, lr_scheduler_type="constant", dataloader_pin_memory=False)
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        states = {}
        for capture in (False, True):
            trainer = _trainer(tmp_path / str(capture), "cure", capture, steps=6, **fields)
            trainer.train()
            if capture:
                assert trainer._captured_step.step.replays == 3
            states[capture] = _state(trainer.model, trainer.revision)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    for key, value in states[False].items():
        assert torch.allclose(states[True][key].float(), value.float(), rtol=1e-5, atol=1e-6), key
