"""Time CURE's prominence mask over a model's real parameter shapes, against the alternatives.

Compared, per optimizer step (all maskable tensors of the model, fraction p = 0.3):
- ``cure_hf``: ``mask_gradients_`` (on the device, no host synchronisation, small tensors batched);
- ``released code``: ``numpy.percentile`` of each gradient copied to the CPU, as NeurAI-Lab/CURE does;
- ``torch.quantile``: per tensor on the device (refuses tensors above 2**24 entries in some releases);
- ``sort`` and ``topk``: other ways to the two order statistics, per tensor on the device.
Every variant is checked to conserve exactly the same entries as ``mask_gradients_``.

    python benchmarks/bench_mask.py --device cuda --model cifar_resnet18
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable, List

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_step import build_model, sync  # noqa: E402

from cure_hf.models import head_parameter_names  # noqa: E402
from cure_hf.prominence import mask_gradients_  # noqa: E402


def _positions(n: int, fraction: float):
    position = fraction * (n - 1)
    lower = int(math.floor(position))
    return lower, min(lower + 1, n - 1), position - lower


def numpy_released(grads: List[torch.Tensor], fraction: float) -> List[torch.Tensor]:
    masks = []
    for g in grads:
        score = g.abs().cpu().numpy()
        threshold = np.percentile(score, fraction * 100)
        masks.append(torch.from_numpy(score < threshold).to(g.device))
    return masks


def torch_quantile(grads, fraction):
    return [g.abs() < torch.quantile(g.abs().reshape(-1), fraction) for g in grads]


def via_sort(grads, fraction):
    masks = []
    for g in grads:
        score = g.abs().reshape(-1)
        lower, upper, weight = _positions(score.numel(), fraction)
        ordered = score.sort().values
        threshold = ordered[lower] + weight * (ordered[upper] - ordered[lower])
        masks.append(g.abs() < threshold)
    return masks


def via_topk(grads, fraction):
    masks = []
    for g in grads:
        score = g.abs().reshape(-1)
        lower, upper, weight = _positions(score.numel(), fraction)
        smallest = score.topk(upper + 1, largest=False, sorted=False).values
        two = smallest.topk(min(2, smallest.numel())).values  # (upper+1)-th and (lower+1)-th smallest
        low, high = two[-1], two[0]
        if upper == lower:
            low = high
        masks.append(g.abs() < low + weight * (high - low))
    return masks


class CureHfMask:
    """``mask_gradients_`` on parameters whose gradients are reset from ``grads`` (one fused copy) before each call."""

    def __init__(self, grads: List[torch.Tensor]):
        self.grads = grads
        self.params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
        for p, g in zip(self.params, grads):
            p.grad = g.clone()

    def __call__(self, grads, fraction):
        torch._foreach_copy_([p.grad for p in self.params], self.grads)
        return mask_gradients_(self.params, fraction)


def time_it(fn: Callable, device, repeats: int) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    cfg = parser.parse_args(argv)
    device = torch.device(cfg.device)
    model = build_model(cfg.model, 32, 4)
    heads = head_parameter_names(model)
    generator = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(p.shape, generator=generator).to(device) for n, p in model.named_parameters() if n not in heads
    ]
    total = sum(g.numel() for g in grads)
    print(
        f"# bench_mask: {cfg.model}, {len(grads)} maskable tensors, {total / 1e6:.2f}M entries, largest "
        f"{max(g.numel() for g in grads)}, device {device}, p={cfg.fraction}"
    )
    cure_hf_mask = CureHfMask(grads)
    reference = [m.clone() for m in cure_hf_mask(grads, cfg.fraction)]
    variants = {
        "cure_hf mask_gradients_": lambda: cure_hf_mask(grads, cfg.fraction),
        "released code (numpy on CPU)": lambda: numpy_released(grads, cfg.fraction),
        "torch.quantile per tensor": lambda: torch_quantile(grads, cfg.fraction),
        "sort per tensor": lambda: via_sort(grads, cfg.fraction),
        "topk per tensor": lambda: via_topk(grads, cfg.fraction),
    }
    print(f"{'variant':<32} {'ms/step':>9} {'same masks':>11}")
    for name, fn in variants.items():
        try:
            same = all(torch.equal(a, b) for a, b in zip(fn(), reference))
            seconds = time_it(fn, device, cfg.repeats)
            print(f"{name:<32} {seconds * 1e3:>9.2f} {str(same):>11}")
        except RuntimeError as error:
            print(f"{name:<32} {'failed':>9} {str(error)[:60]}")
    if device.type == "cuda":
        # Is the mask bound by the GPU's work or by launching it? Kernel time of one call vs its wall time.
        from torch.profiler import ProfilerActivity, profile

        run = variants["cure_hf mask_gradients_"]
        wall = time_it(run, device, cfg.repeats)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3
        launches = sum(
            1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")
        )
        print(
            f"PROFILE cure_hf mask_gradients_: {wall * 1e3:.2f} ms wall, GPU kernels busy {busy:.2f} ms, "
            f"{len(kernels)} kernels ({launches} launch calls)"
        )


if __name__ == "__main__":
    main()
