import numpy as np
import pytest
import torch

from cure_hf.prominence import conserve_mask, mask_gradients_, paper_score, quantile_threshold


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.999, 1.0])
def test_threshold_matches_numpy_linear_quantile(n, fraction):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    expected = np.quantile(values.numpy().astype(np.float64), fraction)
    assert quantile_threshold(values, fraction).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shape", [(64,), (16, 9), (8, 3, 3, 3), (3, 50, 7)])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5])
def test_conserved_fraction_equals_p_within_rounding(shape, fraction):
    score = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    n = score.numel()
    conserved = int(conserve_mask(score, fraction).sum())
    assert abs(conserved - fraction * n) <= 1.0
    # what is conserved is the least prominent part
    assert score[conserve_mask(score, fraction)].max() < score[~conserve_mask(score, fraction)].min()


def test_zero_fraction_conserves_nothing():
    assert not conserve_mask(torch.rand(10), 0.0).any()


def test_threshold_beyond_2_pow_24_entries():
    n = 2**24 + 3
    values = torch.rand(n, generator=torch.Generator().manual_seed(0))
    expected = np.quantile(values.numpy().astype(np.float64), 0.3)
    assert quantile_threshold(values, 0.3).item() == pytest.approx(expected, abs=1e-6)


def test_mask_gradients_in_place():
    a = torch.nn.Parameter(torch.zeros(10))
    a.grad = torch.arange(10, dtype=torch.float32) - 4.5  # |grad| = 4.5, 3.5, ..., 0.5, ..., 4.5
    b = torch.nn.Parameter(torch.zeros(3))  # no gradient: skipped
    masks = mask_gradients_([a, b], 0.4)
    assert masks[1] is None
    expected_kept = a.grad.abs() >= np.quantile(np.abs(np.arange(10) - 4.5), 0.4)
    assert torch.equal(masks[0], ~expected_kept)
    assert torch.all(a.grad[masks[0]] == 0) and torch.all(a.grad[~masks[0]] != 0)


def test_mask_with_external_scores():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    masks = mask_gradients_([p], 0.5, scores=[torch.tensor([4.0, 1.0, 3.0, 2.0])])
    assert masks[0].tolist() == [False, True, False, True]
    assert p.grad.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_paper_score():
    score = paper_score(torch.tensor([-2.0, 1.0]), torch.tensor([1.0, -3.0]), 0.25)
    assert torch.allclose(score, torch.tensor([0.25 * 2 + 0.75 * 1, 0.25 * 1 + 0.75 * 3]))


def test_invalid_fraction():
    with pytest.raises(ValueError, match="fraction"):
        quantile_threshold(torch.rand(3), 1.5)
