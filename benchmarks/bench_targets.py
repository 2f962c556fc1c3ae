"""The GPU target run: a CURE epoch near the GPU's limit, timed so that the numbers hold.

What it measures, in one process, in order of importance (jobs after ``--time-budget-s`` are skipped and named):

1. CURE, timed in windows that alternate the configurations (A B C ... A B C ...): CURETrainer with the preset
   (``speed_preset="fast"``), the plain loop with the preset's pieces, the whole step captured (``captured``: the
   preset's pieces in one CUDA graph, ``cure_hf.capture``), CURETrainer with the preset and ``capture_step=True``
   (``trainer captured``: the same captured step inside the Trainer's loop, constant learning rate; on CUDA, or
   with ``--trainer-captured``), and the whole
   step captured with eager kernels in bf16 +
   channels_last and in fp32 (``captured_bf16``, ``captured_fp32``: what bf16 buys once the host no longer paces the
   step). Each window is a fresh run from the same weights: ``--warmup`` steps, then ``--window-steps`` steps timed
   with CUDA events (``bench_step.Stopwatch``); ``--repeats`` windows per configuration. Reported: the median and
   the range over the windows; every ratio is a ratio of medians, with its range over the paired windows.
2. The last window of each CURE configuration is profiled (``bench_step.Profiles``): GPU kernel time per step and
   kernel launches per step. "GPU busy" is the kernel time per step over the median (unprofiled) step time.
3. FLOPs of one CURE step (``torch.utils.flop_counter.FlopCounterMode`` over an eager fp32 step) and MFU: FLOPs per
   step / (median seconds per step x the device's peak: dense bf16 for bf16 configurations, dense TF32 for fp32 ones
   (cuDNN's convolutions use TF32 by default); from ``PEAK_TFLOPS`` by device name, or ``--peak-tflops``).
4. Robust accuracy on ``synthetic_task.RobustTask`` (robust features above eps, non-robust ones below it):
   natural training (fp32, the check's floor: its PGD-20 accuracy is about 0) and ``--robust-method`` with fp32 and
   with the preset over ``--robust-seeds``, each judged by the same fp32 PGD-20 on the same held-out examples.
5. Every other method: CURETrainer with the preset against the plain loop, alternating windows as in 1.

The ``TARGET`` and ``RATIO`` lines come last. CPU dry run (what tests/test_benchmarks.py runs through gpu_run.sh):

    python benchmarks/bench_targets.py --device cpu --model test_resnet --image-size 16 --batch-size 4 \\
        --attack-steps 1 --warmup 1 --window-steps 1 --repeats 2 --methods cure,pgd --compile-backend aot_eager
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_step  # noqa: E402
from bench_step import (  # noqa: E402
    CONFIGS,
    BudgetExceeded,
    Models,
    PlainStep,
    Profiles,
    build_model,
    make_loader,
    parameter_count,
    print_jobs,
    release,
    robust_accuracy,
    run_jobs,
    run_plain,
    run_trainer,
    timed_dataset,
    trained_fp32_copy,
    verdict,
    write_json,
)
from synthetic_task import RobustTask  # noqa: E402

from cure_hf.methods import registered_methods  # noqa: E402

TARGETS = {
    "cure_epoch_fast_s": 6.0,
    "gpu_busy": 0.70,
    "bf16_speedup": 1.6,
    "trainer_overhead": 0.05,
}
# Dense peak TFLOP/s (no sparsity) by a substring of torch.cuda.get_device_name: (bf16 tensor cores, TF32 tensor
# cores). NVIDIA's data sheets; the first matching row wins (the PCIe H100 before the SXM one).
PEAK_TFLOPS = (
    ("H200", (989.0, 494.0)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.0)),
    ("A100", (312.0, 156.0)),
)
METHOD_ORDER = ("cure", "trades", "pgd", "mart", "fgsm_rs", "clean")
# CURETrainer with the preset and capture_step=True: the whole step captured inside the Trainer's loop (a graph
# bakes its learning rate in, so the schedule is constant, as the plain loop's)
TRAINER_CAPTURED = {"capture_step": True, "lr_scheduler_type": "constant"}
# The CURE configurations of job 1: (name, kind, configuration, extra CURETrainingArguments fields)
CURE_RUNS = (
    ("trainer fast", "trainer", "fast", {}),
    ("plain fast", "plain", "fast", {}),
    ("plain captured", "plain", "captured", {}),
    ("trainer captured", "trainer", "fast", TRAINER_CAPTURED),
    ("plain captured_bf16", "plain", "captured_bf16", {}),
    ("plain captured_fp32", "plain", "captured_fp32", {}),
)


def peak_flops(device_name: str, given: Optional[str]) -> Optional[Tuple[float, float]]:
    """(bf16, TF32) peak FLOP/s: ``--peak-tflops BF16[,TF32]`` (TF32 = BF16 / 2 when not given), else the table."""
    if given:
        values = [float(v) for v in given.split(",")]
        return values[0] * 1e12, (values[1] if len(values) > 1 else values[0] / 2) * 1e12
    for key, (bf16, tf32) in PEAK_TFLOPS:
        if key in device_name:
            return bf16 * 1e12, tf32 * 1e12
    return None


def count_flops(cfg, method: str) -> float:
    """FLOPs of one eager fp32 step of the plain loop (matmuls and convolutions, forward and backward, the attack's
    input gradients included), counted by torch's FlopCounterMode on the second step (the first initialises)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg).to(cfg.device)
    step = PlainStep(cfg, model, method, "fp32")
    batch = next(iter(make_loader(cfg, timed_dataset(cfg, 1), False, False)))
    step(batch)
    counter = FlopCounterMode(display=False)
    # Its per-module breakdown hooks every module's backward, which autograd.grad with respect to the input (the
    # attack) refuses ("A leaf node was passed to _will_engine_execute_node"); the total needs no breakdown.
    counter.mod_tracker = _TotalOnly()
    with counter:
        step(batch)
    return float(counter.get_total_flops())


class _TotalOnly:
    """FlopCounterMode's module tracker, reduced to the one scope its total is read from."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def summary(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "windows": len(values)}


def paired_ratios(a: List[float], b: List[float]) -> List[float]:
    """a_i / b_i of the windows that ran in the same repeat (adjacent in time)."""
    return [x / y for x, y in zip(a, b) if y]


def trainer_overhead(trainer: List[float], plain: List[float]) -> Tuple[float, List[float]]:
    """The trainer's median step over the plain loop's, minus 1, and the same for each pair of windows."""
    return summary(trainer)["median"] / summary(plain)["median"] - 1, [r - 1 for r in paired_ratios(trainer, plain)]


def window_cfg(cfg, steps: int):
    return argparse.Namespace(**{**vars(cfg), "steps": steps})


def time_windows(cfg, models, profiles, runs, results, key: str, check_budget) -> None:
    """``cfg.repeats`` rounds; in each, every run of ``runs`` = [(name, kind, method, config[, extra])] (extra:
    fields of a trainer run's arguments) gets one window, in
    order (A B C ... A B C ...). The last round's windows are profiled when ``cfg.profile_steps``. A run that fails
    prints its traceback, is named in ``results["failed_runs"]`` and sits out the later rounds; the others go on."""
    times = results.setdefault(key, OrderedDict())
    failed = results.setdefault("failed_runs", [])
    for repeat in range(cfg.repeats):
        last = repeat == cfg.repeats - 1
        for name, kind, method, config, *extra in runs:
            extra = extra[0] if extra else {}
            label = f"{name} {method}"
            if label in failed:
                continue
            check_budget()
            profile = profiles(label) if last and cfg.profile_steps else None
            wcfg = window_cfg(cfg, cfg.window_steps)
            try:
                if kind == "trainer":
                    run = run_trainer(wcfg, models, method, config, profile=profile, **extra)
                else:
                    run = run_plain(wcfg, models, method, config, profile=profile)
            except Exception:
                failed.append(label)
                print(f"  FAILED window {repeat + 1}/{cfg.repeats} {label}:\n{traceback.format_exc()}", flush=True)
                release(cfg.device)
                continue
            times.setdefault(label, []).append(run["step_s"])
            if run.get("peak_mib"):
                results["peak_mib"][label] = run["peak_mib"]
            if run.get("profile"):
                results["profiles"][label] = run["profile"]
            print(
                f"  [{time.perf_counter() - cfg.started:6.0f} s] window {repeat + 1}/{cfg.repeats} {name:<20} "
                f"{method:<7} {run['step_s'] * 1e3:9.2f} ms/step",
                flush=True,
            )


# --------------------------------------------------------------------------------------- robust accuracy
def run_robust_check(cfg, results) -> None:
    """Natural training and ``cfg.robust_method`` (fp32 and the preset, each seed) on the synthetic task; every
    model judged by one fp32 PGD-20 (eps 8/255) on the same held-out examples."""
    task = RobustTask(image_size=cfg.robust_image_size)
    train_images, train_labels = task.sample(cfg.robust_train, seed=100)
    test_images, test_labels = task.sample(cfg.robust_eval, seed=200)
    rcfg = argparse.Namespace(**{**vars(cfg), "model": cfg.robust_model, "image_size": task.image_size, "steps": 1})
    steps_per_epoch = max(1, cfg.robust_train // cfg.batch_size)
    runs = [("natural fp32", "clean", "fp32", cfg.robust_seeds[0], cfg.robust_natural_epochs)] + [
        (f"{cfg.robust_method} {config} seed {seed}", cfg.robust_method, config, seed, cfg.robust_epochs)
        for seed in cfg.robust_seeds
        for config in ("fp32", "fast")
    ]
    out = results.setdefault("robust", OrderedDict())
    out["task"] = {
        "image_size": task.image_size,
        "robust_ceiling": task.robust_ceiling,
        "train": cfg.robust_train,
        "eval": cfg.robust_eval,
        "model": cfg.robust_model,
        "method": cfg.robust_method,
    }
    for name, method, config, seed, epochs in runs:
        if time.perf_counter() - cfg.started > cfg.time_budget_s:
            raise BudgetExceeded()
        dataset = bench_step.TensorImageDataset(train_images, train_labels, augment="none", seed=seed)
        run = run_trainer(
            rcfg,
            Models(rcfg, seed=seed),
            method,
            config,
            dataset=dataset,
            max_steps=epochs * steps_per_epoch,
            seed=seed,
            data_seed=seed,
            learning_rate=0.05,
        )
        trainer = run.pop("trainer")
        model = trained_fp32_copy(trainer)
        clean = robust_accuracy(model, test_images, test_labels, cfg.device, cfg.batch_size, 0)
        pgd20 = robust_accuracy(model, test_images, test_labels, cfg.device, cfg.batch_size, 20)
        out[name] = {"clean": clean, "pgd20": pgd20, "steps": epochs * steps_per_epoch}
        print(f"  robust check {name:<28} clean {clean:.4f}  PGD-20 {pgd20:.4f}", flush=True)
        del trainer, run, model
        release(cfg.device)


def robust_verdict(cfg, robust) -> Optional[str]:
    names = [(f"{cfg.robust_method} fp32 seed {s}", f"{cfg.robust_method} fast seed {s}") for s in cfg.robust_seeds]
    pairs = [(robust[a]["pgd20"], robust[b]["pgd20"]) for a, b in names if a in robust and b in robust]
    if not pairs:
        return None
    fp32 = statistics.mean(a for a, _ in pairs)
    fast = statistics.mean(b for _, b in pairs)
    n = robust["task"]["eval"]
    # noise: 2 binomial standard errors of a difference of two means over len(pairs) runs each, or the seeds' spread
    se = math.sqrt(2 * max(fp32 * (1 - fp32), 1e-4) / (n * len(pairs)))
    seed_spread = max([abs(a - b) for (a, _), (b, _) in zip(pairs, pairs[1:])] or [0.0])
    seed_spread = max(seed_spread, max([abs(a - b) for (_, a), (_, b) in zip(pairs, pairs[1:])] or [0.0]))
    noise = max(2 * se, seed_spread)
    natural = robust.get("natural fp32", {}).get("pgd20")
    floor = f"; natural training's PGD-20 {natural:.4f}" if natural is not None else ""
    return (
        f"TARGET robust_accuracy[fp32 vs preset, {len(pairs)} seeds] = preset {fast:.4f} vs fp32 {fp32:.4f} "
        f"(difference {fast - fp32:+.4f}; noise {noise:.4f} = max(2 binomial SE, seed spread){floor}; robust ceiling "
        f"{robust['task']['robust_ceiling']:.3f}) (target: |difference| <= noise: {verdict(abs(fast - fp32) <= noise)})"
    )


# ------------------------------------------------------------------------------------------------ report
def report(cfg, results, done, skipped, failed, header, steps_per_epoch) -> None:
    print("\n" + "=" * 100 + "\n" + header)
    print(
        f"\n## seconds per step: median [min, max] over {cfg.repeats} alternating windows of {cfg.window_steps} steps "
        f"(CUDA events on a GPU), peak memory, MFU, profile"
    )
    flops = results.get("flops_per_step", {})
    peaks = results.get("peak_flops")
    for key in ("cure", "methods"):
        for name, values in results.get(key, {}).items():
            s = summary(values)
            config = name.split()[1]
            mfu = ""
            method = name.split()[-1]
            if peaks and flops.get(method):
                peak = peaks[0] if CONFIGS[config][0] else peaks[1]
                mfu = f"  MFU {flops[method] / (s['median'] * peak):6.1%}"
            profile = results["profiles"].get(name)
            busy = ""
            if profile and cfg.device.type == "cuda":
                busy = (
                    f"  GPU busy {min(1.0, profile['gpu_busy_s_per_step'] / s['median']):4.0%}, "
                    f"{profile['kernel_launches_per_step']:.0f} launches/step"
                )
            mem = results["peak_mib"].get(name)
            print(
                f"TIME {name:<32} {s['median'] * 1e3:9.2f} [{s['min'] * 1e3:.2f}, {s['max'] * 1e3:.2f}] ms/step"
                f"{f'  peak {mem:.0f} MiB' if mem else ''}{mfu}{busy}"
            )
    for method, value in flops.items():
        print(f"FLOPS {method}: {value / 1e9:.1f} GFLOP per step ({value / cfg.batch_size / 1e9:.2f} GFLOP per image)")
    for name, value in results.get("robust", {}).items():
        if name != "task":
            print(
                f"ROBUST {name:<28} clean {value['clean']:.4f}  PGD-20 {value['pgd20']:.4f}  ({value['steps']} steps)"
            )
    print_jobs(cfg, done, skipped, failed + [f"window of {name}" for name in results.get("failed_runs", [])])

    print("\n## ratios and targets")
    cure = results.get("cure", {})
    times = {**cure, **results.get("methods", {})}
    fast = cure.get("trainer fast cure")
    if fast:
        s = summary(fast)
        epoch = s["median"] * steps_per_epoch
        print(
            f"TARGET cure_epoch_fast = {epoch:.1f} s (CURETrainer, speed_preset='fast', {steps_per_epoch} steps x the "
            f"median step; windows {s['min'] * steps_per_epoch:.1f}-{s['max'] * steps_per_epoch:.1f} s) (target <= "
            f"{TARGETS['cure_epoch_fast_s']:.0f} s: {verdict(epoch <= TARGETS['cure_epoch_fast_s'])})"
        )
    captured = cure.get("plain captured cure")
    if captured:
        epoch = summary(captured)["median"] * steps_per_epoch
        print(
            f"RATIO cure_epoch_captured = {epoch:.1f} s (the whole step captured, plain loop) (target <= "
            f"{TARGETS['cure_epoch_fast_s']:.0f} s: {verdict(epoch <= TARGETS['cure_epoch_fast_s'])})"
        )
    trainer_captured = cure.get("trainer captured cure")
    if trainer_captured and captured:
        overhead, paired = trainer_overhead(trainer_captured, captured)
        print(
            f"RATIO trainer_overhead[cure captured] = {overhead:+.1%} (CURETrainer with capture_step=True over the "
            f"plain loop's captured step, medians; windows {min(paired):+.1%} to {max(paired):+.1%})"
        )
    for name in ("trainer fast cure", "plain fast cure", "plain captured cure", "trainer captured cure"):
        profile = results["profiles"].get(name)
        if profile and cfg.device.type != "cuda":
            print(f"TARGET gpu_busy[{name}] = n/a off CUDA (no GPU kernels to time)")
        elif profile and times.get(name):
            busy = min(1.0, profile["gpu_busy_s_per_step"] / summary(times[name])["median"])
            print(
                f"TARGET gpu_busy[{name}] = {busy:.0%} (kernel time {profile['gpu_busy_s_per_step'] * 1e3:.2f} ms per "
                f"step / median step; {profile['kernel_launches_per_step']:.0f} kernel launches + "
                f"{profile['graph_launches_per_step']:.0f} graph launches per step) (target >= "
                f"{TARGETS['gpu_busy']:.0%}: {verdict(busy >= TARGETS['gpu_busy'])})"
            )
    bf16, fp32 = cure.get("plain captured_bf16 cure"), cure.get("plain captured_fp32 cure")
    if bf16 and fp32:
        ratio = summary(fp32)["median"] / summary(bf16)["median"]
        paired = paired_ratios(fp32, bf16)
        print(
            f"TARGET bf16_speedup[captured] = {ratio:.2f}x (captured_fp32 / captured_bf16 medians; windows "
            f"{min(paired):.2f}-{max(paired):.2f}x) (target >= {TARGETS['bf16_speedup']}x: "
            f"{verdict(ratio >= TARGETS['bf16_speedup'])})"
        )
    for method in [m for m in METHOD_ORDER if m in cfg.methods]:
        t, p = times.get(f"trainer fast {method}"), times.get(f"plain fast {method}")
        if t and p:
            overhead, paired = trainer_overhead(t, p)
            print(
                f"TARGET trainer_overhead[{method} fast] = {overhead:+.1%} (medians; windows {min(paired):+.1%} to "
                f"{max(paired):+.1%}) (target <= {TARGETS['trainer_overhead']:.0%}: "
                f"{verdict(overhead <= TARGETS['trainer_overhead'])})"
            )
    for name, values in times.items():
        s = summary(values)
        print(f"RATIO spread[{name}] = {(s['max'] - s['min']) / s['median']:.1%} ((max - min) / median of the windows)")
    if results.get("robust"):
        line = robust_verdict(cfg, results["robust"])
        if line:
            print(line)


# ------------------------------------------------------------------------------------------------ driver
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="cifar_resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--vit-patch", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every window (>= 1)")
    parser.add_argument("--window-steps", type=int, default=70, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per configuration, alternating")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER))
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager makes a CPU dry run fast")
    parser.add_argument(
        "--base-workers", type=int, default=4, help="data-loader workers where the data is not resident"
    )
    parser.add_argument("--epoch-examples", type=int, default=50000, help="examples per epoch (CIFAR-10: 50000)")
    parser.add_argument("--peak-tflops", default=None, help="BF16[,TF32] dense peak TFLOP/s (default: by device)")
    parser.add_argument("--robust-model", default="test_resnet")
    parser.add_argument("--robust-image-size", type=int, default=16)
    parser.add_argument("--robust-method", default="pgd")
    parser.add_argument("--robust-train", type=int, default=2048)
    parser.add_argument("--robust-eval", type=int, default=1024)
    parser.add_argument("--robust-epochs", type=int, default=6)
    parser.add_argument("--robust-natural-epochs", type=int, default=10)
    parser.add_argument("--robust-seeds", default="0,1")
    parser.add_argument("--profile-dir", default=None)
    parser.add_argument("--profile-steps", type=int, default=2, help="profiled steps after the last window (0: none)")
    parser.add_argument("--time-budget-s", type=float, default=1e9, help="no job starts after this")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--trainer-captured",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time CURETrainer with capture_step=True among the CURE windows (default: on CUDA only)",
    )
    parser.add_argument("--json", default=None, help="every number, rewritten after every job")
    cfg = parser.parse_args(argv)
    cfg.device = torch.device(cfg.device)
    cfg.started = time.perf_counter()
    cfg.methods = [m for m in cfg.methods.split(",") if m]
    cfg.robust_seeds = [int(s) for s in cfg.robust_seeds.split(",") if s != ""]
    cfg.trace_config = None
    unknown = [m for m in cfg.methods if m not in registered_methods()]
    if unknown or cfg.warmup < 1 or cfg.window_steps < 1 or cfg.repeats < 1 or not cfg.robust_seeds:
        parser.error(f"unknown methods {unknown}; --warmup, --window-steps, --repeats >= 1; --robust-seeds not empty")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.profile_dir:
        os.makedirs(cfg.profile_dir, exist_ok=True)
    for name, value in (("recompile_limit", 64), ("accumulated_recompile_limit", 512)):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(torch._dynamo.config, name, max(value, getattr(torch._dynamo.config, name)))
    device_name = (
        torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    )
    import transformers

    steps_per_epoch = math.ceil(cfg.epoch_examples / cfg.batch_size)
    header = (
        f"# bench_targets: model={cfg.model} ({parameter_count(build_model(cfg)) / 1e6:.2f}M parameters), input 3x"
        f"{cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, PGD-{cfg.attack_steps}, device {device_name}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; windows: {cfg.warmup} warm-up + "
        f"{cfg.window_steps} timed steps, {cfg.repeats} per configuration, alternating; compile backend "
        f"{cfg.compile_backend}; time budget {cfg.time_budget_s:.0f} s"
    )
    print(header, flush=True)
    models = Models(cfg)
    profiles = Profiles(cfg)
    results: Dict[str, Any] = OrderedDict(peak_mib={}, profiles={}, flops_per_step={})
    results["peak_flops"] = peak_flops(device_name, cfg.peak_tflops)
    done: List[str] = []
    skipped: List[str] = []
    failed: List[str] = []

    def check_budget():
        if time.perf_counter() - cfg.started > cfg.time_budget_s:
            raise BudgetExceeded()

    others = [m for m in METHOD_ORDER if m in cfg.methods and m != "cure"]
    jobs: List[Tuple[str, Callable[[], None]]] = []

    def timing(runs, key):
        return lambda: time_windows(cfg, models, profiles, runs, results, key, check_budget)

    if "cure" in cfg.methods:
        captured_trainer = cfg.trainer_captured if cfg.trainer_captured is not None else cfg.device.type == "cuda"
        runs = [
            (name, kind, "cure", config, extra)
            for name, kind, config, extra in CURE_RUNS
            if captured_trainer or name != "trainer captured"
        ]
        jobs.append(("CURE timing", timing(runs, "cure")))
        jobs.append(("CURE FLOPs", lambda: results["flops_per_step"].__setitem__("cure", count_flops(cfg, "cure"))))
    jobs.append(("robust accuracy", lambda: run_robust_check(cfg, results)))
    if others:
        pairs = (("trainer fast", "trainer"), ("plain fast", "plain"))
        jobs.append(("other methods", timing([(n, k, m, "fast") for m in others for n, k in pairs], "methods")))

    run_jobs(cfg, jobs, results, done, skipped, failed)
    report(cfg, results, done, skipped, failed, header, steps_per_epoch)
    if cfg.json:
        write_json(cfg, results, done, skipped, failed)
    return results


if __name__ == "__main__":
    main()
