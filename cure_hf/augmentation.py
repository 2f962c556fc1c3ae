"""ImageNet-scale training augmentation: timm's own training transform, pixels in [0, 1], no normalisation.

``augment="timm"`` (see :func:`cure_hf.data.image_transform`) is ``timm.data.create_transform(is_training=True)``:
random-resized crop (``crop_scale``, ``crop_ratio``), horizontal flip (``hflip``), then either colour jitter
(``color_jitter``) or an ``auto_augment`` policy (RandAugment ``"rand-m9-mstd0.5-inc1"``, AutoAugment ``"v0"``,
AugMix ``"augmix-m5-w4-d2"``, ...), then random erasing (``random_erasing``, ``random_erasing_mode``,
``random_erasing_count``). Input size, interpolation, mean and std come from the model's own data config, the
``preprocessing`` that evaluation uses, so training and evaluation agree on the input the model is built for.

Pixels stay in [0, 1] because the normalisation lives inside the model. Random erasing is the one timm step that
works on normalised tensors (it fills with zeros or standard normal noise there). Here it is timm's
``RandomErasing`` run in the model's normalised space, z = (x - mean) / std, and mapped back: an erased box gets
mean + std * fill, clipped to [0, 1]. So the model, which normalises inside, sees what timm's normalised pipeline
would feed it: "const" fills the mean colour (timm's zero), "rand" one colour per box and "pixel" noise per pixel,
both mean + std * N(0, 1), except that noise beyond the valid pixel range is clipped (an image has no pixel below 0
or above 1, and the attack's projection clips there too). Pixels outside the boxes are left exactly as they were.

One repair: timm's RandAugment "inc1" posterize keeps 4 - int(4 m / 10) bits, which is 0 at magnitude 10 (reached
through the magnitude noise "mstd0.5" of the ImageNet recipes); recent Pillow (13 here) refuses 0 bits with a
ValueError, which would stop a run after a few thousand images. Posterize ops of the pipeline built here keep 0 bits
as Pillow did before (a black image, every bit dropped); other bit counts go to timm's own op unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "TIMM_AUGMENT",
    "AUGMENT_OPTIONS",
    "ERASING_MODES",
    "resolve_augment_options",
    "timm_train_pixels",
    "processor_data_config",
]

TIMM_AUGMENT = "timm"
ERASING_MODES = ("const", "rand", "pixel")

# The options and their defaults: timm.data.create_transform's own (random erasing off).
AUGMENT_OPTIONS: Dict[str, Any] = {
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3.0 / 4.0, 4.0 / 3.0),
    "hflip": 0.5,
    "color_jitter": 0.4,
    "auto_augment": None,
    "random_erasing": 0.0,
    "random_erasing_mode": "const",
    "random_erasing_count": 1,
}


def resolve_augment_options(augment: str, options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The full, checked options of ``augment`` (every key of :data:`AUGMENT_OPTIONS` for "timm"; ``{}`` otherwise).

    ``options`` maps option names to values; None (or a missing key) is the default. An option that ``augment`` does
    not use is refused rather than ignored, as is one that timm would ignore (colour jitter under an
    ``auto_augment`` policy, an erasing mode without erasing). Values may be strings as a command line gives them
    ("0.08,1.0"). Without erasing, the result's ``random_erasing_mode`` and ``random_erasing_count`` are None (they
    do not apply). The result passed back in gives the same result.
    """
    given = {k: v for k, v in dict(options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(AUGMENT_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown augmentation option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"the options are {', '.join(AUGMENT_OPTIONS)}"
        )
    if augment != TIMM_AUGMENT:
        if given:
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in given.items())} only apply to augment={TIMM_AUGMENT!r} "
                f"(timm's training transform), and augment={augment!r} does not read them: set "
                f"augment={TIMM_AUGMENT!r}, or drop {'them' if len(given) > 1 else 'it'}"
            )
        return {}
    resolved = {**AUGMENT_OPTIONS, **given}
    resolved["crop_scale"] = _pair(resolved["crop_scale"], "crop_scale")
    low, high = resolved["crop_scale"]
    _check(
        0.0 < low <= high <= 1.0, "crop_scale", resolved["crop_scale"], "0 < min <= max <= 1 (fractions of the area)"
    )
    resolved["crop_ratio"] = _pair(resolved["crop_ratio"], "crop_ratio")
    low, high = resolved["crop_ratio"]
    _check(0.0 < low <= high, "crop_ratio", resolved["crop_ratio"], "0 < min <= max (width / height), e.g. 0.75,1.3333")
    resolved["hflip"] = _number(resolved["hflip"], "hflip")
    _check(0.0 <= resolved["hflip"] <= 1.0, "hflip", resolved["hflip"], "a probability in [0, 1] (0: no flip)")
    resolved["auto_augment"] = _auto_augment(resolved["auto_augment"])
    resolved["color_jitter"] = _color_jitter(
        resolved["color_jitter"], "color_jitter" in given, resolved["auto_augment"]
    )
    resolved["random_erasing"] = _number(resolved["random_erasing"], "random_erasing")
    _check(
        0.0 <= resolved["random_erasing"] <= 1.0,
        "random_erasing",
        resolved["random_erasing"],
        "a probability in [0, 1] (0: no erasing)",
    )
    mode = str(resolved["random_erasing_mode"]).lower()
    _check(mode in ERASING_MODES, "random_erasing_mode", resolved["random_erasing_mode"], f"one of {ERASING_MODES}")
    resolved["random_erasing_mode"] = mode
    count = resolved["random_erasing_count"]
    _check(
        isinstance(count, int) and not isinstance(count, bool) and count >= 1 or _is_int_string(count),
        "random_erasing_count",
        count,
        "an integer >= 1 (the most boxes erased per image)",
    )
    resolved["random_erasing_count"] = int(count)
    if resolved["random_erasing"] == 0.0:
        idle = [k for k in ("random_erasing_mode", "random_erasing_count") if k in given]
        if idle:
            raise ValueError(
                f"{', '.join(f'{k}={given[k]!r}' for k in idle)} without random erasing does nothing: set "
                "random_erasing to the probability of erasing an image (e.g. 0.25), or drop "
                f"{'them' if len(idle) > 1 else 'it'}"
            )
        # recorded as not applying (and the result, passed back in, is accepted again)
        resolved["random_erasing_mode"] = resolved["random_erasing_count"] = None
    return resolved


def timm_train_pixels(data_config: Mapping[str, Any], options: Mapping[str, Any]) -> Callable[[Any], torch.Tensor]:
    """One PIL image -> its augmented 3xHxW float pixels in [0, 1], by timm's training transform.

    ``data_config``: the model's timm data config (``input_size``, ``interpolation``, ``mean``, ``std``);
    ``options``: :func:`resolve_augment_options`' result for "timm". timm's pipeline runs without its
    normalisation (it then returns uint8 pixels, divided by 255 here as ``ToTensor`` does); random erasing runs
    after it in the model's normalised space (module docstring).
    """
    import timm.data

    options = resolve_augment_options(TIMM_AUGMENT, options)
    mean = tuple(float(m) for m in data_config["mean"])
    std = tuple(float(s) for s in data_config["std"])
    pipeline = timm.data.create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=True,
        interpolation=data_config["interpolation"],
        mean=mean,
        std=std,
        normalize=False,
        **_timm_kwargs(options),
    )
    _repair_posterize(pipeline)
    erase = None
    if options["random_erasing"] > 0:
        from timm.data.random_erasing import RandomErasing

        erase = _PixelSpaceErasing(
            RandomErasing(
                options["random_erasing"],
                mode=options["random_erasing_mode"],
                max_count=options["random_erasing_count"],
                device="cpu",
            ),
            mean,
            std,
        )

    def pixels(image) -> torch.Tensor:
        x = pipeline(image).float().div(255)
        return erase(x) if erase is not None else x

    return pixels


def _timm_kwargs(options: Mapping[str, Any]) -> Dict[str, Any]:
    """``create_transform`` keywords of resolved options (random erasing excluded: it runs in pixel space here)."""
    return dict(
        scale=tuple(options["crop_scale"]),
        ratio=tuple(options["crop_ratio"]),
        hflip=options["hflip"],
        # None is timm's "no jitter"; under a policy timm switches jitter off by itself (we recorded None)
        color_jitter=options["color_jitter"],
        auto_augment=options["auto_augment"],
    )


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits kept as older Pillow kept them: every bit dropped, a black image."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _repair_posterize(pipeline) -> None:
    """Point the posterize ops of ``pipeline``'s RandAugment/AutoAugment/AugMix at :func:`_posterize` (this
    pipeline's objects only; timm itself is left as it is)."""
    from timm.data.auto_augment import AugmentOp, posterize

    def ops_of(transform):
        yield from getattr(transform, "ops", None) or []
        for sub_policy in getattr(transform, "policy", None) or []:
            yield from sub_policy

    for transform in getattr(pipeline, "transforms", []):
        for op in ops_of(transform):
            if isinstance(op, AugmentOp) and op.aug_fn is posterize:
                op.aug_fn = _posterize


class _PixelSpaceErasing:
    """timm's ``RandomErasing`` applied in the normalised space of the model and mapped back to [0, 1]."""

    def __init__(self, eraser, mean: Sequence[float], std: Sequence[float]):
        self.eraser = eraser
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        normalised = (x - self.mean) / self.std
        erased = self.eraser(normalised.clone())
        # only the erased entries change: the others keep their exact pixel (no normalise/denormalise rounding)
        changed = erased != normalised
        filled = (erased * self.std + self.mean).clamp(0.0, 1.0)
        return torch.where(changed, filled, x)


def processor_data_config(processor, augment: str = TIMM_AUGMENT) -> Dict[str, Any]:
    """A timm data config (``input_size``, ``interpolation``, ``mean``, ``std``) of a transformers image processor.

    Its fixed output size (``crop_size`` when it center-crops, else ``size`` with height and width), its resampling
    filter and its mean/std (the model's in-model normalisation, which cure_hf sets on the processor). A processor
    that resizes by the shortest edge has no fixed size to crop to, and is refused with the fix.
    """
    from timm.data.transforms import _pil_interpolation_to_str

    from .data import _processor_output_size

    height, width = _processor_output_size(processor, augment)
    settings = processor.to_dict()
    resample = settings.get("resample")
    try:
        from PIL import Image

        interpolation = _pil_interpolation_to_str[Image.Resampling(resample)] if resample is not None else "bilinear"
    except (KeyError, ValueError):
        raise ValueError(
            f"augment={augment!r}: the image processor's resample={resample!r} is not a filter timm's training "
            "crop can use (nearest, bilinear, bicubic, box, hamming, lanczos); set processor.resample to one"
        ) from None
    mean = settings.get("image_mean") or (0.0, 0.0, 0.0)
    std = settings.get("image_std") or (1.0, 1.0, 1.0)
    return {
        "input_size": (3, int(height), int(width)),
        "interpolation": interpolation,
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
    }


# --------------------------------------------------------------------------------------------- parsing helpers
def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def _is_int_string(value: Any) -> bool:
    return isinstance(value, str) and value.strip().isdigit() and int(value) >= 1


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is invalid: allowed a number") from None
    _check(math.isfinite(number), name, value, "a finite number")
    return number


def _numbers(value: Any, name: str) -> Tuple[float, ...]:
    """A comma-separated string ("0.08,1.0"), a number, or a sequence of numbers."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    return tuple(_number(p, name) for p in parts)


def _pair(value: Any, name: str) -> Tuple[float, float]:
    numbers = _numbers(value, name)
    _check(len(numbers) == 2, name, value, "two numbers min,max (e.g. 0.08,1.0)")
    return numbers[0], numbers[1]


def _auto_augment(value: Any) -> Optional[str]:
    """timm's policy string, checked by building it (timm asserts on a bad one); "none"/"" is no policy."""
    if value is None or str(value).strip().lower() in ("", "none", "null", "false"):
        return None
    policy = str(value).strip()
    import timm.data

    try:
        timm.data.create_transform(16, is_training=True, auto_augment=policy, normalize=False)
    except (AssertionError, KeyError, ValueError, IndexError) as error:
        raise ValueError(
            f"auto_augment={value!r} is not a timm augmentation policy ({type(error).__name__}: {error}); allowed: "
            "RandAugment 'rand-m9-mstd0.5-inc1' (magnitude m, layers n, magnitude noise mstd; 'rand-m9-n2-mstd0.5'), "
            "AutoAugment 'original' / 'v0' / '3a', AugMix 'augmix-m5-w4-d2', or none"
        ) from None
    return policy


def _color_jitter(value: Any, given: bool, auto_augment: Optional[str]):
    """A float (brightness = contrast = saturation) or 3/4 factors; None when off (a policy turns timm's off)."""
    numbers = _numbers(value, "color_jitter")
    _check(
        len(numbers) in (1, 3, 4), "color_jitter", value, "one factor, or 3 or 4 (brightness,contrast,saturation[,hue])"
    )
    _check(all(n >= 0 for n in numbers), "color_jitter", value, "factors >= 0 (0: no jitter)")
    jitter = numbers[0] if len(numbers) == 1 else numbers
    if auto_augment is not None and "3a" not in auto_augment:
        if given and any(numbers):
            raise ValueError(
                f"color_jitter={value!r} with auto_augment={auto_augment!r}: timm switches colour jitter off under an "
                "auto_augment policy (except the '3a' ones), so it would not run; drop color_jitter (or set it to 0), "
                "or drop auto_augment"
            )
        return None
    return jitter
