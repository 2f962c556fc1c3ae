"""DDP with two CPU processes (torchrun, gloo): weight averaging and AWP keep the replicas identical.

The processes train on different shards of the batch, so the AWP proxy's gradient differs per process until it is
averaged, and each process's BatchNorm statistics differ until they are averaged after the step: the average and
the perturbation must nevertheless be bit-identical on both ranks.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_two_processes

SCRIPT = Path(__file__).parent / "scripts" / "dist_wa_awp.py"
RUNS = [
    {"name": "cure_wa_awp"},
    {
        "name": "trades_wa_awp_accumulation",
        "adv_method": "trades",
        "gradient_accumulation_steps": 2,
        "per_device_train_batch_size": 4,
    },
]


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_wa_awp")
    run_two_processes(SCRIPT, out, json.dumps(RUNS), timeout=240)
    return {run["name"]: [load_file(str(out / f"{run['name']}_rank{r}.safetensors")) for r in (0, 1)] for run in RUNS}


@pytest.mark.parametrize("run", [r["name"] for r in RUNS])
def test_average_and_perturbation_identical_on_both_ranks(states, run):
    rank0, rank1 = states[run]
    assert int(rank0["world_size"]) == 2 and int(rank0["average_step"]) == 3
    assert rank0.keys() == rank1.keys()
    steps = sorted({k.split(".")[1] for k in rank0 if k.startswith("batch.")})
    assert steps == ["0", "1", "2"]  # one perturbation per optimizer step, also with accumulation
    # the processes perturbed on different data ...
    assert all(not torch.equal(rank0[f"batch.{s}"], rank1[f"batch.{s}"]) for s in steps)
    # ... yet perturbed identically, and hold the same average (weights and BatchNorm statistics) and weights
    different = [k for k in rank0 if not k.startswith("batch.") and not torch.equal(rank0[k], rank1[k])]
    assert not different, f"ranks differ in {different[:6]}"
    perturbations = [k for k in rank0 if k.startswith("awp.")]
    assert perturbations and any(rank0[k].abs().sum() > 0 for k in perturbations)
    bn_mean = next(k for k in rank0 if k.startswith("average.") and k.endswith("running_mean"))
    assert not torch.equal(rank0[bn_mean], rank0[bn_mean.replace("average.", "working.")])  # averaged, not copied
