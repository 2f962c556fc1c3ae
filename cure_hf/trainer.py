"""CURETrainer: adversarial training (CURE, TRADES, PGD-AT, MART, FGSM-RS) inside transformers' Trainer.

One CURE step, as in the spec (shared CURE_SPEC.md, section 2):
1. attack: PGD on the TRADES KL with the model in eval mode, no parameter gradients;
2. four forward passes: z_nat = f(x), z_adv = f(x_adv); r_nat = g(x), r_adv = g(x_adv) without gradient;
3. loss: alpha CE(z_nat) + (1 - alpha) CE(z_adv) + gamma [KL(r_nat || z_nat) + KL(r_adv || z_adv)];
4. one backward pass through the accelerator;
5. conserve / update: an optimizer pre-step hook zeroes the gradient entries below each tensor's
   p-quantile of prominence (classifier head exempt), on the accumulated, synchronised gradient;
6. the optimizer step (hard conservation: conserved entries restored bit-for-bit afterwards);
7. revise: an optimizer post-step hook averages f into g with probability r.
Masking and revision live in optimizer hooks so they run exactly once per optimizer step, whatever
the gradient accumulation, and never on a step the fp16 scaler skipped.

The Trainer overrides that are not the method (robust evaluation, saving, resuming, pushing, the optimizer
defaults) live in `RobustTrainer` (base_trainer.py); this file overrides `create_optimizer` (to attach the
hooks), `create_scheduler` (the paper's step schedule), `training_step` and `log`.

Beyond the paper, for every method (docs/beyond.md): with `awp_gamma`, between steps 1 and 2 the weights move
to w + v against the method's own loss (cure_hf/awp.py) and the pre-step hook puts w back before step 5, so the
mask and the step see the gradient taken at w + v; with `weight_averaging`, after step 7 the base trainer folds
the weights into their moving average.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .attacks import logits_of
from .awp import AdversarialWeightPerturbation
from .base_trainer import RobustTrainer
from .config import CURETrainingArguments
from .methods import LossInputs, smoothed_cross_entropy, warmed_up_attack
from .models import head_parameter_names
from .prominence import mask_gradients_, paper_score
from .revision import REVISION_WEIGHTS_NAME, RevisionModel
from .runtime import average_running_stats_, check_clean_logits_reusable, check_train_eval_forwards_agree
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
        self.head_names = head_parameter_names(model, args.head_modules)
        self.revision: Optional[RevisionModel] = None
        self._revision_checkpoint: Optional[str] = None  # resume: the folder whose revision state is still to load
        self._paper_grads: Optional[List[List[torch.Tensor]]] = None  # [clean, adv] sums, paper prominence
        self._paper_grads_step = -1  # global_step the sums belong to
        self._conserved: List[Any] = []
        # Efficient variant (natural warm-up, then the method) and per-layer telemetry.
        self._method_start_step: Optional[int] = None  # global_step of the switch from warm-up to the method
        self.telemetry = None
        if args.layer_telemetry and self.method.uses_revision:
            from .telemetry import LayerTelemetry

            self.telemetry = LayerTelemetry()
        # Speed options.
        if args.channels_last and self.model is not None:
            self.model.to(memory_format=torch.channels_last)
        if args.attack_reuse_clean_logits:
            check_clean_logits_reusable(args.adv_method, self.method.attack)
        self._forwards_checked = False  # attack_reuse_clean_logits: train and eval forwards compared on batch 1
        gamma = args.resolved_awp_gamma  # adversarial weight perturbation (cure_hf/awp.py)
        self.awp = AdversarialWeightPerturbation(gamma) if gamma is not None else None

    # ----------------------------------------------------------------- optimizer and its hooks
    @torch.no_grad()
    def _before_optimizer_step(self) -> None:
        """AWP: the unperturbed weights back (the gradient stays the one taken at the perturbed weights); then
        step 5, conserve / update, on that gradient and, for hard conservation, the unperturbed values."""
        super()._before_optimizer_step()
        if self.awp is not None:
            self.awp.restore_()
        if self.method.uses_revision:
            self._conserve_and_update()

    def _maskable_parameters(self) -> List[torch.nn.Parameter]:
        net = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)  # names as in head_names
        return [p for n, p in net.named_parameters() if p.requires_grad and n not in self.head_names]

    @torch.no_grad()
    def _conserve_and_update(self) -> None:
        """Step 5: zero the conserved gradient entries; remember them for hard conservation."""
        if self.in_natural_warmup:  # efficient variant: plain training until the switch, nothing conserved
            return
        params = self._maskable_parameters()
        scores = None
        if self.args.prominence == "paper":
            scores = self._paper_scores(params)
        telemetry = self.telemetry
        if telemetry is not None:
            telemetry.begin(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), params)
        observe = telemetry.observe if telemetry is not None else (lambda *_: None)
        if self.args.conservation != "hard":
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
        if telemetry is not None:
            telemetry.end()

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
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return [paper_score(c, a, self.args.clean_weight) for c, a in zip(clean, adv)]

    @torch.no_grad()
    def _after_optimizer_step(self) -> None:
        """Hard conservation (restore conserved entries), then step 7: revise; keep DDP replicas' buffers equal;
        then the base trainer's weight averaging, on the replicas' common weights and statistics."""
        for p, saved in self._conserved:
            p.copy_(torch.where(saved.isnan(), p, saved))
        self._conserved = []
        net = self.accelerator.unwrap_model(self.model)
        if self.method.uses_revision and self.revision is not None and not self.in_natural_warmup:
            updated = self.revision.step_(net, self._revision_rate())
            self._metrics["revision_updated"].append(torch.tensor(float(updated)))
        self._average_running_stats_across_processes(net)
        super()._after_optimizer_step()

    def _average_running_stats_across_processes(self, net: nn.Module) -> None:
        """DDP: BatchNorm running statistics of the model and the revision model, averaged over processes."""
        revision = list(self.revision.module.modules()) if self.revision is not None else []
        average_running_stats_(list(net.modules()) + revision)

    def _revision_rate(self) -> float:
        schedule = self.args.revision_rate_schedule
        if schedule == "constant" or not self.state.max_steps:
            return self.args.revision_rate
        # The decay runs from the start of the method (after a natural warm-up, from the switch) to the end.
        start = self._method_start_step or 0
        progress = min(1.0, max(0.0, (self.state.global_step - start) / max(1, self.state.max_steps - start)))
        if schedule == "cosine":
            return self.args.revision_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.args.revision_rate * (1.0 - progress)

    # ------------------------------------------- the efficient variant's warm-up, the paper's step schedule
    @property
    def in_natural_warmup(self) -> bool:
        """True while the efficient variant still trains with the clean loss (epoch < natural_warmup_epochs)."""
        warmup = self.args.natural_warmup_epochs
        return bool(warmup) and (self.state.epoch or 0.0) < warmup - 1e-9

    def _natural_warmup_step(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A clean cross-entropy step; the revision model does not exist yet (it is created at the switch)."""
        with self.compute_loss_context_manager():
            loss = smoothed_cross_entropy(logits_of(model(x)), labels, self.args.label_smoothing_factor)
        loss = loss / self.current_gradient_accumulation_steps
        self.accelerator.backward(loss)
        return loss.detach()

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        """`lr_step_epochs` set: the paper's step schedule (lr x lr_step_factor at those epochs), else the Trainer's."""
        milestones = self.args.lr_step_milestones
        if self.lr_scheduler is not None or not milestones:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = self.optimizer if optimizer is None else optimizer
        samples_per_step = self.args.train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        steps_per_epoch = max(1, math.ceil(len(self.train_dataset) / samples_per_step)) if self.train_dataset is not None \
            else max(1, num_training_steps // max(1, math.ceil(self.args.num_train_epochs)))
        self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [int(round(e * steps_per_epoch)) for e in milestones], gamma=self.args.lr_step_factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------------- training step
    def _ensure_revision(self) -> RevisionModel:
        if self.revision is None:
            self.revision = RevisionModel(
                self.accelerator.unwrap_model(self.model, keep_torch_compile=False), rate=self.args.revision_rate,
                decay=self.args.revision_decay, seed=self.args.resolved_revision_seed,
                train_mode=self.args.revision_train_mode,
            )
            if self._revision_checkpoint is not None:  # resume: the checkpoint's revision weights, step, generator
                self.revision.load(self._revision_checkpoint)
                self._revision_checkpoint = None
        return self.revision

    def craft_adversarial(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, clean_logits: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Step 1: the method's training attack, in eval mode, on the unwrapped module (DDP never sees it); eps
        ramped up over the first `attack_warmup_epochs`."""
        settings = warmed_up_attack(self.args.attack_settings, self.state.epoch or 0.0, self.args.attack_warmup_epochs)
        # self.speed.pgd replays a captured CUDA graph of the K steps when attack_cuda_graph is on, else is attacks.pgd
        return self.method.craft(model, x, labels, settings, clean_logits=clean_logits, pgd_fn=self.speed.pgd)

    def _method_loss(self, labels, z_nat, z_adv, r_nat, r_adv):
        """Step 3: the method's loss and its logged parts, with the hyperparameters from the arguments."""
        args = self.args
        return self.method.loss(LossInputs(
            labels=labels, z_nat=z_nat, z_adv=z_adv, r_nat=r_nat, r_adv=r_adv, beta=args.trades_beta,
            alpha=args.clean_weight, gamma=args.consistency_weight, prominence=args.prominence,
            label_smoothing=args.label_smoothing_factor,
        ))

    def _perturb_weights(self, net: nn.Module, x, x_adv, labels, r_nat, r_adv) -> None:
        """AWP, once per optimizer step: on its first micro-batch the weights move to w + v against the method's own
        loss on this batch; the perturbation stays for the step's other micro-batches and is removed right before
        the optimizer step (`_before_optimizer_step`)."""
        if (self.state.epoch or 0.0) < self.args.resolved_awp_warmup_epochs - 1e-9:
            return
        if self.awp.applied and self.awp.step == self.state.global_step:
            return
        self.awp.restore_()  # left over from a step whose optimizer step never ran: nothing to carry over

        def proxy_loss(proxy: nn.Module) -> torch.Tensor:
            with self.compute_loss_context_manager():
                z_nat = logits_of(proxy(x)) if self.method.uses_clean_pass else None
                return self._method_loss(labels, z_nat, logits_of(proxy(x_adv)), r_nat, r_adv)[0]

        _, loss = self.awp.perturb_(net, proxy_loss, step=self.state.global_step, reduce=self.accelerator.reduce)
        self._metrics["awp_proxy_loss"].append(loss)

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        x, labels = inputs["pixel_values"], inputs["labels"]
        self.speed.check_pixels(x)  # no device sync: batches were checked on the CPU by the collator
        if self.args.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        net = attack_module(model)  # no DDP; the compiled module when compiled (never rewires the training model)
        if self.in_natural_warmup:  # efficient variant: clean training until the switch
            return self._natural_warmup_step(model, x, labels)
        if self.args.natural_warmup_epochs and self._method_start_step is None:
            self._method_start_step = self.state.global_step
            self._restart_weight_average()  # the average is of the method's weights, not of the natural warm-up's
        z_nat = None
        if self.args.attack_reuse_clean_logits:  # train == eval forward: one clean pass serves both
            if not self._forwards_checked:
                check_train_eval_forwards_agree(net, x)
                self._forwards_checked = True
            with self.compute_loss_context_manager():
                z_nat = logits_of(model(x))
        clean_logits = None if z_nat is None else z_nat.detach()
        x_adv = self.craft_adversarial(net, x, labels, clean_logits) if self.method.attack else None
        r_nat = r_adv = None
        if self.method.uses_revision:  # the teacher's logits: no gradient, independent of the working weights
            revision = self._ensure_revision()
            with self.compute_loss_context_manager():
                r_nat, r_adv = logits_of(revision(x)), logits_of(revision(x_adv))
        if self.awp is not None:
            self._perturb_weights(net, x, x_adv, labels, r_nat, r_adv)

        with self.compute_loss_context_manager():
            if z_nat is None and self.method.uses_clean_pass:
                z_nat = logits_of(model(x))
            z_adv = logits_of(model(x_adv)) if x_adv is not None else None
            loss, parts = self._method_loss(labels, z_nat, z_adv, r_nat, r_adv)
        for name, value in parts.items():
            self._metrics[name].append(value)

        scale = 1.0 / self.current_gradient_accumulation_steps
        if self.method.uses_revision and self.args.prominence == "paper":
            self._accumulate_paper_gradients(net, z_nat, z_adv, labels, scale)
        loss = loss * scale
        self.accelerator.backward(loss)
        return loss.detach()

    def _accumulate_paper_gradients(self, net, z_nat, z_adv, labels, scale: float) -> None:
        """The paper's prominence needs dCE_nat/dw and dCE_adv/dw from their own backward passes."""
        # The hook's own list, so scores and gradients pair up (`net` may be torch.compile's wrapper, whose
        # parameter names carry an `_orig_mod.` prefix that the head names lack).
        params = self._maskable_parameters()
        # Under fp16 these backward passes need the loss scale as much as the main one does (they would
        # underflow otherwise); the scale is divided out again in fp32.
        scaler = getattr(self.accelerator, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        sums = []
        for logits in (z_nat, z_adv):
            ce = smoothed_cross_entropy(logits, labels, self.args.label_smoothing_factor)
            grads = torch.autograd.grad(ce * (scale * loss_scale), params,
                                        retain_graph=True, allow_unused=True)
            sums.append([torch.zeros_like(p) if g is None else g.float().div_(loss_scale) for p, g in zip(params, grads)])
        if self._paper_grads is not None and self._paper_grads_step != self.state.global_step:
            self._paper_grads = None  # left over from a step the fp16 scaler skipped: its hook never ran
        self._paper_grads_step = self.state.global_step
        if self._paper_grads is None:
            self._paper_grads = sums
        else:
            for acc, new in zip(self._paper_grads, sums):
                torch._foreach_add_(acc, new)

    # ------------------------------------------------------------------- resume: the method's state
    def _save_method_state(self, folder: str) -> None:
        """The base state (weight averaging), the revision model (weights, step counter, generator) and where the
        method began (efficient variant)."""
        super()._save_method_state(folder)
        if self.revision is not None:
            self.revision.save(folder, schedule={"method_start_step": self._method_start_step})

    def _load_method_state(self, folder: str) -> None:
        """The base state (weight averaging, working weights) and the schedule at once; the revision weights when the
        revision model is created (at its first step)."""
        super()._load_method_state(folder)
        has_revision = os.path.isfile(os.path.join(folder, REVISION_WEIGHTS_NAME))
        if has_revision:
            self._method_start_step = RevisionModel.read_schedule(folder).get("method_start_step")
            self._revision_checkpoint = folder
            if self.revision is not None:
                self.revision.load(folder)
                self._revision_checkpoint = None
        # (a checkpoint written during a natural warm-up has no revision yet: it is created at the switch)
        elif self.method.uses_revision and not self.args.natural_warmup_epochs and not self.args.allow_partial_resume:
            raise ValueError(
                f"resume_from_checkpoint={folder!r} has no {REVISION_WEIGHTS_NAME}, which adv_method="
                f"{self.args.adv_method!r} needs to resume its revision model; resume from a checkpoint written by "
                "CURETrainer with save_only_model=False"
            )

    # ------------------------------------------------------------------------------- logging
    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self.telemetry is not None:  # per-layer telemetry
            logs.update(self.telemetry.flush())
        super().log(logs, start_time)
