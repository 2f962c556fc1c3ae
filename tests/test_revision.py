import pytest
import torch

from cure_hf.revision import RevisionModel, ema_update_, revision_decay


def test_revision_decay_formula():
    assert revision_decay(1, 0.999) == pytest.approx(0.5)
    assert revision_decay(3, 0.999) == pytest.approx(0.75)
    assert revision_decay(10**6, 0.999) == pytest.approx(0.999)


def test_update_matches_formula_and_leaves_buffers(tiny_model):
    model = tiny_model("test_resnet", seed=0)
    revision = RevisionModel(model, rate=1.0, decay=0.999, seed=0)
    g_before = {n: p.clone() for n, p in revision.module.named_parameters()}
    buffers_before = {n: b.clone() for n, b in revision.module.named_buffers()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    assert revision.step_(model) is True
    m = revision_decay(1, 0.999)
    f = dict(model.named_parameters())
    for name, g in revision.module.named_parameters():
        torch.testing.assert_close(g, m * g_before[name] + (1 - m) * f[name])
        assert not g.requires_grad
    for name, b in revision.module.named_buffers():
        assert torch.equal(b, buffers_before[name]), name


def test_rate_zero_never_updates_but_counts_steps(tiny_model):
    model = tiny_model("test_vit")
    revision = RevisionModel(model, rate=0.0, seed=0)
    before = [p.clone() for p in revision.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not any(revision.step_(model) for _ in range(5))
    assert revision.step == 5
    assert all(torch.equal(a, b) for a, b in zip(before, revision.module.parameters()))


def test_draws_follow_own_generator_and_resume(tiny_model):
    model = tiny_model("test_resnet")
    a, b = RevisionModel(model, rate=0.4, seed=7), RevisionModel(model, rate=0.4, seed=7)
    torch.manual_seed(123)  # the global RNG must not matter
    draws_a = [a.step_(model) for _ in range(20)]
    torch.manual_seed(999)
    draws_b = [b.step_(model) for _ in range(10)]
    state = b.state()
    c = RevisionModel(model, rate=0.4, seed=0)
    c.load_state(state)
    draws_b += [c.step_(model) for _ in range(10)]
    assert draws_a == draws_b
    assert 0 < sum(draws_a) < 20


def test_ema_update_length_mismatch():
    with pytest.raises(ValueError, match="parameters"):
        ema_update_([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)], 0.5)
