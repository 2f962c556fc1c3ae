"""trainer.evaluate() on two CPU processes (torchrun, gloo) counts each example once and agrees with one process."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script, run_two_processes

SCRIPT = Path(__file__).parent / "scripts" / "eval_distributed.py"
N_EXAMPLES = 37  # 2 processes x batches of 4: the last round is padded with 3 repeated examples


def _script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def two_process_metrics(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_ddp")
    run_two_processes(SCRIPT, out, N_EXAMPLES, timeout=300)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_count_each_example_once(two_process_metrics):
    rank0, rank1 = two_process_metrics
    assert rank0["world_size"] == 2 and rank0["backend"] == "gloo"
    timing = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_model_preparation_time")
    for metrics in (rank0["metrics"], rank1["metrics"]):
        assert all(key in metrics for key in timing[:3] + ("eval_loss",)), "the Trainer's own evaluation ran"
    same = {k: v for k, v in rank0["metrics"].items() if k not in timing}
    assert same == {k: v for k, v in rank1["metrics"].items() if k not in timing}, (
        "every process reports the same, gathered numbers"
    )
    metrics = rank0["metrics"]
    assert metrics["eval_n_examples"] == N_EXAMPLES
    assert metrics["eval_pgd3_accuracy"] <= metrics["eval_accuracy"]
    assert metrics["eval_autoattack_accuracy"] <= metrics["eval_accuracy"]
    assert metrics["eval_gradient_masking_suspected"] == 0.0


def test_two_processes_match_one_process(two_process_metrics):
    from cure_hf.data import collate_pixels
    from cure_hf.evaluation import evaluate_robustness

    script = _script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = script.test_split(N_EXAMPLES)
        batch = collate_pixels([dataset[i] for i in range(N_EXAMPLES)])
        one = evaluate_robustness(script.tiny_model(), [batch], "clean").metrics
    finally:
        torch.set_num_threads(threads)
    two = two_process_metrics[0]["metrics"]
    assert two["eval_accuracy"] == pytest.approx(one["accuracy"])
    assert one["n_examples"] == two["eval_n_examples"]
