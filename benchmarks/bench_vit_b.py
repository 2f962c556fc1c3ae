"""The ViT-B/16 line: robust fine-tuning of ``vit_base_patch16_224`` at 224x224 on one GPU.

``--method`` (CURE by default) with PGD-3 at eps 4/255 (step 1/255), batch 64, from random weights
(``pretrained=False``: the speed of a step does not depend on the weights). For fp32, bf16 autocast and the speed
preset (``speed_preset="fast"``: bf16, torch.compile, the training set on the device), in the plain loop and in
CURETrainer: images per second (batch / median step over the windows, CUDA events), peak memory, and the trainer's
overhead over the plain loop. The windows alternate the configurations, as in ``bench_targets.py``.

    python benchmarks/bench_vit_b.py                      # on a GPU (benchmarks/gpu_run.sh runs it last)
    python benchmarks/bench_vit_b.py --device cpu --model test_vit --image-size 32 --patch 8 --batch-size 2 \\
        --warmup 1 --window-steps 1 --compile-backend aot_eager          # the CPU dry run's size
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_step import (  # noqa: E402
    BudgetExceeded,  # noqa: E402
    Models,
    Profiles,
    build_model,
    parameter_count,
    release,
)
from bench_targets import summary, time_windows  # noqa: E402

CONFIGS = ("fp32", "bf16", "fast")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--method", default="cure")
    parser.add_argument("--attack-steps", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=4 / 255)
    parser.add_argument("--attack-step-size", type=float, default=1 / 255)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--window-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {CONFIGS}, in order")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--base-workers", type=int, default=4)
    parser.add_argument("--time-budget-s", type=float, default=1e9, help="no window starts after this")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    cfg = parser.parse_args(argv)
    cfg.device = torch.device(cfg.device)
    cfg.vit_patch = cfg.patch
    cfg.started = time.perf_counter()
    cfg.profile_steps, cfg.profile_dir, cfg.trace_config = 0, None, None
    configs = [c for c in cfg.configs.split(",") if c]
    if [c for c in configs if c not in CONFIGS] or cfg.warmup < 1 or cfg.window_steps < 1:
        parser.error(f"--configs must be a subset of {CONFIGS}; --warmup and --window-steps >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device_name = (
        torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    )
    print(
        f"# bench_vit_b: {cfg.model} ({parameter_count(build_model(cfg)) / 1e6:.1f}M parameters) at "
        f"{cfg.image_size}x{cfg.image_size}, patch {cfg.patch}, batch {cfg.batch_size}, {cfg.method} with PGD-"
        f"{cfg.attack_steps} at eps {cfg.epsilon * 255:.0f}/255, device {device_name}, torch {torch.__version__}; "
        f"{cfg.warmup} warm-up + {cfg.window_steps} timed steps per window, {cfg.repeats} window(s) per "
        f"configuration; time budget {cfg.time_budget_s:.0f} s",
        flush=True,
    )
    models = Models(cfg)
    results: Dict[str, Any] = OrderedDict(peak_mib={}, profiles={})
    runs = [(f"{kind} {config}", kind, cfg.method, config) for config in configs for kind in ("plain", "trainer")]

    def check_budget():
        if time.perf_counter() - cfg.started > cfg.time_budget_s:
            raise BudgetExceeded()

    status = "done"
    try:
        time_windows(cfg, models, Profiles(cfg), runs, results, "vit", check_budget)
    except BudgetExceeded:
        status = "cut by the time budget"
    except Exception:
        status = "FAILED (traceback above)"
        print(traceback.format_exc(), flush=True)
        with contextlib.suppress(Exception):
            release(cfg.device)
    times = results.get("vit", {})
    parts = []
    for config in configs:
        plain, trainer = times.get(f"plain {config} {cfg.method}"), times.get(f"trainer {config} {cfg.method}")
        if not plain:
            parts.append(f"{config} not run")
            continue
        median = summary(plain)["median"]
        mem = results["peak_mib"].get(f"plain {config} {cfg.method}")
        text = f"{config} {cfg.batch_size / median:.1f} img/s" + (f" (peak {mem / 1024:.1f} GiB)" if mem else "")
        if trainer:
            overhead = summary(trainer)["median"] / median - 1
            tmem = results["peak_mib"].get(f"trainer {config} {cfg.method}")
            text += f", trainer {cfg.batch_size / summary(trainer)['median']:.1f} img/s ({overhead:+.1%} per step"
            text += f"; peak {tmem / 1024:.1f} GiB)" if tmem else ")"
        parts.append(text)
    print(
        f"VIT {cfg.model} {cfg.image_size}x{cfg.image_size} batch {cfg.batch_size} {cfg.method} PGD-"
        f"{cfg.attack_steps} {cfg.epsilon * 255:.0f}/255 (plain loop, then CURETrainer and its overhead per step): "
        + "; ".join(parts)
    )
    print(f"# bench_vit_b: {status} after {time.perf_counter() - cfg.started:.0f} s", flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(json.loads(json.dumps({**results, "status": status}, default=str)), f, indent=1)
    return results


if __name__ == "__main__":
    main()
