#!/usr/bin/env python
"""Run the main job (`accelerate launch recipes/train_vit.py`) over seeds x CPU threads and report the band.

    python recipes/reproduce_main_job.py                                  # seeds 0,1,2 x threads 1,2: six runs
    python recipes/reproduce_main_job.py --seeds 0 --threads 1,2 --output_dir /tmp/grid -- --num_train_epochs 5

Each run is its own subprocess (`accelerate launch`, or `python` with ``--launcher python``) with
``--seed S --cpu_threads T`` and OMP_NUM_THREADS=T, writing to ``<output_dir>/seed<S>_threads<T>``. Arguments after
``--`` go to every run. The script collects stage-0 and final clean / PGD-20 accuracy and the wall time per run,
writes ``<output_dir>/main_job_grid.json`` and prints a table with the median and the range (max - min) of each
column. Runs are sequential: on a CPU machine two at a time would only fight for the cores and distort the times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_VIT = os.path.join(ROOT, "recipes", "train_vit.py")
# (column, header) of every run: accuracies of stage 0 (natural) and of the adversarial stage, wall time.
COLUMNS = (
    ("stage0_clean", "stage-0 clean"),
    ("stage0_pgd", "stage-0 PGD"),
    ("final_clean", "final clean"),
    ("final_pgd", "final PGD"),
    ("wall_seconds", "wall s"),
)


def _command(seed: int, threads: int, run_dir: str, extra_args: Sequence[str], launcher: str) -> List[str]:
    if launcher == "accelerate":
        head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    elif launcher == "python":
        head = [sys.executable]
    else:
        raise ValueError(f"launcher={launcher!r}: allowed 'accelerate' or 'python'")
    return head + [
        TRAIN_VIT,
        *extra_args,
        "--seed",
        str(seed),
        "--cpu_threads",
        str(threads),
        "--output_dir",
        run_dir,
        "--disable_tqdm",
        "true",
    ]


def _row(seed: int, threads: int, results: dict, wall: float, load: tuple) -> dict:
    """One run's numbers from its results.json ({"natural": ..., "<method>": ...})."""
    final_name = next((k for k in results if k != "natural"), None)
    natural, final = results.get("natural", {}), results.get(final_name, {})
    pgd = lambda m: next((v for k, v in m.items() if k.startswith("eval_pgd") and k.endswith("_accuracy")), None)
    return {
        "seed": seed,
        "threads": threads,
        "method": final_name,
        "stage0_clean": natural.get("eval_accuracy"),
        "stage0_pgd": pgd(natural),
        "final_clean": final.get("eval_accuracy"),
        "final_pgd": pgd(final),
        "stage0_train_seconds": natural.get("train_seconds"),
        "final_train_seconds": final.get("train_seconds"),
        "wall_seconds": wall,
        "load_average_before_after": load,
    }


def summarize(runs: Iterable[dict], columns: Sequence[str] = tuple(c for c, _ in COLUMNS)) -> Dict[str, dict]:
    """Median, min, max and range (max - min) of every column over the runs (columns missing everywhere: None)."""
    runs = list(runs)
    summary = {}
    for column in columns:
        values = [r[column] for r in runs if r.get(column) is not None]
        summary[column] = (
            None
            if not values
            else {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "range": max(values) - min(values),
                "n": len(values),
            }
        )
    return summary


def format_table(report: dict) -> str:
    header = f"{'seed':>4} {'threads':>7}" + "".join(f"{h:>15}" for _, h in COLUMNS)
    lines = [header, "-" * len(header)]
    fmt = lambda column, v: "-" if v is None else (f"{v:.1f}" if column == "wall_seconds" else f"{v:.4f}")
    for r in report["runs"]:
        lines.append(f"{r['seed']:>4} {r['threads']:>7}" + "".join(f"{fmt(c, r.get(c)):>15}" for c, _ in COLUMNS))
    lines.append("-" * len(header))
    for stat in ("median", "range"):
        cells = "".join(f"{fmt(c, (report['summary'].get(c) or {}).get(stat)):>15}" for c, _ in COLUMNS)
        lines.append(f"{stat:>12}" + cells)
    return "\n".join(lines)


def run_main_job_grid(
    seeds: Sequence[int],
    threads: Sequence[int],
    out_dir: str,
    extra_args: Sequence[str] = (),
    launcher: str = "accelerate",
) -> dict:
    """Run the main job once per (seed, threads), one after the other; return and save the report.

    The report: ``runs`` (one dict per run: seed, threads, stage0_clean, stage0_pgd, final_clean, final_pgd,
    wall_seconds, ...), ``summary`` (median / min / max / range per column, see :func:`summarize`), and the
    command line. Also written to ``<out_dir>/main_job_grid.json``; each run's log is ``<run dir>/run.log``.
    """
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # this checkout's cure_hf
    runs = []
    for seed in seeds:
        for n in threads:
            run_dir = os.path.join(out_dir, f"seed{seed}_threads{n}")
            os.makedirs(run_dir, exist_ok=True)
            command = _command(seed, n, run_dir, extra_args, launcher)
            load_before = os.getloadavg()[0]
            start = time.time()
            with open(os.path.join(run_dir, "run.log"), "w") as log:
                done = subprocess.run(
                    command, env=dict(env, OMP_NUM_THREADS=str(n)), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
                )
            wall = time.time() - start
            if done.returncode != 0:
                raise RuntimeError(
                    f"run seed={seed} threads={n} failed (exit {done.returncode}); see "
                    f"{os.path.join(run_dir, 'run.log')}"
                )
            with open(os.path.join(run_dir, "results.json")) as f:
                runs.append(_row(seed, n, json.load(f), wall, (load_before, os.getloadavg()[0])))
            print(
                f"seed {seed} threads {n}: "
                + ", ".join(f"{k} {runs[-1][k]:.4f}" for k, _ in COLUMNS[:-1] if runs[-1][k] is not None)
                + f", {wall:.0f} s",
                flush=True,
            )
    report = {
        "command": f"{launcher} recipes/train_vit.py {' '.join(extra_args)} --seed S --cpu_threads T".replace(
            "  ", " "
        ),
        "seeds": list(seeds),
        "threads": list(threads),
        "extra_args": list(extra_args),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "runs": runs,
        "summary": summarize(runs),
    }
    with open(os.path.join(out_dir, "main_job_grid.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    parser.add_argument("--output_dir", default="outputs/main_job_grid", help="one folder per run, and the JSON")
    parser.add_argument("--launcher", default="accelerate", choices=("accelerate", "python"))
    args = parser.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]
    report = run_main_job_grid(ints(args.seeds), ints(args.threads), args.output_dir, extra, args.launcher)
    print(format_table(report))
    print(f"results: {os.path.join(args.output_dir, 'main_job_grid.json')}")
    return report


if __name__ == "__main__":
    main()
