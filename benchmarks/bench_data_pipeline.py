"""Images per second of the ImageNet data pipeline on this machine's CPU cores: JPEG decode + the training augmentation.

Each image is a JPEG held as bytes (as a parquet shard of ImageNet-1k holds it); an example is decoded to PIL, goes
through cure_hf's training transform (``image_transform(..., train=True, augment="timm")`` with the augmentation of
an ImageNet config: RandAugment, random erasing, random-resized crop to 224x224) and is batched by the collator the
Trainer uses (``collate_pixels``), in a torch DataLoader with 1 and then N worker processes. The JPEGs are synthetic,
written here at ImageNet's typical 500x375: smooth colour fields with texture and noise, so that they compress and
decode like photographs rather than like white noise.

Printed: the CPU time per image of the decode and of the augmentation (one core, in this process: the per-core rate,
which other load on the machine does not change), one line per worker count (images/s of wall time, ms per image
per worker), the N-to-1 ratio, and how many loader workers (cores) a GPU that consumes K images/s
(``--gpu-images-per-second``) needs at the per-core rate.

    python benchmarks/bench_data_pipeline.py                        # 1 and all available cores
    python benchmarks/bench_data_pipeline.py --workers 1,2,4 --gpu-images-per-second 1250
    python benchmarks/bench_data_pipeline.py --smoke                # seconds: small images, for the tests
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cure_hf.augmentation import AUGMENT_OPTIONS  # noqa: E402
from cure_hf.data import collate_pixels, image_transform  # noqa: E402
from cure_hf.parser import read_config_file  # noqa: E402

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
DEFAULT_CONFIG = os.path.join(RECIPES, "configs", "imagenet", "vit_b16_scratch_pgd.yaml")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def synthetic_jpegs(count: int, width: int, height: int, seed: int = 0, quality: int = 92) -> List[bytes]:
    """``count`` JPEG files (bytes): a low-resolution colour field upsampled (smooth regions and edges), plus a
    texture and noise: about the 110 KB an ImageNet training JPEG has on average (138 GB over 1.28M files)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        yy, xx = np.mgrid[0:height, 0:width]
        texture = 20 * np.sin(xx / rng.uniform(3, 12)) * np.cos(yy / rng.uniform(3, 12))
        pixels = field + texture[..., None] + rng.normal(0, 16, size=field.shape)
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        files.append(buffer.getvalue())
    return files


class JpegDataset(torch.utils.data.Dataset):
    """Decode in ``__getitem__`` (in the worker, as datasets' Image feature does), then the cure_hf transform."""

    def __init__(self, files: List[bytes], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        from PIL import Image

        image = Image.open(io.BytesIO(self.files[index]))
        out = self.transform({"image": [image], "label": [index % 1000]})
        return {"pixel_values": out["pixel_values"][0], "labels": out["labels"][0]}


def config_augmentation(path: str) -> Dict:
    """``augment`` and the augmentation options of a recipe config."""
    values = read_config_file(path)
    return {"augment": values.get("augment", "none"), **{k: values[k] for k in AUGMENT_OPTIONS if k in values}}


def images_per_second(dataset, workers: int, batch_size: int, epochs: int) -> float:
    """Throughput over ``epochs`` passes, after a first batch that pays for starting the workers."""
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_pixels,
        persistent_workers=workers > 0,
        drop_last=True,
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not timed
    count, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in iterator:
            count += len(batch["labels"])
        if epoch + 1 < epochs:
            iterator = iter(loader)
    seconds = time.perf_counter() - start
    return count / seconds


def cpu_milliseconds_per_image(files: List[bytes], transform, batch_size: int) -> Dict[str, float]:
    """CPU time (this process, one thread) per image of the decode, the transform and the collator: unlike wall
    time, it does not grow when other programs share the cores, so the per-core rate it gives holds on a busy
    machine too."""
    from PIL import Image

    decode = augment = collate = 0.0
    examples = []
    for index, data in enumerate(files):
        start = time.process_time()
        image = Image.open(io.BytesIO(data)).convert("RGB")  # convert() forces the decode (PIL decodes lazily)
        middle = time.process_time()
        out = transform({"image": [image], "label": [index % 1000]})
        end = time.process_time()
        decode, augment = decode + middle - start, augment + end - middle
        examples.append({"pixel_values": out["pixel_values"][0], "labels": out["labels"][0]})
        if len(examples) == batch_size:
            start = time.process_time()
            collate_pixels(examples)
            collate += time.process_time() - start
            examples = []
    collated = len(files) - len(examples)
    return {
        "decode": 1000 * decode / len(files),
        "augment": 1000 * augment / len(files),
        "collate": 1000 * collate / max(1, collated),
    }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="recipe config whose augmentation is timed")
    parser.add_argument("--images", type=int, default=384, help="distinct synthetic JPEGs")
    parser.add_argument("--image-size", default="500x375", help="JPEG width x height (ImageNet's typical)")
    parser.add_argument("--input-size", type=int, default=224, help="training crop (the model's input)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1, help="timed passes over the images per setting")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts (default: 1 and all cores)")
    parser.add_argument(
        "--gpu-images-per-second",
        type=float,
        default=1250.0,
        help="K: training images/s one GPU consumes; the workers it needs are printed",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny images and counts: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.image_size, args.input_size, args.batch_size = 16, "100x75", 64, 4
        args.workers = args.workers or "1,2"
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    cores = available_cores()
    workers = [int(w) for w in (args.workers or f"1,{cores}").split(",")]
    augmentation = config_augmentation(args.config)
    augment = augmentation.pop("augment")
    preprocessing = {
        "input_size": (3, args.input_size, args.input_size),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
    }
    transform = image_transform(preprocessing, train=True, augment=augment, augment_options=augmentation)
    files = synthetic_jpegs(args.images, width, height)
    dataset = JpegDataset(files, transform)
    mean_kb = sum(map(len, files)) / len(files) / 1024
    print(
        f"data pipeline: {len(files)} synthetic JPEGs {width}x{height} (mean {mean_kb:.0f} KiB) -> decode -> "
        f"augment={augment!r} {args.input_size}x{args.input_size} -> collate, batch {args.batch_size}"
    )
    print(f"augmentation options: {transform.augment_options}")
    print(
        f"machine: {cores} usable CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}; "
        "each loader worker runs one torch thread (the DataLoader's default)"
    )
    results: Dict[str, float] = {}
    cost = cpu_milliseconds_per_image(files, transform, args.batch_size)
    total = cost["decode"] + cost["augment"] + cost["collate"]
    per_core = 1000 / total
    results.update(
        decode_ms=cost["decode"],
        augment_ms=cost["augment"],
        collate_ms=cost["collate"],
        images_per_core_second=per_core,
    )
    print(
        f"CPU time per image (one core): decode {cost['decode']:.2f} ms + augmentation {cost['augment']:.2f} ms + "
        f"collate {cost['collate']:.2f} ms = {total:.2f} ms -> {per_core:.1f} images/s per core"
    )
    for count in workers:
        rate = images_per_second(dataset, count, args.batch_size, args.epochs)
        results[f"workers_{count}"] = rate
        print(f"workers {count:>3}: {rate:8.1f} images/s  ({1000 * count / rate:6.2f} ms per image per worker)")
    low, high = min(workers), max(workers)
    if high != low:
        ratio = results[f"workers_{high}"] / results[f"workers_{low}"]
        results["ratio"] = ratio
        print(f"RATIO workers {high} / workers {low}: {ratio:.2f}x (ideal {high / low:.0f}x)")
    # the CPU-time rate: a worker is a core; wall-time rates above also pay for whatever else shares the cores
    needed = math.ceil(args.gpu_images_per_second / per_core)
    results["workers_needed"] = needed
    print(
        f"a GPU consuming K = {args.gpu_images_per_second:g} images/s needs {needed} loader workers, one core each, "
        f"at {per_core:.1f} images/s per core (dataloader_num_workers of each GPU's process)"
    )
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # the loader workers are single-threaded too: one core per worker, as in training
    main()
