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
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from transformers import Trainer

from .attacks import cross_entropy_loss, fgsm_rs, logits_of, pgd
from .config import CURETrainingArguments
from .data import check_pixel_range, collate_pixels
from .evaluation import (AutoAttackConfig, evaluate_robustness, log_evaluation_warnings, log_robust_overfitting,
                         robust_evaluate, robust_overfitting_summary)
from .methods import METHODS, method_loss
from .models import head_parameter_names
from .prominence import mask_gradients_, paper_score
from .revision import RevisionModel

__all__ = ["CURETrainer"]

# --- distributed / mixed precision (issue 5) ---------------------------------------------------------
_SUPPORTED_PARALLELISM = (
    "one process (CPU or one GPU) or DDP over several GPUs, nodes or CPU processes (accelerate launch or "
    "torchrun; configs in recipes/accelerate_configs/), in fp32, bf16 or fp16, with gradient accumulation"
)


def _refuse_unsupported_parallelism(args: CURETrainingArguments, accelerator=None) -> None:
    """Refuse FSDP, DeepSpeed and Megatron-LM at start-up, from the arguments and the accelerate launch config.

    They shard parameters and gradients, whereas the attack runs on the whole unwrapped module, CURE's mask takes
    each parameter tensor's gradient quantile over the whole tensor, and the revision model copies whole weights.
    """
    found = []
    if getattr(args, "fsdp", None):
        found.append(f"fsdp={args.fsdp!r}")
    if getattr(args, "deepspeed", None):
        found.append(f"deepspeed={args.deepspeed!r}")
    if accelerator is not None:
        kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            found.append(f"accelerate distributed_type={kind}")
        parallelism = getattr(accelerator, "parallelism_config", None)
        if parallelism is not None and (getattr(parallelism, "tp_enabled", False) or getattr(parallelism, "cp_enabled", False)):
            found.append("tensor/context parallelism (parallelism_config)")
    if found:
        raise ValueError(
            f"CURETrainer does not support {', '.join(found)}: sharded parameters and gradients break the attack on "
            "the unwrapped model, CURE's per-tensor gradient mask and the revision copy. Supported: "
            f"{_SUPPORTED_PARALLELISM}. Fix: drop the FSDP/DeepSpeed settings (TrainingArguments or the accelerate "
            "config) and launch with e.g. `accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml`."
        )
    method = METHODS.get(getattr(args, "adv_method", None))
    two_forwards = method is not None and method.uses_clean_pass and method.attack is not None
    if two_forwards and getattr(args, "ddp_broadcast_buffers", None) and getattr(args, "world_size", 1) > 1:
        raise ValueError(
            f"ddp_broadcast_buffers=True is invalid for adv_method={args.adv_method!r} under DDP: the clean and the "
            "adversarial batch go through the DDP model before one backward, and DDP's in-place buffer broadcast "
            "before the second forward breaks the backward of the first on GPUs (\"modified by an inplace "
            "operation\"). Fix: keep ddp_broadcast_buffers=False (CURETrainer then averages BatchNorm statistics "
            "over the processes after every optimizer step)."
        )


@contextlib.contextmanager
def _full_precision_forward(module: nn.Module):
    """Run ``module`` without the autocast wrapper accelerate puts around its forward for mixed precision.

    Evaluation (and its attacks) then runs in fp32; the wrapper is put back afterwards, also on error.
    """
    original = module.__dict__.get("_original_forward")
    if original is None:  # not prepared for mixed precision: nothing to take off
        yield module
        return
    wrapped = module.__dict__.get("forward")
    module.forward = original
    try:
        yield module
    finally:
        if wrapped is None:
            del module.forward
        else:
            module.forward = wrapped


# --- speed (issue 7) -------------------------------------------------------------------------------------
def _check_clean_logits_reusable(method_name: str, attack: Optional[str], model: nn.Module) -> None:
    """``attack_reuse_clean_logits`` is exact only for a KL attack and a model whose train and eval forwards agree."""
    if attack != "pgd_kl":
        raise ValueError(
            f"attack_reuse_clean_logits=True is invalid for adv_method={method_name!r}: allowed only for 'trades' and "
            "'cure', whose attack starts from the clean logits. Fix: set attack_reuse_clean_logits=False."
        )
    for name, module in model.named_modules():
        stochastic = (
            isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
            or isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
            or type(module).__name__ == "DropPath" and getattr(module, "drop_prob", 0.0) > 0
        )
        if stochastic:
            raise ValueError(
                f"attack_reuse_clean_logits=True needs a model whose train-mode forward equals its eval-mode forward; "
                f"module {name!r} ({type(module).__name__}) behaves differently in train mode, so the attack's "
                "eval-mode clean logits cannot come from the training forward. Fix: set attack_reuse_clean_logits="
                "False, or use a model without BatchNorm, dropout and drop-path (e.g. a ViT with drop rates 0)."
            )


class CURETrainer(Trainer):
    """A `transformers.Trainer` whose training step is adversarial training; see `CURETrainingArguments`.

    The model takes `pixel_values` in [0, 1] (normalisation inside the model) and returns logits or an
    output with `.logits`: a timm `nn.Module` (e.g. from `cure_hf.create_model`) or a transformers
    image-classification model. Batches are `{"pixel_values", "labels"}`.
    """

    _tag_names = ["cure_hf", "adversarial-training", "robustness"]
    _paper = {
        "title": "Conserve-Update-Revise to Cure Generalization and Robustness Trade-off in Adversarial Training",
        "id": "2401.14948",
        "citation": (
            "@inproceedings{gowda2024conserve,\n  title={Conserve-Update-Revise to Cure Generalization and Robustness "
            "Trade-off in Adversarial Training},\n  author={Gowda, Shruthi and Zonooz, Bahram and Arani, Elahe},\n"
            "  booktitle={International Conference on Learning Representations},\n  year={2024}\n}"
        ),
    }

    def __init__(self, model: nn.Module, args: CURETrainingArguments, *pos, **kwargs):
        if not isinstance(args, CURETrainingArguments):
            raise TypeError(
                f"CURETrainer needs CURETrainingArguments, got {type(args).__name__}; "
                "build it as CURETrainingArguments(output_dir=..., adv_method='cure', ...)"
            )
        kwargs.setdefault("data_collator", collate_pixels)
        _refuse_unsupported_parallelism(args)
        pos, kwargs = self._with_validation_split(args, pos, kwargs)  # issue 3
        super().__init__(model, args, *pos, **kwargs)
        _refuse_unsupported_parallelism(args, self.accelerator)
        self.method = METHODS[args.adv_method]
        self.head_names = head_parameter_names(model, args.head_modules)
        self.revision: Optional[RevisionModel] = None
        self._metrics: Dict[str, List[torch.Tensor]] = defaultdict(list)
        self._hooked_optimizer: Optional[torch.optim.Optimizer] = None
        self._paper_grads: Optional[List[List[torch.Tensor]]] = None  # [clean, adv] sums, paper prominence
        self._paper_grads_step = -1  # global_step the sums belong to
        self._conserved: List[Any] = []
        # --- recipes (issue 6): efficient variant (natural warm-up, then the method), per-layer telemetry
        self._method_start_step: Optional[int] = None  # global_step of the switch from warm-up to the method
        self.telemetry = None
        if args.layer_telemetry and self.method.uses_revision:
            from .telemetry import LayerTelemetry

            self.telemetry = LayerTelemetry()
        # --- speed (issue 7)
        if args.channels_last and self.model is not None:
            self.model.to(memory_format=torch.channels_last)
        if args.attack_reuse_clean_logits and self.model is not None:
            _check_clean_logits_reusable(args.adv_method, self.method.attack, self.model)

    # ----------------------------------------------------------------- optimizer and its hooks
    def create_optimizer(self, model=None):
        if self.optimizer is None and self.args.optim == "sgd" and self.args.optim_args is None:
            opt_model = self.model if model is None else model
            decay = set(n for n, _ in opt_model.named_parameters())
            if not self.args.weight_decay_all_parameters:
                decay = set(self.get_decay_parameter_names(opt_model))
            groups = [
                {"params": [p for n, p in opt_model.named_parameters() if p.requires_grad and n in decay],
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in opt_model.named_parameters() if p.requires_grad and n not in decay],
                 "weight_decay": 0.0},
            ]
            self.optimizer = torch.optim.SGD(
                [g for g in groups if g["params"]], lr=self.args.learning_rate, momentum=self.args.sgd_momentum
            )
        optimizer = super().create_optimizer(model)
        self._attach_optimizer_hooks(optimizer)
        return optimizer

    def _attach_optimizer_hooks(self, optimizer: torch.optim.Optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if self._hooked_optimizer is inner:
            return
        if self.method.uses_revision:
            inner.register_step_pre_hook(lambda *_: self._conserve_and_update())
        # Every method: under DDP the post-step hook also averages BatchNorm running statistics.
        inner.register_step_post_hook(lambda *_: self._after_optimizer_step())
        self._hooked_optimizer = inner

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
        """Hard conservation (restore conserved entries), then step 7: revise; keep DDP replicas' buffers equal."""
        for p, saved in self._conserved:
            p.copy_(torch.where(saved.isnan(), p, saved))
        self._conserved = []
        net = self.accelerator.unwrap_model(self.model)
        if self.method.uses_revision and self.revision is not None and not self.in_natural_warmup:
            updated = self.revision.step_(net, self._revision_rate())
            self._metrics["revision_updated"].append(torch.tensor(float(updated)))
        self._average_running_stats_across_processes(net)

    def _average_running_stats_across_processes(self, net: nn.Module) -> None:
        """Average BatchNorm running statistics (model and revision) over the DDP processes, once per step.

        Parameters stay identical through DDP's gradient all-reduce and the shared revision generator, but each
        process updates its running statistics from its own shard of the batch (`ddp_broadcast_buffers=False`),
        so they would drift apart; the average is the statistic of the global batch, as in timm's distribute_bn.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world_size = torch.distributed.get_world_size()
        if world_size == 1:
            return
        modules = list(net.modules()) + (list(self.revision.module.modules()) if self.revision is not None else [])
        stats = [
            buffer for m in modules if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
            for buffer in (m.running_mean, m.running_var) if buffer is not None
        ]
        if not stats:
            return
        flat = torch.cat([s.reshape(-1).float() for s in stats])  # one collective for all of them
        torch.distributed.all_reduce(flat)
        flat.div_(world_size)
        offset = 0
        for s in stats:
            s.copy_(flat[offset:offset + s.numel()].view_as(s))
            offset += s.numel()

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

    # --- recipes (issue 6): the efficient variant's natural warm-up and the paper's step schedule
    @property
    def in_natural_warmup(self) -> bool:
        """True while the efficient variant still trains with the clean loss (epoch < natural_warmup_epochs)."""
        warmup = self.args.natural_warmup_epochs
        return bool(warmup) and (self.state.epoch or 0.0) < warmup - 1e-9

    def _natural_warmup_step(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A clean cross-entropy step; the revision model does not exist yet (it is created at the switch)."""
        with self.compute_loss_context_manager():
            loss = cross_entropy_loss(logits_of(model(x)), labels)
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
            self._restore_revision()  # resume: the checkpoint's revision weights, step and generator
        return self.revision

    def craft_adversarial(
        self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, clean_logits: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Step 1: the method's training attack, in eval mode, on the unwrapped module (DDP never sees it)."""
        args, attack = self.args, self.method.attack
        init = self.method.attack_init if args.attack_random_start else "none"
        if attack == "fgsm_rs":
            return fgsm_rs(model, x, labels, eps=args.epsilon)
        loss = "kl" if attack == "pgd_kl" else "ce"
        return pgd(model, x, labels, eps=args.epsilon, step_size=args.attack_step_size,
                   steps=args.attack_steps, loss=loss, init=init, clean_logits=clean_logits)

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        x, labels = inputs["pixel_values"], inputs["labels"]
        check_pixel_range(x)
        if self.args.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        net = self.accelerator.unwrap_model(model)
        if self.in_natural_warmup:  # recipes (issue 6): efficient variant
            return self._natural_warmup_step(model, x, labels)
        if self.args.natural_warmup_epochs and self._method_start_step is None:
            self._method_start_step = self.state.global_step
        z_nat = None
        if self.args.attack_reuse_clean_logits:  # train == eval forward (checked at init): one clean pass serves both
            with self.compute_loss_context_manager():
                z_nat = logits_of(model(x))
        clean_logits = None if z_nat is None else z_nat.detach()
        x_adv = self.craft_adversarial(net, x, labels, clean_logits) if self.method.attack else None

        with self.compute_loss_context_manager():
            if z_nat is None and self.method.uses_clean_pass:
                z_nat = logits_of(model(x))
            z_adv = logits_of(model(x_adv)) if x_adv is not None else None
            r_nat = r_adv = None
            if self.method.uses_revision:
                revision = self._ensure_revision()
                r_nat, r_adv = logits_of(revision(x)), logits_of(revision(x_adv))
            loss, parts = method_loss(
                self.args.adv_method, labels, z_nat=z_nat, z_adv=z_adv, r_nat=r_nat, r_adv=r_adv,
                beta=self.args.trades_beta, alpha=self.args.clean_weight, gamma=self.args.consistency_weight,
                prominence=self.args.prominence,
            )
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
            grads = torch.autograd.grad(cross_entropy_loss(logits, labels) * (scale * loss_scale), params,
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

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Clean and robust accuracy under the attacks in `eval_attacks` (clean, pgd<K>, cw, autoattack).

        Reports `{prefix}_accuracy`, `{prefix}_pgd20_accuracy`, `{prefix}_cw_accuracy`,
        `{prefix}_autoattack_accuracy` as asked, and `{prefix}_robust_accuracy` (worst case per example),
        usable as `metric_for_best_model="robust_accuracy"`. Attacks run with input gradients on, in eval
        mode, with their own batch size (`eval_attack_batch_size`); per-example results are gathered across
        processes so each example counts once. Every evaluation is recorded in
        `output_dir/robust_eval_history.json` with AutoAttack's per-attack accuracies and warnings
        (gradient masking: Square beating the white-box attacks); `eval_max_examples` keeps the first N.
        """
        validation = getattr(self, "validation_dataset", None)
        if eval_dataset is None and validation is not None:  # validation_fraction: the split, then the eval set
            metrics = self.evaluate(validation, ignore_keys, f"{metric_key_prefix}_validation")
            if self.eval_dataset is not None and self.eval_dataset is not validation:
                metrics.update(self.evaluate(self.eval_dataset, ignore_keys, metric_key_prefix))
            return metrics
        if isinstance(eval_dataset, dict) or (eval_dataset is None and isinstance(self.eval_dataset, dict)):
            datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
            metrics = {}
            for name, dataset in datasets.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        dataloader = self._robust_eval_dataloader(eval_dataset if eval_dataset is not None else self.eval_dataset)
        model = self.accelerator.unwrap_model(self.model)
        device = self.args.device
        generator = torch.Generator(device=device).manual_seed(self.args.eval_seed + self.args.process_index)
        precision = contextlib.nullcontext() if self.args.eval_mixed_precision else _full_precision_forward(model)
        with precision:
            result = evaluate_robustness(
                model, dataloader, self.args.eval_attack_list,
                eps=self.args.resolved_eval_epsilon, step_size=self.args.resolved_eval_step_size,
                steps=self.args.eval_pgd_steps, restarts=self.args.eval_restarts, generator=generator,
                gather=self.accelerator.gather_for_metrics, device=device,
                progress=self.is_world_process_zero() and not self.args.disable_tqdm,
                autoattack=AutoAttackConfig(version=self.args.autoattack_version, attacks=self.args.autoattack_attacks,
                                            norm=self.args.eval_norm, seed=self.args.eval_seed),
            )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.metrics.items()}
        if result.autoattack_stages:
            metrics[f"{metric_key_prefix}_gradient_masking_suspected"] = float(result.gradient_masking_suspected)
        if self.is_world_process_zero():
            log_evaluation_warnings(result, metric_key_prefix)
        self._record_robust_evaluation(metric_key_prefix, result)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --- robust evaluation (issue 3): own dataloader, history of every evaluation, best vs last, validation split
    robust_eval_history_name = "robust_eval_history.json"
    robust_overfitting_name = "robust_overfitting.json"

    def _robust_eval_dataloader(self, dataset):
        """The evaluation set (its first `eval_max_examples`), in batches of `eval_attack_batch_size` per device."""
        if dataset is None:
            raise ValueError("CURETrainer.evaluate needs an eval_dataset: pass one to the trainer or to evaluate()")
        limit = self.args.eval_max_examples
        if limit is not None and len(dataset) > limit:  # the same first N on every process: each counted once
            dataset = dataset.select(range(limit)) if hasattr(dataset, "select") else \
                torch.utils.data.Subset(dataset, range(limit))
        batch_size = self.args.eval_attack_batch_size or self.args.per_device_eval_batch_size
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
        )
        return self.accelerator.prepare(loader)

    @property
    def robust_eval_history(self) -> List[Dict[str, Any]]:
        """Every evaluation of this trainer: step, epoch, metrics, AutoAttack per attack, warnings, settings."""
        if "_robust_eval_history" not in self.__dict__:
            self._robust_eval_history: List[Dict[str, Any]] = []
        return self._robust_eval_history

    def _record_robust_evaluation(self, prefix: str, result) -> None:
        record = {"step": self.state.global_step, "epoch": self.state.epoch, "prefix": prefix, **result.to_dict()}
        self.robust_eval_history.append(record)
        if self.is_world_process_zero() and self.args.output_dir:
            import json

            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, self.robust_eval_history_name), "w", encoding="utf-8") as f:
                json.dump(self.robust_eval_history, f, indent=2, default=str)

    def robust_overfitting_summary(self) -> Dict[str, Dict[str, Any]]:
        """Best and last value of every `*robust_accuracy` metric logged so far, and their difference (gap).

        With a validation split, the other splits also report their value at the best validation evaluation.
        """
        selection = "eval_validation_robust_accuracy"
        if self.args.metric_for_best_model:
            selection = "eval_" + self.args.metric_for_best_model.removeprefix("eval_")
        return robust_overfitting_summary(self.state.log_history, selection_key=selection)

    def train(self, *args, **kwargs):
        """`Trainer.train`, then the robust-overfitting report: best vs last robust accuracy of every evaluation."""
        output = super().train(*args, **kwargs)
        summary = self.robust_overfitting_summary()
        for key, entry in summary.items():
            output.metrics.update({f"{key}_best": entry["best"], f"{key}_last": entry["last"],
                                   f"{key}_best_minus_last": entry["gap"]})
            if "at_selected" in entry:
                output.metrics[f"{key}_at_selected"] = entry["at_selected"]
        if summary and self.is_world_process_zero():
            import json

            log_robust_overfitting(summary)
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, self.robust_overfitting_name), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        return output

    def _with_validation_split(self, args: CURETrainingArguments, pos: tuple, kwargs: dict):
        """`validation_fraction > 0`: carve `self.validation_dataset` from the training set (never the test set).

        `evaluate()` then reports it as `eval_validation_*` (what `metric_for_best_model` selects on) beside
        the given eval_dataset's `eval_*`. The split uses the eval_dataset's transform (no augmentation)
        when it has one.
        """
        self.validation_dataset = None
        if not args.validation_fraction:
            return pos, kwargs
        from .data import split_validation

        names = ("data_collator", "train_dataset", "eval_dataset")
        kwargs = dict(kwargs, **dict(zip(names, pos)))
        pos = tuple(pos[len(names):])
        train, given = kwargs.get("train_dataset"), kwargs.get("eval_dataset")
        if train is None:
            raise ValueError(f"validation_fraction={args.validation_fraction} needs a train_dataset to split")
        candidates = list(given.values()) if isinstance(given, dict) else [given] if given is not None else []
        transform = next((d.format.get("format_kwargs", {}).get("transform") for d in candidates
                          if getattr(d, "format", {}).get("type") == "custom"), None)
        kwargs["train_dataset"], self.validation_dataset = split_validation(
            train, args.validation_fraction, args.seed, transform)
        if given is None:  # the Trainer wants an eval set when eval_strategy is set: the split is it
            kwargs["eval_dataset"] = self.validation_dataset
        return pos, kwargs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = logits_of(model(inputs["pixel_values"]))
            loss = cross_entropy_loss(logits, inputs["labels"]).detach()
        return (loss, None, None) if prediction_loss_only else (loss, logits.detach(), inputs["labels"])

    # ------------------------------------------------------------------------------- logging
    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and getattr(self, "telemetry", None) is not None:  # issue 6: per-layer telemetry
            logs.update(self.telemetry.flush())
        if "loss" in logs and self._metrics:  # a training log: flush the per-step parts, averaged
            for name, values in self._metrics.items():
                logs[name] = round(torch.stack([v.float().cpu() for v in values]).mean().item(), 6)
            self._metrics.clear()
        super().log(logs, start_time)

    # --- saving, checkpoints, resume, model card, push (issue 4)
    # Every save writes cure_hf.hub's folder (model.safetensors + timm config.json + README.md), which loads
    # in timm, transformers and cure_hf; checkpoints add revision.safetensors; pushes upload that folder only.
    revision_weights_name = "revision.safetensors"
    card_overrides: Optional[Dict[str, Any]] = None  # model-card fields, e.g. {"dataset": "CIFAR-10", "dataset_id": ...}

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        from .hub import save_pretrained

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_pretrained(self.accelerator.unwrap_model(self.model), output_dir, card=self.model_card_info(),
                        image_size=self._export_image_size(), label_names=self._label_names())
        # The arguments as JSON, not the Trainer's pickled training_args.bin: nothing here needs torch.load.
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    def _save_rng_state(self, output_dir: str) -> None:
        """Checkpoints only: with the RNG states, the revision model (weights, step counter, generator)."""
        super()._save_rng_state(output_dir)
        if self.revision is None or not self.args.should_save:
            return
        import safetensors.torch

        tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in self.revision.module.state_dict().items()}
        tensors["generator_state"] = self.revision.generator.get_state()
        metadata = {"format": "pt", "step": str(self.revision.step), "rate": repr(self.revision.rate),
                    "decay": repr(self.revision.decay)}
        safetensors.torch.save_file(tensors, os.path.join(output_dir, self.revision_weights_name), metadata=metadata)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Weights from the checkpoint's safetensors (refusing pickles); the revision model follows lazily."""
        from .hub import load_weights_into

        load_weights_into(model if model is not None else self.model, resume_from_checkpoint)
        revision_file = os.path.join(resume_from_checkpoint, self.revision_weights_name)
        self._revision_checkpoint = revision_file if os.path.isfile(revision_file) else None
        # (a checkpoint written during a natural warm-up has no revision yet: it is created at the switch)
        if self.method.uses_revision and self._revision_checkpoint is None and not self.args.natural_warmup_epochs:
            raise ValueError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} has no {self.revision_weights_name}, which "
                f"adv_method={self.args.adv_method!r} needs to resume its revision model; resume from a checkpoint "
                "written by CURETrainer with save_only_model=False"
            )
        if self.revision is not None:
            self._restore_revision()

    def _restore_revision(self) -> None:
        path = getattr(self, "_revision_checkpoint", None)
        if path is None or self.revision is None:
            return
        import safetensors
        import safetensors.torch

        tensors = safetensors.torch.load_file(path, device="cpu")
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        module_state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        self.revision.module.load_state_dict(module_state, strict=True)
        self.revision.load_state({"step": int(metadata["step"]), "generator": tensors["generator_state"]})
        self._revision_checkpoint = None

    def _load_best_model(self) -> None:
        from .hub import load_weights_into

        load_weights_into(self.model, self.state.best_model_checkpoint)

    def _export_image_size(self) -> Optional[tuple]:
        """The training image size, written to config.json so timm/transformers preprocessing resize to it."""
        from .models import unwrap_normalized

        _, normalized = unwrap_normalized(self.accelerator.unwrap_model(self.model))
        if normalized is not None and normalized.input_size is not None:
            return normalized.input_size
        for dataset in (self.train_dataset, self.eval_dataset):
            if isinstance(dataset, dict):
                dataset = next(iter(dataset.values()), None)
            try:
                pixels = dataset[0]["pixel_values"]
                return tuple(int(v) for v in pixels.shape[-2:])
            except (TypeError, KeyError, IndexError, AttributeError):
                continue
        return None

    def _label_names(self) -> Optional[List[str]]:
        dataset = self.train_dataset
        features = getattr(dataset, "features", None) or {}
        for key in ("labels", "label"):
            names = getattr(features.get(key), "names", None) if hasattr(features, "get") else None
            if names:
                return list(names)
        return None

    def _latest_eval_metrics(self) -> Dict[str, float]:
        for entry in reversed(self.state.log_history):
            if any(k.startswith("eval_") and k.endswith("accuracy") for k in entry):
                return entry
        return {}

    def model_card_info(self, **overrides) -> Dict[str, Any]:
        """The fields of the model card (see `cure_hf.hub.write_model_card`), from the arguments and last evaluation."""
        from .models import unwrap_normalized

        args, eval_metrics = self.args, self._latest_eval_metrics()
        # with a validation split the test numbers are eval_test_*; the card reports test accuracy
        prefix = "eval_test_" if "eval_test_accuracy" in eval_metrics else "eval_"
        steps = args.eval_pgd_steps
        hyper_names = ["adv_method", "epsilon", "attack_step_size", "attack_steps", "learning_rate", "weight_decay",
                       "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                       "optim", "seed"]
        if self.method.uses_revision:
            hyper_names += ["conserve_fraction", "clean_weight", "consistency_weight", "revision_rate",
                            "revision_decay", "prominence", "conservation"]
        elif args.adv_method in ("trades", "mart"):
            hyper_names += ["trades_beta"]
        eps = args.resolved_eval_epsilon
        _, normalized = unwrap_normalized(self.accelerator.unwrap_model(self.model))
        source = getattr(normalized, "source", None)
        dataset = getattr(getattr(self.train_dataset, "info", None), "dataset_name", None)
        info = {
            "model_name": (self.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))).split("/")[-1],
            "repo_id": self.hub_model_id,
            "method": args.adv_method,
            "hyperparameters": {name: _card_value(getattr(args, name), pixel=name in ("epsilon", "attack_step_size"))
                                for name in hyper_names if hasattr(args, name)},
            "dataset": dataset or "unknown",
            "threat_model": "Linf",
            "eps": _card_value(eps, pixel=True),
            "pgd_steps": steps,
            "clean_accuracy": eval_metrics.get(f"{prefix}accuracy"),
            f"pgd{steps}_accuracy": eval_metrics.get(f"{prefix}pgd{steps}_accuracy"),
            "autoattack_accuracy": eval_metrics.get(f"{prefix}autoattack_accuracy"),
            "additional_data": False,
            "base_model": source,
            "tags": [f"method-{args.adv_method}"] + list(self._tag_names),
        }
        info.update(self.card_overrides or {})
        info.update(overrides)
        return info

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:
        """The cure_hf model card in `output_dir/README.md` (also written with every save)."""
        from .hub import write_model_card

        if not self.is_world_process_zero():
            return
        overrides = {k: v for k, v in dict(license=license, model_name=model_name, base_model=finetuned_from,
                                           dataset=dataset, **kwargs).items() if v is not None}
        info = self.model_card_info(**overrides)
        if tags:
            info["tags"] = list(info["tags"]) + ([tags] if isinstance(tags, str) else list(tags))
        info.setdefault("image_size", self._export_image_size())
        write_model_card(self.args.output_dir, info)

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None, private: Optional[bool] = None,
                    **kwargs):
        """Save the model folder to `output_dir` and upload exactly its exported files (weights, config, card).

        Keyword arguments go to the model card (`finetuned_from`, `dataset`, `tags`, `license`, `model_name`).
        """
        from .hub import export_files, push_folder

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        card = {k: v for k, v in dict(base_model=kwargs.pop("finetuned_from", None), **kwargs).items() if v is not None}
        self.card_overrides = {**(self.card_overrides or {}), **card}
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        return push_folder(
            self.args.output_dir, self.hub_model_id, files=export_files(self.args.output_dir), token=token,
            private=private, revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message, run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """During training (hub_strategy every_save/checkpoint/all_checkpoints): the checkpoint's model folder."""
        import shutil

        from huggingface_hub import HfApi
        from transformers.trainer_utils import HubStrategy
        from transformers.utils.hub import PushInProgress

        from .hub import export_files, push_folder

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        files = export_files(checkpoint_folder)
        for name in files:
            shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(self.args.output_dir, name))
        message = f"Training in progress, step {self.state.global_step}"
        jobs = [push_folder(self.args.output_dir, self.hub_model_id, files=files, token=self.args.hub_token,
                            revision=self.args.hub_revision, commit_message=message, run_as_future=True)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else os.path.basename(
                checkpoint_folder)
            jobs.append(HfApi().upload_folder(
                repo_id=self.hub_model_id, folder_path=checkpoint_folder, path_in_repo=path_in_repo,
                commit_message=message + ", checkpoint", token=self.args.hub_token, run_as_future=True,
                revision=self.args.hub_revision,
            ))
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)


def _card_value(value: Any, pixel: bool = False) -> Any:
    """A hyperparameter as people write it: 8/255 rather than 0.0313..., 'sgd' rather than OptimizerNames.SGD."""
    value = getattr(value, "value", value)
    if pixel and isinstance(value, float) and abs(value * 255 - round(value * 255)) < 1e-6:
        return f"{round(value * 255)}/255"
    return value
