"""Models that take pixels in [0, 1]: normalisation lives inside the model, so eps means what users think.

``create_model`` builds a timm model by name (``pretrained=False`` by default: no network) and
wraps it in :class:`PixelNormalized` with the mean/std of the model's pretrained config.
``find_head_modules`` names the classifier head that CURE never masks.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["PixelNormalized", "create_model", "find_head_modules", "head_parameter_names"]


class PixelNormalized(nn.Module):
    """``model((x - mean) / std)`` for ``x`` in [0, 1]; mean and std are buffers saved with the weights."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} must have the same length and std > 0")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        mean, std = self.mean.to(pixel_values.dtype), self.std.to(pixel_values.dtype)
        return self.model((pixel_values - mean) / std, **kwargs)


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    normalize: bool = True,
    **kwargs,
) -> nn.Module:
    """A timm model by name, with a ``num_classes`` head, taking pixels in [0, 1].

    ``image_size``/``patch_size`` adapt ViTs to small images (e.g. 32x32 with patch 4 or 8).
    """
    import timm

    if image_size is not None and _is_vit_name(name):
        kwargs.setdefault("img_size", image_size)
    if patch_size is not None:
        kwargs.setdefault("patch_size", patch_size)
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    if not normalize:
        return model
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return PixelNormalized(model, cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5)))


def _is_vit_name(name: str) -> bool:
    base = name.split(":")[-1].split("/")[-1]
    return any(tag in base for tag in ("vit", "deit", "eva", "beit", "test_vit"))


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The inner model of known wrappers (DDP's .module, PixelNormalized's .model) and its name prefix."""
    prefix = ""
    while True:
        if isinstance(model, PixelNormalized):
            model, prefix = model.model, prefix + "model."
        elif hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "OptimizedModule"
        ):
            model, prefix = model.module, prefix + "module."
        else:
            return model, prefix


def find_head_modules(model: nn.Module) -> List[str]:
    """Names (as in ``model.named_modules()``) of the classifier head, for timm and transformers models.

    timm: the module ``get_classifier()`` returns. transformers: ``classifier``/``score``/``head`` on an
    image-classification model (a ``TimmWrapperForImageClassification`` is searched inside). Otherwise the
    last ``nn.Linear``. Raises when nothing is found: pass ``head_modules`` explicitly.
    """
    inner, prefix = _unwrap(model)
    names = {id(m): n for n, m in model.named_modules()}
    candidates: List[nn.Module] = []
    if hasattr(inner, "get_classifier"):
        head = inner.get_classifier()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            candidates.append(head)
    if not candidates and hasattr(inner, "timm_model"):  # transformers' TimmWrapperForImageClassification
        head = inner.timm_model.get_classifier()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            candidates.append(head)
    if not candidates:
        for attr in ("classifier", "score", "head", "fc"):
            head = getattr(inner, attr, None)
            if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
                candidates.append(head)
                break
    if not candidates:
        linears = [m for m in inner.modules() if isinstance(m, nn.Linear)]
        if linears:
            candidates.append(linears[-1])
    found = [names[id(m)] for m in candidates if id(m) in names and sum(1 for _ in m.parameters()) > 0]
    if not found:
        raise ValueError(
            f"could not find the classifier head of {type(inner).__name__}; "
            "set head_modules=['<module name>'] in CURETrainingArguments"
        )
    return found


def head_parameter_names(model: nn.Module, head_modules: Optional[Sequence[str]] = None) -> set:
    """Names of the parameters inside the head modules (given, or auto-detected)."""
    heads = list(head_modules) if head_modules else find_head_modules(model)
    modules = dict(model.named_modules())
    missing = [h for h in heads if h not in modules]
    if missing:
        raise ValueError(
            f"head_modules={heads!r}: {missing} not found in the model; "
            f"top-level modules are {[n for n, _ in model.named_children()]}"
        )
    names = set()
    for h in heads:
        names.update(f"{h}.{n}" if h else n for n, _ in modules[h].named_parameters())
    return names
