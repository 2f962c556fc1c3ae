"""Training methods as objects, and the registry that finds them by name.

A method (a subclass of :class:`AdversarialMethod`) owns every fact about itself: its name and title, its paper
(citation, arXiv id), its training attack (one :class:`AttackSpec`: the objective, the start, FGSM or PGD), the
argument fields its loss reads (``hyperparameters``), its loss, its published AWP defaults, and the components it
runs with by default (CURE: conservation and revision). The model card, the resume check, the CLI's choices and
the benchmark ask the method object; nothing else lists methods. Register one with :func:`register_method`; the
built-in methods are registered exactly so, and installed packages can add theirs through the
``cure_hf.methods`` entry-point group (docs/extending.md).

A loss reads :class:`LossInputs`: the targets (``labels``: class indices, or class probabilities under
mixup/cutmix), the logits of the clean batch (``z_nat``), of the adversarial batch (``z_adv``) and, when the
revision component is on, the revision model's logits on both (``r_nat``, ``r_adv``). It returns ``(loss, parts)``;
``parts`` are detached scalars for logging.

Soft targets (mixup/cutmix): every cross-entropy term is against the target distribution t, -sum_c t_c log p_c
(``F.cross_entropy`` with probabilities), and label smoothing makes it (1 - s) t + s / C; the KL terms do not read
the target. The training attack with the CE objective ascends that same cross-entropy. MART refuses soft targets
(it needs one true class).

Label smoothing (``TrainingArguments.label_smoothing_factor``) applies to the cross-entropy terms against
the labels, and only to them: the clean CE of natural training, TRADES and CURE, the adversarial CE of
PGD-AT, FGSM-RS and CURE, and the CE part of MART's boosted CE. The KL terms (TRADES' robustness term,
MART's weighted KL, CURE's consistency) compare two distributions of the model's own and stay unsmoothed.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F

from .attacks import fgsm_rs, kl_divergence, pgd

__all__ = [
    "AdversarialMethod",
    "AttackSpec",
    "AttackSettings",
    "AWPDefaults",
    "LossInputs",
    "METHODS",
    "ENTRY_POINT_GROUP",
    "register_method",
    "get_method",
    "registered_methods",
    "warmed_up_attack",
    "method_loss",
    "smoothed_cross_entropy",
    "clean_loss",
    "pgd_at_loss",
    "trades_loss",
    "mart_loss",
    "consistency_loss",
    "with_consistency",
    "cure_update_loss",
    "cure_paper_update_loss",
    "cure_loss",
    "cure_paper_loss",
]

logger = logging.getLogger(__name__)

Parts = Dict[str, torch.Tensor]


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy in fp32 against labels smoothed by ``smoothing`` (PyTorch's definition): class indices
    (B,), or class probabilities (B, C), a soft target t smoothed to (1 - s) t + s / C."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def clean_loss(z_nat: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    loss = smoothed_cross_entropy(z_nat, labels, smoothing)
    return loss, {"ce_nat": loss.detach()}


def pgd_at_loss(z_adv: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """Madry et al.: cross-entropy on the adversarial batch only."""
    loss = smoothed_cross_entropy(z_adv, labels, smoothing)
    return loss, {"ce_adv": loss.detach()}


def trades_loss(z_nat, z_adv, labels, beta: float, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """Zhang et al.: CE(z_nat, y) + beta * KL(softmax z_nat || softmax z_adv)."""
    ce = smoothed_cross_entropy(z_nat, labels, smoothing)
    kl = kl_divergence(z_adv, z_nat)
    return ce + beta * kl, {"ce_nat": ce.detach(), "kl_adv": kl.detach()}


def mart_loss(z_nat, z_adv, labels, beta: float, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """Wang et al. (MART): boosted CE on the adversarial batch + beta * KL weighted by (1 - p_true(x))."""
    if labels.dim() != 1:
        raise ValueError(
            f"mart_loss needs class indices (B,), got labels of shape {tuple(labels.shape)} (soft targets): MART "
            "is defined by one true class per example"
        )
    z_nat, z_adv = z_nat.float(), z_adv.float()
    adv_probs = F.softmax(z_adv, dim=1)
    top2 = adv_probs.argsort(dim=1)[:, -2:]
    runner_up = torch.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
    boosted_ce = smoothed_cross_entropy(z_adv, labels, smoothing) + F.nll_loss(
        torch.log(1.0001 - adv_probs + 1e-12), runner_up
    )
    nat_probs = F.softmax(z_nat, dim=1)
    true_probs = nat_probs.gather(1, labels[:, None]).squeeze(1)
    kl_per_example = (nat_probs * (torch.log(nat_probs + 1e-12) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    robust = (kl_per_example * (1.0000001 - true_probs)).mean()
    return boosted_ce + beta * robust, {"ce_adv": boosted_ce.detach(), "kl_adv": robust.detach()}


def consistency_loss(z_nat, z_adv, r_nat, r_adv) -> torch.Tensor:
    """CURE's revision term: KL(softmax r_nat || softmax z_nat) + KL(softmax r_adv || softmax z_adv).

    A pass the step does not have (``z_adv`` is None in natural training) contributes no term."""
    terms = [kl_divergence(z, r) for z, r in ((z_nat, r_nat), (z_adv, r_adv)) if z is not None]
    if not terms:
        raise ValueError("the consistency term needs the clean or the adversarial logits")
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def cure_update_loss(z_nat, z_adv, labels, alpha: float, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """CURE's update loss without the revision term (the released code): alpha * CE_nat + (1 - alpha) * CE_adv."""
    ce_nat = smoothed_cross_entropy(z_nat, labels, smoothing)
    ce_adv = smoothed_cross_entropy(z_adv, labels, smoothing)
    return alpha * ce_nat + (1.0 - alpha) * ce_adv, {"ce_nat": ce_nat.detach(), "ce_adv": ce_adv.detach()}


def cure_paper_update_loss(z_nat, z_adv, labels, smoothing: float = 0.0) -> Tuple[torch.Tensor, Parts]:
    """The paper's update loss without the revision term: TRADES with beta = 1, CE_nat + KL(z_nat || z_adv)."""
    ce_nat = smoothed_cross_entropy(z_nat, labels, smoothing)
    kl = kl_divergence(z_adv, z_nat)
    return ce_nat + kl, {"ce_nat": ce_nat.detach(), "kl_adv": kl.detach()}


def with_consistency(
    loss_and_parts: Tuple[torch.Tensor, Parts], z_nat, z_adv, r_nat, r_adv, gamma: float
) -> Tuple[torch.Tensor, Parts]:
    """A method's loss plus gamma times the revision consistency term (the revision component's addition)."""
    loss, parts = loss_and_parts
    consistency = consistency_loss(z_nat, z_adv, r_nat, r_adv)
    return loss + gamma * consistency, {**parts, "consistency": consistency.detach()}


def cure_loss(
    z_nat, z_adv, r_nat, r_adv, labels, alpha: float, gamma: float, smoothing: float = 0.0
) -> Tuple[torch.Tensor, Parts]:
    """The released code: alpha * CE_nat + (1 - alpha) * CE_adv + gamma * consistency."""
    return with_consistency(cure_update_loss(z_nat, z_adv, labels, alpha, smoothing), z_nat, z_adv, r_nat, r_adv, gamma)


def cure_paper_loss(
    z_nat, z_adv, r_nat, r_adv, labels, gamma: float, smoothing: float = 0.0
) -> Tuple[torch.Tensor, Parts]:
    """The paper: TRADES with beta = 1, CE_nat + KL(z_nat || z_adv), plus gamma * consistency."""
    return with_consistency(cure_paper_update_loss(z_nat, z_adv, labels, smoothing), z_nat, z_adv, r_nat, r_adv, gamma)


@dataclass(frozen=True)
class LossInputs:
    """The logits of one step that a method's loss may read (None where the step has no such pass)."""

    labels: torch.Tensor  # class indices (B,), or class probabilities (B, C) under mixup/cutmix
    z_nat: Optional[torch.Tensor] = None
    z_adv: Optional[torch.Tensor] = None
    r_nat: Optional[torch.Tensor] = None
    r_adv: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class AttackSettings:
    """The training attack's budget, from the arguments."""

    eps: float
    step_size: float
    steps: int
    random_start: bool = True


def warmed_up_attack(settings: AttackSettings, epoch: float, warmup_epochs: float) -> AttackSettings:
    """``attack_warmup_epochs``: eps and step size times min(1, epoch / warmup_epochs), the number of steps kept.

    The step shrinks with eps so that the attack keeps its shape (steps x step / eps) while the ball grows.
    """
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return settings
    fraction = max(0.0, float(epoch)) / warmup_epochs
    return replace(settings, eps=settings.eps * fraction, step_size=settings.step_size * fraction)


@dataclass(frozen=True)
class AttackSpec:
    """A method's training attack, declared once.

    ``kind``: ``"pgd"`` (``steps`` steps of ``attack_step_size``) or ``"fgsm"`` (one step of 1.25 eps from a
    uniform start: FGSM-RS). ``objective``: what the attack ascends, ``"ce"`` (cross-entropy with the labels),
    ``"kl"`` (TRADES' KL from the clean prediction) or ``"margin"`` (CW). ``start``: the random start,
    ``"uniform"`` in the eps-ball, ``"normal"`` (x + 0.001 N(0, I), TRADES' code) or ``"none"``;
    ``attack_random_start=False`` turns it off.
    """

    kind: str = "pgd"
    objective: str = "ce"
    start: str = "uniform"

    def __post_init__(self):
        for name, value, allowed in (
            ("kind", self.kind, ("pgd", "fgsm")),
            ("objective", self.objective, ("ce", "kl", "margin")),
            ("start", self.start, ("uniform", "normal", "none")),
        ):
            if value not in allowed:
                raise ValueError(f"AttackSpec {name}={value!r} is invalid: allowed one of {allowed}")
        if self.kind == "fgsm" and (self.objective, self.start) != ("ce", "uniform"):
            raise ValueError("AttackSpec kind='fgsm' is FGSM-RS: objective='ce', start='uniform'")

    @property
    def starts_from_clean_logits(self) -> bool:
        """Whether the attack's objective compares with the clean prediction (so it can reuse the clean logits)."""
        return self.objective == "kl"

    def describe(self) -> str:
        """How people name it: "PGD (KL objective, normal start)", "FGSM-RS"."""
        if self.kind == "fgsm":
            return "FGSM-RS"
        return f"PGD ({self.objective.upper()} objective, {self.start} start)"

    def craft(
        self,
        model,
        x: torch.Tensor,
        labels: torch.Tensor,
        settings: AttackSettings,
        clean_logits: Optional[torch.Tensor] = None,
        pgd_fn: Callable = pgd,
    ) -> torch.Tensor:
        """The adversarial batch. ``pgd_fn``: ``attacks.pgd`` or a drop-in with its signature (e.g. a CUDA-graph
        replay of the K steps)."""
        if self.kind == "fgsm":
            return fgsm_rs(model, x, labels, eps=settings.eps)
        return pgd_fn(
            model,
            x,
            labels,
            eps=settings.eps,
            step_size=settings.step_size,
            steps=settings.steps,
            loss=self.objective,
            init=self.start if settings.random_start else "none",
            clean_logits=clean_logits,
        )


@dataclass(frozen=True)
class AWPDefaults:
    """A method's published AWP settings: what `awp_gamma=True` and an unset `awp_warmup_epochs` take."""

    gamma: float
    warmup_epochs: float
    source: str


class AdversarialMethod:
    """The base class of a training method. Subclass it, set the class attributes, write :meth:`loss`, and
    register it with :func:`register_method`.

    Class attributes:
        name: the value of ``adv_method`` (lower case, no spaces).
        title: as people write it ("TRADES").
        citation: BibTeX of the method's paper (the model card cites it); ``paper_id``: its arXiv id.
        attack: the training attack (:class:`AttackSpec`), or None for natural training.
        uses_clean_pass: whether the loss reads ``z_nat`` (the clean batch's training forward).
        hyperparameters: the names of the argument fields the loss reads (e.g. ``("trades_beta",)``); the card,
            the resume check and the unused-argument check read them. ``label_smoothing_factor`` is read by every
            method and need not be listed.
        options: the method's own hyperparameters that are not argument fields, with their defaults (e.g.
            ``{"pairing_weight": 0.5}``); a run sets them with ``method_options="pairing_weight=1.0"`` (or a dict),
            and the loss reads them from ``hp`` like the fields.
        awp_defaults: the published AWP settings (:class:`AWPDefaults`), or None.
        default_components: the components the method runs with unless switched off (``("conservation",
            "revision")`` for CURE); any method can switch them on (docs/extending.md).
        soft_targets: whether the loss takes soft targets: ``inputs.labels`` of shape (B, C), class probabilities
            (mixup/cutmix, ``mixup_alpha``), besides class indices (B,). A loss written with
            ``F.cross_entropy``/:func:`smoothed_cross_entropy` and KL terms takes both; one that indexes by the
            label (``gather``) does not. ``soft_targets_refusal``: why not, for the error a run with mixup gets.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    citation: ClassVar[Optional[str]] = None
    paper_id: ClassVar[Optional[str]] = None
    attack: ClassVar[Optional[AttackSpec]] = None
    uses_clean_pass: ClassVar[bool] = True
    hyperparameters: ClassVar[Tuple[str, ...]] = ()
    options: ClassVar[Dict[str, Any]] = {}
    awp_defaults: ClassVar[Optional[AWPDefaults]] = None
    default_components: ClassVar[Tuple[str, ...]] = ()
    soft_targets: ClassVar[bool] = False
    soft_targets_refusal: ClassVar[Optional[str]] = None

    def loss(self, inputs: LossInputs, hp: Mapping[str, Any]) -> Tuple[torch.Tensor, Parts]:
        """``(loss, parts)`` from the step's logits and ``hp`` (the values of :attr:`hyperparameters` and
        ``label_smoothing_factor``, by field name)."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def validate(self, args) -> None:
        """Refuse, at construction, arguments this method cannot train with (the base class refuses nothing)."""

    def hyperparameter_values(self, args) -> Dict[str, Any]:
        """The values the loss reads, from the arguments: its fields, ``label_smoothing_factor`` and its options."""
        names = tuple(self.hyperparameters) + ("label_smoothing_factor",)
        values = {name: getattr(args, name) for name in names}
        values.update(self.resolve_options(getattr(args, "method_options", None)))
        return values

    def resolve_options(self, given: Union[None, str, Mapping[str, Any]]) -> Dict[str, Any]:
        """:attr:`options` with the values of ``method_options`` (``"name=value,name=value"`` or a dict), each
        converted to its default's type; an unknown name or a value of the wrong kind is refused."""
        if given is None or given == "" or given == {}:
            pairs: Dict[str, Any] = {}
        elif isinstance(given, Mapping):
            pairs = dict(given)
        else:
            items = [item.split("=", 1) for item in str(given).replace(" ", "").split(",") if item]
            if any(len(item) != 2 for item in items):
                raise ValueError(
                    f"method_options={given!r} is invalid: write name=value pairs separated by commas, "
                    f"e.g. {_example_options(self.options)}"
                )
            pairs = dict(items)
        unknown = sorted(set(pairs) - set(self.options))
        if unknown:
            known = sorted(self.options) or "none"
            raise ValueError(
                f"method_options={given!r} is invalid for adv_method={self.name!r}: unknown {unknown}; "
                f"the method's options are {known}"
            )
        values = dict(self.options)
        for name, value in pairs.items():
            values[name] = _as_type_of(self.options[name], value, name)
        return values

    def __repr__(self) -> str:
        return f"<method {self.name!r}: {self.title}>"


def _example_options(options: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "(this method has no options)"


def _as_type_of(default: Any, value: Any, name: str) -> Any:
    """``value`` as the type of ``default`` (bool, int, float or str), from text or a number."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return text in ("true", "1", "yes", "on")
    elif kind in (int, float) and not isinstance(value, bool):
        try:
            number = kind(value) if kind is float else int(str(value)) if isinstance(value, str) else value
            if kind is int and (not isinstance(number, int) or isinstance(number, bool)):
                raise ValueError
            return kind(number)
        except (TypeError, ValueError):
            pass
    elif kind is str:
        return str(value)
    else:
        return value
    raise ValueError(
        f"method_options {name}={value!r} is invalid: expected a {kind.__name__} like its default {default!r}"
    )


ENTRY_POINT_GROUP = "cure_hf.methods"
_REGISTRY: Dict[str, AdversarialMethod] = {}
# The registry as a read-only mapping, always current: `METHODS["cure"]`, `sorted(METHODS)`.
METHODS: Mapping[str, AdversarialMethod] = types.MappingProxyType(_REGISTRY)
_entry_points_loaded = False


def _check_method(method: AdversarialMethod) -> None:
    cls = type(method)
    name = getattr(method, "name", "")
    if not isinstance(name, str) or not name or name != name.strip().lower() or " " in name or "," in name:
        raise ValueError(
            f"{cls.__name__}.name={name!r} is invalid: a non-empty lower-case name without spaces or "
            "commas, e.g. name = 'alp'"
        )
    if not getattr(method, "title", ""):
        raise ValueError(f"{cls.__name__} (method {name!r}) needs a title, e.g. title = 'ALP'")
    if method.attack is not None and not isinstance(method.attack, AttackSpec):
        raise TypeError(f"{cls.__name__}.attack must be an AttackSpec or None, got {type(method.attack).__name__}")
    if cls.loss is AdversarialMethod.loss:
        raise TypeError(f"{cls.__name__} (method {name!r}) must define loss(self, inputs, hp)")
    if not isinstance(method.hyperparameters, tuple) or not all(isinstance(h, str) for h in method.hyperparameters):
        raise TypeError(f"{cls.__name__}.hyperparameters must be a tuple of argument field names")
    unknown = [c for c in method.default_components if c not in ("conservation", "revision")]
    if unknown:
        raise ValueError(
            f"{cls.__name__}.default_components={method.default_components!r}: unknown {unknown}; "
            "allowed 'conservation', 'revision'"
        )


def register_method(method: Union[Type[AdversarialMethod], AdversarialMethod, None] = None, *, replace: bool = False):
    """Register a method class (or instance) under its ``name``; usable as a decorator. A second method of the
    same name is refused unless ``replace=True``. Returns what it was given, so the class stays importable."""

    def add(target):
        instance = target() if isinstance(target, type) else target
        if not isinstance(instance, AdversarialMethod):
            raise TypeError(f"register_method takes an AdversarialMethod subclass or instance, got {target!r}")
        _check_method(instance)
        existing = _REGISTRY.get(instance.name)
        if existing is not None and not replace and type(existing) is not type(instance):
            raise ValueError(
                f"a method named {instance.name!r} is already registered ({type(existing).__name__}); "
                "choose another name, or register_method(..., replace=True)"
            )
        _REGISTRY[instance.name] = instance
        return target

    return add if method is None else add(method)


def _load_entry_points() -> None:
    """Register the methods of installed packages (entry-point group ``cure_hf.methods``), once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
        except Exception as error:  # a broken plug-in must not break cure_hf: say which and why
            logger.warning("cure_hf: the method entry point %r (%s) failed to load: %s", entry.name, entry.value, error)
            continue
        if (isinstance(loaded, type) and issubclass(loaded, AdversarialMethod)) or isinstance(
            loaded, AdversarialMethod
        ):
            name = loaded.name
            if name not in _REGISTRY:
                register_method(loaded)
        # a module whose import registered its methods (with the decorator) needs nothing more


def registered_methods() -> Mapping[str, AdversarialMethod]:
    """Every registered method by name, installed packages' included."""
    _load_entry_points()
    return METHODS


def get_method(name: str) -> AdversarialMethod:
    """The registered method called ``name``; an unknown name lists the registered ones."""
    methods = registered_methods()
    if name not in methods:
        raise ValueError(
            f"adv_method={name!r} is invalid: allowed one of {sorted(methods)} (the registered methods; "
            "register your own with cure_hf.register_method, docs/extending.md)"
        )
    return methods[name]


CURE_CITATION = (
    "@inproceedings{gowda2024conserve,\n  title={Conserve-Update-Revise to Cure Generalization and Robustness "
    "Trade-off in Adversarial Training},\n  author={Gowda, Shruthi and Zonooz, Bahram and Arani, Elahe},\n"
    "  booktitle={International Conference on Learning Representations},\n  year={2024}\n}"
)
PGD_AT_CITATION = (
    "@inproceedings{madry2018towards,\n  title={Towards Deep Learning Models Resistant to Adversarial Attacks},\n"
    "  author={Madry, Aleksander and Makelov, Aleksandar and Schmidt, Ludwig and Tsipras, Dimitris and Vladu, "
    "Adrian},\n  booktitle={International Conference on Learning Representations},\n  year={2018}\n}"
)
TRADES_CITATION = (
    "@inproceedings{zhang2019theoretically,\n  title={Theoretically Principled Trade-off between Robustness and "
    "Accuracy},\n  author={Zhang, Hongyang and Yu, Yaodong and Jiao, Jiantao and Xing, Eric and El Ghaoui, Laurent "
    "and Jordan, Michael},\n  booktitle={International Conference on Machine Learning},\n  year={2019}\n}"
)
MART_CITATION = (
    "@inproceedings{wang2020improving,\n  title={Improving Adversarial Robustness Requires Revisiting Misclassified "
    "Examples},\n  author={Wang, Yisen and Zou, Difan and Yi, Jinfeng and Bailey, James and Ma, Xingjun and Gu, "
    "Quanquan},\n  booktitle={International Conference on Learning Representations},\n  year={2020}\n}"
)
FGSM_RS_CITATION = (
    "@inproceedings{wong2020fast,\n  title={Fast is better than free: Revisiting adversarial training},\n"
    "  author={Wong, Eric and Rice, Leslie and Kolter, J. Zico},\n"
    "  booktitle={International Conference on Learning Representations},\n  year={2020}\n}"
)


# ------------------------------------------------------------------------------------- built-in methods
@register_method
class NaturalTraining(AdversarialMethod):
    name, title = "clean", "natural training"
    attack = None
    soft_targets = True

    def loss(self, inputs, hp):
        return clean_loss(inputs.z_nat, inputs.labels, hp["label_smoothing_factor"])


@register_method
class PGDAT(AdversarialMethod):
    name, title = "pgd", "PGD-AT"
    citation, paper_id = PGD_AT_CITATION, "1706.06083"
    attack = AttackSpec("pgd", "ce", "uniform")
    uses_clean_pass = False
    soft_targets = True
    awp_defaults = AWPDefaults(1e-2, 0.0, "AWP paper and AT_AWP/train_cifar10.py: --awp_gamma 0.01, --awp_warmup 0")

    def loss(self, inputs, hp):
        return pgd_at_loss(inputs.z_adv, inputs.labels, hp["label_smoothing_factor"])


@register_method
class TRADES(AdversarialMethod):
    name, title = "trades", "TRADES"
    citation, paper_id = TRADES_CITATION, "1901.08573"
    attack = AttackSpec("pgd", "kl", "normal")
    hyperparameters = ("trades_beta",)
    awp_defaults = AWPDefaults(
        5e-3, 10.0, "AWP paper and TRADES_AWP/train_trades_cifar.py: --awp-gamma 0.005, --awp-warmup 10"
    )
    soft_targets = True

    def loss(self, inputs, hp):
        return trades_loss(inputs.z_nat, inputs.z_adv, inputs.labels, hp["trades_beta"], hp["label_smoothing_factor"])


@register_method
class MART(AdversarialMethod):
    name, title = "mart", "MART"
    citation = MART_CITATION
    attack = AttackSpec("pgd", "ce", "normal")
    hyperparameters = ("trades_beta",)
    soft_targets_refusal = (
        "MART's loss is defined by one true class per example (its boosted CE pushes down the best wrong class, "
        "and its KL term is weighted by 1 - p_true), and a mixed target has two"
    )
    awp_defaults = AWPDefaults(
        5e-3, 10.0, "TRADES-AWP's values: MART's loss is also a CE term plus a beta-weighted KL term"
    )

    def loss(self, inputs, hp):
        return mart_loss(inputs.z_nat, inputs.z_adv, inputs.labels, hp["trades_beta"], hp["label_smoothing_factor"])


@register_method
class FGSMRS(PGDAT):
    """PGD-AT's loss on a one-step attack from a uniform start (1.25 eps)."""

    name, title = "fgsm_rs", "FGSM-RS"
    citation, paper_id = FGSM_RS_CITATION, "2001.03994"
    attack = AttackSpec("fgsm", "ce", "uniform")
    awp_defaults = AWPDefaults(
        1e-2, 0.0, "the AT_AWP script's own defaults for its --attack fgsm mode (same CE loss as PGD-AT)"
    )


@register_method
class CURE(AdversarialMethod):
    """CURE's update loss; its conservation and revision are components (on by default, each can be switched off:
    the paper's ablations). ``prominence="paper"`` selects the paper's update loss (TRADES with beta = 1)."""

    name, title = "cure", "CURE"
    citation, paper_id = CURE_CITATION, "2401.14948"
    attack = AttackSpec("pgd", "kl", "normal")
    hyperparameters = ("clean_weight", "prominence")
    soft_targets = True
    awp_defaults = AWPDefaults(
        5e-3,
        10.0,
        "TRADES-AWP's values: CURE attacks with TRADES' KL, adds KL consistency "
        "terms and fine-tunes a natural model, as TRADES-AWP's smaller gamma suits",
    )
    default_components = ("conservation", "revision")

    def loss(self, inputs, hp):
        if hp["prominence"] == "paper":
            return cure_paper_update_loss(inputs.z_nat, inputs.z_adv, inputs.labels, hp["label_smoothing_factor"])
        return cure_update_loss(
            inputs.z_nat, inputs.z_adv, inputs.labels, hp["clean_weight"], hp["label_smoothing_factor"]
        )


def method_loss(
    method: str,
    labels: torch.Tensor,
    z_nat=None,
    z_adv=None,
    r_nat=None,
    r_adv=None,
    *,
    beta: float = 6.0,
    alpha: float = 0.1,
    gamma: float = 1.0,
    prominence: str = "loss",
    label_smoothing: float = 0.0,
) -> Tuple[torch.Tensor, Parts]:
    """The loss of a built-in method with its default components from keyword logits and hyperparameters (the
    paper's symbols): for CURE with the revision logits, its update loss plus gamma times the consistency term."""
    spec = get_method(method)
    hp = {
        "trades_beta": beta,
        "clean_weight": alpha,
        "prominence": prominence,
        "label_smoothing_factor": label_smoothing,
    }
    result = spec.loss(LossInputs(labels, z_nat, z_adv, r_nat, r_adv), hp)
    if "revision" in spec.default_components and r_nat is not None:
        result = with_consistency(result, z_nat, z_adv, r_nat, r_adv, gamma)
    return result
