"""A CURE run that SIGKILLs itself in the middle of writing checkpoint-4, at the point named by argv[1]:

- ``revision``: after the revision model's state (the first file of the checkpoint),
- ``model``: after model.safetensors and config.json,
- ``optimizer``: after optimizer.pt and scheduler.pt,
- ``rename``: with every file written, just before the staging folder is renamed to checkpoint-4,
- ``renamed``: just after the rename, before the staging folder is removed.

``build(output_dir)`` is also what tests/test_fault_injection.py uses in-process for the runs it compares.
"""

import os
import signal
import sys

import torch

KILL_STEP = 4
POINTS = ("revision", "model", "optimizer", "rename", "renamed")


def build(output_dir, cls=None):
    from cure_hf import CURETrainer, CURETrainingArguments, create_model
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(48))
    train.set_transform(image_transform(16, train=True))  # no augmentation: every batch can be replayed exactly
    args = CURETrainingArguments(
        output_dir=str(output_dir),
        adv_method="cure",
        max_steps=6,
        per_device_train_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=3,
        revision_rate=0.5,
        dataloader_num_workers=0,
        disable_tqdm=True,
        eval_strategy="no",
    )
    torch.manual_seed(1)
    model = create_model("test_resnet", 10)
    return (cls or CURETrainer)(model, args, train_dataset=train)


def main(point, output_dir):
    import cure_hf.base_trainer as base_trainer
    from cure_hf import CURETrainer

    def die_at(here):
        if here == point:
            os.kill(os.getpid(), signal.SIGKILL)

    class KilledWhileSaving(CURETrainer):
        def _save_method_state(self, folder):
            super()._save_method_state(folder)
            if self.state.global_step == KILL_STEP:
                die_at("revision")

        def _save(self, output_dir=None, state_dict=None):
            super()._save(output_dir, state_dict)
            if self.state.global_step == KILL_STEP:
                die_at("model")

        def _save_optimizer_and_scheduler(self, output_dir):
            super()._save_optimizer_and_scheduler(output_dir)
            if self.state.global_step == KILL_STEP:
                die_at("optimizer")

    publish = base_trainer.publish_checkpoint

    def publish_then_maybe_die(staged, final):
        if final.endswith(f"checkpoint-{KILL_STEP}"):
            die_at("rename")
        publish(staged, final)
        if final.endswith(f"checkpoint-{KILL_STEP}"):
            die_at("renamed")

    base_trainer.publish_checkpoint = publish_then_maybe_die
    torch.set_num_threads(1)
    build(output_dir, KilledWhileSaving).train()
    sys.exit(3)  # never reached: the process was killed


if __name__ == "__main__":
    assert sys.argv[1] in POINTS, sys.argv[1]
    main(sys.argv[1], sys.argv[2])
