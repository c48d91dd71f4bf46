"""SR-STE: forward is W * mask, the gradient is straight-through plus decay on pruned weights; bad input refused."""

import pytest
import torch
from torch import nn

from vnmsparse.masks import is_vnm, vnm_mask
from vnmsparse.train import MaskedLinear, srste


def _layer(decay: float = 0.1) -> tuple[MaskedLinear, torch.Tensor]:
    torch.manual_seed(0)
    layer = MaskedLinear.from_linear(nn.Linear(24, 32), "16:2:8", decay=decay)
    mask = vnm_mask(layer.weight.detach().abs(), "16:2:8")
    layer.set_mask(mask)
    return layer, mask


def test_forward_is_weight_times_mask():
    layer, mask = _layer()
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), x @ (layer.weight * mask).T + layer.bias, rtol=0, atol=0)


@pytest.mark.parametrize("decay", [0.0, 0.1, 2e-4])
def test_srste_gradient_is_straight_through_plus_decay(decay):
    layer, mask = _layer(decay)
    x = torch.randn(7, 24)
    layer(x).pow(2).sum().backward()
    # the gradient w.r.t. the masked weight, computed independently
    w_masked = (layer.weight.detach() * mask).requires_grad_(True)
    (x @ w_masked.T + layer.bias.detach()).pow(2).sum().backward()
    expected = w_masked.grad + decay * (~mask) * layer.weight.detach()
    torch.testing.assert_close(layer.weight.grad, expected)
    assert (layer.weight.grad[~mask] != 0).any()  # pruned weights do receive a gradient (straight through)


def test_dense_until_a_mask_is_set():
    layer = MaskedLinear.from_linear(nn.Linear(8, 16), "16:2:8")
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match="no mask yet"):
        layer.to_vnm_tensor()


def test_to_vnm_tensor_is_weight_times_mask():
    layer, mask = _layer()
    assert torch.equal(layer.to_vnm_tensor().to_dense(), layer.weight.detach() * mask)
    assert is_vnm(layer.to_vnm_tensor().mask(), "16:2:8")


def test_bad_input():
    layer, mask = _layer()
    with pytest.raises(TypeError, match="mask must be a bool"):
        layer.set_mask(mask.float())
    with pytest.raises(ValueError, match="mask shape"):
        layer.set_mask(mask[:, :16])
    with pytest.raises(ValueError, match="not 16:2:8"):
        layer.set_mask(torch.ones_like(mask))
    with pytest.raises(ValueError, match="decay must be >= 0"):
        MaskedLinear.from_linear(nn.Linear(8, 16), "16:2:8", decay=-1.0)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        MaskedLinear.from_linear(nn.Conv1d(2, 2, 1), "16:2:8")
    with pytest.raises(ValueError, match="mask shape"):
        srste(torch.randn(4, 8), torch.ones(4, 4, dtype=torch.bool), 0.0)
