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

import math
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from transformers import Trainer

from .attacks import cross_entropy_loss, fgsm_rs, logits_of, pgd
from .config import CURETrainingArguments
from .data import check_pixel_range, collate_pixels
from .evaluation import robust_evaluate
from .methods import METHODS, method_loss
from .models import head_parameter_names
from .prominence import mask_gradients_, paper_score
from .revision import RevisionModel

__all__ = ["CURETrainer"]


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
        super().__init__(model, args, *pos, **kwargs)
        self.method = METHODS[args.adv_method]
        self.head_names = head_parameter_names(model, args.head_modules)
        self.revision: Optional[RevisionModel] = None
        self._metrics: Dict[str, List[torch.Tensor]] = defaultdict(list)
        self._hooked_optimizer: Optional[torch.optim.Optimizer] = None
        self._paper_grads: Optional[List[List[torch.Tensor]]] = None  # [clean, adv] sums, paper prominence
        self._conserved: List[Any] = []

    # ----------------------------------------------------------------- optimizer and its hooks
    def create_optimizer(self, model=None):
        if self.optimizer is None and str(self.args.optim).endswith("sgd") and self.args.optim_args is None:
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
        if self.method.uses_revision and self._hooked_optimizer is not inner:
            inner.register_step_pre_hook(lambda *_: self._conserve_and_update())
            inner.register_step_post_hook(lambda *_: self._after_optimizer_step())
            self._hooked_optimizer = inner

    def _maskable_parameters(self) -> List[torch.nn.Parameter]:
        net = self.accelerator.unwrap_model(self.model)
        return [p for n, p in net.named_parameters() if p.requires_grad and n not in self.head_names]

    @torch.no_grad()
    def _conserve_and_update(self) -> None:
        """Step 5: zero the conserved gradient entries; remember them for hard conservation."""
        params = self._maskable_parameters()
        scores = None
        if self.args.prominence == "paper":
            scores = self._paper_scores(params)
        masks = mask_gradients_(params, self.args.conserve_fraction, scores)
        if self.args.conservation == "hard":
            self._conserved = [(p, m, p.detach()[m].clone()) for p, m in zip(params, masks) if m is not None]

    def _paper_scores(self, params) -> List[torch.Tensor]:
        if self._paper_grads is None:
            raise RuntimeError("prominence='paper' found no accumulated clean/adversarial gradients this step")
        clean, adv = self._paper_grads
        self._paper_grads = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for grads in (clean, adv):  # the global gradient, as the update's own gradient is
                for g in grads:
                    torch.distributed.all_reduce(g)
                    g.div_(torch.distributed.get_world_size())
        return [paper_score(c, a, self.args.clean_weight) for c, a in zip(clean, adv)]

    @torch.no_grad()
    def _after_optimizer_step(self) -> None:
        """Hard conservation (restore conserved entries), then step 7: revise."""
        for p, mask, saved in self._conserved:
            p.masked_scatter_(mask, saved)
        self._conserved = []
        updated = self.revision.step_(self.accelerator.unwrap_model(self.model), self._revision_rate())
        self._metrics["revision_updated"].append(torch.tensor(float(updated)))

    def _revision_rate(self) -> float:
        if self.args.revision_rate_schedule == "linear" and self.state.max_steps:
            return self.args.revision_rate * max(0.0, 1.0 - self.state.global_step / self.state.max_steps)
        return self.args.revision_rate

    # ------------------------------------------------------------------------- training step
    def _ensure_revision(self) -> RevisionModel:
        if self.revision is None:
            self.revision = RevisionModel(
                self.accelerator.unwrap_model(self.model), rate=self.args.revision_rate,
                decay=self.args.revision_decay, seed=self.args.resolved_revision_seed,
                train_mode=self.args.revision_train_mode,
            )
        return self.revision

    def craft_adversarial(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Step 1: the method's training attack, in eval mode, on the unwrapped module (DDP never sees it)."""
        args, attack = self.args, self.method.attack
        init = self.method.attack_init if args.attack_random_start else "none"
        if attack == "fgsm_rs":
            return fgsm_rs(model, x, labels, eps=args.epsilon)
        loss = "kl" if attack == "pgd_kl" else "ce"
        return pgd(model, x, labels, eps=args.epsilon, step_size=args.attack_step_size,
                   steps=args.attack_steps, loss=loss, init=init)

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        x, labels = inputs["pixel_values"], inputs["labels"]
        check_pixel_range(x)
        net = self.accelerator.unwrap_model(model)
        x_adv = self.craft_adversarial(net, x, labels) if self.method.attack else None

        with self.compute_loss_context_manager():
            z_nat = logits_of(model(x)) if self.method.uses_clean_pass else None
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
        params = [p for n, p in net.named_parameters() if p.requires_grad and n not in self.head_names]
        sums = []
        for logits in (z_nat, z_adv):
            grads = torch.autograd.grad(cross_entropy_loss(logits, labels) * scale, params,
                                        retain_graph=True, allow_unused=True)
            sums.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        if self._paper_grads is None:
            self._paper_grads = sums
        else:
            for acc, new in zip(self._paper_grads, sums):
                torch._foreach_add_(acc, new)

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Clean and robust accuracy (PGD-k with CE, random start, eval mode) on the evaluation set.

        Reports `{prefix}_accuracy`, `{prefix}_pgd{k}_accuracy`, `{prefix}_robust_accuracy` (worst case over
        the attacks in `eval_attacks`), usable as `metric_for_best_model="robust_accuracy"`.
        """
        if isinstance(eval_dataset, dict) or (eval_dataset is None and isinstance(self.eval_dataset, dict)):
            datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
            metrics = {}
            for name, dataset in datasets.items():
                metrics.update(self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.accelerator.unwrap_model(self.model)
        device = self.args.device
        generator = torch.Generator(device=device).manual_seed(self.args.eval_seed + self.args.process_index)
        results = robust_evaluate(
            model, dataloader, self.args.eval_attack_list,
            eps=self.args.resolved_eval_epsilon, step_size=self.args.resolved_eval_step_size,
            steps=self.args.eval_pgd_steps, restarts=self.args.eval_restarts,
            max_examples=self.args.eval_max_examples, generator=generator,
            gather=self.accelerator.gather_for_metrics, device=device,
            progress=self.is_world_process_zero() and not self.args.disable_tqdm,
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in results.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = logits_of(model(inputs["pixel_values"]))
            loss = cross_entropy_loss(logits, inputs["labels"]).detach()
        return (loss, None, None) if prediction_loss_only else (loss, logits.detach(), inputs["labels"])

    # ------------------------------------------------------------------------------- logging
    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._metrics:  # a training log: flush the per-step parts, averaged
            for name, values in self._metrics.items():
                logs[name] = round(torch.stack([v.float().cpu() for v in values]).mean().item(), 6)
            self._metrics.clear()
        super().log(logs, start_time)
