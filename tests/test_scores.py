"""Importance scores: magnitude is |W|; RIA matches its formula, stays finite on zero rows and columns, and refuses
bad inputs with the argument named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vnmsparse.scores import magnitude_scores, ria_scores


def _ria_loop(W: torch.Tensor, act: torch.Tensor, a: float) -> torch.Tensor:
    """RIA element by element, straight from the paper's definition (float64)."""
    W = W.double().abs()
    out = torch.zeros_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            col, row = W[:, j].sum(), W[i, :].sum()
            rel = (W[i, j] / col if col > 0 else 0.0) + (W[i, j] / row if row > 0 else 0.0)
            out[i, j] = rel * act[j].double().sqrt() ** a
    return out


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 7), cols=st.integers(1, 7), a=st.sampled_from([0.0, 0.5, 1.0, 2.0]), seed=st.integers(0, 99))
def test_ria_matches_its_definition(rows, cols, a, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[W.abs() < 0.3] = 0  # zero entries, sometimes whole rows or columns
    act = torch.rand(cols, generator=g) * 4
    got = ria_scores(W, act, a)
    assert got.dtype == torch.float32 and got.shape == W.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _ria_loop(W, act, a), rtol=1e-5, atol=1e-7)


def test_magnitude_is_abs_in_float32_and_detached():
    W = torch.tensor([[-2.0, 0.5], [0.0, 3.0]], dtype=torch.bfloat16, requires_grad=True)
    s = magnitude_scores(W)
    assert s.dtype == torch.float32 and not s.requires_grad
    assert torch.equal(s, torch.tensor([[2.0, 0.5], [0.0, 3.0]]))


def test_ria_prefers_weights_on_active_channels():
    W = torch.ones(4, 2)
    s = ria_scores(W, torch.tensor([1.0, 100.0]), a=0.5)
    assert (s[:, 1] > s[:, 0]).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: magnitude_scores([[1.0]]), TypeError, "weight must be a torch.Tensor"),
        (lambda: magnitude_scores(torch.ones(3)), ValueError, "weight must be 2-D"),
        (lambda: magnitude_scores(torch.ones(2, 2, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda: ria_scores(torch.ones(2, 3), [1.0, 1.0, 1.0]), TypeError, "act_sq_mean must be a torch.Tensor"),
        (lambda: ria_scores(torch.ones(2, 3), torch.ones(2)), ValueError, r"act_sq_mean must have shape \(in_features,\)"),
        (lambda: ria_scores(torch.ones(2, 3), torch.tensor([1.0, -1.0, 1.0])), ValueError, "non-negative"),
        (lambda: ria_scores(torch.ones(2, 3), torch.tensor([1.0, float("nan"), 1.0])), ValueError, "finite"),
        (lambda: ria_scores(torch.ones(2, 3), torch.ones(3), a=-1), ValueError, "a must be a finite number"),
        (lambda: ria_scores(torch.ones(2, 3), torch.ones(3), a=True), ValueError, "a must be a finite number"),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
