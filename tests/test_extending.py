"""The method API: a method written in a user's file (or an installed package) trains, saves, resumes and is carded
like a built-in one; conservation and revision compose with every method; the Trainer's own step features work."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model, stop_after_save, tiny_run_arguments

from cure_hf import AdversarialMethod, AttackSpec, CURETrainer, register_method
from cure_hf import methods as methods_module
from cure_hf.methods import METHODS, get_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CITATION = "@misc{scaled2026,\n  title={A scaled-beta TRADES of this test file},\n  year={2026}\n}"


class ScaledTRADES(AdversarialMethod):
    """TRADES with beta = trades_beta * beta_scale: a method with a field it reads and an option of its own."""

    name, title = "scaled_trades", "Scaled TRADES"
    citation, paper_id = TEST_CITATION, None
    attack = AttackSpec("pgd", "kl", "normal")
    hyperparameters = ("trades_beta",)
    options = {"beta_scale": 1.0}

    def loss(self, inputs, hp):
        ce = F.cross_entropy(inputs.z_nat.float(), inputs.labels, label_smoothing=hp["label_smoothing_factor"])
        kl = F.kl_div(F.log_softmax(inputs.z_adv.float(), 1), F.softmax(inputs.z_nat.float(), 1), reduction="batchmean")
        return ce + hp["trades_beta"] * hp["beta_scale"] * kl, {"ce_nat": ce.detach(), "kl_adv": kl.detach()}


@pytest.fixture
def registered():
    register_method(ScaledTRADES, replace=True)
    yield get_method("scaled_trades")
    methods_module._REGISTRY.pop("scaled_trades", None)


@pytest.fixture(scope="module")
def small_train():
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(32))
    train.set_transform(image_transform(16, train=True))
    return train


def _args(tmp_path, **kwargs):
    return tiny_run_arguments(tmp_path, **kwargs)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_a_method_from_a_test_file_trains_saves_resumes_bit_identically_and_is_carded(
    registered, tmp_path, small_train, one_thread
):
    assert "scaled_trades" in METHODS and registered.options == {"beta_scale": 1.0}
    common = dict(
        adv_method="scaled_trades",
        trades_beta=2.0,
        method_options="beta_scale=0.5",
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    full = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path / "full", **common), train_dataset=small_train)
    full.train()
    # interrupted after its step-2 checkpoint, then resumed from it
    first = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path / "cut", **common),
        train_dataset=small_train,
        callbacks=[stop_after_save(2)],
    )
    first.train()
    assert first.state.global_step == 2
    resumed = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path / "cut", **common), train_dataset=small_train)
    resumed.train(resume_from_checkpoint=True)
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run is not bit-identical"
    full.save_model()
    card = open(os.path.join(str(tmp_path / "full"), "README.md"), encoding="utf-8").read()
    assert "Scaled TRADES" in card and "scaled2026" in card and "method-scaled_trades" in card
    assert "beta_scale" in card and "trades_beta" in card
    # a resume with another option value is refused: the option is part of the method's settings
    changed = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path / "cut", **{**common, "method_options": "beta_scale=0.25"}),
        train_dataset=small_train,
    )
    with pytest.raises(ValueError, match="method_options"):
        changed.train(resume_from_checkpoint=os.path.join(str(tmp_path / "cut"), "checkpoint-2"))


def test_method_options_are_checked_against_the_methods_declared_options(registered, tmp_path):
    assert registered.resolve_options("beta_scale=2") == {"beta_scale": 2.0}
    assert registered.resolve_options(None) == {"beta_scale": 1.0}
    with pytest.raises(ValueError, match=r"unknown \['scale'\]; the method's options are \['beta_scale'\]"):
        _args(tmp_path, adv_method="scaled_trades", method_options="scale=2")
    with pytest.raises(ValueError, match="expected a float like its default 1.0"):
        _args(tmp_path, adv_method="scaled_trades", method_options="beta_scale=big")
    with pytest.raises(ValueError, match="the method's options are none"):
        _args(tmp_path, adv_method="trades", method_options="beta_scale=2")


def test_registration_refuses_bad_methods_and_unknown_names_list_the_registered_ones(tmp_path):
    class NoLoss(AdversarialMethod):
        name, title = "no_loss", "No loss"

    with pytest.raises(TypeError, match="must define loss"):
        register_method(NoLoss)

    class BadName(ScaledTRADES):
        name = "Bad Name"

    with pytest.raises(ValueError, match="lower-case name without spaces"):
        register_method(BadName)

    class Clash(ScaledTRADES):
        name = "trades"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Clash)
    assert type(METHODS["trades"]).__name__ == "TRADES"
    with pytest.raises(ValueError, match=r"adv_method='nope' is invalid: allowed one of \[.*'cure'.*'trades'"):
        _args(tmp_path, adv_method="nope")


PLUGIN = textwrap.dedent("""
    import torch.nn.functional as F
    from cure_hf import AdversarialMethod, AttackSpec

    class PluginPGD(AdversarialMethod):
        name, title = "plugin_pgd", "Plugin PGD"
        citation = "@misc{plugin, title={Plugin}}"
        attack = AttackSpec("pgd", "ce", "uniform")
        uses_clean_pass = False

        def loss(self, inputs, hp):
            loss = F.cross_entropy(inputs.z_adv.float(), inputs.labels)
            return loss, {"ce_adv": loss.detach()}
""")


def _install_plugin(root):
    """A package `cure_plugin` with an entry point in the group cure_hf.methods, as pip would install it."""
    package = root / "cure_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PLUGIN)
    info = root / "cure_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cure-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cure_hf.methods]\nplugin_pgd = cure_plugin:PluginPGD\n")
    return root


def test_an_installed_package_registers_its_method_through_the_entry_point_group(tmp_path, monkeypatch):
    _install_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods_module, "_entry_points_loaded", False)
    try:
        method = get_method("plugin_pgd")
        assert method.title == "Plugin PGD" and type(method).__module__ == "cure_plugin"
    finally:
        methods_module._REGISTRY.pop("plugin_pgd", None)


def test_the_recipe_trains_an_installed_method_by_name(tmp_path):
    plugin = _install_plugin(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), ROOT]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "recipes", "train_vit.py"),
            "--adv_method",
            "plugin_pgd",
            "--natural_epochs",
            "0",
            "--max_steps",
            "2",
            "--num_train_epochs",
            "1",
            "--attack_steps",
            "1",
            "--per_device_train_batch_size",
            "16",
            "--eval_max_examples",
            "16",
            "--output_dir",
            str(out),
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--cpu_threads",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Plugin PGD" in card and "@misc{plugin" in card


def test_the_docs_example_method_trains_and_cites_its_paper(tmp_path):
    out = tmp_path / "alp"
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    example = os.path.join(ROOT, "docs", "examples", "logit_pairing.py")
    assert sum(1 for _ in open(example, encoding="utf-8")) <= 70  # "one user file of about 60 lines"
    result = subprocess.run([sys.executable, example, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "ALP" in card and "kannan2018adversarial" in card and "pairing_weight" in card


# ------------------------------------------------------------------------------ methods x components
COMPONENT_SETTINGS = {
    "conservation": {"conservation": "soft"},
    "revision": {"revision": True},
    "awp": {"awp_gamma": "5e-3", "awp_warmup_epochs": 0},
    "wa": {"weight_averaging": "0.9"},
}
SUBSETS = [tuple(name for i, name in enumerate(COMPONENT_SETTINGS) if mask >> i & 1) for mask in range(16)]


def _expected_refusal(method, subset):
    if method == "clean" and "awp" in subset:
        return "natural training does not have"
    return None


@pytest.mark.parametrize("subset", SUBSETS, ids=lambda s: "+".join(s) or "alone")
@pytest.mark.parametrize("method", ["clean", "pgd", "trades", "mart", "fgsm_rs", "cure"])
def test_every_method_with_every_combination_of_components_trains_or_is_refused(
    tmp_path, small_train, method, subset, one_thread
):
    settings = {k: v for name in subset for k, v in COMPONENT_SETTINGS[name].items()}
    if method == "cure":  # CURE's own two are on by default: the subset says which stay on
        settings.setdefault("conservation", "none")
        settings.setdefault("revision", False)
    refusal = _expected_refusal(method, subset)
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            _args(tmp_path, adv_method=method, **settings)
        return
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, adv_method=method, **settings), train_dataset=small_train
    )
    names = {c.name for c in trainer.components}
    assert ("conservation" in names) == ("conservation" in subset)
    assert ("revision" in names) == ("revision" in subset)
    assert ("awp" in names) == ("awp" in subset) and ("weight_average" in names) == ("wa" in subset)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    if "revision" in subset:
        assert trainer.revision is not None and trainer.revision.step == 2
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert ("consistency" in logged) == ("revision" in subset)


def test_combinations_that_cannot_work_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="layer_telemetry=True is invalid: it records what the conservation mask"):
        _args(tmp_path, adv_method="trades", layer_telemetry=True)
    with pytest.raises(ValueError, match="prominence='paper' is invalid: .*'clean' has no adversarial batch"):
        _args(tmp_path, adv_method="clean", conservation="soft", prominence="paper")
    with pytest.raises(
        ValueError,
        match="conserve_fraction=0.5 is invalid with adv_method='trades': it is read by the conservation component",
    ):
        _args(tmp_path, adv_method="trades", conserve_fraction=0.5)
    with pytest.raises(ValueError, match="revision_rate=0.9 is invalid with adv_method='cure'.*revision=True"):
        _args(tmp_path, adv_method="cure", revision=False, revision_rate=0.9)
    with pytest.raises(ValueError, match="trades_beta=3.0 is invalid with adv_method='cure'"):
        _args(tmp_path, adv_method="cure", trades_beta=3.0)
    _args(tmp_path, adv_method="trades", conservation="hard", conserve_fraction=0.5)  # on: read, so accepted


# --------------------------------------------------------------------------------- the paper's ablations
class _StepRecorder:
    """Records the first step's logits, loss and (before the mask) gradient; then whether the mask zeroed any."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, {}
        step = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = step(model, inputs, return_outputs, num_items_in_batch)
            if "loss" not in self.seen:
                batch = trainer._batch
                self.seen.update(
                    loss=loss.detach().double(),
                    labels=batch.labels,
                    x=batch.x,
                    x_adv=batch.x_adv,
                    r_nat=batch.r_nat,
                    r_adv=batch.r_adv,
                )
            return loss

        trainer.compute_loss = compute_loss


def _hand_computed_cure_loss(model, seen, alpha, gamma, with_revision):
    """alpha CE(f(x)) + (1 - alpha) CE(f(x_adv)) [+ gamma (KL(g(x) || f(x)) + KL(g(x_adv) || f(x_adv)))], in
    float64 from a fresh forward of a copy of the model taken before the step (same train-mode BatchNorm)."""

    def kl(student, teacher):
        p = F.softmax(teacher.double(), 1)
        return (p * (F.log_softmax(teacher.double(), 1) - F.log_softmax(student.double(), 1))).sum(1).mean()

    with torch.no_grad():
        z_nat, z_adv = model(seen["x"]).double(), model(seen["x_adv"]).double()
    y = seen["labels"]
    loss = alpha * F.cross_entropy(z_nat, y) + (1 - alpha) * F.cross_entropy(z_adv, y)
    if with_revision:
        loss = loss + gamma * (kl(z_nat, seen["r_nat"]) + kl(z_adv, seen["r_adv"]))
    return float(loss)


@pytest.mark.parametrize("ablation", ["without_revision", "without_conservation"])
def test_the_papers_ablations_match_hand_computed_expectations(tmp_path, small_train, ablation, one_thread):
    import copy

    switch = {
        "without_revision": {"revision": False, "conserve_fraction": 0.4},
        "without_conservation": {"conservation": "none", "consistency_weight": 0.7},
    }[ablation]
    args = _args(tmp_path, adv_method="cure", max_steps=1, clean_weight=0.2, **switch)
    model = make_tiny_model("test_resnet")
    trainer = CURETrainer(model, args, train_dataset=small_train)
    before = copy.deepcopy(model)
    recorder = _StepRecorder(trainer)
    grads = {}
    before_step = trainer._before_optimizer_step

    def record(optimizer=None):  # the gradient before and after every pre-step component (the mask included)
        if not grads:
            grads["before"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        before_step(optimizer)
        if "after" not in grads:
            grads["after"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    trainer._before_optimizer_step = record
    trainer.train()
    seen = recorder.seen
    expected = _hand_computed_cure_loss(before.train(), seen, 0.2, 0.7, with_revision=ablation != "without_revision")
    assert math.isclose(float(seen["loss"]), expected, rel_tol=1e-5), (float(seen["loss"]), expected)
    from cure_hf.models import head_parameter_names

    head = head_parameter_names(model)
    for name, g in grads["before"].items():
        after = grads["after"][name]
        if ablation == "without_conservation" or name in head:
            assert torch.equal(after, g), name  # nothing masked
            continue
        # numpy's linear-interpolation quantile of |grad| over the tensor; entries strictly below it are zeroed
        threshold = np.quantile(g.abs().double().numpy().reshape(-1), 0.4)
        conserved = torch.from_numpy(g.abs().double().numpy() < threshold)
        assert torch.equal(after, torch.where(conserved, torch.zeros_like(g), g)), name
    if ablation == "without_revision":
        assert trainer.revision is None and seen["r_nat"] is None
    else:
        assert trainer.revision is not None and trainer.component("conservation") is None


# ----------------------------------------------------------------------------------- the Trainer's step
@pytest.mark.parametrize("family", ["timm", "transformers"])
def test_the_trainers_step_divides_the_batch_mean_loss_by_the_accumulation_steps(
    tmp_path, small_train, one_thread, family
):
    """The method's loss is a batch mean, so the Trainer must divide it by the accumulation steps; a transformers
    model's forward takes loss kwargs, for which the Trainer would instead expect a loss summed over
    `num_items_in_batch` and skip the division: CURETrainer tells it the model computes no loss."""
    from transformers import ViTConfig, ViTForImageClassification

    model = (
        make_tiny_model("test_resnet")
        if family == "timm"
        else ViTForImageClassification(
            ViTConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=10,
            )
        )
    )
    trainer = CURETrainer(
        model, _args(tmp_path, adv_method="pgd", gradient_accumulation_steps=2, max_steps=1), train_dataset=small_train
    )
    assert trainer.model_accepts_loss_kwargs is False
    seen, returned = [], []
    compute_loss, training_step = trainer.compute_loss, trainer.training_step

    def loss_spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        seen.append((float(loss), num_items_in_batch))
        return loss

    def step_spy(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        returned.append(float(loss))
        return loss

    trainer.compute_loss, trainer.training_step = loss_spy, step_spy
    trainer.train()
    assert len(seen) == 2 and all(n is None for _, n in seen)  # 2 micro-batches; no per-item normalisation asked
    for (loss, _), back in zip(seen, returned):
        assert back == pytest.approx(loss / 2, rel=1e-6)  # the Trainer's own accumulation scaling


def test_a_compute_loss_func_is_refused_because_the_loss_is_the_methods(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func is invalid for CURETrainer"):
        CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path), compute_loss_func=lambda *a, **k: 0.0)


def test_torch_empty_cache_steps_reaches_the_trainers_cache_clearing(tmp_path, small_train, monkeypatch, one_thread):
    import transformers.trainer as hf_trainer

    calls = []
    monkeypatch.setattr(hf_trainer, "clear_device_cache", lambda *a, **k: calls.append(1))
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path, adv_method="pgd", torch_empty_cache_steps=1, max_steps=2),
        train_dataset=small_train,
    )
    trainer.train()
    assert len(calls) >= 2


def test_a_schedule_free_optimizer_is_put_in_train_mode_by_the_trainers_step(tmp_path, small_train, one_thread):
    class TrainModeSGD(torch.optim.SGD):  # the schedule_free_* optimizers' interface: train() / eval()
        train_calls = 0

        def train(self):
            TrainModeSGD.train_calls += 1

        def eval(self):
            pass

    model = make_tiny_model("test_resnet")
    optimizer = TrainModeSGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = CURETrainer(
        model, _args(tmp_path, adv_method="trades"), train_dataset=small_train, optimizers=(optimizer, scheduler)
    )
    trainer.train()
    assert TrainModeSGD.train_calls >= 2


def test_lomo_and_data_parallel_are_refused_with_the_reason(tmp_path):
    from types import SimpleNamespace

    from cure_hf.runtime import refuse_unsupported_parallelism

    with pytest.raises(ValueError, match="optim='lomo' is invalid for CURETrainer: LOMO fuses the backward"):
        _args(tmp_path, optim="lomo")
    args = SimpleNamespace(
        n_gpu=2, fsdp="", deepspeed=None, adv_method="cure", ddp_broadcast_buffers=False, world_size=1
    )
    with pytest.raises(ValueError, match=r"nn.DataParallel \(n_gpu=2"):
        refuse_unsupported_parallelism(args, accelerator=SimpleNamespace(distributed_type="NO"))


# ----------------------------------------------------------------- what the card and the resume check read
def test_the_resume_check_compares_the_method_and_every_enabled_components_fields(tmp_path):
    from cure_hf.components import method_argument_names

    common = {
        "adv_method",
        "epsilon",
        "attack_step_size",
        "attack_steps",
        "attack_random_start",
        "natural_warmup_epochs",
        "label_smoothing_factor",
        "lr_step_epochs",
        "lr_step_factor",
        "conservation",
        "revision",
        "method_options",
        "nonfinite_policy",
    }
    conservation = {"conserve_fraction", "prominence", "head_modules"}
    revision = {
        "consistency_weight",
        "revision_rate",
        "revision_decay",
        "revision_rate_schedule",
        "revision_seed",
        "revision_train_mode",
    }
    cure = method_argument_names(_args(tmp_path))
    assert set(cure) == common | conservation | revision | {"clean_weight"} and len(cure) == len(set(cure))
    trades = method_argument_names(_args(tmp_path, adv_method="trades", awp_gamma="5e-3", weight_averaging="0.9"))
    assert set(trades) == common | {"trades_beta", "awp_gamma", "awp_warmup_epochs", "weight_averaging"}
    paper = method_argument_names(
        _args(tmp_path, adv_method="pgd", conservation="hard", prominence="paper", layer_telemetry=True)
    )
    assert set(paper) == common | conservation | {"clean_weight", "layer_telemetry"}
    from cure_hf.safety import check_resume_arguments

    saved = tmp_path / "checkpoint"
    saved.mkdir()
    args = _args(tmp_path)
    for name in sorted(set(cure) - {"head_modules", "method_options", "lr_step_epochs", "revision_seed"}):
        values = {**args.to_dict(), name: "changed"}
        (saved / "training_args.json").write_text(json.dumps(values))
        with pytest.raises(ValueError, match=f"{name}=.*checkpoint: 'changed'"):
            check_resume_arguments(str(saved), args.to_dict(), method_argument_names(args))


def test_each_component_writes_its_fields_into_the_card(tmp_path, small_train):
    cure = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path / "a", conservation="hard", revision_rate_schedule="cosine")
    )
    hyper = cure.model_card_info()["hyperparameters"]
    assert {
        k: hyper[k]
        for k in (
            "conservation",
            "conserve_fraction",
            "prominence",
            "revision",
            "consistency_weight",
            "revision_rate",
            "revision_decay",
            "revision_rate_schedule",
            "clean_weight",
        )
    } == {
        "conservation": "hard",
        "conserve_fraction": 0.3,
        "prominence": "loss",
        "revision": True,
        "consistency_weight": 1.0,
        "revision_rate": 0.2,
        "revision_decay": 0.999,
        "revision_rate_schedule": "cosine",
        "clean_weight": 0.1,
    }
    assert "trades_beta" not in hyper and "awp_gamma" not in hyper and "weight_averaging" not in hyper
    trades = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path / "b", adv_method="trades", awp_gamma="True", weight_averaging="0.9"),
    )
    info = trades.model_card_info()
    hyper = info["hyperparameters"]
    assert (hyper["trades_beta"], hyper["awp_gamma"], hyper["awp_warmup_epochs"], hyper["weight_averaging"]) == (
        6.0,
        5e-3,
        10.0,
        0.9,
    )
    assert info["weight_averaging"] == {
        "decay": 0.9,
        "decay_warmup": "min(decay, (1 + t) / (10 + t))",
        "buffers_averaged": True,
    }
    assert not {"conservation", "revision", "conserve_fraction", "consistency_weight", "revision_rate"} & set(hyper)
    paper = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path / "c", adv_method="pgd", conservation="soft", prominence="paper", clean_weight=0.4),
    )
    assert paper.model_card_info()["hyperparameters"]["clean_weight"] == 0.4
    assert (
        "clean_weight"
        not in CURETrainer(
            make_tiny_model("test_resnet"), _args(tmp_path / "d", adv_method="pgd", conservation="soft")
        ).model_card_info()["hyperparameters"]
    )


@pytest.mark.parametrize(
    "field, value, hint",
    [
        ("conserve_fraction", 0.5, "conservation='soft' (or 'hard')"),
        ("consistency_weight", 0.5, "revision=True"),
        ("head_modules", ["head"], "conservation='soft' (or 'hard')"),
        ("clean_weight", 0.5, "adv_method='cure', or conservation with prominence='paper'"),
        ("trades_beta", 3.0, "adv_method='trades' or 'mart'"),
    ],
)
def test_a_field_nothing_reads_names_who_reads_it_and_how_to_switch_it_on(tmp_path, field, value, hint):
    method = "pgd"
    with pytest.raises(ValueError) as refused:
        _args(tmp_path, adv_method=method, **{field: value})
    message = str(refused.value)
    assert message.startswith(f"{field}={value!r} is invalid with adv_method='pgd': it is read by ")
    assert message.endswith(f"Fix: drop {field}, or switch on what reads it ({hint}).")


def test_checkpoint_files_of_the_components(tmp_path):
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, weight_averaging="0.9", natural_warmup_epochs=1.5, max_steps=-1)
    )
    assert trainer._checkpoint_rules() == {
        "required_files": [("revision.safetensors", 1.5), ("weight_average.safetensors", 0.0)]
    }


def test_compute_loss_outside_training_step_is_refused_with_the_reason(tmp_path, small_train, one_thread):
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, adv_method="pgd", max_steps=1), train_dataset=small_train
    )
    trainer.train()  # the prepared batch is released after each step
    batch = trainer.data_collator([small_train[i] for i in range(4)])
    with pytest.raises(RuntimeError, match="compute_loss runs inside CURETrainer.training_step"):
        trainer.compute_loss(trainer.model, batch)


def test_reused_clean_logits_reach_the_attack_and_the_forwards_are_compared_once(
    tmp_path, small_train, one_thread, monkeypatch
):
    import copy

    import cure_hf.trainer as trainer_module

    compared = []
    check = trainer_module.check_train_eval_forwards_agree
    monkeypatch.setattr(
        trainer_module, "check_train_eval_forwards_agree", lambda net, x: compared.append(1) or check(net, x)
    )
    trainer = CURETrainer(
        make_tiny_model("test_vit"),
        _args(tmp_path, adv_method="trades", attack_reuse_clean_logits=True, max_steps=2),
        train_dataset=small_train,
    )
    method, spec, seen = copy.copy(trainer.method), trainer.method.attack, []

    class SpyAttack:
        def __getattr__(self, name):
            return getattr(spec, name)

        def craft(self, model, x, labels, settings, clean_logits=None, **kwargs):
            seen.append(clean_logits)
            return spec.craft(model, x, labels, settings, clean_logits=clean_logits, **kwargs)

    method.attack = SpyAttack()
    trainer.method = method
    forwards = []
    trainer.model.register_forward_hook(lambda m, i, o: forwards.append(m.training))
    trainer.train()
    assert compared == [1]  # once, on the first batch
    assert len(seen) == 2 and all(c is not None and not c.requires_grad for c in seen)
    # per step: one clean training forward (reused by the attack) and one adversarial forward; plus the
    # comparison's own train-mode forward on the first batch
    assert forwards.count(True) == 2 * 2 + 1


def test_channels_last_batches_reach_the_model_in_channels_last(tmp_path, small_train, one_thread):
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path, adv_method="pgd", channels_last=True, max_steps=1),
        train_dataset=small_train,
    )
    formats = []
    trainer.model.register_forward_hook(
        lambda m, i, o: formats.append(i[0].is_contiguous(memory_format=torch.channels_last)) if m.training else None
    )
    trainer.train()
    assert formats and all(formats)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_the_revision_rate_follows_its_schedule_from_the_start_of_the_method(tmp_path, schedule):
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path, revision_rate_schedule=schedule))
    revision = trainer.component("revision")

    def expected(step, start, total):
        progress = min(1.0, max(0.0, (step - start) / max(1, total - start)))
        if schedule == "constant":
            return 0.2
        return 0.2 * (0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress)

    for start, total, step in [(None, 10, 0), (None, 10, 3), (None, 10, 10), (4, 10, 4), (4, 10, 7), (None, 1, 1)]:
        trainer._method_start_step, trainer.state.max_steps, trainer.state.global_step = start, total, step
        assert revision.rate() == pytest.approx(expected(step, start or 0, total), abs=1e-12), (start, total, step)


def test_the_papers_step_schedule_multiplies_the_rate_at_its_epochs(tmp_path, small_train, one_thread):
    """32 examples, batch 8, accumulation 2: 2 optimizer steps per epoch; lr x 0.5 after epochs 1 and 2."""
    args = _args(
        tmp_path,
        adv_method="pgd",
        max_steps=-1,
        num_train_epochs=3,
        gradient_accumulation_steps=2,
        lr_step_epochs="1,2",
        lr_step_factor=0.5,
        learning_rate=0.08,
        logging_steps=1,
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=small_train)
    trainer.train()
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.MultiStepLR)
    rates = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert rates == pytest.approx([0.08, 0.08, 0.04, 0.04, 0.02, 0.02])


def test_a_scheduler_given_to_the_trainer_is_kept_and_no_step_schedule_means_the_trainers(
    tmp_path, small_train, one_thread
):
    model = make_tiny_model("test_resnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    given = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    kept = CURETrainer(
        model,
        _args(tmp_path / "a", adv_method="pgd", lr_step_epochs="1"),
        train_dataset=small_train,
        optimizers=(optimizer, given),
    )
    kept.train()
    assert kept.lr_scheduler is given
    plain = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path / "b", adv_method="pgd"), train_dataset=small_train
    )
    plain.train()
    assert not isinstance(plain.lr_scheduler, torch.optim.lr_scheduler.MultiStepLR)


@pytest.mark.parametrize(
    "examples, epochs, milestones",
    # 8 examples at batch 8: one optimizer step per epoch, the rate changes at steps 1 and 2
    [(8, 3, [1, 2]), (24, 2, [3, 6])],
)
def test_the_step_schedule_counts_the_optimizer_steps_of_an_epoch(tmp_path, examples, epochs, milestones):
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(examples))
    train.set_transform(image_transform(16, train=True))
    args = _args(tmp_path, adv_method="pgd", max_steps=-1, num_train_epochs=epochs, lr_step_epochs="1,2")
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=train)
    trainer.create_optimizer_and_scheduler(num_training_steps=epochs * math.ceil(examples / 8))
    assert sorted(trainer.lr_scheduler.milestones) == milestones


@pytest.mark.parametrize(
    "epochs, total, milestones", [(3, 12, [4, 8]), (1, 6, [6, 12]), (2.5, 9, [3, 6]), (3, 3, [1, 2]), (3, 10, [3, 6])]
)
def test_without_a_training_set_the_step_schedule_divides_the_steps_by_the_epochs(tmp_path, epochs, total, milestones):
    """A trainer built for manual use (no train_dataset): an epoch is the given steps over ceil(num_train_epochs)."""
    args = _args(tmp_path, adv_method="pgd", max_steps=-1, num_train_epochs=epochs, lr_step_epochs="1,2")
    trainer = CURETrainer(make_tiny_model("test_resnet"), args)
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    assert sorted(trainer.lr_scheduler.milestones) == milestones
    assert trainer.lr_scheduler.gamma == args.lr_step_factor


def test_the_step_schedule_is_refused_for_a_training_set_without_length(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield {"pixel_values": torch.zeros(3, 16, 16), "labels": 0}

    args = _args(tmp_path, adv_method="pgd", lr_step_epochs="1")
    with pytest.raises(ValueError, match=r"lr_step_epochs='1' needs the length of an epoch.*Stream"):
        CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=Stream())


def test_the_step_schedule_counts_epochs_from_the_data_not_from_max_steps(tmp_path):
    """24 examples at batch 8: 3 steps an epoch, whatever max_steps cuts the run to (5 steps over the default 3
    epochs would give 1 step an epoch)."""
    from cure_hf.data import image_transform, load_digits_dataset

    train = load_digits_dataset()["train"].select(range(24))
    train.set_transform(image_transform(16, train=True))
    trainer = CURETrainer(
        make_tiny_model("test_resnet"),
        _args(tmp_path, adv_method="pgd", max_steps=5, lr_step_epochs="1,2"),
        train_dataset=train,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=5)
    assert sorted(trainer.lr_scheduler.milestones) == [3, 6]


def test_the_step_schedule_is_built_on_the_optimizer_it_is_given(tmp_path):
    trainer = CURETrainer(make_tiny_model("test_resnet"), _args(tmp_path, adv_method="pgd", lr_step_epochs="1"))
    trainer.create_optimizer()
    other = torch.optim.SGD(make_tiny_model("test_resnet").parameters(), lr=0.3)
    scheduler = trainer.create_scheduler(num_training_steps=6, optimizer=other)
    assert scheduler.optimizer is other and trainer.lr_scheduler is scheduler


def test_a_second_train_call_builds_a_fresh_step_schedule(tmp_path, small_train):
    args = _args(tmp_path, adv_method="pgd", max_steps=2, lr_step_epochs="1", lr_step_factor=0.5, learning_rate=0.08)
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=small_train)
    trainer.train()
    first = trainer.lr_scheduler
    trainer.train()
    assert trainer.lr_scheduler is not first and isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert trainer.lr_scheduler.get_last_lr() == pytest.approx([0.08] * len(trainer.optimizer.param_groups))
