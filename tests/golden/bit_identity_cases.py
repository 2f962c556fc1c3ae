"""Fixed-seed training runs whose final state is kept on disk, so that a change to the trainer's structure can be
shown not to move a single bit (tests/test_bit_identity.py).

`python tests/golden/bit_identity_cases.py` (re)records every case into tests/golden/bit_identity.json; do that
only for a change that is *meant* to change the numbers, and say so in the commit. Each case's record holds, per
tensor of its final state (the model's weights and buffers, the revision model's with its step and generator, the
weight average's, and the optimizer state), the SHA-256 of its bytes and its float64 sum and sum of squares. The
hashes are exact on the machine kind they were recorded on (its torch version and CPU capability are recorded
too); elsewhere the sums still bound the difference.
The runs use the public API only (CURETrainingArguments, CURETrainer), one CPU thread and tiny timm models.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from typing import Dict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (model, CURETrainingArguments overrides)
CASES: Dict[str, tuple] = {
    "cure": ("test_resnet", {}),
    "cure_paper_hard_linear": (
        "test_resnet",
        {"prominence": "paper", "conservation": "hard", "revision_rate_schedule": "linear"},
    ),
    "cure_accumulation3": ("test_resnet", {"gradient_accumulation_steps": 3, "per_device_train_batch_size": 8}),
    "cure_vit_adamw_smoothing": (
        "test_vit",
        {"optim": "adamw_torch", "learning_rate": 1e-3, "label_smoothing_factor": 0.1, "max_grad_norm": 1.0},
    ),
    "cure_awp_wa": ("test_resnet", {"awp_gamma": "true", "awp_warmup_epochs": 0, "weight_averaging": "0.9"}),
    "cure_efficient": ("test_resnet", {"natural_warmup_epochs": 1, "max_steps": -1, "num_train_epochs": 2}),
    "pgd": ("test_resnet", {"adv_method": "pgd"}),
    "trades": ("test_resnet", {"adv_method": "trades"}),
    "trades_awp_wa": (
        "test_resnet",
        {"adv_method": "trades", "awp_gamma": "true", "awp_warmup_epochs": 0, "weight_averaging": "0.9"},
    ),
    "mart": ("test_resnet", {"adv_method": "mart"}),
    "fgsm_rs": ("test_resnet", {"adv_method": "fgsm_rs"}),
    "clean": ("test_resnet", {"adv_method": "clean"}),
}


def train_case(name: str, output_dir: str):
    """Train one case and return its trainer."""
    from cure_hf import CURETrainer, CURETrainingArguments
    from cure_hf.data import image_transform, load_digits_dataset
    from cure_hf.models import create_model

    model_name, overrides = CASES[name]
    data = load_digits_dataset()
    train = data["train"].select(range(64))
    train.set_transform(image_transform(32, train=True))
    torch.manual_seed(0)
    kwargs = {"image_size": 32, "patch_size": 8} if "vit" in model_name else {}
    model = create_model(model_name, 10, **kwargs)
    settings = dict(
        output_dir=output_dir,
        max_steps=4,
        per_device_train_batch_size=16,
        attack_steps=2,
        learning_rate=0.05,
        seed=0,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    args = CURETrainingArguments(**settings)
    trainer = CURETrainer(model, args, train_dataset=train)
    trainer.train()
    return trainer


def final_state(trainer) -> Dict[str, torch.Tensor]:
    """Every tensor the run ends with, under one flat namespace."""
    state: Dict[str, torch.Tensor] = {}
    model = trainer.accelerator.unwrap_model(trainer.model)
    for key, value in model.state_dict().items():
        state[f"model.{key}"] = value.detach().clone()
    revision = getattr(trainer, "revision", None)
    if revision is not None:
        for key, value in revision.module.state_dict().items():
            state[f"revision.{key}"] = value.detach().clone()
        state["revision_step"] = torch.tensor(revision.step)
        state["revision_generator"] = revision.generator.get_state().clone()
    average = getattr(trainer, "weight_average", None)
    if average is not None:
        for key, value in average.averaged.module.state_dict().items():
            state[f"weight_average.{key}"] = value.detach().clone()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            state[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().clone()
    return {k: v.contiguous() for k, v in state.items()}


RECORD_PATH = os.path.join(HERE, "bit_identity.json")


def digest(state: Dict[str, torch.Tensor]) -> Dict[str, list]:
    """Per tensor: [sha256 of its bytes, dtype, shape, float64 sum, float64 sum of squares]."""
    out = {}
    for key, value in sorted(state.items()):
        data = value.detach().cpu().contiguous()
        raw = data.view(torch.uint8) if data.dim() else data.reshape(1).view(torch.uint8)
        as64 = data.double()
        out[key] = [
            hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
            str(data.dtype),
            list(data.shape),
            float(as64.sum()),
            float((as64 * as64).sum()),
        ]
    return out


def run_digest(name: str) -> Dict[str, list]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        return digest(final_state(train_case(name, folder)))


def record(names=None) -> None:
    records = {}
    if os.path.exists(RECORD_PATH):
        with open(RECORD_PATH, encoding="utf-8") as f:
            records = json.load(f)
    records["_platform"] = platform()
    for name in names or CASES:
        records[name] = run_digest(name)
        print(f"recorded {name}: {len(records[name])} tensors")
    with open(RECORD_PATH, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=0, sort_keys=True)
        f.write("\n")


def platform() -> Dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": cpu_capability()}


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:
        return "unknown"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    record(sys.argv[1:] or None)
