"""CURETrainingArguments: every knob of adversarial training, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional, Union

import torch
from transformers import TrainingArguments

from .argument_types import check_argument, check_field_types, check_seed
from .components import CONSERVATION_MODES, PROMINENCE_MODES, REVISION_SCHEDULES, validate_components
from .evaluation import ATTACK_KINDS
from .methods import METHODS, get_method

__all__ = ["CURETrainingArguments", "RobustEvaluationArguments", "parse_pixel_value"]


def parse_pixel_value(value: Union[str, float, int], name: str) -> float:
    """Read a pixel-space size such as ``"8/255"``, ``"0.0314"`` or ``8/255`` as a float."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{name}={value!r} is not a number; write it like 8/255 or 0.0314") from None


def _parse_optim_args(text: Optional[str]) -> dict:
    """``"momentum=0.8,nesterov=True"`` -> ``{"momentum": "0.8", "nesterov": "True"}``, as the Trainer reads optim_args."""
    pairs = [item.split("=", 1) for item in str(text or "").replace(" ", "").split(",") if item]
    bad = [p[0] for p in pairs if len(p) != 2]
    if bad:
        raise ValueError(
            f"optim_args={text!r} is invalid: write key=value pairs separated by commas, e.g. 'nesterov=True'"
        )
    return dict(pairs)


_check, _check_seed = check_argument, check_seed


def _check_pixel_size(name: str, value: float) -> None:
    _check(
        0.0 <= value <= 1.0,
        name,
        value,
        "a size in pixel units of [0, 1] (0 <= value <= 1)",
        f"Pixels live in [0, 1]: for 8 intensity levels write {name}=8/255.",
    )


@dataclass
class RobustEvaluationArguments:
    r"""
    How robust accuracy is measured: by `CURETrainer.evaluate()` and by `cure-hf evaluate`, with the same names.

    Parameters:
        eval_attacks (`str`, *optional*, defaults to `"clean,pgd"`):
            Comma-separated list of `clean`, `pgd` (`eval_pgd_steps` steps), `pgd<K>` (e.g. `pgd20`), `cw` (CW-inf:
            PGD on the margin loss), `autoattack`. Reported as `eval_accuracy`, `eval_pgd20_accuracy`,
            `eval_cw_accuracy`, `eval_autoattack_accuracy` and `eval_robust_accuracy` (the worst case per example).
        eval_epsilon (`str` or `float`, *optional*):
            L-inf radius of the evaluation attacks in pixel units of [0, 1] (`"8/255"`, at most 64/255, as
            `epsilon`); defaults to the training `epsilon` (8/255 for `cure-hf evaluate`).
        eval_pgd_steps (`int`, *optional*, defaults to 20):
            Steps of `pgd` and `cw` written without a number.
        eval_step_size (`str` or `float`, *optional*):
            Step of PGD/CW; defaults to `eval_epsilon / 4`.
        eval_restarts (`int`, *optional*, defaults to 1):
            Random restarts of PGD/CW; an example counts as robust only if it survives every restart.
        eval_max_examples (`int`, *optional*):
            Evaluate the first N examples of the set (all when unset).
        eval_seed (`int`, *optional*, defaults to 0):
            Seed of the attacks' random starts.
        eval_attack_batch_size (`int`, *optional*):
            Examples per attack batch and device; defaults to `per_device_eval_batch_size`.
        eval_norm (`str`, *optional*, defaults to `"Linf"`):
            Threat model: `Linf`, or `L2` (with `eval_attacks="clean,autoattack"` only).
        autoattack_version (`str`, *optional*, defaults to `"standard"`):
            `standard` (APGD-CE, APGD-T, FAB-T, Square: the number of record), `plus`, `rand`, or `custom`.
        autoattack_attacks (`str`, *optional*):
            With `autoattack_version="custom"`: comma-separated subset of apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square.
    """

    eval_attacks: str = field(default="clean,pgd", metadata={"help": f"Comma-separated subset of {ATTACK_KINDS}."})
    eval_epsilon: Optional[str] = field(default=None, metadata={"help": "Evaluation eps (default: epsilon)."})
    eval_pgd_steps: int = field(default=20, metadata={"help": "Steps of the PGD/CW evaluation attacks."})
    eval_step_size: Optional[str] = field(default=None, metadata={"help": "Step of PGD/CW (default: eps / 4)."})
    eval_restarts: int = field(default=1, metadata={"help": "Random restarts of the PGD/CW evaluation attacks."})
    eval_max_examples: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N examples."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation attacks' random starts."})
    eval_attack_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Examples per attack batch and device (default: per_device_eval_batch_size)."}
    )
    eval_norm: str = field(
        default="Linf", metadata={"help": "Threat model of evaluation: Linf, or L2 (AutoAttack only)."}
    )
    autoattack_version: str = field(
        default="standard",
        metadata={
            "help": "AutoAttack version: standard (APGD-CE, APGD-T, FAB-T, Square), plus, "
            "rand, or custom (autoattack_attacks)."
        },
    )
    autoattack_attacks: Optional[str] = field(
        default=None,
        metadata={
            "help": "With autoattack_version='custom': comma-separated subset of apgd-ce, "
            "apgd-dlr, apgd-t, fab, fab-t, square."
        },
    )

    def __post_init__(self):
        check_field_types(self)  # every field against its annotation, before any check reads it
        self._validate_evaluation_fields()

    def _validate_evaluation_fields(self) -> None:
        from .evaluation import AutoAttackConfig, parse_attacks
        from .safety import check_attack_budget

        _check(
            isinstance(self.eval_pgd_steps, int) and self.eval_pgd_steps >= 1,
            "eval_pgd_steps",
            self.eval_pgd_steps,
            "an integer >= 1",
            "0 steps would make PGD and CW a no-op.",
        )
        _check(
            isinstance(self.eval_restarts, int) and self.eval_restarts >= 1,
            "eval_restarts",
            self.eval_restarts,
            "an integer >= 1",
            "0 restarts would make PGD and CW a no-op.",
        )
        _check_seed("eval_seed", self.eval_seed)
        try:
            parse_attacks(self.eval_attack_list, default_steps=self.eval_pgd_steps)
        except ValueError as error:
            raise ValueError(f"eval_attacks={self.eval_attacks!r} is invalid: {error}") from None
        AutoAttackConfig(version=self.autoattack_version, attacks=self.autoattack_attacks, norm=self.eval_norm)
        if self.eval_norm != "Linf":
            kinds = [a.rstrip("0123456789") for a in self.eval_attack_list]
            _check(
                all(k in ("clean", "autoattack") for k in kinds),
                "eval_norm",
                self.eval_norm,
                "'L2' only with eval_attacks='clean,autoattack' (PGD and CW are L-inf)",
            )
        if self.eval_attack_batch_size is not None:
            _check(
                self.eval_attack_batch_size >= 1,
                "eval_attack_batch_size",
                self.eval_attack_batch_size,
                "an integer >= 1 or None (= per_device_eval_batch_size)",
            )
        if self.eval_epsilon is not None:
            self.eval_epsilon = parse_pixel_value(self.eval_epsilon, "eval_epsilon")
            _check_pixel_size("eval_epsilon", self.eval_epsilon)
            # As the training epsilon: an L-inf radius in intensity levels (0.5 for 0.5/255) is refused, here, where
            # `cure-hf evaluate` builds these arguments too. An L2 radius grows with the image size: no such bound.
            check_attack_budget(eps=self.eval_epsilon, eps_name="eval_epsilon", norm=self.eval_norm)
        if self.eval_step_size is not None:
            self.eval_step_size = parse_pixel_value(self.eval_step_size, "eval_step_size")
            _check_pixel_size("eval_step_size", self.eval_step_size)
            _check(
                self.eval_step_size > 0,
                "eval_step_size",
                self.eval_step_size,
                "> 0",
                "A zero step would make PGD and CW a no-op.",
            )
        if self.eval_max_examples is not None:
            _check(self.eval_max_examples >= 1, "eval_max_examples", self.eval_max_examples, "an integer >= 1 or None")

    @property
    def eval_attack_list(self) -> List[str]:
        return [a.strip() for a in str(self.eval_attacks).split(",") if a.strip()]

    @property
    def resolved_eval_epsilon(self) -> float:
        if self.eval_epsilon is not None:
            return self.eval_epsilon
        return float(getattr(self, "epsilon", 8 / 255))

    @property
    def resolved_eval_step_size(self) -> float:
        return self.resolved_eval_epsilon / 4 if self.eval_step_size is None else self.eval_step_size

    def autoattack_config(self):
        from .evaluation import AutoAttackConfig

        return AutoAttackConfig(
            version=self.autoattack_version, attacks=self.autoattack_attacks, norm=self.eval_norm, seed=self.eval_seed
        )


@dataclass
class CURETrainingArguments(RobustEvaluationArguments, TrainingArguments):
    r"""
    Arguments for [`CURETrainer`]: [`~transformers.TrainingArguments`], the training attack, the method and
    [`RobustEvaluationArguments`]. Symbols follow the CURE paper (Gowda et al., ICLR 2024): p, alpha, gamma, r, d.
    Attack sizes are in pixel units of [0, 1] and accept fractions, e.g. `--epsilon 8/255`.

    Defaults that differ from `TrainingArguments`, to follow the paper's released code: `optim="sgd"` with
    momentum 0.9 (`sgd_momentum`), `learning_rate=0.1`, `weight_decay=5e-4` on *all* parameters
    (`weight_decay_all_parameters`; the Trainer exempts biases and norm weights), `max_grad_norm=0` (no clipping),
    `remove_unused_columns=False` (timm models take `x`, not `pixel_values`), `ddp_broadcast_buffers=False` (several
    forward passes before one backward), `metric_for_best_model="robust_accuracy"` whenever evaluation runs, and two
    that keep the step free of host synchronisations: `logging_nan_inf_filter=False` (the filter hides a divergence
    and reads every loss back) and `accelerator_config.non_blocking=True` (unless your `accelerator_config` sets it).
    The learning-rate schedule is the Trainer's (`lr_scheduler_type`, linear by default); `lr_step_epochs` switches
    to the paper's step schedule.

    Parameters:
        > The method (`cure_hf.methods`)

        adv_method (`str`, *optional*, defaults to `"cure"`):
            A registered method: built in, `clean` (natural training), `pgd` (PGD-AT), `trades`, `mart`, `fgsm_rs`,
            `cure`; or your own (`cure_hf.register_method`, or an installed package's `cure_hf.methods` entry point;
            docs/extending.md). An argument that neither the method nor an enabled component reads is refused.
        trades_beta (`float`, *optional*, defaults to 6.0):
            beta of TRADES and MART.
        clean_weight (`float`, *optional*, defaults to 0.1):
            alpha: CURE's weight of the clean CE term (1 - alpha on the adversarial term); with `prominence="paper"`
            also the weight of the clean gradient in the conservation component's score.
        prominence (`str`, *optional*, defaults to `"loss"`):
            `loss`: |grad of the total loss| (released code); `paper`: alpha |dCE_nat/dw| + (1 - alpha) |dCE_adv/dw|
            from separate backward passes, with the TRADES (beta = 1) update loss.
        method_options (`str`, *optional*):
            A registered method's own options (its `options`), as `"name=value,name=value"`; unset: the
            method's defaults. The built-in methods have none. See docs/extending.md.

        > The training attack (the method's attack spec, with this budget)

        epsilon (`str` or `float`, *optional*, defaults to `"8/255"`):
            L-inf radius of the training attack (eps).
        attack_step_size (`str` or `float`, *optional*, defaults to `"2/255"`):
            Step of the training attack.
        attack_steps (`int`, *optional*, defaults to 10):
            Steps of the training attack (K).
        attack_random_start (`bool`, *optional*, defaults to `True`):
            Uniform start in the eps-ball for PGD-AT/FGSM-RS; x + 0.001 N(0, I) for TRADES/MART/CURE.
        attack_warmup_epochs (`float`, *optional*, defaults to 0):
            Ramp the training attack's `epsilon` (and `attack_step_size` with it) linearly from 0 to their values
            over the first this many epochs (the eps warm-up of robust ViT training, Debenedetti et al., 2023).
        attack_reuse_clean_logits (`bool`, *optional*, defaults to `False`):
            TRADES/CURE: the attack reuses the clean training forward's logits. Only for models whose train and eval
            forwards agree; the trainer compares the two forwards on the first batch and refuses otherwise.

        > The conservation component (CURE's gradient prominence mask)

        conservation (`str`, *optional*):
            The conservation component (CURE's gradient prominence mask), for any method: `soft` masks only the
            gradient (momentum and weight decay still move conserved weights, as the released code); `hard` leaves
            conserved entries exactly unchanged by the step; `none` switches it off. Unset: `soft` for `cure`,
            `none` for the other methods. `adv_method="trades", conservation="soft"` is TRADES with CURE's mask.
        conserve_fraction (`float`, *optional*, defaults to 0.3):
            p: fraction of every parameter tensor's entries conserved (gradient zeroed) per step.
        head_modules (`list[str]`, *optional*):
            Names of the classifier-head modules, never masked; auto-detected when unset.

        > The revision component (CURE's revision model and consistency term)

        revision (`bool`, *optional*):
            The revision component (CURE's revision model and its consistency term, weighted by
            `consistency_weight`), for any method. Unset: on for `cure`, off for the other methods;
            `adv_method="cure", revision=False` is the paper's "mask only" ablation.
        consistency_weight (`float`, *optional*, defaults to 1.0):
            gamma: weight of the revision consistency KL terms.
        revision_rate (`float`, *optional*, defaults to 0.2):
            r: probability of a revision update after an optimizer step.
        revision_decay (`float`, *optional*, defaults to 0.999):
            d: upper bound on the revision momentum m = min(1 - 1/(t + 1), d).
        revision_rate_schedule (`str`, *optional*, defaults to `"constant"`):
            `linear` or `cosine` decay r to 0 over training (the paper's "gradually decayed"); with
            `natural_warmup_epochs` the decay runs from the switch to the method.
        revision_seed (`int`, *optional*):
            Seed of the revision generator (default: `seed`); identical on every process.
        revision_train_mode (`bool`, *optional*, defaults to `True`):
            Run the revision model in train mode, as the released code does.

        > The AWP component

        awp_gamma (`bool`, `float` or `str`, *optional*):
            Adversarial weight perturbation (Wu et al., 2020): before each update the conv/linear weights are moved
            by gamma * ||w|| along the gradient of the method's loss, and put back exactly before the optimizer
            step. `True` for the method's published value (1e-2 for `pgd` and `fgsm_rs`, 5e-3 for `trades`,
            `mart` and `cure`), or a number such as `5e-3`; unset, `False` or 0: none.
        awp_warmup_epochs (`float`, *optional*):
            Epochs of training without AWP before it starts; default: the method's published value (0 for `pgd`
            and `fgsm_rs`, 10 for `trades`, `mart` and `cure`). Only with `awp_gamma`.

        > The weight-averaging component

        weight_averaging (`bool`, `float` or `str`, *optional*):
            An exponential moving average of the weights and BatchNorm statistics after every optimizer step, with
            the decay warmed up as min(decay, (1 + t) / (10 + t)) (as a reproduction of Gowal et al., 2020). `True`
            for decay 0.999, or a decay such as `0.998`; unset or `False`: none. Evaluation, best-model selection,
            saving, the model card and pushing use the average; training continues from the working weights. See
            docs/beyond.md.

        > The mixup/cutmix component (soft targets, timm's `Mixup` on the device)

        mixup_alpha (`float`, *optional*, defaults to 0):
            Mixup (Zhang et al., 2018): each batch becomes lam x + (1 - lam) x.flip(0), lam ~ Beta(alpha, alpha), and
            its target the same mix of the two one-hot labels; 0: no mixup. Done by `timm.data.Mixup` on the device,
            before the attack: the attack and every loss term see the mixed pixels and the soft target (a method's
            cross-entropy is then against class probabilities; docs/imagenet.md). `label_smoothing_factor` composes
            as in timm. Needs an even batch and `dataloader_drop_last=True`.
        cutmix_alpha (`float`, *optional*, defaults to 0):
            CutMix (Yun et al., 2019): a box of area 1 - lam, lam ~ Beta(alpha, alpha), pasted from x.flip(0); 0: none.
        mixup_prob (`float`, *optional*, defaults to 1.0):
            Probability that a batch is mixed at all (its target is one-hot otherwise).
        mixup_switch_prob (`float`, *optional*, defaults to 0.5):
            With both alphas set: the probability of cutmix rather than mixup for a batch.
        mixup_mode (`str`, *optional*, defaults to `"batch"`):
            timm's modes: `batch` (one lam per batch), `pair` (per pair of examples), `elem` (per example).

        > The layer-telemetry component

        layer_telemetry (`bool`, *optional*, defaults to `False`):
            CURE: log per block the fraction of entries updated and the share of gradient magnitude (`telemetry/*`).

        > The divergence guard and resuming

        nonfinite_policy (`str`, *optional*, defaults to `"stop"`):
            What a NaN or infinite gradient does (one check per optimizer step): `stop` raises
            `cure_hf.safety.NonFiniteTrainingError` naming the step and the likely cause, before the step is applied;
            `skip` drops that optimizer step (no parameter, momentum or weight-decay change) with a warning and goes
            on. Steps the fp16 GradScaler skips are the scaler's business and never count.
        allow_partial_resume (`bool`, *optional*, defaults to `False`):
            Resume from a checkpoint that lacks its optimizer, scheduler, RNG or revision state, with a warning,
            starting those afresh. By default such a resume is refused (it would silently restart the schedule).

        > Schedule, optimizer and model selection

        natural_warmup_epochs (`float`, *optional*, defaults to 0):
            The efficient variant: clean loss for this many epochs, then the method in the same run.
        lr_step_epochs (`str`, *optional*):
            The paper's step schedule, e.g. `"100,150"`: the learning rate times `lr_step_factor` at these epochs.
        lr_step_factor (`float`, *optional*, defaults to 0.1):
            Factor of the step schedule.
        sgd_momentum (`float`, *optional*):
            Momentum of `optim="sgd"` when `optim_args` does not set it; 0.9 (the released code) when unset. Refused
            with another optimizer.
        weight_decay_all_parameters (`bool`, *optional*, defaults to `True`):
            Weight decay on biases and norm weights too (the released code); `False` gives the Trainer's grouping.
        validation_fraction (`float`, *optional*, defaults to 0.0):
            Hold out this fraction of the training set (`trainer.validation_dataset`). `evaluate()` then reports it
            as `eval_validation_*` beside the test set's `eval_test_*`, and `metric_for_best_model` refers to it, so the
            test set never picks the checkpoint.
        eval_mixed_precision (`bool`, *optional*, defaults to `False`):
            Run `evaluate()`'s attacks under the training's bf16/fp16 autocast (default: fp32; fp16 attacks are weaker).

        > Speed

        speed_preset (`str`, *optional*, defaults to `"none"`):
            `"fast"`: bf16 autocast through the whole step (attack included, losses in fp32), channels_last,
            torch_compile, and where the device allows a CUDA-graph attack (`attack_cuda_graph`), `cudnn_benchmark`
            and `device_resident_data`; each also stands alone. See docs/benchmarks.md ("GPU fast path").
        channels_last (`bool`, *optional*, defaults to `False`):
            Model and batches in channels_last memory format.
        attack_cuda_graph (`bool`, *optional*):
            Capture the training attack's K steps as a CUDA graph and replay it (CUDA only; None: the preset decides).
        device_resident_data (`bool`, *optional*):
            The whole training set on the device, shuffled and augmented there (None: the preset decides).
        device_augment (`str`, *optional*, defaults to `"none"`):
            Augmentation of device-resident data: `none` or `crop_flip` (pad-4 random crop + horizontal flip).
        cudnn_benchmark (`bool`, *optional*):
            Set `torch.backends.cudnn.benchmark` (None: on under the preset on CUDA, else unchanged).
        capture_step (`bool`, *optional*, defaults to `False`):
            The whole adversarial step (attack, forwards, loss, backward, conservation mask, optimizer update,
            revision update) as one `cure_hf.capture.CapturedStep`: on CUDA one CUDA graph replayed per step (it
            replaces `attack_cuda_graph`), off CUDA the same work eagerly, bit for bit the eager step. Refused, with
            the reason, where the captured step cannot do a field's work: gradient accumulation, fp16, AWP, weight
            averaging, hard conservation, the paper's prominence, layer telemetry, the warm-ups, clipping, a
            revision-rate schedule, `nonfinite_policy="skip"`, `attack_reuse_clean_logits`, DDP, and on CUDA a
            changing learning rate or an optimizer other than SGD. Mixup/cutmix run before it. See
            docs/benchmarks.md ("The whole step, captured").

    Distributed: DDP via `accelerate launch` (docs/distributed.md); FSDP and DeepSpeed are refused.
    """

    adv_method: str = field(
        default="cure", metadata={"help": f"Training method: a registered method, built in {sorted(METHODS)}."}
    )
    epsilon: str = field(default="8/255", metadata={"help": "L-inf radius of the training attack, pixels in [0, 1]."})
    attack_step_size: str = field(default="2/255", metadata={"help": "Step size of the training attack."})
    attack_steps: int = field(default=10, metadata={"help": "Steps of the training attack (K)."})
    attack_random_start: bool = field(default=True, metadata={"help": "Random start for the training attack."})
    trades_beta: float = field(default=6.0, metadata={"help": "beta of TRADES and MART."})

    conserve_fraction: float = field(default=0.3, metadata={"help": "p: fraction of each tensor conserved."})
    clean_weight: float = field(default=0.1, metadata={"help": "alpha: weight of the clean CE term."})
    consistency_weight: float = field(default=1.0, metadata={"help": "gamma: weight of the revision consistency."})
    revision_rate: float = field(default=0.2, metadata={"help": "r: probability of a revision update per step."})
    revision_decay: float = field(default=0.999, metadata={"help": "d: revision decay."})
    revision_rate_schedule: str = field(default="constant", metadata={"help": f"One of {REVISION_SCHEDULES}."})
    revision_seed: Optional[int] = field(default=None, metadata={"help": "Seed of the revision RNG (default: seed)."})
    revision_train_mode: bool = field(default=True, metadata={"help": "Revision model in train mode (as the code)."})
    prominence: str = field(default="loss", metadata={"help": f"Prominence score, one of {PROMINENCE_MODES}."})
    conservation: Optional[str] = field(
        default=None,
        metadata={
            "help": f"Conservation mask, one of {CONSERVATION_MODES} (unset: 'soft' for cure, "
            "'none' for the other methods)."
        },
    )
    method_options: Optional[str] = field(
        default=None,
        metadata={
            "help": "The method's own options (a method of yours, docs/extending.md): "
            "'name=value,name=value'; unset: the method's defaults."
        },
    )
    revision: Optional[bool] = field(
        default=None,
        metadata={"help": "Revision model and its consistency term (unset: on for cure, off for the other methods)."},
    )
    head_modules: Optional[List[str]] = field(
        default=None, metadata={"help": "Classifier-head module names (never masked); auto-detected if unset."}
    )

    validation_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of the training set as a validation split for "
            "model selection (eval metrics eval_validation_*); 0 = none."
        },
    )

    eval_mixed_precision: bool = field(
        default=False,
        metadata={"help": "Run evaluate() and its attacks under the training's bf16/fp16 autocast (default: fp32)."},
    )

    # Speed; bf16, torch_compile and dataloader_num_workers are TrainingArguments' own fields.
    channels_last: bool = field(
        default=False, metadata={"help": "Model and batches in channels_last memory format (faster convs on GPUs)."}
    )
    attack_reuse_clean_logits: bool = field(
        default=False,
        metadata={
            "help": "TRADES/CURE: the attack reuses the clean training forward's logits instead of its own "
            "eval-mode clean forward. Only for models whose train and eval forwards agree "
            "(no BatchNorm, no active dropout/drop-path); the trainer checks."
        },
    )

    # The efficient variant, the paper's step schedule, per-layer telemetry.
    natural_warmup_epochs: float = field(
        default=0.0,
        metadata={
            "help": "Efficient variant (spec section 5): train with the clean loss for this many epochs, then "
            "switch to adv_method in the same run; the revision model is created from the weights at "
            "the switch, and no gradient is masked before it. 0 = no warm-up."
        },
    )
    lr_step_epochs: Optional[str] = field(
        default=None,
        metadata={
            "help": "Step schedule, e.g. '100,150': multiply the learning rate by lr_step_factor at these "
            "epochs (the paper: x0.1 at 100 and 150 of 200). Replaces lr_scheduler_type when set."
        },
    )
    lr_step_factor: float = field(default=0.1, metadata={"help": "Factor of the step schedule (lr_step_epochs)."})
    layer_telemetry: bool = field(
        default=False,
        metadata={
            "help": "CURE: log per block the fraction of entries updated and the share of gradient magnitude "
            "(telemetry/* in the training logs; cure_hf.telemetry.plot_layer_telemetry draws them)."
        },
    )

    sgd_momentum: Optional[float] = field(
        default=None,
        metadata={"help": "Momentum of optim='sgd' unless optim_args sets it (default 0.9, the released code)."},
    )
    weight_decay_all_parameters: bool = field(
        default=True, metadata={"help": "Apply weight decay to biases and norm weights too (the released code)."}
    )

    # Defaults that follow the paper rather than the Trainer.
    optim: str = field(default="sgd", metadata={"help": "Optimizer; 'sgd' uses sgd_momentum."})
    learning_rate: float = field(default=0.1, metadata={"help": "Initial learning rate."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping (0 = none, as the paper)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep pixel_values/labels columns."})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "The Trainer's filter that replaces a NaN/inf loss by the running mean in the logs: off, "
            "since it hides a divergence and reads the loss back to the host every step."
        },
    )
    ddp_broadcast_buffers: Optional[bool] = field(
        default=False, metadata={"help": "DDP buffer broadcast; off because of several forwards per backward."}
    )

    # Never silently wrong (cure_hf.safety): a diverged run stops, an incomplete checkpoint is not resumed from.
    nonfinite_policy: str = field(
        default="stop", metadata={"help": "NaN/inf gradient: 'stop' training with an error, or 'skip' the step."}
    )
    allow_partial_resume: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint without optimizer/scheduler/RNG/revision state "
            "(those start afresh, with a warning); refused by default."
        },
    )

    # GPU speed (cure_hf/speed.py, docs/benchmarks.md), validated by _validate_speed_fields.
    speed_preset: str = field(
        default="none",
        metadata={
            "help": "'fast': bf16 autocast (attack included), channels_last, torch_compile, "
            "logging_nan_inf_filter=False, dataloader_drop_last=True, and where the device allows: "
            "attack_cuda_graph, cudnn_benchmark (CUDA) and device_resident_data. 'none': each option "
            "as set. Refuses fp16=True and cudagraph compile modes."
        },
    )
    attack_cuda_graph: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Capture the training attack's K steps once as a CUDA graph and replay it every step "
            "(CUDA only; a capture that fails runs eagerly, logged). None: on under speed_preset='fast' "
            "on CUDA, else off."
        },
    )
    device_resident_data: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Keep the whole training set on the device (uint8 when exact), shuffle and augment there "
            "a batch at a time; same order as the Trainer's sampler. Needs a map-style training set "
            "with a deterministic transform and dataloader_num_workers=0. None: on under "
            "speed_preset='fast' when the training set allows it (else the DataLoader, logged)."
        },
    )
    device_augment: str = field(
        default="none",
        metadata={
            "help": "Augmentation of device_resident_data: 'none' or 'crop_flip' (pad-4 random crop + "
            "horizontal flip, drawn per epoch from seed; a TensorImageDataset's own augment wins)."
        },
    )
    cudnn_benchmark: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Set torch.backends.cudnn.benchmark (autotuned convolution algorithms; static shapes). "
            "None: True under speed_preset='fast' on CUDA, else left as it is."
        },
    )
    capture_step: bool = field(
        default=False,
        metadata={
            "help": "The whole step (attack, forwards, loss, backward, mask, update, revision) as one captured "
            "step: a CUDA graph replayed per step on CUDA, the same work eagerly elsewhere. Refuses what it "
            "cannot do (gradient accumulation, fp16, AWP, weight averaging, clipping, warm-ups, DDP, on CUDA a "
            "changing learning rate, ...) with the reason."
        },
    )
    # Beyond the paper: weight averaging, adversarial weight perturbation, attack warm-up (docs/beyond.md);
    # validated by _validate_beyond_paper_fields.
    weight_averaging: Optional[str] = field(
        default=None,
        metadata={
            "help": "Weight averaging (EMA of weights and BatchNorm statistics): true (decay "
            "0.999) or a decay such as 0.998; evaluation and saving use the average."
        },
    )
    awp_gamma: Optional[str] = field(
        default=None,
        metadata={
            "help": "Adversarial weight perturbation: true (the method's published gamma) or a "
            "gamma such as 5e-3; 0/false: none."
        },
    )
    awp_warmup_epochs: Optional[float] = field(
        default=None, metadata={"help": "Epochs without AWP first (default: the method's published value)."}
    )
    attack_warmup_epochs: float = field(
        default=0.0,
        metadata={"help": "Ramp the training attack's epsilon (and step) linearly from 0 over these epochs; 0 = none."},
    )
    mixup_alpha: float = field(
        default=0.0, metadata={"help": "Mixup's Beta(alpha, alpha) on the device (timm's Mixup); 0 = no mixup."}
    )
    cutmix_alpha: float = field(default=0.0, metadata={"help": "CutMix's Beta(alpha, alpha); 0 = no cutmix."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch (mixup or cutmix)."})
    mixup_switch_prob: float = field(
        default=0.5, metadata={"help": "With both alphas: probability of cutmix rather than mixup."}
    )
    mixup_mode: str = field(default="batch", metadata={"help": "timm's Mixup mode: 'batch', 'pair' or 'elem'."})

    def __post_init__(self):
        check_field_types(self)  # every field (TrainingArguments' too) against its annotation, first
        self._validate_cure_fields()
        self._validate_evaluation_fields()
        self._validate_recipe_fields()
        self._validate_optimizer_fields()
        self._validate_safety_fields()
        self._validate_beyond_paper_fields()
        validate_components(self)  # each component's own checks; arguments nothing in this run reads are refused
        self._validate_trainer_step_fields()
        self._default_model_selection()
        self._validate_speed_fields()  # before TrainingArguments': the preset sets bf16/torch_compile, which it checks
        super(RobustEvaluationArguments, self).__post_init__()  # TrainingArguments'
        self._validate_capture_step()  # after it: world_size and the schedule's type are then resolved

    def _validate_capture_step(self) -> None:
        """`capture_step=True`: refused for every field whose work the captured step cannot do, by the captured
        step's own rules (`cure_hf.capture.CapturedStep.check_arguments`, with its reason and fix)."""
        if self.capture_step:
            from .capture import CapturedStep

            CapturedStep.check_arguments(self, graph=torch.cuda.is_available() and not self.use_cpu)

    def _validate_trainer_step_fields(self) -> None:
        """The Trainer's step features that cannot work with an adversarial step are refused, not ignored."""
        optim = str(getattr(self.optim, "value", self.optim))
        if optim in ("lomo", "adalomo"):
            raise ValueError(
                f"optim={optim!r} is invalid for CURETrainer: LOMO fuses the backward and the update, so the update "
                "happens inside the backward, before the optimizer-step hooks that conserve, restore AWP's weights and "
                "revise can run. Fix: use optim='sgd' or 'adamw_torch' (or another optimizer with a step())."
            )
        # Pinned memory only speeds copies to a GPU; on a CPU run torch warns about it at every loader.
        if self.dataloader_pin_memory and (self.use_cpu or not torch.cuda.is_available()):
            self.dataloader_pin_memory = False

    def _validate_speed_fields(self) -> None:
        from .speed import apply_speed_preset

        self.speed_preset_changed = apply_speed_preset(self)  # e.g. ["bf16=True", ...]: what the preset set
        # Batches go to the device without waiting for it (accelerate's default copy blocks every step); the
        # Trainer pins the loader's memory by default, so the copy really is asynchronous.
        config = self.accelerator_config
        on_gpu = torch.cuda.is_available() and not self.use_cpu  # pinned memory, hence async copies, need a GPU
        if on_gpu and (config is None or (isinstance(config, dict) and "non_blocking" not in config)):
            self.accelerator_config = {**(config or {}), "non_blocking": True}

    def _validate_cure_fields(self) -> None:
        get_method(self.adv_method).resolve_options(self.method_options)  # an unknown name lists the registered
        self.epsilon = parse_pixel_value(self.epsilon, "epsilon")
        self.attack_step_size = parse_pixel_value(self.attack_step_size, "attack_step_size")
        _check_pixel_size("epsilon", self.epsilon)
        _check_pixel_size("attack_step_size", self.attack_step_size)
        if self.adv_method != "clean":
            _check(
                self.epsilon > 0,
                "epsilon",
                self.epsilon,
                "> 0 for adversarial training",
                "Use adv_method='clean' for natural training.",
            )
            _check(self.attack_step_size > 0, "attack_step_size", self.attack_step_size, "> 0")
        _check(self.attack_steps >= 1, "attack_steps", self.attack_steps, "an integer >= 1")
        _check(
            math.isfinite(self.trades_beta) and self.trades_beta >= 0,
            "trades_beta",
            self.trades_beta,
            "a finite beta >= 0",
            "Use e.g. trades_beta=6.0 (the TRADES paper).",
        )
        _check(0.0 <= self.clean_weight <= 1.0, "clean_weight", self.clean_weight, "0 <= alpha <= 1")
        # the components' own fields are checked by the components (cure_hf.components, validate_components)
        _check(
            0.0 <= self.validation_fraction < 1.0,
            "validation_fraction",
            self.validation_fraction,
            "0 <= fraction < 1",
            "e.g. 0.1 holds out 10% of the training set for model selection.",
        )
        _check(
            0.0 <= self.label_smoothing_factor < 1.0,
            "label_smoothing_factor",
            self.label_smoothing_factor,
            "0 <= factor < 1",
        )

    def _validate_safety_fields(self) -> None:
        from .safety import MAX_EPSILON, NONFINITE_POLICIES, check_attack_budget

        _check(
            self.nonfinite_policy in NONFINITE_POLICIES,
            "nonfinite_policy",
            self.nonfinite_policy,
            f"one of {NONFINITE_POLICIES}",
        )
        # An eps in intensity levels (epsilon=1 for 1/255) is refused, not trained: the bound is MAX_EPSILON (64/255).
        # (eval_epsilon is checked with its threat model by _validate_evaluation_fields.)
        if self.adv_method != "clean" or self.eval_epsilon is None:
            check_attack_budget(eps=self.epsilon, eps_name="epsilon")
        _check(
            self.attack_step_size <= MAX_EPSILON,
            "attack_step_size",
            self.attack_step_size,
            f"<= 64/255 = {MAX_EPSILON:.4f}",
            f"Did you mean {self.attack_step_size:g}/255?",
        )

    def _validate_recipe_fields(self) -> None:
        _check(
            math.isfinite(self.natural_warmup_epochs) and self.natural_warmup_epochs >= 0,
            "natural_warmup_epochs",
            self.natural_warmup_epochs,
            "a finite number >= 0 of epochs",
        )
        if self.natural_warmup_epochs > 0 and self.max_steps > 0:
            raise ValueError(
                f"natural_warmup_epochs={self.natural_warmup_epochs} is counted in epochs, but max_steps="
                f"{self.max_steps} sets the run length in steps; set max_steps=-1 and num_train_epochs instead"
            )
        _check(0.0 < self.lr_step_factor <= 1.0, "lr_step_factor", self.lr_step_factor, "0 < factor <= 1")
        _ = self.lr_step_milestones  # parses lr_step_epochs, raising a clear error

    def _validate_optimizer_fields(self) -> None:
        """SGD's momentum comes from `optim_args` or `sgd_momentum`, never silently from neither or both."""
        optim = str(getattr(self.optim, "value", self.optim))
        given = _parse_optim_args(self.optim_args)
        if self.sgd_momentum is not None:
            _check(0.0 <= self.sgd_momentum < 1.0, "sgd_momentum", self.sgd_momentum, "0 <= momentum < 1")
            if optim != "sgd":
                raise ValueError(
                    f"sgd_momentum={self.sgd_momentum} only applies to optim='sgd', but optim={optim!r}; drop "
                    "sgd_momentum, or pass the optimizer's own settings in optim_args"
                )
            if "momentum" in given and float(given["momentum"]) != self.sgd_momentum:
                raise ValueError(
                    f"sgd_momentum={self.sgd_momentum} and optim_args momentum={given['momentum']} disagree; set one"
                )
        if "weight_decay" in given:
            raise ValueError(
                f"optim_args={self.optim_args!r} sets weight_decay, which the Trainer's parameter groups override "
                f"(weight_decay={self.weight_decay}); set --weight_decay instead (and weight_decay_all_parameters)"
            )

    def for_method(self, adv_method: str, **changes) -> CURETrainingArguments:
        """A copy for another method (e.g. a recipe's natural stage 0): every method hyperparameter and component
        field back at its default, so that none of this run's method settings is carried over (and refused as
        unused), then ``changes``."""
        import dataclasses

        from .components import owned_fields

        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in owned_fields()}
        defaults.update(weight_averaging=None, awp_gamma=None, awp_warmup_epochs=None, attack_warmup_epochs=0.0)
        return dataclasses.replace(self, adv_method=adv_method, **{**defaults, **changes})

    @property
    def resolved_sgd_momentum(self) -> float:
        """The momentum that SGD gets: optim_args' momentum, else sgd_momentum, else 0.9 (the released code)."""
        given = _parse_optim_args(self.optim_args)
        if "momentum" in given:
            return float(given["momentum"])
        return 0.9 if self.sgd_momentum is None else self.sgd_momentum

    def _default_model_selection(self) -> None:
        """Select checkpoints by robust accuracy whenever evaluation runs, on the validation split if there is one."""
        metric = self.metric_for_best_model
        evaluates = str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no"
        if metric is None and (evaluates or self.load_best_model_at_end):
            metric = "robust_accuracy"
            self.greater_is_better = True if self.greater_is_better is None else self.greater_is_better
        if metric is not None and self.validation_fraction > 0:
            # Select on the held-out validation split, never on the test set.
            bare = metric.removeprefix("eval_")
            if not bare.startswith("validation_"):
                metric = "validation_" + bare.removeprefix("test_")
        self.metric_for_best_model = metric

    @property
    def lr_step_milestones(self) -> List[float]:
        """The epochs of lr_step_epochs ('100,150' -> [100.0, 150.0]), increasing; [] when unset."""
        if self.lr_step_epochs is None or self.lr_step_epochs == "":  # (a number 0 is an epoch, refused below)
            return []
        try:
            epochs = [float(e) for e in str(self.lr_step_epochs).replace(" ", "").split(",") if e]
        except ValueError:
            epochs = []
        if not epochs or any(not math.isfinite(e) or e <= 0 for e in epochs) or epochs != sorted(epochs):
            raise ValueError(
                f"lr_step_epochs={self.lr_step_epochs!r} is invalid: allowed increasing positive epochs "
                "separated by commas, e.g. '100,150'"
            )
        return epochs

    @property
    def attack_settings(self):
        from .methods import AttackSettings

        return AttackSettings(
            eps=self.epsilon,
            step_size=self.attack_step_size,
            steps=self.attack_steps,
            random_start=self.attack_random_start,
        )

    @property
    def resolved_revision_seed(self) -> int:
        return self.seed if self.revision_seed is None else self.revision_seed

    # ----------------------------------------------------- beyond the paper: WA, AWP, attack warm-up
    def _validate_beyond_paper_fields(self) -> None:
        """Weight averaging, AWP and the attack warm-up: parsed here, and refused where they cannot work."""
        _ = self.weight_averaging_decay  # parses weight_averaging, raising a clear error
        gamma = self.resolved_awp_gamma
        if self.awp_warmup_epochs is not None:
            _check(
                gamma is not None,
                "awp_warmup_epochs",
                self.awp_warmup_epochs,
                "only together with awp_gamma",
                "Set awp_gamma (e.g. awp_gamma=True for the method's published value) or drop awp_warmup_epochs.",
            )
            _check(
                math.isfinite(self.awp_warmup_epochs) and self.awp_warmup_epochs >= 0,
                "awp_warmup_epochs",
                self.awp_warmup_epochs,
                "a finite number >= 0 of epochs",
            )
        if gamma is not None:
            if self.fp16:
                raise ValueError(
                    f"awp_gamma={self.awp_gamma!r} is invalid with fp16=True: AWP's proxy gradient has no loss scale "
                    "(it can underflow to a zero perturbation), and a step the fp16 loss scaler skips would keep the "
                    "perturbed weights. Fix: use bf16=True (or fp32) with AWP."
                )
            if self.attack_reuse_clean_logits:
                raise ValueError(
                    f"attack_reuse_clean_logits=True is invalid with awp_gamma={self.awp_gamma!r}: the clean training "
                    "forward must run at the perturbed weights, after the attack, so it cannot serve the attack. "
                    "Fix: set attack_reuse_clean_logits=False."
                )
        _check(
            math.isfinite(self.attack_warmup_epochs) and self.attack_warmup_epochs >= 0,
            "attack_warmup_epochs",
            self.attack_warmup_epochs,
            "a finite number >= 0 of epochs",
        )
        if self.attack_warmup_epochs > 0:
            _check(
                self.adv_method != "clean",
                "attack_warmup_epochs",
                self.attack_warmup_epochs,
                "0 with adv_method='clean' (natural training has no attack to warm up)",
            )

    @property
    def weight_averaging_decay(self) -> Optional[float]:
        """The decay of weight averaging (`weight_averaging=True`: 0.999), or None when off."""
        from .averaging import DEFAULT_DECAY

        value = _switch_or_number(
            self.weight_averaging,
            "weight_averaging",
            f"True (decay {DEFAULT_DECAY}), a decay 0 < d < 1 such as 0.998, or None/False",
        )
        if value is None:
            return None
        if value is True:
            return DEFAULT_DECAY
        _check(
            0.0 < value < 1.0,
            "weight_averaging",
            self.weight_averaging,
            f"True (decay {DEFAULT_DECAY}), a decay 0 < d < 1 such as 0.998, or None/False (off)",
            "A decay of 0 would only copy the model; weight_averaging=False turns averaging off.",
        )
        return value

    @property
    def resolved_awp_gamma(self) -> Optional[float]:
        """AWP's gamma (`awp_gamma=True`: the method's published value), or None when off."""
        allowed = "True (the method's published gamma), a number 0 < gamma < 1 such as 5e-3, or None/False/0 (off)"
        value = _switch_or_number(self.awp_gamma, "awp_gamma", allowed)
        if value is None or value == 0.0:
            return None
        method = get_method(self.adv_method)
        if method.attack is None:
            raise ValueError(
                f"awp_gamma={self.awp_gamma!r} is invalid with adv_method={self.adv_method!r}: AWP perturbs the "
                f"weights against an adversarial training loss, which natural training does not have. Fix: drop awp_gamma "
                "for natural training (e.g. a recipe's natural stage 0)."
            )
        if value is True:
            if method.awp_defaults is None:
                raise ValueError(
                    f"awp_gamma=True is invalid with adv_method={self.adv_method!r}: the method declares no published "
                    "AWP gamma (its awp_defaults). Fix: give a number, e.g. awp_gamma=5e-3."
                )
            return method.awp_defaults.gamma
        _check(0.0 < value < 1.0, "awp_gamma", self.awp_gamma, allowed)
        return value

    @property
    def resolved_awp_warmup_epochs(self) -> float:
        """Epochs before AWP starts: `awp_warmup_epochs`, else the method's published value."""
        if self.awp_warmup_epochs is not None:
            return float(self.awp_warmup_epochs)
        defaults = get_method(self.adv_method).awp_defaults
        return defaults.warmup_epochs if defaults is not None else 0.0


def _switch_or_number(value, name: str, allowed: str) -> Union[None, bool, float]:
    """None/False/'false'/'no'/'none'/'off' -> None; True/'true'/'yes'/'on' -> True; a number -> float."""
    if value is None or value is False:
        return None
    if value is True:
        return True
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    if text in ("", "false", "no", "none", "off"):
        return None
    if text in ("true", "yes", "on"):
        return True
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}") from None
