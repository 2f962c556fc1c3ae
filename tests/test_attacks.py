import pytest
import torch
import torch.nn.functional as F

from cure_hf.attacks import fgsm_rs, kl_divergence, logits_of, margin_loss, pgd, project_linf

EPS = 8 / 255


def _bn_buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("loss,init", [("ce", "uniform"), ("kl", "normal"), ("margin", "uniform")])
def test_pgd_stays_in_ball_and_pixel_range(tiny_model, digits_batch, loss, init):
    model = tiny_model("test_resnet")
    x, y = digits_batch["pixel_values"], digits_batch["labels"]
    x_adv = pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=5, loss=loss, init=init)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert (x_adv - x).abs().max() > EPS / 2  # it actually moved


def test_pgd_raises_the_loss(tiny_model, digits_batch):
    model = tiny_model("test_resnet").eval()
    x, y = digits_batch["pixel_values"], digits_batch["labels"]
    x_adv = pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=10, loss="ce")
    noise = (x + EPS * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).sign()).clamp(0, 1)
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        adv = F.cross_entropy(model(x_adv), y)
        noisy = F.cross_entropy(model(noise), y)
    # a random perturbation of the same size barely moves the loss; the attack moves it far more
    assert adv - clean > 5 * (noisy - clean).abs() and adv > clean


def test_trades_kl_attack_raises_the_divergence(tiny_model, digits_batch):
    model = tiny_model("test_vit").eval()
    x = digits_batch["pixel_values"]
    x_adv = pgd(model, x, eps=EPS, step_size=2 / 255, steps=10, loss="kl", init="normal")
    with torch.no_grad():
        assert kl_divergence(model(x_adv), model(x)) > kl_divergence(model(x + 0.0), model(x)) + 1e-4


@pytest.mark.parametrize("start_training", [True, False])
def test_attack_leaves_bn_stats_grads_and_mode_untouched(tiny_model, digits_batch, start_training):
    model = tiny_model("test_resnet").train(start_training)
    model.model.fc.weight.requires_grad_(False)  # a frozen parameter must stay frozen
    before = _bn_buffers(model)
    x, y = digits_batch["pixel_values"], digits_batch["labels"]
    pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=3, loss="kl", init="normal")
    fgsm_rs(model, x, y, eps=EPS)
    assert model.training is start_training
    assert all(m.training is start_training for m in model.modules())
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert model.model.fc.weight.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.fc.weight")


def test_attack_works_inside_no_grad(tiny_model, digits_batch):
    model = tiny_model("test_resnet")
    x, y = digits_batch["pixel_values"], digits_batch["labels"]
    with torch.no_grad():
        x_adv = pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=2)
    assert (x_adv - x).abs().max() > 0


def test_fgsm_rs_in_ball(tiny_model, digits_batch):
    model = tiny_model("test_convnext")
    x, y = digits_batch["pixel_values"], digits_batch["labels"]
    x_adv = fgsm_rs(model, x, y, eps=EPS)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_seeded_generator_makes_attack_reproducible(tiny_model, digits_batch):
    model = tiny_model("test_resnet")
    x, y = digits_batch["pixel_values"], digits_batch["labels"]
    runs = [
        pgd(model, x, y, eps=EPS, step_size=2 / 255, steps=2, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_margin_loss_sign():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 0])
    assert torch.allclose(margin_loss(logits, labels, reduction="none"), torch.tensor([-2.0, 2.0]))


def test_project_linf():
    x = torch.full((1, 1, 2, 2), 0.99)
    out = project_linf(x + torch.tensor([0.5, -0.5, 0.001, -0.001]).view(1, 1, 2, 2), x, 0.1)
    assert torch.allclose(out.flatten(), torch.tensor([1.0, 0.89, 0.991, 0.989]))


def test_logits_of_transformers_output():
    from transformers.modeling_outputs import ImageClassifierOutput

    t = torch.randn(2, 3)
    assert logits_of(ImageClassifierOutput(logits=t)) is t and logits_of(t) is t and logits_of((t,)) is t
    with pytest.raises(TypeError, match="logits"):
        logits_of("nope")


def test_attack_argument_errors(tiny_model, digits_batch):
    model = tiny_model("test_resnet")
    x = digits_batch["pixel_values"]
    with pytest.raises(ValueError, match="needs labels"):
        pgd(model, x, eps=EPS, step_size=1 / 255, steps=1, loss="ce")
    with pytest.raises(ValueError, match="init"):
        pgd(model, x, digits_batch["labels"], eps=EPS, step_size=1 / 255, steps=1, init="gauss")
