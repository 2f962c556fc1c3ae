"""Shared fixtures: the embedded digits data and tiny timm models (CPU, seconds each)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def digits():
    """DatasetDict(train=1437, test=360) yielding {"pixel_values": 3x32x32 in [0, 1], "labels"}."""
    from cure_hf.data import image_transform, load_digits_dataset

    ds = load_digits_dataset()
    ds["train"].set_transform(image_transform(32, train=True))
    ds["test"].set_transform(image_transform(32, train=False))
    return ds


@pytest.fixture
def digits_batch(digits):
    """A fixed batch of 32 test examples."""
    from cure_hf.data import collate_pixels

    return collate_pixels([digits["test"][i] for i in range(32)])


def make_tiny_model(name: str = "test_resnet", num_classes: int = 10, seed: int = 0):
    """A tiny timm model taking pixels in [0, 1] (ViTs adapted to 32x32 with patch 8)."""
    from cure_hf.models import create_model

    torch.manual_seed(seed)
    kwargs = {"image_size": 32, "patch_size": 8} if "vit" in name else {}
    return create_model(name, num_classes, **kwargs)


@pytest.fixture
def tiny_model():
    return make_tiny_model


def load_script(path):
    """Import a helper script (e.g. what torchrun runs) as a module, to reuse its functions in one process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(str(path)))[0], str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_two_processes(script, *args, timeout: int = 300) -> None:
    """``torchrun --standalone --nproc_per_node 2 script args`` on CPU (gloo), offline; fails with its output."""
    import subprocess
    import sys

    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        *map(str, args),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stop_after_save(step: int):
    """A callback that simulates a crash right after the checkpoint of ``step`` is written."""
    from transformers import TrainerCallback

    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True
            return control

    return StopAfterSave()


def tiny_run_arguments(output_dir, **overrides):
    """CURETrainingArguments of a two-step CPU run of a tiny model (batch 8, PGD-1), with ``overrides``."""
    from cure_hf import CURETrainingArguments

    fields = dict(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=8,
        attack_steps=1,
        learning_rate=0.05,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    return CURETrainingArguments(**{**fields, **overrides})
