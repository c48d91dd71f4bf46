"""VNMLinear: exact against the masked dense layer, conversions, state_dict round trip, dtype moves, compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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


# --- one copy of the weight: the packed layout where the kernels take it -------------------------------------------

HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def packs_on_cpu(monkeypatch):
    """Make VNMLinear treat the CPU like a GPU whose kernels take bf16 / fp16 (forward: the reference from the packed
    parts), so that the packed-mode bookkeeping runs here; the GPU tests below run the real thing."""
    monkeypatch.setattr(VNMLinear, "_packs", staticmethod(lambda weight: weight.dtype in HALF and not weight.values.is_meta))


@pytest.mark.parametrize("shape, pattern", [((48, 40), "16:2:8"), ((50, 37), "32:2:5"), ((33, 9), "16:2:4")])
def test_packed_layer_holds_one_copy_and_saves_the_canonical_form(packs_on_cpu, shape, pattern):
    dense = linear(*shape)
    canonical = VNMLinear.from_linear(dense, pattern).weight.to(dtype=torch.bfloat16)
    sparse = VNMLinear(canonical, dense.bias.detach().to(torch.bfloat16))
    assert sparse.values is None and sparse.columns is None and sparse.packed_vals is not None
    assert sparse.held_nbytes == sum(b.numel() * b.element_size() for b in sparse.buffers())
    assert sparse.weight == canonical  # rebuilt exactly, padding slots included
    state = sparse.state_dict()
    assert set(state) == {"values", "columns", "positions", "bias", "_extra_state"}
    assert torch.equal(state["values"], canonical.values) and torch.equal(state["columns"], canonical.columns)
    x = torch.randn(3, shape[1], dtype=torch.bfloat16)
    torch.testing.assert_close(sparse(x), nn.functional.linear(x, canonical.to_dense(), sparse.bias))
    back = VNMLinear(canonical.to(dtype=torch.float32), dense.bias)
    back.load_state_dict(state)  # into a canonical fp32 layer: copied and cast, as nn.Module does
    assert back.values.dtype == torch.float32 and torch.equal(back.weight.to_dense(), canonical.to_dense().float())
    sparse.float()  # no fp32 kernel: back to the canonical tensors
    assert sparse.packed_vals is None and sparse.weight == canonical.to(dtype=torch.float32)
    sparse.bfloat16()
    assert sparse.values is None and sparse.weight == canonical


def test_packed_layer_compiles_over_its_buffers(packs_on_cpu):
    sparse = VNMLinear.from_linear(linear(64, 40), "16:2:8").to(torch.bfloat16)
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    assert torch.equal(torch.compile(sparse, fullgraph=True)(x), sparse(x))


def test_packed_layer_loads_a_state_dict_into_its_packed_layout(packs_on_cpu):
    source = VNMLinear.from_linear(linear(seed=0), "16:2:8")
    target = VNMLinear.from_linear(linear(seed=1), "16:2:8").to(torch.float16)
    target.load_state_dict(source.state_dict())
    assert target.values is None and target.weight == source.weight.to(dtype=torch.float16)


def test_double_is_refused_before_anything_changes():
    sparse = VNMLinear.from_linear(linear(), "16:2:8")
    before = sparse.state_dict()
    with pytest.raises(TypeError, match="float64"):
        sparse.double()
    assert sparse.values.dtype == sparse.bias.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in sparse.state_dict().items() if k != "_extra_state")


def test_meta_and_to_empty_then_load():
    source = VNMLinear.from_linear(linear(), "16:2:8")
    skeleton = VNMLinear.from_linear(linear(seed=3), "16:2:8").to("meta")
    assert skeleton.values.is_meta and skeleton.bias.is_meta
    assert skeleton(torch.empty(2, 40, device="meta")).shape == (2, 48)
    skeleton.to_empty(device="cpu")  # no data to keep: a valid all-zero weight
    assert not skeleton.weight.to_dense().any()
    skeleton.load_state_dict(source.state_dict())
    x = torch.randn(3, 40)
    assert torch.equal(skeleton(x), source(x))


def _tampered(state, key, value):
    state = dict(state)
    state[key] = value
    return state


@pytest.mark.parametrize("key, value, error, match", [
    ("_extra_state", {"pattern": "16:2:8", "shape": [48, 40], "version": "0"}, ValueError, "version"),
    ("_extra_state", {"pattern": "16:2:9", "shape": [48, 40], "version": "1"}, ValueError, "16:2:9"),
    ("_extra_state", {"pattern": "64:2:3", "shape": [48, 40], "version": "1"}, ValueError, "M must be"),
    ("columns", "not a tensor", TypeError, "columns"),
    ("positions", torch.zeros(48, 3, dtype=torch.uint8), ValueError, "positions"),
    ("columns", torch.zeros(3, 5, 4, dtype=torch.int32), ValueError, "repeats a column"),
])
def test_a_bad_state_dict_leaves_the_layer_untouched(key, value, error, match):
    target = VNMLinear.from_linear(linear(seed=1), "16:2:8")
    before = {k: v.clone() for k, v in target.state_dict().items() if k != "_extra_state"}
    state = _tampered(VNMLinear.from_linear(linear(seed=0), "16:2:8").state_dict(), key, value)
    with pytest.raises(error, match=match):
        target.load_state_dict(state)
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert target.weight.values is target.values


def test_a_failed_bias_load_leaves_the_weight_untouched():
    target = VNMLinear.from_linear(linear(seed=1), "16:2:8")
    before = target.weight.to_dense().clone()
    state = _tampered(VNMLinear.from_linear(linear(seed=0), "16:2:8").state_dict(), "bias", torch.zeros(3))
    with pytest.raises(RuntimeError, match="bias"):
        target.load_state_dict(state)
    assert torch.equal(target.weight.to_dense(), before)


def test_loaded_state_is_copied_not_shared():
    source = VNMLinear.from_linear(linear(seed=0), "16:2:8")
    target = VNMLinear.from_linear(linear(seed=1), "16:2:8")
    target.load_state_dict(source.state_dict())
    assert target.values.data_ptr() != source.values.data_ptr()


@pytest.mark.parametrize("x, error, match", [
    (torch.ones(2, 40, dtype=torch.int64), TypeError, "floating-point"),
    (torch.tensor(1.0), ValueError, "at least one dim"),
    (torch.ones(2, 39), ValueError, "in_features=40"),
])
def test_inputs_nn_linear_refuses_are_refused(x, error, match):
    sparse = VNMLinear.from_linear(linear(), "16:2:8")
    with pytest.raises(error, match=match):
        sparse(x)
    with pytest.raises(error, match=match):
        vs_linear(x, sparse.weight)


def vs_linear(x, weight, bias=None):
    from vnmsparse import ops

    ops.linear(x, weight, bias)
    from vnmsparse import vnm_linear

    return vnm_linear(x, weight, bias)


def test_bias_must_be_a_tensor():
    from vnmsparse import ops, vnm_linear

    weight = compress(torch.randn(8, 16), "8:2:8")
    for fn in (vnm_linear, ops.linear):
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            fn(torch.randn(2, 16), weight, [0.0] * 8)


# --- on a GPU (the lead runs these on the device) ----------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
def test_gpu_layer_memory_after_its_first_call_is_its_packed_bytes():
    torch.cuda.empty_cache()
    sparse = VNMLinear.from_linear(linear(4096, 4096, bias=False), "64:2:8").to(torch.bfloat16)
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    base = torch.cuda.memory_allocated()
    sparse.cuda()
    with torch.no_grad():
        y = sparse(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
    assert sparse.values is None and sparse.packed_vals is not None
    assert held <= sparse.held_nbytes + 64 * 1024, (held, sparse.held_nbytes)
    assert sparse.held_nbytes < 0.3 * 4096 * 4096 * 2  # well under the dense bf16 weight


@pytest.mark.gpu
@gpu
def test_gpu_layer_round_trips_state_and_devices_exactly():
    cpu = VNMLinear.from_linear(linear(96, 72), "32:2:5").to(torch.float16)
    gpu_layer = VNMLinear.from_linear(linear(96, 72), "32:2:5").to(torch.float16).cuda()
    assert gpu_layer.values is None
    assert gpu_layer.weight == cpu.weight.to(device="cuda")
    state = gpu_layer.state_dict()
    assert state["values"].is_cuda and torch.equal(state["values"].cpu(), cpu.values)
    back = gpu_layer.cpu()
    assert back.packed_vals is None and back.weight == cpu.weight
    x = torch.randn(5, 72, dtype=torch.float16, device="cuda")
    gpu_layer.cuda()
    torch.testing.assert_close(gpu_layer(x).float(), cpu.float()(x.cpu().float()).cuda(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@gpu
def test_gpu_compile_reduce_overhead_runs_on_the_packed_buffers():
    model = nn.Sequential(VNMLinear.from_linear(linear(256, 128), "64:2:8"), nn.ReLU(),
                          VNMLinear.from_linear(linear(128, 256), "64:2:8")).to(torch.bfloat16).cuda()
    x = torch.randn(4, 128, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):
            out = compiled(x)
    torch.testing.assert_close(out, eager)


def test_a_move_to_where_the_packed_layer_is_keeps_its_buffers(packs_on_cpu):
    sparse = VNMLinear.from_linear(linear(), "16:2:8").to(torch.bfloat16)
    vals = sparse.packed_vals
    sparse.to("cpu")
    sparse.to(torch.bfloat16)
    assert sparse.packed_vals is vals


def test_packed_layer_refuses_an_input_on_another_device(packs_on_cpu):
    sparse = VNMLinear.from_linear(linear(), "16:2:8").to(torch.bfloat16)
    with pytest.raises(ValueError, match="move one of them"):
        sparse(torch.randn(2, 40, dtype=torch.bfloat16, device="meta"))


# --- the 2:4 copy: a per-layer choice ------------------------------------------------------------------------------

def permuted(weight):
    """`weight` with the reversal of its inputs folded in: every group's kept columns in descending order."""
    from vnmsparse import fold_input_permutation

    return fold_input_permutation(weight, torch.arange(weight.shape[1]).flip(0))


def test_two_four_copy_is_a_constructor_and_from_linear_flag_shown_in_the_repr():
    weight = compress(torch.randn(48, 40), "16:2:8")
    assert not VNMLinear(weight).two_four_copy and "two_four_copy=False" in repr(VNMLinear(weight))
    layer = VNMLinear(weight, two_four_copy=True)
    assert layer.two_four_copy and not layer.holds_two_four_copy  # asked for; on the CPU it never runs: not held
    assert "pattern=16:2:8, bias=False, two_four_copy=True" in repr(layer)
    assert layer.held_nbytes == VNMLinear(weight).held_nbytes
    assert VNMLinear.from_linear(linear(), "64:2:8", two_four_copy=True).two_four_copy
    assert not VNMLinear.from_linear(linear(), "64:2:8").two_four_copy


@pytest.mark.parametrize("value", [1, "yes", None, torch.tensor(True)])
def test_two_four_copy_must_be_a_bool(value):
    weight = compress(torch.randn(48, 40), "16:2:8")
    with pytest.raises(TypeError, match="two_four_copy must be a bool"):
        VNMLinear(weight, two_four_copy=value)
    with pytest.raises(TypeError, match="two_four_copy must be a bool"):
        VNMLinear.from_linear(linear(), "16:2:8", two_four_copy=value)
    layer = VNMLinear(weight)
    with pytest.raises(TypeError, match="two_four_copy must be a bool"):
        layer.two_four_copy = value
    assert layer.two_four_copy is False


@settings(max_examples=30, deadline=None)
@given(V=st.sampled_from([1, 16, 32, 64, 128]), M=st.integers(4, 17), permute=st.booleans(),
       rows=st.integers(1, 70), cols=st.integers(17, 60))
def test_two_four_copy_on_a_weight_that_cannot_have_one_is_a_value_error(V, M, permute, rows, cols):
    # The rule (dispatch.two_four_copy_refusal): V:2:M with 5 <= M <= 8 and V <= 64, permuted or not.
    weight = compress(torch.randn(rows, cols), f"{V}:2:{M}")
    weight = permuted(weight) if permute else weight
    if 5 <= M <= 8 and V <= 64:
        assert VNMLinear(weight, two_four_copy=True).two_four_copy
        return
    rule = "a V:2:M pattern with 5 <= M <= 8 and V <= 64"
    with pytest.raises(ValueError, match=f"two_four_copy needs {rule}"):
        VNMLinear(weight, two_four_copy=True)
    layer = VNMLinear(weight)
    with pytest.raises(ValueError, match=f"two_four_copy needs {rule}"):
        layer.two_four_copy = True
    assert not layer.two_four_copy and layer.weight == weight
    if not permute:
        with pytest.raises(ValueError, match=f"two_four_copy needs {rule}"):
            VNMLinear.from_linear(nn.Linear(cols, rows), f"{V}:2:{M}", two_four_copy=True)


@pytest.fixture
def copies_on_cpu(packs_on_cpu, monkeypatch):
    """As packs_on_cpu, and the CPU counts as a GPU where the 2:4 copy runs (sm_90), so that layers build it here."""
    from vnmsparse import ops

    monkeypatch.setattr(ops, "two_four_copy_pays", lambda packed: True)


@pytest.mark.parametrize("pattern, reversed_inputs", [("32:2:8", False), ("32:2:5", False), ("32:2:7", True)])
def test_a_packed_layer_holds_the_copy_it_asks_for_and_setting_the_flag_builds_or_drops_it(copies_on_cpu, pattern,
                                                                                           reversed_inputs):
    from vnmsparse import ops

    dense = linear(50, 37)
    canonical = VNMLinear.from_linear(dense, pattern).weight.to(dtype=torch.bfloat16)
    canonical = permuted(canonical) if reversed_inputs else canonical
    copy_bytes = ops.pack_two_four(canonical, "cpu").nbytes
    plain = VNMLinear(canonical, dense.bias.detach().to(torch.bfloat16))
    layer = VNMLinear(canonical, dense.bias.detach().to(torch.bfloat16), two_four_copy=True)
    assert layer.holds_two_four_copy and not plain.holds_two_four_copy
    assert layer.held_nbytes == plain.held_nbytes + copy_bytes
    assert layer.held_nbytes == sum(b.numel() * b.element_size() for b in layer.buffers())
    assert layer.state_dict().keys() == plain.state_dict().keys()  # the copy is derived: never saved
    x = torch.randn(3, 37, dtype=torch.bfloat16)
    assert torch.equal(layer(x), plain(x))
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), plain(x))  # over its buffers, the copy's included
    layer.two_four_copy = False
    assert not layer.holds_two_four_copy and layer.copy_vals is None and layer.held_nbytes == plain.held_nbytes
    layer.two_four_copy = True
    assert layer.holds_two_four_copy and layer.held_nbytes == plain.held_nbytes + copy_bytes
    assert layer.weight == canonical
    layer.float()  # no fp32 kernel: canonical tensors, no copy; the flag stays, and the copy comes back with the pack
    assert layer.two_four_copy and not layer.holds_two_four_copy and layer.copy_vals is None
    layer.bfloat16()
    assert layer.holds_two_four_copy and layer.held_nbytes == plain.held_nbytes + copy_bytes


def test_the_flag_survives_state_dict_round_trips_moves_and_the_meta_device():
    source = VNMLinear.from_linear(linear(seed=0), "16:2:8", two_four_copy=True)
    state = source.state_dict()
    assert state["_extra_state"]["two_four_copy"] is True
    target = VNMLinear.from_linear(linear(seed=1), "16:2:8")
    target.load_state_dict(state)
    assert target.two_four_copy and target.weight == source.weight
    target.load_state_dict(VNMLinear.from_linear(linear(seed=2), "16:2:8").state_dict())
    assert not target.two_four_copy  # the state says False: the layer is what the state describes
    skeleton = VNMLinear.from_linear(linear(seed=3), "16:2:8", two_four_copy=True).to("meta")
    assert skeleton.two_four_copy
    skeleton.to_empty(device="cpu")
    assert skeleton.two_four_copy
    skeleton.load_state_dict(state, assign=True)
    assert skeleton.two_four_copy and skeleton.weight == source.weight


def test_a_record_without_the_flag_loads_as_false_and_set_extra_state_takes_it_up():
    target = VNMLinear.from_linear(linear(seed=1), "16:2:8", two_four_copy=True)
    state = VNMLinear.from_linear(linear(seed=0), "16:2:8").state_dict()
    state["_extra_state"] = {k: v for k, v in state["_extra_state"].items() if k != "two_four_copy"}  # older record
    target.load_state_dict(state)
    assert not target.two_four_copy
    from vnmsparse.nn import extra_state_tensor

    target.set_extra_state(extra_state_tensor({**state["_extra_state"], "two_four_copy": True}))  # transformers' way
    assert target.two_four_copy


@pytest.mark.parametrize("flag", ["true", 1, None, [True]])
def test_a_damaged_flag_is_refused_and_the_layer_left_untouched(flag):
    target = VNMLinear.from_linear(linear(seed=1), "16:2:8")
    before = target.weight
    state = VNMLinear.from_linear(linear(seed=0), "16:2:8").state_dict()
    state["_extra_state"] = {**state["_extra_state"], "two_four_copy": flag}
    with pytest.raises(ValueError, match="two_four_copy must be true or false"):
        target.load_state_dict(state)
    with pytest.raises(ValueError, match="two_four_copy must be true or false"):
        target.set_extra_state(state["_extra_state"])
    assert target.weight == before and not target.two_four_copy


def test_a_state_asking_a_copy_of_a_pattern_that_has_none_is_refused_before_anything_changes():
    target = VNMLinear.from_linear(linear(seed=1), "16:2:16")
    before = target.weight
    state = VNMLinear.from_linear(linear(seed=0), "16:2:16").state_dict()
    state["_extra_state"] = {**state["_extra_state"], "two_four_copy": True}
    with pytest.raises(ValueError, match="two_four_copy needs a V:2:M pattern with 5 <= M <= 8"):
        target.load_state_dict(state)
    assert target.weight == before and not target.two_four_copy
