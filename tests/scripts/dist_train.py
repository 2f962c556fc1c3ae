"""Train a few CURETrainer runs and write each process's final state to safetensors.

Launched by tests/test_distributed.py as
    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/dist_train.py OUT_DIR RUNS_JSON
(gloo on CPU) and imported by the same tests for the one-process reference (`train_run`).
Every run in RUNS_JSON (a list of dicts, see `train_run`) writes OUT_DIR/<name>_rank<R>.safetensors holding
the model's parameters and buffers ("model.*"), the revision model's ("revision.*") and its step count.
Several runs share one launch because starting two Python processes with torch costs more than a run.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    from cure_hf.models import create_model

    torch.manual_seed(seed)
    kwargs = {"image_size": 32, "patch_size": 8} if "vit" in name else {}
    return create_model(name, 10, **kwargs)


def digits_subset(n: int):
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(n))
    train.set_transform(image_transform(32, train=True))
    return train


def ce_attack_trainer():
    """CURETrainer whose attack is PGD on the CE loss from the clean image (no random start).

    For comparing one process with two: CURE's own attack (TRADES KL) needs its random start, drawn per
    process, and from a zero start its gradient is rounding noise; the CE attack from x is deterministic.
    """
    from cure_hf import CURETrainer
    from cure_hf.attacks import pgd

    class CEAttackTrainer(CURETrainer):
        def craft_adversarial(self, model, x, labels, clean_logits=None):
            return pgd(
                model,
                x,
                labels,
                eps=self.args.epsilon,
                step_size=self.args.attack_step_size,
                steps=self.args.attack_steps,
                loss="ce",
                init="none",
            )

    return CEAttackTrainer


def only_what_the_run_reads(fields):
    """Drop the revision rate where no revision model runs: a setting nothing reads is refused."""
    from types import SimpleNamespace

    from cure_hf.components import resolved_revision

    probe = SimpleNamespace(adv_method=fields.get("adv_method", "cure"), revision=fields.get("revision"))
    return fields if resolved_revision(probe) else {k: v for k, v in fields.items() if k != "revision_rate"}


def train_run(spec: Dict[str, Any], out_dir: str) -> Dict[str, torch.Tensor]:
    """One run: spec keys name, model, per_device_batch, steps, examples, ce_attack, and CURETrainingArguments fields."""
    from cure_hf import CURETrainer, CURETrainingArguments

    spec = dict(spec)
    name = spec.pop("name")
    model_name = spec.pop("model", "test_resnet")
    examples = spec.pop("examples", 64)
    trainer_class = ce_attack_trainer() if spec.pop("ce_attack", False) else CURETrainer
    fields = dict(
        output_dir=os.path.join(out_dir, name),
        per_device_train_batch_size=spec.pop("per_device_batch", 8),
        max_steps=spec.pop("steps", 3),
        attack_steps=2,
        learning_rate=0.05,
        revision_rate=0.5,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    fields.update(spec)
    args = CURETrainingArguments(**only_what_the_run_reads(fields))
    model = tiny_model(model_name)
    trainer = trainer_class(model=model, args=args, train_dataset=digits_subset(examples))
    trainer.train()
    net = trainer.accelerator.unwrap_model(trainer.model)
    state = {f"model.{k}": v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}
    if trainer.revision is not None:
        state.update(
            {
                f"revision.{k}": v.detach().float().cpu().contiguous()
                for k, v in trainer.revision.module.state_dict().items()
            }
        )
        state["revision_step"] = torch.tensor([trainer.revision.step])
    state["global_step"] = torch.tensor([trainer.state.global_step])
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    state["world_size"] = torch.tensor([torch.distributed.get_world_size() if distributed else 1])
    state["backend_is_gloo"] = torch.tensor([int(distributed and torch.distributed.get_backend() == "gloo")])
    return state


def main(out_dir: str, runs_json: str) -> None:
    import time

    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    for spec in json.loads(runs_json):
        start = time.perf_counter()
        state = train_run(spec, out_dir)
        print(f"[dist_train] rank {rank} run {spec['name']}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        save_file(state, os.path.join(out_dir, f"{spec['name']}_rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
