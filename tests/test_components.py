"""Component behaviour that the whole-step tests do not reach: the distributed branch of the paper's prominence,
the components' own checkpoint loading and their messages (found by mutation testing, docs/safety.md)."""

import logging

import pytest
import torch
from conftest import make_tiny_model, stop_after_save, tiny_run_arguments

from cure_hf import CURETrainer
from cure_hf.components import Conservation


@pytest.fixture(scope="module")
def small_train():
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(16))
    train.set_transform(image_transform(16, train=False))
    return train


class _Args:
    clean_weight = 0.25


def _scores_of(grads, clean_weight=0.25):
    conservation = Conservation.__new__(Conservation)  # the method under test needs only its arguments and sums
    conservation.args = _Args()
    conservation._paper_grads = grads
    return conservation._paper_scores(params=None)


def test_the_papers_prominence_in_a_process_group_is_the_averaged_gradients_score(tmp_path):
    """One process in a gloo group: the all-reduce averages over one replica, so the scores are the single-process
    ones, alpha |clean| + (1 - alpha) |adv| per tensor (tensors of different sizes: the flat buffer's offsets)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (5,), (2, 2, 2)]
    clean = [torch.randn(s, generator=g) for s in shapes]
    adv = [torch.randn(s, generator=g) for s in shapes]
    expected = [0.25 * c.abs() + 0.75 * a.abs() for c, a in zip(clean, adv)]
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        scores = _scores_of([[c.clone() for c in clean], [a.clone() for a in adv]])
    finally:
        torch.distributed.destroy_process_group()
    assert len(scores) == 3
    for score, want in zip(scores, expected):
        assert score.shape == want.shape and torch.allclose(score, want, atol=0, rtol=1e-6)


def test_the_papers_prominence_without_its_gradients_names_what_is_missing():
    with pytest.raises(RuntimeError, match=r"^prominence='paper' found no accumulated clean/adversarial gradients"):
        _scores_of(None)


def test_layer_telemetry_without_conservation_says_how_to_switch_it_on(tmp_path):
    with pytest.raises(
        ValueError, match=r"Fix: switch conservation on \(conservation='soft'\) or drop layer_telemetry"
    ):
        tiny_run_arguments(tmp_path, adv_method="cure", conservation="none", layer_telemetry=True)


@pytest.fixture
def cure_checkpoint(tmp_path, small_train):
    args = tiny_run_arguments(tmp_path / "run", adv_method="cure", max_steps=3, save_strategy="steps", save_steps=2)
    CURETrainer(make_tiny_model(), args, train_dataset=small_train, callbacks=[stop_after_save(2)]).train()
    return tmp_path / "run" / "checkpoint-2"


def test_the_revision_component_loads_its_checkpoint_into_a_revision_model_that_exists(
    tmp_path, small_train, cure_checkpoint
):
    from safetensors.torch import load_file

    trainer = CURETrainer(make_tiny_model(seed=5), tiny_run_arguments(tmp_path / "new", adv_method="cure"))
    revision = trainer.component("revision")
    revision.ensure()  # already created (a trainer that trained before), so the state loads at once
    revision.load_state(str(cure_checkpoint))
    saved = load_file(str(cure_checkpoint / "revision.safetensors"))
    module = revision.revision.module.state_dict()
    assert all(torch.equal(value, saved[f"module.{name}"]) for name, value in module.items())
    assert not torch.equal(module["model.conv1.0.weight"], make_tiny_model(seed=5).state_dict()["model.conv1.0.weight"])
    assert revision.revision.step == 2 and revision._checkpoint is None


@pytest.mark.parametrize(
    "changes, refused", [({}, True), ({"allow_partial_resume": True}, False), ({"natural_warmup_epochs": 1}, False)]
)
def test_the_revision_component_refuses_a_checkpoint_without_its_state(tmp_path, changes, refused):
    if "natural_warmup_epochs" in changes:
        changes = {**changes, "max_steps": -1, "num_train_epochs": 2}
    trainer = CURETrainer(make_tiny_model(), tiny_run_arguments(tmp_path / "new", adv_method="cure", **changes))
    empty = tmp_path / "checkpoint-7"
    empty.mkdir()
    revision = trainer.component("revision")
    if refused:
        with pytest.raises(
            ValueError,
            match=r"checkpoint-7' has no revision.safetensors, which the revision model of adv_method='cure' needs "
            r"to resume; resume from a checkpoint written by CURETrainer with save_only_model=False",
        ):
            revision.load_state(str(empty))
    else:
        revision.load_state(str(empty))
        assert revision.revision is None and revision._checkpoint is None


def test_a_checkpoint_without_the_weight_average_warns_on_the_components_logger(tmp_path, caplog):
    trainer = CURETrainer(
        make_tiny_model(), tiny_run_arguments(tmp_path / "new", adv_method="pgd", weight_averaging=True)
    )
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    with caplog.at_level(logging.WARNING, logger="cure_hf.components"):
        trainer.component("weight_average").load_state(str(folder))
    (record,) = [r for r in caplog.records if r.name == "cure_hf.components"]
    assert (
        record.getMessage()
        == f"{folder} has no weight_average.safetensors: weight averaging starts from its weights now"
    )
    assert trainer.component("weight_average").average is None
