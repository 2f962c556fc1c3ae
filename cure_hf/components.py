"""Components: the features a training step can carry besides its method's loss, each behind one interface.

A component owns some argument fields, says from the arguments whether it is on, validates its fields, and plugs
into the step through hooks. The trainer keeps them in one list, in this order, and runs every hook in it:

==================  ===========================================================================================
``divergence``      the divergence guard: a non-finite gradient stops training or skips the step (first, so it
                    reads the gradient before any other hook changes it); always on
``mixup``           mixup/cutmix with timm's ``Mixup`` on the device, before the attack: mixed pixels and soft
                    targets (``mixup_alpha``, ``cutmix_alpha``)
``awp``             adversarial weight perturbation: the weights move to w + v before the training forward, and
                    back right before the optimizer step (``awp_gamma``)
``conservation``    CURE's gradient prominence mask: the least prominent entries of each tensor get no gradient;
                    hard conservation restores them after the step (``conservation``)
``telemetry``       per-layer statistics of the masks (``layer_telemetry``; needs conservation)
``revision``        CURE's revision model: its logits (``r_nat``, ``r_adv``), the consistency term added to the
                    method's loss, and its stochastic moving average after the step (``revision``)
``replicas``        DDP: the BatchNorm statistics of the model and the revision model averaged over the processes
                    after the step; always on
``weight_average``  an exponential moving average of the weights after the step, used by evaluation and saving
                    (``weight_averaging``)
==================  ===========================================================================================

The hooks, in the order one step calls them (each runs over the list in the order above):

0. ``before_attack(batch)``: the batch as loaded, on the device; change its pixels and targets before the attack
   sees them (mixup/cutmix); runs on the efficient variant's clean warm-up steps too;
1. ``prepare(batch)``: the adversarial batch exists; add what the loss will read (the revision logits);
2. ``before_forward(batch)``: change the model for the training forward (AWP perturbs it);
3. ``add_to_loss(batch, inputs, loss, parts)``: add terms to the method's loss (the consistency term);
4. ``after_loss(batch, inputs, scale)``: before the backward (the paper's prominence takes its own gradients);
5. ``before_optimizer_step(optimizer)`` and 6. ``after_optimizer_step(optimizer)``: once per optimizer step, after
   gradient accumulation, on the synchronised gradient; a step the fp16 scaler skips reaches neither.

Besides the step: ``on_optimizer_created``, ``save_state(folder)`` / ``load_state(folder)`` for checkpoints,
``checkpoint_files()`` (what a complete checkpoint must hold), ``card_fields(info)`` (the model card) and
``log_metrics(logs)`` (the training logs). None of the hooks synchronises the host with the device.

Which combinations work (every method x every component) is in docs/extending.md; a combination that cannot work
is refused when the arguments are built (:func:`validate_components`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from .argument_types import check_argument, check_seed
from .attacks import logits_of
from .methods import (
    AdversarialMethod,
    LossInputs,
    get_method,
    registered_methods,
    smoothed_cross_entropy,
    with_consistency,
)
from .prominence import mask_gradients_, paper_score

__all__ = [
    "Component",
    "TrainingBatch",
    "COMPONENTS",
    "components_for",
    "validate_components",
    "resolved_conservation",
    "resolved_revision",
    "CONSERVATION_MODES",
]

CONSERVATION_MODES = ("soft", "hard", "none")
PROMINENCE_MODES = ("loss", "paper")
REVISION_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainingBatch:
    """One micro-batch of a step, as the components see it: pixels, labels, the adversarial batch, the clean
    logits when the attack already computed them with gradient (``attack_reuse_clean_logits``), and the revision
    logits. ``labels``: class indices (B,), or class probabilities (B, C) once mixup/cutmix has mixed the batch
    (as ``F.cross_entropy`` takes either). ``natural``: a clean step of the efficient variant's warm-up (components
    add nothing to it but the mixing)."""

    x: torch.Tensor
    labels: torch.Tensor
    x_adv: Optional[torch.Tensor] = None
    z_nat: Optional[torch.Tensor] = None
    r_nat: Optional[torch.Tensor] = None
    r_adv: Optional[torch.Tensor] = None
    natural: bool = False


def resolved_conservation(args, method: Optional[AdversarialMethod] = None) -> str:
    """``conservation`` with its default: "soft" for a method that conserves by default (CURE), else "none"."""
    if getattr(args, "conservation", None) is not None:
        return args.conservation
    method = method or get_method(args.adv_method)
    return "soft" if "conservation" in method.default_components else "none"


def resolved_revision(args, method: Optional[AdversarialMethod] = None) -> bool:
    """``revision`` with its default: on for a method that revises by default (CURE), else off."""
    if getattr(args, "revision", None) is not None:
        return bool(args.revision)
    method = method or get_method(args.adv_method)
    return "revision" in method.default_components


def _refuse(name: str, value, reason: str, fix: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {reason}. Fix: {fix}")


class Component:
    """The base class; every hook does nothing. ``trainer`` is the `CURETrainer` the component serves."""

    name: ClassVar[str] = ""
    fields: ClassVar[Tuple[str, ...]] = ()  # the argument fields this component owns
    switch: ClassVar[Optional[str]] = None  # the field that turns it on (its "off" values are never refused)

    def __init__(self, trainer):
        self.trainer = trainer
        self.args = trainer.args

    @classmethod
    def enabled(cls, args, method: AdversarialMethod) -> bool:
        return False

    @classmethod
    def reads(cls, args, method: AdversarialMethod) -> Tuple[str, ...]:
        """The fields it reads when on (by default all of its own)."""
        return cls.fields

    @classmethod
    def check_fields(cls, args) -> None:
        """Refuse values of its own fields outside their range (called whether it is on or not)."""

    @classmethod
    def validate(cls, args, method: AdversarialMethod) -> None:
        """Refuse arguments it cannot work with (called only when it is on)."""

    # hooks of the step
    def before_attack(self, batch: TrainingBatch) -> None: ...
    def prepare(self, batch: TrainingBatch) -> None: ...
    def before_forward(self, batch: TrainingBatch) -> None: ...

    def add_to_loss(
        self, batch: TrainingBatch, inputs: LossInputs, loss: torch.Tensor, parts: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return loss, parts

    def after_loss(self, batch: TrainingBatch, inputs: LossInputs, scale: float) -> None: ...
    def before_optimizer_step(self, optimizer) -> None: ...
    def after_optimizer_step(self, optimizer) -> None: ...
    # around the step
    def on_optimizer_created(self, optimizer) -> None: ...
    def save_state(self, folder: str) -> None: ...
    def load_state(self, folder: str) -> None: ...

    def checkpoint_files(self) -> List[Tuple[str, float]]:
        """(file name, from epoch): the files a complete checkpoint written at or after that epoch holds."""
        return []

    def card_fields(self, info: Dict[str, Any]) -> None: ...
    def log_metrics(self, logs: Dict[str, float]) -> None: ...

    # helpers
    @property
    def model(self) -> nn.Module:
        """The working model, unwrapped (no DDP, no torch.compile), as its parameter names are."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model, keep_torch_compile=False)

    def metric(self, name: str, value: torch.Tensor) -> None:
        self.trainer._metrics[name].append(value)


# ------------------------------------------------------------------------------------------- the guard
class DivergenceGuard(Component):
    """A NaN or infinite gradient stops training (``nonfinite_policy="stop"``) or drops the step (``"skip"``);
    see :class:`cure_hf.safety.NonFiniteGuard`."""

    name, fields = "divergence", ("nonfinite_policy",)

    @classmethod
    def enabled(cls, args, method):
        return True

    def __init__(self, trainer):
        super().__init__(trainer)
        from .safety import NonFiniteGuard

        # On a GPU, "stop" reads each step's verdict a step late, so that the step never waits for the device.
        self.guard = NonFiniteGuard(
            self.args.nonfinite_policy,
            lambda: self.model,
            trainer._divergence_context,
            deferred=self.args.nonfinite_policy == "stop" and self.args.device.type == "cuda",
        )

    def before_optimizer_step(self, optimizer):
        self.guard.check(optimizer)


# ---------------------------------------------------------------------------------------------- mixup
MIXUP_MODES = ("batch", "pair", "elem")


class Mixing(Component):
    """Mixup and cutmix with timm's ``Mixup``, on the device batch before the attack: the pixels are mixed and the
    labels become soft targets (class probabilities). The attack then ascends the cross-entropy against the soft
    target, and every cross-entropy term of the method's loss is taken against it; the method must accept soft
    targets (``AdversarialMethod.soft_targets``). ``label_smoothing_factor`` stays in the losses: PyTorch smooths a
    soft target as (1 - s) t + s / C, exactly the target timm's ``Mixup(label_smoothing=s)`` builds, so the two
    compose as in timm. Random draws: numpy's global generator, as timm's (the Trainer's checkpoints keep its state)."""

    switch = "mixup_alpha"
    name = "mixup"
    fields = ("mixup_alpha", "cutmix_alpha", "mixup_prob", "mixup_switch_prob", "mixup_mode")

    @classmethod
    def enabled(cls, args, method):
        return args.mixup_alpha > 0 or args.cutmix_alpha > 0

    @classmethod
    def check_fields(cls, args):
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(args, name)
            check_argument(math.isfinite(value) and value >= 0, name, value, "a Beta(alpha, alpha) alpha >= 0 (0: off)")
        for name in ("mixup_prob", "mixup_switch_prob"):
            value = getattr(args, name)
            check_argument(0.0 <= value <= 1.0, name, value, "a probability in [0, 1]")
        check_argument(args.mixup_mode in MIXUP_MODES, "mixup_mode", args.mixup_mode, f"one of {MIXUP_MODES}")

    @classmethod
    def validate(cls, args, method):
        switch = "mixup_alpha" if args.mixup_alpha > 0 else "cutmix_alpha"
        value = getattr(args, switch)
        if not method.soft_targets:
            _refuse(
                switch,
                value,
                f"mixup/cutmix give soft targets (class probabilities), and adv_method={method.name!r} does not take "
                f"them: {method.soft_targets_refusal or 'its loss reads class indices'}",
                "drop mixup_alpha/cutmix_alpha (label_smoothing_factor keeps hard labels), or use a method whose "
                "loss takes soft targets (clean, pgd, fgsm_rs, trades, cure; a method of yours: soft_targets = True)",
            )
        if method.attack is not None and method.attack.objective == "margin":
            _refuse(
                switch,
                value,
                f"adv_method={method.name!r} attacks the margin of the true class, and a mixed target has two",
                "drop mixup_alpha/cutmix_alpha, or use a method whose attack ascends CE or KL",
            )
        batch = args.per_device_train_batch_size
        if batch % 2 or not args.dataloader_drop_last:
            _refuse(
                switch,
                value,
                f"mixup/cutmix mix each batch with itself reversed (timm's Mixup), which needs an even batch every "
                f"step; per_device_train_batch_size={batch}, dataloader_drop_last={args.dataloader_drop_last}",
                "use an even per_device_train_batch_size and dataloader_drop_last=True",
            )

    def __init__(self, trainer):
        super().__init__(trainer)
        from timm.data import Mixup

        num_classes = getattr(trainer, "model_num_classes", None)
        if not num_classes:
            raise ValueError(
                "mixup/cutmix need the number of classes for their soft targets, and the model declares none and "
                "could not be probed on a training example. Fix: give the model num_classes (timm) or "
                "config.num_labels (transformers), or train on a dataset whose first example can be read"
            )
        args = self.args
        self.mixup = Mixup(
            mixup_alpha=args.mixup_alpha,
            cutmix_alpha=args.cutmix_alpha,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=0.0,  # the losses smooth (class docstring)
            num_classes=num_classes,
        )

    def before_attack(self, batch):
        if len(batch.x) % 2:
            raise ValueError(
                f"mixup/cutmix got a batch of {len(batch.x)} examples; they need an even batch (timm's Mixup). "
                "Fix: an even per_device_train_batch_size with dataloader_drop_last=True"
            )
        # timm mixes in place: a copy, so the loader's tensors (a resident dataset's included) stay as they are
        batch.x, batch.labels = self.mixup(batch.x.clone(), batch.labels)

    def card_fields(self, info):
        for name in self.fields:
            info["hyperparameters"][name] = getattr(self.args, name)


# --------------------------------------------------------------------------------------------------- AWP
class WeightPerturbation(Component):
    """AWP, once per optimizer step: on its first micro-batch the weights move to w + v against the method's own
    training loss (the same objective the step computes, components' terms included) on this batch; the
    perturbation stays for the step's other micro-batches and is removed right before the optimizer step."""

    switch = "awp_gamma"
    name, fields = "awp", ("awp_gamma", "awp_warmup_epochs")

    @classmethod
    def enabled(cls, args, method):
        return args.resolved_awp_gamma is not None

    def __init__(self, trainer):
        super().__init__(trainer)
        from .awp import AdversarialWeightPerturbation

        self.awp = AdversarialWeightPerturbation(self.args.resolved_awp_gamma)

    def before_forward(self, batch):
        trainer = self.trainer
        if batch.natural or (trainer.state.epoch or 0.0) < self.args.resolved_awp_warmup_epochs - 1e-9:
            return
        if self.awp.applied and self.awp.step == trainer.state.global_step:
            return
        self.awp.restore_()  # left over from a step whose optimizer step never ran: nothing to carry over
        net = trainer._attack_net

        def proxy_loss(proxy: nn.Module) -> torch.Tensor:
            with trainer.compute_loss_context_manager():
                z_nat = logits_of(proxy(batch.x)) if trainer.uses_clean_pass else None
                return trainer.training_objective(batch, z_nat, logits_of(proxy(batch.x_adv)))[0]

        _, loss = self.awp.perturb_(net, proxy_loss, step=trainer.state.global_step, reduce=trainer.accelerator.reduce)
        self.metric("awp_proxy_loss", loss)

    def before_optimizer_step(self, optimizer):
        self.awp.restore_()  # the gradient stays the one taken at the perturbed weights

    def card_fields(self, info):
        info["hyperparameters"]["awp_gamma"] = self.args.resolved_awp_gamma
        info["hyperparameters"]["awp_warmup_epochs"] = self.args.resolved_awp_warmup_epochs


# ------------------------------------------------------------------------------------------ conservation
class Conservation(Component):
    """Step 5 of CURE, for any method: zero the gradient entries below each tensor's p-quantile of prominence
    (classifier head exempt), on the accumulated, synchronised gradient. ``soft`` masks only the gradient;
    ``hard`` also restores the conserved entries after the step, bit for bit. ``prominence="paper"`` scores
    entries by alpha |dCE_nat/dw| + (1 - alpha) |dCE_adv/dw| from backward passes of their own."""

    switch = "conservation"
    name = "conservation"
    fields = ("conservation", "conserve_fraction", "prominence", "clean_weight", "head_modules")

    @classmethod
    def enabled(cls, args, method):
        return resolved_conservation(args, method) != "none"

    @classmethod
    def reads(cls, args, method):
        # alpha weighs the paper's prominence score; the loss-gradient score has no weight
        return tuple(f for f in cls.fields if f != "clean_weight" or args.prominence == "paper")

    @classmethod
    def check_fields(cls, args):
        check_argument(0.0 <= args.conserve_fraction < 1.0, "conserve_fraction", args.conserve_fraction, "0 <= p < 1")
        check_argument(args.prominence in PROMINENCE_MODES, "prominence", args.prominence, f"one of {PROMINENCE_MODES}")
        if args.conservation is not None:
            check_argument(
                args.conservation in CONSERVATION_MODES,
                "conservation",
                args.conservation,
                f"one of {CONSERVATION_MODES} or None (the method's default)",
            )
        # head_modules' type (a list of names) is the annotation's, checked first by check_field_types

    @classmethod
    def validate(cls, args, method):
        if args.prominence == "paper" and method.attack is None:
            _refuse(
                "prominence",
                "paper",
                f"the paper's prominence weighs the gradients of the clean and the "
                f"adversarial cross-entropy, and adv_method={method.name!r} has no adversarial batch",
                "use prominence='loss' (|gradient| of the loss), or an adversarial method",
            )

    def __init__(self, trainer):
        super().__init__(trainer)
        from .models import head_parameter_names

        self.mode = resolved_conservation(self.args)
        self.head_names = head_parameter_names(self.model, self.args.head_modules)
        self.observers: List[Any] = []  # begin(net, params) / observe(p, mask) / end(): e.g. layer telemetry
        self._conserved: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._paper_grads: Optional[List[List[torch.Tensor]]] = None  # [clean, adv] sums, paper prominence
        self._paper_grads_step = -1  # global_step the sums belong to

    def maskable_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if p.requires_grad and n not in self.head_names]

    def after_loss(self, batch, inputs, scale):
        if self.args.prominence != "paper" or batch.natural:
            return
        # The hook's own list, so scores and gradients pair up. Under fp16 these backward passes need the loss
        # scale as much as the main one does (they would underflow otherwise); it is divided out again in fp32.
        params = self.maskable_parameters()
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        sums = []
        for logits in (inputs.z_nat, inputs.z_adv):
            ce = smoothed_cross_entropy(logits, inputs.labels, self.args.label_smoothing_factor)
            grads = torch.autograd.grad(ce * (scale * loss_scale), params, retain_graph=True, allow_unused=True)
            sums.append(
                [torch.zeros_like(p) if g is None else g.float().div_(loss_scale) for p, g in zip(params, grads)]
            )
        step = self.trainer.state.global_step
        if self._paper_grads is not None and self._paper_grads_step != step:
            self._paper_grads = None  # left over from a step the fp16 scaler skipped: its hook never ran
        self._paper_grads_step = step
        if self._paper_grads is None:
            self._paper_grads = sums
        else:
            for acc, new in zip(self._paper_grads, sums):
                torch._foreach_add_(acc, new)

    def _paper_scores(self, params) -> List[torch.Tensor]:
        if self._paper_grads is None:
            raise RuntimeError("prominence='paper' found no accumulated clean/adversarial gradients this step")
        clean, adv = self._paper_grads
        self._paper_grads = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # The global gradient, as the update's own gradient is: one collective for all tensors, averaged.
            grads = clean + adv
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat.div_(torch.distributed.get_world_size())
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        return [paper_score(c, a, self.args.clean_weight) for c, a in zip(clean, adv)]

    @torch.no_grad()
    def before_optimizer_step(self, optimizer):
        if self.trainer.in_natural_warmup:  # efficient variant: plain training until the switch, nothing conserved
            return
        params = self.maskable_parameters()
        scores = self._paper_scores(params) if self.args.prominence == "paper" else None
        for observer in self.observers:
            observer.begin(self.model, params)

        def observe(p, mask):
            for observer in self.observers:
                observer.observe(p, mask)

        if self.mode != "hard":
            mask_gradients_(params, self.args.conserve_fraction, scores, on_mask=observe)  # keep no mask
        else:
            # Hard conservation keeps one parameter-sized buffer: the conserved values, NaN elsewhere. No mask is
            # kept and nothing is indexed by a mask, so no host synchronisation (a conserved entry that is already
            # NaN is left to the optimizer: it stays NaN either way).
            self._conserved = []

            def conserve(p, mask):
                self._conserved.append((p, torch.where(mask, p.detach(), float("nan"))))
                observe(p, mask)

            mask_gradients_(params, self.args.conserve_fraction, scores, on_mask=conserve)
        for observer in self.observers:
            observer.end()

    @torch.no_grad()
    def after_optimizer_step(self, optimizer):
        for p, saved in self._conserved:
            p.copy_(torch.where(saved.isnan(), p, saved))
        self._conserved = []

    def card_fields(self, info):
        hyper = info["hyperparameters"]
        hyper["conservation"] = self.mode
        hyper["conserve_fraction"] = self.args.conserve_fraction
        hyper["prominence"] = self.args.prominence
        if self.args.prominence == "paper":
            hyper["clean_weight"] = self.args.clean_weight


class LayerTelemetryComponent(Component):
    """Per block, the fraction of entries the mask updates and the share of gradient magnitude (`telemetry/*`)."""

    switch = "layer_telemetry"
    name, fields = "telemetry", ("layer_telemetry",)

    @classmethod
    def enabled(cls, args, method):
        return bool(args.layer_telemetry)

    @classmethod
    def validate(cls, args, method):
        if resolved_conservation(args, method) == "none":
            _refuse(
                "layer_telemetry",
                True,
                "it records what the conservation mask updates, and conservation is "
                f"off for adv_method={method.name!r}",
                "switch conservation on (conservation='soft') or drop layer_telemetry",
            )

    def __init__(self, trainer):
        super().__init__(trainer)
        from .telemetry import LayerTelemetry

        self.telemetry = LayerTelemetry()
        trainer.component("conservation").observers.append(self.telemetry)

    def log_metrics(self, logs):
        logs.update(self.telemetry.flush())


# ---------------------------------------------------------------------------------------------- revision
class Revision(Component):
    """CURE's revision model g for any method: its logits r_nat = g(x), r_adv = g(x_adv) without gradient, the
    consistency term gamma [KL(r_nat || z_nat) + KL(r_adv || z_adv)] added to the method's loss, and after every
    optimizer step, with probability r from a generator of its own, g <- m g + (1 - m) f. The revision model is
    created from the working weights at the first step (after the efficient variant's warm-up)."""

    switch = "revision"
    name = "revision"
    fields = (
        "revision",
        "consistency_weight",
        "revision_rate",
        "revision_decay",
        "revision_rate_schedule",
        "revision_seed",
        "revision_train_mode",
    )

    @classmethod
    def enabled(cls, args, method):
        return resolved_revision(args, method)

    @classmethod
    def check_fields(cls, args):
        gamma = args.consistency_weight
        check_argument(math.isfinite(gamma) and gamma >= 0.0, "consistency_weight", gamma, "a finite gamma >= 0")
        check_argument(0.0 <= args.revision_rate <= 1.0, "revision_rate", args.revision_rate, "0 <= r <= 1")
        check_argument(0.0 <= args.revision_decay < 1.0, "revision_decay", args.revision_decay, "0 <= d < 1")
        check_argument(
            args.revision_rate_schedule in REVISION_SCHEDULES,
            "revision_rate_schedule",
            args.revision_rate_schedule,
            f"one of {REVISION_SCHEDULES}",
        )
        check_seed("revision_seed", args.revision_seed)
        # revision's type (True, False or None) is the annotation's, checked first by check_field_types

    def __init__(self, trainer):
        super().__init__(trainer)
        self.revision = None  # a RevisionModel, created at the first step
        self._checkpoint: Optional[str] = None  # resume: the folder whose revision state is still to load

    def ensure(self):
        from .revision import RevisionModel

        if self.revision is None:
            args = self.args
            self.revision = RevisionModel(
                self.model,
                rate=args.revision_rate,
                decay=args.revision_decay,
                seed=args.resolved_revision_seed,
                train_mode=args.revision_train_mode,
            )
            if self._checkpoint is not None:  # resume: the checkpoint's revision weights, step, generator
                self.revision.load(self._checkpoint)
                self._checkpoint = None
        return self.revision

    def prepare(self, batch):
        if batch.natural:
            return
        revision = self.ensure()  # the teacher's logits: no gradient, independent of the working weights
        with self.trainer.compute_loss_context_manager():
            batch.r_nat = logits_of(revision(batch.x))
            batch.r_adv = logits_of(revision(batch.x_adv)) if batch.x_adv is not None else None

    def add_to_loss(self, batch, inputs, loss, parts):
        if batch.natural:
            return loss, parts
        return with_consistency(
            (loss, parts), inputs.z_nat, inputs.z_adv, batch.r_nat, batch.r_adv, self.args.consistency_weight
        )

    def rate(self) -> float:
        """r at this step: constant, or decayed linearly or by a cosine from the start of the method to the end."""
        args, state = self.args, self.trainer.state
        if args.revision_rate_schedule == "constant" or not state.max_steps:
            return args.revision_rate
        start = self.trainer._method_start_step or 0
        progress = min(1.0, max(0.0, (state.global_step - start) / max(1, state.max_steps - start)))
        if args.revision_rate_schedule == "cosine":
            return args.revision_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
        return args.revision_rate * (1.0 - progress)

    @torch.no_grad()
    def after_optimizer_step(self, optimizer):
        if self.revision is not None and not self.trainer.in_natural_warmup:
            updated = self.revision.step_(self.trainer.accelerator.unwrap_model(self.trainer.model), self.rate())
            self.metric("revision_updated", torch.tensor(float(updated)))

    def save_state(self, folder):
        if self.revision is not None:
            self.revision.save(folder, schedule={"method_start_step": self.trainer._method_start_step})

    def load_state(self, folder):
        from .revision import REVISION_WEIGHTS_NAME, RevisionModel

        if os.path.isfile(os.path.join(folder, REVISION_WEIGHTS_NAME)):
            self.trainer._method_start_step = RevisionModel.read_schedule(folder).get("method_start_step")
            self._checkpoint = folder
            if self.revision is not None:
                self.revision.load(folder)
                self._checkpoint = None
        # (a checkpoint written during a natural warm-up has no revision yet: it is created at the switch)
        elif not self.args.natural_warmup_epochs and not self.args.allow_partial_resume:
            raise ValueError(
                f"resume_from_checkpoint={folder!r} has no {REVISION_WEIGHTS_NAME}, which the revision model of "
                f"adv_method={self.args.adv_method!r} needs to resume; resume from a checkpoint written by "
                "CURETrainer with save_only_model=False"
            )

    def checkpoint_files(self):
        from .revision import REVISION_WEIGHTS_NAME

        return [(REVISION_WEIGHTS_NAME, float(self.args.natural_warmup_epochs))]

    def card_fields(self, info):
        hyper, args = info["hyperparameters"], self.args
        hyper["revision"] = True
        for name in ("consistency_weight", "revision_rate", "revision_decay"):
            hyper[name] = getattr(args, name)
        if args.revision_rate_schedule != "constant":
            hyper["revision_rate_schedule"] = args.revision_rate_schedule


class ReplicaStatistics(Component):
    """DDP: BatchNorm running statistics of the model and the revision model, averaged over the processes after
    every optimizer step (the buffers are not broadcast: several forward passes precede one backward)."""

    name = "replicas"

    @classmethod
    def enabled(cls, args, method):
        return True

    def after_optimizer_step(self, optimizer):
        from .runtime import average_running_stats_

        net = self.trainer.accelerator.unwrap_model(self.trainer.model)
        revision = self.trainer.revision
        average_running_stats_(list(net.modules()) + (list(revision.module.modules()) if revision is not None else []))


# ------------------------------------------------------------------------------------- weight averaging
class WeightAveraging(Component):
    """An exponential moving average of the weights and BatchNorm statistics after every optimizer step
    (:class:`cure_hf.averaging.WeightAverage`); evaluation, best-model selection, saving and pushing use it."""

    switch = "weight_averaging"
    name, fields = "weight_average", ("weight_averaging",)

    @classmethod
    def enabled(cls, args, method):
        return args.weight_averaging_decay is not None

    def __init__(self, trainer):
        super().__init__(trainer)
        self.average = None  # a WeightAverage, created with the optimizer or from a checkpoint

    def create(self):
        from .averaging import WeightAverage

        if self.average is None:
            self.average = WeightAverage(self.model, self.args.weight_averaging_decay)
        return self.average

    def on_optimizer_created(self, optimizer):
        self.create()

    @torch.no_grad()
    def after_optimizer_step(self, optimizer):
        if self.average is not None:
            self.average.update_(self.model)

    def save_state(self, folder):
        if self.average is not None:
            self.average.save(folder, self.model)

    def load_state(self, folder):
        import logging

        from .averaging import WEIGHT_AVERAGE_NAME

        if os.path.isfile(os.path.join(folder, WEIGHT_AVERAGE_NAME)):
            self.create().load(folder, self.model)
        else:
            logging.getLogger(__name__).warning(
                "%s has no %s: weight averaging starts from its weights now", folder, WEIGHT_AVERAGE_NAME
            )

    def checkpoint_files(self):
        from .averaging import WEIGHT_AVERAGE_NAME

        return [(WEIGHT_AVERAGE_NAME, 0.0)]

    def card_fields(self, info):
        decay = self.args.weight_averaging_decay
        info["weight_averaging"] = {
            "decay": decay,
            "decay_warmup": "min(decay, (1 + t) / (10 + t))",
            "buffers_averaged": True,
        }
        info["hyperparameters"]["weight_averaging"] = decay


# The order the trainer runs them in (module docstring).
COMPONENTS: Tuple[Type[Component], ...] = (
    DivergenceGuard,
    Mixing,
    WeightPerturbation,
    Conservation,
    LayerTelemetryComponent,
    Revision,
    ReplicaStatistics,
    WeightAveraging,
)


def components_for(args, method: Optional[AdversarialMethod] = None) -> List[Type[Component]]:
    """The component classes that are on for these arguments, in the trainer's order."""
    method = method or get_method(args.adv_method)
    return [c for c in COMPONENTS if c.enabled(args, method)]


_SWITCHES = tuple(c.switch for c in COMPONENTS if c.switch)


def runs_clean_pass(args, method: Optional[AdversarialMethod] = None) -> bool:
    """Whether the step runs the clean training forward: the method's loss reads z_nat, or revision does (its
    consistency term compares the clean predictions), or conservation with the paper's prominence (its score)."""
    method = method or get_method(args.adv_method)
    return (
        method.uses_clean_pass
        or resolved_revision(args, method)
        or (resolved_conservation(args, method) != "none" and getattr(args, "prominence", "loss") == "paper")
    )


def owned_fields() -> Dict[str, List[str]]:
    """Every argument field that belongs to a method or a component: field -> the owners' names."""
    owners: Dict[str, List[str]] = {}
    for method in registered_methods().values():
        for name in method.hyperparameters:
            owners.setdefault(name, []).append(f"adv_method={method.name!r}")
    for component in COMPONENTS:
        for name in component.fields:
            owners.setdefault(name, []).append(f"the {component.name} component")
    return owners


def validate_components(args, method: Optional[AdversarialMethod] = None) -> None:
    """The one place that decides which fields a run reads: each enabled component validates its fields, and a
    field given a non-default value that nothing in this run reads (a method's hyperparameter or a component's
    field) is refused with the reason, instead of being silently ignored."""
    method = method or get_method(args.adv_method)
    for component in COMPONENTS:
        component.check_fields(args)
    enabled = components_for(args, method)
    for component in enabled:
        component.validate(args, method)
    read = set(method.hyperparameters)
    for component in enabled:
        read.update(component.reads(args, method))
    defaults = {f.name: f.default for f in fields(args)}
    for name, owners in owned_fields().items():
        if name in read or name not in defaults or getattr(args, name) == defaults[name]:
            continue
        if name in _SWITCHES:  # a switch set to "off" where the component is off says the same thing twice
            continue
        raise ValueError(
            f"{name}={getattr(args, name)!r} is invalid with adv_method={method.name!r}: it is read by "
            f"{' and '.join(owners)}, which this run does not use, so it would be silently ignored. Fix: "
            f"drop {name}, or switch on what reads it ({_how_to_enable(name)})."
        )


def _how_to_enable(name: str) -> str:
    """How to switch on what reads ``name``: only fields of the conservation and revision components and the
    methods' hyperparameters get here (the other components' fields are their switches, or parsed with them)."""
    if name == "clean_weight":
        return "adv_method='cure', or conservation with prominence='paper'"
    if name in Conservation.fields:
        return "conservation='soft' (or 'hard')"
    if name in Revision.fields:
        return "revision=True"
    users = [m.name for m in registered_methods().values() if name in m.hyperparameters]
    return "adv_method=" + " or ".join(repr(u) for u in users)


def method_argument_names(args, method: Optional[AdversarialMethod] = None) -> Tuple[str, ...]:
    """The fields a resume must keep (the checkpoint's values): the method, its attack, its hyperparameters, the
    component switches and every enabled component's fields."""
    method = method or get_method(args.adv_method)
    names = [
        "adv_method",
        "epsilon",
        "attack_step_size",
        "attack_steps",
        "attack_random_start",
        "natural_warmup_epochs",
        "label_smoothing_factor",
        "lr_step_epochs",
        "lr_step_factor",
        "conservation",
        "revision",
        "method_options",
    ]
    names += list(method.hyperparameters)
    for component in components_for(args, method):
        names += [n for n in component.reads(args, method) if n not in names]
    return tuple(dict.fromkeys(names))


def component_switch_values(args, method: AdversarialMethod) -> Dict[str, Any]:
    """The component switches with their defaults resolved, as the resume check compares them."""
    return {"conservation": resolved_conservation(args, method), "revision": resolved_revision(args, method)}
