"""VNMLinear: exact against the masked dense layer, conversions, state_dict round trip, dtype moves, compile."""

import pytest
import torch
from torch import nn

from tiny_models import tiny_llama, token_ids
from vnmsparse import VNMPattern, compress, is_vnm
from vnmsparse.nn import VNMLinear
from vnmsparse.sparsify import SparsifyConfig, sparsify


def linear(out_features=48, in_features=40, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("shape", [(48, 40), (50, 37), (16, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_the_masked_dense_layer(shape, bias):
    dense = linear(*shape, bias=bias)
    sparse = VNMLinear.from_linear(dense, "16:2:8")
    mask = sparse.weight.mask()
    assert is_vnm(mask, "16:2:8")
    x = torch.randn(3, 5, shape[1])
    expected = nn.functional.linear(x, dense.weight * mask, dense.bias)
    torch.testing.assert_close(sparse(x), expected)


def test_from_linear_with_scores_or_mask():
    dense = linear()
    scores = torch.rand_like(dense.weight)
    by_scores = VNMLinear.from_linear(dense, "16:2:5", scores=scores)
    by_mask = VNMLinear.from_linear(dense, "16:2:5", mask=by_scores.weight.mask())
    assert torch.equal(by_scores.weight.to_dense(), by_mask.weight.to_dense())
    assert by_scores.pattern == VNMPattern.parse("16:2:5")


def test_to_linear_gives_the_pruned_dense_weight():
    sparse = VNMLinear.from_linear(linear(), "16:2:8")
    dense = sparse.to_linear()
    assert type(dense) is nn.Linear
    assert torch.equal(dense.weight, sparse.weight.to_dense())
    assert torch.equal(dense.bias, sparse.bias)
    x = torch.randn(7, 40)
    torch.testing.assert_close(dense(x), sparse(x))


def test_state_dict_round_trip():
    source = VNMLinear.from_linear(linear(seed=0), "16:2:8")
    target = VNMLinear.from_linear(linear(seed=1), "16:2:8")
    state = source.state_dict()
    assert set(state) == {"values", "columns", "positions", "bias", "_extra_state"}
    assert state["_extra_state"]["pattern"] == "16:2:8"
    target.load_state_dict(state)
    assert torch.equal(target.weight.to_dense(), source.weight.to_dense())
    x = torch.randn(4, 40)
    assert torch.equal(target(x), source(x))


def test_state_dict_of_another_shape_or_pattern_is_refused():
    target = VNMLinear.from_linear(linear(), "16:2:8")
    before = target.weight.to_dense()
    with pytest.raises((RuntimeError, ValueError), match="shape"):
        target.load_state_dict(VNMLinear.from_linear(linear(), "16:2:5").state_dict())
    assert str(target.pattern) == "16:2:8" and torch.equal(target.weight.to_dense(), before)
    state = target.state_dict()
    state["_extra_state"] = {**state["_extra_state"], "shape": [40, 48]}
    with pytest.raises(ValueError, match="shape"):
        target.load_state_dict(state)


def test_dtype_and_device_moves_rebuild_the_weight():
    sparse = VNMLinear.from_linear(linear(), "16:2:8")
    before = sparse.weight.to_dense()
    sparse.to(torch.bfloat16)
    assert sparse.weight.dtype == torch.bfloat16 and sparse.values.dtype == torch.bfloat16
    assert sparse.weight.values is sparse.values
    assert torch.equal(sparse.weight.to_dense(), before.to(torch.bfloat16))
    assert sparse(torch.randn(2, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(TypeError, match="VNMTensor"):
        VNMLinear(torch.randn(4, 8))
    with pytest.raises(TypeError, match="nn.Linear"):
        VNMLinear.from_linear(nn.Conv1d(4, 4, 1), "16:2:8")
    with pytest.raises(ValueError, match="bias"):
        VNMLinear(compress(torch.randn(16, 16), "16:2:8"), torch.zeros(3))


def test_compile_fullgraph_matches_eager():
    model = nn.Sequential(VNMLinear.from_linear(linear(64, 40), "16:2:8"), nn.ReLU(),
                          VNMLinear.from_linear(linear(24, 64, bias=False), "16:2:5"))
    x = torch.randn(5, 40)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_compile_llama_with_vnm_layers():
    model = tiny_llama()
    ids = token_ids()
    sparsify(model, SparsifyConfig("16:2:8"), calib=ids, progress=False)
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
