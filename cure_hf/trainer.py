"""CURETrainer: adversarial training (CURE, TRADES, PGD-AT, MART, FGSM-RS, or a method of your own) inside
transformers' Trainer.

One CURE step, as in the spec (shared CURE_SPEC.md, section 2), and who does it:
1. attack: PGD on the TRADES KL with the model in eval mode, no parameter gradients (`training_step`, from the
   method's attack spec);
2. four forward passes: z_nat = f(x), z_adv = f(x_adv) (`compute_loss`); r_nat = g(x), r_adv = g(x_adv) without
   gradient (the revision component);
3. loss: the method's loss, alpha CE(z_nat) + (1 - alpha) CE(z_adv), plus the revision component's
   gamma [KL(r_nat || z_nat) + KL(r_adv || z_adv)] (`compute_loss`);
4. one backward pass: the Trainer's own `training_step` (accumulation scaling, empty-cache steps, schedule-free
   optimizers, the accelerator's backward);
5. conserve / update: the conservation component, an optimizer pre-step hook that zeroes the gradient entries
   below each tensor's p-quantile of prominence (classifier head exempt), on the accumulated, synchronised gradient;
6. the optimizer step (hard conservation: conserved entries restored bit-for-bit afterwards);
7. revise: the revision component, an optimizer post-step hook that averages f into g with probability r.
Masking and revision live in optimizer hooks so they run exactly once per optimizer step, whatever the gradient
accumulation, and never on a step the fp16 scaler skipped. Every method can switch conservation and revision on,
and CURE can switch them off (the paper's ablations); cure_hf/components.py lists the components and their order.

The overrides here: `training_step` crafts the adversarial batch, lets the components prepare it, and hands over
to `Trainer.training_step`; `compute_loss` runs the training forwards and asks the method for its loss;
`create_scheduler` adds the paper's step schedule. Everything else that departs from the Trainer (robust
evaluation, saving, resuming, pushing, the optimizer defaults, the hook bus) is in `RobustTrainer`
(base_trainer.py).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from transformers.trainer_utils import has_length

from .attacks import logits_of
from .base_trainer import RobustTrainer
from .components import TrainingBatch, runs_clean_pass
from .config import CURETrainingArguments
from .methods import LossInputs, warmed_up_attack
from .runtime import check_clean_logits_reusable, check_train_eval_forwards_agree
from .speed import attack_module

__all__ = ["CURETrainer"]


class CURETrainer(RobustTrainer):
    """A `transformers.Trainer` whose training step is adversarial training; see `CURETrainingArguments`.

    The model takes `pixel_values` in [0, 1] (normalisation inside the model) and returns logits or an
    output with `.logits`: a timm `nn.Module` (e.g. from `cure_hf.create_model`) or a transformers
    image-classification model. Batches are `{"pixel_values", "labels"}`.
    """

    def __init__(self, model: nn.Module, args: CURETrainingArguments, *pos, **kwargs):
        super().__init__(model, args, *pos, **kwargs)
        # The method's losses are batch means: the Trainer divides them by the accumulation steps (it would not,
        # for a model whose forward takes loss kwargs, expecting a loss summed over `num_items_in_batch`).
        self.model_accepts_loss_kwargs = False
        self._method_start_step: Optional[int] = None  # efficient variant: global_step of the switch to the method
        self._batch: Optional[TrainingBatch] = None  # what training_step prepared for compute_loss
        self._attack_net: Optional[nn.Module] = None
        if args.channels_last and self.model is not None:
            self.model.to(memory_format=torch.channels_last)
        if args.attack_reuse_clean_logits:
            check_clean_logits_reusable(args.adv_method, self.method.attack)
        self._forwards_checked = False  # attack_reuse_clean_logits: train and eval forwards compared on batch 1
        self._uses_clean_pass = runs_clean_pass(args, self.method)  # fixed by the arguments: decided once
        if args.lr_step_milestones and self.train_dataset is not None and not has_length(self.train_dataset):
            raise ValueError(
                f"lr_step_epochs={args.lr_step_epochs!r} needs the length of an epoch, and the training set has none "
                f"({type(self.train_dataset).__name__}, e.g. a streamed dataset). Fix: drop lr_step_epochs and use "
                "the Trainer's schedules over max_steps (lr_scheduler_type='cosine', ...), or train on a sized dataset"
            )

    @property
    def uses_clean_pass(self) -> bool:
        """Whether the step runs the clean training forward: the method's loss or a component reads z_nat."""
        return self._uses_clean_pass

    # ------------------------------------------- the efficient variant's warm-up, the paper's step schedule
    @property
    def in_natural_warmup(self) -> bool:
        """True while the efficient variant still trains with the clean loss (epoch < natural_warmup_epochs)."""
        warmup = self.args.natural_warmup_epochs
        return bool(warmup) and (self.state.epoch or 0.0) < warmup - 1e-9

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        """`lr_step_epochs` set: the paper's step schedule (lr x lr_step_factor at those epochs), else the Trainer's."""
        milestones = self.args.lr_step_milestones
        if self.lr_scheduler is not None or not milestones:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = self.optimizer if optimizer is None else optimizer
        samples_per_step = self.args.train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        steps_per_epoch = (
            max(1, math.ceil(len(self.train_dataset) / samples_per_step))
            if self.train_dataset is not None
            else max(1, num_training_steps // max(1, math.ceil(self.args.num_train_epochs)))  # no data: epochs given
        )
        self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [int(round(e * steps_per_epoch)) for e in milestones], gamma=self.args.lr_step_factor
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------------- training step
    def craft_adversarial(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, clean_logits: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Step 1: the method's training attack, in eval mode, on the unwrapped module (DDP never sees it); eps
        ramped up over the first `attack_warmup_epochs`. `labels`: class indices, or mixup's class probabilities
        (the CE objective is then against them)."""
        settings = warmed_up_attack(self.args.attack_settings, self.state.epoch or 0.0, self.args.attack_warmup_epochs)
        # self.speed.pgd replays a captured CUDA graph of the K steps when attack_cuda_graph is on, else is attacks.pgd
        return self.method.attack.craft(model, x, labels, settings, clean_logits=clean_logits, pgd_fn=self.speed.pgd)

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Craft the adversarial batch and let the components prepare the step; `Trainer.training_step` then
        computes the loss (`compute_loss`) and does the backward. With `capture_step`, everything after the batch
        transforms is one captured step (`_captured_training_step`)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        x, labels = inputs["pixel_values"], inputs["labels"]
        self.speed.check_pixels(x)  # no device sync: batches were checked on the CPU by the collator
        if self.args.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # the attack's module: no DDP; the compiled module when compiled (never rewires the training model)
        self._attack_net = net = attack_module(model)
        batch = TrainingBatch(x=x, labels=labels, natural=self.in_natural_warmup)
        for component in self.components:
            component.before_attack(batch)  # mixup/cutmix: mixed pixels, soft targets
        if self.args.capture_step:  # refused with a natural warm-up: never a clean step here
            return self._captured_training_step(model, batch)
        if not batch.natural:
            if self.args.natural_warmup_epochs and self._method_start_step is None:
                self._method_start_step = self.state.global_step
                self._restart_weight_average()  # the average is of the method's weights, not of the warm-up's
            if self.args.attack_reuse_clean_logits:  # train == eval forward: one clean pass serves both
                if not self._forwards_checked:
                    check_train_eval_forwards_agree(net, batch.x)
                    self._forwards_checked = True
                with self.compute_loss_context_manager():
                    batch.z_nat = logits_of(model(batch.x))
            if self.method.attack is not None:
                clean_logits = None if batch.z_nat is None else batch.z_nat.detach()
                batch.x_adv = self.craft_adversarial(net, batch.x, batch.labels, clean_logits)
            for component in self.components:
                component.prepare(batch)
            for component in self.components:
                component.before_forward(batch)
        self._batch = batch
        try:
            prepared = {"pixel_values": batch.x, "labels": batch.labels}
            return super().training_step(model, prepared, num_items_in_batch)
        finally:
            self._batch = None

    def _captured_training_step(self, model: nn.Module, batch: TrainingBatch) -> torch.Tensor:
        """`capture_step`: the attack, the forwards, the loss, the backward, the mask, the update and the revision
        as one captured step (`cure_hf.capture.TrainerCapturedStep`, built at the first step and again for a new
        optimizer or a resume); the Trainer's `optimizer.step()` that follows is then a no-op."""
        from .capture import TrainerCapturedStep

        if self._captured_step is None or not self._captured_step.serves(self, model):
            self._captured_step = TrainerCapturedStep(self, model)
        return self._captured_step(batch.x, batch.labels)

    # Replaces Trainer.compute_loss on purpose: the loss is the method's on the batch training_step prepared, not
    # the model's own loss on `inputs`.
    def compute_loss(
        self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        """Steps 2 and 3: the training forwards and the method's loss with the components' terms, on the batch
        that `training_step` prepared. A batch mean: the Trainer divides it by the accumulation steps."""
        batch = self._batch
        if batch is None:
            raise RuntimeError(
                "CURETrainer.compute_loss runs inside CURETrainer.training_step, which crafts the "
                "adversarial batch first; call trainer.training_step(model, inputs)"
            )
        if batch.natural:  # efficient variant: clean training until the switch
            z_nat, z_adv = logits_of(model(batch.x)), None
            loss, parts = self.method_loss(LossInputs(batch.labels, z_nat), method=_natural_training())
        else:
            z_nat = batch.z_nat
            if z_nat is None and self.uses_clean_pass:
                z_nat = logits_of(model(batch.x))
            z_adv = logits_of(model(batch.x_adv)) if batch.x_adv is not None else None
            loss, parts = self.training_objective(batch, z_nat, z_adv)
            scale = 1.0 / self.current_gradient_accumulation_steps
            inputs_seen = LossInputs(batch.labels, z_nat, z_adv, batch.r_nat, batch.r_adv)
            for component in self.components:
                component.after_loss(batch, inputs_seen, scale)
        for name, value in parts.items():
            self._metrics[name].append(value)
        return (loss, {"logits": z_adv if z_adv is not None else z_nat}) if return_outputs else loss

    def method_loss(self, inputs: LossInputs, method=None):
        """The method's own loss with its hyperparameters from the arguments."""
        method = self.method if method is None else method
        return method.loss(inputs, method.hyperparameter_values(self.args))

    def training_objective(self, batch: TrainingBatch, z_nat: Optional[torch.Tensor], z_adv: Optional[torch.Tensor]):
        """What the step minimises: the method's loss plus every component's term (AWP's proxy minimises it too)."""
        inputs = LossInputs(batch.labels, z_nat, z_adv, batch.r_nat, batch.r_adv)
        loss, parts = self.method_loss(inputs)
        for component in self.components:
            loss, parts = component.add_to_loss(batch, inputs, loss, parts)
        return loss, parts


def _natural_training():
    from .methods import get_method

    return get_method("clean")
