"""Gradient accumulation: CURE's mask is applied once per optimizer step, to the accumulated gradient.

Two micro-batches of 8 with gradient_accumulation_steps=2 must give the same masked update as one batch of 16
(a model without BatchNorm, so a micro-batch computes what its half of the big batch computes). Masking each
micro-batch's gradient separately would not: the quantile of a sum is not the sum of the quantiles.
"""

import pytest
import torch

from cure_hf import CURETrainer, CURETrainingArguments
from cure_hf.data import image_transform, load_digits_dataset
from cure_hf.prominence import mask_gradients_

STEPS = 2


@pytest.fixture(scope="module")
def train_subset():
    train = load_digits_dataset()["train"].select(range(STEPS * 16))
    train.set_transform(image_transform(32, train=True))
    return train


def _train(tiny_model, data, tmp_path, batch, accumulation, **fields):
    args = CURETrainingArguments(
        output_dir=str(tmp_path / f"b{batch}a{accumulation}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        attack_steps=2,
        learning_rate=0.05,
        revision_rate=1.0,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **fields,
    )
    trainer = CURETrainer(model=tiny_model("test_vit"), args=args, train_dataset=data)
    calls = []
    conserve = trainer.component(
        "conservation"
    ).before_optimizer_step  # the optimizer pre-step hook calls it through the instance

    def counted(*hook_args):
        calls.append(sum(float(p.grad.abs().sum()) for p in trainer.component("conservation").maskable_parameters()))
        conserve(*hook_args)

    trainer.component("conservation").before_optimizer_step = counted
    torch.manual_seed(0)  # the attacks' random starts: the same stream whether drawn as 2 x 8 or 1 x 16
    trainer.train()
    return trainer, calls


@pytest.mark.parametrize("prominence,conservation", [("loss", "soft"), ("paper", "hard")])
def test_two_micro_batches_match_one_batch_of_twice_the_size(
    tiny_model, train_subset, tmp_path, one_thread, prominence, conservation
):
    fields = dict(adv_method="cure", prominence=prominence, conservation=conservation)
    accumulated, accumulated_calls = _train(tiny_model, train_subset, tmp_path, 8, 2, **fields)
    big, big_calls = _train(tiny_model, train_subset, tmp_path, 16, 1, **fields)
    assert accumulated.state.global_step == big.state.global_step == STEPS
    # The mask ran once per optimizer step (not per micro-batch), on the gradient of both micro-batches.
    assert len(accumulated_calls) == len(big_calls) == STEPS
    torch.testing.assert_close(torch.tensor(accumulated_calls), torch.tensor(big_calls), rtol=1e-4, atol=0)
    initial = dict(tiny_model("test_vit").named_parameters())
    moved = max((q - initial[n]).abs().max().item() for n, q in big.model.named_parameters())
    assert moved > 1e-3, "training did not move the weights"
    assert_equal_up_to_mask_ties(accumulated.model, big.model)
    assert_equal_up_to_mask_ties(accumulated.revision.module, big.revision.module)


def assert_equal_up_to_mask_ties(model, reference, max_tie_fraction=1e-3):
    """Equal to float tolerance, but for the mask's ties.

    The two runs sum the same gradients in another order, so an entry whose |grad| equals its tensor's
    quantile up to rounding may be conserved in one and updated in the other; such an entry moves by about
    lr * |grad|. The KL attack's sign() turns rounding into a few different pixels, which adds a few ties
    (about 3e-4 of the entries here). Masking per micro-batch instead would change most entries.
    """
    ties, total = 0, 0
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        close = torch.isclose(p, q, atol=2e-6, rtol=1e-4)
        ties, total = ties + int((~close).sum()), total + p.numel()
        assert (p - q).abs().max() < 1e-3, name
    assert ties <= max_tie_fraction * total, f"{ties} of {total} entries differ"


def test_masking_each_micro_batch_would_give_another_update(tiny_model):
    """The control: the accumulated-then-masked gradient differs from the sum of per-micro-batch masked ones."""
    torch.manual_seed(0)
    first, second = torch.randn(64, 32), torch.randn(64, 32)
    summed = torch.nn.Parameter(torch.zeros(64, 32))
    summed.grad = first + second
    mask_gradients_([summed], 0.3)
    per_micro = torch.zeros(64, 32)
    for grad in (first, second):
        p = torch.nn.Parameter(torch.zeros(64, 32))
        p.grad = grad.clone()
        mask_gradients_([p], 0.3)
        per_micro += p.grad
    assert (summed.grad - per_micro).abs().max() > 0.1
    assert abs(float((summed.grad == 0).float().mean()) - 0.3) < 1e-3  # a fraction p of the sum conserved
