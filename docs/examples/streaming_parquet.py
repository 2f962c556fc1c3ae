"""CURE on a stream of parquet shards, end to end on a CPU: the embedded digits written as parquet files, read back
through `datasets` as a stream (or memory-mapped and sharded), trained for a few passes, interrupted at a checkpoint,
resumed, evaluated and saved (``--stop_at 0``: one uninterrupted run, which ends with the same weights).

``python streaming_parquet.py OUTPUT_DIR`` (``--memory_mapped`` for ``to_iterable_dataset``, ``--workers N`` for
DataLoader workers). The same loader reads ImageNet-1k: ``load_streaming_image_dataset("ILSVRC/imagenet-1k",
test_split="validation", ...)`` (docs/imagenet.md, section Streaming).
"""

import argparse
import hashlib
import os
import time

import torch
from transformers import TrainerCallback

from cure_hf import CURETrainer, CURETrainingArguments, create_model, load_digits_dataset, set_preprocessing
from cure_hf.streaming import load_streaming_image_dataset


def write_parquet_shards(folder: str, shards: int = 8) -> dict:
    """The digits' train split as ``shards`` parquet files and its test split as one: the layout of ImageNet-1k's
    parquet on the Hub (images as encoded PNG/JPEG bytes, a ClassLabel column), at 1,797 images."""
    digits = load_digits_dataset()
    os.makedirs(folder, exist_ok=True)
    for shard in range(shards):
        piece = digits["train"].shard(shards, shard, contiguous=True)
        piece.to_parquet(os.path.join(folder, f"train-{shard:05d}-of-{shards:05d}.parquet"))
    digits["test"].to_parquet(os.path.join(folder, "test-00000-of-00001.parquet"))
    return {"train": os.path.join(folder, "train-*.parquet"), "test": os.path.join(folder, "test-*.parquet")}


class StopAt(TrainerCallback):
    """Stops the run right after the checkpoint of ``step``: a crash, as far as the next run can tell."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--memory_mapped", action="store_true", help="load_dataset + to_iterable_dataset(num_shards)")
    parser.add_argument("--workers", type=int, default=2, help="dataloader_num_workers")
    parser.add_argument("--max_steps", type=int, default=60, help="23 steps are one pass at batch 64")
    parser.add_argument("--stop_at", type=int, default=40, help="the checkpoint the first run stops after (0: none)")
    cli = parser.parse_args()
    files = write_parquet_shards(os.path.join(cli.output_dir, "parquet"))
    streaming = dict(num_shards=8, cache_dir=os.path.join(cli.output_dir, "cache")) if cli.memory_mapped else {}
    data, num_classes = load_streaming_image_dataset(
        "parquet", data_files=files, augment="crop", max_eval_samples=200, streaming=not cli.memory_mapped, **streaming
    )
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes, image_size=32)
    set_preprocessing(data, model)
    print(f"train: {data['train']}")
    print(f"test: the first {len(data['test'])} examples of split {str(data['test'].split)!r}, held in memory")
    args = CURETrainingArguments(
        output_dir=os.path.join(cli.output_dir, "run"),
        adv_method="cure",
        epsilon="8/255",
        attack_steps=2,
        max_steps=cli.max_steps,  # a stream has no length: the run is counted in steps
        per_device_train_batch_size=64,
        learning_rate=0.1,
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=20,
        logging_steps=20,
        eval_strategy="no",
        eval_pgd_steps=10,
        dataloader_num_workers=cli.workers,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    start = time.time()
    trainer = CURETrainer(model, args, train_dataset=data["train"], eval_dataset=data["test"])
    if cli.stop_at:
        trainer.add_callback(StopAt(cli.stop_at))
        trainer.train()
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{cli.stop_at}")
        print(
            f"stopped after step {trainer.state.global_step} (pass {int(trainer.state.epoch)}), resuming from {checkpoint}"
        )
        fresh = create_model("test_resnet", num_classes, image_size=32)  # other weights: the checkpoint's replace them
        trainer = CURETrainer(fresh, args, train_dataset=data["train"], eval_dataset=data["test"])
        trainer.train(resume_from_checkpoint=checkpoint)
    else:
        trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    digest = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in weights.values())).hexdigest()[:16]
    print(
        f"steps {trainer.state.global_step} (passes begun: {int(trainer.state.epoch) + 1}); "
        f"clean {metrics['eval_accuracy']:.4f}, PGD-10 {metrics['eval_pgd10_accuracy']:.4f} on "
        f"{int(metrics['eval_n_examples'])} test images; weights sha256 {digest}; {time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
