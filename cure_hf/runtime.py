"""Runtime concerns of CURETrainer that are not the algorithm: what parallelism is supported, fp32
evaluation under mixed precision, when the clean logits may be reused by the attack, and keeping
DDP replicas' BatchNorm statistics equal. Pure functions; nothing here knows the Trainer.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .components import runs_clean_pass
from .methods import METHODS, AttackSpec

__all__ = [
    "refuse_unsupported_parallelism",
    "full_precision_forward",
    "check_clean_logits_reusable",
    "check_train_eval_forwards_agree",
    "average_running_stats_",
    "use_available_cpu_threads",
]

# --- distributed / mixed precision ---------------------------------------------------------
_SUPPORTED_PARALLELISM = (
    "one process (CPU or one GPU) or DDP over several GPUs, nodes or CPU processes (accelerate launch or "
    "torchrun; configs in recipes/accelerate_configs/), in fp32, bf16 or fp16, with gradient accumulation"
)


def refuse_unsupported_parallelism(args, accelerator=None) -> None:
    """Refuse FSDP, DeepSpeed and Megatron-LM at start-up, from the arguments and the accelerate launch config.

    They shard parameters and gradients, whereas the attack runs on the whole unwrapped module, CURE's mask takes
    each parameter tensor's gradient quantile over the whole tensor, and the revision model copies whole weights.
    """
    found = []
    if accelerator is not None and getattr(args, "n_gpu", 1) > 1:
        # `python script.py` on a machine with several visible GPUs: the Trainer wraps the model in DataParallel,
        # which splits each forward over the GPUs; the attack, the clean and adversarial passes and the revision
        # model run on the unwrapped module on one GPU, and BatchNorm statistics would be those of one replica.
        found.append(f"nn.DataParallel (n_gpu={args.n_gpu}: a plain `python` launch with several visible GPUs)")
    if getattr(args, "fsdp", None):
        found.append(f"fsdp={args.fsdp!r}")
    if getattr(args, "deepspeed", None):
        found.append(f"deepspeed={args.deepspeed!r}")
    if accelerator is not None:
        kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            found.append(f"accelerate distributed_type={kind}")
        parallelism = getattr(accelerator, "parallelism_config", None)
        if parallelism is not None and (
            getattr(parallelism, "tp_enabled", False) or getattr(parallelism, "cp_enabled", False)
        ):
            found.append("tensor/context parallelism (parallelism_config)")
    if found:
        raise ValueError(
            f"CURETrainer does not support {', '.join(found)}: sharded parameters and gradients break the attack on "
            "the unwrapped model, CURE's per-tensor gradient mask and the revision copy. Supported: "
            f"{_SUPPORTED_PARALLELISM}. Fix: drop the FSDP/DeepSpeed settings (TrainingArguments or the accelerate "
            "config), and launch several GPUs as DDP, e.g. `accelerate launch --config_file "
            "recipes/accelerate_configs/multi_gpu.yaml` (or CUDA_VISIBLE_DEVICES=0 for one GPU)."
        )
    method = METHODS.get(getattr(args, "adv_method", None))
    two_forwards = method is not None and method.attack is not None and runs_clean_pass(args, method)
    if two_forwards and getattr(args, "ddp_broadcast_buffers", None) and getattr(args, "world_size", 1) > 1:
        raise ValueError(
            f"ddp_broadcast_buffers=True is invalid for adv_method={args.adv_method!r} under DDP: the clean and the "
            "adversarial batch go through the DDP model before one backward, and DDP's in-place buffer broadcast "
            'before the second forward breaks the backward of the first on GPUs ("modified by an inplace '
            'operation"). Fix: keep ddp_broadcast_buffers=False (CURETrainer then averages BatchNorm statistics '
            "over the processes after every optimizer step)."
        )


@contextlib.contextmanager
def full_precision_forward(module: nn.Module):
    """Run ``module`` without the autocast wrapper accelerate puts around its forward for mixed precision.

    Evaluation (and its attacks) then runs in fp32; the wrapper is put back afterwards, also on error.
    """
    original = module.__dict__.get("_original_forward")
    if original is None:  # not prepared for mixed precision: nothing to take off
        yield module
        return
    wrapped = module.__dict__.get("forward")
    module.forward = original
    try:
        yield module
    finally:
        if wrapped is None:
            del module.forward
        else:
            module.forward = wrapped


# --- speed -------------------------------------------------------------------------------------
def check_clean_logits_reusable(method_name: str, attack: Optional[AttackSpec]) -> None:
    """``attack_reuse_clean_logits`` is exact only for a KL attack, which starts from the clean logits."""
    if attack is None or not attack.starts_from_clean_logits:
        allowed = sorted(m.name for m in METHODS.values() if m.attack is not None and m.attack.starts_from_clean_logits)
        raise ValueError(
            f"attack_reuse_clean_logits=True is invalid for adv_method={method_name!r}: allowed only for methods whose "
            f"attack starts from the clean logits (a KL objective: {allowed}). Fix: set attack_reuse_clean_logits=False."
        )


@torch.no_grad()
def check_train_eval_forwards_agree(model: nn.Module, x: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Raise unless ``model``'s train-mode and eval-mode logits on ``x`` agree (``attack_reuse_clean_logits``).

    The two forwards are compared rather than the module types listed, so any source of difference counts:
    BatchNorm, dropout, drop-path, attention dropout inside a transformers model, or a custom layer. The model's
    buffers (BatchNorm statistics), the random generators and its mode are left as they were.
    """
    from .attacks import logits_of

    was_training = model.training
    buffers = [b.detach().clone() for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            model.train()
            train_logits = logits_of(model(x)).float()
            model.eval()
            eval_logits = logits_of(model(x)).float()
    finally:
        for saved, buffer in zip(buffers, model.buffers()):
            buffer.copy_(saved)
        model.train(was_training)
    difference = (train_logits - eval_logits).abs().max().item()
    scale = eval_logits.abs().max().item()
    if difference > tolerance * max(1.0, scale):
        raise ValueError(
            f"attack_reuse_clean_logits=True needs a model whose train-mode forward equals its eval-mode forward, but "
            f"on the first batch their logits differ by up to {difference:.3g} (BatchNorm, dropout, drop-path or "
            "attention dropout active in train mode), so the attack's eval-mode clean logits cannot come from the "
            "training forward. Fix: set attack_reuse_clean_logits=False, or set the model's dropout rates to 0."
        )


@torch.no_grad()
def average_running_stats_(modules: Iterable[nn.Module]) -> None:
    """Average BatchNorm running statistics of ``modules`` over the DDP processes, in one all-reduce.

    Parameters stay identical through DDP's gradient all-reduce and the shared revision generator, but each
    process updates its running statistics from its own shard of the batch (``ddp_broadcast_buffers=False``),
    so they would drift apart; the average is the statistic of the global batch, as in timm's distribute_bn.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return
    stats = [
        buffer
        for m in modules
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        for buffer in (m.running_mean, m.running_var)
        if buffer is not None
    ]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1).float() for s in stats])
    torch.distributed.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for s in stats:
        s.copy_(flat[offset : offset + s.numel()].view_as(s))
        offset += s.numel()


# --- CPU threads of the recipes -----------------------------------------------------------
# torchrun and accelerate launch set these; both also write OMP_NUM_THREADS=1 by default (accelerate launch on a
# machine without GPU always), which would leave all but one core idle.
_LAUNCHER_MARKERS = ("LOCAL_WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION")


def use_available_cpu_threads(requested: Optional[int] = None, device=None) -> int:
    """Set torch's intra-op threads for a run on CPU and return how many; the recipes and the CLI call it.

    ``device``: where the run computes (default: CUDA when available, else CPU). Off the CPU the threads are left
    as they are and their number is returned.

    ``requested`` >= 1 pins that number. Auto (None or 0): OMP_NUM_THREADS when someone chose it, else the cores
    this process may run on divided by the processes on this node (LOCAL_WORLD_SIZE). Under a launcher an
    OMP_NUM_THREADS of 1 is read as the launcher's default and ignored; any other value, and any value in a plain
    ``python`` run, is honoured. Pin one thread with ``requested=1`` (``--cpu_threads 1``).
    """
    if requested is not None and requested < 0:
        raise ValueError(f"cpu_threads={requested}: allowed 0 (auto: every core available) or a number >= 1")
    if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type != "cpu":
        return torch.get_num_threads()
    threads = requested or 0
    if not threads:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        launched = any(key in os.environ for key in _LAUNCHER_MARKERS)
        if omp.isdigit() and int(omp) >= 1 and not (launched and int(omp) == 1):
            threads = int(omp)
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    torch.set_num_threads(threads)
    return threads
