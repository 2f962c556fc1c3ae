"""CURETrainer.evaluate() on two processes; each rank writes the metrics it got to OUT_DIR/rank<R>.json.

Launched by tests/test_eval_distributed.py as
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/eval_distributed.py OUT_DIR N
(gloo on CPU). N examples in batches of 4 per process leave an uneven last round, which accelerate pads
with repeated examples; gather_for_metrics must drop them so that each example counts once.
"""

import json
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def tiny_model(seed: int = 0):
    from cure_hf.models import create_model

    torch.manual_seed(seed)
    return create_model("test_resnet", 10)


def test_split(n: int):
    from cure_hf.data import image_transform, load_digits_dataset

    test = load_digits_dataset()["test"].select(range(n))
    test.set_transform(image_transform(32, train=False))
    return test


def main(out_dir: str, n: int) -> None:
    from cure_hf import CURETrainer, CURETrainingArguments

    torch.set_num_threads(1)
    args = CURETrainingArguments(
        output_dir=os.path.join(out_dir, "run"),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        per_device_eval_batch_size=16,
        eval_attack_batch_size=4,
        eval_attacks="clean,pgd3,autoattack",
        eval_pgd_steps=3,
        autoattack_version="custom",
        autoattack_attacks="apgd-ce",
        dataloader_num_workers=0,
    )
    trainer = CURETrainer(tiny_model(), args, eval_dataset=test_split(n))
    metrics = trainer.evaluate()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"metrics": metrics, "world_size": world, "backend": backend}, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
