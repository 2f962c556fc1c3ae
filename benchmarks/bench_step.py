"""Put numbers on every part of an adversarial-training step, in one run, on one model and one data set.

It measures, for the same model, data and batch size:
1. steps per second of each method inside ``CURETrainer`` (the trainer as users run it);
2. the same work in a minimal plain-PyTorch loop (DataLoader, SGD, the same attack/loss/mask/revision functions);
3. the time of each part of a CURE step (attack, forward passes, revision forward, backward, mask, optimizer,
   revision update), each part timed between device synchronisations;
4. the peak memory of a CURE step relative to a TRADES step;
5. the effect of the speed options (channels_last, bf16, torch.compile, data loader workers, and an attack that
   reuses the clean forward where the model allows it);
6. that the prominence mask makes no host synchronisation (on CUDA) and is exact beyond 2**24 entries.

Lines starting with ``RATIO`` compare against the targets of issue 7 and say whether each is met.

    python benchmarks/bench_step.py                       # CPU: timm resnet18 at 32x32, few steps
    python benchmarks/bench_step.py --device cuda --model cifar_resnet18 --batch-size 128 --steps 20 \\
        --options channels_last,bf16,bf16_channels_last,compile,workers,reuse
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
import weakref
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cure_hf.attacks import logits_of, pgd  # noqa: E402
from cure_hf.data import collate_pixels  # noqa: E402
from cure_hf.methods import METHODS, method_loss  # noqa: E402
from cure_hf.models import create_model, head_parameter_names  # noqa: E402
from cure_hf.prominence import mask_gradients_, quantile_threshold  # noqa: E402
from cure_hf.revision import RevisionModel  # noqa: E402

TARGETS = {"trainer_overhead": 0.05, "cure_vs_trades": 1.10, "mask_revision_share": 0.02}
ALL_OPTIONS = ("channels_last", "bf16", "bf16_channels_last", "compile", "workers", "reuse")


# ------------------------------------------------------------------------------------------------ setup
class SyntheticCifar(Dataset):
    """CIFAR-10-shaped uint8 images (HWC) with the usual pad-4 random crop and flip, done per example as a real
    input pipeline does, so data-loader workers have the same kind of work as on CIFAR-10."""

    def __init__(self, size: int, image_size: int = 32, num_classes: int = 10, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (size, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        image = self.images[index].permute(2, 0, 1).float().div_(255.0)
        size = image.shape[-1]
        padded = F.pad(image, (4, 4, 4, 4))
        top, left = torch.randint(0, 9, (2,)).tolist()
        image = padded[:, top:top + size, left:left + size]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return {"pixel_values": image.contiguous(), "labels": int(self.labels[index])}


def build_model(name: str, image_size: int, vit_patch: int, seed: int = 0) -> torch.nn.Module:
    """A model taking pixels in [0, 1]; ``cifar_*`` names come from cure_hf's CIFAR registry when it is there."""
    with contextlib.suppress(ImportError):
        import cure_hf.cifar_models  # noqa: F401  registers cifar_resnet18 & co. in timm
    torch.manual_seed(seed)
    kwargs = {"image_size": image_size, "patch_size": vit_patch} if "vit" in name else {}
    return create_model(name, 10, **kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device, workers: int) -> None:
    """Free what a finished configuration left behind (loader worker processes, cached blocks) before the next."""
    if device.type == "cuda" or workers > 0:  # a full collection costs seconds on a busy CPU: only when needed
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ plain loop
class PlainStep:
    """One training step of ``method`` written as a minimal PyTorch loop, from the same pure functions the
    trainer uses (attacks, method losses, prominence mask, revision model), with every part timed on demand."""

    def __init__(self, model, method: str, device, *, attack_steps: int, bf16: bool, channels_last: bool,
                 compile_model: bool, reuse_clean: bool = False, conservation: str = "soft"):
        self.device, self.method, self.spec = device, method, METHODS[method]
        self.bf16, self.channels_last, self.reuse_clean = bf16, channels_last, reuse_clean
        self.attack_steps, self.conservation = attack_steps, conservation
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.module = model
        self.model = torch.compile(model) if compile_model else model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        heads = head_parameter_names(model)
        self.maskable = [p for n, p in model.named_parameters() if n not in heads]
        self.revision = RevisionModel(model, seed=0) if self.spec.uses_revision else None
        self.times: Dict[str, float] = defaultdict(float)

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
        model.train()
        z_nat = None
        if self.reuse_clean:
            with self.part("forward f (clean, adv)", timed), autocast(self.device, self.bf16):
                z_nat = logits_of(model(x))
        x_adv = None
        if spec.attack:
            with self.part("attack", timed), autocast(self.device, self.bf16):
                loss_name = "kl" if spec.attack == "pgd_kl" else "ce"
                steps, step_size = (1, 1.25 * 8 / 255) if spec.attack == "fgsm_rs" else (self.attack_steps, 2 / 255)
                clean = None if z_nat is None else z_nat.detach()
                x_adv = pgd(model, x, labels, eps=8 / 255, step_size=step_size, steps=steps, loss=loss_name,
                            init=spec.attack_init, clean_logits=clean)
        with self.part("forward f (clean, adv)", timed), autocast(self.device, self.bf16):
            if z_nat is None and spec.uses_clean_pass:
                z_nat = logits_of(model(x))
            z_adv = logits_of(model(x_adv)) if x_adv is not None else None
        r_nat = r_adv = None
        if spec.uses_revision:
            with self.part("forward g (revision)", timed), autocast(self.device, self.bf16):
                r_nat, r_adv = logits_of(self.revision(x)), logits_of(self.revision(x_adv))
        with self.part("loss", timed):
            loss, _ = method_loss(self.method, labels, z_nat=z_nat, z_adv=z_adv, r_nat=r_nat, r_adv=r_adv)
        with self.part("backward", timed):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if spec.uses_revision:
            with self.part("mask", timed):
                conserved = []
                on_mask = None
                if self.conservation == "hard":
                    on_mask = lambda p, m: conserved.append((p, torch.where(m, p.detach(), float("nan"))))  # noqa: E731
                mask_gradients_(self.maskable, 0.3, on_mask=on_mask)
        with self.part("optimizer", timed):
            self.optimizer.step()
        if spec.uses_revision:
            with self.part("revision update", timed), torch.no_grad():
                for p, saved in conserved:
                    p.copy_(torch.where(saved.isnan(), p, saved))
                self.revision.step_(self.module)


def loader_for(dataset, batch_size: int, workers: int, device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_pixels,
                      pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False)


def run_plain(cfg, method: str, *, model_name=None, bf16=False, channels_last=False, compile_model=False,
              workers=None, reuse_clean=False, breakdown=False) -> Dict[str, object]:
    """Seconds per step of the plain loop (warm-up excluded); with ``breakdown``, seconds per step of each part."""
    device = cfg.device
    workers = cfg.base_workers if workers is None else workers
    model = build_model(model_name or cfg.model, cfg.image_size, cfg.vit_patch)
    step = PlainStep(model, method, device, attack_steps=cfg.attack_steps, bf16=bf16, channels_last=channels_last,
                     compile_model=compile_model, reuse_clean=reuse_clean)
    dataset = SyntheticCifar(cfg.batch_size * (cfg.warmup + cfg.steps), cfg.image_size)
    stamps = []
    for i, batch in enumerate(loader_for(dataset, cfg.batch_size, workers, device)):
        if i == cfg.warmup:
            step.times.clear()
        step(batch, timed=breakdown and i >= cfg.warmup)
        sync(device)
        stamps.append(time.perf_counter())
    per_step = float(np.median(np.diff(stamps[cfg.warmup - 1:])))
    parts = {k: v / cfg.steps for k, v in step.times.items()}
    del step
    release(device, workers)
    return {"step_s": per_step, "parts_s": parts}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage on the CPU, where PyTorch keeps no allocator statistics: every storage an
    operator returns is counted until it is freed; tensors that existed before are registered with ``track``."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: Dict[int, int] = {}

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)

    def track(self, tensors) -> None:
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(tree_leaves(out))
        return out


def peak_step_memory(cfg, method: str) -> Dict[str, float]:
    """Peak memory of one step after a warm-up step, everything live counted: model, gradients, optimizer state,
    revision copy, activations, scratch. CUDA: the caching allocator's peak; CPU: ``LiveTensorBytes``. The attack
    runs one step here: its graph is freed after every step, so more steps change the time, not the peak."""
    device = cfg.device
    model = build_model(cfg.model, cfg.image_size, cfg.vit_patch)
    step = PlainStep(model, method, device, attack_steps=1, bf16=False, channels_last=False, compile_model=False)
    dataset = SyntheticCifar(cfg.batch_size * 2, cfg.image_size)
    batches = list(loader_for(dataset, cfg.batch_size, 0, device))
    step(batches[0])
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batches[1])
        sync(device)
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    tracker = LiveTensorBytes()
    modules = [step.module] + ([step.revision.module] if step.revision else [])
    tracker.track(t for m in modules for t in list(m.parameters()) + list(m.buffers()))
    tracker.track(p.grad for p in step.module.parameters())
    tracker.track(t for state in step.optimizer.state.values() for t in state.values())
    with tracker:
        step(batches[1])
    return {"peak_mib": tracker.peak / 2**20}


# ---------------------------------------------------------------------------------------------- trainer
def run_trainer(cfg, method: str, *, model_name=None, bf16=False, channels_last=False, compile_model=False,
                workers=None, reuse_clean=False) -> Dict[str, object]:
    """Seconds per step of ``CURETrainer.train()`` (warm-up excluded), from one timestamp per optimizer step."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from cure_hf import CURETrainer, CURETrainingArguments

    device = cfg.device
    workers = cfg.base_workers if workers is None else workers

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps: List[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.stamps.append(time.perf_counter())

    model = build_model(model_name or cfg.model, cfg.image_size, cfg.vit_patch)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = CURETrainingArguments(
            output_dir=out, adv_method=method, max_steps=cfg.warmup + cfg.steps,
            per_device_train_batch_size=cfg.batch_size, attack_steps=cfg.attack_steps, seed=0,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=device.type == "cpu", bf16=bf16, torch_compile=compile_model, channels_last=channels_last,
            dataloader_num_workers=workers, dataloader_pin_memory=device.type == "cuda", dataloader_drop_last=True,
            attack_reuse_clean_logits=reuse_clean,
        )
        trainer = CURETrainer(model, args, train_dataset=SyntheticCifar(cfg.batch_size * (cfg.warmup + cfg.steps),
                                                                         cfg.image_size), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # keep the benchmark's output to its own table
        trainer.train()
        del trainer
    release(device, workers)
    return {"step_s": float(np.median(np.diff(timer.stamps[cfg.warmup - 1:])))}


# ---------------------------------------------------------------------------------------------- checks
def check_mask(cfg) -> List[str]:
    """The mask on the device: no host synchronisation (CUDA sync debug mode), exact beyond 2**24 entries."""
    device, lines = cfg.device, []
    big = torch.rand(cfg.check_entries, generator=torch.Generator().manual_seed(0))
    expected = float(np.quantile(big.numpy().astype(np.float64), 0.3))
    got = float(quantile_threshold(big.to(device), 0.3))
    ok = abs(got - expected) <= 1e-6
    lines.append(f"CHECK quantile of {big.numel()} entries on {device.type}: {got:.9f} vs numpy "
                 f"{expected:.9f} -> {'matches (|difference| <= 1e-6)' if ok else 'MISMATCH'}")
    if device.type == "cuda":
        model = build_model(cfg.model, cfg.image_size, cfg.vit_patch).to(device)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        sync(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            conserved = []
            mask_gradients_(params, 0.3, on_mask=lambda p, m: conserved.append((p, torch.where(m, p.detach(), float("nan")))))
            for p, saved in conserved:
                p.data.copy_(torch.where(saved.isnan(), p, saved))
            verdict = "none (torch.cuda.set_sync_debug_mode('error') raised nothing)"
        except RuntimeError as error:
            verdict = f"FOUND: {error}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        lines.append(f"CHECK host synchronisations in mask_gradients_ + hard-conservation restore: {verdict}")
    return lines


# ----------------------------------------------------------------------------------------------- report
def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18", help="timm or cure_hf name (cifar_resnet18 on GPU)")
    parser.add_argument("--reuse-model", default=None,
                        help="BatchNorm-free model for the reuse option (default: vit_tiny_patch16_224 on CUDA, "
                             "test_vit on CPU), built for --image-size with patch --vit-patch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vit-patch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not timed (>= 1)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--methods", default="clean,pgd,trades,cure")
    parser.add_argument("--options", default="channels_last,workers,reuse",
                        help=f"comma-separated subset of {ALL_OPTIONS} ('' for none)")
    parser.add_argument("--base-workers", type=int, default=0, help="data-loader workers of every configuration")
    parser.add_argument("--workers", type=int, default=2,
                        help="the 'workers' option runs with this many workers (with 0 if --base-workers > 0)")
    parser.add_argument("--epoch-examples", type=int, default=50000, help="examples per epoch (CIFAR-10: 50000)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory comparison")
    parser.add_argument("--check-entries", type=int, default=2**24 + 7,
                        help="entries of the tensor whose quantile is checked against numpy (default: beyond 2**24)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids thread oversubscription on a shared machine)")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    cfg = parser.parse_args(argv)
    cfg.device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    options = [o.strip() for o in cfg.options.split(",") if o.strip()]
    unknown = [m for m in methods if m not in METHODS] + [o for o in options if o not in ALL_OPTIONS]
    if unknown or cfg.warmup < 1 or cfg.steps < 1:
        parser.error(f"unknown methods/options {unknown} (methods: {sorted(METHODS)}, options: {ALL_OPTIONS}); "
                     "--warmup and --steps must be >= 1")
    for needed in ("trades", "cure"):
        if needed not in methods:
            methods.append(needed)
    reuse_model = cfg.reuse_model or ("vit_tiny_patch16_224" if cfg.device.type == "cuda" else "test_vit")
    steps_per_epoch = math.ceil(cfg.epoch_examples / cfg.batch_size)
    results: Dict[str, object] = OrderedDict()
    started = time.perf_counter()

    probe = build_model(cfg.model, cfg.image_size, cfg.vit_patch)
    device_name = torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"# bench_step: model={cfg.model} ({parameter_count(probe) / 1e6:.2f}M parameters), input 3x{cfg.image_size}x"
          f"{cfg.image_size}, batch {cfg.batch_size}, attack steps {cfg.attack_steps}, device {device_name}, "
          f"torch {torch.__version__}; {cfg.warmup} warm-up + {cfg.steps} timed steps per configuration")
    del probe

    print("\n## steps per second: CURETrainer vs a plain PyTorch loop (same model, data, functions)")
    print(f"{'method':<8} {'trainer s/step':>15} {'plain s/step':>13} {'trainer steps/s':>16} {'overhead':>9} {'s/epoch':>9}")
    trainer_s, plain_s = {}, {}
    for method in methods:
        trainer_s[method] = run_trainer(cfg, method)["step_s"]
        plain_s[method] = run_plain(cfg, method)["step_s"]
        overhead = trainer_s[method] / plain_s[method] - 1
        print(f"{method:<8} {trainer_s[method]:>15.4f} {plain_s[method]:>13.4f} {1 / trainer_s[method]:>16.3f} "
              f"{overhead:>+8.1%} {trainer_s[method] * steps_per_epoch:>9.1f}")
    results["trainer_step_s"], results["plain_step_s"] = trainer_s, plain_s
    results["seconds_per_epoch"] = {m: trainer_s[m] * steps_per_epoch for m in methods}

    print("\n## one CURE step, part by part (plain loop, device synchronised around each part)")
    parts = run_plain(cfg, "cure", breakdown=True)["parts_s"]
    total = sum(parts.values())
    for name, seconds in parts.items():
        print(f"{name:<24} {seconds * 1e3:>10.2f} ms {seconds / total:>7.1%}")
    print(f"{'sum of parts':<24} {total * 1e3:>10.2f} ms")
    results["cure_parts_s"] = parts

    memory = None
    if not cfg.skip_memory:
        print("\n## peak memory of one step (plain loop, fp32)")
        memory = {m: peak_step_memory(cfg, m) for m in ("trades", "cure")}
        for m, v in memory.items():
            print(f"{m:<8} {v['peak_mib']:>10.1f} MiB")
        results["peak_memory"] = memory

    option_rows = OrderedDict()
    if options:
        print("\n## speed options, CURE in CURETrainer (speed-up = baseline s/step / option s/step)")
        print(f"{'option':<40} {'s/step':>9} {'speed-up':>9}")
        baseline = run_trainer(cfg, "cure")["step_s"]  # measured again, next to the options
        print(f"{f'baseline (fp32, NCHW, {cfg.base_workers} workers)':<40} {baseline:>9.4f} {1.0:>8.2f}x")
        option_rows["baseline"] = baseline
        other_workers = cfg.workers if cfg.base_workers == 0 else 0
        settings = {
            "channels_last": dict(channels_last=True),
            "bf16": dict(bf16=True),
            "bf16_channels_last": dict(bf16=True, channels_last=True),
            "compile": dict(compile_model=True, bf16=cfg.device.type == "cuda",
                            channels_last=cfg.device.type == "cuda"),
            "workers": dict(workers=other_workers),
        }
        for option in options:
            if option == "reuse":
                continue
            label = option if option != "workers" else f"dataloader_num_workers={other_workers}"
            if option == "compile":
                label = "torch_compile" + (" + bf16 + channels_last" if cfg.device.type == "cuda" else "")
            seconds = run_trainer(cfg, "cure", **settings[option])["step_s"]
            option_rows[label] = seconds
            print(f"{label:<40} {seconds:>9.4f} {baseline / seconds:>8.2f}x")
        if "reuse" in options:
            base = run_trainer(cfg, "trades", model_name=reuse_model)["step_s"]
            reuse = run_trainer(cfg, "trades", model_name=reuse_model, reuse_clean=True)["step_s"]
            option_rows[f"{reuse_model} trades"] = base
            option_rows[f"{reuse_model} trades attack_reuse_clean_logits"] = reuse
            print(f"{reuse_model + ' trades':<40} {base:>9.4f} {1.0:>8.2f}x")
            print(f"{'  + attack_reuse_clean_logits':<40} {reuse:>9.4f} {base / reuse:>8.2f}x")
        results["options_step_s"] = option_rows

    print("\n## checks")
    for line in check_mask(cfg):
        print(line)

    print("\n## ratios against the targets of issue 7")
    for method in methods:
        overhead = trainer_s[method] / plain_s[method] - 1
        print(f"RATIO trainer_overhead[{method}] = {overhead:+.1%} (target <= {TARGETS['trainer_overhead']:.0%}: "
              f"{verdict(overhead, TARGETS['trainer_overhead'])})")
    cure_vs_trades = trainer_s["cure"] / trainer_s["trades"]
    print(f"RATIO cure_vs_trades = {cure_vs_trades:.3f}x (trainer; plain loop {plain_s['cure'] / plain_s['trades']:.3f}x)"
          f" (target <= {TARGETS['cure_vs_trades']:.2f}x: {verdict(cure_vs_trades, TARGETS['cure_vs_trades'])})")
    share = (parts.get("mask", 0.0) + parts.get("revision update", 0.0)) / total
    print(f"RATIO mask_revision_share = {share:.2%} of a CURE step (mask {parts.get('mask', 0) * 1e3:.2f} ms + revision "
          f"{parts.get('revision update', 0) * 1e3:.2f} ms) (target <= {TARGETS['mask_revision_share']:.0%}: "
          f"{verdict(share, TARGETS['mask_revision_share'])})")
    if memory:
        ratio = memory["cure"]["peak_mib"] / memory["trades"]["peak_mib"]
        print(f"RATIO peak_memory_cure_vs_trades = {ratio:.3f}x ({memory['cure']['peak_mib']:.1f} / "
              f"{memory['trades']['peak_mib']:.1f} MiB)")
        results["peak_memory_cure_vs_trades"] = ratio
    results.update(cure_vs_trades=cure_vs_trades, mask_revision_share=share)
    print(f"\n# total benchmark time {time.perf_counter() - started:.0f} s")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump({"config": {k: str(v) for k, v in vars(cfg).items()}, **results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
