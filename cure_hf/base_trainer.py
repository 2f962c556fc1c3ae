"""RobustTrainer: every `transformers.Trainer` override that adversarial training needs besides its step.

`CURETrainer` (trainer.py) adds the method's step on top; between the two files a reader sees every
place where cure_hf departs from the Trainer. Each override calls the Trainer's own method and adds to it:

- `evaluate()` is the Trainer's evaluation (clean pass, `eval_loss`, `compute_metrics`, speed metrics,
  callbacks) with the robust metrics (`eval_pgd20_accuracy`, `eval_robust_accuracy`, ...) added to the same
  dict, so `metric_for_best_model="robust_accuracy"` (the default whenever evaluation runs) selects checkpoints;
- the optimizer comes from the Trainer's factory, with SGD's momentum and "weight decay on every parameter"
  (the released code's defaults) supplied through its two hooks;
- saving writes the folder that timm, transformers and cure_hf all load (`hub.save_pretrained`), plus the
  `processing_class`; checkpoints are the Trainer's, with the method's own state added by the subclass
  (`_save_method_state` / `_load_method_state`);
- `push_to_hub` saves locally first and uploads only the exported model;
- never silently wrong (`cure_hf.safety`): the model is checked at construction, a non-finite gradient stops training
  (`nonfinite_policy`), NaN weights are never saved, `output_dir` has one writer (a lock), checkpoints appear only
  when complete (written aside, then renamed), and a resume refuses an incomplete checkpoint or changed method;
- the optimizer's step carries two hooks, `_before_optimizer_step` and `_after_optimizer_step`, that run once per
  optimizer step whatever the gradient accumulation; after the step, weight averaging (`weight_averaging`) folds the
  new weights into the average, which evaluation, saving and pushing then use (`averaged_weights()`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length, rotate_checkpoints

from .attacks import cross_entropy_loss, logits_of
from .averaging import WEIGHT_AVERAGE_NAME, WeightAverage
from .components import (
    Component,
    component_switch_values,
    components_for,
    method_argument_names,
    resolved_conservation,
    resolved_revision,
)
from .config import CURETrainingArguments
from .data import collate_pixels, dataset_card_fields, dataset_preprocessing
from .evaluation import (
    evaluate_robustness,
    log_evaluation_warnings,
    log_robust_overfitting,
    robust_overfitting_summary,
)
from .hub import (
    card_fields,
    copy_export,
    export_files,
    export_preprocessing,
    load_weights_into,
    push_folder,
    save_pretrained,
)
from .methods import get_method
from .modelcard import card_value, write_model_card
from .models import unwrap_normalized
from .runtime import full_precision_forward, refuse_unsupported_parallelism
from .safety import (
    TRAINER_STATE_NAME,
    TRAINING_ARGS_JSON,
    OutputDirInUseError,
    OutputDirLock,
    check_class_labels,
    check_model_output,
    check_model_saveable,
    check_pixel_values,
    check_resume_arguments,
    check_weights_finite,
    missing_checkpoint_parts,
    publish_checkpoint,
    resumable_checkpoints,
    staging_folder,
    stale_staging_folders,
)
from .speed import SpeedRuntime
from .streaming import hub_dataset_id, preserved_random_state

__all__ = ["RobustTrainer"]

logger = logging.getLogger(__name__)

ROBUST_EVAL_HISTORY_NAME = "robust_eval_history.json"
ROBUST_OVERFITTING_NAME = "robust_overfitting.json"


class RobustTrainer(Trainer):
    """The Trainer plumbing shared by every adversarial method: robust evaluation, saving, resuming, pushing."""

    _tag_names = ["cure_hf", "adversarial-training", "robustness"]
    card_overrides: Optional[Dict[str, Any]] = None  # model-card fields, e.g. {"dataset": "CIFAR-10", ...}
    _captured_step = None  # capture_step: the trainer's cure_hf.capture.TrainerCapturedStep, built at the first step

    def __init__(self, model: nn.Module, args: CURETrainingArguments, *pos, **kwargs):
        if not isinstance(args, CURETrainingArguments):
            raise TypeError(
                f"{type(self).__name__} needs CURETrainingArguments, got {type(args).__name__}; "
                "build it as CURETrainingArguments(output_dir=..., adv_method='cure', ...)"
            )
        kwargs.setdefault("data_collator", collate_pixels)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func is invalid for CURETrainer: the training loss is the method's (adv_method), computed "
                "on the clean and adversarial batches. Fix: write the loss as a method (cure_hf.AdversarialMethod, "
                "docs/extending.md) and train it with adv_method=<its name>."
            )
        refuse_unsupported_parallelism(args)
        pos, kwargs = self._with_validation_split(args, pos, kwargs)
        given = {**dict(zip(("data_collator", "train_dataset", "eval_dataset"), pos)), **kwargs}
        _check_stream_arguments(args, given.get("train_dataset"), given.get("eval_dataset"))
        # The Trainer's LabelSmoother serves its own compute_loss, which no method here uses (each method smooths
        # its cross-entropy terms itself), and its set-up reads `model.config`, which timm models lack.
        smoothing, args.label_smoothing_factor = args.label_smoothing_factor, 0.0
        try:
            super().__init__(model, args, *pos, **kwargs)
        finally:
            args.label_smoothing_factor = smoothing
        refuse_unsupported_parallelism(args, self.accelerator)
        # The fast path's pieces (speed_preset): CUDA-graph attack, device-resident data, and pixel checks on the
        # CPU batch in the collator, so the step itself never waits for the device.
        self.speed = SpeedRuntime(args, args.device)
        self.data_collator = self.speed.checking_collator(self.data_collator)
        self.method = get_method(args.adv_method)
        self._metrics: Dict[str, List[torch.Tensor]] = defaultdict(list)  # per-step parts, flushed by log()
        self._attacking_in_evaluation = False
        self._robust_eval_history: List[Dict[str, Any]] = []
        self._hooked_optimizer: Optional[torch.optim.Optimizer] = None
        self._output_dir_lock = OutputDirLock(args.output_dir)
        if self.model is not None:
            self._check_model_up_front()
        # The step's features, in the order their hooks run (cure_hf/components.py).
        self.components: List[Component] = []
        for component in components_for(args, self.method):
            self.components.append(component(self))

    # ------------------------------------------------------------------------------------ components
    def component(self, name: str) -> Optional[Component]:
        """The enabled component called ``name`` ("conservation", "revision", "awp", ...), or None."""
        return next((c for c in self.components if c.name == name), None)

    @property
    def nonfinite_guard(self):
        """The divergence guard (`cure_hf.safety.NonFiniteGuard`): its `skipped_steps`, its pending verdict."""
        return self.component("divergence").guard

    @property
    def weight_average(self) -> Optional[WeightAverage]:
        """The weight average (`weight_averaging`), once created; None when off."""
        component = self.component("weight_average")
        return component.average if component is not None else None

    @property
    def revision(self):
        """The revision model (`cure_hf.revision.RevisionModel`) once the revision component created it, else None."""
        component = self.component("revision")
        return component.revision if component is not None else None

    @property
    def awp(self):
        """The adversarial weight perturbation (`cure_hf.awp.AdversarialWeightPerturbation`), or None."""
        component = self.component("awp")
        return component.awp if component is not None else None

    def _check_model_up_front(self) -> None:
        """Refuse now, not at the first checkpoint or batch, a model that cannot be saved or whose logits are
        ambiguous; one eval-mode forward on the first training (else evaluation) example, which the collator checks.

        The model's class count (its logits' width) is remembered as `model_num_classes`, and the collator checks
        every batch's labels against it on the CPU (`speed.checking_collator`): a label the model has no class for
        stops with the fix, without a device sync in the step. Without the probe (a stream that cannot be probed, or a
        first example the collator cannot read here) the model's declared count stands in (timm's `num_classes`,
        transformers' `config.num_labels`); a model declaring none gets no label check.

        A stream is probed without being consumed and without a pass over it (`_probe_example`): a
        `StreamingImageDataset` reads its first stored example, a `datasets.IterableDataset` one example from a fresh
        iterator (re-iterable; a shuffle buffer fills first); any other IterableDataset (maybe a one-shot generator)
        is not probed."""
        model = self.accelerator.unwrap_model(self.model)
        check_model_saveable(model)
        dataset = self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()), None)
        outputs, batch = None, None
        if dataset is not None:
            with preserved_random_state():  # a random transform must not shift the run's random stream
                try:
                    example = _probe_example(dataset)
                    batch = self.data_collator([example]) if example is not None else None
                except (TypeError, KeyError, IndexError, NotImplementedError, ValueError, StopIteration):
                    pass  # not indexable, or data the collator refuses: that error comes with the first batch
        if batch is not None:
            device = next(model.parameters()).device
            outputs = check_model_output(model, batch["pixel_values"].to(device), _num_classes(dataset))
        if type(outputs) is not int:  # no probe: the count the model declares, if any
            inner, _ = unwrap_normalized(model)
            declared = (
                getattr(inner, "num_classes", None),
                getattr(getattr(inner, "config", None), "num_labels", None),
            )
            outputs = next((n for n in declared if type(n) is int and n > 0), None)
        self.model_num_classes: Optional[int] = outputs
        if outputs is not None:
            self.data_collator = self.speed.checking_collator(self.data_collator, num_classes=outputs)

    def _divergence_context(self) -> Dict[str, Any]:
        """What the divergence error names: the step, the learning rate in use, the precision, the last checkpoint."""
        args = self.args
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        learning_rate = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
        last, _ = resumable_checkpoints(self._get_output_dir(None))
        return {
            "step": self.state.global_step + 1,
            "learning_rate": args.learning_rate,
            "current_lr": learning_rate,
            "precision": "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
            "last_checkpoint": f"; the last complete checkpoint is {last}" if last else "",
        }

    # ------------------------------------------------------------------------------------ optimizer
    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """The Trainer's optimizer for `optim`/`optim_args`, with SGD's momentum defaulting to the released code's."""
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if optimizer_cls is torch.optim.SGD and isinstance(args, CURETrainingArguments):
            kwargs["momentum"] = args.resolved_sgd_momentum
        return optimizer_cls, kwargs

    def get_decay_parameter_names(self, model: nn.Module) -> List[str]:
        """Every parameter when `weight_decay_all_parameters` (the released code), else the Trainer's choice."""
        if self.args.weight_decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def get_train_dataloader(self):
        """The device-resident loader when `device_resident_data` is on (cure_hf/speed.py), else the Trainer's."""
        loader = self.speed.train_dataloader(self)
        return loader if loader is not None else super().get_train_dataloader()

    def create_optimizer(self, model=None):
        """The Trainer's optimizer with `_before_optimizer_step` and `_after_optimizer_step` attached to its step, so
        they run exactly once per optimizer step (after gradient accumulation), and the weight average started.
        The divergence guard is the first pre-step hook: it reads the gradient before any other hook changes it."""
        optimizer = super().create_optimizer(model)
        self._attach_optimizer_hooks(optimizer)
        for component in self.components:
            component.on_optimizer_created(optimizer)
        return optimizer

    def _attach_optimizer_hooks(self, optimizer: torch.optim.Optimizer) -> None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        if self._hooked_optimizer is inner:
            return
        inner.register_step_pre_hook(lambda opt, *_: self._before_optimizer_step(opt))
        inner.register_step_post_hook(lambda opt, *_: self._after_optimizer_step(opt))
        self._hooked_optimizer = inner

    def _before_optimizer_step(self, optimizer=None) -> None:
        """Between the accumulated gradient and the optimizer step: every component's pre-step hook, in order."""
        optimizer = optimizer if optimizer is not None else getattr(self.optimizer, "optimizer", self.optimizer)
        for component in self.components:
            component.before_optimizer_step(optimizer)

    @torch.no_grad()
    def _after_optimizer_step(self, optimizer=None) -> None:
        """After the optimizer step: every component's post-step hook, in order."""
        optimizer = optimizer if optimizer is not None else getattr(self.optimizer, "optimizer", self.optimizer)
        for component in self.components:
            component.after_optimizer_step(optimizer)

    def _unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    # ---------------------------------------------------------------------------- weight averaging
    @contextlib.contextmanager
    def averaged_weights(self):
        """Inside the block the model holds the weight average (`weight_averaging`); the working weights come back
        exactly afterwards. Evaluation and saving run inside it; without weight averaging it changes nothing."""
        if self.weight_average is None:
            yield self.model
            return
        with self.weight_average.swapped_into(self._unwrapped_model()):
            yield self.model

    def _restart_weight_average(self) -> None:
        """The average starts again from the current weights (after loading the best model, at a method switch)."""
        if self.weight_average is not None:
            self.weight_average.restart_(self._unwrapped_model())

    # ----------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """The Trainer's evaluation plus robust accuracy under `eval_attacks`, in one metrics dict.

        Adds `{prefix}_accuracy` (clean), `{prefix}_pgd20_accuracy`, `{prefix}_cw_accuracy`,
        `{prefix}_autoattack_accuracy` as asked, `{prefix}_robust_accuracy` (worst case per example) and
        `{prefix}_n_examples`. Attacks run in eval mode with their own batch size (`eval_attack_batch_size`), in
        fp32 unless `eval_mixed_precision`; per-example results are gathered across processes so each example
        counts once. Every evaluation is recorded in `output_dir/robust_eval_history.json` with AutoAttack's
        per-attack accuracies and warnings (gradient masking: Square beating the white-box attacks).
        """
        previous, self._attacking_in_evaluation = self._attacking_in_evaluation, True
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._attacking_in_evaluation = previous

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ):
        """The Trainer's loop, then (from `evaluate()`) the attacks on the same examples; both in fp32 unless
        `eval_mixed_precision` (fp16 attacks are weaker, so the robust number would be inflated), and both on the
        weight average when `weight_averaging` is on."""
        model = self.accelerator.unwrap_model(self.model)
        precision = contextlib.nullcontext() if self.args.eval_mixed_precision else full_precision_forward(model)
        with self.averaged_weights(), precision:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            robust = (
                self._robust_metrics(dataloader.dataset, metric_key_prefix) if self._attacking_in_evaluation else {}
            )
        for key, value in robust.items():
            if key in output.metrics:  # compute_metrics named it first: the user's definition stands
                logger.warning(
                    "%s is computed by compute_metrics and by the robust evaluation; keeping "
                    "compute_metrics' value %s (robust evaluation: %s)",
                    key,
                    output.metrics[key],
                    value,
                )
                continue
            output.metrics[key] = value
        return output

    def get_eval_dataloader(self, eval_dataset=None):
        """The Trainer's evaluation loader over the first `eval_max_examples` examples (all when unset), so the
        clean pass (`eval_loss`, `compute_metrics`) and the attacks see the same examples."""
        limit = self.args.eval_max_examples
        if limit is not None:
            if eval_dataset is None or isinstance(eval_dataset, str):
                eval_dataset = self.eval_dataset if eval_dataset is None else self.eval_dataset[eval_dataset]
            if len(eval_dataset) > limit:  # the same first N on every process: each example counted once
                eval_dataset = (
                    eval_dataset.select(range(limit))
                    if hasattr(eval_dataset, "select")
                    else torch.utils.data.Subset(eval_dataset, range(limit))
                )
        return super().get_eval_dataloader(eval_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Logits and cross-entropy for models that take `pixel_values` and return logits or `.logits`."""
        inputs = self._prepare_inputs(inputs)
        check_pixel_values(inputs["pixel_values"], "evaluation pixel_values")  # as training refuses them
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = logits_of(model(inputs["pixel_values"]))
            labels = check_class_labels(inputs["labels"], logits.shape[-1], "evaluation labels")
            loss = cross_entropy_loss(logits, labels).detach()
        return (loss, None, None) if prediction_loss_only else (loss, logits.detach(), labels)

    def _robust_metrics(self, dataset, prefix: str) -> Dict[str, float]:
        args = self.args
        generator = torch.Generator(device=args.device).manual_seed(args.eval_seed + args.process_index)
        result = evaluate_robustness(
            self.accelerator.unwrap_model(self.model),
            self._robust_eval_dataloader(dataset),
            args.eval_attack_list,
            eps=args.resolved_eval_epsilon,
            step_size=args.resolved_eval_step_size,
            steps=args.eval_pgd_steps,
            restarts=args.eval_restarts,
            generator=generator,
            gather=self.accelerator.gather_for_metrics,
            device=args.device,
            progress=self.is_world_process_zero() and not args.disable_tqdm,
            autoattack=args.autoattack_config(),
        )
        metrics = {f"{prefix}_{k}": v for k, v in result.metrics.items()}
        if result.autoattack_stages:
            metrics[f"{prefix}_gradient_masking_suspected"] = float(result.gradient_masking_suspected)
        if self.is_world_process_zero():
            log_evaluation_warnings(result, prefix)
        self._record_robust_evaluation(prefix, result)
        return metrics

    def _robust_eval_dataloader(self, dataset):
        """The evaluation set (already cut to `eval_max_examples`), in batches of `eval_attack_batch_size` per device."""
        batch_size = self.args.eval_attack_batch_size or self.args.per_device_eval_batch_size
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
        )
        return self.accelerator.prepare(loader)

    @property
    def robust_eval_history(self) -> List[Dict[str, Any]]:
        """Every evaluation of this trainer: step, epoch, metrics, AutoAttack per attack, warnings, settings."""
        return self._robust_eval_history

    def _record_robust_evaluation(self, prefix: str, result) -> None:
        record = {"step": self.state.global_step, "epoch": self.state.epoch, "prefix": prefix, **result.to_dict()}
        self._robust_eval_history.append(record)
        if self.is_world_process_zero() and self.args.output_dir:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, ROBUST_EVAL_HISTORY_NAME), "w", encoding="utf-8") as f:
                json.dump(self._robust_eval_history, f, indent=2, default=str)

    def robust_overfitting_summary(self) -> Dict[str, Dict[str, Any]]:
        """Best and last value of every `*robust_accuracy` metric logged so far, and their difference (gap).

        With a validation split, the other splits also report their value at the best validation evaluation.
        """
        selection = "eval_validation_robust_accuracy"
        if self.args.metric_for_best_model:
            selection = "eval_" + self.args.metric_for_best_model.removeprefix("eval_")
        return robust_overfitting_summary(self.state.log_history, selection_key=selection)

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """`Trainer.train` holding the lock on `output_dir`, then the robust-overfitting report: best vs last robust
        accuracy of every evaluation. `resume_from_checkpoint=True` takes the newest *complete* checkpoint."""
        with self._holding_output_dir(collective=True):
            for folder in stale_staging_folders(self._get_output_dir(trial)) if self.args.should_save else []:
                logger.warning("removing %s: a checkpoint whose save was interrupted (never resumed from)", folder)
                shutil.rmtree(folder, ignore_errors=True)
            if resume_from_checkpoint is True:
                resume_from_checkpoint = self._newest_complete_checkpoint(trial)
            output = super().train(resume_from_checkpoint, trial, **kwargs)
            self.nonfinite_guard.flush()  # the last step's verdict, when it is read a step late (GPU)
            self._report_robust_overfitting(output)
        if self.nonfinite_guard.skipped_steps:
            logger.warning(
                "nonfinite_policy='skip' dropped %d optimizer steps with NaN/inf gradients: %s",
                len(self.nonfinite_guard.skipped_steps),
                self.nonfinite_guard.skipped_steps,
            )
        return output

    def _report_robust_overfitting(self, output) -> None:
        summary = self.robust_overfitting_summary()
        for key, entry in summary.items():
            output.metrics.update(
                {f"{key}_best": entry["best"], f"{key}_last": entry["last"], f"{key}_best_minus_last": entry["gap"]}
            )
            if "at_selected" in entry:
                output.metrics[f"{key}_at_selected"] = entry["at_selected"]
        if summary and self.is_world_process_zero():
            log_robust_overfitting(summary)
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, ROBUST_OVERFITTING_NAME), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)

    def _with_validation_split(self, args, pos: tuple, kwargs: dict):
        """`validation_fraction > 0`: carve `self.validation_dataset` from the training set (never the test set).

        The eval set becomes `{"validation": split, "test": given}`, which the Trainer evaluates as
        `eval_validation_*` and `eval_test_*`; `metric_for_best_model` refers to the validation split. The split
        uses the given eval set's transform (no augmentation) when it has one.
        """
        self.validation_dataset = None
        if not args.validation_fraction:
            return pos, kwargs
        from .data import split_validation

        names = ("data_collator", "train_dataset", "eval_dataset")
        kwargs = dict(kwargs, **dict(zip(names, pos)))
        pos = tuple(pos[len(names) :])
        train, given = kwargs.get("train_dataset"), kwargs.get("eval_dataset")
        if train is None:
            raise ValueError(f"validation_fraction={args.validation_fraction} needs a train_dataset to split")
        if not has_length(train):
            # A held-out part of a stream would need a pass to draw (a seeded, stratified split sees every label) and a
            # filter on every later pass; the first N examples would be one shard's, not a sample of the set.
            raise ValueError(
                f"validation_fraction={args.validation_fraction} splits the training set, and this one is a stream "
                f"({type(train).__name__}, no length), which cannot be split without reading it whole. Fix: set "
                "validation_fraction=0 and pass a sized validation set of examples the stream does not train on, "
                "e.g. eval_dataset={'validation': <held-out Dataset>, 'test': data['test']} with "
                "metric_for_best_model='validation_robust_accuracy'"
            )
        candidates = list(given.values()) if isinstance(given, dict) else [given] if given is not None else []
        transform = next(
            (
                d.format.get("format_kwargs", {}).get("transform")
                for d in candidates
                if getattr(d, "format", {}).get("type") == "custom"
            ),
            None,
        )
        kwargs["train_dataset"], self.validation_dataset = split_validation(
            train, args.validation_fraction, args.seed, transform
        )
        if isinstance(given, dict):
            if "validation" in given:
                raise ValueError(
                    "validation_fraction > 0 names its split 'validation'; rename the eval_dataset "
                    "entry 'validation' or set validation_fraction=0"
                )
            kwargs["eval_dataset"] = {"validation": self.validation_dataset, **given}
        elif given is not None:
            kwargs["eval_dataset"] = {"validation": self.validation_dataset, "test": given}
        else:
            kwargs["eval_dataset"] = {"validation": self.validation_dataset}
        return pos, kwargs

    # ------------------------------------------------------------------------------ saving, resuming
    # Replaces Trainer._save on purpose: the Trainer writes its own model format and a pickled training_args.bin.
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """The folder timm, transformers and cure_hf all load, the processing class, the arguments as JSON."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_pretrained(
            self.accelerator.unwrap_model(self.model),
            output_dir,
            card=self.model_card_info(),
            image_size=self._export_image_size(),
            label_names=self._label_names(),
            processing_class=self.processing_class,
            preprocessing=self._data_preprocessing(),
        )
        # The arguments as JSON rather than the Trainer's pickled training_args.bin: nothing needs torch.load.
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The Trainer's `save_model` (final model and every checkpoint) with the weight average when it is on, refused
        for NaN/inf weights, holding the lock when it writes into `output_dir`."""
        folder = output_dir if output_dir is not None else self.args.output_dir
        self.nonfinite_guard.flush()
        self._settle_captured_step()
        check_weights_finite(self.accelerator.unwrap_model(self.model), folder)
        root = os.path.abspath(self.args.output_dir)
        inside = os.path.commonpath([os.path.abspath(folder), root]) == root
        with self._holding_output_dir() if inside else contextlib.nullcontext(), self.averaged_weights():
            super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging folder with the method's own state and renamed to
        `checkpoint-N` only when complete, so a process killed mid-save never leaves a `checkpoint-N` to resume from."""
        self._settle_captured_step()  # its revision model's step and generator, as the eager step's
        run_dir = self._get_output_dir(trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging_root = staging_folder(final)  # the Trainer writes `<its run dir>/checkpoint-N`: here, inside this
        staged = os.path.join(staging_root, os.path.basename(final))
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # a save of this step that a killed process left
            os.makedirs(staged)
        self.accelerator.wait_for_everyone()  # every process writes its RNG state into the fresh folder
        if self.args.should_save and not self.args.save_only_model:
            self._save_method_state(staged)
        pushes: List[str] = []
        # The Trainer names the checkpoint folder itself; its run-dir hook is the one way to redirect it. Pushing and
        # rotating wait for the rename (an upload must not read a folder that is about to move).
        self._get_output_dir = lambda trial=None: staging_root
        self._push_from_checkpoint = pushes.append
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir, self._push_from_checkpoint
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if pushes:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple:
        """The Trainer's resume position `(epochs_trained, batches to skip in that epoch)`, corrected for a training
        set without a length (a stream).

        The Trainer gives a stream one "epoch" of `max_steps` steps and counts a resume as `global_step` batches into
        its first pass. A finite stream ends sooner, and the Trainer then starts its next pass (`set_epoch(1)`, a new
        shuffle), so a checkpoint written in pass p after its b-th batch resumed that way would skip all of pass 0
        (decoding it) and replay pass p from its first batch: other data than the interrupted run's. The Trainer
        records the place itself, `state.epoch = p + b / (max_steps * gradient_accumulation_steps)` with the
        checkpoint's `max_steps`; here p and b are read back from it, so the Trainer resumes in pass p and skips b
        batches (`skip_first_batches`; `ignore_data_skip`: none). Its random state is restored after that skip, as
        it always is, which is exact for `StreamingImageDataset`, whose examples draw no process random state."""
        epochs_trained, skipped = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        state_file = os.path.join(resume_from_checkpoint or "", TRAINER_STATE_NAME)
        if resume_from_checkpoint is None or has_length(self.train_dataset) or not os.path.isfile(state_file):
            return epochs_trained, skipped
        from transformers import TrainerState

        saved = TrainerState.load_from_json(state_file)
        batches_per_pass = max(1, saved.max_steps) * self.args.gradient_accumulation_steps
        position = float(saved.epoch or 0.0)
        passes = int(math.floor(position))
        batches = int(round((position - passes) * batches_per_pass))
        return passes, 0 if self.args.ignore_data_skip else batches

    def _newest_complete_checkpoint(self, trial=None) -> str:
        """`resume_from_checkpoint=True`: the newest checkpoint with everything a resume needs; newer, incomplete
        ones are named in a warning and skipped."""
        run_dir = self._get_output_dir(trial)
        folder, skipped = resumable_checkpoints(run_dir, **self._checkpoint_rules())
        for path, missing in skipped.items():
            logger.warning(
                "resume_from_checkpoint=True skips %s: it lacks %s (an interrupted or partial save)",
                path,
                ", ".join(missing),
            )
        if folder is None:
            found = "; ".join(f"{p} lacks {', '.join(m)}" for p, m in skipped.items()) or "no checkpoint-N folders"
            raise ValueError(
                f"resume_from_checkpoint=True found no complete checkpoint in {run_dir} ({found}); pass "
                "resume_from_checkpoint=None to start from scratch, or the path of a checkpoint with "
                "allow_partial_resume=True"
            )
        return folder

    def _checkpoint_rules(self) -> Dict[str, Any]:
        """What a checkpoint of this run must hold besides the Trainer's files: each component's own files (the
        weight average's state, whose model file is then the average; the revision model once the efficient
        variant's warm-up, if any, is over)."""
        return {"required_files": [entry for c in self.components for entry in c.checkpoint_files()]}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Weights from the checkpoint's safetensors (the inverse of `_save`), then the method's own state; refused
        when the checkpoint is incomplete (unless `allow_partial_resume`) or was trained with other method settings."""
        missing = missing_checkpoint_parts(resume_from_checkpoint, **self._checkpoint_rules())
        if "model.safetensors" not in missing and missing:
            if not self.args.allow_partial_resume:
                raise ValueError(
                    f"resume_from_checkpoint={resume_from_checkpoint!r} lacks {', '.join(missing)}: the run would "
                    "silently continue with a fresh optimizer, learning-rate schedule, RNG or revision model. Fix: "
                    "resume from a complete checkpoint (resume_from_checkpoint=True picks the newest), or set "
                    "allow_partial_resume=True to continue with fresh ones for the missing parts"
                )
            logger.warning(
                "allow_partial_resume=True: %s lacks %s; those start afresh", resume_from_checkpoint, ", ".join(missing)
            )
        current = {**self.args.to_dict(), **component_switch_values(self.args, self.method)}
        for warning in check_resume_arguments(
            resume_from_checkpoint,
            current,
            method_arguments=method_argument_names(self.args, self.method),
            resolve=lambda saved: _resolved_switches(saved),
        ):
            logger.warning("resume_from_checkpoint=%s: %s", resume_from_checkpoint, warning)
        load_weights_into(model if model is not None else self.model, resume_from_checkpoint)
        self._load_method_state(resume_from_checkpoint)

    @contextlib.contextmanager
    def _holding_output_dir(self, collective: bool = False):
        """Hold the lock on `output_dir` (world process zero) for the block; `collective`: every process learns
        whether it was granted, so all of them stop with the same error."""
        error = None
        if self.is_world_process_zero():
            try:
                self._output_dir_lock.acquire()
            except OutputDirInUseError as refused:
                error = refused
        if collective and torch.distributed.is_available() and torch.distributed.is_initialized():
            message = [str(error) if error is not None else None]
            torch.distributed.broadcast_object_list(message, src=0)
            error = error or (OutputDirInUseError(message[0]) if message[0] else None)
        if error is not None:
            raise error
        try:
            yield
        finally:
            if self.is_world_process_zero():
                self._output_dir_lock.release()

    def _load_best_model(self) -> None:
        load_weights_into(self.model, self.state.best_model_checkpoint)
        self._restart_weight_average()  # the checkpoint's weights are its average: evaluation and saving keep them

    def _save_method_state(self, folder: str) -> None:
        """What resuming needs beyond the Trainer's checkpoint: each component's state (the weight average and the
        working weights, the revision model with its step, generator and schedule)."""
        for component in self.components:
            component.save_state(folder)

    def _load_method_state(self, folder: str) -> None:
        """The inverse of `_save_method_state`; a checkpoint written with weight averaging needs it on. A captured
        step is built again at the next step, from the loaded revision state."""
        self._captured_step = None
        if os.path.isfile(os.path.join(folder, WEIGHT_AVERAGE_NAME)) and self.component("weight_average") is None:
            raise ValueError(
                f"resume_from_checkpoint={folder!r} was written with weight averaging ({WEIGHT_AVERAGE_NAME}; its "
                "model.safetensors is the average, not the weights training continues from), but "
                "weight_averaging is off. Fix: resume with weight_averaging set (e.g. True)."
            )
        for component in self.components:
            component.load_state(folder)

    def _export_image_size(self) -> Optional[tuple]:
        """The training image size, written to config.json so timm/transformers preprocessing resize to it."""
        _, normalized = unwrap_normalized(self.accelerator.unwrap_model(self.model))
        if normalized is not None and normalized.input_size is not None:
            return normalized.input_size
        for dataset in (self.train_dataset, self.eval_dataset):
            if isinstance(dataset, dict):
                dataset = next(iter(dataset.values()), None)
            if not has_length(dataset):  # a stream is not read at save time; the evaluation set says the size
                continue
            try:
                pixels = dataset[0]["pixel_values"]
                return tuple(int(v) for v in pixels.shape[-2:])
            except (TypeError, KeyError, IndexError, AttributeError, NotImplementedError):
                continue
        return None

    def _data_preprocessing(self):
        """What the data transforms did (cure_hf's transforms record it), for the saved folder to repeat."""
        return dataset_preprocessing(self.eval_dataset, self.train_dataset)

    def _label_names(self) -> Optional[List[str]]:
        """The class names of the label column the training (else evaluation) set's transform reads (e.g.
        CIFAR-100's `fine_label`; `cure_hf.data.dataset_label_feature`), for the saved config."""
        from .data import dataset_label_feature

        for dataset in (self.train_dataset, self.eval_dataset):
            names = getattr(dataset_label_feature(dataset), "names", None)
            if names:
                return list(names)
        return None

    # ----------------------------------------------------------------------------------- model card
    def _latest_eval_metrics(self) -> Dict[str, float]:
        for entry in reversed(self.state.log_history):
            if any(k.startswith("eval_") and k.endswith("accuracy") for k in entry):
                return entry
        return {}

    def model_card_info(self, **overrides) -> Dict[str, Any]:
        """The fields of the model card (see `cure_hf.modelcard.write_model_card`), from the arguments, the data and
        the last evaluation."""
        args, eval_metrics = self.args, self._latest_eval_metrics()
        # with a validation split the test numbers are eval_test_*; the card reports test accuracy
        prefix = "eval_test_" if "eval_test_accuracy" in eval_metrics else "eval_"
        steps = args.eval_pgd_steps
        hyper_names = [
            "adv_method",
            "epsilon",
            "attack_step_size",
            "attack_steps",
            "learning_rate",
            "weight_decay",
            "num_train_epochs",
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "optim",
            "seed",
            "label_smoothing_factor",
        ]
        hyper_names += [name for name in self.method.hyperparameters if name not in hyper_names]
        model = self.accelerator.unwrap_model(self.model)
        exported = export_preprocessing(model, self._data_preprocessing(), self._export_image_size())
        info = {
            **card_fields(model, exported),
            "model_name": (self.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))).split("/")[-1],
            "repo_id": self.hub_model_id,
            "method": args.adv_method,
            "hyperparameters": {
                name: card_value(getattr(args, name), pixel=name in ("epsilon", "attack_step_size"))
                for name in hyper_names
                if hasattr(args, name)
            },
            "threat_model": "Linf",
            "eps": card_value(args.resolved_eval_epsilon, pixel=True),
            "pgd_steps": steps,
            "clean_accuracy": eval_metrics.get(f"{prefix}accuracy"),
            f"pgd{steps}_accuracy": eval_metrics.get(f"{prefix}pgd{steps}_accuracy"),
            "autoattack_accuracy": eval_metrics.get(f"{prefix}autoattack_accuracy"),
            "additional_data": False,
            "tags": [f"method-{args.adv_method}"] + list(self._tag_names),
        }
        info["hyperparameters"].update(self.method.resolve_options(args.method_options))
        info.update(self._dataset_card_fields())
        self._add_beyond_paper_card_fields(info)
        info.update(self.card_overrides or {})
        info.update(overrides)
        return info

    def _add_beyond_paper_card_fields(self, info: Dict[str, Any]) -> None:
        """Each component's card fields (conservation, revision, weight averaging, AWP, mixup), the attack warm-up
        and the training set's augmentation (as its cure_hf transform records it)."""
        from .data import dataset_augmentation

        for component in self.components:
            component.card_fields(info)
        if self.args.attack_warmup_epochs:
            info["hyperparameters"]["attack_warmup_epochs"] = self.args.attack_warmup_epochs
        for name, value in dataset_augmentation(self.train_dataset).items():
            info["hyperparameters"][name] = list(value) if isinstance(value, tuple) else value

    def _dataset_card_fields(self) -> Dict[str, Any]:
        """The training set's name and Hub id, from its `datasets` metadata (`cure_hf.data.dataset_card_fields`; the
        name `datasets` records for a dataset that moved into an organisation gives its id today,
        `cure_hf.streaming.hub_dataset_id`); for a streamed training set also the evaluation split's name
        (ImageNet-1k reports on "validation"), which `load_streaming_image_dataset` records on the evaluation set."""
        fields = dataset_card_fields(self.train_dataset)
        if "dataset_id" not in fields and hub_dataset_id(fields.get("dataset")):  # e.g. "imagenet-1k" of the Hub
            fields["dataset_id"] = hub_dataset_id(fields["dataset"])
        if self.train_dataset is not None and not has_length(self.train_dataset):
            evaluation = self.eval_dataset
            if isinstance(evaluation, dict):
                evaluation = evaluation.get("test")
            split = getattr(evaluation, "split", None)
            if split is not None:
                fields["dataset_split"] = str(split)
        return fields

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
        **kwargs,
    ) -> None:
        """The cure_hf model card in `output_dir/README.md` (also written with every save)."""
        if not self.is_world_process_zero():
            return
        overrides = {
            k: v
            for k, v in dict(
                license=license, model_name=model_name, base_model=finetuned_from, dataset=dataset, **kwargs
            ).items()
            if v is not None
        }
        info = self.model_card_info(**overrides)
        if tags:
            info["tags"] = list(info["tags"]) + ([tags] if isinstance(tags, str) else list(tags))
        write_model_card(self.args.output_dir, info)

    # -------------------------------------------------------------------------------------- pushing
    # Replaces Trainer.push_to_hub on purpose: it uploads the whole output_dir (checkpoints, logs) after a save whose
    # failure would lose the local folder; here the folder is saved first and only its exported files go up.
    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        **kwargs,
    ):
        """Save the model folder to `output_dir` first (it stays on disk if the upload fails), then upload exactly
        its exported files (weights, config, card, processor). Keyword arguments go to the model card
        (`finetuned_from`, `dataset`, `tags`, `license`, `model_name`)."""
        card = {k: v for k, v in dict(base_model=kwargs.pop("finetuned_from", None), **kwargs).items() if v is not None}
        self.card_overrides = {**(self.card_overrides or {}), **card}
        self.save_model(_internal_call=True)
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
            self.create_model_card()  # the card's loading snippets now name the repo
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        return push_folder(
            self.args.output_dir,
            self.hub_model_id,
            files=export_files(self.args.output_dir),
            token=token,
            private=private,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message,
            run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """During training (hub_strategy every_save/checkpoint/all_checkpoints): the checkpoint's model folder, copied
        into `output_dir` as `save_model` writes it (refused where `output_dir` holds a README.md, config.json or
        weights of your own)."""
        from huggingface_hub import HfApi
        from transformers.trainer_utils import HubStrategy
        from transformers.utils.hub import PushInProgress

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        files = copy_export(checkpoint_folder, self.args.output_dir)
        message = f"Training in progress, step {self.state.global_step}"
        jobs = [
            push_folder(
                self.args.output_dir,
                self.hub_model_id,
                files=files,
                token=self.args.hub_token,
                revision=self.args.hub_revision,
                commit_message=message,
                run_as_future=True,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = (
                "last-checkpoint"
                if self.args.hub_strategy == HubStrategy.CHECKPOINT
                else os.path.basename(checkpoint_folder)
            )
            jobs.append(
                HfApi().upload_folder(
                    repo_id=self.hub_model_id,
                    folder_path=checkpoint_folder,
                    path_in_repo=path_in_repo,
                    commit_message=message + ", checkpoint",
                    token=self.args.hub_token,
                    run_as_future=True,
                    revision=self.args.hub_revision,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    # -------------------------------------------------------------------------------------- logging
    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """A training log also carries the mean of each per-step loss part since the last log."""
        self._settle_captured_step()  # the divergence verdict before anything is reported (the last step too)
        if "loss" in logs:
            for component in self.components:
                component.log_metrics(logs)
        if "loss" in logs and self._metrics:
            for name, values in self._metrics.items():
                logs[name] = round(torch.stack(values).float().mean().item(), 6)  # one copy per metric
            self._metrics.clear()
        super().log(logs, start_time)

    def _settle_captured_step(self) -> None:
        """`capture_step`: read the last step's finite flag (a step late on CUDA; raises on a divergence) and bring
        the revision model's host state (step, generator) up to the steps replayed; before saving and logging."""
        if self._captured_step is not None:
            self._captured_step.flush()
            self._captured_step.sync_host_state()

    def _get_grad_norm(self, model, grad_norm=None):
        """The Trainer's `grad_norm` log; after a captured step the captured step's (its gradients, on CUDA, live
        in the graph, and the norm must be the one before the mask, as the eager step's is)."""
        captured = self._captured_step
        if grad_norm is None and captured is not None and captured.update_ran:
            return captured.grad_norm
        return super()._get_grad_norm(model, grad_norm)


def _probe_example(dataset) -> Optional[Dict[str, Any]]:
    """One example of ``dataset`` for the up-front model check, read without consuming a stream: ``dataset[0]``
    for a sized dataset, a stream's own ``first_example()`` (``StreamingImageDataset``), the first example of a
    fresh iterator of a ``datasets.IterableDataset`` (re-iterable); None for any other IterableDataset, which may be
    a one-shot generator whose examples the probe would take from training."""
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        return dataset[0]
    if callable(getattr(dataset, "first_example", None)):
        return dataset.first_example()
    try:
        from datasets import IterableDataset as StreamedDataset
    except ImportError:
        return None
    return next(iter(dataset.take(1))) if isinstance(dataset, StreamedDataset) else None


def _check_stream_arguments(args: CURETrainingArguments, train_dataset, eval_dataset) -> None:
    """Refuse, before the Trainer does in its own words, what a stream cannot serve: evaluation (its loop,
    `eval_max_examples` and the attacks' per-example results count the examples of a sized set) and, for a training
    set without a length, a run length in epochs and warm-ups counted in epochs (a stream's epochs are passes of
    unknown length, and the Trainer's `state.epoch` is then no fraction of one)."""
    evaluated = eval_dataset.items() if isinstance(eval_dataset, dict) else [(None, eval_dataset)]
    for key, dataset in evaluated:
        if dataset is not None and not has_length(dataset):
            where = f"eval_dataset[{key!r}]" if key is not None else "eval_dataset"
            raise ValueError(
                f"{where} is a stream ({type(dataset).__name__}, no length); evaluation needs a sized set (the "
                "robust attacks and eval_max_examples count its examples). Fix: evaluate on a map-style Dataset, e.g. "
                "the data['test'] of cure_hf.streaming.load_streaming_image_dataset (the first max_eval_samples "
                "examples of the split), or datasets.Dataset.from_list(list(stream.decode(False).take(N)), "
                "features=stream.features) with the evaluation transform set"
            )
    if train_dataset is None or has_length(train_dataset):
        return
    what = f"the training set is a stream ({type(train_dataset).__name__}, no length)"
    if args.max_steps <= 0:
        size = getattr(train_dataset, "num_examples", None)
        per_step = args.per_device_train_batch_size * max(1, args.world_size) * args.gradient_accumulation_steps
        example = (
            f"max_steps={max(1, math.ceil(args.num_train_epochs * size / per_step))} is {args.num_train_epochs:g} "
            f"epochs of its {size} examples at {per_step} per optimizer step"
            if size
            else "max_steps = epochs * examples per epoch // (per_device_train_batch_size * processes * "
            "gradient_accumulation_steps)"
        )
        raise ValueError(
            f"max_steps={args.max_steps}: {what}, so num_train_epochs={args.num_train_epochs:g} cannot be turned into "
            f"a number of steps for the schedule. Fix: set max_steps; e.g. {example}"
        )
    warmups = {"attack_warmup_epochs": args.attack_warmup_epochs}
    if args.resolved_awp_gamma is not None:
        warmups["awp_warmup_epochs"] = args.resolved_awp_warmup_epochs
    for name, value in warmups.items():
        if value:
            raise ValueError(
                f"{name}={value:g} counts epochs, and {what}: its epochs are passes of unknown length. Fix: set "
                f"{name}=0, or train on a sized dataset (cure_hf.load_image_dataset)"
            )


def _num_classes(dataset) -> Optional[int]:
    """The number of classes of the label column the dataset's transform reads, when it is a `datasets` ClassLabel
    (`cure_hf.data.dataset_label_feature`), else None."""
    from .data import dataset_label_feature

    feature = dataset_label_feature(dataset)
    return int(feature.num_classes) if getattr(feature, "num_classes", None) else None


def _resolved_switches(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's `training_args.json` with its component switches resolved by its own method's defaults."""
    from types import SimpleNamespace

    try:
        method = get_method(saved.get("adv_method"))
    except ValueError:
        return saved
    args = SimpleNamespace(conservation=saved.get("conservation"), revision=saved.get("revision"))
    return {**saved, "conservation": resolved_conservation(args, method), "revision": resolved_revision(args, method)}
