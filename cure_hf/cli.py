"""The ``cure-hf`` command line.

    cure-hf evaluate --model <timm name | hf-hub:<repo> | local dir> --dataset digits \\
        --attacks clean,pgd20,cw,autoattack --n-examples 1000 --eps 8/255 [--output results.json]
    cure-hf evaluate ... --eps 0,2/255,4/255,8/255 --plot eps.png      # robust accuracy against eps
    cure-hf plot-history <training output_dir> --output history.png     # clean / robust accuracy over training

``evaluate`` prints a table and writes JSON (metrics, AutoAttack per attack, warnings, settings). A timm
name builds an untrained model (no network) with the dataset's number of classes; a folder or Hub id
loads its weights (safetensors only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser", "run_evaluate", "format_table"]


def _pixel_values(text: str, name: str) -> List[float]:
    from .config import parse_pixel_value

    values = [parse_pixel_value(part, name) for part in text.split(",") if part.strip()]
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{name}={text!r}: give sizes in pixel units of [0, 1], e.g. 8/255 or 0,4/255,8/255")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cure-hf", description="Robust image classifiers: evaluation tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    ev = commands.add_parser("evaluate", help="Clean / PGD / CW / AutoAttack accuracy of a model on a dataset.")
    ev.add_argument("--model", required=True,
                    help="timm name (untrained), 'hf-hub:<repo>', 'local-dir:<folder>' or a folder saved by cure_hf")
    ev.add_argument("--dataset", default="digits",
                    help="'digits' (embedded, no network), 'imagefolder' (with --data-dir) or a datasets name")
    ev.add_argument("--data-dir", default=None, help="Folder of class sub-folders, with --dataset imagefolder.")
    ev.add_argument("--split", default="test", help="Split to evaluate (default: test).")
    ev.add_argument("--attacks", default="clean,pgd20,cw,autoattack",
                    help="Comma-separated: clean, pgd<K> (pgd20), cw, cw<K>, autoattack (default: all four)")
    ev.add_argument("--n-examples", type=int, default=None, help="Evaluate the first N examples (default: all).")
    ev.add_argument("--eps", default="8/255", help="Attack radius, or a comma-separated list (then one run per eps).")
    ev.add_argument("--step-size", default=None, help="PGD/CW step (default: eps / 4).")
    ev.add_argument("--steps", type=int, default=20, help="Steps of 'pgd' and 'cw' without a number (default 20).")
    ev.add_argument("--restarts", type=int, default=1, help="Random restarts of PGD/CW (default 1).")
    ev.add_argument("--norm", default="Linf", choices=["Linf", "L2"], help="Threat model (L2: clean and autoattack).")
    ev.add_argument("--autoattack-version", default="standard", choices=["standard", "plus", "rand", "custom"])
    ev.add_argument("--autoattack-attacks", default=None,
                    help="With --autoattack-version custom: e.g. apgd-ce,apgd-t")
    ev.add_argument("--batch-size", type=int, default=128, help="Examples per attack batch (default 128).")
    ev.add_argument("--image-size", type=int, default=None, help="Input size (default: the model's, else 32).")
    ev.add_argument("--patch-size", type=int, default=None, help="ViT patch size for an untrained timm name.")
    ev.add_argument("--seed", type=int, default=0, help="Seed of the attacks' random starts (default 0).")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ev.add_argument("--output", default="robust_eval.json", help="JSON result file (default: robust_eval.json).")
    ev.add_argument("--plot", default=None, help="PNG of robust accuracy against eps (with several --eps values).")

    ph = commands.add_parser("plot-history", help="PNG of clean and robust accuracy over training.")
    ph.add_argument("run", help="A training output_dir (or its trainer_state.json).")
    ph.add_argument("--output", default=None, help="PNG path (default: <run>/accuracy_history.png).")
    ph.add_argument("--prefix", default="eval", help="Metric prefix (default: eval).")
    return parser


def _is_timm_name(spec: str) -> bool:
    return not (spec.startswith(("hf-hub:", "local-dir:")) or os.path.isdir(spec) or "/" in spec)


def _load_model(spec: str, num_classes: int, image_size: Optional[int], patch_size: Optional[int]):
    """The model to attack, through cure_hf's loader (timm names, Hub ids, local folders; safetensors only)."""
    from .hub import load_model

    if _is_timm_name(spec):
        return load_model(spec, num_classes, image_size=image_size or 32, patch_size=patch_size)
    return load_model(spec, image_size=image_size)


def _load_split(args, image_size: int):
    from .data import load_image_dataset

    name = args.dataset
    kwargs: Dict[str, Any] = {"image_size": image_size}
    if name == "imagefolder":
        kwargs.update(train_dir=args.data_dir, test_dir=args.data_dir)
    if args.split not in ("train", "test"):
        kwargs["test_split"] = args.split
    splits, num_classes = load_image_dataset(name, **kwargs)
    split = splits["train" if args.split == "train" else "test"]
    if args.n_examples is not None:
        if args.n_examples < 1:
            raise SystemExit(f"--n-examples={args.n_examples}: give a positive number of examples, or leave it out for all")
        split = split.select(range(min(args.n_examples, len(split))))
    return split, num_classes


def run_evaluate(args) -> Dict[str, Any]:
    """``cure-hf evaluate``: returns the result written to ``--output``."""
    import torch

    from .data import collate_pixels, set_preprocessing
    from .evaluation import AutoAttackConfig, evaluate_robustness, log_evaluation_warnings, parse_attacks

    eps_values = _pixel_values(args.eps, "--eps")
    step_size = _pixel_values(args.step_size, "--step-size")[0] if args.step_size else None
    parse_attacks(args.attacks, default_steps=args.steps)  # fail on a typo before loading anything
    autoattack = AutoAttackConfig(version=args.autoattack_version, attacks=args.autoattack_attacks,
                                  norm=args.norm, seed=args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # The model decides the input size; a timm name needs the dataset's number of classes first.
    probe_size = args.image_size or 32
    model = None
    if not _is_timm_name(args.model):
        model = _load_model(args.model, None, args.image_size, args.patch_size)
        size = getattr(model, "input_size", None)
        probe_size = args.image_size or (int(size[-1]) if size else 32)
    dataset, num_classes = _load_split(args, probe_size)
    if model is None:
        model = _load_model(args.model, num_classes, probe_size, args.patch_size)
    set_preprocessing(dataset, model)  # the pixels the model was evaluated on in training (its saved preprocessing)
    model.to(device).eval()
    with torch.no_grad():
        sample = collate_pixels([dataset[0]])["pixel_values"].to(device)
        from .attacks import logits_of

        out_classes = logits_of(model(sample)).shape[-1]
    if out_classes != num_classes:
        raise SystemExit(f"--model {args.model} has {out_classes} outputs but --dataset {args.dataset} has "
                         f"{num_classes} classes; evaluate it on a dataset with the classes it was trained on")

    runs = []
    for eps in eps_values:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_pixels)
        start = time.perf_counter()
        result = evaluate_robustness(
            model, loader, args.attacks, eps=eps, step_size=step_size, steps=args.steps, restarts=args.restarts,
            generator=generator, device=device, autoattack=autoattack, progress=sys.stderr.isatty(),
        )
        log_evaluation_warnings(result, f"eps={eps:.5f}")
        runs.append({"eps": eps, "seconds": round(time.perf_counter() - start, 2), **result.to_dict()})

    output = {"model": args.model, "dataset": args.dataset, "split": args.split, "device": str(device),
              "runs": runs, "warnings": sorted({w for run in runs for w in run["warnings"]})}
    print(format_table(runs))
    for warning in output["warnings"]:
        print(f"WARNING: {warning}")
    if args.output:
        directory = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(directory, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(output, f, indent=2)
        print(f"wrote {args.output}")
    if args.plot:
        from .plots import plot_accuracy_vs_eps

        plot_accuracy_vs_eps({run["eps"]: run["metrics"] for run in runs}, args.plot, title=f"{args.model} on {args.dataset}")
        print(f"wrote {args.plot}")
    return output


def format_table(runs: Sequence[Dict[str, Any]]) -> str:
    """One row per eps: n, then each accuracy in percent; AutoAttack's per-attack accuracies below."""
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run["metrics"] if k.endswith("accuracy") and k not in keys]
    keys = sorted(keys, key=lambda k: (k != "accuracy", k == "robust_accuracy"))
    header = ["eps", "n"] + [k.replace("_accuracy", "") if k != "accuracy" else "clean" for k in keys] + ["seconds"]
    rows = [header]
    for run in runs:
        eps = run["eps"]
        eps_text = f"{round(eps * 255)}/255" if abs(eps * 255 - round(eps * 255)) < 1e-6 else f"{eps:.4f}"
        rows.append([eps_text, str(run["metrics"].get("n_examples", ""))]
                    + [f"{100 * run['metrics'][k]:.2f}" if k in run["metrics"] else "-" for k in keys]
                    + [f"{run['seconds']:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for run in runs:
        if run.get("autoattack_stages"):
            stages = ", ".join(f"{name} {100 * acc:.2f}" for name, acc in run["autoattack_stages"].items())
            lines.append(f"AutoAttack at eps {run['eps']:.5f}, robust accuracy after each attack: {stages}")
    return "\n".join(lines)


def run_plot_history(args) -> str:
    from .plots import plot_training_history

    output = args.output or os.path.join(args.run if os.path.isdir(args.run) else os.path.dirname(args.run),
                                         "accuracy_history.png")
    path = plot_training_history(args.run, output, prefix=args.prefix)
    print(f"wrote {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cure_hf").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "plot-history":
            run_plot_history(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"cure-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
