"""Robust evaluation: attack orderings that must hold, AutoAttack through pyautoattack, gradient-masking
warnings, the shipped `evaluate` metrics, the trainer's evaluate() / best-vs-last / validation split, plots."""

import json
import os

import pytest
import torch
from conftest import make_tiny_model

from cure_hf.attacks import cross_entropy_loss, fgsm_rs, logits_of
from cure_hf.data import collate_pixels
from cure_hf.evaluation import (
    AttackSpec,
    AutoAttackConfig,
    evaluate_robustness,
    gradient_masking_warnings,
    parse_attacks,
    robust_overfitting_summary,
)

# APGD (100 iterations, adaptive step) may miss an example PGD-20 finds, from another random start:
# allowed up to one example in 32 above PGD-20, never more.
APGD_TOLERANCE = 1 / 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two shared cores: more threads than cores makes these small convolutions 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_batch(digits):
    return collate_pixels([digits["test"][i] for i in range(32)])


@pytest.fixture(scope="module")
def trained_model(digits, one_thread):
    """test_resnet after one epoch of FGSM-RS adversarial training on the digits (about 94% clean, 70% PGD-20)."""
    train = collate_pixels([digits["train"][i] for i in range(len(digits["train"]))])
    model = make_tiny_model("test_resnet")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train["labels"]), generator=generator)
    model.train()
    for start in range(0, len(order), 32):
        idx = order[start : start + 32]
        x, y = train["pixel_values"][idx], train["labels"][idx]
        loss = cross_entropy_loss(logits_of(model(fgsm_rs(model, x, y, eps=8 / 255, generator=generator))), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class RoundedInput(torch.nn.Module):
    """Quantises pixels to 16 levels first: torch.round has zero gradient, so gradient attacks see nothing."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 15) / 15)


# --------------------------------------------------------------------------------- names
def test_parse_attacks_names_metrics_and_errors():
    specs = parse_attacks("clean, pgd20,cw,autoattack")
    assert [s.metric for s in specs] == ["accuracy", "pgd20_accuracy", "cw_accuracy", "autoattack_accuracy"]
    assert parse_attacks("pgd")[0] == AttackSpec("pgd", 20)
    assert parse_attacks("pgd", default_steps=7)[0].metric == "pgd7_accuracy"
    assert parse_attacks("cw30")[0] == AttackSpec("cw", 30)
    for bad, needle in [
        ("fgsm", "not understood"),
        ("pgd0", "not understood"),
        ("pgd20,pgd", "twice"),
        ("clean5", "not understood"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_attacks(bad)
    with pytest.raises(ValueError, match="version='custom'"):
        AutoAttackConfig(version="custom")
    with pytest.raises(ValueError, match="only supported by autoattack"):
        evaluate_robustness(torch.nn.Identity(), [], "clean,pgd20", autoattack=AutoAttackConfig(norm="L2"))


# ------------------------------------------------------------------------- the orderings
def test_attack_accuracies_never_above_clean_and_pgd_bites(trained_model, test_batch):
    untrained = make_tiny_model("test_resnet", seed=1).eval()
    for model in (untrained, trained_model):
        for eps in (0.0, 8 / 255):
            gen = torch.Generator().manual_seed(0)
            m = evaluate_robustness(model, [test_batch], "clean,pgd20,cw", eps=eps, generator=gen).metrics
            assert m["n_examples"] == 32
            assert m["pgd20_accuracy"] <= m["accuracy"] and m["cw_accuracy"] <= m["accuracy"]
            assert m["robust_accuracy"] <= min(m["pgd20_accuracy"], m["cw_accuracy"])
            if eps == 0.0:
                assert m["pgd20_accuracy"] == m["cw_accuracy"] == m["robust_accuracy"] == m["accuracy"]
    assert m["accuracy"] >= 0.75, "the fixture model did not learn"
    assert m["pgd20_accuracy"] < m["accuracy"] - 0.1, "PGD-20 at 8/255 should break a trained model"


def test_attacks_run_with_gradients_under_no_grad_and_leave_the_model_as_found(trained_model, test_batch):
    trained_model.train()
    trained_model.zero_grad(set_to_none=True)
    flags = [p.requires_grad for p in trained_model.parameters()]
    with torch.no_grad():
        m = evaluate_robustness(trained_model, [test_batch], "clean,pgd20", eps=8 / 255).metrics
    assert m["pgd20_accuracy"] < m["accuracy"]
    assert trained_model.training and [p.requires_grad for p in trained_model.parameters()] == flags
    assert all(p.grad is None for p in trained_model.parameters())
    trained_model.eval()


def test_apgd_not_above_pgd20_on_a_trained_model(trained_model, test_batch):
    result = evaluate_robustness(
        trained_model,
        [test_batch],
        "clean,pgd20,autoattack",
        eps=8 / 255,
        autoattack=AutoAttackConfig(version="custom", attacks=["apgd-ce"]),
    )
    m = result.metrics
    assert 0 < m["pgd20_accuracy"] < m["accuracy"]
    assert m["autoattack_accuracy"] <= m["pgd20_accuracy"] + APGD_TOLERANCE
    assert result.autoattack_stages["apgd-ce"] == pytest.approx(m["autoattack_accuracy"])
    assert m["robust_accuracy"] <= min(m["pgd20_accuracy"], m["autoattack_accuracy"])
    assert result.settings["autoattack"]["standard"] is False and not result.gradient_masking_suspected


def test_autoattack_l2_threat_model(trained_model, test_batch):
    few = {k: v[:8] for k, v in test_batch.items()}
    l2 = evaluate_robustness(
        trained_model,
        [few],
        "clean,autoattack",
        eps=2.0,
        autoattack=AutoAttackConfig(version="custom", attacks=["apgd-ce"], norm="L2", n_iter=10),
    )
    assert l2.settings["norm"] == "L2" and l2.metrics["autoattack_accuracy"] < l2.metrics["accuracy"]


def test_gradient_masking_model_triggers_the_warning(trained_model, test_batch):
    masked = RoundedInput(trained_model).eval()
    result = evaluate_robustness(
        masked,
        [
            collate_pixels(
                [
                    {"pixel_values": x, "labels": y}
                    for x, y in zip(test_batch["pixel_values"][:16], test_batch["labels"][:16])
                ]
            )
        ],
        # 32/255 spans about two quantisation levels (1/15 = 17/255), so Square's random search breaks many
        # examples (8 of 14 here, against 1 at 16/255), while every gradient is zero
        "clean,pgd20,autoattack",
        eps=32 / 255,
        autoattack=AutoAttackConfig(version="custom", attacks=["apgd-dlr", "square"], n_queries=300),
    )
    m, stages = result.metrics, result.autoattack_stages
    assert m["pgd20_accuracy"] == m["accuracy"], "zero gradients: PGD cannot move"
    assert stages["square"] <= stages["apgd-dlr"] - 0.2, "Square finds what the gradient attacks cannot"
    assert result.gradient_masking_suspected
    assert any("possible gradient masking" in w and "square" in w for w in result.warnings)
    assert any(w.startswith("AutoAttack:") and "zero gradient" in w for w in result.warnings)
    assert json.loads(json.dumps(result.to_dict()))["gradient_masking_suspected"] is True


def test_gradient_masking_rule():
    assert gradient_masking_warnings(0.9, {"apgd-ce": 0.5, "apgd-t": 0.48, "square": 0.48}) == []
    assert len(gradient_masking_warnings(0.9, {"apgd-ce": 0.5, "square": 0.45})) == 1
    assert gradient_masking_warnings(0.9, {"square": 0.2}) == [], "Square alone is no evidence of masking"


# ------------------------------------------------------------------------ evaluate modules
def test_metric_modules_load_offline_by_path():
    import evaluate

    from cure_hf.metrics import metric_path

    accuracy = evaluate.load(metric_path("accuracy"))
    assert accuracy.compute(predictions=[1, 2, 3, 0], references=[1, 2, 0, 0])["accuracy"] == 0.75
    robust = evaluate.load(metric_path("robust_accuracy"))
    out = robust.compute(
        predictions=[[1, 1, 1], [2, 2, 0], [3, 0, 0]], references=[1, 2, 3], attack_names=["clean", "pgd20", "cw"]
    )
    assert out == {
        "robust_accuracy": pytest.approx(1 / 3),
        "clean_accuracy": 1.0,
        "pgd20_accuracy": pytest.approx(2 / 3),
        "cw_accuracy": pytest.approx(1 / 3),
    }
    with pytest.raises(ValueError, match="one name per column"):
        robust.compute(predictions=[[1, 1]], references=[1], attack_names=["clean"])
    with pytest.raises(ValueError, match="not shipped"):
        metric_path("f1")


# ---------------------------------------------------------------------------- best vs last
def test_robust_overfitting_summary_best_last_and_selected():
    history = [
        {"loss": 1.0, "step": 1},
        {"eval_validation_robust_accuracy": 0.30, "eval_test_robust_accuracy": 0.28, "step": 2},
        {"eval_validation_robust_accuracy": 0.45, "eval_test_robust_accuracy": 0.40, "step": 4},
        {"eval_validation_robust_accuracy": 0.41, "eval_test_robust_accuracy": 0.43, "step": 6},
        {"eval_validation_robust_accuracy": 0.35, "eval_test_robust_accuracy": 0.33, "step": 8},
    ]
    s = robust_overfitting_summary(history, selection_key="eval_validation_robust_accuracy")
    val, test = s["eval_validation_robust_accuracy"], s["eval_test_robust_accuracy"]
    assert (val["best"], val["best_step"], val["last"], val["last_step"]) == (0.45, 4, 0.35, 8)
    assert val["gap"] == pytest.approx(0.10) and val["n_evaluations"] == 4
    assert (test["best"], test["best_step"]) == (0.43, 6)
    assert test["at_selected"] == 0.40, "the test number of the checkpoint chosen on validation, not the test best"


# ------------------------------------------------------------------------------ trainer
def _trainer(tmp_path, digits, **overrides):
    from cure_hf import CURETrainer, CURETrainingArguments

    train = digits["train"].select(range(96))
    train.set_transform(digits["train"].format["format_kwargs"]["transform"])
    fields = dict(
        output_dir=str(tmp_path / "run"),
        adv_method="fgsm_rs",
        max_steps=4,
        per_device_train_batch_size=16,
        learning_rate=0.05,
        eval_attacks="clean,pgd3,cw",
        eval_pgd_steps=3,
        eval_max_examples=12,
        eval_attack_batch_size=5,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    fields.update(overrides)
    return CURETrainer(
        make_tiny_model("test_resnet"),
        CURETrainingArguments(**fields),
        train_dataset=train,
        eval_dataset=digits["test"],
    )


def test_trainer_evaluate_records_and_batches(tmp_path, digits, trained_model):
    trainer = _trainer(tmp_path, digits)
    trainer.model.load_state_dict(trained_model.state_dict())
    sizes = []
    collate = trainer.data_collator
    trainer.data_collator = lambda examples: sizes.append(len(examples)) or collate(examples)
    with torch.no_grad():  # as in the Trainer's own evaluation loop
        metrics = trainer.evaluate()
    # the Trainer's clean pass (per_device_eval_batch_size 8), then the attacks in eval_attack_batch_size batches,
    # both over the first eval_max_examples examples
    assert sizes == [8, 4, 5, 5, 2]
    assert metrics["eval_n_examples"] == 12
    assert set(metrics) >= {"eval_accuracy", "eval_pgd3_accuracy", "eval_cw_accuracy", "eval_robust_accuracy"}
    assert metrics["eval_pgd3_accuracy"] <= metrics["eval_accuracy"]
    history = json.loads((tmp_path / "run" / "robust_eval_history.json").read_text())
    assert history[-1]["metrics"]["pgd3_accuracy"] == metrics["eval_pgd3_accuracy"] and history[-1]["step"] == 0


def test_validation_split_selection_and_best_vs_last(tmp_path, digits):
    trainer = _trainer(
        tmp_path,
        digits,
        validation_fraction=0.25,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="robust_accuracy",
        eval_attacks="clean,pgd2",
        eval_pgd_steps=2,
    )
    assert trainer.args.metric_for_best_model == "validation_robust_accuracy"
    assert len(trainer.train_dataset) == 72 and len(trainer.validation_dataset) == 24
    assert trainer.eval_dataset["test"] is digits["test"], "the test set stays an evaluation set, never split"
    assert trainer.eval_dataset["validation"] is trainer.validation_dataset
    output = trainer.train()
    for key in ("eval_validation_robust_accuracy", "eval_test_robust_accuracy"):
        assert output.metrics[f"{key}_best_minus_last"] == pytest.approx(
            output.metrics[f"{key}_best"] - output.metrics[f"{key}_last"]
        )
    assert "eval_test_robust_accuracy_at_selected" in output.metrics
    summary = json.loads((tmp_path / "run" / "robust_overfitting.json").read_text())
    assert summary["eval_validation_robust_accuracy"]["n_evaluations"] == 2


def test_config_rejects_bad_evaluation_fields(tmp_path):
    from cure_hf import CURETrainingArguments

    base = dict(output_dir=str(tmp_path), report_to=[])
    for bad, needle in [
        ({"eval_attacks": "clean,fgsm"}, "eval_attacks"),
        ({"validation_fraction": 1.5}, "validation_fraction"),
        ({"eval_norm": "L2"}, "eval_norm"),
        ({"autoattack_version": "fast"}, "autoattack version"),
        ({"eval_attack_batch_size": 0}, "eval_attack_batch_size"),
    ]:
        with pytest.raises(ValueError, match=needle):
            CURETrainingArguments(**base, **bad)


# -------------------------------------------------------------------------------- plots
def test_plots_write_pngs(tmp_path):
    from PIL import Image

    from cure_hf.plots import plot_accuracy_vs_eps, plot_training_history

    history = [
        {
            "eval_accuracy": 0.9 - 0.01 * i,
            "eval_pgd20_accuracy": 0.5 - 0.02 * abs(i - 3),
            "eval_robust_accuracy": 0.48 - 0.02 * abs(i - 3),
            "step": 10 * i,
        }
        for i in range(8)
    ]
    path = plot_training_history(history, str(tmp_path / "history.png"))
    assert Image.open(path).format == "PNG" and os.path.getsize(path) > 5000
    curves = {
        "CURE": {0.0: {"robust_accuracy": 0.9}, 4 / 255: {"robust_accuracy": 0.6}, 8 / 255: {"robust_accuracy": 0.4}},
        "TRADES": {0.0: {"robust_accuracy": 0.85}, 8 / 255: {"robust_accuracy": 0.38}},
    }
    path = plot_accuracy_vs_eps(curves, str(tmp_path / "eps.png"))
    assert Image.open(path).size[0] > 300
    with pytest.raises(ValueError, match="no 'eval_\\*accuracy'"):
        plot_training_history([{"loss": 1.0, "step": 1}], str(tmp_path / "none.png"))
