"""torch.compile traces every graph of a training step once: no recompilation after the first step, for every method.

The attack (eval mode, frozen parameters, an input that needs its gradient), the KL attack's clean forward (no
gradient) and the training forward (train mode) run under different global state. Sharing one compiled function,
each new state failed the guards of the graphs before it and was retraced as a recompilation (the GPU runs logged
them: grad_mode, the input's requires_grad, the autocast object). With ``cure_hf.speed.attack_module`` each role has
a compiled function of its own, so dynamo's ``error_on_recompile`` never fires. CPU, backend aot_eager, a tiny model.
"""

import pytest
import torch
from conftest import make_tiny_model
from test_speed import _args
from transformers import TrainerCallback

from cure_hf import CURETrainer
from cure_hf.methods import registered_methods
from cure_hf.speed import CompiledAttackForward, TensorImageDataset, attack_module

BUILT_IN = ("clean", "cure", "fgsm_rs", "mart", "pgd", "trades")
STEPS = 10


class GraphCount(TrainerCallback):
    """dynamo's count of distinct graphs after every step."""

    def __init__(self):
        self.after_step = {}

    def on_step_end(self, args, state, control, **kwargs):
        from torch._dynamo.utils import counters

        self.after_step[state.global_step] = counters["stats"]["unique_graphs"]


def expected_graphs(method) -> int:
    """One training forward; with an attack, its forward with gradient; with the KL objective, its clean forward."""
    attack = method.attack
    return 1 + (attack is not None) + (attack is not None and attack.objective == "kl")


def test_every_built_in_method_is_covered():
    assert set(BUILT_IN) <= set(registered_methods())


@pytest.mark.parametrize("name", sorted(registered_methods()))
def test_no_recompilation_after_the_first_step(tmp_path, one_thread, name):
    _train_without_recompilation(tmp_path, name)


def test_no_recompilation_with_awp(tmp_path, one_thread):
    """AWP's proxy is a copy of the attack module: it compiles its own training forward once (one graph more)."""
    _train_without_recompilation(tmp_path, "pgd", extra_graphs=1, awp_gamma=1e-2, awp_warmup_epochs=0)


def _train_without_recompilation(tmp_path, name, extra_graphs=0, **fields):
    method = registered_methods()[name]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * STEPS, 16, 16, 3), dtype=torch.uint8, generator=generator)
    dataset = TensorImageDataset(images, torch.randint(0, 10, (4 * STEPS,), generator=generator))
    args = _args(
        tmp_path,
        adv_method=name,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        attack_steps=1,
        torch_compile=True,
        torch_compile_backend="aot_eager",
        **fields,
    )
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # reset() keeps the counts of earlier compilations
    count = GraphCount()
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=dataset, callbacks=[count])
    with torch._dynamo.config.patch(error_on_recompile=True):  # a guard failure anywhere raises RecompileError
        trainer.train()
    assert sorted(count.after_step) == list(range(1, STEPS + 1))
    assert count.after_step[1] == count.after_step[STEPS] == expected_graphs(method) + extra_graphs, count.after_step
    if method.attack is None:
        return
    net = trainer._attack_net
    assert isinstance(net, CompiledAttackForward) and attack_module(trainer.model_wrapped) is net  # one, kept
    assert net.compile_kwargs["backend"].compiler_name == "aot_eager"  # the training model's backend


def test_the_attack_module_mirrors_the_modules_mode():
    model = make_tiny_model("test_resnet")
    net = attack_module(torch.compile(model, backend="eager"))
    assert attack_module(net) is net and net._orig_mod is model
    model.eval()
    assert not net.training  # the trainer switches the module; the attack's view follows
    net.train()
    assert model.training
    assert [n for n, _ in net.named_parameters()] == [f"_orig_mod.{n}" for n, _ in model.named_parameters()]
