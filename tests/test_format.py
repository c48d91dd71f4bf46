"""VNMTensor: exact round trips, honest storage accounting, and files that refuse to load when damaged."""

import json
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies import patterns, scores_for
from vnmsparse import VNMPattern, VNMTensor, compress, fold_input_permutation, magnitude_scores, vnm_linear, vnm_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@given(data=st.data(), p=patterns, dtype=st.sampled_from(DTYPES))
def test_compress_then_decompress_is_exact(data, p, dtype):
    scores = data.draw(scores_for(p))
    weight = (torch.randn(scores.shape) * 3).to(dtype)
    mask = vnm_mask(scores, p)
    t = compress(weight, p, mask=mask)
    dense = t.to_dense()
    assert dense.dtype == dtype and dense.shape == weight.shape
    assert torch.equal(dense, weight * mask)
    assert torch.equal(t.mask(), mask)
    assert torch.equal(compress(weight, p, scores=scores).to_dense(), dense)


@given(data=st.data(), p=patterns)
def test_sparser_than_pattern_masks_compress_exactly(data, p):
    scores = data.draw(scores_for(p))
    mask = vnm_mask(scores, p) & (torch.rand(scores.shape) < 0.5)
    weight = torch.randn(scores.shape)
    assert torch.equal(compress(weight, p, mask=mask).to_dense(), weight * mask)


def test_default_scores_are_magnitudes():
    weight = torch.randn(64, 40)
    p = VNMPattern(V=16, M=8)
    assert torch.equal(compress(weight, p).to_dense(), weight * vnm_mask(magnitude_scores(weight), p))


def test_layout_and_storage():
    p = VNMPattern.parse("64:2:8")
    t = compress(torch.randn(128, 80, dtype=torch.bfloat16), p)
    assert t.values.shape == (128, 20) and t.values.dtype == torch.bfloat16
    assert t.columns.shape == (2, 10, 4) and t.columns.dtype == torch.int32
    assert t.positions.shape == (128, 5) and t.positions.dtype == torch.uint8
    assert t.nbytes == 128 * 20 * 2 + 2 * 10 * 4 * 4 + 128 * 5
    assert t.dense_nbytes == 128 * 80 * 2
    assert t.compression_ratio == pytest.approx(t.dense_nbytes / t.nbytes)
    assert ((t.columns // 8) == torch.arange(10).view(1, 10, 1)).all()  # each block's columns lie in its group


def test_padding_slots_hold_zeros_and_stay_out_of_the_dense_weight():
    p = VNMPattern(V=4, M=5)
    weight = torch.randn(6, 11)  # last group: one real column, three padding slots
    t = compress(weight, p)
    assert (t.columns[:, -1, 1:] >= 11).all()
    assert t.to_dense().shape == (6, 11)
    assert torch.equal(t.to_dense()[:, 10], weight[:, 10])


def test_mask_must_be_vnm_and_match_shape():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match="uses 8 columns"):
        compress(weight, "4:2:8", mask=torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        compress(weight, "4:2:8", mask=torch.zeros(4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="either mask or scores"):
        compress(weight, "4:2:8", mask=torch.zeros(4, 8, dtype=torch.bool), scores=torch.rand(4, 8))
    with pytest.raises(TypeError, match="dtype"):
        compress(weight.double(), "4:2:8")
    with pytest.raises(ValueError, match="2-D"):
        compress(torch.randn(8), "4:2:8")


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_load_round_trip(tmp_path, dtype):
    t = compress(torch.randn(70, 45).to(dtype), "16:2:6")
    path = tmp_path / "w.safetensors"
    t.save(path)
    back = VNMTensor.load(path)
    assert back.pattern == t.pattern and back.shape == t.shape and back.dtype == dtype
    for name in ("values", "columns", "positions"):
        assert torch.equal(getattr(back, name), getattr(t, name))


def _saved(tmp_path):
    path = tmp_path / "w.safetensors"
    compress(torch.randn(64, 64, dtype=torch.float16), "16:2:8").save(path)
    return path


def test_truncated_file_is_refused(tmp_path):
    path = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match="cannot read"):
        VNMTensor.load(path)


def test_tampered_value_is_refused(tmp_path):
    path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        VNMTensor.load(path)


def _rewrite_metadata(path, **changes):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    header["__metadata__"].update(changes)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    offsets_shift = len(encoded) - size
    assert offsets_shift >= 0
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])


@pytest.mark.parametrize("changes, match", [
    ({"pattern": "16:2:4"}, "sha256"),
    ({"shape": "[64, 60]"}, "sha256"),
    ({"version": "99"}, "unsupported"),
    ({"format": "something-else"}, "not a vnmsparse.VNMTensor"),
    ({"dtype": "float32"}, "does not match metadata dtype"),
])
def test_mismatched_metadata_is_refused(tmp_path, changes, match):
    path = _saved(tmp_path)
    _rewrite_metadata(path, **changes)
    with pytest.raises(ValueError, match=match):
        VNMTensor.load(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        VNMTensor.load("/nonexistent/w.safetensors")


def test_constructor_rejects_inconsistent_tensors():
    t = compress(torch.randn(32, 16), "16:2:8")
    with pytest.raises(ValueError, match="repeats a column"):
        VNMTensor(t.values, torch.zeros_like(t.columns), t.positions, t.pattern, t.shape)
    with pytest.raises(ValueError, match="distinct ascending slots"):
        VNMTensor(t.values, t.columns, torch.zeros_like(t.positions), t.pattern, t.shape)
    with pytest.raises(TypeError, match="int32"):
        VNMTensor(t.values, t.columns.long(), t.positions, t.pattern, t.shape)
    with pytest.raises(ValueError, match=r"lie in \[0, 16\)"):
        VNMTensor(t.values, t.columns + 16, t.positions, t.pattern, t.shape)


def test_nonzero_in_a_padding_slot_is_refused():
    t = compress(torch.randn(4, 5), "4:2:4")  # second group: one real column, three padding slots
    values = t.values.clone()
    values[:, 3] = 1.0  # the second kept value of group 1 sits in a padding slot
    with pytest.raises(ValueError, match="padding slot"):
        VNMTensor(values, t.columns, t.positions, t.pattern, t.shape)


@given(data=st.data(), p=patterns)
def test_folding_an_input_permutation_serves_original_inputs(data, p):
    scores = data.draw(scores_for(p))
    R, C = scores.shape
    weight = torch.randn(R, C, dtype=torch.float64).float()
    perm = torch.randperm(C)
    permuted = compress(weight[:, perm], p)  # pruned in permuted column order
    folded = fold_input_permutation(permuted, perm)
    x = torch.randn(3, C)
    expected = x[:, perm] @ permuted.to_dense().T
    torch.testing.assert_close(vnm_linear(x, folded), expected)
    dense = torch.zeros(R, C)
    dense[:, perm] = permuted.to_dense()
    assert torch.equal(folded.to_dense(), dense)


def test_fold_rejects_non_permutations():
    t = compress(torch.randn(4, 8), "4:2:8")
    with pytest.raises(ValueError, match="permutation"):
        fold_input_permutation(t, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        fold_input_permutation(t, torch.arange(7))


def test_to_changes_dtype_and_keeps_indices():
    t = compress(torch.randn(32, 24), "16:2:6")
    h = t.to(dtype=torch.float16)
    assert h.dtype == torch.float16 and torch.equal(h.columns, t.columns)
    with pytest.raises(TypeError, match="dtype"):
        t.to(dtype=torch.int8)


def test_pruned_non_finite_weights_are_stored_as_zeros():
    weight = torch.randn(8, 8)
    weight[0, 0], weight[1, 7], weight[2, 3] = float("inf"), float("nan"), -float("inf")
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:, 4:6] = True
    t = compress(weight, "4:2:8", mask=mask)
    assert torch.isfinite(t.values).all()
    assert torch.equal(t.to_dense(), torch.where(mask, weight, 0.0))
    assert torch.isfinite(vnm_linear(torch.randn(2, 8), t)).all()


@pytest.mark.parametrize("shape, error", [
    ((16, 16, 5), ValueError), ((16,), ValueError), ((16.5, 16), TypeError), ((True, 16), TypeError), ("16x16", ValueError),
])
def test_shape_must_be_two_ints(shape, error):
    t = compress(torch.randn(16, 16), "16:2:8")
    with pytest.raises(error, match="shape"):
        VNMTensor(t.values, t.columns, t.positions, t.pattern, shape)
    assert VNMTensor(t.values, t.columns, t.positions, t.pattern, torch.Size([16, 16])).shape == (16, 16)


def test_wrong_types_raise_clear_errors(tmp_path):
    weight = torch.randn(8, 16)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        compress(weight, "8:2:8", scores=weight.tolist())
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        compress(weight, "8:2:8", mask=[[True] * 16] * 8)
    t = compress(weight, "8:2:8")
    t.save(tmp_path / "w.safetensors")
    with pytest.raises(TypeError, match="path"):
        VNMTensor.load(str(tmp_path / "w.safetensors").encode())
    with pytest.raises(TypeError, match="path"):
        t.save(b"/tmp/w.safetensors")


def test_equality_is_by_value():
    weight = torch.randn(8, 16)
    a, b = compress(weight, "8:2:8"), compress(weight.clone(), "8:2:8")
    assert a == b and not (a != b)
    assert a != compress(weight, "4:2:8") and a != compress(weight * 2, "8:2:8") and a != a.to(dtype=torch.float16)
    assert a != "not a tensor"
    with pytest.raises(TypeError):
        hash(a)


def test_meta_tensors_are_skeletons_and_zeros_is_valid():
    t = VNMTensor.zeros((50, 37), "16:2:8", torch.bfloat16)
    assert t.dtype == torch.bfloat16 and not t.to_dense().any() and t.to_dense().shape == (50, 37)
    meta = VNMTensor.zeros((50, 37), "16:2:8", device="meta")
    assert meta.device.type == "meta" and meta.values.shape == t.values.shape
    with pytest.raises(ValueError, match="shape"):
        VNMTensor(meta.values[:, :3], meta.columns, meta.positions, meta.pattern, meta.shape)
