"""A whole training step as one replayable function: captured once as a CUDA graph, replayed with one launch.

A CIFAR-size CURE step (ResNet-18, batch 128, PGD-10) launches about 1,300 kernels even with the attack's K steps
in a CUDA graph of their own (``cure_hf.speed.GraphedAttack``): the forward passes, the loss, the backward, the
conservation mask, the optimizer and the revision update are still launched one by one from Python, and the GPU
waits for the host (the recorded H100 step: 44 ms, the GPU busy 26% of it). :class:`CapturedStep` captures all of
that tensor work, over static batch buffers:

1. the method's training attack (its random start drawn on the device, in the graph),
2. the forward passes (the model on the clean and adversarial batches, the revision model on both),
3. the method's loss from the method object (``method.loss(LossInputs(...), hp)``: the loss is written once, for the
   trainer and for this step) plus the revision term, and the backward,
4. the conservation mask (``prominence.mask_gradients_``: per-tensor quantiles selected on the device, no host read),
5. the optimizer's step (its own work only: not its hooks, which are the trainer's copies of steps 4 and 6),
6. the revision update, its coin drawn from the revision generator's own stream: the draws come in blocks from a
   copy of that CPU generator, so they are the ones ``RevisionModel.step_`` would draw; the comparison with the
   rate, the momentum ``min(1 - 1/(t+1), d)`` and the choice are device arithmetic, so the graph needs no branch,
7. a device flag saying whether the gradient was finite (read by the host when it chooses: no per-step read).

On CUDA (``capture=None`` decides by the device) the first ``warmup`` steps run eagerly on a side stream (lazy
initialisation, cuDNN autotuning, torch.compile's compilation, the optimizer's momentum buffers), the next one is
captured and every later step copies its batch into the static buffers and replays the graph. Off CUDA every step
runs the same function eagerly: it computes what the graph computes, so the CPU tests compare it with the trainer's
step. What a graph cannot hold (the Trainer's loop, logging, callbacks, checkpoints, the fp16 scaler's skip, the
divergence guard's host read, a learning rate that changes between replays) is listed in docs/benchmarks.md, and
the arguments that need it are refused by :meth:`CapturedStep.from_arguments` with the reason.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .attacks import logits_of, pgd
from .methods import AdversarialMethod, AttackSettings, LossInputs, get_method, with_consistency
from .prominence import mask_gradients_
from .revision import RevisionModel

__all__ = ["CapturedStep", "EagerStepGraph", "NOT_CAPTURED"]

logger = logging.getLogger(__name__)

# What stays outside the captured step, and why (docs/benchmarks.md repeats it); check_arguments refuses the fields
# that would need one of these inside it, each with its reason from here.
NOT_CAPTURED = {
    "the Trainer's loop": "data loading, callbacks, logging and checkpoints are host work between replays",
    "gradient accumulation": "one captured step is one optimizer step on one batch",
    "fp16's loss scaler": "skipping a step on an inf/NaN gradient is a host decision (bf16 needs no scaler)",
    "the divergence guard's skip": "the update runs inside the captured step, before the host can read whether "
    "the gradient was finite, so a step cannot be dropped; stopping can (the finite flag, CapturedStep.finite)",
    "a changing learning rate on CUDA": "the optimizer's step bakes a float learning rate into the graph; a "
    "schedule needs an optimizer that reads a tensor learning rate on the device (off CUDA the step runs eagerly "
    "and reads the learning rate every step)",
    "AWP, weight averaging, hard conservation, the paper's prominence, layer telemetry, the warm-ups, gradient "
    "clipping, the attack's reuse of the clean logits": "not written into the captured step yet (each is device "
    "work and could be)",
    "DDP": "one process: the gradient all-reduce would have to be captured too",
}
_NOT_YET = NOT_CAPTURED[next(k for k in NOT_CAPTURED if k.startswith("AWP"))]


def _refusals(args, graph: bool) -> list:
    """(refused, field, value, reason, fix) for every argument the captured step cannot honour."""
    from .components import resolved_conservation, resolved_revision

    method = get_method(args.adv_method)
    conservation = resolved_conservation(args, method)
    # a revision-rate schedule is the caller's: set_revision_rate(rate) before each step, from a constant start
    schedule = args.revision_rate_schedule if resolved_revision(args, method) else "constant"
    scheduler = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    warmup = args.warmup_steps or getattr(args, "warmup_ratio", 0) or 0
    optim = str(getattr(args.optim, "value", args.optim))
    compile_mode = getattr(args, "torch_compile_mode", None)
    drop = "drop {}"
    rows = [
        (
            args.gradient_accumulation_steps != 1,
            "gradient_accumulation_steps",
            args.gradient_accumulation_steps,
            NOT_CAPTURED["gradient accumulation"],
            "gradient_accumulation_steps=1 (a larger per_device_train_batch_size)",
        ),
        (bool(args.fp16), "fp16", args.fp16, NOT_CAPTURED["fp16's loss scaler"], "bf16=True, or fp32"),
        (
            args.nonfinite_policy == "skip",
            "nonfinite_policy",
            args.nonfinite_policy,
            NOT_CAPTURED["the divergence guard's skip"],
            "nonfinite_policy='stop'",
        ),
        (args.resolved_awp_gamma is not None, "awp_gamma", args.awp_gamma, _NOT_YET, drop.format("awp_gamma")),
        (
            args.weight_averaging_decay is not None,
            "weight_averaging",
            args.weight_averaging,
            _NOT_YET,
            drop.format("weight_averaging"),
        ),
        (
            bool(args.natural_warmup_epochs),
            "natural_warmup_epochs",
            args.natural_warmup_epochs,
            _NOT_YET,
            "natural_warmup_epochs=0",
        ),
        (
            bool(args.attack_warmup_epochs),
            "attack_warmup_epochs",
            args.attack_warmup_epochs,
            _NOT_YET,
            "attack_warmup_epochs=0",
        ),
        (args.max_grad_norm not in (0, 0.0, None), "max_grad_norm", args.max_grad_norm, _NOT_YET, "max_grad_norm=0"),
        (
            schedule != "constant",
            "revision_rate_schedule",
            schedule,
            "the revision rate is a device buffer the caller sets between steps",
            "revision_rate_schedule='constant' (CapturedStep.set_revision_rate(r) before each "
            "step, in a loop of your own)",
        ),
        (conservation == "hard", "conservation", conservation, _NOT_YET, "conservation='soft'"),
        (
            conservation != "none" and args.prominence == "paper",
            "prominence",
            args.prominence,
            _NOT_YET,
            "prominence='loss'",
        ),
        (bool(args.layer_telemetry), "layer_telemetry", args.layer_telemetry, _NOT_YET, drop.format("layer_telemetry")),
        (
            bool(args.attack_reuse_clean_logits),
            "attack_reuse_clean_logits",
            args.attack_reuse_clean_logits,
            _NOT_YET,
            drop.format("attack_reuse_clean_logits"),
        ),
        (
            getattr(args, "world_size", 1) > 1,
            "world_size",
            getattr(args, "world_size", 1),
            NOT_CAPTURED["DDP"],
            "train in one process",
        ),
    ]
    if graph:
        changing = NOT_CAPTURED["a changing learning rate on CUDA"]
        rows += [
            (scheduler != "constant", "lr_scheduler_type", scheduler, changing, "lr_scheduler_type='constant'"),
            (bool(warmup), "warmup_steps", warmup, changing, "warmup_steps=0"),
            (bool(args.lr_step_epochs), "lr_step_epochs", args.lr_step_epochs, changing, drop.format("lr_step_epochs")),
            (
                optim != "sgd",
                "optim",
                optim,
                "on CUDA the optimizer's update is captured, and torch's SGD captures as "
                "it is (Adam-type optimizers need capturable=True)",
                "optim='sgd'",
            ),
            (
                compile_mode in ("reduce-overhead", "max-autotune"),
                "torch_compile_mode",
                compile_mode,
                "that mode captures CUDA graphs inside the compiled model, and a graph cannot contain another capture",
                "leave torch_compile_mode unset (the default mode)",
            ),
        ]
    return rows


def _step_without_hooks(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's own update, without the pre/post-step hooks torch runs around ``step()`` (the trainer's
    hooks are its conservation and revision, which the captured step does itself)."""
    step = type(optimizer).step
    getattr(step, "__wrapped__", step)(optimizer)


class _CudaStepGraph:
    """The step as a ``torch.cuda.CUDAGraph``: ``capture`` records the body (without running it), ``replay`` runs
    the recorded kernels and returns the body's outputs, which live at the same addresses every replay."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()
        self.outputs = None

    def warm(self, body: Callable[[], Any]) -> Any:
        # Eager steps before the capture run on a side stream, as torch.cuda.graphs' documentation asks.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = body()
        torch.cuda.current_stream().wait_stream(stream)
        return outputs

    def capture(self, body: Callable[[], Any]) -> None:
        torch.cuda.synchronize()
        # thread_local: another thread's CUDA calls (a DataLoader's pin-memory thread) cannot spoil the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = body()

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


class EagerStepGraph:
    """A stand-in for CUDA graphs off CUDA (tests): ``capture`` keeps the body, ``replay`` runs it on the static
    buffers, so the capture's plumbing (warm-up, static inputs, gradients allocated by the captured backward) runs
    as it does around a real graph."""

    def warm(self, body: Callable[[], Any]) -> Any:
        return body()

    def capture(self, body: Callable[[], Any]) -> None:
        self.body = body

    def replay(self) -> Any:
        return self.body()


class CapturedStep:
    """One optimizer step of ``method`` on a batch, captured whole (see the module docstring).

    Arguments:
        model: the module the optimizer updates (its parameters and modes; no DDP: one process).
        method: the method object or its name; its ``attack`` and ``loss`` are used as they are.
        optimizer: over ``model``'s parameters; SGD, or an optimizer that is capturable on CUDA.
        attack_settings: the training attack's eps, step size, steps and random start.
        hyperparameters: what ``method.loss`` reads (``method.hyperparameter_values(args)``).
        conserve_fraction: p of the conservation mask, or None for no conservation.
        head_names: parameter names exempt from the mask (the classifier head).
        revision: the revision model (``RevisionModel``), or None.
        consistency_weight: gamma of the revision term.
        revision_rate: r (default: the revision model's); ``set_revision_rate`` changes it between steps.
        train_forward: what the training forward calls (default ``model``; e.g. the compiled module).
        attack_net: what the attack calls (default ``cure_hf.speed.attack_module(train_forward)``).
        clean_pass: whether to run the clean training forward (default: the method reads ``z_nat``, or revision).
        capture: capture a CUDA graph (default: on CUDA); ``graph_factory`` replaces ``torch.cuda.CUDAGraph``.
        warmup: eager steps before the capture.
        revision_block: revision draws copied to the device at a time.

    Call it with a batch ``(x, labels)`` of one shape: it returns the loss (a device tensor; a static one once
    captured). ``parts`` holds the loss's parts, ``finite`` the gradient's finite flag, ``grad_norm`` its 2-norm
    before the mask, ``updated`` whether the revision model was updated; ``sync_host_state()`` brings the revision model's step and generator to where the
    eager trainer's would be (before saving it).
    """

    def __init__(
        self,
        model: nn.Module,
        method: Union[str, AdversarialMethod],
        optimizer: torch.optim.Optimizer,
        *,
        attack_settings: AttackSettings,
        hyperparameters: Mapping[str, Any],
        conserve_fraction: Optional[float] = None,
        head_names: Iterable[str] = (),
        revision: Optional[RevisionModel] = None,
        consistency_weight: float = 1.0,
        revision_rate: Optional[float] = None,
        train_forward: Optional[Callable] = None,
        attack_net: Optional[nn.Module] = None,
        clean_pass: Optional[bool] = None,
        capture: Optional[bool] = None,
        graph_factory: Optional[Callable[[], Any]] = None,
        warmup: int = 2,
        revision_block: int = 1024,
    ):
        from .speed import attack_module

        self.model = model
        self.method = get_method(method) if isinstance(method, str) else method
        self.optimizer = optimizer
        self.attack_settings = attack_settings
        self.hyperparameters = dict(hyperparameters)
        self.train_forward = train_forward if train_forward is not None else model
        self.attack_net = attack_net if attack_net is not None else attack_module(self.train_forward)
        self.revision = revision
        self.consistency_weight = float(consistency_weight)
        self.clean_pass = (self.method.uses_clean_pass or revision is not None) if clean_pass is None else clean_pass
        if self.method.attack is None and not self.clean_pass:
            raise ValueError(f"adv_method={self.method.name!r} has no attack, so the step needs its clean pass")
        if conserve_fraction is not None and not 0.0 <= conserve_fraction < 1.0:
            raise ValueError(f"conserve_fraction={conserve_fraction!r} is invalid: 0 <= p < 1, or None (no mask)")
        self.conserve_fraction = conserve_fraction
        heads = set(head_names)
        self.maskable = [p for n, p in model.named_parameters() if p.requires_grad and n not in heads]
        device = next(model.parameters()).device
        self.device = device
        self.capture = device.type == "cuda" if capture is None else bool(capture)
        if self.capture and graph_factory is None and device.type != "cuda":
            raise ValueError(
                f"capture=True needs a CUDA device; the model is on {device.type!r}. Fix: capture=None (eager off "
                "CUDA), or pass graph_factory=EagerStepGraph to run the capture's plumbing eagerly."
            )
        self.graph_factory = graph_factory or _CudaStepGraph
        self.warmup = max(0, int(warmup))
        self._graph = None
        self._static: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.calls = self.replays = 0
        self.loss: Optional[torch.Tensor] = None
        self.parts: Dict[str, torch.Tensor] = {}
        self.finite: Optional[torch.Tensor] = None
        self.updated: Optional[torch.Tensor] = None
        self.grad_norm: Optional[torch.Tensor] = None
        if revision is not None:
            self._init_revision(revision, revision_rate, revision_block)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_arguments(
        cls,
        args,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        revision: Optional[RevisionModel] = None,
        **kwargs,
    ) -> CapturedStep:
        """The step ``CURETrainer`` takes with these ``CURETrainingArguments`` (its method, attack, conservation and
        revision), for ``model`` and ``optimizer``. Fields whose work stays outside a graph are refused."""
        from .components import resolved_conservation, resolved_revision
        from .models import head_parameter_names

        capture = kwargs.get("capture")
        graph = next(model.parameters()).device.type == "cuda" if capture is None else bool(capture)
        cls.check_arguments(args, graph=graph)
        method = get_method(args.adv_method)
        conservation = resolved_conservation(args, method)
        if resolved_revision(args, method) and revision is None:
            revision = RevisionModel(
                model,
                rate=args.revision_rate,
                decay=args.revision_decay,
                seed=args.resolved_revision_seed,
                train_mode=args.revision_train_mode,
            )
        return cls(
            model,
            method,
            optimizer,
            attack_settings=args.attack_settings,
            hyperparameters=method.hyperparameter_values(args),
            conserve_fraction=args.conserve_fraction if conservation != "none" else None,
            head_names=head_parameter_names(model, args.head_modules) if conservation != "none" else (),
            revision=revision,
            consistency_weight=args.consistency_weight,
            **kwargs,
        )

    @staticmethod
    def check_arguments(args, *, graph: bool) -> None:
        """Refuse, with the reason and the fix, the first argument whose work the captured step cannot do
        (``NOT_CAPTURED``); ``graph``: the step will be replayed from a captured graph (CUDA), which bakes in the
        learning rate and needs a capturable optimizer.
        ``CURETrainingArguments(capture_step=True)`` and :meth:`from_arguments` both call it."""
        for refused, name, value, reason, fix in _refusals(args, graph):
            if refused:
                raise ValueError(
                    f"{name}={value!r} is not part of the captured step: {reason}. Fix: {fix}, or train with the "
                    "eager step (capture_step=False)."
                )

    def _init_revision(self, revision: RevisionModel, rate: Optional[float], block: int) -> None:
        device = self.device
        self.revision_block = max(1, int(block))
        # Draws come from a copy of the revision generator, a block at a time: a block of n uniform draws is the
        # same sequence as n single draws (RevisionModel.step_ draws one per step).
        self._coins = torch.Generator(device="cpu")
        self._coins.set_state(revision.generator.get_state())
        self._draws = torch.zeros(self.revision_block, device=device)
        self._used = self.revision_block  # refill before the first step
        self._index = torch.zeros(1, dtype=torch.long, device=device)
        # t and r in float64: the momentum and the comparison are then Python's double arithmetic, bit for bit
        self._t = torch.full((1,), float(revision.step), dtype=torch.float64, device=device)
        self._rate = torch.full(
            (1,), float(revision.rate if rate is None else rate), dtype=torch.float64, device=device
        )
        self._rate_value = float(revision.rate if rate is None else rate)
        self._unsynced_steps = 0

    def set_revision_rate(self, rate: float) -> None:
        """r for the next steps (a schedule): written to the device buffer the graph reads, without a sync."""
        if self.revision is None:
            raise ValueError("set_revision_rate: this step has no revision model (revision off)")
        if float(rate) != self._rate_value:
            self._rate.fill_(float(rate))
            self._rate_value = float(rate)

    def sync_host_state(self) -> None:
        """The revision model's step counter and generator as the eager trainer's would be after these steps."""
        if self.revision is None or not self._unsynced_steps:
            return
        torch.rand((self._unsynced_steps,), generator=self.revision.generator)  # n single draws, in one
        self.revision.step += self._unsynced_steps
        self._unsynced_steps = 0

    # ------------------------------------------------------------------------------------ the step
    def _body(self, x: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Any]:
        """The step's tensor work, in the trainer's order; nothing in it reads a device value on the host."""
        method, model = self.method, self.model
        self.optimizer.zero_grad(set_to_none=True)  # a captured backward then allocates the gradients in the graph
        model.train()
        x_adv = None
        if method.attack is not None:
            x_adv = method.attack.craft(self.attack_net, x, labels, self.attack_settings, pgd_fn=pgd)
        r_nat = r_adv = None
        if self.revision is not None:  # the revision model's logits come first, as the trainer's component makes them
            r_nat = logits_of(self.revision(x))
            r_adv = logits_of(self.revision(x_adv)) if x_adv is not None else None
        z_nat = logits_of(self.train_forward(x)) if self.clean_pass else None
        z_adv = logits_of(self.train_forward(x_adv)) if x_adv is not None else None
        loss, parts = method.loss(LossInputs(labels, z_nat, z_adv, r_nat, r_adv), self.hyperparameters)
        if self.revision is not None:
            loss, parts = with_consistency((loss, parts), z_nat, z_adv, r_nat, r_adv, self.consistency_weight)
        loss.backward()
        with torch.no_grad():
            # the gradient's norm as the Trainer logs it (clip_grad_norm_ over model.parameters(), before the mask)
            norms = torch.stack(torch._foreach_norm([p.grad for p in model.parameters() if p.grad is not None]))
            grad_norm = torch.linalg.vector_norm(norms, 2.0)
            finite = torch.isfinite(norms.float().sum())
            if self.conserve_fraction is not None:
                mask_gradients_(self.maskable, self.conserve_fraction)
            _step_without_hooks(self.optimizer)
            updated = self._revise() if self.revision is not None else None
        return loss.detach(), {k: v.detach() for k, v in parts.items()}, (finite, updated, grad_norm)

    @torch.no_grad()
    def _revise(self) -> torch.Tensor:
        """g <- m g + (1 - m) f with probability r: m and the coin are device values, so the choice is arithmetic
        (m = 1 and 1 - m = 0 leave g as it is). Computed as RevisionModel's ``ema_update_`` computes it."""
        self._t.add_(1.0)  # RevisionModel.step_ counts the step first
        decay = torch.clamp(1.0 - (self._t + 1.0).reciprocal(), max=float(self.revision.decay))
        updated = self._draws.index_select(0, self._index).double() < self._rate
        keep = torch.where(updated, decay, 1.0)
        take = torch.where(updated, 1.0 - decay, 0.0)
        keep, take = keep.float().reshape(()), take.float().reshape(())  # as a Python float reaches the kernels
        ema = list(self.revision.module.parameters())
        torch._foreach_mul_(ema, keep)
        for average, parameter in zip(ema, self.model.parameters()):
            average.addcmul_(parameter.detach().to(average.dtype), take)  # ema + p * (1 - m), one rounding
        self._index.add_(1)
        return updated.reshape(())

    def _before_step(self) -> None:
        if self.revision is None:
            return
        if self._used >= self.revision_block:  # the next block of draws, copied without a host sync
            draws = torch.rand((self.revision_block,), generator=self._coins)
            if self.device.type == "cuda":
                draws = draws.pin_memory()
            self._draws.copy_(draws, non_blocking=True)
            self._index.zero_()
            self._used = 0
        self._used += 1
        self._unsynced_steps += 1

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._before_step()
        if not self.capture:
            outputs = self._body(x, labels)
        elif self._graph is None and self.calls < self.warmup:
            outputs = self._warm_graph().warm(lambda: self._body(x, labels))
        else:
            if self._graph is None:
                self._capture_graph(x, labels)
            self._check_learning_rates()
            static_x, static_labels = self._static
            static_x.copy_(x)
            static_labels.copy_(labels)
            outputs = self._graph.replay()
            self.replays += 1
        self.loss, self.parts, (self.finite, self.updated, self.grad_norm) = outputs
        self.calls += 1
        return self.loss

    def _float_learning_rates(self) -> list:
        # a tensor learning rate is read on the device by the optimizers that accept one in a graph: not baked in
        return [None if isinstance(g["lr"], torch.Tensor) else float(g["lr"]) for g in self.optimizer.param_groups]

    def _check_learning_rates(self) -> None:
        """A float learning rate is baked into the captured update: a change after the capture would be ignored."""
        now = self._float_learning_rates()
        if now != self._captured_lrs:
            raise ValueError(
                f"the optimizer's learning rate changed from {self._captured_lrs} to {now} after the step was "
                "captured, and the captured update keeps the old one. Fix: a constant learning rate "
                "(lr_scheduler_type='constant'), or an optimizer that reads a tensor learning rate on the device "
                "(e.g. torch.optim.SGD(..., lr=torch.tensor(0.1, device='cuda'), fused=True)), updated in place."
            )

    def _warm_graph(self):
        if not hasattr(self, "_warmer"):
            self._warmer = self.graph_factory()
        return self._warmer

    def _capture_graph(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        self._static = (x.detach().clone(), labels.detach().clone())  # clone keeps the memory format
        graph = self.graph_factory()
        static_x, static_labels = self._static
        graph.capture(lambda: self._body(static_x, static_labels))
        self._graph = graph
        self._captured_lrs = self._float_learning_rates()
        logger.info("captured the %s step for batches of shape %s", self.method.name, tuple(x.shape))


class TrainerCapturedStep:
    """``CURETrainer``'s step with ``capture_step=True``: everything after the batch transforms (mixup) is one
    :class:`CapturedStep` (on CUDA a CUDA graph, off CUDA the same work eagerly, bit for bit the eager step's).

    The Trainer's loop stays the Trainer's, and after ``training_step`` it still calls ``optimizer.step()``,
    ``lr_scheduler.step()`` and ``model.zero_grad()``. The update already ran inside the captured step, so the
    accelerate optimizer's ``step`` is wrapped once: after a captured step it does nothing (no second update, and
    none of the components' optimizer hooks, whose work the captured step did: mask, revision). The scheduler still
    steps the ``param_groups``' learning rate, which the next captured step reads (off CUDA; on CUDA a changing
    learning rate is refused at construction). What the eager step's hooks log is logged from the captured step's
    outputs: the loss parts, ``revision_updated`` and the Trainer's ``grad_norm`` (the norm before the mask).

    Divergence (``nonfinite_policy="stop"``; "skip" is refused): the captured step's finite flag is read every step;
    off CUDA at once (one host read, as the eager guard's), on CUDA a step late, copied to pinned memory without
    waiting and read after the next step has been queued, so the device never waits for the host; :meth:`flush`
    reads the last one (before a save, at every log). ``sync_host_state`` (before a checkpoint) brings the revision
    model's step and generator to where the eager step's would be.
    """

    def __init__(self, trainer, model: nn.Module):
        from .speed import attack_module

        self.trainer = trainer
        self.accelerated = trainer.optimizer  # what the Trainer's loop calls step() on
        self.optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        self.train_forward = model
        component = trainer.component("revision")
        self.step = CapturedStep.from_arguments(
            trainer.args,
            trainer._unwrapped_model(),  # parameter names as the mask's head exemption names them
            self.optimizer,
            revision=component.ensure() if component is not None else None,  # the component's: it saves it
            train_forward=model,
            attack_net=attack_module(model),
        )
        self.update_ran = False
        self._pending: Optional[Tuple[torch.Tensor, Any, int]] = None  # CUDA: (host flag, event, step) unread
        update = self.accelerated.step

        @functools.wraps(update)  # keeps the marks of torch's learning-rate scheduler on its wrapper of step()
        def step(*args, **kwargs):
            if not self.update_ran:
                return update(*args, **kwargs)
            self.update_ran = False
            self.accelerated._opt_called = True  # what that wrapper records: an update was made (in the capture)
            return None

        self.accelerated.step = step

    def serves(self, trainer, model: nn.Module) -> bool:
        """Whether this step is still the trainer's: the same optimizer object (a new train() prepares a new one,
        a resume loads new state: then the step is built again) and the same training module."""
        return self.accelerated is trainer.optimizer and self.train_forward is model

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        step, metrics = self.step, self.trainer._metrics
        loss = step(x, labels)
        self.update_ran = True
        # copies: once captured, the outputs are static buffers that the next replay overwrites
        for name, value in step.parts.items():
            metrics[name].append(value.clone())
        if step.updated is not None:
            metrics["revision_updated"].append(step.updated.float())
        self._check_finite(step.finite)
        return loss.clone()

    @property
    def grad_norm(self) -> torch.Tensor:
        """The last step's gradient norm before the mask (what the Trainer logs as ``grad_norm``)."""
        return self.step.grad_norm.clone()

    def sync_host_state(self) -> None:
        self.step.sync_host_state()

    def _check_finite(self, finite: torch.Tensor) -> None:
        number = self.trainer.state.global_step + 1
        if finite.device.type != "cuda":
            if not bool(finite):
                self._diverged(number, late=False)
            return
        previous, self._pending = self._pending, None
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        if previous is not None:  # this step is queued: reading the one before does not idle the device
            self._read(previous)
        self._pending = (host, event, number)

    def flush(self) -> None:
        """Read the last step's finite flag still unread (CUDA); raise if its gradient was not finite."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._read(pending)

    def _read(self, pending) -> None:
        host, event, number = pending
        event.synchronize()
        if not bool(host):
            self._diverged(number, late=True)

    def _diverged(self, number: int, late: bool) -> None:
        from .safety import NonFiniteTrainingError

        context = self.trainer._divergence_context()
        raise NonFiniteTrainingError(
            f"training diverged at step {number}: NaN or infinite gradient (the captured step's finite flag, "
            "capture_step=True). That step's update was applied in memory (it runs inside the captured step"
            + (", and the flag is read a step late so the device never waits" if late else "")
            + f"), but nothing from it on is saved{context.get('last_checkpoint', '')}. Likely causes: a learning "
            f"rate too high (learning_rate={context.get('learning_rate')!r}, {context.get('current_lr')!r} at this "
            f"step: try 10x lower), or bad data (NaN/inf pixels or labels). Fix: resume from the last checkpoint with "
            "a lower learning rate; capture_step=False names the tensors (and nonfinite_policy='skip' drops such "
            "steps)."
        )
