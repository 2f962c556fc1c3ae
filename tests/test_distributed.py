"""DDP with two CPU processes (torchrun, gloo): replicas stay identical, and two processes equal one.

One torchrun launch (tests/scripts/dist_train.py) trains every run below; each rank writes its final
state (parameters, BatchNorm statistics, revision model) to safetensors, compared here.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import load_script, run_two_processes

SCRIPT = Path(__file__).parent / "scripts" / "dist_train.py"
STEPS = 3
COMMON = {"steps": STEPS, "examples": 48}
RUNS = [
    # BatchNorm model, several forward passes before one backward (the DDP trap), both prominence modes.
    {"name": "bn_cure", "model": "test_resnet", "adv_method": "cure", **COMMON},
    {
        "name": "bn_cure_paper_hard",
        "model": "test_resnet",
        "adv_method": "cure",
        "prominence": "paper",
        "conservation": "hard",
        **COMMON,
    },
    # No BatchNorm: two processes of 8 must equal one process of 16.
    {"name": "vit_cure", "model": "test_vit", "adv_method": "cure", "ce_attack": True, **COMMON},
    {"name": "vit_pgd", "model": "test_vit", "adv_method": "pgd", "attack_random_start": False, **COMMON},
]


def _load_script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def two_process_states(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    run_two_processes(SCRIPT, out, json.dumps(RUNS), timeout=240)
    return {run["name"]: [load_file(str(out / f"{run['name']}_rank{r}.safetensors")) for r in (0, 1)] for run in RUNS}


def _initial_model_state(name):
    return {f"model.{k}": v.float() for k, v in _load_script().tiny_model(name).state_dict().items()}


@pytest.mark.parametrize("run", ["bn_cure", "bn_cure_paper_hard"])
def test_two_processes_batchnorm_replicas_stay_identical(two_process_states, run):
    rank0, rank1 = two_process_states[run]
    assert int(rank0["world_size"]) == 2 and rank0["backend_is_gloo"].item() == 1
    assert int(rank0["global_step"]) == STEPS
    assert rank0.keys() == rank1.keys()
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"replicas differ after DDP training in {different[:8]}"
    # The run did train: weights and BatchNorm running statistics moved, the revision model was revised.
    initial = _initial_model_state("test_resnet")
    assert not torch.equal(rank0["model.model.fc.weight"], initial["model.model.fc.weight"])
    assert not torch.equal(rank0["model.model.bn1.running_mean"], initial["model.model.bn1.running_mean"])
    if run.startswith("bn_cure"):
        assert int(rank0["revision_step"]) == STEPS
        assert not torch.equal(rank0["revision.model.fc.weight"], initial["model.model.fc.weight"])
        assert not torch.equal(rank0["revision.model.bn1.running_mean"], initial["model.model.bn1.running_mean"])


@pytest.mark.parametrize("run", ["vit_cure", "vit_pgd"])
def test_two_processes_match_one_process_on_the_same_global_batch(two_process_states, run, tmp_path):
    rank0, rank1 = two_process_states[run]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    spec = dict(next(r for r in RUNS if r["name"] == run), per_device_batch=16)  # 2 x 8 = 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded machine, a second spinning thread costs 20x here
    try:
        single = _load_script().train_run(spec, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    initial = _initial_model_state("test_vit")
    moved = max((single[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3, "the reference run did not train"
    # Float tolerance, except that CURE's mask is discrete: an entry whose |grad| equals its tensor's quantile
    # up to rounding (the two runs sum the same gradients in another order) may fall on either side of it.
    # Such flips are rare and move an entry by about lr * |grad|; everything else agrees to float precision.
    flipped, total = 0, 0
    for key, value in single.items():
        if key in ("world_size", "backend_is_gloo"):
            continue
        close = torch.isclose(rank0[key], value, atol=1e-5, rtol=1e-4)
        flipped, total = flipped + int((~close).sum()), total + close.numel()
        assert (rank0[key] - value).abs().max() < 1e-3, key
    assert flipped <= (total * 1e-4 if run == "vit_cure" else 0), f"{flipped} of {total} entries differ"


def test_fsdp_is_refused_at_start_up(tiny_model, tmp_path):
    from cure_hf import CURETrainer, CURETrainingArguments

    args = CURETrainingArguments(output_dir=str(tmp_path), fsdp="full_shard", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"does not support fsdp=.*Supported: .*DDP"):
        CURETrainer(model=tiny_model("test_resnet"), args=args)


@pytest.mark.parametrize("setting", ["deepspeed", "accelerate_fsdp", "accelerate_deepspeed"])
def test_deepspeed_and_sharded_launch_configs_are_refused(setting):
    from accelerate.utils import DistributedType

    from cure_hf.runtime import refuse_unsupported_parallelism as _refuse_unsupported_parallelism

    # DeepSpeed is not installed here (TrainingArguments itself needs it to accept `deepspeed=`), so the check
    # is exercised on what it reads: the arguments and the accelerator that `accelerate launch` configured.
    args = SimpleNamespace(fsdp=None, deepspeed="ds_config.json" if setting == "deepspeed" else None)
    kind = {"accelerate_fsdp": DistributedType.FSDP, "accelerate_deepspeed": DistributedType.DEEPSPEED}.get(setting)
    accelerator = SimpleNamespace(distributed_type=kind or DistributedType.NO, parallelism_config=None)
    with pytest.raises(ValueError, match=r"does not support .*(deepspeed|FSDP|DEEPSPEED).*Supported: "):
        _refuse_unsupported_parallelism(args, accelerator)
    _refuse_unsupported_parallelism(
        SimpleNamespace(fsdp=None, deepspeed=None),
        SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, parallelism_config=None),
    )


def test_buffer_broadcast_with_two_forward_passes_is_refused_under_ddp():
    from cure_hf.runtime import refuse_unsupported_parallelism as _refuse_unsupported_parallelism

    # Seen on an H100 (tests/scripts/dist_gpu_check.py): cuDNN BatchNorm + broadcast_buffers=True raises
    # "modified by an inplace operation" in the TRADES/CURE pattern. gloo on CPU does not show it.
    args = SimpleNamespace(fsdp=None, deepspeed=None, adv_method="cure", ddp_broadcast_buffers=True, world_size=2)
    with pytest.raises(ValueError, match=r"ddp_broadcast_buffers=True is invalid for adv_method='cure'.*Fix: keep"):
        _refuse_unsupported_parallelism(args)
    for allowed in (dict(world_size=1), dict(adv_method="pgd"), dict(ddp_broadcast_buffers=False)):
        _refuse_unsupported_parallelism(SimpleNamespace(**{**vars(args), **allowed}))


def test_torch_compile_runs_the_attack_loop_and_paper_prominence_like_eager(tmp_path):
    """torch_compile=True: the attack runs on the compiled module, whose parameter names carry `_orig_mod.`."""
    from cure_hf import CURETrainer, CURETrainingArguments

    script = _load_script()
    data = script.digits_subset(16)
    params = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for compiled in (False, True):
            # The "eager" backend runs TorchDynamo's capture without code generation: seconds on a CPU.
            extra = dict(torch_compile=True, torch_compile_backend="eager") if compiled else {}
            args = CURETrainingArguments(
                output_dir=str(tmp_path / str(compiled)),
                per_device_train_batch_size=8,
                max_steps=2,
                attack_steps=2,
                adv_method="cure",
                prominence="paper",
                conservation="hard",
                revision_rate=1.0,
                learning_rate=0.05,
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                use_cpu=True,
                seed=0,
                **extra,
            )
            trainer = CURETrainer(model=script.tiny_model("test_resnet"), args=args, train_dataset=data)
            trainer.train()
            assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule) == compiled
            params[compiled] = [p.detach().clone() for p in trainer.model.parameters()]
    finally:
        torch.set_num_threads(threads)
    for eager, compiled in zip(params[False], params[True]):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
