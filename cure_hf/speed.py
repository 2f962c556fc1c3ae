"""The fast path of adversarial training on a GPU: a speed preset, a CUDA-graph attack, device-resident data.

What a CIFAR-size step (32x32 images, ResNet-18, batch 128, PGD-10) spends its time on, and what each piece here
does about it (docs/benchmarks.md has the measurements; ``benchmarks/bench_step.py`` prints them):

- The attack is 10 forward/backward passes of a few hundred small kernels each, launched one by one from Python.
  When the host cannot launch kernels as fast as the GPU runs them, anything that adds host work per operation
  (autocast's weight casts, dispatcher layers) slows the step down even though each kernel gets cheaper.
  ``GraphedAttack`` captures the K attack steps once as a CUDA graph and replays them with a single launch.
- A host synchronisation inside the step (a blocking host-to-device copy, reading a tensor's value such as the
  pixel range check or the Trainer's NaN filter on the loss) drains the GPU's queue, so the host's launch time is
  no longer hidden behind the GPU's work. The preset removes the ones cure_hf controls; the data checks run on
  the CPU before the batch reaches the device (``checking_collator``).
- Per-example augmentation in data-loader workers and the copy of every batch to the device disappear when the
  whole training set sits on the device as uint8 and is cropped and flipped there, a batch at a time
  (``DeviceResidentLoader``), as the fastest CIFAR training codes do.
- bf16 autocast, channels_last and ``torch.compile`` make the GPU's own work smaller; the attack runs through the
  same compiled module, in the same autocast, as the training forward (``attack_module``).

``speed_preset="fast"`` turns all of it on (``SpeedPlan`` says what it resolved to on the device at hand). Nothing
here changes what is computed: the CUDA-graph attack replays the eager attack's kernels, and the device-resident
loader yields the batches the Trainer's DataLoader yields (same order, same crops and flips: see
``augmentation_draws``) when the training set is a ``TensorImageDataset``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FunctionType, MethodType
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import attack_mode, clean_logits_of, pgd, pgd_steps, random_start
from .safety import check_pixel_values

__all__ = [
    "SPEED_PRESETS",
    "DEVICE_AUGMENTS",
    "apply_speed_preset",
    "SpeedPlan",
    "plan_speed",
    "SpeedRuntime",
    "attack_module",
    "CompiledAttackForward",
    "autocast_forward",
    "GraphedAttack",
    "CheckingCollator",
    "augmentation_draws",
    "crop_flip",
    "TensorImageDataset",
    "DeviceResidentLoader",
    "resident_arrays",
]

logger = logging.getLogger(__name__)

SPEED_PRESETS = ("none", "fast")
DEVICE_AUGMENTS = ("none", "crop_flip")
# torch.compile modes that capture CUDA graphs themselves: a graph cannot be captured inside another one.
_CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# What speed_preset="fast" sets on the arguments (the device-dependent parts are resolved by plan_speed).
FAST_PRESET_FIELDS = {
    "bf16": True,  # bf16 autocast over the whole step, the attack included; losses and attack objective in fp32
    "channels_last": True,  # NHWC convolutions (tensor-core friendly)
    "torch_compile": True,  # one compiled module serves the training forward and the attack
    "logging_nan_inf_filter": False,  # the Trainer's isnan(loss) check reads the loss back every step
    "dataloader_drop_last": True,  # one batch shape: no recompilation, one captured attack graph
}  # and accelerator_config.non_blocking=True unless the user's accelerator_config says otherwise
# The preset's fields that pay off on a GPU only; on a CPU the preset leaves them as given (off by default):
# torch.compile spends minutes compiling what runs in seconds, bf16 autocast is slower than fp32 on most CPUs, and
# channels_last is for tensor cores.
_GPU_ONLY_FIELDS = ("torch_compile", "bf16", "channels_last")


def _trains_on_cpu(args) -> Optional[str]:
    """Why the run trains on the CPU (``"use_cpu=True"``, ``"no GPU found"``), or None when it has an accelerator.
    Called before ``TrainingArguments.__post_init__`` picks the device, so it asks torch as that will."""
    if getattr(args, "use_cpu", False):
        return "use_cpu=True"
    if torch.cuda.is_available():
        return None
    accelerator = getattr(torch, "accelerator", None)  # XPU, MPS, ...: what the Trainer would train on
    try:
        if accelerator is not None and accelerator.is_available():
            return None
    except Exception:  # an accelerator backend that cannot even be queried: the Trainer falls back to the CPU too
        pass
    return "no GPU found"


# ------------------------------------------------------------------------------------------- arguments
def apply_speed_preset(args) -> List[str]:
    """Validate the speed fields of ``CURETrainingArguments`` and expand ``speed_preset`` into the fields it sets.

    Runs before ``TrainingArguments.__post_init__`` (which then validates bf16 and torch_compile as usual). Returns
    the settings the preset changed, as ``"name=value"`` strings. Contradictions raise ``ValueError``. On a CPU
    (``use_cpu=True`` or no GPU) the GPU-only fields (``torch_compile``, ``bf16``, ``channels_last``) stay as given,
    with a warning: set them explicitly to have them anyway.
    """
    preset = args.speed_preset
    if preset not in SPEED_PRESETS:
        raise ValueError(f"speed_preset={preset!r} is invalid: allowed one of {SPEED_PRESETS}.")
    if args.device_augment not in DEVICE_AUGMENTS:
        raise ValueError(f"device_augment={args.device_augment!r} is invalid: allowed one of {DEVICE_AUGMENTS}.")
    if args.device_augment != "none" and args.device_resident_data is False:
        raise ValueError(
            f"device_augment={args.device_augment!r} augments batches on the device, but device_resident_data=False "
            "keeps the data in the DataLoader. Fix: drop device_augment (augment in the dataset's transform), or "
            "set device_resident_data=True."
        )
    for name in ("attack_cuda_graph", "device_resident_data", "cudnn_benchmark"):
        value = getattr(args, name)
        if value not in (None, True, False):
            raise ValueError(f"{name}={value!r} is invalid: allowed True, False or None (None: the preset decides).")
    mode = getattr(args, "torch_compile_mode", None)
    graphs = args.attack_cuda_graph or (preset == "fast" and args.attack_cuda_graph is None)
    if graphs and mode in _CUDAGRAPH_COMPILE_MODES:
        raise ValueError(
            f"torch_compile_mode={mode!r} captures CUDA graphs inside the compiled model, and the attack's CUDA graph "
            f"(attack_cuda_graph{' from speed_preset=' + repr(preset) if args.attack_cuda_graph is None else ''}) "
            "cannot contain another capture. Fix: leave torch_compile_mode unset (the default mode) or set "
            "attack_cuda_graph=False."
        )
    if args.attack_cuda_graph and args.use_cpu:
        raise ValueError(
            "attack_cuda_graph=True needs a CUDA device, but use_cpu=True. Fix: drop attack_cuda_graph (the attack "
            "then runs eagerly), or train on a GPU."
        )
    if args.device_resident_data and args.dataloader_num_workers > 0:
        raise ValueError(
            f"device_resident_data=True loads and augments batches on the device, so dataloader_num_workers="
            f"{args.dataloader_num_workers} would start workers that never run. Fix: set dataloader_num_workers=0, "
            "or device_resident_data=False."
        )
    if preset == "none":
        return []
    if args.fp16:
        raise ValueError(
            "speed_preset='fast' trains under bf16 autocast, but fp16=True asks for fp16. Fix: drop fp16=True (bf16 "
            "needs no loss scaling), or set speed_preset='none' and choose the speed options one by one."
        )
    changed, kept_off = [], []
    on_cpu = _trains_on_cpu(args)
    for name, value in FAST_PRESET_FIELDS.items():
        if getattr(args, name) != value:
            if on_cpu and name in _GPU_ONLY_FIELDS:
                kept_off.append(name)
                continue
            setattr(args, name, value)
            changed.append(f"{name}={value}")
    if kept_off:
        logger.warning(
            "speed_preset='fast' on a CPU (%s): %s left off. They speed up GPUs; on a CPU torch.compile spends minutes "
            "compiling what trains in seconds. The preset still sets logging_nan_inf_filter=False and "
            "dataloader_drop_last=True and keeps the training set in memory when it can. To have them anyway, set "
            "%s yourself%s.",
            on_cpu,
            ", ".join(kept_off),
            ", ".join(f"{name}=True" for name in kept_off),
            " (torch_compile=True compiles the model and the attack)" if "torch_compile" in kept_off else "",
        )
    # Batches that stay in the DataLoader: copy them to the device without a host synchronisation (accelerate's
    # default is a blocking copy, which waits for the device every step).
    config = getattr(args, "accelerator_config", None)
    if config is None or (isinstance(config, dict) and "non_blocking" not in config):
        args.accelerator_config = {**(config or {}), "non_blocking": True}
        changed.append("accelerator_config.non_blocking=True")
    return changed


@dataclass
class SpeedPlan:
    """What the speed fields resolve to on one device. ``notes`` say what was turned off there, and why."""

    attack_cuda_graph: bool = False
    device_resident_data: bool = False
    resident_required: bool = False  # set explicitly: a training set that cannot stay on the device is an error
    device_augment: str = "none"
    cudnn_benchmark: Optional[bool] = None
    notes: List[str] = field(default_factory=list)


def plan_speed(args, device: torch.device) -> SpeedPlan:
    """Resolve ``attack_cuda_graph``, ``device_resident_data`` and ``cudnn_benchmark`` (None: the preset decides)."""
    fast = getattr(args, "speed_preset", "none") == "fast"
    cuda = device.type == "cuda"
    plan = SpeedPlan(device_augment=getattr(args, "device_augment", "none"))
    graph = getattr(args, "attack_cuda_graph", None)
    if graph and not cuda:
        raise ValueError(
            f"attack_cuda_graph=True needs a CUDA device; this run trains on {device.type!r}. Fix: drop "
            "attack_cuda_graph (the attack then runs eagerly), or train on a GPU."
        )
    if graph is None and fast:
        graph = cuda
        if not cuda:
            plan.notes.append(
                f"speed_preset='fast': attack_cuda_graph is off on {device.type!r} (CUDA graphs need a "
                "CUDA device); the attack runs eagerly, with the same numbers"
            )
    plan.attack_cuda_graph = bool(graph)
    resident = getattr(args, "device_resident_data", None)
    plan.resident_required = bool(resident)
    plan.device_resident_data = bool(resident) or (resident is None and fast)
    benchmark = getattr(args, "cudnn_benchmark", None)
    plan.cudnn_benchmark = (True if fast and cuda else None) if benchmark is None else benchmark
    return plan


# ----------------------------------------------------------------------------------------------- models
def attack_module(model: nn.Module) -> nn.Module:
    """The module the attack runs on: the training model without DDP, compiled apart when the training model is.

    torch.compile caches its graphs per Python code object, and guards each graph on the global state it was traced
    under. The attack (eval mode, frozen parameters, an input that needs its gradient), the KL attack's clean forward
    (no gradient) and the training forward (train mode, parameter gradients) are three such states: sharing one
    compiled module, each new state failed the previous graphs' guards (grad_mode, the input's requires_grad) and
    was traced as a "recompilation" of the same function. Here the attack gets a :class:`CompiledAttackForward` of
    its own, cached per module: one function compiled for the forward with gradient (the attack's steps), another
    for the forward without (the clean logits), each its own code object, so each is traced once and never fails a
    guard, whatever the training forward does. The training model's compiled module is left as it is (for
    torch.compile around DDP, accelerate's ``unwrap_model(..., keep_torch_compile=True)`` would instead rewire it to
    the bare module, silently dropping DDP's gradient all-reduce). The attack compiles with the training model's
    backend and ``dynamic`` setting; an uncompiled model is returned bare (no DDP).
    """
    from torch._dynamo.eval_frame import OptimizedModule

    compiled = None
    module = model
    if isinstance(module, CompiledAttackForward):
        return module
    if isinstance(module, OptimizedModule):
        compiled, module = module, module._orig_mod
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    if compiled is None:
        return module
    cached = _COMPILED_ATTACK_MODULES.get(module)
    if cached is None:
        cached = CompiledAttackForward(module, **_compile_settings(compiled))
        _COMPILED_ATTACK_MODULES[module] = cached
    return cached


_COMPILED_ATTACK_MODULES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _compile_settings(compiled: nn.Module) -> Dict[str, Any]:
    """The backend (with its mode and options) and ``dynamic`` a compiled module was built with, to compile the
    attack the same way; {} (torch.compile's defaults) where torch does not expose them."""
    context = getattr(compiled, "dynamo_ctx", None)
    backend = getattr(context, "callback", None)
    # dynamo wraps the backend it was given in frame-conversion layers, each pointing to the one inside; the
    # innermost is torch.compile's own (its mode and options included)
    while hasattr(backend, "_torchdynamo_orig_backend"):
        backend = backend._torchdynamo_orig_backend
    if not callable(backend):
        return {}
    return {"backend": backend, "dynamic": getattr(context, "_dynamic", None)}


def _forward(module: nn.Module, args: tuple, kwargs: dict):
    return module(*args, **kwargs)


def _own_code(function: Callable) -> Callable:
    """A copy of ``function`` with a code object of its own: torch.compile keeps one cache of graphs per code object,
    so each copy compiles and guards its graphs apart from every other."""
    return FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )


class CompiledAttackForward(nn.Module):
    """A module's forward compiled for the attack, apart from its training forward (see :func:`attack_module`).

    Under ``torch.enable_grad`` (the attack's steps: eval mode, frozen parameters, the input's gradient) it calls one
    compiled function, under ``torch.no_grad`` (the KL attack's clean logits) another; each compiles once. Its
    parameters, buffers, mode and state dict are the module's (held as ``_orig_mod``, as torch.compile's own wrapper
    does), so ``attack_mode``, the CUDA-graph attack and AWP see the module itself.
    """

    def __init__(self, module: nn.Module, **compile_kwargs):
        super().__init__()
        self._orig_mod = module
        self.compile_kwargs = compile_kwargs
        self._with_grad = torch.compile(_own_code(_forward), **compile_kwargs)
        self._without_grad = torch.compile(_own_code(_forward), **compile_kwargs)

    # The mode is the module's (the trainer switches the module, not this view of it), as in torch.compile's wrapper.
    @property
    def training(self) -> bool:
        return self._modules["_orig_mod"].training

    @training.setter
    def training(self, value: bool) -> None:
        if "_orig_mod" in self.__dict__.get("_modules", {}):  # nn.Module.__init__ sets a default before it exists
            self._modules["_orig_mod"].training = value

    def __deepcopy__(self, memo):
        # a copy (AWP's proxy) compiles functions of its own: sharing these, its module would fail their guards
        return CompiledAttackForward(copy.deepcopy(self._orig_mod, memo), **self.compile_kwargs)

    def forward(self, *args, **kwargs):
        compiled = self._with_grad if torch.is_grad_enabled() else self._without_grad
        return compiled(self._orig_mod, args, kwargs)

    def compiled_functions(self) -> Tuple[Callable, Callable]:
        """The two compiled functions' originals (with grad, without): their code objects hold the graphs."""
        return self._with_grad._torchdynamo_orig_callable, self._without_grad._torchdynamo_orig_callable


def autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Wrap ``module.forward`` in autocast with fp32 outputs, exactly as accelerate's ``prepare_model`` does.

    The same wrapping means the same code objects for ``torch.compile``, so a plain loop built with this shares
    the compiled graphs (and inductor's cache) with CURETrainer. Undo with ``del module.forward``.
    """
    from accelerate.utils import convert_outputs_to_fp32

    module._original_forward = module.forward
    forward = torch.autocast(device_type=device_type, dtype=dtype)(module.forward.__func__)
    module.forward = MethodType(forward, module)
    module.forward = MethodType(convert_outputs_to_fp32(module.forward.__func__), module)
    return module


# ------------------------------------------------------------------------------------- CUDA-graph attack
class _CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls ``GraphedAttack`` makes."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, body: Callable[[], torch.Tensor], warmup: int) -> torch.Tensor:
        # Warm up on a side stream (lazy initialisation, cuDNN autotuning, torch.compile's compilation), as
        # torch.cuda.graphs' documentation asks, then capture one run of the body.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        # thread_local: another thread's CUDA calls (a DataLoader's pin-memory thread) cannot spoil the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            out = body()
        return out

    def replay(self) -> None:
        self.graph.replay()


class _EagerReplay:
    """A stand-in for CUDA graphs off CUDA (tests): 'replay' runs the body again and writes into the captured output,
    so the static-buffer plumbing of ``GraphedAttack`` runs exactly as it does around a real graph."""

    def capture(self, body: Callable[[], torch.Tensor], warmup: int) -> torch.Tensor:
        for _ in range(warmup):
            body()
        self.body = body
        self.out = body()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.body())


_EAGER = "eager"  # a key whose capture failed or that is over the graph limit: runs eagerly


@dataclass
class _Captured:
    graph: Any
    static: Dict[str, Optional[torch.Tensor]]
    output: torch.Tensor
    fingerprint: Tuple[int, ...]


def _fingerprint(model: nn.Module) -> Tuple[int, ...]:
    """Where the model's weights and buffers live: a captured graph reads them there, so a move means recapture."""
    return tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))


class GraphedAttack:
    """``attacks.pgd`` with its K steps (and the KL attack's clean forward) captured once as a CUDA graph.

    Per call: the random start is drawn eagerly (the same draw as ``pgd``, from the same generator), the inputs are
    copied into the graph's static buffers, the graph is replayed and its output cloned. One graph per
    (model, input shape/dtype/strides, attack settings, autocast state); the weights are read in place, so
    optimizer steps need no recapture, while a model whose tensors moved (``.to()``) is captured again. Inputs of a
    new shape beyond ``max_graphs`` graphs (e.g. a last, smaller batch), and any capture that fails, run eagerly
    (logged once). A captured graph holds its own memory pool: about one attack step's activations.
    """

    def __init__(self, max_graphs: int = 2, warmup: int = 2, graph_factory: Optional[Callable[[], Any]] = None):
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graph_factory = graph_factory or _CudaGraph
        self.graphs: Dict[tuple, Any] = {}
        self.replays = 0
        self.eager_calls = 0

    def _key(self, model, x, labels, clean_logits, settings) -> tuple:
        autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        return (
            id(model),
            tuple(x.shape),
            x.dtype,
            x.stride(),
            str(x.device),
            labels is not None,
            clean_logits is not None,
            None if clean_logits is None else tuple(clean_logits.shape),
            autocast,
            tuple(sorted(settings.items())),
        )

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        *,
        eps: float,
        step_size: float,
        steps: int,
        loss: str = "ce",
        init: str = "uniform",
        clean_logits: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        if loss in ("ce", "margin") and labels is None:
            raise ValueError(f"pgd with loss={loss!r} needs labels")
        settings = dict(eps=eps, step_size=step_size, steps=steps, loss=loss)
        with attack_mode(model):
            x = x.detach()
            clean_logits = None if clean_logits is None else clean_logits.detach()
            x_start = random_start(x, eps, init, generator)
            key = self._key(model, x, labels, clean_logits, settings)
            entry = self.graphs.get(key)
            if isinstance(entry, _Captured) and entry.fingerprint != _fingerprint(model):
                logger.info("attack_cuda_graph: the model's tensors moved; capturing the attack again")
                del self.graphs[key]
                entry = None
            if entry is None:
                entry = self._capture(key, model, x, x_start, labels, clean_logits, settings)
            if entry == _EAGER:
                self.eager_calls += 1
                return _attack_from_start(model, x, x_start, labels, clean_logits, **settings).detach()
            static = entry.static
            static["x"].copy_(x)
            static["x_start"].copy_(x_start)
            if labels is not None:
                static["labels"].copy_(labels)
            if clean_logits is not None:
                static["clean_logits"].copy_(clean_logits)
            entry.graph.replay()
            self.replays += 1
            return entry.output.detach().clone()

    def _capture(self, key, model, x, x_start, labels, clean_logits, settings):
        if sum(isinstance(e, _Captured) for e in self.graphs.values()) >= self.max_graphs:
            logger.warning(
                "attack_cuda_graph: %d attack graphs exist already; inputs of shape %s run eagerly",
                self.max_graphs,
                tuple(x.shape),
            )
            self.graphs[key] = _EAGER
            return _EAGER
        static = {
            "x": x.clone(),
            "x_start": x_start.clone(),
            "labels": None if labels is None else labels.clone(),
            "clean_logits": None if clean_logits is None else clean_logits.clone(),
        }

        def body() -> torch.Tensor:
            return _attack_from_start(
                model, static["x"], static["x_start"], static["labels"], static["clean_logits"], **settings
            )

        graph = self.graph_factory()
        try:
            output = graph.capture(body, self.warmup)
        except Exception as error:  # a capture that fails must not stop training: the eager attack is the same
            logger.warning(
                "attack_cuda_graph: capturing the attack failed (%s: %s); it runs eagerly instead",
                type(error).__name__,
                error,
            )
            if x.device.type == "cuda":
                with contextlib.suppress(Exception):  # let an aborted capture's work finish before going on
                    torch.cuda.synchronize(x.device)
            self.graphs[key] = _EAGER
            return _EAGER
        entry = _Captured(graph, static, output, _fingerprint(model))
        self.graphs[key] = entry
        logger.info(
            "attack_cuda_graph: captured the %d-step attack for inputs of shape %s", settings["steps"], tuple(x.shape)
        )
        return entry


def _attack_from_start(model, x, x_start, labels, clean_logits, *, eps, step_size, steps, loss) -> torch.Tensor:
    """``pgd`` after its random start (the model already in attack mode): what a captured graph contains."""
    if loss == "kl" and clean_logits is None:
        clean_logits = clean_logits_of(model, x)
    return pgd_steps(
        model, x, x_start, labels, eps=eps, step_size=step_size, steps=steps, loss=loss, clean_logits=clean_logits
    )


# --------------------------------------------------------------------------------------- pixel checks
class CheckingCollator:
    """A data collator that checks the batch's pixel range and, once the model's class count is known
    (``num_classes``), its labels on the CPU, where reading them costs no device sync.

    The training step then needs no check on the device (``check_pixel_values`` on a GPU tensor waits for the GPU),
    and a label the model has no class for (10 for a 10-class model) stops with the fix instead of torch's
    ``IndexError: Target 10 is out of bounds`` (or a CUDA device-side assert). Only integer label tensors are range
    checked: float labels (soft targets from a collator of your own) are left to it.
    """

    def __init__(self, collator: Callable[[List[Any]], Dict[str, Any]], num_classes: Optional[int] = None):
        self.collator = collator
        self.num_classes = num_classes

    def __call__(self, examples: List[Any]) -> Dict[str, Any]:
        from .safety import check_class_labels

        batch = self.collator(examples)
        pixels = batch.get("pixel_values") if isinstance(batch, Mapping) else None
        if isinstance(pixels, torch.Tensor):
            check_pixel_values(pixels)  # on the CPU, as collators make batches (a device tensor is checked too)
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if (
            self.num_classes is not None
            and isinstance(labels, torch.Tensor)
            and not labels.is_floating_point()
            and labels.dtype != torch.bool
        ):
            check_class_labels(labels, self.num_classes, "labels")
        return batch


# --------------------------------------------------------------------------------- device-resident data
def augmentation_draws(
    seed: int, epoch: int, size: int, pad: int = 4
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The crop offsets (top, left in [0, 2 pad]) and horizontal flips of every example of one epoch.

    Drawn at once from a CPU generator seeded with ``seed * 1_000_003 + epoch`` and indexed by the example's index
    in the dataset, so a per-example DataLoader and the device-resident loader apply the same augmentation.
    """
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    offsets = torch.randint(0, 2 * pad + 1, (size, 2), generator=generator)
    flips = torch.randint(0, 2, (size,), generator=generator).bool()
    return offsets[:, 0].contiguous(), offsets[:, 1].contiguous(), flips


def crop_flip(
    images: torch.Tensor,
    top: Optional[torch.Tensor] = None,
    left: Optional[torch.Tensor] = None,
    flip: Optional[torch.Tensor] = None,
    pad: int = 4,
) -> torch.Tensor:
    """Pad-``pad`` random crop and horizontal flip of a batch, in one gather; pixels to floats in [0, 1].

    ``images``: (B, H, W, C), uint8 (0..255) or float ([0, 1]). Returns (B, C, H, W) float32 with channels_last
    strides. Zero padding, crop at (top, left) of the padded image, then flip where ``flip``: what torchvision's
    ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip`` do. ``top`` None: no augmentation.
    """
    if top is not None:
        batch, height, width, _ = images.shape
        device = images.device
        padded = F.pad(images, (0, 0, pad, pad, pad, pad))
        rows = top.to(device)[:, None] + torch.arange(height, device=device)
        columns = torch.arange(width, device=device)
        columns = torch.where(flip.to(device)[:, None], width - 1 - columns, columns) + left.to(device)[:, None]
        images = padded[torch.arange(batch, device=device)[:, None, None], rows[:, :, None], columns[:, None, :]]
    pixels = images.permute(0, 3, 1, 2)
    return pixels.float().div_(255.0) if images.dtype == torch.uint8 else pixels.float()


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in one tensor (N, H, W, C), uint8 or floats in [0, 1], with labels; optional crop + flip.

    The DataLoader counterpart of ``DeviceResidentLoader``: example ``i`` of epoch ``e`` gets the crop and flip
    ``augmentation_draws(seed, e, N)[.][i]``. The Trainer calls ``set_epoch`` on it through accelerate's data
    loader in one process; under DDP accelerate forwards the epoch to the sampler only, so the crops then repeat
    every epoch unless a callback calls ``set_epoch`` (the device-resident loader has no such gap).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: str = "none", pad: int = 4, seed: int = 0):
        if augment not in DEVICE_AUGMENTS:
            raise ValueError(f"augment={augment!r} is invalid: allowed one of {DEVICE_AUGMENTS}")
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                f"images must be (N, H, W, C) with N == len(labels); got {tuple(images.shape)} and {len(labels)} labels"
            )
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.long)
        self.augment, self.pad, self.seed = augment, pad, seed
        self.epoch = 0
        self._draws: Optional[Tuple[int, Tuple[torch.Tensor, ...]]] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def draws(self, epoch: int) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.augment == "none":
            return None
        if self._draws is None or self._draws[0] != epoch:
            self._draws = (epoch, augmentation_draws(self.seed, epoch, len(self), self.pad))
        return self._draws[1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        draws = self.draws(self.epoch)
        one = slice(index, index + 1)
        if draws is None:
            pixels = crop_flip(self.images[one])
        else:
            pixels = crop_flip(self.images[one], draws[0][one], draws[1][one], draws[2][one], self.pad)
        return {"pixel_values": pixels[0].contiguous(), "labels": int(self.labels[index])}


def resident_arrays(
    dataset, collate_fn: Callable, batch_size: int = 512, num_workers: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, H, W, C), labels (N,))`` of a map-style dataset, to keep on the device.

    Images are stored as uint8 when every pixel is a multiple of 1/255 (images decoded from 8-bit files), as
    float32 otherwise. A dataset whose transform is random (two reads of one example differ) is refused: keeping
    it on the device would freeze one draw of its augmentation.
    """
    if isinstance(dataset, TensorImageDataset):
        if dataset.images.dtype != torch.uint8:
            check_pixel_values(dataset.images)
        return dataset.images, dataset.labels
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"device_resident_data needs a map-style dataset with a length, got {type(dataset).__name__}")
    for index in range(min(4, len(dataset))):
        first, second = collate_fn([dataset[index]]), collate_fn([dataset[index]])
        if not torch.equal(first["pixel_values"], second["pixel_values"]):
            raise ValueError(
                f"device_resident_data: the training set's transform is random (two reads of example {index} differ), "
                "so keeping its pixels on the device would freeze one draw of the augmentation. Fix: build the "
                "training set without augmentation (e.g. load_image_dataset(..., augment='none')) and set "
                "device_augment='crop_flip' to crop and flip on the device, or set device_resident_data=False."
            )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn
    )
    pixels, labels = [], []
    for batch in loader:
        pixels.append(batch["pixel_values"].float())
        labels.append(torch.as_tensor(batch["labels"], dtype=torch.long))
    images = torch.cat(pixels)
    check_pixel_values(images)
    if images.dim() != 4:
        raise ValueError(
            f"device_resident_data needs images (C, H, W); got pixel_values of shape {tuple(images.shape[1:])}"
        )
    scaled = images * 255.0
    levels = scaled.round()
    if (scaled - levels).abs().max().item() <= 1e-3:
        images = levels.to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous(), torch.cat(labels)


class _ResidentBatches(torch.utils.data.IterableDataset):
    """The loader's batches as an iterable dataset, so accelerate's ``skip_first_batches`` (resuming mid-epoch)
    can wrap it in a DataLoader with ``batch_size=None``. Its length is the number of examples of a pass (what
    the Trainer's ``num_examples`` reports)."""

    def __init__(self, loader: DeviceResidentLoader):
        self.loader = loader

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self.loader._batches()

    def __len__(self) -> int:
        return min(len(self.loader.labels), len(self.loader) * self.loader.per_device_batch_size)


class DeviceResidentLoader:
    """The whole training set on the device; every epoch a permutation, and batches cropped/flipped on the device.

    The order is that of the Trainer's DataLoader in one process: accelerate's ``SeedableRandomSampler`` draws
    ``torch.randperm(N)`` from a CPU generator seeded with ``sampler_seed + epoch`` (``sampler_seed``: the
    Trainer's ``data_seed``, else ``torch.random.initial_seed()`` when the loader is made), and consecutive
    ``batch_size`` chunks make the batches. Crops and flips come from ``augmentation_draws(seed, epoch, N)``, as in
    ``TensorImageDataset``. With several processes, process ``r`` takes batches ``r, r + W, ...`` of each epoch and
    the last incomplete round is dropped. The epoch of a pass: the last ``set_epoch`` value if it was called
    since the previous pass, else ``epoch_source()`` when given (the Trainer resuming mid-epoch skips batches
    before it calls ``set_epoch``), else the previous pass's epoch + 1.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        device,
        augment: str = "none",
        pad: int = 4,
        seed: int = 0,
        sampler_seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
        num_processes: int = 1,
        process_index: int = 0,
        epoch_source: Optional[Callable[[], int]] = None,
    ):
        if augment not in DEVICE_AUGMENTS:
            raise ValueError(f"augment={augment!r} is invalid: allowed one of {DEVICE_AUGMENTS}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        self.per_device_batch_size, self.drop_last_batch = batch_size, drop_last
        self.augment, self.pad, self.seed = augment, pad, seed
        self.sampler_seed, self.channels_last = sampler_seed, channels_last
        # What a DataLoader yielding ready batches in the main process reports: accelerate's skip_first_batches
        # (resuming mid-epoch) builds a DataLoader over ``self.dataset`` from these attributes.
        self.batch_size, self.drop_last, self.prefetch_factor = None, False, None
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch_source = epoch_source
        self.epoch = 0  # of the next pass when no set_epoch and no epoch_source say otherwise
        self._set_epoch: Optional[int] = None
        self.dataset = _ResidentBatches(self)

    def set_epoch(self, epoch: int) -> None:
        self._set_epoch = int(epoch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.per_device_batch_size)
        if self.num_processes > 1:  # whole rounds of full batches only
            return full // self.num_processes
        return full + (1 if rest and not self.drop_last_batch else 0)

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(self.sampler_seed) + int(epoch))
        return torch.randperm(len(self.labels), generator=generator)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self._batches()

    def _batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        if self._set_epoch is not None:
            epoch, self._set_epoch = self._set_epoch, None
        elif self.epoch_source is not None:
            epoch = int(self.epoch_source())
        else:
            epoch = self.epoch
        self.epoch = epoch + 1
        # A DataLoader iterator draws its workers' base seed from the global CPU generator; so does this, so that a
        # run takes the same random draws afterwards (e.g. the attack's start on the CPU) with or without it.
        torch.empty((), dtype=torch.int64).random_()
        order = self.permutation(epoch).to(self.device, non_blocking=True)
        draws = None
        if self.augment == "crop_flip":
            draws = [
                d.to(self.device, non_blocking=True)
                for d in augmentation_draws(self.seed, epoch, len(self.labels), self.pad)
            ]
        for number in range(len(self)):
            batch_index = number * self.num_processes + self.process_index
            size = self.per_device_batch_size
            index = order[batch_index * size : (batch_index + 1) * size]
            images = self.images.index_select(0, index)
            if draws is None:
                pixels = crop_flip(images)
            else:
                pixels = crop_flip(images, draws[0][index], draws[1][index], draws[2][index], self.pad)
            if not self.channels_last:
                pixels = pixels.contiguous()
            yield {"pixel_values": pixels, "labels": self.labels.index_select(0, index)}


# ------------------------------------------------------------------------------------ trainer runtime
class SpeedRuntime:
    """The speed options of one CURETrainer: what the trainer calls into (see docs/INTEGRATION_speed.md)."""

    def __init__(self, args, device: torch.device):
        self.args = args
        self.device = torch.device(device)
        self.plan = plan_speed(args, self.device)
        self.graphed_attack = GraphedAttack() if self.plan.attack_cuda_graph else None
        self.pixels_checked_on_cpu = False
        self._resident: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if self.plan.cudnn_benchmark is not None and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.plan.cudnn_benchmark
        if getattr(args, "speed_preset_changed", None):
            logger.info("speed_preset=%r set %s", args.speed_preset, ", ".join(args.speed_preset_changed))
        for note in self.plan.notes:
            logger.info(note)

    def checking_collator(self, collator: Callable, num_classes: Optional[int] = None) -> Callable:
        """Wrap the trainer's data collator so every batch is range-checked on the CPU (no device sync): its pixels
        always, its labels against ``num_classes`` (the model's outputs) when given. Rewrapping a
        ``CheckingCollator`` with a ``num_classes`` gives a new one (the given one, maybe shared, is left as it is)."""
        self.pixels_checked_on_cpu = True
        if isinstance(collator, CheckingCollator):
            if num_classes is None or collator.num_classes == num_classes:
                return collator
            return CheckingCollator(collator.collator, num_classes)
        return CheckingCollator(collator, num_classes)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """The training step's range check: free when the batch was checked on the CPU already."""
        if pixel_values.device.type == "cpu" or not self.pixels_checked_on_cpu:
            check_pixel_values(pixel_values)  # on a device tensor this waits for the device: only when unchecked

    def pgd(self, model: nn.Module, x: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """``attacks.pgd``, replayed from a CUDA graph when ``attack_cuda_graph`` is on."""
        if self.graphed_attack is not None:
            return self.graphed_attack(model, x, labels, **kwargs)
        return pgd(model, x, labels, **kwargs)

    def train_dataloader(self, trainer) -> Optional[DeviceResidentLoader]:
        """The device-resident loader when ``device_resident_data`` resolves to on, else None (the DataLoader)."""
        if not self.plan.device_resident_data:
            return None
        args = trainer.args
        dataset = trainer.train_dataset
        try:
            images, labels = self._resident_arrays(dataset, trainer.data_collator)
        except (TypeError, ValueError) as error:
            if self.plan.resident_required:
                raise
            logger.warning("speed_preset='fast': the training set stays in the DataLoader (%s)", error)
            return None
        augment, seed = self.plan.device_augment, args.seed
        if isinstance(dataset, TensorImageDataset) and dataset.augment != "none":
            if augment not in ("none", dataset.augment):
                raise ValueError(
                    f"device_augment={augment!r} contradicts the training set's own augment="
                    f"{dataset.augment!r}; set one of them"
                )
            augment, seed = dataset.augment, dataset.seed
        elif isinstance(dataset, TensorImageDataset):
            seed = dataset.seed
        sampler_seed = args.data_seed if args.data_seed is not None else torch.random.initial_seed()
        accumulation = max(1, args.gradient_accumulation_steps)
        loader = DeviceResidentLoader(
            images,
            labels,
            batch_size=args.per_device_train_batch_size,
            device=self.device,
            augment=augment,
            pad=getattr(dataset, "pad", 4),
            seed=seed,
            sampler_seed=sampler_seed,
            drop_last=args.dataloader_drop_last,
            channels_last=bool(getattr(args, "channels_last", False)),
            num_processes=max(1, args.world_size),
            process_index=args.process_index,
        )
        updates_per_epoch = max(1, len(loader) // accumulation)
        # The epoch a pass belongs to, also when the Trainer resumes mid-epoch (it skips batches before set_epoch).
        loader.epoch_source = lambda: int(trainer.state.global_step // updates_per_epoch)
        return loader

    def _resident_arrays(self, dataset, collate_fn) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._resident is None:
            images, labels = resident_arrays(dataset, collate_fn, num_workers=0)
            needed = images.numel() * images.element_size()
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if needed > free // 2:
                    raise ValueError(
                        f"the training set needs {needed / 2**30:.2f} GiB, more than half of the "
                        f"{free / 2**30:.2f} GiB free on {self.device}"
                    )
            self._resident = (images, labels)
        return self._resident
