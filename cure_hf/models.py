"""Models that take pixels in [0, 1]: normalisation lives inside the model, so eps means what users think.

``create_model`` builds a timm model by name (``pretrained=False`` by default: no network) and
wraps it in :class:`PixelNormalized` with the mean/std of the model's pretrained config.
``load_model`` also takes ``hf-hub:<repo>`` ids, ``local-dir:<dir>`` and plain folders (timm's format, which
cure_hf writes, or a transformers image-classification folder) and Hub repos in either format.
``model_preprocessing`` says how the model wants its pixels made (resize, crop, interpolation): timm's data
config for timm models, the image processor for transformers-native ones; training, evaluation and the saved
folder all use it. ``find_head_modules`` names the classifier head that CURE never masks.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .files import read_json

__all__ = [
    "PixelNormalized",
    "SelectLogits",
    "create_model",
    "load_model",
    "find_head_modules",
    "head_parameter_names",
    "unwrap_normalized",
    "logits_index",
    "model_data_config",
    "model_preprocessing",
    "conform_image_processor",
    "NON_SAFETENSORS_WEIGHTS",
]

ImageSize = Union[int, Sequence[int]]

# Weight files that need pickle (torch.load); cure_hf refuses them and asks for safetensors.
NON_SAFETENSORS_WEIGHTS = (
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
    "model.pt",
    "pytorch_model.bin.index.json",
)


class PixelNormalized(nn.Module):
    """``model((x - mean) / std)`` for ``x`` in [0, 1]; mean and std are buffers saved with the weights.

    ``input_size`` (``(height, width)`` or an int) is the size the model is trained on: the whole image is resized
    to it (``crop_pct`` 1). ``data_config`` holds timm data-config entries (``interpolation``, ``crop_pct``,
    ``crop_mode``) that replace the inner timm model's pretrained config; ``image_processor`` is the transformers
    image processor of a transformers-native model (None: a plain resize, see :func:`model_preprocessing`);
    ``source`` is the Hub id the weights came from (the model card's ``base_model``).
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: Optional[ImageSize] = None,
        data_config: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} must have the same length and std > 0")
        self.model = model
        # None: taken from the data at save time (or from the inner model's pretrained config)
        self.input_size = _height_width(input_size, "input_size")
        self.data_config = dict(data_config or {})
        self.image_processor = None
        self.source: Optional[str] = None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        mean, std = self.mean.to(pixel_values.dtype), self.std.to(pixel_values.dtype)
        return self.model((pixel_values - mean) / std, **kwargs)


class SelectLogits(nn.Module):
    """``model(x)[index]``: the logits of a network whose forward returns several outputs, e.g. ``(features, logits)``.

    CURETrainer, its attacks and its evaluation need a forward that returns the logits alone; wrap such a network::

        from cure_hf.models import SelectLogits
        model = cure_hf.PixelNormalized(SelectLogits(net, index=1), mean, std)  # or just SelectLogits(net, index=1)

    It saves: checkpoints and :func:`cure_hf.hub.save_pretrained` write the network inside (``net``, e.g. a timm
    model), in its own format and without a wrapper prefix, so ``timm.create_model("local-dir:<folder>",
    pretrained=True)`` loads it as it was, returning all its outputs (transformers' ``TimmWrapper`` calls
    ``forward_features``/``forward_head``, hence the logits). config.json records the index (``"cure_hf":
    {"logits_index": 1}``) and :func:`load_model` wraps the loaded network in ``SelectLogits`` again, so
    ``cure_hf.load_model(folder)`` returns the trained model's logits. ``index``: the position of the logits in the
    output (negative counts from the end).
    """

    def __init__(self, model: nn.Module, index: int = 1):
        super().__init__()
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(
                f"index={index!r}: give the position of the logits in the model's output, e.g. 1 for (features, logits)"
            )
        self.model = model
        self.index = index

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        output = self.model(pixel_values, **kwargs)
        if torch.is_tensor(output):  # indexing it would pick an example of the batch, not an output
            raise TypeError(
                f"SelectLogits(index={self.index}): the model returns one tensor, not several outputs; "
                "use it without SelectLogits"
            )
        return output[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"


def logits_index(model: nn.Module) -> Optional[int]:
    """The ``index`` of the :class:`SelectLogits` among ``model``'s wrappers, or None (the model returns its logits)."""
    probe = model
    while True:
        if isinstance(probe, SelectLogits):
            return probe.index
        if isinstance(probe, PixelNormalized):
            probe = probe.model
        elif type(probe).__name__ in ("DistributedDataParallel", "DataParallel", "OptimizedModule") and isinstance(
            getattr(probe, "module", None), nn.Module
        ):
            probe = probe.module
        else:
            return None


def _saved_logits_index(config: Optional[Dict[str, Any]]) -> Optional[int]:
    """The logits index a cure_hf save recorded in config.json (see :class:`SelectLogits`), or None."""
    marker = (config or {}).get("cure_hf")
    index = marker.get("logits_index") if isinstance(marker, dict) else None
    return int(index) if index is not None else None


def _height_width(size: Optional[ImageSize], name: str) -> Optional[Tuple[int, int]]:
    """``(height, width)`` from an int or a pair; None stays None."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{name}={size!r}: give an int or (height, width) of positive ints, e.g. 32 or (48, 32)")
    return int(pair[0]), int(pair[1])


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    image_size: Optional[ImageSize] = None,
    patch_size: Optional[int] = None,
    normalize: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **kwargs,
) -> nn.Module:
    """A model with a ``num_classes`` head taking pixels in [0, 1]: :func:`load_model` with ``pretrained=False``
    by default (no network) and ``num_classes`` required.

    ``name`` is a timm name, ``hf-hub:<repo>``, ``local-dir:<folder>``, a folder or a transformers repo id.
    ``image_size`` (an int or ``(height, width)``) and ``patch_size`` adapt ViTs to small images (e.g. 32x32
    with patch 4 or 8); with ``pretrained=True`` timm resamples the position embedding and the patch kernel.
    """
    return load_model(
        name,
        num_classes,
        pretrained=pretrained,
        image_size=image_size,
        patch_size=patch_size,
        normalize=normalize,
        mean=mean,
        std=std,
        **kwargs,
    )


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
    image_size: Optional[ImageSize] = None,
    patch_size: Optional[int] = None,
    library: Optional[str] = None,
    normalize: bool = True,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
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
    pretrained config or the image processor, or ``mean``/``std`` when given), so attacks see [0, 1] pixels.
    ``image_size``: an int or ``(height, width)``; the model's preprocessing then resizes whole images to it.
    """
    if library not in (None, "timm", "transformers"):
        raise ValueError(f"library={library!r}: use None (decide from the checkpoint), 'timm' or 'transformers'")
    _height_width(image_size, "image_size")  # refuse a bad size before building anything
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
        cfg = model.pretrained_cfg
        index = _saved_logits_index(config)
        if index is not None:  # saved from a SelectLogits: the network returns several outputs
            model = SelectLogits(model, index)
        if not normalize:
            return model
        wrapped = PixelNormalized(
            model,
            cfg.get("mean", (0.5, 0.5, 0.5)) if mean is None else mean,
            cfg.get("std", (0.5, 0.5, 0.5)) if std is None else std,
            image_size,
        )
        # the card's base_model: the Hub repo the weights came from (timm's own repo for a pretrained timm name)
        if kind == "hub":
            wrapped.source = location.partition("@")[0]
        elif kind == "timm-name" and pretrained:
            wrapped.source = cfg.get("hf_hub_id")
        return wrapped
    return _load_transformers(
        kind,
        location,
        num_classes,
        image_size=image_size,
        normalize=normalize,
        mean=mean,
        std=std,
        logits_index=_saved_logits_index(config),
        **kwargs,
    )


def _size_kwargs(
    name: str, config: Optional[Dict[str, Any]], image_size: Optional[ImageSize], patch_size: Optional[int]
) -> Dict[str, Any]:
    """img_size/patch_size for models built for one input size (ViTs); CNNs take any size and have no patches."""
    if not _takes_img_size(name, config):
        return {}
    out = {}
    if image_size is not None:
        out["img_size"] = image_size if isinstance(image_size, int) else tuple(image_size)
    if patch_size is not None:
        out["patch_size"] = patch_size
    return out


def _load_transformers(
    kind: str,
    location: str,
    num_classes: Optional[int],
    *,
    image_size: Optional[ImageSize],
    normalize: bool,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    logits_index: Optional[int] = None,
    **kwargs,
) -> nn.Module:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if kind == "folder":
        _require_safetensors(kind, location)
    if num_classes is not None:
        kwargs.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    model = AutoModelForImageClassification.from_pretrained(location, use_safetensors=True, **kwargs)
    if logits_index is not None:  # saved from a SelectLogits
        model = SelectLogits(model, logits_index)
    if not normalize:
        return model
    try:
        processor = AutoImageProcessor.from_pretrained(location)
    except (OSError, ValueError):
        processor = None
    data_config = dict(getattr(processor, "data_config", None) or {})  # TimmWrapperImageProcessor: timm's
    found_mean = data_config.pop("mean", None) or getattr(processor, "image_mean", None)
    found_std = data_config.pop("std", None) or getattr(processor, "image_std", None)
    if (mean is None or std is None) and (found_mean is None or found_std is None):
        assumed = (0.5, 0.5, 0.5)
        warnings.warn(
            f"{location} has no image processor (preprocessor_config.json), so cure_hf does not know how the model "
            f"normalises its pixels and assumes mean={tuple(mean or assumed)} std={tuple(std or assumed)} (the common "
            "ViT values). "
            "If it was trained with other values, its accuracy and eps are wrong: pass them, e.g. "
            "load_model(..., mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).",
            UserWarning,
            stacklevel=3,
        )
        found_mean = found_std = assumed
    input_size = image_size
    if input_size is None and "input_size" in data_config:
        input_size = tuple(data_config["input_size"][-2:])  # the size the timm checkpoint was saved at
    data_config.pop("input_size", None)
    if image_size is not None:
        data_config["crop_pct"] = 1.0  # a new input size: whole images are resized to it
    wrapped = PixelNormalized(
        model,
        found_mean if mean is None else mean,
        found_std if std is None else std,
        input_size,
        data_config=data_config,
    )
    if processor is not None and not hasattr(processor, "data_config"):
        wrapped.image_processor = processor
    wrapped.source = location.partition("@")[0] if kind == "hub" else None
    return wrapped


# ------------------------------------------------------------------------------------- preprocessing
def model_data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's data config of a timm model (bare, :class:`PixelNormalized` or transformers' ``TimmWrapper``).

    ``input_size``, ``interpolation``, ``crop_pct`` and ``crop_mode`` are what ``timm.data.create_transform`` needs
    to make the model's pixels; ``mean``/``std`` are the in-model normalisation (0 and 1 without one). It is
    ``timm.data.resolve_data_config(model=...)`` with the wrapper's ``input_size`` (whole images resized to it:
    ``crop_pct`` 1 unless given) and ``data_config`` entries on top.
    """
    import timm.data

    inner, normalized = unwrap_normalized(model)
    timm_model = getattr(inner, "timm_model", inner)
    if not hasattr(timm_model, "pretrained_cfg"):
        raise TypeError(
            f"{type(inner).__name__} is not a timm model; use model_preprocessing() for its image processor"
        )
    args: Dict[str, Any] = {}
    if normalized is not None:
        if normalized.input_size is not None:
            channels = int(timm_model.pretrained_cfg.get("input_size", (3,))[0])
            args.update(input_size=(channels, *normalized.input_size), crop_pct=1.0)
        args.update(normalized.data_config)
    mean, std = _in_model_normalisation(normalized)
    args.update(mean=tuple(mean), std=tuple(std))
    return timm.data.resolve_data_config(args=args, model=timm_model)


def model_preprocessing(model: nn.Module):
    """How ``model`` wants its pixels made: timm's data config (a dict) for timm models, else a transformers image
    processor (a copy, with the in-model mean/std and the wrapper's ``input_size``).

    A transformers-native model without a processor gets a plain one (``ViTImageProcessor``: resize to the input
    size, rescale to [0, 1]). cure_hf's data transforms apply it without normalisation; the saved folder carries
    it with normalisation, so the folder's users get the trained model's pixels.
    """
    inner, normalized = unwrap_normalized(model)
    if hasattr(getattr(inner, "timm_model", inner), "pretrained_cfg"):
        return model_data_config(model)
    mean, std = _in_model_normalisation(normalized)
    processor = getattr(normalized, "image_processor", None)
    size = normalized.input_size if normalized is not None else None
    if processor is None:
        from transformers import ViTImageProcessor

        processor = ViTImageProcessor()
        size = size or _height_width(getattr(getattr(inner, "config", None), "image_size", None) or 224, "image_size")
    conformed, _ = conform_image_processor(processor, mean, std, size)
    return conformed


def _in_model_normalisation(normalized: Optional[PixelNormalized]) -> Tuple[List[float], List[float]]:
    """The wrapper's mean/std as the shortest decimals that give back its float32 buffers (0.2, not 0.2000000029)."""
    if normalized is None:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    import numpy as np

    return (
        [float(str(np.float32(v))) for v in normalized.mean.flatten().tolist()],
        [float(str(np.float32(v))) for v in normalized.std.flatten().tolist()],
    )


def conform_image_processor(
    processor, mean: Sequence[float], std: Sequence[float], size: Optional[Tuple[int, int]] = None
):
    """A new processor like ``processor`` that normalises with ``mean``/``std`` and, when ``size`` is given, resizes
    (and center-crops, if it crops) to ``size``; and the list of settings that had to change (empty: it agreed).

    Built with ``from_dict(to_dict())``, so the caller's object is never modified.
    """
    settings = processor.to_dict()
    changes = []
    for name, value in (("image_mean", [float(v) for v in mean]), ("image_std", [float(v) for v in std])):
        current = settings.get(name)
        if current is None or len(current) != len(value) or any(abs(a - b) > 1e-6 for a, b in zip(current, value)):
            changes.append(f"{name} {_rounded(current)} -> {_rounded(value)}")
            settings[name] = value
    if size is not None:
        wanted = {"height": int(size[0]), "width": int(size[1])}
        keys = ["size"] + (["crop_size"] if settings.get("do_center_crop") else [])
        for name in keys:
            current = {k: v for k, v in (settings.get(name) or {}).items() if v is not None}
            if current != wanted:
                changes.append(f"{name} {current} -> {wanted}")
                settings[name] = dict(wanted)
    return type(processor).from_dict(settings), changes


def _rounded(values):
    return None if values is None else [round(float(v), 6) for v in values]


def _is_timm_config(config: Optional[Dict[str, Any]]) -> bool:
    """timm's config.json: an ``architecture`` (singular) and no transformers model type but timm_wrapper."""
    return (
        config is not None and "architecture" in config and config.get("model_type", "timm_wrapper") == "timm_wrapper"
    )


def _resolve_source(spec: str) -> Tuple[str, str, Optional[Dict[str, Any]]]:
    """(kind, location, config.json or None): kind is 'timm-name', 'folder' or 'hub'."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(
            f"model={spec!r}: pass a timm name, 'hf-hub:<repo>', 'local-dir:<folder>', a folder or a repo id"
        )
    if spec.startswith("local-dir:") or os.path.isdir(spec):
        folder = spec[len("local-dir:") :] if spec.startswith("local-dir:") else spec
        config_file = os.path.join(folder, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"model={spec!r}: {config_file} not found; a model folder needs config.json and model.safetensors "
                "(as written by cure_hf.hub.save_pretrained, timm's save_for_hf or transformers' save_pretrained)"
            )
        return "folder", folder, read_json(config_file)
    if spec.startswith("hf-hub:"):
        return "hub", spec[len("hf-hub:") :], _hub_config(spec[len("hf-hub:") :])
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
    return read_json(hf_hub_download(repo_id, "config.json", revision=revision or None))


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

        pickled = [
            name
            for name in NON_SAFETENSORS_WEIGHTS
            if isinstance(try_to_load_from_cache(repo_id, name, revision=revision or None), str)
        ]
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
    """The network inside DDP/compile wrappers, :class:`PixelNormalized` and :class:`SelectLogits`, and that
    PixelNormalized (or None)."""
    inner, _ = _unwrap(model)
    normalized = None
    probe = model
    while probe is not inner:
        if isinstance(probe, PixelNormalized):
            normalized = probe
            probe = probe.model
        elif isinstance(probe, SelectLogits):
            probe = probe.model
        else:
            probe = probe.module
    return inner, normalized


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The inner model of known wrappers (DDP's .module, PixelNormalized's and SelectLogits' .model) and its name
    prefix."""
    prefix = ""
    while True:
        if isinstance(model, (PixelNormalized, SelectLogits)):
            model, prefix = model.model, prefix + "model."
        elif (
            hasattr(model, "module")
            and isinstance(model.module, nn.Module)
            and type(model).__name__ in ("DistributedDataParallel", "DataParallel", "OptimizedModule")
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
