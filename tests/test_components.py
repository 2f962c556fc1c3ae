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


# ------------------------------------------------------------------------------------------------------ AWP
def test_awp_redoes_a_perturbation_left_from_a_step_that_never_reached_the_optimizer(tmp_path, small_train):
    """The first micro-batch of a step perturbs; a perturbation still applied from an earlier step (whose optimizer
    step the fp16 scaler skipped) is undone and redone at this step's weights."""
    from cure_hf.data import collate_pixels

    args = tiny_run_arguments(tmp_path, adv_method="pgd", awp_gamma="5e-3", awp_warmup_epochs=0)
    trainer = CURETrainer(make_tiny_model(), args, train_dataset=small_train)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.current_gradient_accumulation_steps = 1
    batch = collate_pixels([small_train[i] for i in range(8)])
    awp = trainer.awp
    trainer.training_step(trainer.model, dict(batch))
    assert awp.applied and awp.step == 0
    trainer.state.global_step = 1  # the optimizer step of step 0 never ran: its perturbation is still there
    trainer.training_step(trainer.model, dict(batch))
    assert awp.applied and awp.step == 1
    metrics = trainer._metrics["awp_proxy_loss"]
    assert len(metrics) == 2 and all(torch.isfinite(m) for m in metrics)  # logged under its name, once per step


# ------------------------------------------------------------------------------------------- conservation
def test_clean_weight_is_read_by_conservation_only_with_the_papers_prominence(tmp_path):
    with pytest.raises(ValueError, match=r"clean_weight=0.3 is invalid with adv_method='trades'"):
        tiny_run_arguments(tmp_path, adv_method="trades", conservation="soft", clean_weight=0.3)
    args = tiny_run_arguments(tmp_path, adv_method="trades", conservation="soft", prominence="paper", clean_weight=0.3)
    assert Conservation.reads(args, None) == Conservation.fields


def test_the_papers_prominence_without_an_adversarial_batch_says_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"Fix: use prominence='loss' \(\|gradient\| of the loss\), or an adversarial"):
        tiny_run_arguments(tmp_path, adv_method="clean", conservation="soft", prominence="paper")


def test_conservation_exempts_the_head_modules_it_is_given(tmp_path):
    model = make_tiny_model()
    given = CURETrainer(model, tiny_run_arguments(tmp_path, adv_method="cure", head_modules=["model.conv1"]))
    expected = {f"model.conv1.{name}" for name, _ in model.model.conv1.named_parameters()}
    assert given.component("conservation").head_names == expected
    auto = CURETrainer(make_tiny_model(), tiny_run_arguments(tmp_path / "auto", adv_method="cure"))
    assert auto.component("conservation").head_names != expected


def _with_unused_parameter(model):
    model.unused = torch.nn.Parameter(torch.ones(3))  # trainable, never in the forward pass: its gradient is None
    return model


def test_the_papers_prominence_sums_a_steps_micro_batches_and_drops_a_skipped_steps(tmp_path, small_train):
    from cure_hf.components import TrainingBatch
    from cure_hf.data import collate_pixels
    from cure_hf.methods import LossInputs

    model = _with_unused_parameter(make_tiny_model()).eval()  # eval: the forward is a pure function of the input
    args = tiny_run_arguments(tmp_path, adv_method="cure", prominence="paper", clean_weight=0.3)
    conservation = CURETrainer(model, args).component("conservation")
    params = conservation.maskable_parameters()
    batches = [collate_pixels([small_train[i] for i in range(4 * k, 4 * k + 4)]) for k in range(3)]

    def call(batch):
        x, labels = batch["pixel_values"], batch["labels"]
        inputs = LossInputs(labels, model(x), model(x.flip(-1)))
        conservation.after_loss(TrainingBatch(x=x, labels=labels), inputs, 0.5)

    def oracle(batch):  # 0.5 x the gradient of each cross-entropy, from a separate forward pass
        x, labels = batch["pixel_values"], batch["labels"]
        out = []
        for logits in (model(x), model(x.flip(-1))):
            grads = torch.autograd.grad(
                0.5 * torch.nn.functional.cross_entropy(logits, labels), params, allow_unused=True
            )
            out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
        return out

    conservation.trainer.state.global_step = 0
    call(batches[0])
    call(batches[1])
    first, second = oracle(batches[0]), oracle(batches[1])
    for kind in (0, 1):
        for got, a, b in zip(conservation._paper_grads[kind], first[kind], second[kind]):
            assert torch.allclose(got, a + b, atol=1e-6)
    (unused,) = [i for i, p in enumerate(params) if p is model.unused]
    assert torch.equal(conservation._paper_grads[0][unused], torch.zeros(3))
    conservation.trainer.state.global_step = 1  # step 0's optimizer step never ran: its sums are dropped
    call(batches[2])
    third = oracle(batches[2])
    for kind in (0, 1):
        assert all(torch.allclose(g, t, atol=1e-6) for g, t in zip(conservation._paper_grads[kind], third[kind]))


def test_a_model_with_an_unused_parameter_trains_with_the_papers_prominence(tmp_path, small_train):
    model = _with_unused_parameter(make_tiny_model())
    args = tiny_run_arguments(tmp_path, adv_method="cure", prominence="paper", clean_weight=0.3)
    trainer = CURETrainer(model, args, train_dataset=small_train)
    trainer.train()
    assert trainer.state.global_step == 2 and torch.equal(model.unused.detach(), torch.ones(3))


@pytest.mark.parametrize("prominence", ["loss", "paper"])
def test_the_conservation_card_fields(tmp_path, prominence):
    args = tiny_run_arguments(tmp_path, adv_method="cure", prominence=prominence, conserve_fraction=0.4)
    rows = CURETrainer(make_tiny_model(), args).model_card_info()["hyperparameters"]
    assert rows["conservation"] == "soft" and rows["conserve_fraction"] == 0.4 and rows["prominence"] == prominence


# ----------------------------------------------------------------------------------------------- revision
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_revision_card_names_a_schedule_only_when_there_is_one(tmp_path, schedule):
    args = tiny_run_arguments(tmp_path, adv_method="cure", revision_rate_schedule=schedule)
    rows = CURETrainer(make_tiny_model(), args).model_card_info()["hyperparameters"]
    assert rows["revision"] is True and rows["revision_rate"] == args.revision_rate
    assert rows.get("revision_rate_schedule") == (None if schedule == "constant" else "cosine")


def test_the_revision_rate_stays_at_zero_past_the_end_of_its_linear_decay(tmp_path):
    args = tiny_run_arguments(tmp_path, adv_method="cure", revision_rate_schedule="linear")
    trainer = CURETrainer(make_tiny_model(), args)
    trainer.state.max_steps, trainer.state.global_step = 10, 12
    assert trainer.component("revision").rate() == 0.0


# ------------------------------------------------------------------------------------------- switches
def test_the_switch_values_a_resume_compares_are_the_given_ones(tmp_path):
    from cure_hf.components import component_switch_values
    from cure_hf.methods import get_method

    trades = tiny_run_arguments(tmp_path, adv_method="trades", conservation="hard")
    assert component_switch_values(trades, get_method("trades")) == {"conservation": "hard", "revision": False}
    cure = tiny_run_arguments(tmp_path, adv_method="cure", revision=False)
    assert component_switch_values(cure, get_method("cure")) == {"conservation": "soft", "revision": False}
    pgd = tiny_run_arguments(tmp_path, adv_method="pgd", revision=True)
    assert component_switch_values(pgd, get_method("pgd")) == {"conservation": "none", "revision": True}


@pytest.mark.parametrize(
    "changes, clean_pass",
    [
        (dict(adv_method="pgd"), False),  # PGD-AT's loss reads only the adversarial logits
        (dict(adv_method="fgsm_rs", revision=True), True),  # the consistency term compares the clean predictions
        (dict(adv_method="pgd", conservation="soft"), False),  # the loss-gradient score needs no clean pass
        (dict(adv_method="pgd", conservation="hard", prominence="paper"), True),  # the paper's score reads CE_nat
        (dict(adv_method="trades"), True),
        (dict(adv_method="cure", revision=False, conservation="none"), True),
    ],
)
def test_the_clean_training_forward_runs_when_the_loss_or_a_component_reads_it(tmp_path, changes, clean_pass):
    from cure_hf.components import runs_clean_pass
    from cure_hf.methods import get_method

    args = tiny_run_arguments(tmp_path, **changes)
    assert runs_clean_pass(args) is clean_pass  # the method looked up from the arguments
    assert runs_clean_pass(args, get_method(args.adv_method)) is clean_pass


# ------------------------------------------------------------------------------------- the fields' ranges
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(conserve_fraction=1.0), "conserve_fraction=1.0 is invalid: allowed 0 <= p < 1."),
        (dict(prominence="grad"), "prominence='grad' is invalid: allowed one of ('loss', 'paper')."),
        (
            dict(conservation="strict"),
            "conservation='strict' is invalid: allowed one of ('soft', 'hard', 'none') or None (the method's default).",
        ),
        (dict(consistency_weight=-1.0), "consistency_weight=-1.0 is invalid: allowed a finite gamma >= 0."),
        (dict(revision_rate=1.5), "revision_rate=1.5 is invalid: allowed 0 <= r <= 1."),
        (dict(revision_decay=1.0), "revision_decay=1.0 is invalid: allowed 0 <= d < 1."),
        (
            dict(revision_rate_schedule="step"),
            "revision_rate_schedule='step' is invalid: allowed one of ('constant', 'linear', 'cosine').",
        ),
    ],
)
def test_a_component_field_out_of_range_names_the_field_the_value_and_the_range(tmp_path, changes, message):
    with pytest.raises(ValueError) as refused:
        tiny_run_arguments(tmp_path, adv_method="cure", **changes)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "changes",
    [dict(consistency_weight=0.0), dict(revision_rate=0.0), dict(revision_rate=1.0), dict(revision_decay=0.0)],
)
def test_the_revision_fields_at_their_inclusive_bounds_are_accepted(tmp_path, changes):
    args = tiny_run_arguments(tmp_path, adv_method="cure", **changes)
    assert all(getattr(args, k) == v for k, v in changes.items())


def test_a_refused_field_names_every_owner(tmp_path):
    """clean_weight is read by CURE and by conservation with the paper's prominence: both are named."""
    with pytest.raises(ValueError, match=r"it is read by adv_method='cure' and the conservation component, which"):
        tiny_run_arguments(tmp_path, adv_method="pgd", clean_weight=0.3)


def test_the_replica_statistics_run_in_every_step(tmp_path):
    trainer = CURETrainer(make_tiny_model(), tiny_run_arguments(tmp_path, adv_method="pgd"))
    assert [c.name for c in trainer.components] == ["divergence", "replicas"]


def test_conservation_puts_its_prominence_on_the_card_of_a_method_without_one(tmp_path):
    args = tiny_run_arguments(tmp_path, adv_method="trades", conservation="soft")
    rows = CURETrainer(make_tiny_model(), args).model_card_info()["hyperparameters"]
    assert rows["prominence"] == "loss" and rows["conservation"] == "soft"  # TRADES itself has no prominence


@pytest.mark.parametrize(
    "changes, on",
    [
        (dict(adv_method="pgd", revision=True), {"divergence", "revision", "replicas"}),
        (dict(adv_method="cure", revision=False), {"divergence", "conservation", "replicas"}),
        (dict(adv_method="trades", conservation="hard"), {"divergence", "conservation", "replicas"}),
    ],
)
def test_the_components_a_run_gets_follow_its_switches(tmp_path, changes, on):
    from cure_hf.components import components_for

    assert {c.name for c in components_for(tiny_run_arguments(tmp_path, **changes))} == on


def test_a_switch_set_to_off_does_not_hide_a_refused_field_after_it(tmp_path):
    """conservation='none' (a switch, off) is not refused; revision_rate, whose component is off, still is."""
    with pytest.raises(ValueError, match=r"revision_rate=0.9 is invalid with adv_method='pgd'"):
        tiny_run_arguments(tmp_path, adv_method="pgd", conservation="none", revision_rate=0.9)
