"""The reference matmul is x @ (W * m).T with nn.Linear semantics."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies import patterns, scores_for
from vnmsparse import compress, vnm_linear, vnm_mask


@given(data=st.data(), p=patterns, lead=st.lists(st.integers(1, 3), max_size=2), with_bias=st.booleans())
def test_matches_masked_dense_in_float64(data, p, lead, with_bias):
    scores = data.draw(scores_for(p))
    R, C = scores.shape
    weight = torch.randn(R, C, dtype=torch.float64)
    mask = vnm_mask(scores, p)
    bias = torch.randn(R, dtype=torch.float64) if with_bias else None
    x = torch.randn(*lead, C, dtype=torch.float64)
    expected = x @ (weight * mask).T + (0 if bias is None else bias)
    weight32 = weight.float()
    got = vnm_linear(x.float(), compress(weight32, p, mask=mask), None if bias is None else bias.float())
    assert got.shape == (*lead, R)
    torch.testing.assert_close(got.double(), x.float().double() @ (weight32.double() * mask).T + (0 if bias is None else bias.float().double()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)


def test_bad_inputs():
    t = compress(torch.randn(8, 16), "8:2:8")
    with pytest.raises(ValueError, match="in_features=16"):
        vnm_linear(torch.randn(2, 15), t)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        vnm_linear(torch.randn(2, 16), t, torch.randn(7))
    with pytest.raises(TypeError, match="VNMTensor"):
        vnm_linear(torch.randn(2, 16), torch.randn(8, 16))
