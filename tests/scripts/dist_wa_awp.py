"""Train with weight averaging and AWP under DDP and write each process's view to safetensors.

Launched by tests/test_beyond_distributed.py as
    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/dist_wa_awp.py OUT_DIR RUNS_JSON
(gloo on CPU). Each run in RUNS_JSON (a list of dicts: name, and CURETrainingArguments fields) writes
OUT_DIR/<name>_rank<R>.safetensors with the averaged model ("average.*"), the working model ("working.*"),
every AWP perturbation ("awp.<step>.<parameter>") and a fingerprint of the first micro-batch each process
perturbed on ("batch.<step>": the sum of its pixels), which differs between processes.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_train import digits_subset, tiny_model  # noqa: E402


def only_what_the_run_reads(fields):
    """Drop the revision rate where no revision model runs: a setting nothing reads is refused."""
    from types import SimpleNamespace

    from cure_hf.components import resolved_revision

    probe = SimpleNamespace(adv_method=fields.get("adv_method", "cure"), revision=fields.get("revision"))
    return fields if resolved_revision(probe) else {k: v for k, v in fields.items() if k != "revision_rate"}


def train_run(spec, out_dir):
    from cure_hf import CURETrainer, CURETrainingArguments

    spec = dict(spec)
    name = spec.pop("name")
    fields = dict(
        output_dir=os.path.join(out_dir, name),
        per_device_train_batch_size=8,
        max_steps=3,
        attack_steps=1,
        learning_rate=0.05,
        revision_rate=0.5,
        weight_averaging=0.5,
        awp_gamma=True,
        awp_warmup_epochs=0,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    fields.update(spec)
    trainer = CURETrainer(
        model=tiny_model("test_resnet"),
        args=CURETrainingArguments(**only_what_the_run_reads(fields)),
        train_dataset=digits_subset(64),
    )
    state = {}
    perturb = trainer.awp.perturb_

    def perturb_spy(model, loss_of, step=None, reduce=None):
        seen = {}

        def recorded(proxy):  # the proxy's inputs are the first micro-batch's
            def record(module, inputs):
                seen.setdefault("x", inputs[0].detach().sum())  # returns None: the inputs stay as they are

            hook = proxy.register_forward_pre_hook(record)
            try:
                return loss_of(proxy)
            finally:
                hook.remove()

        perturbation, loss = perturb(model, recorded, step, reduce)
        state.update({f"awp.{step}.{k}": v.detach().cpu().contiguous() for k, v in perturbation.items()})
        state[f"batch.{step}"] = seen["x"].reshape(1).cpu()
        return perturbation, loss

    trainer.awp.perturb_ = perturb_spy
    trainer.train()
    net = trainer.accelerator.unwrap_model(trainer.model)
    state.update({f"working.{k}": v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()})
    state.update(
        {
            f"average.{k}": v.detach().float().cpu().contiguous()
            for k, v in trainer.weight_average.module.state_dict().items()
        }
    )
    state["average_step"] = torch.tensor([trainer.weight_average.step])
    state["world_size"] = torch.tensor(
        [torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1]
    )
    return state


def main(out_dir: str, runs_json: str) -> None:
    from safetensors.torch import save_file

    rank = int(os.environ.get("RANK", "0"))
    for spec in json.loads(runs_json):
        save_file(train_run(spec, out_dir), os.path.join(out_dir, f"{spec['name']}_rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
