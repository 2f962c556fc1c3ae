#!/usr/bin/env python
"""Regenerate every measured number of the README (and of docs/recipes.md) and write them to one results file.

    python recipes/reproduce_readme.py                          # every part that runs on this machine
    python recipes/reproduce_readme.py --parts main_job,autoattack
    python recipes/reproduce_readme.py --render_only             # rewrite the README blocks from the results file

Parts (each replaces its own section of ``docs/results/readme_numbers.json``; the others are kept as they are):

- ``main_job``: ``accelerate launch recipes/train_vit.py`` over seeds 0, 1, 2 x 1 and 2 CPU threads
  (recipes/reproduce_main_job.py): every run's stage-0 and CURE accuracy, the median and range, and whether the
  band the README promises holds.
- ``autoattack``: ``cure-hf evaluate`` (clean, PGD-20, CW, AutoAttack standard) on the first 100 test images of
  the main job's model (seed 0, 2 threads).
- ``methods``: recipes/compare_methods.py over seeds 0, 1, 2 with AutoAttack on the first 100 test images.
- ``ablation``: recipes/ablation_wa_awp.py (weight averaging and AWP), 3 seeds; the slowest part (about an hour).
- ``gpu``: on a CUDA machine, ``bash benchmarks/gpu_run.sh``; elsewhere it reads the latest H100 results in
  benchmarks/results/ (the README says which file and run).

Each section records its command, the machine (CPU model, cores, torch), the date and its wall time. After the
parts have run, the blocks between ``<!-- numbers:NAME -->`` and ``<!-- /numbers:NAME -->`` in README.md and
docs/recipes.md are rewritten from the results file; tests/test_readme_numbers.py fails when they differ from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import reproduce_main_job  # noqa: E402

RESULTS_FILE = os.path.join(ROOT, "docs", "results", "readme_numbers.json")
DOCUMENTS = (os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "recipes.md"))
PARTS = ("main_job", "autoattack", "methods", "ablation", "gpu")
# The H100 runs of benchmarks/gpu_run.sh on record (this machine has no GPU); the part reruns it on a CUDA machine.
GPU_RUNS = tuple(os.path.join(ROOT, "benchmarks", "results", f"h100_fastpath_run{n}.json") for n in (1, 2))

# The band the README promises for the main job over seeds x threads (docs/recipes.md, "The default run").
BAND = {"stage0_clean_min": 0.95, "clean_range_max": 0.03, "pgd_range_max": 0.05, "pgd_gain_min": 0.30}


# --- the machine and the subprocesses ----------------------------------------------------------------------------
def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def _environment() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def _run(command: List[str], log_path: str) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(command, env=_environment(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {log_path}")


# --- the parts -----------------------------------------------------------------------------------------------------
def band_checks(summary: dict, runs: List[dict]) -> Dict[str, bool]:
    """The README's promises about the main job, each True or False.

    Accuracies are counts over the test images, so a range of exactly 0.05 (18 of 360) can come out as
    0.0500000001 in floating point: the comparisons allow 1e-9.
    """
    tol = 1e-9
    return {
        "stage0_clean_at_least_0.95_in_every_run": all(
            r["stage0_clean"] >= BAND["stage0_clean_min"] - tol for r in runs
        ),
        "cure_pgd_at_least_0.30_above_stage0_in_every_run": all(
            r["final_pgd"] - r["stage0_pgd"] >= BAND["pgd_gain_min"] - tol for r in runs
        ),
        "clean_range_at_most_0.03": all(
            summary[c]["range"] <= BAND["clean_range_max"] + tol for c in ("stage0_clean", "final_clean")
        ),
        "pgd_range_at_most_0.05": summary["final_pgd"]["range"] <= BAND["pgd_range_max"] + tol,
    }


def part_main_job(out: str, grid_report: Optional[str] = None) -> dict:
    """The six runs; ``grid_report``: the main_job_grid.json of an earlier `recipes/reproduce_main_job.py` run
    (the same function) instead of running them again."""
    if grid_report:
        with open(grid_report) as f:
            report = json.load(f)
        if sorted(report["seeds"]) != [0, 1, 2] or sorted(report["threads"]) != [1, 2] or report["extra_args"]:
            raise ValueError(f"{grid_report}: not the README's grid (seeds 0,1,2 x threads 1,2, default recipe)")
        run_dir = os.path.dirname(os.path.abspath(grid_report))
    else:
        run_dir = os.path.join(out, "main_job")
        report = reproduce_main_job.run_main_job_grid([0, 1, 2], [1, 2], run_dir)
    print(reproduce_main_job.format_table(report), flush=True)
    section = {
        "command": "python recipes/reproduce_main_job.py  # accelerate launch recipes/train_vit.py "
        "--seed S --cpu_threads T, S in 0,1,2, T in 1,2",
        "runs": report["runs"],
        "summary": report["summary"],
        "band": band_checks(report["summary"], report["runs"]),
        "band_limits": dict(BAND),
        "model_dir": os.path.join(run_dir, "seed0_threads2"),
    }
    if grid_report:  # the runs' own wall time, not the seconds spent reading the file
        section["wall_seconds"] = round(sum(r["wall_seconds"] for r in report["runs"]), 1)
    return section


def part_autoattack(out: str, model_dir: Optional[str]) -> dict:
    if not model_dir or not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        raise ValueError(
            f"the autoattack part needs the main job's model (seed 0, 2 threads), not found in "
            f"{model_dir}: run the main_job part first (--parts main_job,autoattack)"
        )
    result_file = os.path.join(out, "autoattack", "robust_eval.json")
    command = [
        sys.executable,
        "-m",
        "cure_hf.cli",
        "evaluate",
        "--model_name_or_path",
        model_dir,
        "--dataset_name",
        "digits",
        "--eval_attacks",
        "clean,pgd20,cw,autoattack",
        "--eval_max_examples",
        "100",
        "--eval_epsilon",
        "8/255",
        "--output_file",
        result_file,
    ]
    _run(command, os.path.join(out, "autoattack", "run.log"))
    with open(result_file) as f:
        run = json.load(f)["runs"][0]
    return {
        "command": "cure-hf evaluate --model_name_or_path <main job, seed 0, 2 threads> --dataset_name digits "
        "--eval_attacks clean,pgd20,cw,autoattack --eval_max_examples 100 --eval_epsilon 8/255",
        "eps": run["eps"],
        "seconds": run["seconds"],
        "metrics": run["metrics"],
        "autoattack_stages": run["autoattack_stages"],
        "warnings": run["warnings"],
    }


def part_methods(out: str) -> dict:
    folder = os.path.join(out, "methods")
    args = ["--seeds", "0,1,2", "--autoattack", "--autoattack_examples", "100", "--output_dir", folder]
    _run([sys.executable, os.path.join(ROOT, "recipes", "compare_methods.py"), *args], os.path.join(folder, "run.log"))
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    os.makedirs(os.path.join(ROOT, "docs", "images"), exist_ok=True)
    shutil.copyfile(
        os.path.join(folder, "tradeoff.png"), os.path.join(ROOT, "docs", "images", "compare_methods_tradeoff.png")
    )
    with open(os.path.join(folder, "results.md")) as f:
        setup = f.read().strip().split("\n\n", 1)[1]
    return {
        "command": "python recipes/compare_methods.py " + " ".join(args[:-2]),
        "rows": results["rows"],
        "setup": setup,
        "settings": results["setup"],
    }


ABLATION_FILE = os.path.join(ROOT, "docs", "results", "ablation_wa_awp.json")


def part_ablation(out: str, rerun: bool = True) -> dict:
    """Run recipes/ablation_wa_awp.py (about an hour on 2 cores); ``rerun=False`` reads the run on record."""
    if rerun:
        command = [
            sys.executable,
            os.path.join(ROOT, "recipes", "ablation_wa_awp.py"),
            "--output_dir",
            os.path.dirname(ABLATION_FILE),
            "--work_dir",
            os.path.join(out, "ablation"),
        ]
        _run(command, os.path.join(out, "ablation", "run.log"))
    with open(ABLATION_FILE) as f:
        results = json.load(f)
    section = {
        "command": "python recipes/ablation_wa_awp.py --output_dir docs/results",
        "summary": results["summary"],
        "settings": results["settings"],
    }
    if not rerun:  # the run on record keeps its own wall time; its date is the file's last commit
        date = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", ABLATION_FILE], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        here = machine()
        section.update(
            recorded_run=True,
            wall_seconds=round(results["wall_seconds"], 1),
            date=date or "unknown",
            machine={
                "gpu": None,
                "cpu": here["cpu"],
                "cores": 2,
                "torch": here["torch"],
                "note": "2 cores shared with other jobs, 1 thread per run",
            },
        )
    return section


def part_gpu(out: str) -> dict:
    """On a CUDA machine: run benchmarks/gpu_run.sh. Elsewhere: the recorded H100 runs (GPU_RUNS)."""
    import torch

    sources = list(GPU_RUNS)
    if torch.cuda.is_available():
        folder = os.path.join(out, "gpu")
        os.makedirs(folder, exist_ok=True)
        subprocess.run(
            ["bash", os.path.join(ROOT, "benchmarks", "gpu_run.sh")],
            env=dict(_environment(), OUT=folder),
            cwd=ROOT,
            check=True,
        )
        sources = [os.path.join(folder, "bench.json")]
    runs = []
    for source in sources:
        with open(source) as f:
            bench = json.load(f)
        runs.append(
            {
                "source": os.path.relpath(source, ROOT),
                "steps": int(bench["config"]["steps"]),
                "trainer_s_per_step": bench["trainer"],
                "plain_s_per_step": bench["plain"],
                "trainer_syncs": {k: v["count"] for k, v in bench.get("trainer_syncs", {}).items()},
            }
        )
    section = {"command": "bash benchmarks/gpu_run.sh", "runs": runs, "epoch_examples": 50000, "batch_size": 128}
    if not torch.cuda.is_available():  # runs on record: dated by their commits; their wall time was not recorded
        dates = [
            subprocess.run(
                ["git", "log", "-1", "--format=%cs", "--", source], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            for source in sources
        ]
        section.update(recorded_run=True, wall_seconds=None, date=" and ".join(d for d in dates if d) or "unknown")
    return {
        **section,
        "machine": {
            "gpu": "NVIDIA H100 80GB HBM3 (device machine, 16 CPU cores)",
            "cpu": None,
            "cores": None,
            "torch": "2.11.0+cu130",
        }
        if not torch.cuda.is_available()
        else machine(),
    }


# --- rendering the blocks ------------------------------------------------------------------------------------------
def _machine_line(section: dict) -> str:
    m = section["machine"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores']} cores"
    wall = f"; wall time {section['wall_seconds'] / 60:.1f} min" if section.get("wall_seconds") else ""
    return f"{where}; torch {m['torch']}; {section['date']}{wall}"


def render_main_job(results: dict) -> str:
    section = results["main_job"]
    report = {"runs": section["runs"], "summary": section["summary"]}
    s = section["summary"]
    verdict = "; ".join(f"{name.replace('_', ' ')}: {'yes' if ok else 'NO'}" for name, ok in section["band"].items())
    return "\n".join(
        [
            "```",
            "$ python recipes/reproduce_readme.py --parts main_job",
            reproduce_main_job.format_table(report),
            "```",
            "",
            f"Six runs (seeds 0, 1, 2 x 1 and 2 CPU threads), {_machine_line(section)}. Median (range): stage-0 clean "
            f"{s['stage0_clean']['median']:.4f} ({s['stage0_clean']['range']:.4f}), CURE clean "
            f"{s['final_clean']['median']:.4f} ({s['final_clean']['range']:.4f}), CURE PGD-20 "
            f"{s['final_pgd']['median']:.4f} ({s['final_pgd']['range']:.4f}), stage-0 PGD-20 "
            f"{s['stage0_pgd']['median']:.4f} ({s['stage0_pgd']['range']:.4f}). Band: {verdict}.",
        ]
    )


def render_autoattack(results: dict) -> str:
    a = results["autoattack"]
    m = a["metrics"]
    per_attack = ", ".join(f"{k} {100 * v:.2f}" for k, v in a["autoattack_stages"].items())
    cells = [
        ("clean", m.get("accuracy")),
        ("pgd20", m.get("pgd20_accuracy")),
        ("cw", m.get("cw_accuracy")),
        ("autoattack", m.get("autoattack_accuracy")),
    ]
    return "\n".join(
        [
            "```",
            f"$ {a['command']}",
            "  ".join(f"{name:>10}" for name, _ in cells),
            "  ".join(f"{100 * v:>10.2f}" if v is not None else f"{'-':>10}" for _, v in cells),
            f"AutoAttack (standard), robust accuracy after each attack: {per_attack}" if per_attack else "",
            "```",
            "",
            f"{m['n_examples']} test images, eps {a['eps']:.5f}"
            + (f"; warnings: {'; '.join(a['warnings'])}" if a["warnings"] else "; no gradient-masking warning")
            + f"; {_machine_line(a)}.",
        ]
    )


def render_methods(results: dict) -> str:
    section = results["methods"]
    import compare_methods  # recipes/ is on sys.path (top of this file)

    args = argparse.Namespace(eval_pgd_steps=section["settings"]["eval_pgd_steps"], autoattack=True)
    return "\n".join(
        [
            "```",
            f"$ {section['command']}",
            "```",
            "",
            compare_methods.markdown_table(section["rows"], args),
            "",
            f"{section['setup']}. Machine: {_machine_line(section)}.",
        ]
    )


def render_ablation(results: dict) -> str:
    section = results["ablation"]
    lines = ["| variant | clean | PGD-20 | AutoAttack (first 100) | best − last PGD-20 |", "|---|---|---|---|---|"]
    for row in section["summary"]:
        cell = lambda key: f"{100 * row[key]['mean']:.1f} ± {100 * row[key]['std']:.1f}"
        lines.append(
            f"| {row['label']} | {cell('clean')} | {cell('pgd')} | {cell('autoattack')} | {cell('best_minus_last')} |"
        )
    settings = section["settings"]
    lines += [
        "",
        f"Mean ± std over seeds {settings.get('seeds')} in percent; eps {settings.get('epsilon')}, "
        f"{settings.get('model')} on the digits at {settings.get('image_size')}x{settings.get('image_size')}; "
        f"`{section['command']}`; {_machine_line(section)}.",
    ]
    return "\n".join(lines)


def render_gpu(results: dict) -> str:
    """Per run: ms per step in the trainer (fp32 and speed_preset='fast') and in a plain loop, the trainer's
    overhead over the plain loop, and the CIFAR-10 epoch (50,000 images) of the fast trainer."""
    section = results["gpu"]
    steps_per_epoch = -(-section["epoch_examples"] // section["batch_size"])
    lines = [
        "```",
        f"$ {section['command']}",
        f"{'run':<5}{'method':<8}{'trainer fp32':>14}{'plain fp32':>12}{'overhead':>10}{'trainer fast':>14}"
        f"{'plain fast':>12}{'overhead':>10}{'fast s/epoch':>14}",
    ]
    for n, run in enumerate(section["runs"], 1):
        trainer, plain = run["trainer_s_per_step"], run["plain_s_per_step"]
        for method in ("cure", "trades", "pgd", "clean"):
            t32, p32, tf, pf = (
                trainer["fp32"][method],
                plain["fp32"][method],
                trainer["fast"][method],
                plain["fast"][method],
            )
            lines.append(
                f"{n:<5}{method:<8}{1e3 * t32:>11.1f} ms{1e3 * p32:>9.1f} ms{100 * (t32 / p32 - 1):>+9.1f}%"
                f"{1e3 * tf:>11.1f} ms{1e3 * pf:>9.1f} ms{100 * (tf / pf - 1):>+9.1f}%"
                f"{tf * steps_per_epoch:>12.1f} s"
            )
    lines += [
        "```",
        "",
        "; ".join(
            f"run {n}: {run['steps']} timed steps per configuration, {run['source']}"
            for n, run in enumerate(section["runs"], 1)
        )
        + f". Machine: {_machine_line(section)}.",
    ]
    return "\n".join(lines)


RENDERERS: Dict[str, Callable[[dict], str]] = {
    "main_job": render_main_job,
    "autoattack": render_autoattack,
    "methods": render_methods,
    "ablation": render_ablation,
    "gpu": render_gpu,
}
BLOCK = re.compile(r"(<!-- numbers:(\w+) -->)(.*?)(<!-- /numbers:\2 -->)", re.S)


def render_document(text: str, results: dict) -> str:
    """``text`` with every ``<!-- numbers:NAME -->`` block rewritten from ``results`` (blocks without results stay)."""

    def replace(match):
        name = match.group(2)
        if name not in RENDERERS:
            raise ValueError(f"unknown numbers block {name!r}; known: {sorted(RENDERERS)}")
        if name not in results:
            return match.group(0)
        return match.group(1) + "\n" + RENDERERS[name](results) + "\n" + match.group(4)

    return BLOCK.sub(replace, text)


def blocks(text: str) -> Dict[str, str]:
    """Each numbers block's text (without its markers), by name."""
    return {m.group(2): m.group(3).strip("\n") for m in BLOCK.finditer(text)}


# --- main ----------------------------------------------------------------------------------------------------------
def load_results(path: str = RESULTS_FILE) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts",
        default="main_job,autoattack,methods,ablation,gpu",
        help=f"comma-separated subset of {', '.join(PARTS)}",
    )
    parser.add_argument("--work_dir", default="outputs/reproduce_readme", help="the runs' own folders and logs")
    parser.add_argument("--results_file", default=RESULTS_FILE)
    parser.add_argument("--render_only", action="store_true", help="only rewrite the README blocks from the file")
    parser.add_argument(
        "--main_job_grid",
        default=None,
        help="main_job_grid.json of a finished `recipes/reproduce_main_job.py` run to use instead of "
        "running the six runs again",
    )
    parser.add_argument(
        "--ablation_on_record",
        action="store_true",
        help="the ablation part reads docs/results/ablation_wa_awp.json instead of rerunning it",
    )
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; allowed {list(PARTS)}")

    results = load_results(args.results_file)
    if not args.render_only:
        start_all = time.time()
        for part in parts:
            start = time.time()
            print(f"== {part} ==", flush=True)
            if part == "autoattack":
                section = part_autoattack(args.work_dir, (results.get("main_job") or {}).get("model_dir"))
            elif part == "main_job":
                section = part_main_job(args.work_dir, args.main_job_grid)
            elif part == "ablation":
                section = part_ablation(args.work_dir, rerun=not args.ablation_on_record)
            else:
                section = globals()[f"part_{part}"](args.work_dir)
            section.setdefault("machine", machine())
            section.setdefault("date", datetime.date.today().isoformat())
            section.setdefault("wall_seconds", round(time.time() - start, 1))
            results[part] = section
            os.makedirs(os.path.dirname(os.path.abspath(args.results_file)), exist_ok=True)
            with open(args.results_file, "w") as f:  # after every part: a late failure keeps the earlier ones
                json.dump(results, f, indent=2)
        print(f"parts {', '.join(parts)}: {(time.time() - start_all) / 60:.1f} min in all")
    for path in DOCUMENTS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        rendered = render_document(text, results)
        if rendered != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(rendered)
            print(f"rewrote the numbers blocks of {os.path.relpath(path, ROOT)}")
    for name in results:
        if name in RENDERERS:
            print(f"\n-- {name} --\n{RENDERERS[name](results)}")
    print(f"\nresults: {os.path.relpath(args.results_file, ROOT)}")
    return results


if __name__ == "__main__":
    main()
