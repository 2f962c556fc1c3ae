"""Models that take pixels in [0, 1]: normalisation lives inside the model, so eps means what users think.

``create_model`` builds a timm model by name (``pretrained=False`` by default: no network) and
wraps it in :class:`PixelNormalized` with the mean/std of the model's pretrained config.
``load_model`` also takes ``hf-hub:<repo>`` ids, ``local-dir:<dir>`` and plain folders (timm's format, which
cure_hf writes, or a transformers image-classification folder) and Hub repos in either format.
``find_head_modules`` names the classifier head that CURE never masks.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "PixelNormalized", "create_model", "load_model", "find_head_modules", "head_parameter_names",
    "unwrap_normalized", "NON_SAFETENSORS_WEIGHTS",
]

# Weight files that need pickle (torch.load); cure_hf refuses them and asks for safetensors.
NON_SAFETENSORS_WEIGHTS = ("pytorch_model.bin", "pytorch_model.pth", "model.pth", "model.pt", "pytorch_model.bin.index.json")


class PixelNormalized(nn.Module):
    """``model((x - mean) / std)`` for ``x`` in [0, 1]; mean and std are buffers saved with the weights."""

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], input_size: Optional[Sequence[int]] = None
    ):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} must have the same length and std > 0")
        self.model = model
        # (height, width) the model is trained on, written to the saved config so that timm's data config
        # and the transformers image processor resize to it; None: taken from the data at save time.
        self.input_size = tuple(int(v) for v in input_size) if input_size is not None else None
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
    """A model with a ``num_classes`` head taking pixels in [0, 1]: :func:`load_model` with ``pretrained=False``
    by default (no network) and ``num_classes`` required.

    ``name`` is a timm name, ``hf-hub:<repo>``, ``local-dir:<folder>``, a folder or a transformers repo id.
    ``image_size``/``patch_size`` adapt ViTs to small images (e.g. 32x32 with patch 4 or 8); with
    ``pretrained=True`` timm resamples the position embedding and the patch kernel.
    """
    return load_model(name, num_classes, pretrained=pretrained, image_size=image_size, patch_size=patch_size,
                      normalize=normalize, **kwargs)


def _is_vit_name(name: str) -> bool:
    base = name.split(":")[-1].split("/")[-1]
    return any(tag in base for tag in ("vit", "deit", "eva", "beit", "test_vit"))


def _takes_img_size(name: str, config: Optional[Dict[str, Any]] = None) -> bool:
    """Whether the timm model (a registry name, or the timm ``config.json`` of a folder/repo) has one input size."""
    if config is not None:
        return bool(config.get("pretrained_cfg", {}).get("fixed_input_size")) or "img_size" in config.get(
            "model_args", {}
        )
    import timm.models

    arch = name.split(".")[0]
    if ":" not in name and timm.models.is_model(arch):
        return bool(timm.models.get_pretrained_cfg_value(arch, "fixed_input_size")) or _is_vit_name(arch)
    return _is_vit_name(name)


def load_model(
    spec: str,
    num_classes: Optional[int] = None,
    *,
    pretrained: Optional[bool] = None,
    image_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    library: Optional[str] = None,
    normalize: bool = True,
    **kwargs,
) -> nn.Module:
    """A classifier taking pixels in [0, 1], from any of:

    - a timm model name (``"resnet18"``, ``"cifar_resnet18"``, ``"vit_tiny_patch16_224"``): built with
      ``pretrained=False`` unless ``pretrained=True`` is passed;
    - ``"hf-hub:<repo>"`` or ``"local-dir:<folder>"``: timm's format (what cure_hf saves), with weights;
    - a plain local folder or a Hub repo id: timm's format goes through timm, anything else through
      ``transformers.AutoModelForImageClassification``; ``library="transformers"`` forces transformers (a
      timm folder then loads as ``TimmWrapperForImageClassification``).

    ``num_classes`` different from the checkpoint's gives a new, freshly initialised head. Weights load
    from safetensors only. Normalisation goes inside the model (:class:`PixelNormalized`, mean/std of the
    pretrained config or the image processor), so attacks see [0, 1] pixels.
    """
    if library not in (None, "timm", "transformers"):
        raise ValueError(f"library={library!r}: use None (decide from the checkpoint), 'timm' or 'transformers'")
    from . import cifar_models  # noqa: F401

    kind, location, config = _resolve_source(spec)
    if kind == "timm-name" and library == "transformers":
        raise ValueError(f"library='transformers' needs a folder or a Hub repo id, got the timm name {spec!r}")
    if library == "timm" and kind != "timm-name" and not _is_timm_config(config):
        raise ValueError(
            f"library='timm': {spec!r} is a transformers checkpoint (its config.json has no 'architecture'), which "
            "timm cannot build; leave library=None to load it through transformers"
        )
    if kind == "timm-name" or (_is_timm_config(config) and library != "transformers"):
        import timm

        if kind == "timm-name":
            name, pretrained = location, bool(pretrained)
        else:
            pretrained = True if pretrained is None else pretrained
            if pretrained:
                _require_safetensors(kind, location)
            name = f"{'local-dir' if kind == 'folder' else 'hf-hub'}:{location}"
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        for key, value in _size_kwargs(name, config, image_size, patch_size).items():
            kwargs.setdefault(key, value)
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
        if not normalize:
            return model
        wrapped = _normalized(model, model.pretrained_cfg, image_size)
        wrapped.source = location.partition("@")[0] if kind == "hub" else None  # the card's base_model
        return wrapped
    return _load_transformers(kind, location, num_classes, image_size=image_size, normalize=normalize, **kwargs)


def _normalized(model: nn.Module, cfg: Dict[str, Any], image_size: Optional[int]) -> nn.Module:
    input_size = (image_size, image_size) if image_size is not None else None
    return PixelNormalized(model, cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5)), input_size)


def _size_kwargs(name: str, config: Optional[Dict[str, Any]], image_size: Optional[int],
                 patch_size: Optional[int]) -> Dict[str, int]:
    """img_size/patch_size for models built for one input size (ViTs); CNNs take any size and have no patches."""
    if not _takes_img_size(name, config):
        return {}
    out = {}
    if image_size is not None:
        out["img_size"] = image_size
    if patch_size is not None:
        out["patch_size"] = patch_size
    return out


def _load_transformers(kind: str, location: str, num_classes: Optional[int], *, image_size: Optional[int],
                       normalize: bool, **kwargs) -> nn.Module:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if kind == "folder":
        _require_safetensors(kind, location)
    if num_classes is not None:
        kwargs.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    model = AutoModelForImageClassification.from_pretrained(location, use_safetensors=True, **kwargs)
    if not normalize:
        return model
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    try:
        processor = AutoImageProcessor.from_pretrained(location)
    except (OSError, ValueError):  # no processor saved: the common 0.5/0.5 of ViT-style checkpoints
        processor = None
    if processor is not None:
        data_config = getattr(processor, "data_config", None)  # TimmWrapperImageProcessor
        mean = tuple(data_config["mean"]) if data_config else tuple(getattr(processor, "image_mean", mean))
        std = tuple(data_config["std"]) if data_config else tuple(getattr(processor, "image_std", std))
    input_size = (image_size, image_size) if image_size is not None else None
    if input_size is None and processor is not None and getattr(processor, "data_config", None):
        input_size = tuple(processor.data_config["input_size"][-2:])  # the size the timm checkpoint was saved at
    wrapped = PixelNormalized(model, mean, std, input_size)
    wrapped.image_processor = processor
    wrapped.source = location.partition("@")[0] if kind == "hub" else None
    return wrapped


def _read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_timm_config(config: Optional[Dict[str, Any]]) -> bool:
    """timm's config.json: an ``architecture`` (singular) and no transformers model type but timm_wrapper."""
    return config is not None and "architecture" in config and config.get("model_type", "timm_wrapper") == "timm_wrapper"


def _resolve_source(spec: str) -> Tuple[str, str, Optional[Dict[str, Any]]]:
    """(kind, location, config.json or None): kind is 'timm-name', 'folder' or 'hub'."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model={spec!r}: pass a timm name, 'hf-hub:<repo>', 'local-dir:<folder>', a folder or a repo id")
    if spec.startswith("local-dir:") or os.path.isdir(spec):
        folder = spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec
        config_file = os.path.join(folder, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"model={spec!r}: {config_file} not found; a model folder needs config.json and model.safetensors "
                "(as written by cure_hf.hub.save_pretrained, timm's save_for_hf or transformers' save_pretrained)"
            )
        return "folder", folder, _read_json(config_file)
    if spec.startswith("hf-hub:"):
        return "hub", spec[len("hf-hub:"):], _hub_config(spec[len("hf-hub:"):])
    if spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec:
        raise FileNotFoundError(f"model={spec!r}: no such folder (a Hub repo id is '<user>/<name>')")
    import timm.models

    from . import cifar_models  # noqa: F401

    if timm.models.is_model(spec.split(".")[0]) and "/" not in spec:
        return "timm-name", spec, None
    if spec.count("/") == 1 and not spec.startswith(("/", ".")):
        return "hub", spec, _hub_config(spec)
    raise ValueError(
        f"model={spec!r} is neither a timm model name, a folder, nor a Hub repo id; "
        f"examples: 'resnet18', 'cifar_resnet18', 'hf-hub:timm/resnet18.a1_in1k', './my-model' "
        f"(see timm.list_models('*resnet*'))"
    )


def _hub_config(repo: str) -> Dict[str, Any]:
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = repo.partition("@")
    return _read_json(hf_hub_download(repo_id, "config.json", revision=revision or None))


def _require_safetensors(kind: str, location: str) -> None:
    """Refuse checkpoints whose weights are only in pickle formats (torch.load runs code from the file)."""
    if kind == "folder":
        files = os.listdir(location)
        if any(f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in files):
            return
        pickled = [f for f in files if f in NON_SAFETENSORS_WEIGHTS or f.endswith((".bin", ".pth", ".pt", ".pth.tar"))]
        raise ValueError(
            f"{location} has no safetensors weights (found {pickled or 'no weights'}); cure_hf loads safetensors "
            "only, since pickled checkpoints can run code when loaded. Convert it once in an environment you trust: "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = location.partition("@")
    try:
        hf_hub_download(repo_id, "model.safetensors", revision=revision or None)
    except LocalEntryNotFoundError:
        from huggingface_hub import try_to_load_from_cache

        pickled = [name for name in NON_SAFETENSORS_WEIGHTS
                   if isinstance(try_to_load_from_cache(repo_id, name, revision=revision or None), str)]
        if not pickled:
            raise  # offline and not cached: huggingface_hub's own message says so
        raise ValueError(
            f"hf-hub:{location} has no model.safetensors in the local cache, only {pickled}; cure_hf loads "
            "safetensors only (pickled checkpoints can run code when loaded)."
        ) from None
    except EntryNotFoundError as e:
        raise ValueError(
            f"hf-hub:{location} has no model.safetensors; cure_hf loads safetensors only (pickled checkpoints can "
            "run code when loaded). Ask the owner for safetensors weights, or convert them yourself."
        ) from e


def unwrap_normalized(model: nn.Module) -> Tuple[nn.Module, Optional[PixelNormalized]]:
    """The network inside DDP/compile wrappers and :class:`PixelNormalized`, and that PixelNormalized (or None)."""
    inner, _ = _unwrap(model)
    normalized = None
    probe = model
    while probe is not inner:
        if isinstance(probe, PixelNormalized):
            normalized = probe
            probe = probe.model
        else:
            probe = probe.module
    return inner, normalized


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
