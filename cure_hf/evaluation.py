"""Robust evaluation: clean accuracy, PGD-k, CW-inf and AutoAttack, per example, then averaged.

Definitions (those of AutoAttack and RobustBench):
- an example is *correct under an attack* if it is classified correctly on the clean input and on the
  attack's output; the clean input lies inside the eps-ball, so an adversary can always return it and
  an attack's accuracy is never above the clean accuracy. Only clean-correct examples are attacked;
- with restarts, an example must survive every restart;
- ``robust_accuracy`` is the worst case per example over all the attacks that ran.

Attacks run in eval mode with parameter gradients off and input gradients on, even when the caller is
inside ``torch.no_grad()`` (as the Trainer's evaluation is). AutoAttack is the reference implementation
(`pyautoattack`, Croce & Hein 2020), not a re-implementation. Per-example predictions are gathered
across processes (``gather=accelerator.gather_for_metrics``) so each example counts once, and the
accuracies are computed with the `evaluate` metric modules shipped in :mod:`cure_hf.metrics`.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .attacks import attack_mode, logits_of, pgd
from .safety import check_attack_budget, check_class_labels, check_logits_finite, check_pixel_values

__all__ = [
    "AttackSpec",
    "AutoAttackConfig",
    "RobustEvaluation",
    "parse_attacks",
    "predict_under_attack",
    "autoattack_predictions",
    "gradient_masking_warnings",
    "evaluate_robustness",
    "robust_overfitting_summary",
    "log_evaluation_warnings",
    "log_robust_overfitting",
]

logger = logging.getLogger(__name__)

ATTACK_KINDS = ("clean", "pgd", "cw", "autoattack")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
BLACK_BOX_ATTACKS = ("square",)
NORMS = ("Linf", "L2")
# AutoAttack's own rule (checks.check_square_sr): Square lowering accuracy by more than 0.2 points.
MASKING_TOLERANCE = 0.002


# ------------------------------------------------------------------------------ attack names
@dataclass(frozen=True)
class AttackSpec:
    """One evaluation: ``kind`` in clean/pgd/cw/autoattack, ``steps`` for pgd/cw, ``name`` its metric prefix."""

    kind: str
    steps: int = 0

    @property
    def name(self) -> str:
        return {"clean": "clean", "pgd": f"pgd{self.steps}", "cw": "cw" if self.steps == 0 else f"cw{self.steps}"}.get(
            self.kind, self.kind
        )

    @property
    def metric(self) -> str:
        """Metric key: accuracy, pgd20_accuracy, cw_accuracy, autoattack_accuracy."""
        return "accuracy" if self.kind == "clean" else f"{self.name}_accuracy"


_ATTACK_RE = re.compile(r"^(clean|pgd|cw|autoattack)(\d*)$")


def parse_attacks(attacks: Union[str, Sequence[str]], default_steps: int = 20) -> List[AttackSpec]:
    """Read "clean,pgd20,cw,autoattack": ``pgd`` takes ``default_steps``; ``pgdK``/``cwK`` take K steps.

    ``cw`` (no number) keeps the metric name ``cw_accuracy`` and runs ``default_steps`` steps.
    """
    names = [a.strip().lower() for a in attacks.split(",")] if isinstance(attacks, str) else list(attacks)
    specs: List[AttackSpec] = []
    for name in names:
        if isinstance(name, AttackSpec):
            specs.append(name)
            continue
        match = _ATTACK_RE.match(str(name).strip().lower())
        if not match or (match.group(2) and match.group(1) in ("clean", "autoattack")) or match.group(2) == "0":
            raise ValueError(
                f"attack {name!r} is not understood: allowed clean, pgd, pgd<K> (e.g. pgd20), cw, cw<K>, autoattack; "
                "write them comma-separated, e.g. 'clean,pgd20,cw,autoattack'"
            )
        kind, digits = match.group(1), match.group(2)
        if kind == "pgd":
            specs.append(AttackSpec("pgd", int(digits) if digits else default_steps))
        elif kind == "cw":
            specs.append(AttackSpec("cw", int(digits) if digits else 0))
        else:
            specs.append(AttackSpec(kind))
    if not specs:
        raise ValueError("attacks is empty: give at least one of clean, pgd20, cw, autoattack")
    seen = Counter(s.name for s in specs)
    duplicated = [n for n, c in seen.items() if c > 1]
    if duplicated:
        raise ValueError(f"attacks {duplicated} are listed twice in {names!r}; list each attack once")
    return specs


# ----------------------------------------------------------------------------- white-box PGD
@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return logits_of(model(x)).argmax(dim=1)


def predict_under_attack(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    attack: Union[str, AttackSpec],
    *,
    eps: float,
    step_size: float,
    steps: int = 20,
    restarts: int = 1,
    generator: Optional[torch.Generator] = None,
    clean_predictions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Predicted label per example under ``attack``: "clean", "pgd" (CE loss) or "cw" (margin loss), L-inf.

    Only examples still classified correctly are attacked (a misclassified clean input is its own
    adversarial example); a wrong prediction from any restart is kept. Budgets that would make the attack a
    no-op (steps or restarts below 1, a zero step) or an eps above 64/255 are refused.
    """
    check_attack_budget(eps=eps, step_size=step_size, steps=steps, restarts=restarts)
    spec = attack if isinstance(attack, AttackSpec) else parse_attacks([attack], default_steps=steps)[0]
    if spec.kind not in ("clean", "pgd", "cw"):
        raise ValueError(f"attack={spec.name!r}: predict_under_attack runs 'clean', 'pgd<K>' or 'cw'")
    with attack_mode(model):
        predictions = _predict(model, x) if clean_predictions is None else clean_predictions.clone()
        if spec.kind == "clean" or eps == 0:  # a zero ball holds only the clean image
            return predictions
        n_steps = spec.steps or steps
        for _ in range(restarts):
            alive = (predictions == labels).nonzero().squeeze(1)
            if alive.numel() == 0:
                break
            with torch.enable_grad():
                x_adv = pgd(
                    model,
                    x[alive],
                    labels[alive],
                    eps=eps,
                    step_size=step_size,
                    steps=n_steps,
                    loss="ce" if spec.kind == "pgd" else "margin",
                    init="uniform",
                    generator=generator,
                )
            predictions[alive] = _predict(model, x_adv)
    return predictions


# --------------------------------------------------------------------------------- AutoAttack
@dataclass
class AutoAttackConfig:
    """How to run AutoAttack (`pyautoattack`).

    ``version="standard"`` is the number of record (APGD-CE, APGD-T, FAB-T, Square; RobustBench rules).
    ``version="custom"`` runs ``attacks`` (a subset of apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square) in
    that order with the standard settings; ``n_iter``/``n_queries`` shorten APGD/FAB and Square for
    smoke tests only (the result then is not AutoAttack's number of record and says so).
    """

    version: str = "standard"
    attacks: Optional[Sequence[str]] = None
    norm: str = "Linf"
    seed: int = 0
    n_iter: Optional[int] = None
    n_queries: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.attacks, str):
            self.attacks = [a.strip() for a in self.attacks.split(",") if a.strip()]
        if self.version not in AUTOATTACK_VERSIONS:
            raise ValueError(f"autoattack version={self.version!r} is invalid: allowed {AUTOATTACK_VERSIONS}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is invalid: allowed {NORMS} (pixel units of [0, 1])")
        if self.version == "custom":
            unknown = [a for a in (self.attacks or []) if a not in AUTOATTACK_ATTACKS]
            if not self.attacks or unknown:
                raise ValueError(
                    f"autoattack attacks={self.attacks!r} is invalid with version='custom': give a non-empty "
                    f"subset of {AUTOATTACK_ATTACKS}, e.g. ['apgd-ce', 'apgd-t']"
                )
        elif self.attacks:
            raise ValueError(
                f"autoattack attacks={self.attacks!r} is only used with version='custom' (version={self.version!r} "
                "fixes its own attacks); set version='custom' or drop attacks"
            )
        for name in ("n_iter", "n_queries"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"autoattack {name}={value!r} is invalid: allowed an integer >= 1 or None")

    @property
    def is_standard(self) -> bool:
        return self.version == "standard" and self.n_iter is None and self.n_queries is None


class _Logits(nn.Module):
    """AutoAttack wants ``model(x) -> logits``; transformers models return an output object."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return logits_of(self.model(x))


class _WarningCollector(logging.Handler):
    """Collects AutoAttack's warnings (it logs them on the "auto-attack" logger), counted by text."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: Counter = Counter()

    def emit(self, record):
        self.messages[record.getMessage()] += 1


def _build_autoattack(model: nn.Module, eps: float, config: AutoAttackConfig, n_classes: int, device):
    from pyautoattack import AutoAttack

    aa = AutoAttack(
        _Logits(model),
        attacks=list(config.attacks) if config.version == "custom" else None,
        device=device,
        eps=eps,
        norm=config.norm,
        seed=config.seed,
        version="custom" if config.version == "custom" else config.version,
    )
    if config.version == "custom":  # the standard version's settings for each attack it names
        aa.apgd.n_restarts, aa.fab.n_restarts, aa.apgd_targeted.n_restarts = 1, 1, 1
        aa.fab.n_target_classes = aa.apgd_targeted.n_target_classes = 9
    # Targeted attacks aim at the 9 runner-up classes; fewer classes than 10 leave fewer targets.
    aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_classes - 1)
    aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_classes - 1)
    if config.n_iter is not None:
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = config.n_iter
    if config.n_queries is not None:
        aa.square.n_queries = config.n_queries
    aa.verbose = False
    return aa


def autoattack_predictions(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    config: Optional[AutoAttackConfig] = None,
    clean_predictions: Optional[torch.Tensor] = None,
) -> tuple:
    """AutoAttack on one batch: ``(predictions, survived, warnings)``.

    ``survived[attack]`` is a boolean per example: still correct after that attack and all before it
    (AutoAttack runs each attack only on the examples that survived the previous ones; here each attack
    is one call of ``run_standard_evaluation``, so the per-attack survivors are exact, not parsed from logs).
    ``warnings`` counts AutoAttack's own warnings (zero gradients, randomised or dynamic defence, ...).
    """
    config = config or AutoAttackConfig()
    collector = _WarningCollector()
    aa_logger = logging.getLogger("auto-attack")
    aa_logger.addHandler(collector)
    propagate, aa_logger.propagate = aa_logger.propagate, False  # re-emitted once, deduplicated, by the caller
    survived: Dict[str, torch.Tensor] = {}
    try:
        with attack_mode(model):
            logits = logits_of(model(x[:1]))
            aa = _build_autoattack(model, eps, config, logits.shape[1], x.device)
            predictions = _predict(model, x) if clean_predictions is None else clean_predictions.clone()
            for attack in list(aa.attacks_to_run):
                alive = (predictions == labels).nonzero().squeeze(1)
                if alive.numel() > 0 and eps > 0:
                    aa.attacks_to_run = [attack]
                    with torch.enable_grad():
                        _, adv_predictions = aa.run_standard_evaluation(
                            x[alive].detach(), labels[alive], batch_size=int(alive.numel())
                        )
                    predictions[alive] = adv_predictions.to(predictions.device)
                survived[attack] = predictions == labels
    finally:
        aa_logger.removeHandler(collector)
        aa_logger.propagate = propagate
    return predictions, survived, collector.messages


def gradient_masking_warnings(
    clean_accuracy: float, stage_accuracy: Dict[str, float], tolerance: float = MASKING_TOLERANCE
) -> List[str]:
    """Warnings when a black-box attack (Square) broke examples that every white-box attack before it missed.

    ``stage_accuracy`` is AutoAttack's robust accuracy after each attack, in the order they ran.
    """
    warnings: List[str] = []
    before = clean_accuracy
    white_box_ran = False
    for attack, accuracy in stage_accuracy.items():
        if attack in BLACK_BOX_ATTACKS and white_box_ran and accuracy < before - tolerance:
            warnings.append(
                f"possible gradient masking: the black-box attack {attack} lowered robust accuracy from "
                f"{before:.2%} (after the white-box attacks) to {accuracy:.2%}. Gradient-based numbers "
                "(PGD, CW, APGD) overestimate robustness for this model; check for non-differentiable or "
                "randomised layers and use adaptive attacks."
            )
        white_box_ran = white_box_ran or attack not in BLACK_BOX_ATTACKS
        before = accuracy
    return warnings


# --------------------------------------------------------------------------------- the loop
@dataclass
class RobustEvaluation:
    """Everything an evaluation found: metrics, AutoAttack per attack, warnings and the settings used."""

    metrics: Dict[str, float]
    autoattack_stages: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def gradient_masking_suspected(self) -> bool:
        return any(w.startswith("possible gradient masking") for w in self.warnings)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["gradient_masking_suspected"] = self.gradient_masking_suspected
        return out


def _gather_warnings(messages: Counter) -> Counter:
    """Sum warning counts over processes (each process attacks its own shard)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: List[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, dict(messages))
        total: Counter = Counter()
        for part in everyone:
            total.update(part)
        return total
    return messages


def evaluate_robustness(
    model: nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    attacks: Union[str, Sequence[str]] = ("clean", "pgd"),
    *,
    eps: float = 8 / 255,
    step_size: Optional[float] = None,
    steps: int = 20,
    restarts: int = 1,
    max_examples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    device: Optional[torch.device] = None,
    progress: bool = False,
    autoattack: Optional[AutoAttackConfig] = None,
) -> RobustEvaluation:
    """Accuracy under each attack over ``batches`` of {"pixel_values", "labels"} (pixels in [0, 1]).

    ``attacks``: e.g. "clean,pgd20,cw,autoattack" (clean is always computed: attacks start from it).
    ``step_size`` of PGD/CW defaults to eps / 4. ``gather`` (e.g. ``accelerator.gather_for_metrics``)
    collects per-example predictions from all processes so each example counts once; ``max_examples``
    caps the examples of this process (cap the dataset instead when running on several processes).
    ``progress``: a tqdm bar over the batches, cleared when done; none where stderr is not a terminal (a log file).
    """
    specs = parse_attacks(attacks, default_steps=steps)
    autoattack = autoattack or AutoAttackConfig()
    if autoattack.norm != "Linf" and any(s.kind in ("pgd", "cw") for s in specs):
        raise ValueError(
            f"norm={autoattack.norm!r} is only supported by autoattack; PGD and CW here are L-inf. "
            "Use attacks='clean,autoattack' with norm='L2'"
        )
    step_size = eps / 4 if step_size is None else step_size
    check_attack_budget(eps=eps, step_size=step_size, steps=steps, restarts=restarts, norm=autoattack.norm)
    columns = [s for s in specs if s.kind != "clean"]
    predictions: Dict[str, List[torch.Tensor]] = {"clean": [], **{s.name: [] for s in columns}}
    survived_parts: Dict[str, List[torch.Tensor]] = {}
    labels_seen: List[torch.Tensor] = []
    aa_messages: Counter = Counter()
    seen = 0
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        # disable=None: no bar where the stream is not a terminal (a log file), where a bar nested under the
        # Trainer's would leave its cursor moves ("\x1b[A") behind; in a terminal or notebook it shows and is cleared.
        iterator = tqdm(batches, desc="robust eval", leave=False, disable=None)
    for batch in iterator:
        x, y = batch["pixel_values"], batch["labels"]
        if device is not None:
            x, y = x.to(device), y.to(device)
        if max_examples is not None:
            if seen >= max_examples:
                break
            x, y = x[: max_examples - seen], y[: max_examples - seen]
        seen += len(y)
        # What training refuses, evaluation refuses too: its numbers would look plausible and mean nothing.
        check_pixel_values(x, "evaluation pixel_values")
        with attack_mode(model), torch.no_grad():
            logits = logits_of(model(x))
        check_logits_finite(logits)
        y = check_class_labels(y, logits.shape[1], "evaluation labels")
        clean = logits.argmax(dim=1)
        per_batch = {"clean": clean}
        for spec in columns:
            if spec.kind == "autoattack":
                per_batch[spec.name], survived, messages = autoattack_predictions(
                    model, x, y, eps=eps, config=autoattack, clean_predictions=clean
                )
                aa_messages.update(messages)
                for attack, flags in survived.items():
                    survived_parts.setdefault(attack, []).append(_gathered(flags, gather))
            else:
                per_batch[spec.name] = predict_under_attack(
                    model,
                    x,
                    y,
                    spec,
                    eps=eps,
                    step_size=step_size,
                    steps=steps,
                    restarts=restarts,
                    generator=generator,
                    clean_predictions=clean,
                )
        for name, value in per_batch.items():
            predictions[name].append(_gathered(value, gather))
        labels_seen.append(_gathered(y, gather))

    references = torch.cat(labels_seen).cpu() if labels_seen else torch.zeros(0, dtype=torch.long)
    table = {
        name: torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.long)
        for name, parts in predictions.items()
    }
    metrics = _accuracy_metrics(specs, table, references)

    stages = {attack: torch.cat(parts).double().mean().item() for attack, parts in survived_parts.items()}
    warnings = [f"AutoAttack: {message} ({count}x)" for message, count in sorted(_gather_warnings(aa_messages).items())]
    if stages:
        warnings += gradient_masking_warnings(metrics["accuracy"], stages)
    settings = {
        "attacks": [s.name for s in specs],
        "eps": eps,
        "step_size": step_size,
        "steps": steps,
        "restarts": restarts,
        "norm": autoattack.norm,
    }
    if any(s.kind == "autoattack" for s in specs):
        settings["autoattack"] = {**asdict(autoattack), "standard": autoattack.is_standard}
    return RobustEvaluation(metrics=metrics, autoattack_stages=stages, warnings=warnings, settings=settings)


def _gathered(value: torch.Tensor, gather) -> torch.Tensor:
    return gather(value.contiguous()) if gather is not None else value


def _accuracy_metrics(
    specs: List[AttackSpec], table: Dict[str, torch.Tensor], references: torch.Tensor
) -> Dict[str, float]:
    """Accuracies through the shipped `evaluate` modules: per attack, and the worst case over all of them."""
    from .metrics import load_metric

    n = len(references)
    refs = references.tolist()
    metrics: Dict[str, float] = {}
    for spec in specs:
        preds = table["clean" if spec.kind == "clean" else spec.name].tolist()
        metrics[spec.metric] = load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
    if "accuracy" not in metrics:
        metrics["accuracy"] = load_metric("accuracy").compute(predictions=table["clean"].tolist(), references=refs)[
            "accuracy"
        ]
    stacked = torch.stack([table[name] for name in table], dim=1).tolist() if n else []
    metrics["robust_accuracy"] = load_metric("robust_accuracy").compute(predictions=stacked, references=refs)[
        "robust_accuracy"
    ]
    metrics["n_examples"] = n
    return metrics


# ---------------------------------------------------------------------------- best vs last
def robust_overfitting_summary(
    log_history: Sequence[Dict[str, Any]], selection_key: Optional[str] = None
) -> Dict[str, Dict[str, Any]]:
    """Best and last value of every ``*robust_accuracy`` metric in a Trainer's ``log_history``.

    Returns ``{key: {"best", "best_step", "last", "last_step", "gap" (best - last), "n_evaluations"}}``.
    With ``selection_key`` (e.g. "eval_validation_robust_accuracy"), every other key also reports
    ``"at_selected"``: its value at the evaluation where the selection key was best, which is the honest
    number for a checkpoint chosen on a validation split.
    """
    series: Dict[str, List[tuple]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.endswith("robust_accuracy") and isinstance(value, (int, float)) and not math.isnan(value):
                series.setdefault(key, []).append((entry.get("step", len(series.get(key, []))), float(value)))
    summary: Dict[str, Dict[str, Any]] = {}
    for key, points in series.items():
        best_step, best = max(points, key=lambda p: (p[1], -p[0]))  # earliest of equal bests
        last_step, last = points[-1]
        summary[key] = {
            "best": best,
            "best_step": best_step,
            "last": last,
            "last_step": last_step,
            "gap": best - last,
            "n_evaluations": len(points),
        }
    if selection_key is not None and selection_key in summary:
        selected_step = summary[selection_key]["best_step"]
        for key, points in series.items():
            at = [v for s, v in points if s == selected_step]
            if key != selection_key and at:
                summary[key]["at_selected"] = at[-1]
                summary[key]["selected_by"] = selection_key
    return summary


def log_evaluation_warnings(result: RobustEvaluation, prefix: str = "eval") -> None:
    """Put an evaluation's warnings (AutoAttack's, gradient masking) in the log."""
    for warning in result.warnings:
        logger.warning("%s: %s", prefix, warning)


def log_robust_overfitting(summary: Dict[str, Dict[str, Any]]) -> None:
    """One log line per metric: best (step), last (step), best - last."""
    for key, entry in summary.items():
        line = (
            f"{key}: best {entry['best']:.4f} (step {entry['best_step']}), last {entry['last']:.4f} "
            f"(step {entry['last_step']}), best - last {entry['gap']:+.4f}"
        )
        if "at_selected" in entry:
            line += f"; at the best {entry['selected_by']}: {entry['at_selected']:.4f}"
        if entry["gap"] > 0.02:  # robust overfitting worth a look
            logger.warning(line)
        else:
            logger.info(line)
