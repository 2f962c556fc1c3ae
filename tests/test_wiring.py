"""The wiring of the core against independent oracles: numpy's quantile, hand-computed averages, gradients computed
apart from the trainer, and pass-through spies on what the trainer hands to the loss, the model and the revision model.

Each test here kills mutants that the module tests let live (mutation testing: docs/safety.md).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import make_tiny_model

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.attacks import kl_divergence, pgd
from cure_hf.data import image_transform, load_digits_dataset
from cure_hf.evaluation import predict_under_attack
from cure_hf.prominence import conserve_mask, mask_gradients_, quantile_threshold, quantile_thresholds
from cure_hf.revision import RevisionModel

EPS = 8 / 255


@pytest.fixture(scope="module")
def tiny_train():
    """16 digits at 16x16 pixels, no augmentation: two batches of 8."""
    data = load_digits_dataset()["train"].select(range(16))
    data.set_transform(image_transform(16, train=True))
    return data


def _args(tmp_path, **overrides):
    fields = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=8,
        attack_steps=2,
        learning_rate=0.05,
        report_to="none",
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_steps=1,
    )
    fields.update(overrides)
    return CURETrainingArguments(**fields)


# ------------------------------------------------------------------------------ the prominence mask
def _numpy_mask(score: np.ndarray, fraction: float) -> np.ndarray:
    """Conserved = strictly below numpy's (linear) fraction-quantile, computed in float64."""
    return score < np.quantile(score.astype(np.float64).ravel(), fraction)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.75])
def test_mask_with_ties_and_exact_zeros_matches_numpy(fraction):
    """Ties at the threshold are updated (not conserved) and a block of exact zeros is conserved only while it lies
    strictly below the quantile: both are where `<` vs `<=` or an off-by-one order statistic would show."""
    rows = [
        np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3], dtype=np.float32),  # ties, zeros
        np.array([0, 0, 0, 0, 0, 0, 0, 5, 6, 7], dtype=np.float32),  # quantile inside the zeros
        np.array([1, 1, 1, 1, 1, 1, 1, 1], dtype=np.float32),  # all tied: nothing conserved
        np.array([3, 0, 2, 0, 1, 4, 2, 0, 5], dtype=np.float32).reshape(3, 3),
    ]
    params = []
    for row in rows:
        p = nn.Parameter(torch.zeros(row.shape))
        p.grad = torch.from_numpy(row * np.where(np.arange(row.size) % 2, -1, 1).reshape(row.shape)).float()
        params.append(p)
    scores = [np.abs(p.grad.numpy()) for p in params]
    masks = mask_gradients_(params, fraction)
    for score, mask, p in zip(scores, masks, params):
        expected = _numpy_mask(score, fraction)
        assert np.array_equal(mask.numpy(), expected), (score, fraction)
        assert np.array_equal(conserve_mask(torch.from_numpy(score), fraction).numpy(), expected)
        assert np.all(p.grad.numpy()[expected] == 0) and np.all(np.abs(p.grad.numpy()[~expected]) == score[~expected])
        assert quantile_threshold(torch.from_numpy(score), fraction).item() == pytest.approx(
            np.quantile(score.astype(np.float64), fraction), abs=1e-7
        )


def test_batched_thresholds_of_equal_size_tensors_match_numpy_one_by_one():
    """Equal-size tensors share one batched selection: each still gets its own quantile."""
    g = torch.Generator().manual_seed(0)
    scores = [torch.randint(0, 4, (7, 5), generator=g).float() for _ in range(3)] + [
        torch.rand(35, generator=g),
        torch.rand(4, generator=g),
    ]
    for fraction in (0.0, 0.2, 0.5, 1.0):
        got = quantile_thresholds(scores, fraction)
        for score, value in zip(scores, got):
            assert value.item() == pytest.approx(np.quantile(score.numpy().astype(np.float64), fraction), abs=1e-6)


def test_mask_with_external_scores_uses_them_not_the_gradient():
    p = nn.Parameter(torch.zeros(6))
    p.grad = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # the opposite order of the score
    score = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    (mask,) = mask_gradients_([p], 0.5, scores=[score])
    assert mask.tolist() == _numpy_mask(score.numpy(), 0.5).tolist() == [True, True, True, False, False, False]
    assert p.grad.tolist() == [0.0, 0.0, 0.0, 3.0, 2.0, 1.0]


def test_on_mask_receives_every_parameter_with_its_own_mask():
    params = [nn.Parameter(torch.zeros(n)) for n in (4, 4, 9)]
    for i, p in enumerate(params):
        p.grad = torch.arange(p.numel(), dtype=torch.float32) * (i + 1)
    seen = {}
    result = mask_gradients_(params, 0.5, on_mask=lambda p, m: seen.__setitem__(id(p), m.clone()))
    assert result == [None, None, None] and set(seen) == {id(p) for p in params}
    for p in params:
        assert torch.equal(seen[id(p)], torch.from_numpy(_numpy_mask(np.arange(p.numel()) * 1.0, 0.5)))


# ------------------------------------------------------------------------------------ the revision EMA
def test_revision_ema_over_several_steps_matches_hand_computation():
    """g <- m g + (1 - m) f with m = min(1 - 1/(t + 1), d): with d = 0.7, m is 0.5, 2/3, 0.7, 0.7 at t = 1..4."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    revision = RevisionModel(model, rate=1.0, decay=0.7, seed=0)
    g = [1.0, -2.0]
    for f in ([3.0, 0.0], [0.0, 6.0], [-1.0, 1.0], [2.0, 2.0]):
        with torch.no_grad():
            model.weight.copy_(torch.tensor([f]))
        assert revision.step_(model) is True
        m = min(1.0 - 1.0 / (revision.step + 1), 0.7)
        g = [m * gi + (1.0 - m) * fi for gi, fi in zip(g, f)]
        assert revision.module.weight.flatten().tolist() == pytest.approx(g, rel=1e-6)
    assert revision.step == 4


def test_revision_draws_update_with_probability_rate():
    """Rate r: over 400 steps about r of them update (binomial, 5 sigma), and a skipped draw leaves g alone."""
    model = nn.Linear(1, 1, bias=False)
    revision = RevisionModel(model, rate=0.3, decay=0.999, seed=1)
    updates = 0
    for _ in range(400):
        before = revision.module.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        updated = revision.step_(model)
        updates += updated
        assert updated != torch.equal(before, revision.module.weight)
    assert abs(updates - 120) < 5 * (400 * 0.3 * 0.7) ** 0.5


def test_revision_defaults_are_the_papers():
    revision = RevisionModel(nn.Linear(2, 1))
    assert (revision.rate, revision.decay, revision.train_mode, revision.module.training) == (0.2, 0.999, True, True)
    assert torch.equal(revision.generator.get_state(), torch.Generator().manual_seed(0).get_state())
    assert revision.state()["rate"] == 0.2 and revision.state()["decay"] == 0.999


def test_revision_save_load_round_trip(tmp_path):
    """Two saves in two folders: each load reads its own folder (weights, step, generator, schedule)."""
    import safetensors

    model = make_tiny_model("test_resnet")
    revisions = []
    for steps, folder in ((3, tmp_path / "a"), (5, tmp_path / "b")):
        folder.mkdir()
        revision = RevisionModel(model, rate=0.5, decay=0.9, seed=steps)
        for _ in range(steps):
            with torch.no_grad():
                next(model.parameters()).add_(0.1)
            revision.step_(model)
        revision.save(str(folder), schedule={"method_start_step": steps + 4})
        revisions.append((folder, revision))
    for folder, revision in reversed(revisions):
        other = RevisionModel(make_tiny_model("test_resnet", seed=5), rate=0.5, decay=0.9, seed=0)
        assert RevisionModel.read_schedule(str(folder)) == {"method_start_step": revision.step + 4}
        assert other.load(str(folder)) == {"method_start_step": revision.step + 4}
        assert other.step == revision.step and torch.equal(other.generator.get_state(), revision.generator.get_state())
        assert all(
            torch.equal(a, b) for a, b in zip(other.module.state_dict().values(), revision.module.state_dict().values())
        )
        with safetensors.safe_open(str(folder / "revision.safetensors"), framework="pt") as f:
            metadata = f.metadata()
        assert (metadata["format"], metadata["rate"], metadata["decay"]) == ("pt", "0.5", "0.9")


def test_revision_load_is_strict_and_reads_files_without_a_schedule(tmp_path):
    import safetensors.torch

    RevisionModel(nn.Linear(2, 1)).save(str(tmp_path))
    with pytest.raises(RuntimeError, match="Missing key"):
        RevisionModel(nn.Sequential(nn.Linear(2, 1))).load(str(tmp_path))  # "0.weight" vs "weight"
    state = {
        "module.weight": torch.ones(1, 2),
        "module.bias": torch.zeros(1),
        "generator_state": torch.Generator().manual_seed(1).get_state(),
    }
    safetensors.torch.save_file(state, str(tmp_path / "revision.safetensors"), metadata={"step": "2"})
    revision = RevisionModel(nn.Linear(2, 1))
    assert revision.load(str(tmp_path)) == {} and revision.step == 2
    assert RevisionModel.read_schedule(str(tmp_path)) == {}


# ------------------------------------------------------------------------ the trainer's step, by spies
class _Spies:
    """Pass-through spies: the batch the step receives, every train-mode forward of the model (input, output),
    every forward of the revision model, and the LossInputs handed to the method's loss."""

    def __init__(self, trainer):
        self.batches, self.forwards, self.revision_forwards, self.loss_inputs = [], [], [], []
        step = trainer.training_step

        def training_step(model, inputs, *rest):
            self.batches.append(inputs["pixel_values"].detach().clone())
            if trainer.revision is None and trainer.component("revision") is not None:
                trainer.component("revision").ensure()
            if trainer.revision is not None and not getattr(trainer.revision, "_spied", False):
                trainer.revision.module.register_forward_hook(
                    lambda m, i, o: self.revision_forwards.append((i[0].detach().clone(), o.detach().clone()))
                )
                trainer.revision._spied = True
            return step(model, inputs, *rest)

        trainer.training_step = training_step
        model = trainer.model  # (the revision model is a deep copy, hooks included: count this module's calls only)
        model.register_forward_hook(
            lambda m, i, o: (
                self.forwards.append((i[0].detach().clone(), o.detach().clone())) if m is model and m.training else None
            )
        )
        method = copy.copy(trainer.method)  # an instance attribute shadows the class's loss for this trainer only
        loss = method.loss

        def spy_loss(inputs, hp):
            self.loss_inputs.append((inputs, dict(hp)))
            return loss(inputs, hp)

        method.loss = spy_loss
        trainer.method = method

    def output_for(self, forwards, x):
        matches = [out for inp, out in forwards if inp.shape == x.shape and torch.equal(inp, x)]
        assert len(matches) == 1, f"expected one forward on this input, found {len(matches)}"
        return matches[0]


_OWN_HYPERPARAMETERS = {
    "pgd": {},
    "fgsm_rs": {},
    "trades": {"trades_beta": 4.5},
    "mart": {"trades_beta": 4.5},
    "cure": {"clean_weight": 0.37, "consistency_weight": 0.55},
}


@pytest.mark.parametrize("method", ["pgd", "trades", "mart", "fgsm_rs", "cure"])
def test_every_method_trains_on_x_adv_within_eps_and_hands_its_hyperparameters_to_the_loss(
    tmp_path, tiny_train, one_thread, method, monkeypatch
):
    import cure_hf.components as components

    consistency_weights = []
    with_consistency = components.with_consistency

    def consistency_spy(result, z_nat, z_adv, r_nat, r_adv, gamma):
        consistency_weights.append((gamma, z_nat, z_adv, r_nat, r_adv))
        return with_consistency(result, z_nat, z_adv, r_nat, r_adv, gamma)

    monkeypatch.setattr(components, "with_consistency", consistency_spy)
    args = _args(
        tmp_path,
        adv_method=method,
        label_smoothing_factor=0.05,
        attack_step_size="3/255",
        **_OWN_HYPERPARAMETERS[method],
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=tiny_train)
    spies = _Spies(trainer)
    trainer.train()
    (x,), ((inputs, hp),) = spies.batches, spies.loss_inputs
    train_inputs = [inp for inp, _ in spies.forwards]
    adversarial = [inp for inp in train_inputs if not torch.equal(inp, x)]
    assert len(adversarial) == 1, "exactly one adversarial training forward"
    x_adv = adversarial[0]
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2, "the attack moved the batch"
    assert torch.equal(inputs.z_adv, spies.output_for(spies.forwards, x_adv))
    uses_clean = method in ("trades", "mart", "cure")
    assert len(train_inputs) == 1 + uses_clean
    if uses_clean:
        assert torch.equal(inputs.z_nat, spies.output_for(spies.forwards, x))
    else:
        assert inputs.z_nat is None
    expected = {k: v for k, v in _OWN_HYPERPARAMETERS[method].items() if k != "consistency_weight"}
    if method == "cure":
        expected["prominence"] = "loss"
    assert hp == {**expected, "label_smoothing_factor": 0.05}  # exactly the method's own fields, with their values
    if method == "cure":  # the revision logits paired with the right view: g(x) with z_nat, g(x_adv) with z_adv
        assert len(spies.revision_forwards) == 2
        ((gamma, z_nat, z_adv, r_nat, r_adv),) = consistency_weights
        assert gamma == 0.55 and z_nat is inputs.z_nat and z_adv is inputs.z_adv
        assert torch.equal(r_nat, spies.output_for(spies.revision_forwards, x))
        assert torch.equal(r_adv, spies.output_for(spies.revision_forwards, x_adv))
        assert torch.equal(inputs.r_nat, r_nat) and torch.equal(inputs.r_adv, r_adv)
    else:
        assert inputs.r_nat is None and inputs.r_adv is None and not consistency_weights


def test_paper_prominence_scores_come_from_separate_clean_and_adversarial_gradients(
    tmp_path, tiny_train, one_thread, monkeypatch
):
    """The mask's scores are alpha |dCE(f(x))/dw| + (1 - alpha) |dCE(f(x_adv))/dw|, recomputed here apart from the
    trainer on a copy of the model taken before the step."""
    import cure_hf.components as trainer_module

    args = _args(tmp_path, adv_method="cure", prominence="paper", clean_weight=0.3, conserve_fraction=0.4)
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=tiny_train)
    spies = _Spies(trainer)
    before, labels, seen = [], [], []
    step = trainer.training_step

    def keep_model(model, inputs, *rest):
        before.append(copy.deepcopy(trainer.accelerator.unwrap_model(model)))
        labels.append(inputs["labels"].clone())
        return step(model, inputs, *rest)

    trainer.training_step = keep_model
    real = trainer_module.mask_gradients_

    def spy(params, fraction, scores=None, on_mask=None):
        seen.append((fraction, [s.detach().clone() for s in scores]))
        return real(params, fraction, scores, on_mask=on_mask)

    monkeypatch.setattr(trainer_module, "mask_gradients_", spy)
    trainer.train()
    ((fraction, scores),) = seen
    assert fraction == 0.4
    x = spies.batches[0]
    x_adv = next(inp for inp, _ in spies.forwards if not torch.equal(inp, x))
    model = before[0].train()
    names = [n for n, p in model.named_parameters() if n not in trainer.component("conservation").head_names]
    grads = []
    for view in (x, x_adv):
        net = copy.deepcopy(model)
        loss = F.cross_entropy(net(view), labels[0])
        named = dict(net.named_parameters())
        grads.append(torch.autograd.grad(loss, [named[n] for n in names], allow_unused=True))
    assert len(scores) == len(names)
    for name, score, clean, adv in zip(names, scores, *grads):
        expected = 0.3 * clean.abs() + 0.7 * adv.abs()
        torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- evaluation and attacks
class _RoundedThreshold(nn.Module):
    """Class 0 iff the first pixel rounds to 1: piecewise constant, so PGD's steps never move x_adv and an attack
    succeeds only through its random start. Restarts then find new successes at random."""

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        z = (torch.round(v) - 0.5) * 10 + 0 * v
        return torch.stack([z, -z], dim=1)


def test_pgd_restarts_keep_every_earlier_success():
    x = torch.full((400, 1, 2, 2), 0.5 - EPS / 2)  # class 1; a start above 0.5 (a quarter of them) flips it
    labels = torch.ones(400, dtype=torch.long)
    model = _RoundedThreshold()
    runs = {}
    for restarts in (1, 3):
        predictions = predict_under_attack(
            model,
            x,
            labels,
            "pgd",
            eps=EPS,
            step_size=EPS / 4,
            steps=2,
            restarts=restarts,
            generator=torch.Generator().manual_seed(0),
        )
        runs[restarts] = set((predictions != labels).nonzero().flatten().tolist())
    assert 60 < len(runs[1]) < 140, "about a quarter broken by one restart"
    assert runs[1] <= runs[3], "an example broken by an earlier restart must stay broken"
    assert len(runs[3]) > len(runs[1]) + 60, "later restarts break more examples (1 - 0.75^3 of them)"


def test_kl_attack_maximises_kl_clean_to_adversarial_not_the_reverse():
    """TRADES' inner maximisation: KL(softmax f(x) || softmax f(x_adv)). On asymmetric distributions the two
    directions of the KL disagree on the gradient's sign; one step from x must follow the forward direction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[4.0, -1.0, 0.5, 2.0], [-3.0, 2.0, 1.0, -1.0], [0.5, 0.5, -2.0, 1.0]]))
        model[1].bias.zero_()
    x = torch.tensor([[0.3, 0.6, 0.5, 0.4]]).view(1, 1, 2, 2)
    clean_logits = torch.tensor([[3.0, -2.0, 0.1]])  # the teacher: far from f(x), so the directions differ
    step = 1 / 255

    def one_step(direction):
        probe = x.clone().requires_grad_(True)
        logits = model(probe)
        kl = (
            kl_divergence(logits, clean_logits, "sum")
            if direction == "forward"
            else kl_divergence(clean_logits, logits, "sum")
        )
        (grad,) = torch.autograd.grad(kl, probe)
        return (x + step * grad.sign()).clamp(x - EPS, x + EPS).clamp(0, 1)

    forward, reverse = one_step("forward"), one_step("reverse")
    assert not torch.equal(forward, reverse), "control: both directions would pass this test"
    x_adv = pgd(model, x, None, eps=EPS, step_size=step, steps=1, loss="kl", init="none", clean_logits=clean_logits)
    torch.testing.assert_close(x_adv, forward, rtol=0, atol=1e-7)


# ------------------------------------------------------------------- fp16: the scaler's skipped steps
@pytest.mark.parametrize("prominence", ["loss", "paper"])
def test_cpu_grad_scaler_skipped_step_runs_no_mask_no_revision_and_is_not_divergence(
    tmp_path, tiny_train, one_thread, prominence
):
    """torch.amp.GradScaler('cpu') stands in for fp16's scaler on GPUs: an overflow at step 0 makes the scaler skip
    the optimizer step, so the mask and the revision must not run on it and the divergence guard must not stop."""
    args = _args(
        tmp_path, adv_method="cure", max_steps=2, prominence=prominence, conservation="hard", revision_rate=1.0
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=tiny_train)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    model = trainer.model
    next(model.parameters()).register_hook(lambda g: g * float("inf") if trainer.state.global_step == 0 else g)
    masks, skipped = [], []
    conserve = trainer.component("conservation").before_optimizer_step

    def counted(*hook_args):  # returns None, as an optimizer pre-step hook must
        masks.append(trainer.state.global_step)
        conserve(*hook_args)

    trainer.component("conservation").before_optimizer_step = counted
    step_end = trainer.callback_handler.on_step_end

    def on_step_end(*a, **k):
        skipped.append(trainer.accelerator.optimizer_step_was_skipped)
        return step_end(*a, **k)

    trainer.callback_handler.on_step_end = on_step_end
    trainer.train()
    assert trainer.state.global_step == 2 and skipped == [True, False]
    assert masks == [1], "the mask ran on the taken step only"
    assert trainer.revision.step == 1, "the revision counted the taken step only"
    assert trainer.accelerator.scaler.get_scale() == 2.0**3, "the scaler backed off once"
    assert trainer.component("conservation")._paper_grads is None
    assert trainer.nonfinite_guard.skipped_steps == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------- module behaviours that surviving mutants showed untested
def test_quantile_thresholds_of_single_entries_and_negative_scores_match_numpy():
    scores = [torch.tensor([3.0]), torch.tensor([-2.0, 1.0, -5.0, 0.5]), torch.tensor([-1.0, -3.0, 2.0, 0.0])]
    for fraction in (0.25, 0.5):
        for score, value in zip(scores, quantile_thresholds(scores, fraction)):
            assert value.item() == pytest.approx(np.quantile(score.numpy().astype(np.float64), fraction))
    with pytest.raises(ValueError, match="empty tensor"):
        quantile_thresholds([torch.ones(3), torch.empty(0)], 0.5)


def test_zero_fraction_mask_is_a_boolean_mask_of_nothing():
    mask = conserve_mask(torch.rand(4, 3), 0.0)
    assert mask.dtype == torch.bool and mask.shape == (4, 3) and not mask.any()


def test_margin_loss_reductions():
    from cure_hf.attacks import margin_loss

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 4.0]])
    labels = torch.tensor([0, 0, 2])
    per_example = [1.0 - 3.0, 2.0 - 0.0, 1.0 - 4.0]  # best wrong logit minus the true one
    assert margin_loss(logits, labels, reduction="none").tolist() == per_example
    assert margin_loss(logits, labels).item() == pytest.approx(sum(per_example) / 3)
    assert margin_loss(logits, labels, reduction="mean").item() == pytest.approx(sum(per_example) / 3)
    assert margin_loss(logits, labels, reduction="sum").item() == pytest.approx(sum(per_example))


def test_loss_functions_default_to_no_label_smoothing():
    from cure_hf import methods

    g = torch.Generator().manual_seed(0)
    z_nat, z_adv, r_nat, r_adv = (torch.randn(5, 4, generator=g) for _ in range(4))
    y = torch.tensor([0, 1, 2, 3, 0])
    ce = lambda z: F.cross_entropy(z.double(), y).item()  # noqa: E731
    kl = lambda student, teacher: F.kl_div(
        F.log_softmax(student.double(), 1),
        F.softmax(teacher.double(), 1),  # noqa
        reduction="batchmean",
    ).item()
    assert methods.smoothed_cross_entropy(z_nat, y).item() == pytest.approx(ce(z_nat), rel=1e-5)
    assert methods.clean_loss(z_nat, y)[0].item() == pytest.approx(ce(z_nat), rel=1e-5)
    assert methods.pgd_at_loss(z_adv, y)[0].item() == pytest.approx(ce(z_adv), rel=1e-5)
    assert methods.trades_loss(z_nat, z_adv, y, beta=2.0)[0].item() == pytest.approx(
        ce(z_nat) + 2.0 * kl(z_adv, z_nat), rel=1e-5
    )
    consistency = kl(z_nat, r_nat) + kl(z_adv, r_adv)
    assert methods.cure_loss(z_nat, z_adv, r_nat, r_adv, y, alpha=0.2, gamma=0.5)[0].item() == pytest.approx(
        0.2 * ce(z_nat) + 0.8 * ce(z_adv) + 0.5 * consistency, rel=1e-5
    )
    assert methods.cure_paper_loss(z_nat, z_adv, r_nat, r_adv, y, gamma=0.5)[0].item() == pytest.approx(
        ce(z_nat) + kl(z_adv, z_nat) + 0.5 * consistency, rel=1e-5
    )
    assert methods.mart_loss(z_nat, z_adv, y, beta=1.0)[0].item() == pytest.approx(
        methods.mart_loss(z_nat, z_adv, y, beta=1.0, smoothing=0.0)[0].item()
    )


def test_label_smoothing_reaches_the_cross_entropy_terms():
    from cure_hf import methods

    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    expected = F.cross_entropy(z.double(), y, label_smoothing=0.2).item()
    assert methods.clean_loss(z, y, 0.2)[0].item() == pytest.approx(expected, rel=1e-5)
    assert methods.pgd_at_loss(z, y, 0.2)[0].item() == pytest.approx(expected, rel=1e-5)
    z_adv = torch.randn(6, 5, generator=g)
    kl = F.kl_div(F.log_softmax(z_adv.double(), 1), F.softmax(z.double(), 1), reduction="batchmean").item()
    assert methods.trades_loss(z, z_adv, y, 2.0, 0.2)[0].item() == pytest.approx(expected + 2.0 * kl, rel=1e-5)


def test_mart_loss_with_three_classes_matches_a_per_example_computation():
    """MART's boosted CE uses the most likely *wrong* class; with 3 classes (not 4) the top-2 slice matters."""
    import math

    from cure_hf.methods import mart_loss

    g = torch.Generator().manual_seed(2)
    z_nat, z_adv = torch.randn(7, 3, generator=g) * 2, torch.randn(7, 3, generator=g) * 2
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    boosted = robust = 0.0
    for i in range(7):
        p_adv = torch.softmax(z_adv[i].double(), 0).tolist()
        p_nat = torch.softmax(z_nat[i].double(), 0).tolist()
        wrong = max((p, k) for k, p in enumerate(p_adv) if k != y[i])[1]
        boosted += -math.log(p_adv[y[i]]) - math.log(1.0001 - p_adv[wrong] + 1e-12)
        kl = sum(a * (math.log(a + 1e-12) - math.log(b + 1e-12)) for a, b in zip(p_nat, p_adv))
        robust += kl * (1.0000001 - p_nat[y[i]])
    loss, _ = mart_loss(z_nat, z_adv, y, beta=3.0)
    assert loss.item() == pytest.approx(boosted / 7 + 3.0 * robust / 7, rel=1e-5)


def test_fgsm_rs_takes_one_step_of_1_25_eps_from_a_seeded_uniform_start():
    """A linear two-class model: the CE gradient's sign is the same everywhere, so after the random start in
    [x - eps, x + eps] one step of 1.25 eps reaches the ball's edge iff the start was above x - 0.25 eps: 62.5% of
    the pixels (25% for an explicit step of 0.5 eps; all of them for a bigger or a second step)."""
    from cure_hf.attacks import fgsm_rs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4000, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(4000), torch.randn(4000).sign()]))
    x, y = torch.full((1, 4000), 0.5), torch.ones(1, dtype=torch.long)
    direction = -model[1].weight[1].sign()  # raising CE for class 1 lowers the class-1 logit
    edge = x + EPS * direction

    def at_edge(x_adv):
        return (x_adv - edge).abs().lt(1e-7).float().mean().item()

    runs = [fgsm_rs(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2]), "the generator drives the start"
    assert (runs[0] - x).abs().max() <= EPS + 1e-7
    assert at_edge(runs[0]) == pytest.approx(0.625, abs=0.03)
    explicit = fgsm_rs(model, x, y, eps=EPS, step_size=0.5 * EPS, generator=torch.Generator().manual_seed(1))
    assert at_edge(explicit) == pytest.approx(0.25, abs=0.03)


def test_paper_scores_without_accumulated_gradients_name_the_problem(tmp_path, tiny_train):
    trainer = CURETrainer(
        make_tiny_model("test_resnet"), _args(tmp_path, adv_method="cure", prominence="paper"), train_dataset=tiny_train
    )
    with pytest.raises(RuntimeError, match="prominence='paper' found no accumulated clean/adversarial gradients"):
        trainer.component("conservation")._paper_scores(trainer.component("conservation").maskable_parameters())


def test_cure_losses_smooth_their_cross_entropy_terms_and_name_their_parts():
    from cure_hf.methods import method_loss

    g = torch.Generator().manual_seed(3)
    z_nat, z_adv, r_nat, r_adv = (torch.randn(6, 5, generator=g) for _ in range(4))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    ce = lambda z: F.cross_entropy(z.double(), y, label_smoothing=0.2).item()  # noqa: E731
    kl = lambda student, teacher: F.kl_div(
        F.log_softmax(student.double(), 1),
        F.softmax(teacher.double(), 1),  # noqa
        reduction="batchmean",
    ).item()
    logits = dict(z_nat=z_nat, z_adv=z_adv, r_nat=r_nat, r_adv=r_adv)
    consistency = kl(z_nat, r_nat) + kl(z_adv, r_adv)
    loss, parts = method_loss("cure", y, **logits, alpha=0.3, gamma=0.5, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.3 * ce(z_nat) + 0.7 * ce(z_adv) + 0.5 * consistency, rel=1e-5)
    assert set(parts) == {"ce_nat", "ce_adv", "consistency"}
    loss, parts = method_loss("cure", y, **logits, gamma=0.5, label_smoothing=0.2, prominence="paper")
    assert loss.item() == pytest.approx(ce(z_nat) + kl(z_adv, z_nat) + 0.5 * consistency, rel=1e-5)
    assert parts["ce_nat"].item() == pytest.approx(ce(z_nat), rel=1e-5)
    assert parts["kl_adv"].item() == pytest.approx(kl(z_adv, z_nat), rel=1e-5)
    assert parts["consistency"].item() == pytest.approx(consistency, rel=1e-5) and len(parts) == 3


def test_the_revision_model_gets_its_settings_from_the_arguments(tmp_path, tiny_train):
    args = _args(
        tmp_path,
        adv_method="cure",
        revision_rate=0.35,
        revision_decay=0.77,
        revision_seed=11,
        revision_train_mode=False,
    )
    trainer = CURETrainer(make_tiny_model("test_resnet"), args, train_dataset=tiny_train)
    revision = trainer.component("revision").ensure()
    assert (revision.rate, revision.decay, revision.train_mode, revision.module.training) == (0.35, 0.77, False, False)
    assert torch.equal(revision.generator.get_state(), torch.Generator().manual_seed(11).get_state())
    assert trainer.component("revision").ensure() is revision
    net = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.equal(a, b) for a, b in zip(revision.module.parameters(), net.parameters()))
