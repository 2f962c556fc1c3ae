"""Put numbers on an adversarial-training step on one device, in one process, for every speed configuration.

Configurations (cumulative; ``cure_hf.speed`` and docs/benchmarks.md describe each piece):

    fp32      fp32, NCHW, eager, DataLoader (per-example crop + flip in workers), eager attack
    bf16      + bf16 autocast over the whole step (attack included; losses in fp32)
    bf16_cl   + channels_last
    compile   + torch.compile (the attack runs through the same compiled module)
    graphs    + the attack's K steps replayed from a CUDA graph (on the CPU: an eager stand-in, for the format)
    fast      + the training set resident on the device, cropped and flipped there: speed_preset="fast"
              (which also sets cudnn.benchmark and removes the Trainer's per-step host synchronisations)
    fp32_graphs, bf16_cl_graphs   diagnostics: CUDA-graph attack without torch.compile
    captured  the preset's pieces with the whole step captured as one CUDA graph (``cure_hf.capture.CapturedStep``:
              attack, forwards, loss, backward, mask, optimizer, revision), plain loop only; on the CPU it runs
              eagerly through the capture's plumbing
    captured_bf16, captured_fp32   the whole step captured, eager kernels (bf16 + channels_last, or fp32): their
              ratio is what bf16 buys once the host no longer paces the step

For each configuration and method (clean, pgd, trades, cure) it measures seconds per step of ``CURETrainer``
and of a plain PyTorch loop built from the same pieces (so trainer-vs-plain is the Trainer's own cost), seconds
per CIFAR-10 epoch, the ratio to fp32, and peak memory. It profiles one CURE step per configuration
(``--profile-dir``: top kernels and operators, kernel launches, host synchronisations), checks that robust accuracy
is unchanged between fp32 and the preset, and prints ``RATIO``/``TARGET`` lines against the GPU speed targets
at the end. Jobs run in order of importance under ``--time-budget-s``; a failing job prints its traceback and the
run goes on. No ``datasets``/``evaluate``/``pyautoattack``: synthetic CIFAR-shaped data.

    python benchmarks/bench_step.py --device cpu --model test_resnet --batch-size 8 --steps 1 --warmup 1   # dry run
    python benchmarks/bench_step.py --device cuda                             # the whole ladder on a GPU (minutes)

The GPU run of record is ``bash benchmarks/gpu_run.sh`` (``bench_targets.py``: alternating CUDA-event windows of
the configurations the targets name, and ``bench_vit_b.py``); it reuses this file's pieces.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import gzip
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
import weakref
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cure_hf.attacks import logits_of, pgd  # noqa: E402
from cure_hf.capture import CapturedStep, EagerStepGraph  # noqa: E402
from cure_hf.components import resolved_conservation, resolved_revision, runs_clean_pass  # noqa: E402
from cure_hf.config import CURETrainingArguments  # noqa: E402
from cure_hf.data import collate_pixels  # noqa: E402
from cure_hf.methods import METHODS, AttackSettings, LossInputs, get_method, with_consistency  # noqa: E402
from cure_hf.models import create_model, head_parameter_names  # noqa: E402
from cure_hf.prominence import mask_gradients_, quantile_threshold  # noqa: E402
from cure_hf.revision import RevisionModel  # noqa: E402
from cure_hf.speed import (  # noqa: E402
    DeviceResidentLoader,
    GraphedAttack,
    TensorImageDataset,
    _EagerReplay,
    attack_module,
    autocast_forward,
)

TARGETS = {
    "cure_epoch_fast_s": 15.0,
    "bf16_speedup": 1.6,
    "trainer_overhead": 0.05,
    "cure_vs_trades": 1.10,
    "mask_revision_share": 0.02,
}
# name: (bf16, channels_last, compile, cuda graph attack, device-resident data, cudnn.benchmark)
CONFIGS = OrderedDict(
    [
        ("fp32", (False, False, False, False, False, False)),
        ("bf16", (True, False, False, False, False, False)),
        ("bf16_cl", (True, True, False, False, False, False)),
        ("compile", (True, True, True, False, False, False)),
        ("graphs", (True, True, True, True, False, False)),
        ("fast", (True, True, True, True, True, True)),
        ("fp32_graphs", (False, False, False, True, False, False)),
        ("bf16_cl_graphs", (True, True, False, True, False, False)),
        ("captured", (True, True, True, False, True, True)),
        ("captured_bf16", (True, True, False, False, True, True)),
        ("captured_fp32", (False, False, False, False, True, True)),
    ]
)
# Configurations whose step is one captured function (cure_hf.capture): the plain loop only, CURETrainer has no such step.
CAPTURED = ("captured", "captured_bf16", "captured_fp32")
LADDER = ("fp32", "bf16", "bf16_cl", "compile", "graphs", "fast")
METHOD_ORDER = ("cure", "trades", "pgd", "clean")


class BudgetExceeded(Exception):
    pass


# ------------------------------------------------------------------------------------------------ setup
def synthetic_images(size: int, image_size: int, num_classes: int = 10, seed: int = 0, learnable: bool = False):
    """uint8 (N, H, W, 3) images and labels. ``learnable``: each class has a smooth random template (4x4 upsampled)
    added to mid-grey plus per-pixel noise, so a short run learns it and robust accuracy is neither 0 nor 1."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (size,), generator=generator)
    if not learnable:
        return torch.randint(0, 256, (size, image_size, image_size, 3), dtype=torch.uint8, generator=generator), labels
    templates = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(1234)) * 2 - 1
    templates = F.interpolate(templates, size=(image_size, image_size), mode="bilinear", align_corners=False)
    noise = torch.randn(size, 3, image_size, image_size, generator=generator) * 0.1
    pixels = (0.5 + 0.3 * templates[labels] + noise).clamp(0, 1)  # test_resnet, 60 CURE steps: clean 1.0, PGD-20 0.45
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), labels


def build_model(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {"image_size": cfg.image_size, "patch_size": cfg.vit_patch} if "vit" in cfg.model else {}
    return create_model(cfg.model, 10, **kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds between ``start()`` and ``stop()`` on the device's own clock: CUDA events on a GPU (recorded in the
    stream, so nothing waits for the device until ``stop`` reads them; idle gaps between kernels count), the host's
    ``time.perf_counter`` elsewhere (where the device is the host: no synchronisation needed)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self._start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self._start.elapsed_time(end) / 1e3


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Models:
    """One model object per (role, bf16, channels_last, compile), reset to the same initial weights before every
    run: torch.compile's graphs are then traced once per family and reused by every method and configuration."""

    def __init__(self, cfg, seed: int = 0):
        self.cfg = cfg
        self.init_state = {k: v.clone() for k, v in build_model(cfg, seed).state_dict().items()}
        self.cache: Dict[tuple, torch.nn.Module] = {}

    def get(self, role: str, bf16: bool, channels_last: bool, compiled: bool) -> torch.nn.Module:
        key = (role, bf16, channels_last)
        model = self.cache.get(key) if compiled else None  # eager models are built fresh every run
        if model is None:
            model = build_model(self.cfg).to(self.cfg.device)
            if compiled:
                self.cache[key] = model
        with torch.no_grad():
            model.load_state_dict(self.init_state)
        model.zero_grad(set_to_none=True)
        return model


def prepare_module(model: torch.nn.Module, device: torch.device, bf16: bool, channels_last: bool) -> torch.nn.Module:
    """channels_last and accelerate's autocast wrapper, once per model object (idempotent)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if bf16 and "_original_forward" not in model.__dict__:
        autocast_forward(model, device.type)  # what accelerate does for the trainer: the same compiled graphs
    return model


def set_cudnn_benchmark(device: torch.device, value: bool) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = value


# ------------------------------------------------------------------------------------------ plain loop
class PlainStep:
    """One training step of ``method`` as a minimal PyTorch loop, from the same pieces the trainer uses (attacks,
    method losses, prominence mask, revision model, and cure_hf.speed's CUDA-graph attack and autocast wrapper).
    It never synchronises the host, except around parts when ``timed`` (the part-by-part breakdown)."""

    def __init__(self, cfg, model, method: str, config: str):
        bf16, channels_last, compiled, graphs, _, _ = CONFIGS[config]
        device = cfg.device
        self.cfg, self.device, self.method, self.spec = cfg, device, method, get_method(method)
        # The method's defaults, as CURETrainingArguments has them: the loss and its components as the trainer runs
        # them, from the same method object (only the loop around them is written here).
        defaults = _argument_defaults()
        self.hyperparameters = {name: defaults[name] for name in self.spec.hyperparameters}
        self.hyperparameters["label_smoothing_factor"] = 0.0
        switches = type("Switches", (), {"conservation": None, "revision": None})()
        self.conserves = resolved_conservation(switches, self.spec) != "none"
        self.revises = resolved_revision(switches, self.spec)
        self.consistency_weight = defaults["consistency_weight"]
        self.clean_pass = runs_clean_pass(switches, self.spec)
        self.channels_last = channels_last
        self.module = model = prepare_module(model, device, bf16, channels_last)
        self.model = torch.compile(model, backend=cfg.compile_backend) if compiled else model
        self.attack_net = attack_module(self.model)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        heads = head_parameter_names(model)
        self.maskable = [p for n, p in model.named_parameters() if n not in heads]
        self.revision = RevisionModel(model, seed=0) if self.revises else None
        self.attack = pgd
        if graphs:
            self.attack = GraphedAttack() if device.type == "cuda" else GraphedAttack(graph_factory=_EagerReplay)
        self.times: Dict[str, float] = defaultdict(float)
        self.captured = None
        if config in CAPTURED:  # the same pieces, the whole step as one captured function
            self.captured = CapturedStep(
                model,
                self.spec,
                self.optimizer,
                attack_settings=self.attack_settings(),
                hyperparameters=self.hyperparameters,
                conserve_fraction=0.3 if self.conserves else None,
                head_names=heads,
                revision=self.revision,
                consistency_weight=self.consistency_weight,
                train_forward=self.model,
                attack_net=self.attack_net,
                clean_pass=self.clean_pass,
                capture=True,
                graph_factory=None if device.type == "cuda" else EagerStepGraph,
            )

    def attack_settings(self) -> AttackSettings:
        cfg = self.cfg
        return AttackSettings(
            eps=getattr(cfg, "epsilon", 8 / 255),
            step_size=getattr(cfg, "attack_step_size", 2 / 255),
            steps=cfg.attack_steps,
        )

    @contextlib.contextmanager
    def part(self, name: str, timed: bool):
        if not timed:
            yield
            return
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.times[name] += time.perf_counter() - start

    def __call__(self, batch, timed: bool = False) -> None:
        spec, model = self.spec, self.model
        with self.part("data to device", timed):
            x = batch["pixel_values"].to(self.device, non_blocking=True)
            labels = batch["labels"].to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        if self.captured is not None:
            with self.part("captured step", timed):
                self.captured(x, labels)
            return
        model.train()
        x_adv = None
        if spec.attack is not None:
            with self.part("attack", timed):
                x_adv = spec.attack.craft(self.attack_net, x, labels, self.attack_settings(), pgd_fn=self.attack)
        with self.part("forward f (clean, adv)", timed):
            z_nat = logits_of(model(x)) if self.clean_pass else None
            z_adv = logits_of(model(x_adv)) if x_adv is not None else None
        r_nat = r_adv = None
        if self.revises:
            with self.part("forward g (revision)", timed):
                r_nat, r_adv = logits_of(self.revision(x)), logits_of(self.revision(x_adv))
        with self.part("loss", timed):
            loss, parts = spec.loss(LossInputs(labels, z_nat, z_adv, r_nat, r_adv), self.hyperparameters)
            if self.revises:
                loss, _ = with_consistency((loss, parts), z_nat, z_adv, r_nat, r_adv, self.consistency_weight)
        with self.part("backward", timed):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if self.conserves:
            with self.part("mask", timed):
                mask_gradients_(self.maskable, 0.3)
        with self.part("optimizer", timed):
            self.optimizer.step()
        if self.revises:
            with self.part("revision update", timed):
                self.revision.step_(self.module)


def _argument_defaults() -> Dict[str, Any]:
    """CURETrainingArguments' field defaults (the hyperparameters a method reads, the consistency weight)."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(CURETrainingArguments)}


def make_loader(cfg, dataset: TensorImageDataset, resident: bool, channels_last: bool):
    if resident:
        return DeviceResidentLoader(
            dataset.images,
            dataset.labels,
            batch_size=cfg.batch_size,
            device=cfg.device,
            augment=dataset.augment,
            seed=dataset.seed,
            sampler_seed=0,
            drop_last=True,
            channels_last=channels_last,
        )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.base_workers,
        collate_fn=collate_pixels,
        pin_memory=cfg.device.type == "cuda",
        drop_last=True,
        persistent_workers=False,
    )


def timed_dataset(cfg, steps: int) -> TensorImageDataset:
    images, labels = synthetic_images(cfg.batch_size * steps, cfg.image_size, seed=0)
    return TensorImageDataset(images, labels, augment="crop_flip", seed=0)


def run_plain(
    cfg, models: Models, method: str, config: str, *, breakdown: bool = False, profile: Optional[Callable] = None
) -> Dict[str, Any]:
    """Seconds per step of the plain loop over ``cfg.steps`` steps after ``cfg.warmup``, the device synchronised only
    before and after the timed steps; with ``breakdown``, seconds per step of each part (synchronised per part)."""
    bf16, channels_last, compiled, _, resident, benchmark = CONFIGS[config]
    device = cfg.device
    set_cudnn_benchmark(device, benchmark)
    model = models.get("plain", bf16, channels_last, compiled)
    step = PlainStep(cfg, model, method, config)
    extra = cfg.profile_steps if profile else 0
    loader = make_loader(cfg, timed_dataset(cfg, cfg.warmup + cfg.steps + extra), resident, channels_last)
    batches = iter(loader)
    for _ in range(cfg.warmup):
        step(next(batches))
    reset_peak(device)
    sync(device)
    clock = Stopwatch(device)
    clock.start()
    for _ in range(cfg.steps):
        step(next(batches), timed=breakdown)
    seconds = clock.stop() / cfg.steps
    result = {
        "step_s": seconds,
        "peak_mib": peak_mib(device),
        "parts_s": {k: v / cfg.steps for k, v in step.times.items()},
    }
    if isinstance(step.attack, GraphedAttack):
        result["graph_replays"], result["graph_eager_calls"] = step.attack.replays, step.attack.eager_calls
    if profile is not None:
        try:
            result["profile"] = profile(lambda run=step, data=batches: run(next(data)), cfg.profile_steps)
        except Exception:  # the timing above stands; say why there is no profile
            print(f"profile of plain {config} {method} failed:\n{traceback.format_exc()}", flush=True)
    del step, loader, batches
    release(device)
    return result


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- trainer
def trainer_arguments(cfg, method: str, config: str, out: str, max_steps: int, **extra):
    from cure_hf import CURETrainingArguments

    bf16, channels_last, compiled, graphs, resident, benchmark = CONFIGS[config]
    fields = dict(
        bf16=bf16,
        channels_last=channels_last,
        torch_compile=compiled,
        attack_cuda_graph=graphs and cfg.device.type == "cuda",
        device_resident_data=resident,
        cudnn_benchmark=benchmark,
        dataloader_num_workers=0 if resident else cfg.base_workers,
    )
    if config == "fast":  # the preset as users write it
        fields = dict(speed_preset="fast", dataloader_num_workers=0)
    if compiled and cfg.compile_backend != "inductor":
        fields["torch_compile_backend"] = cfg.compile_backend
    base = dict(
        output_dir=out,
        adv_method=method,
        max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size,
        attack_steps=cfg.attack_steps,
        epsilon=getattr(cfg, "epsilon", 8 / 255),
        attack_step_size=getattr(cfg, "attack_step_size", 2 / 255),
        seed=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=cfg.device.type == "cpu",
        dataloader_pin_memory=cfg.device.type == "cuda",
        dataloader_drop_last=True,
    )
    return CURETrainingArguments(**{**base, **fields, **extra})  # extra (e.g. seed, learning_rate) wins


def run_trainer(
    cfg,
    models: Models,
    method: str,
    config: str,
    *,
    dataset=None,
    max_steps: Optional[int] = None,
    profile: Optional[Callable] = None,
    count_syncs: bool = False,
    **extra,
) -> Dict[str, Any]:
    """Seconds per step of ``CURETrainer.train()``: the device synchronised at the end of the warm-up steps and of the
    timed steps only (a callback), so host and device overlap as they do in a real run."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from cure_hf import CURETrainer

    bf16, channels_last, compiled, graphs, _, _ = CONFIGS[config]
    device = cfg.device
    extra_steps = (cfg.profile_steps if profile else 0) + (1 if count_syncs else 0)
    total = max_steps or cfg.warmup + cfg.steps + extra_steps
    first_timed, last_timed = cfg.warmup, cfg.warmup + cfg.steps

    class Clock(TrainerCallback):
        @staticmethod
        def _guard(fn):  # a failing profiler must not cost the run its timing
            try:
                return fn()
            except Exception:
                print(f"profile of trainer {config} {method} failed:\n{traceback.format_exc()}", flush=True)
                return None

        def __init__(self):
            self.seconds = None
            self.watch = Stopwatch(device)
            self.profiled = None
            self.syncs = None
            self._profiler = self._sync_counter = None

        def on_train_begin(self, args, state, control, **kwargs):
            # accelerate has just prepared the model: keep the first run's autocast wrapper (see reprepare)
            forward = model.__dict__.get("forward")
            if forward is not None:
                model.forward = _FIRST_FORWARD.setdefault(model, forward)

        def on_step_end(self, args, state, control, **kwargs):
            # Windows run from one step's end to another's: they include loading the next batch.
            step = state.global_step
            if self._profiler is not None and step == last_timed + cfg.profile_steps:
                profiler, self._profiler = self._profiler, None
                self.profiled = self._guard(profiler.stop)
            if self._sync_counter is not None and step == total:
                self._sync_counter.__exit__(None, None, None)
                self.syncs = self._sync_counter.report()
                self._sync_counter = None
            if step == first_timed:
                sync(device)
                reset_peak(device)
                self.watch.start()
            elif step == last_timed:
                self.seconds = self.watch.stop()
            if profile is not None and step == last_timed:
                self._profiler = self._guard(lambda: profile(None, cfg.profile_steps, start=True))
            if count_syncs and step == total - 1:
                self._sync_counter = SyncCounter(device).__enter__()

    model = models.get("trainer", bf16, channels_last, compiled)
    reprepare(model)
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = trainer_arguments(cfg, method, config, out, total, **extra)
        trainer = CURETrainer(model, args, train_dataset=dataset or timed_dataset(cfg, total), callbacks=[clock])
        if graphs and device.type != "cuda":  # CPU dry run: the CUDA-graph plumbing with an eager stand-in
            trainer.speed.graphed_attack = GraphedAttack(graph_factory=_EagerReplay)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        result = {"trainer": trainer}
    result.update(
        step_s=clock.seconds / cfg.steps if clock.seconds is not None else None,
        peak_mib=peak_mib(device),
        profile=clock.profiled,
        syncs=clock.syncs,
    )
    if not max_steps:
        del result["trainer"]
        del trainer
        release(device)
    return result


# A model object reused by several CURETrainer runs (Models keeps one per compiled family) must be prepared by each
# run's accelerator as a new model would be. accelerate marks a prepared model (`_is_accelerate_prepared`, set
# through torch.compile's wrapper on the module itself) and returns a marked model as it is: every run after the
# first trained uncompiled. reprepare() removes the mark and accelerate's autocast wrapper before the Trainer is
# built; the run's accelerator then compiles and wraps it again, and once it has (on_train_begin) the first run's
# wrapper is put back: a new wrapper holds a new autocast object, which would fail the compiled graphs' guard on it
# (one recompilation per run).
_FIRST_FORWARD: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


def reprepare(model: torch.nn.Module) -> None:
    """Undo what a previous run's accelerator did to ``model`` (its prepared mark and autocast wrapper)."""
    model.__dict__.pop("_is_accelerate_prepared", None)
    strip_wrappers(model)


def trained_fp32_copy(trainer) -> torch.nn.Module:
    """The trainer's model as a plain fp32 NCHW module (no compile, no autocast wrapper), to evaluate in fp32."""
    net = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False, keep_torch_compile=False)
    model = copy.deepcopy(net).float().to(memory_format=torch.contiguous_format)
    strip_wrappers(model)
    return model


def strip_wrappers(model: torch.nn.Module) -> None:
    """Undo accelerate's autocast wrapper on a reused model (the next trainer wraps it again)."""
    for name in ("forward", "_original_forward"):
        model.__dict__.pop(name, None)


# --------------------------------------------------------------------------------------- synchronisations
class SyncCounter:
    """Counts the host synchronisations of the code it wraps: CUDA's sync debug mode in "warn" mode, one warning per
    synchronising call, with the Python line that made it. Off CUDA it counts nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.records: List[warnings.WarningMessage] = []

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            self._catch = warnings.catch_warnings(record=True)
            self.records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)
        return False

    def report(self) -> Dict[str, Any]:
        syncs = [r for r in self.records if "synchroniz" in str(r.message)]
        where = OrderedDict()
        for r in syncs:
            key = f"{os.path.basename(r.filename)}:{r.lineno}"
            where[key] = where.get(key, 0) + 1
        return {"count": len(syncs), "where": dict(where), "measured": self.device.type == "cuda"}


# ---------------------------------------------------------------------------------------------- profiles
_LAUNCH = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel",
)
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaStreamWaitEvent")


class Profiles:
    """torch.profiler over a few steps; a compact text summary per profile, all in one file, and one gzipped trace."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.summaries: List[str] = []
        self.one_line: Dict[str, str] = OrderedDict()
        self.trace_written = False

    def __call__(self, name: str, trace: bool = False):
        cfg = self.cfg

        def profile(step: Optional[Callable], steps: int, start: bool = False):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cfg.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            sync(cfg.device)
            wall_start = time.perf_counter()
            profiler.__enter__()

            def stop():
                sync(cfg.device)
                profiler.__exit__(None, None, None)
                wall = time.perf_counter() - wall_start
                return self.summarise(name, profiler, steps, wall, trace)

            if start:
                return type("Running", (), {"stop": staticmethod(stop)})()
            for _ in range(steps):
                step()
            return stop()

        return profile

    def summarise(self, name: str, profiler, steps: int, wall: float, trace: bool) -> Dict[str, Any]:
        events = profiler.events()
        gpu = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))]
        gpu_ids = set(map(id, gpu))
        cpu = [e for e in events if id(e) not in gpu_ids]
        counts = defaultdict(int)
        for e in cpu:
            if e.name in _LAUNCH or e.name in _SYNCS or e.name.startswith("cudaMemcpy") or e.name == "cudaGraphLaunch":
                counts[e.name] += 1
        kernels = defaultdict(lambda: [0.0, 0])
        intervals = []
        dtoh = 0
        for e in gpu:
            elapsed = e.time_range.elapsed_us()
            kernels[e.name][0] += elapsed
            kernels[e.name][1] += 1
            intervals.append((e.time_range.start, e.time_range.end))
            if "DtoH" in e.name:
                dtoh += 1
        busy = _union(intervals) / 1e6
        ops = defaultdict(lambda: [0.0, 0])
        for e in cpu:
            ops[e.name][0] += e.self_cpu_time_total
            ops[e.name][1] += 1
        launches = sum(counts[n] for n in _LAUNCH)
        summary = {
            "steps": steps,
            "wall_s_per_step": wall / steps,
            "gpu_busy_s_per_step": busy / steps,
            "kernel_launches_per_step": launches / steps,
            "graph_launches_per_step": counts["cudaGraphLaunch"] / steps,
            "gpu_kernels_per_step": sum(v[1] for v in kernels.values()) / steps,
            "syncs_per_step": {n: counts[n] / steps for n in _SYNCS if counts[n]},
            "memcpy_dtoh_per_step": dtoh / steps,
            "memcpy_calls_per_step": {n: c / steps for n, c in counts.items() if n.startswith("cudaMemcpy")},
        }
        lines = [
            f"=== profile {name}: {steps} step(s), wall {wall / steps * 1e3:.2f} ms/step, GPU busy "
            f"{busy / steps * 1e3:.2f} ms/step ({busy / max(wall, 1e-12):.0%})",
            f"kernel launches/step {summary['kernel_launches_per_step']:.0f} (+ {summary['graph_launches_per_step']:.1f}"
            f" CUDA graph launches), GPU kernels+copies/step {summary['gpu_kernels_per_step']:.0f}, "
            f"syncs/step {summary['syncs_per_step'] or 0}, memcpy DtoH/step {summary['memcpy_dtoh_per_step']:.1f}, "
            f"memcpy calls/step {summary['memcpy_calls_per_step'] or 0}",
            "top GPU kernels (ms/step, calls/step):",
        ]
        for kname, (total, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]:
            lines.append(f"  {total / 1e3 / steps:8.3f} ms {count / steps:7.1f}x  {kname[:110]}")
        lines.append("top host ops by self CPU time (ms/step, calls/step):")
        for oname, (total, count) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]:
            lines.append(f"  {total / 1e3 / steps:8.3f} ms {count / steps:7.1f}x  {oname[:110]}")
        self.summaries.append("\n".join(lines))
        self.one_line[name] = (
            f"{wall / steps * 1e3:7.2f} ms/step wall, GPU busy {busy / max(wall, 1e-12):4.0%}, "
            f"{summary['kernel_launches_per_step']:5.0f} launches/step, "
            f"{summary['graph_launches_per_step']:.0f} graph launches/step, syncs/step "
            f"{sum(summary['syncs_per_step'].values()):.0f}, DtoH/step {summary['memcpy_dtoh_per_step']:.0f}"
        )
        if trace and self.cfg.profile_dir and not self.trace_written:
            raw = os.path.join(tempfile.gettempdir(), "bench_trace.json")
            profiler.export_chrome_trace(raw)
            target = os.path.join(self.cfg.profile_dir, "trace.json.gz")
            with open(raw, "rb") as f, gzip.open(target, "wb", compresslevel=6) as g:
                g.write(f.read())
            os.remove(raw)
            if os.path.getsize(target) > 15 * 2**20:
                os.remove(target)
                self.summaries.append(f"(trace of {name} dropped: over 15 MiB gzipped)")
            else:
                self.trace_written = True
                self.summaries.append(f"(chrome trace of {name}: trace.json.gz)")
        self.write()
        return summary

    def write(self) -> None:
        if self.cfg.profile_dir:
            with open(os.path.join(self.cfg.profile_dir, "profiles.txt"), "w") as f:
                f.write("\n\n".join(self.summaries) + "\n")


def _union(intervals: List[Tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


# ----------------------------------------------------------------------------------------- robust accuracy
def robust_accuracy(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    device,
    batch_size: int,
    steps: int,
    attack=pgd,
    attack_net=None,
    channels_last: bool = False,
) -> float:
    """Accuracy of ``model`` (fp32, eval mode) on images (N, H, W, C), uint8 or floats in [0, 1], under
    PGD-``steps`` (CE, uniform start, step 2/255, eps 8/255, fixed seeds) crafted by ``attack`` on ``attack_net``
    (default: the model itself, eager fp32)."""
    correct = 0
    net = attack_net if attack_net is not None else model
    model.eval()
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device).permute(0, 3, 1, 2).float()
        x = x.div(255) if images.dtype == torch.uint8 else x
        y = labels[start : start + batch_size].to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        generator = torch.Generator(device=device).manual_seed(start)
        x_adv = (
            x
            if steps == 0
            else attack(
                net, x, y, eps=8 / 255, step_size=2 / 255, steps=steps, loss="ce", init="uniform", generator=generator
            )
        )
        with torch.no_grad():
            correct += int((logits_of(model(x_adv)).argmax(1) == y).sum())
    return correct / len(labels)


def run_robustness(cfg, models: Models, results) -> Dict[str, Any]:
    """Train CURE for ``--robust-steps`` steps from one init with fp32 and with the preset (and fp32 with another
    data seed, for the run-to-run noise), then evaluate every model with the same fp32 PGD-20 on the same held-out
    examples; and evaluate the fp32 model with the preset's attack path (bf16 autocast, channels_last, compiled,
    CUDA graph) against fp32 PGD-20."""
    device = cfg.device
    n_train = cfg.batch_size * cfg.robust_steps
    n_eval = max(1, cfg.robust_eval // cfg.batch_size) * cfg.batch_size  # whole batches: one compiled shape
    images, labels = synthetic_images(n_train + n_eval, cfg.image_size, seed=11, learnable=True)
    train = TensorImageDataset(images[:n_train], labels[:n_train], augment="crop_flip", seed=0)
    test_images, test_labels = images[n_train:], labels[n_train:]
    out: Dict[str, Any] = OrderedDict()
    trained = {}
    for name, config, seed in (("fp32", "fp32", 0), ("fast", "fast", 0), ("fp32_seed1", "fp32", 1)):
        check_budget(cfg, 20)
        run = run_trainer(
            cfg,
            models,
            cfg.robust_method,
            config,
            dataset=train,
            max_steps=cfg.robust_steps,
            data_seed=seed,
            learning_rate=0.05,
        )
        trainer = run.pop("trainer")
        trained[name] = fp32_copy = trained_fp32_copy(trainer)
        out[f"pgd20_{name}"] = robust_accuracy(fp32_copy, test_images, test_labels, device, cfg.batch_size, 20)
        out[f"clean_{name}"] = robust_accuracy(fp32_copy, test_images, test_labels, device, cfg.batch_size, 0)
        print(
            f"  after {cfg.robust_steps} {cfg.robust_method} steps, {name}: clean {out[f'clean_{name}']:.4f}, fp32 PGD-20 "
            f"{out[f'pgd20_{name}']:.4f}",
            flush=True,
        )
        del trainer, run
        release(device)
    # one fixed model (the fp32-trained one), attacked the fp32 way and the preset's way (bf16 autocast as accelerate
    # wraps it, channels_last, compiled: the trainer's attack graphs, from inductor's cache; CUDA graph), judged in fp32
    model = trained["fp32"]
    fast_model = prepare_module(models.get("plain", True, True, True), device, True, True)  # compiled graphs reused
    with torch.no_grad():
        fast_model.load_state_dict(model.state_dict())
    compiled = torch.compile(fast_model, backend=cfg.compile_backend)
    attack = GraphedAttack() if device.type == "cuda" else GraphedAttack(graph_factory=_EagerReplay)
    out["pgd20_fixed_model_fp32_attack"] = out["pgd20_fp32"]
    out["pgd20_fixed_model_fast_attack"] = robust_accuracy(
        model,
        test_images,
        test_labels,
        device,
        cfg.batch_size,
        20,
        attack=attack,
        attack_net=compiled,
        channels_last=True,
    )
    n = len(test_labels)
    p = out["pgd20_fp32"]
    out["binomial_se_of_difference"] = math.sqrt(2 * max(p * (1 - p), 1e-4) / n)
    out["examples"], out["steps"] = n, cfg.robust_steps
    return out


# ------------------------------------------------------------------------------------------------ checks
def check_mask(cfg, models: Models) -> List[str]:
    """The mask: exact beyond 2**24 entries; no host synchronisation in it (CUDA)."""
    device, lines = cfg.device, []
    big = torch.rand(cfg.check_entries, generator=torch.Generator().manual_seed(0))
    expected = float(np.quantile(big.numpy().astype(np.float64), 0.3))
    got = float(quantile_threshold(big.to(device), 0.3))
    lines.append(
        f"CHECK quantile of {big.numel()} entries on {device.type}: {got:.9f} vs numpy {expected:.9f} -> "
        f"{'matches (|difference| <= 1e-6)' if abs(got - expected) <= 1e-6 else 'MISMATCH'}"
    )
    if device.type == "cuda":
        params = list(build_model(cfg).to(device).parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        with SyncCounter(device) as counter:
            mask_gradients_(params, 0.3)
        lines.append(f"CHECK host synchronisations in mask_gradients_: {counter.report()['count']}")
    return lines


def check_attack_syncs(cfg, models: Models) -> List[str]:
    """Host synchronisations inside one eager fp32 attack and one bf16 attack (CUDA sync debug mode)."""
    device = cfg.device
    model = build_model(cfg).to(device)
    x = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    lines = []
    for label, context in (
        ("fp32", contextlib.nullcontext()),
        ("bf16", torch.autocast(device.type, dtype=torch.bfloat16)),
    ):
        with context:
            pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=2, loss="kl", init="normal")  # warm-up
            with SyncCounter(device) as counter:
                pgd(model, x, y, eps=8 / 255, step_size=2 / 255, steps=cfg.attack_steps, loss="kl", init="normal")
        report = counter.report()
        lines.append(
            f"CHECK host synchronisations inside a {label} PGD-{cfg.attack_steps} KL attack: "
            f"{report['count'] if report['measured'] else 'n/a off CUDA'} {report['where'] or ''}"
        )
    return lines


def check_graph_attack(cfg, models: Models) -> List[str]:
    """The CUDA-graph attack against the eager attack from the same start: fp32 eager model, and the preset's module
    (bf16 autocast wrapper, channels_last, compiled). Off CUDA the graph is the eager stand-in."""
    device, lines = cfg.device, []
    x = torch.rand(
        cfg.batch_size,
        3,
        cfg.image_size,
        cfg.image_size,
        device=device,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    y = torch.randint(0, 10, (cfg.batch_size,), device=device, generator=torch.Generator(device=device).manual_seed(1))
    eager_model = build_model(cfg).to(device)
    fast_model = prepare_module(models.get("plain", True, True, True), device, True, True)  # compiled graphs reused
    cases = (
        ("fp32 eager", eager_model, x),
        (
            "bf16+channels_last+compiled",
            torch.compile(fast_model, backend=cfg.compile_backend),
            x.contiguous(memory_format=torch.channels_last),
        ),
    )
    for label, net, xi in cases:
        attack = GraphedAttack() if device.type == "cuda" else GraphedAttack(graph_factory=_EagerReplay)
        kwargs = dict(eps=8 / 255, step_size=2 / 255, steps=cfg.attack_steps, loss="kl", init="normal")
        for seed in (0, 1):  # the second call replays the graph
            expected = pgd(net, xi, y, generator=torch.Generator(device=device).manual_seed(seed), **kwargs)
            got = attack(net, xi, y, generator=torch.Generator(device=device).manual_seed(seed), **kwargs)
        same = (got == expected).float().mean().item()
        lines.append(
            f"CHECK CUDA-graph attack vs eager ({label}, PGD-{cfg.attack_steps} KL): {same:.2%} of pixels "
            f"identical, max |difference| {(got - expected).abs().max().item():.4f} (2 steps = {4 / 255:.4f}); "
            f"replays {attack.replays}, eager calls {attack.eager_calls}"
        )
    return lines


def conv_microbench(cfg) -> List[str]:
    """One 3x3 convolution of the first ResNet stage (and of the last), forward + input backward, per dtype, memory
    format and cudnn.benchmark: is cuDNN's bf16 path itself slow here?"""
    device = cfg.device
    if device.type != "cuda":
        return ["CONV microbenchmark: CUDA only"]
    # (only cuDNN's TF32 flag: reading the legacy matmul flag raises when the new fp32_precision API was used)
    lines = [f"CONV cudnn {torch.backends.cudnn.version()}, allow_tf32 conv={torch.backends.cudnn.allow_tf32}"]
    saved = torch.backends.cudnn.benchmark
    for channels, size in ((64, cfg.image_size), (512, max(1, cfg.image_size // 8))):
        row = []
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for dtype in (torch.float32, torch.bfloat16):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    x = torch.randn(cfg.batch_size, channels, size, size, device=device, dtype=dtype)
                    x = x.contiguous(memory_format=fmt).requires_grad_(True)
                    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device, dtype)
                    conv = conv.to(memory_format=fmt).requires_grad_(False)
                    for _ in range(3):
                        torch.autograd.grad(conv(x).sum(), x)
                    sync(device)
                    start = time.perf_counter()
                    for _ in range(20):
                        torch.autograd.grad(conv(x).sum(), x)
                    sync(device)
                    ms = (time.perf_counter() - start) / 20 * 1e3
                    row.append(
                        f"{'bench' if benchmark else 'heur'}/{str(dtype)[6:]}/"
                        f"{'NHWC' if fmt is torch.channels_last else 'NCHW'} {ms:.3f}"
                    )
        lines.append(f"CONV {channels}ch {size}x{size} b{cfg.batch_size} fwd+dgrad ms: " + ", ".join(row))
    torch.backends.cudnn.benchmark = saved
    return lines


def host_overhead(cfg) -> List[str]:
    """Forward + input-gradient of the model at batch 2 (the device's work is negligible there): the host's cost per
    pass, fp32 vs bf16 autocast vs channels_last: does autocast add host time?"""
    device = cfg.device
    lines = []
    model = build_model(cfg).to(device).eval().requires_grad_(False)
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size, device=device)
    for label, bf16, cl in (("fp32", False, False), ("bf16", True, False), ("bf16+channels_last", True, True)):
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        if cl:
            model.to(memory_format=torch.channels_last)
        context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with context:
            for _ in range(3):
                torch.autograd.grad(model(xi.requires_grad_(True)).float().sum(), xi)
            sync(device)
            start = time.perf_counter()
            for _ in range(10):
                torch.autograd.grad(model(xi.requires_grad_(True)).float().sum(), xi)
            sync(device)
        lines.append(f"{label} {(time.perf_counter() - start) / 10 * 1e3:.2f} ms")
    return ["HOST forward+input-backward at batch 2 (host-bound): " + ", ".join(lines)]


# ------------------------------------------------------------------------------------------------ driver
def check_budget(cfg, reserve: float = 0.0) -> None:
    if time.perf_counter() - cfg.started + reserve > cfg.time_budget_s:
        raise BudgetExceeded()


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="cifar_resnet18", help="timm or cure_hf name (test_resnet for dry runs)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vit-patch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not timed (>= 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--methods", default="cure,trades,pgd,clean")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {list(CONFIGS)}")
    parser.add_argument(
        "--trainer-configs",
        default="fp32,fast,bf16,bf16_cl,compile,graphs",
        help="configurations also run in CURETrainer (CURE in all of them; other methods in fp32 and fast)",
    )
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager makes a CPU dry run fast")
    parser.add_argument(
        "--base-workers", type=int, default=4, help="data-loader workers of the DataLoader configurations"
    )
    parser.add_argument("--epoch-examples", type=int, default=50000, help="examples per epoch (CIFAR-10: 50000)")
    parser.add_argument(
        "--robust-steps", type=int, default=60, help="CURE steps of the robust-accuracy check (0: skip)"
    )
    parser.add_argument("--robust-eval", type=int, default=1024, help="held-out examples of the robust-accuracy check")
    parser.add_argument("--robust-model", default=None, help="model of the robust-accuracy check (default: --model)")
    parser.add_argument(
        "--robust-method",
        default="trades",
        help="method of the robust-accuracy check (CURE is a fine-tuning method: from a random init "
        "its consistency term pulls towards that init, and a short run stays at chance)",
    )
    parser.add_argument("--profile-dir", default=None, help="write profiles.txt (+ trace.json.gz) here")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--trace-config", default="bf16", help="configuration whose plain CURE step is traced")
    parser.add_argument("--check-entries", type=int, default=2**24 + 7)
    parser.add_argument("--time-budget-s", type=float, default=1e9, help="skip the remaining jobs after this")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write every number to this JSON file (after every job)")
    cfg = parser.parse_args(argv)
    cfg.device = torch.device(cfg.device)
    cfg.robust_model = cfg.robust_model or cfg.model
    cfg.started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    methods = [m for m in METHOD_ORDER if m in cfg.methods.split(",")]
    configs = [c.strip() for c in cfg.configs.split(",") if c.strip()]
    trainer_configs = [c.strip() for c in cfg.trainer_configs.split(",") if c.strip()]
    unknown = [m for m in cfg.methods.split(",") if m not in METHODS] + [
        c for c in configs + trainer_configs if c not in CONFIGS
    ]
    unknown += [f"{c} (plain loop only)" for c in trainer_configs if c in CAPTURED]
    if unknown or cfg.warmup < 1 or cfg.steps < 1 or "fp32" not in configs:
        parser.error(f"unknown methods/configs {unknown}; --warmup/--steps >= 1; configs must include fp32")
    if cfg.profile_dir:
        os.makedirs(cfg.profile_dir, exist_ok=True)
    # Every model family adds its graphs to the same code objects: let them all stay compiled (never fall back to eager).
    for name, value in (
        ("recompile_limit", 64),
        ("cache_size_limit", 64),
        ("accumulated_recompile_limit", 512),
        ("accumulated_cache_size_limit", 512),
    ):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(torch._dynamo.config, name, max(value, getattr(torch._dynamo.config, name)))
    steps_per_epoch = math.ceil(cfg.epoch_examples / cfg.batch_size)
    models = Models(cfg)
    profiles = Profiles(cfg)
    results: Dict[str, Any] = OrderedDict(
        plain=defaultdict(dict), trainer=defaultdict(dict), peak_mib=defaultdict(dict)
    )
    done, skipped, failed = [], [], []
    device_name = (
        torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    )
    import transformers

    header = (
        f"# bench_step: model={cfg.model} ({parameter_count(build_model(cfg)) / 1e6:.2f}M parameters), input 3x"
        f"{cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, PGD-{cfg.attack_steps}, device {device_name}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; {cfg.warmup} warm-up + {cfg.steps} "
        f"timed steps per run; compile backend {cfg.compile_backend}; time budget {cfg.time_budget_s:.0f} s"
    )
    print(header, flush=True)

    def plain_job(method, config, profile_name=None, trace=False):
        def job():
            profile = profiles(f"plain {config} {method}", trace) if profile_name else None
            r = run_plain(cfg, models, method, config, profile=profile)
            results["plain"][config][method] = r["step_s"]
            results["peak_mib"][config][method] = r["peak_mib"]
            if "graph_replays" in r:
                results.setdefault("graph_use", {})[f"{config} {method}"] = (r["graph_replays"], r["graph_eager_calls"])
            return f"plain {config:<14} {method:<6} {r['step_s'] * 1e3:9.2f} ms/step"

        return (f"plain {config} {method}" + (" +profile" if profile_name else ""), job)

    def trainer_job(method, config, profile_name=None, count_syncs=False):
        def job():
            profile = profiles(f"trainer {config} {method}") if profile_name else None
            r = run_trainer(cfg, models, method, config, profile=profile, count_syncs=count_syncs)
            results["trainer"][config][method] = r["step_s"]
            if r.get("syncs") is not None:
                results.setdefault("trainer_syncs", {})[f"{config} {method}"] = r["syncs"]
            return f"trainer {config:<12} {method:<6} {r['step_s'] * 1e3:9.2f} ms/step"

        return (f"trainer {config} {method}" + (" +profile" if profile_name else ""), job)

    def checks_job(name, fn):
        def job():
            lines = fn()
            results.setdefault("checks", []).extend(lines)
            return "\n".join(lines)

        return (name, job)

    def robustness_job():
        def job():
            if cfg.robust_model == cfg.model:
                results["robustness"] = run_robustness(cfg, models, results)
            else:  # a model that learns the synthetic task within --robust-steps (a ResNet-18 from scratch does not)
                robust_cfg = argparse.Namespace(**{**vars(cfg), "model": cfg.robust_model})
                results["robustness"] = run_robustness(robust_cfg, Models(robust_cfg), results)
                results["robustness"]["model"] = cfg.robust_model
            return "robust accuracy measured"

        return ("robust accuracy fp32 vs fast", job)

    def breakdown_job(config):
        def job():
            parts = run_plain(cfg, models, "cure", config, breakdown=True)["parts_s"]
            results.setdefault("cure_parts_s", {})[config] = parts
            return f"parts of a CURE step ({config}) timed"

        return (f"parts of a CURE step {config}", job)

    # Jobs in order of importance: a budget cut drops the tail. The CURE runs of fp32 and the preset carry their
    # profiles (and the trainer's a count of host synchronisations per step) after their timed steps.
    jobs: List[Tuple[str, Callable]] = []
    has = lambda c: c in configs  # noqa: E731
    cure = "cure" in methods
    others = [m for m in methods if m != "cure"]
    if cure:
        for config in ("fp32", "fast"):
            if has(config):
                jobs += [
                    trainer_job("cure", config, profile_name=True, count_syncs=True),
                    plain_job("cure", config, profile_name=True, trace=cfg.trace_config == config),
                ]
        # the ladder, plain loop: which step buys what (and the CUDA-graph attack without compile)
        jobs += [
            plain_job("cure", c, profile_name=True, trace=cfg.trace_config == c)
            for c in ("bf16", "bf16_cl", "compile", "graphs", "fp32_graphs", "bf16_cl_graphs", "captured")
            if has(c)
        ]
        if cfg.robust_steps > 0 and has("fast"):
            jobs.append(robustness_job())
    for method in others:
        for config in ("fp32", "fast"):
            if has(config):
                if config in trainer_configs:
                    jobs.append(trainer_job(method, config))
                jobs.append(plain_job(method, config))
    if cure:
        jobs += [
            checks_job("CUDA-graph attack vs eager", lambda: check_graph_attack(cfg, models)),
            checks_job("attack synchronisations", lambda: check_attack_syncs(cfg, models)),
            checks_job("conv microbenchmark", lambda: conv_microbench(cfg)),
            checks_job("host overhead", lambda: host_overhead(cfg)),
        ]
        jobs += [
            trainer_job("cure", c) for c in ("bf16", "bf16_cl", "compile", "graphs") if has(c) and c in trainer_configs
        ]
    for method in others:
        jobs += [plain_job(method, c) for c in ("bf16", "bf16_cl", "compile", "graphs") if has(c)]
    if cure:
        jobs += [breakdown_job("fp32")] + ([breakdown_job("fast")] if has("fast") else [])
    jobs += [checks_job("mask checks", lambda: check_mask(cfg, models))]

    run_jobs(cfg, jobs, results, done, skipped, failed)
    report(cfg, results, methods, configs, steps_per_epoch, profiles, done, skipped, failed, header)
    if cfg.json:
        write_json(cfg, results, done, skipped, failed)
    return results


def run_jobs(cfg, jobs: List[Tuple[str, Callable]], results, done: List[str], skipped: List[str], failed: List[str]):
    """Run ``jobs`` ([(name, job)], a job returning a message or None) in order: none starts after
    ``cfg.time_budget_s`` (skipped, as is a job that raises BudgetExceeded); a failing job prints its traceback and
    the run goes on; a SIGTERM ends the job running and skips the rest; every number goes to ``cfg.json`` (when
    set) after every job."""

    def on_interrupt(signum, frame):
        raise KeyboardInterrupt()

    with contextlib.suppress(ValueError):  # not in the main thread (tests): no handler
        signal.signal(signal.SIGTERM, on_interrupt)
    interrupted = False
    for name, job in jobs:
        if interrupted or time.perf_counter() - cfg.started > cfg.time_budget_s:
            skipped.append(name)
            continue
        started = time.perf_counter()
        try:
            message = job() or f"{name} done"
            done.append(name)
            print(
                f"[{time.perf_counter() - cfg.started:6.0f} s] {message}  ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        except BudgetExceeded:
            skipped.append(name)
        except KeyboardInterrupt:
            print(
                f"[{time.perf_counter() - cfg.started:6.0f} s] interrupted during {name}: reporting what is done",
                flush=True,
            )
            failed.append(f"{name} (interrupted)")
            interrupted = True
        except Exception:
            failed.append(name)
            print(f"[{time.perf_counter() - cfg.started:6.0f} s] FAILED {name}:\n{traceback.format_exc()}", flush=True)
            with contextlib.suppress(Exception):
                release(cfg.device)
        finally:
            if cfg.json:
                write_json(cfg, results, done, skipped, failed)


def print_jobs(cfg, done: List[str], skipped: List[str], failed: List[str]) -> None:
    """How many jobs ran, and which did not (their names)."""
    print(
        f"\n## jobs: {len(done)} done, {len(skipped)} skipped, {len(failed)} failed, "
        f"{time.perf_counter() - cfg.started:.0f} s in all"
    )
    if skipped:
        print("SKIPPED (time budget): " + "; ".join(skipped))
    if failed:
        print("FAILED (tracebacks above): " + "; ".join(failed))


def write_json(cfg, results, done, skipped, failed) -> None:
    payload = {"config": {k: str(v) for k, v in vars(cfg).items()}, "done": done, "skipped": skipped, "failed": failed}
    payload.update(json.loads(json.dumps(results, default=str)))
    with open(cfg.json, "w") as f:
        json.dump(payload, f, indent=1)


def report(cfg, results, methods, configs, steps_per_epoch, profiles, done, skipped, failed, header) -> None:
    plain, trainer, peak = results["plain"], results["trainer"], results["peak_mib"]
    print("\n" + "=" * 100 + "\n" + header)
    print(
        f"\n## seconds per step and per CIFAR-10 epoch ({cfg.epoch_examples} examples = {steps_per_epoch} steps), "
        "ratio to fp32 (plain loop; trainer in brackets), trainer overhead over the plain loop, peak memory"
    )
    print(
        f"{'method':<7}{'config':<15}{'trainer ms':>11}{'plain ms':>10}{'s/epoch':>9}{'vs fp32':>16}{'overhead':>10}"
        f"{'peak MiB':>10}"
    )
    epoch = {}
    for method in methods:
        for config in configs:
            t, p = trainer.get(config, {}).get(method), plain.get(config, {}).get(method)
            if t is None and p is None:
                continue
            base_t, base_p = trainer.get("fp32", {}).get(method), plain.get("fp32", {}).get(method)
            seconds = (t if t is not None else p) * steps_per_epoch
            epoch[(method, config)] = seconds
            ratio = f"{base_p / p:.2f}x" if p and base_p else "-"
            ratio += f" ({base_t / t:.2f}x)" if t and base_t else ""
            overhead = f"{t / p - 1:+.1%}" if t and p else "-"
            mem = peak.get(config, {}).get(method)
            print(
                f"{method:<7}{config:<15}{_ms(t):>11}{_ms(p):>10}{seconds:>9.1f}{ratio:>16}{overhead:>10}"
                f"{(f'{mem:.0f}' if mem else '-'):>10}"
            )
    results["seconds_per_epoch"] = {f"{m} {c}": s for (m, c), s in epoch.items()}
    if profiles.one_line:
        print("\n## profiles (details in profiles.txt)")
        for name, line in profiles.one_line.items():
            print(f"PROFILE {name:<28} {line}")
    for name, syncs in results.get("trainer_syncs", {}).items():
        print(
            f"SYNC trainer {name}: {syncs['count'] if syncs['measured'] else 'n/a off CUDA'} host synchronisations in "
            f"one step {syncs['where'] or ''}"
        )
    if results.get("graph_use"):
        print(
            "GRAPHS (replays, eager calls) per run: " + ", ".join(f"{k}: {v}" for k, v in results["graph_use"].items())
        )
    for config, parts in results.get("cure_parts_s", {}).items():
        total = sum(parts.values())
        print(
            f"\n## one CURE step part by part ({config}, plain loop, synchronised around each part): "
            + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in parts.items())
            + f"; sum {total * 1e3:.2f} ms"
        )
    for line in results.get("checks", []):
        print(line)
    robust = results.get("robustness")
    if robust:
        print(
            f"\n## robust accuracy (fp32 PGD-20 on {robust['examples']} held-out synthetic examples, "
            f"{robust.get('model', cfg.model)}, {cfg.robust_method} {robust['steps']} steps from one init)"
        )
        for key, value in robust.items():
            if key.startswith("pgd20") or key.startswith("clean"):
                print(f"{key:<34} {value:.4f}")
    print_jobs(cfg, done, skipped, failed)

    print("\n## ratios and targets")
    for method in methods:
        base, base_t = plain.get("fp32", {}).get(method), trainer.get("fp32", {}).get(method)
        plain_ratios = [
            f"{c} {base / plain[c][method]:.2f}x"
            for c in configs
            if c != "fp32" and base and plain.get(c, {}).get(method)
        ]
        trainer_ratios = [
            f"{c} {base_t / trainer[c][method]:.2f}x"
            for c in configs
            if c != "fp32" and base_t and trainer.get(c, {}).get(method)
        ]
        if plain_ratios or trainer_ratios:
            print(
                f"RATIO speedup_vs_fp32[{method}] = plain: {', '.join(plain_ratios) or '-'}; trainer: "
                f"{', '.join(trainer_ratios) or '-'}"
            )
    fast_cure = trainer.get("fast", {}).get("cure")
    if fast_cure:
        seconds = fast_cure * steps_per_epoch
        print(
            f"TARGET cure_epoch_fast = {seconds:.1f} s (trainer, speed_preset='fast') (target <= "
            f"{TARGETS['cure_epoch_fast_s']:.0f} s on an H100: {verdict(seconds <= TARGETS['cure_epoch_fast_s'])})"
        )
    for config in ("bf16", "bf16_cl"):
        p, base = plain.get(config, {}).get("cure"), plain.get("fp32", {}).get("cure")
        if p and base:
            print(
                f"TARGET bf16_speedup[{config}] = {base / p:.2f}x (plain CURE, eager) (target >= "
                f"{TARGETS['bf16_speedup']}x: {verdict(base / p >= TARGETS['bf16_speedup'])})"
            )
    p, base = plain.get("bf16_cl_graphs", {}).get("cure"), plain.get("fp32_graphs", {}).get("cure")
    if p and base:
        print(
            f"TARGET bf16_speedup[with CUDA-graph attack] = {base / p:.2f}x (plain CURE, bf16_cl_graphs vs fp32_graphs)"
            f" (target >= {TARGETS['bf16_speedup']}x: {verdict(base / p >= TARGETS['bf16_speedup'])})"
        )
    for config in ("fp32", "fast"):
        for method in methods:
            t, p = trainer.get(config, {}).get(method), plain.get(config, {}).get(method)
            if t and p:
                print(
                    f"TARGET trainer_overhead[{method} {config}] = {t / p - 1:+.1%} (target <= "
                    f"{TARGETS['trainer_overhead']:.0%}: {verdict(t / p - 1 <= TARGETS['trainer_overhead'])})"
                )
    for config in ("fp32", "fast"):
        c, t = trainer.get(config, {}).get("cure"), trainer.get(config, {}).get("trades")
        if c and t:
            print(
                f"RATIO cure_vs_trades[{config}] = {c / t:.3f}x (trainer) (target <= {TARGETS['cure_vs_trades']:.2f}x: "
                f"{verdict(c / t <= TARGETS['cure_vs_trades'])})"
            )
    for config, parts in results.get("cure_parts_s", {}).items():
        share = (parts.get("mask", 0.0) + parts.get("revision update", 0.0)) / max(sum(parts.values()), 1e-12)
        print(
            f"RATIO mask_revision_share[{config}] = {share:.2%} (target <= {TARGETS['mask_revision_share']:.0%}: "
            f"{verdict(share <= TARGETS['mask_revision_share'])})"
        )
    for config in ("fp32", "fast"):
        c, t = peak.get(config, {}).get("cure"), peak.get(config, {}).get("trades")
        if c and t:
            print(f"RATIO peak_memory_cure_vs_trades[{config}] = {c / t:.3f}x ({c:.0f} / {t:.0f} MiB)")
    if robust:
        noise = max(
            2 * robust["binomial_se_of_difference"],
            abs(robust["pgd20_fp32"] - robust.get("pgd20_fp32_seed1", robust["pgd20_fp32"])),
        )
        diff = robust["pgd20_fast"] - robust["pgd20_fp32"]
        print(
            f"TARGET robust_accuracy[training] = fast {robust['pgd20_fast']:.4f} vs fp32 {robust['pgd20_fp32']:.4f} "
            f"(difference {diff:+.4f}; noise {noise:.4f} = max(2 binomial SE, |fp32 seed 0 - seed 1|)) "
            f"(target: |difference| <= noise: {verdict(abs(diff) <= noise)})"
        )
        diff = robust["pgd20_fixed_model_fast_attack"] - robust["pgd20_fixed_model_fp32_attack"]
        se = 2 * robust["binomial_se_of_difference"]
        print(
            f"TARGET robust_accuracy[one model, fast vs fp32 PGD-20] = {robust['pgd20_fixed_model_fast_attack']:.4f} vs "
            f"{robust['pgd20_fixed_model_fp32_attack']:.4f} (difference {diff:+.4f}; target |difference| <= {se:.4f}: "
            f"{verdict(abs(diff) <= se)})"
        )


def _ms(seconds: Optional[float]) -> str:
    return f"{seconds * 1e3:.2f}" if seconds else "-"


if __name__ == "__main__":
    main()
