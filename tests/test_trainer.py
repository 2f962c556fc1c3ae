"""CURETrainer end to end on tiny models: hooks, conservation, revision, methods, evaluation, errors."""

import copy

import pytest
import torch
from transformers import TrainingArguments

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.prominence import conserve_mask
from tests.conftest import make_tiny_model


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        attack_steps=2,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(kwargs)
    return CURETrainingArguments(**defaults)


def _random_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("conservation", ["hard", "soft"])
def test_conservation_after_sgd_step_with_momentum_and_weight_decay(tmp_path, digits, conservation):
    model = make_tiny_model("test_resnet")
    trainer = CURETrainer(
        model, make_args(tmp_path, conservation=conservation, learning_rate=0.1), train_dataset=digits["train"]
    )
    trainer.create_optimizer()
    trainer.component("revision").ensure()
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.defaults["momentum"] == 0.9
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters()}  # weight decay on all parameters
    named = dict(model.named_parameters())
    for step in range(2):  # the second step has a non-zero momentum buffer
        _random_grads(model, seed=step)
        conserved = {
            n: conserve_mask(p.grad.abs(), 0.3)
            for n, p in named.items()
            if n not in trainer.component("conservation").head_names
        }
        before = {n: p.detach().clone() for n, p in named.items()}
        trainer.optimizer.step()
        for name, mask in conserved.items():
            p = named[name].detach()
            if conservation == "hard":
                assert torch.equal(p[mask], before[name][mask]), name  # bit-identical
            assert not torch.equal(p[~mask], before[name][~mask]), name  # updated entries moved
        moved = [not torch.equal(named[n].detach()[m], before[n][m]) for n, m in conserved.items()]
        if conservation == "soft" and step == 1:
            assert all(moved)  # weight decay and momentum still move conserved weights
    assert trainer.revision.step == 2


def test_head_is_never_masked_and_fraction_is_p(tmp_path, digits):
    model = make_tiny_model("test_vit")
    trainer = CURETrainer(model, make_args(tmp_path, conserve_fraction=0.4), train_dataset=digits["train"])
    assert trainer.component("conservation").head_names == {"model.head.weight", "model.head.bias"}
    _random_grads(model)
    head_before = {
        n: p.grad.clone() for n, p in model.named_parameters() if n in trainer.component("conservation").head_names
    }
    trainer.component("conservation").before_optimizer_step(None)
    for name, p in model.named_parameters():
        zeros = int((p.grad == 0).sum())
        if name in trainer.component("conservation").head_names:
            assert torch.equal(p.grad, head_before[name])
        else:
            assert abs(zeros - 0.4 * p.numel()) <= 1.0, name


def test_requires_cure_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="CURETrainingArguments"):
        CURETrainer(make_tiny_model(), TrainingArguments(output_dir=str(tmp_path), report_to="none"))


def test_pixels_outside_unit_range_are_refused(tmp_path, digits):
    normalised = (
        digits["train"]
        .select(range(32))
        .with_transform(
            lambda b: {"pixel_values": [(torch.rand(3, 32, 32) - 0.5) / 0.25 for _ in b["label"]], "labels": b["label"]}
        )
    )
    trainer = CURETrainer(make_tiny_model(), make_args(tmp_path, max_steps=1), train_dataset=normalised)
    with pytest.raises(ValueError, match="normalise inside the model"):
        trainer.train()


@pytest.mark.parametrize("method", ["clean", "pgd", "trades", "mart", "fgsm_rs", "cure"])
def test_every_method_trains_and_evaluates(tmp_path, digits, method):
    model = make_tiny_model("test_resnet")
    args = make_args(tmp_path, adv_method=method, max_steps=2, eval_max_examples=32, eval_pgd_steps=3)
    trainer = CURETrainer(model, args, train_dataset=digits["train"].select(range(64)), eval_dataset=digits["test"])
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (trainer.revision is not None) == (method == "cure")
    metrics = trainer.evaluate()
    assert metrics["eval_n_examples"] == 32
    assert 0.0 <= metrics["eval_robust_accuracy"] <= metrics["eval_pgd3_accuracy"] <= metrics["eval_accuracy"] <= 1.0
    logged = [h for h in trainer.state.log_history if "loss" in h]
    expected_parts = {
        "clean": ["ce_nat"],
        "pgd": ["ce_adv"],
        "fgsm_rs": ["ce_adv"],
        "trades": ["ce_nat", "kl_adv"],
        "mart": ["ce_adv", "kl_adv"],
        "cure": ["ce_nat", "ce_adv", "consistency", "revision_updated"],
    }
    assert logged and all(k in logged[0] for k in expected_parts[method])


def test_paper_prominence_and_revision_counter(tmp_path, digits):
    model = make_tiny_model("test_resnet")
    args = make_args(tmp_path, prominence="paper", conservation="hard", max_steps=3, revision_rate=0.5)
    trainer = CURETrainer(model, args, train_dataset=digits["train"].select(range(48)))
    trainer.train()
    assert trainer.revision.step == 3
    assert trainer.component("conservation")._paper_grads is None  # consumed by the mask at every step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_transformers_image_classification_model(tmp_path, digits):
    from transformers import ViTConfig, ViTForImageClassification

    from cure_hf.models import PixelNormalized

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    torch.manual_seed(0)
    model = PixelNormalized(ViTForImageClassification(config), (0.5,) * 3, (0.5,) * 3)
    trainer = CURETrainer(
        model,
        make_args(tmp_path, max_steps=2, eval_max_examples=16, eval_pgd_steps=2),
        train_dataset=digits["train"].select(range(32)),
        eval_dataset=digits["test"],
    )
    assert trainer.component("conservation").head_names == {"model.classifier.weight", "model.classifier.bias"}
    trainer.train()
    assert trainer.revision.step == 2
    assert trainer.evaluate()["eval_n_examples"] == 16


def test_short_cure_run_beats_clean_training_on_pgd20(tmp_path, digits):
    """Spec section 5: CURE fine-tunes a naturally trained network; the natural one has ~0 robust accuracy."""
    common = dict(
        per_device_train_batch_size=64,
        eval_max_examples=120,
        per_device_eval_batch_size=120,
        logging_steps=50,
        lr_scheduler_type="cosine",
    )
    natural = make_tiny_model("test_resnet")
    clean_trainer = CURETrainer(
        natural,
        make_args(tmp_path / "nat", adv_method="clean", num_train_epochs=3, learning_rate=0.1, **common),
        train_dataset=digits["train"],
        eval_dataset=digits["test"],
    )
    clean_trainer.train()
    clean = clean_trainer.evaluate()

    robust = copy.deepcopy(natural)
    cure_trainer = CURETrainer(
        robust,
        make_args(
            tmp_path / "cure",
            adv_method="cure",
            num_train_epochs=2,
            attack_steps=5,
            attack_step_size="3/255",
            learning_rate=0.05,
            **common,
        ),
        train_dataset=digits["train"],
        eval_dataset=digits["test"],
    )
    cure_trainer.train()
    cure = cure_trainer.evaluate()
    print("clean training:", clean, "\nCURE:", cure)
    assert clean["eval_accuracy"] > 0.7
    assert cure["eval_pgd20_accuracy"] > clean["eval_pgd20_accuracy"] + 0.25


def _tiny_transformers_vit(attention_dropout: float):
    from transformers import ViTConfig, ViTForImageClassification

    from cure_hf.models import PixelNormalized

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=attention_dropout,
    )
    return PixelNormalized(ViTForImageClassification(config), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_reuse_clean_logits_compares_the_train_and_eval_forwards(tmp_path, digits):
    """Attention dropout inside a transformers ViT (no nn.Dropout module on that path) makes the two forwards
    differ: refused at the first step. The same ViT without dropout trains, and the check leaves no trace."""
    args = make_args(tmp_path, adv_method="trades", attack_reuse_clean_logits=True, max_steps=1)
    trainer = CURETrainer(_tiny_transformers_vit(0.1), args, train_dataset=digits["train"])
    with pytest.raises(ValueError, match="differ by up to"):
        trainer.train()
    model = _tiny_transformers_vit(0.0)
    before = copy.deepcopy(model.state_dict())
    trainer = CURETrainer(model, args, train_dataset=digits["train"])
    trainer.train()
    assert trainer.state.global_step == 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained


def test_reuse_clean_logits_is_refused_for_attacks_that_do_not_start_from_clean_logits(tmp_path):
    with pytest.raises(ValueError, match="adv_method='pgd'"):
        CURETrainer(make_tiny_model("test_vit"), make_args(tmp_path, adv_method="pgd", attack_reuse_clean_logits=True))


def test_forward_check_restores_batchnorm_statistics_and_rng(digits_batch):
    from cure_hf.runtime import check_train_eval_forwards_agree

    model = make_tiny_model("test_resnet")
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="differ by up to"):  # BatchNorm: batch statistics vs running statistics
        check_train_eval_forwards_agree(model, digits_batch["pixel_values"])
    assert torch.equal(torch.rand(3), expected_draw)
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v), k
