"""The layer-wise study of CURE (paper, section 3): adversarial training that updates only chosen blocks.

A network is cut into *blocks* by parameter name: the stem, the residual stages of a ResNet
(``layer1`` ... ``layer4``; ``block1`` ... ``block3`` of a WideResNet; ``stages.N`` of ConvNeXt-like
timm models), the transformer blocks of a ViT (``blocks.N``), and the head. The paper writes a setting
as "U-" and the 1-based stage numbers it updates: U-1, U-23, U-234; ``U-all`` updates everything.

``freeze_for_setting(model, "U-23")`` leaves ``layer2`` and ``layer3`` (and the classifier head, unless
asked otherwise) trainable and freezes the rest: ``requires_grad=False``, and the normalisation layers of
frozen blocks always run with their running statistics, so a frozen block stays bit-identical through
training (weights and BatchNorm buffers). ``reinitialize_blocks`` re-draws the updated blocks' weights
(the study's "re-initialised" rows).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = [
    "block_of",
    "parameter_blocks",
    "model_blocks",
    "stage_blocks",
    "parse_setting",
    "freeze_for_setting",
    "freeze_blocks",
    "reinitialize_blocks",
]

# The residual stages / transformer blocks, by their timm (and cure_hf.cifar_models) names.
_STAGE_PATTERNS = (
    re.compile(r"^(layer\d+)\b"),  # ResNet, cifar_resnet18, cifar_preact_resnet18
    re.compile(r"^(block\d+)\b"),  # cifar_wide_resnet34_10
    re.compile(r"^(stages\.\d+)\b"),  # ConvNeXt, RegNet, timm test_convnext
    re.compile(r"^(blocks\.\d+)\b"),  # ViT, DeiT
)
_HEAD_PREFIXES = ("fc", "head", "classifier", "fc_norm", "head_drop")
_WRAPPER_PREFIXES = ("model.", "timm_model.", "module.", "_orig_mod.")


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def block_of(parameter_name: str) -> str:
    """The block a parameter belongs to: a stage name (``layer2``, ``blocks.3``), ``head`` or ``stem``.

    Names inside wrappers (``PixelNormalized.model``, DDP's ``module``, ``torch.compile``) are resolved first.
    A norm after the last stage (ViT ``norm``, pre-activation ``final_bn``) is the ``neck``.
    """
    name = _strip_wrappers(parameter_name)
    for pattern in _STAGE_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    first = name.split(".")[0]
    if first in _HEAD_PREFIXES or name.startswith("head."):
        return "head"
    if first in ("norm", "final_bn", "bn_final"):
        return "neck"
    return "stem"


def parameter_blocks(model: nn.Module) -> Dict[str, str]:
    """``{parameter name: block}`` for every parameter of ``model`` (names as ``model.named_parameters()``)."""
    names = [n for n, _ in model.named_parameters()]
    blocks = {n: block_of(n) for n in names}
    stripped = [_strip_wrappers(n) for n in names]
    # WideResNet's bn1 follows the last stage (there is no stem norm): it belongs with the neck.
    if any(s.startswith("block") for s in stripped) and not any(s.startswith("layer") for s in stripped):
        for n, s in zip(names, stripped):
            if s.startswith("bn1."):
                blocks[n] = "neck"
    return blocks


def model_blocks(model: nn.Module) -> List[str]:
    """The blocks of ``model`` in forward order: stem, the stages, neck (if any), head."""
    seen: List[str] = []
    for block in parameter_blocks(model).values():
        if block not in seen:
            seen.append(block)
    stages = [b for b in seen if b not in ("stem", "neck", "head")]
    return [b for b in ("stem",) if b in seen] + stages + [b for b in ("neck", "head") if b in seen]


def stage_blocks(model: nn.Module) -> List[str]:
    """The numbered stages only (what U-1 ... U-4 refer to), in order."""
    return [b for b in model_blocks(model) if b not in ("stem", "neck", "head")]


def parse_setting(setting: str, model: nn.Module) -> List[str]:
    """The blocks a setting updates: ``"U-23"`` -> ``["layer2", "layer3"]``; ``"U-all"`` -> every block.

    Digits are 1-based stage numbers (models with more than 9 stages, such as ViTs, can use
    ``"U-3,4,10"``); a comma-separated list of block names (``"stem,layer4"``) is accepted too.
    """
    stages = stage_blocks(model)
    known = model_blocks(model)
    text = setting.strip()
    if text.upper() in ("U-ALL", "ALL"):
        return list(known)
    if text.upper().startswith("U-"):
        body = text[2:]
        numbers = body.split(",") if "," in body else list(body)
        try:
            indices = [int(n) for n in numbers if n.strip()]
        except ValueError:
            indices = []
        if not indices or any(not 1 <= i <= len(stages) for i in indices):
            raise ValueError(
                f"setting={setting!r} is invalid: this model has stages {stages}, so write U- followed by stage "
                f"numbers 1..{len(stages)} (e.g. 'U-1', 'U-23', 'U-{len(stages)}'), or 'U-all'"
            )
        return [stages[i - 1] for i in sorted(set(indices))]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise ValueError(
            f"setting={setting!r}: unknown blocks {unknown or names}; this model's blocks are {known}, "
            "or write 'U-23' / 'U-all'"
        )
    return names


def _modules_of_blocks(model: nn.Module, blocks: Iterable[str]) -> List[nn.Module]:
    """Leaf modules owning parameters of ``blocks`` (a module whose parameters all lie in those blocks)."""
    blocks, names = set(blocks), parameter_blocks_cache(model)
    owners = []
    for module_name, module in model.named_modules():
        own = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
        if own and all(names.get(n) in blocks for n in own):
            owners.append(module)
    return owners


def parameter_blocks_cache(model: nn.Module) -> Dict[str, str]:
    """``parameter_blocks(model)``, computed once per model."""
    cache = model.__dict__.get("_cure_parameter_blocks")
    if cache is None:
        cache = parameter_blocks(model)
        model.__dict__["_cure_parameter_blocks"] = cache
    return cache


def _keep_norm_in_eval(module: nn.Module, _inputs) -> None:
    """Forward pre-hook of a frozen normalisation layer: it uses (and never updates) its running statistics."""
    module.training = False


def freeze_blocks(model: nn.Module, trainable: Sequence[str]) -> List[str]:
    """Freeze every block not in ``trainable``; returns the frozen blocks.

    Frozen: ``requires_grad=False`` on their parameters, and their BatchNorm layers forced to eval mode at
    every forward (the Trainer calls ``model.train()`` each step), so their running statistics stay fixed.
    """
    blocks = parameter_blocks_cache(model)
    trainable = set(trainable)
    unknown = trainable - set(blocks.values())
    if unknown:
        raise ValueError(
            f"trainable={sorted(unknown)} are not blocks of this model; its blocks are {model_blocks(model)}"
        )
    frozen = [b for b in model_blocks(model) if b not in trainable]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(blocks[name] in trainable)
    for module in _modules_of_blocks(model, frozen):
        if isinstance(module, nn.modules.batchnorm._NormBase) and not getattr(module, "_cure_frozen", False):
            module.register_forward_pre_hook(_keep_norm_in_eval)
            module._cure_frozen = True
            module.eval()
    return frozen


def freeze_for_setting(model: nn.Module, setting: str, *, train_head: bool = True) -> List[str]:
    """Freeze ``model`` for a study setting (``"U-23"``); the head stays trainable unless ``train_head=False``.

    Returns the trainable blocks.
    """
    trainable = parse_setting(setting, model)
    if train_head and "head" in model_blocks(model) and "head" not in trainable:
        trainable = trainable + ["head"]
    freeze_blocks(model, trainable)
    return trainable


@torch.no_grad()
def reinitialize_blocks(model: nn.Module, blocks: Sequence[str], seed: Optional[int] = 0) -> int:
    """Re-draw the weights of ``blocks`` with each layer's own initialiser (``reset_parameters``); returns how
    many layers were reset. BatchNorm running statistics of those blocks are reset too."""
    known = set(parameter_blocks_cache(model).values())
    unknown = set(blocks) - known
    if unknown:
        raise ValueError(f"blocks={sorted(unknown)} are not blocks of this model; its blocks are {model_blocks(model)}")
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    count = 0
    try:
        for module in _modules_of_blocks(model, blocks):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                count += 1
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                module.reset_running_stats()
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    if count == 0:
        raise ValueError(f"blocks={list(blocks)}: no layer with reset_parameters() found to re-initialise")
    return count
