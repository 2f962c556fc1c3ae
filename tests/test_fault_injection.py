"""Fault injection: a training process SIGKILLed at several points inside a checkpoint save, then resumed with
resume_from_checkpoint=True, ends with weights bit-identical to a run that was never interrupted (CPU, one thread)."""

import os
import signal
import subprocess
import sys

import torch
from conftest import load_script
from transformers import TrainerCallback

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "kill_during_save.py")


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_killed_during_a_checkpoint_save_resumes_bit_identical(tmp_path, one_thread):
    script = load_script(SCRIPT)
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p),
    )
    # all the killed runs at once: their start-up (imports) dominates and overlaps
    runs = {
        point: subprocess.Popen(
            [sys.executable, SCRIPT, point, str(tmp_path / point)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for point in script.POINTS
    }

    full = script.build(tmp_path / "full")
    full.train()
    expected, expected_revision = _weights(full), full.revision.module.state_dict()

    for point, process in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL, f"{point}: the run was not killed while saving\n{output[-3000:]}"
        folder = tmp_path / point
        complete = point == "renamed"  # killed after the rename: checkpoint-4 is whole
        assert (folder / "checkpoint-4").is_dir() == complete, point
        assert (folder / ".tmp-checkpoint-4").is_dir(), f"{point}: the interrupted save stays in its staging folder"

        resumed, started = script.build(folder), []
        resumed.add_callback(
            type(
                "Start",
                (TrainerCallback,),
                {"on_train_begin": lambda self, args, state, control, **kw: started.append(state.global_step)},
            )
        )
        resumed.train(resume_from_checkpoint=True)
        assert not (folder / ".tmp-checkpoint-4").exists(), "the resumed run cleans up the interrupted save"
        assert started == [4 if complete else 2] and resumed.state.global_step == 6, point
        got = _weights(resumed)
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"{point}: {len(different)} tensors differ from the uninterrupted run"
        assert all(
            torch.equal(a, b) for a, b in zip(expected_revision.values(), resumed.revision.module.state_dict().values())
        ), point
