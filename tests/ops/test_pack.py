"""Packing (CPU): the kernel layout holds exactly the canonical weight, in the registers the kernels read."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opshelp import fp64_reference, random_vnm, rel_err

import vnmsparse as vs
from vnmsparse.ops import (check_packable, pack_for_device, pack_window, packed_layout, two_four_tensor, two_four_width,
                           unpack_dense)
from vnmsparse.ops.pack import two_four_slots
from vnmsparse.ops.limits import SUPPORTED_V

SHAPES_PATTERNS = [
    (1, 4, "16:2:4"),
    (17, 9, "16:2:5"),  # short last group: padding slots
    (100, 37, "16:2:5"),
    (130, 77, "32:2:7"),
    (64, 64, "64:2:8"),
    (65, 130, "64:2:8"),
    (300, 1001, "128:2:16"),
    (40, 95, "32:2:32"),
    (257, 250, "64:2:4"),
]


@pytest.mark.parametrize("R,C,pattern", SHAPES_PATTERNS)
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_roundtrip_is_exact(R, C, pattern, permute, dtype):
    t = random_vnm(R, C, pattern, dtype=dtype, permute=permute, seed=R + C)
    p = pack_for_device(t, "cpu")
    V = t.pattern.V
    assert p.a_vals.dtype == dtype and p.a_meta.dtype == torch.int32 and p.cols.dtype == torch.int32
    Rt, Kc = -(-R // 16), -(-t.groups // 8)
    assert p.a_vals.shape == (Rt, Kc, 32, 8) and p.a_meta.shape == (Rt, Kc, 16) and p.cols.shape == (-(-R // V), 8 * Kc, 4)
    assert torch.equal(unpack_dense(p.a_vals, p.a_meta, p.cols, R, C, V), t.to_dense())


@pytest.mark.parametrize("R,C,pattern", SHAPES_PATTERNS)
def test_packed_indices_are_in_bounds_and_metadata_valid(R, C, pattern):
    p = pack_for_device(random_vnm(R, C, pattern, seed=3), "cpu")
    assert int(p.cols.min()) >= 0 and int(p.cols.max()) < C  # a kernel never gathers past x
    words = p.a_meta.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    assert ((nibbles & 3) < (nibbles >> 2)).all()  # every nibble an ordered pair (0b0000 etc. are invalid)


def test_pack_is_cached_per_device():
    t = random_vnm(50, 60, "16:2:6")
    assert packed_layout(t, "cpu") is packed_layout(t, torch.device("cpu"))


@pytest.mark.parametrize(
    "pattern,dtype,match",
    [
        ("8:2:8", torch.bfloat16, "V in"),
        ("256:2:8", torch.bfloat16, "V in"),
        ("48:2:8", torch.bfloat16, "V in"),
        ("16:2:33", torch.bfloat16, "M in"),
        ("64:2:8", torch.float32, "bf16 and fp16"),
    ],
)
def test_unsupported_patterns_raise_at_pack_time(pattern, dtype, match):
    V, _, M = (int(v) for v in pattern.split(":"))
    R, C = 2 * V, 3 * M
    t = vs.compress(torch.randn(R, C, dtype=dtype), pattern)
    with pytest.raises(ValueError, match=match):
        pack_for_device(t, "cpu")
    with pytest.raises(ValueError, match=match):
        check_packable(V, M, dtype)


# ---- the registers the decode kernel assembles, emulated lane by lane ------------------------------------
def _emulate_decode(p, x: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T computed the way vnm_decode.cuh reads the packed arrays, with mma.sp's documented semantics.

    Per lane (gid = lane // 4, t = lane % 4) the kernel loads a_vals[mt, kc, lane] (4 registers), metadata word
    a_meta[mt, kc, 2*gid + (t & 1)], and for B register j the columns cols[blk, 8kc + 2j + (t >> 1), 2(t & 1) + {0,1}].
    The MMA then places A values by metadata (selector 0: lane 4*(r%8) + g//4 holds row r's group g nibble at bit
    16*(r//8) + 4*(g%4)) and B[k][n] from lane 4n + (k%8)//2, register k//8, half k%2.
    """
    R, C = p.shape
    V = p.V
    Rt, Kc = p.a_vals.shape[:2]
    N = x.shape[0]
    xs = x.to(torch.float64)
    y = torch.zeros(N, Rt * 16, dtype=torch.float64)
    vals = p.a_vals.to(torch.float64)
    words = p.a_meta.to(torch.int64) & 0xFFFFFFFF
    for mt in range(Rt):
        blk = (mt * 16) // V
        for kc in range(Kc):
            A = torch.zeros(16, 32, dtype=torch.float64)
            for r in range(16):
                for g in range(8):
                    lane_v = 4 * (r % 8) + (g % 4)
                    reg = 2 * (g // 4) + (r // 8)
                    v0, v1 = vals[mt, kc, lane_v, 2 * reg], vals[mt, kc, lane_v, 2 * reg + 1]
                    lane_e = 4 * (r % 8) + (g // 4)
                    word = int(words[mt, kc, 2 * (lane_e // 4) + ((lane_e % 4) & 1)])
                    nib = (word >> (16 * (r // 8) + 4 * (g % 4))) & 0xF
                    A[r, 4 * g + (nib & 3)] = v0
                    A[r, 4 * g + (nib >> 2)] = v1
            B = torch.zeros(32, N, dtype=torch.float64)
            for k in range(32):
                t, j, half = (k % 8) // 2, k // 8, k % 2
                col = int(p.cols[blk, 8 * kc + 2 * j + (t >> 1), 2 * (t & 1) + half])
                B[k] = xs[:, col]
            y[:, mt * 16 : mt * 16 + 16] += (A @ B).T
    return y[:, :R]


@pytest.mark.parametrize("R,C,pattern,permute", [(17, 9, "16:2:5", False), (40, 70, "32:2:6", True), (64, 45, "64:2:5", True)])
def test_fragment_emulation_matches_reference(R, C, pattern, permute):
    t = random_vnm(R, C, pattern, permute=permute, seed=11)
    p = pack_for_device(t, "cpu")
    x = torch.randn(3, C).to(torch.bfloat16)
    ref = fp64_reference(x, t)
    assert rel_err(_emulate_decode(p, x), ref) < 1e-12


@pytest.mark.parametrize("R,C,pattern", [(17, 9, "16:2:5"), (40, 70, "32:2:6"), (64, 45, "64:2:5"), (130, 1001, "64:2:8"), (5, 3, "16:2:4")])
def test_window_is_set_exactly_when_columns_stay_in_their_group(R, C, pattern):
    M = int(pattern.split(":")[2])

    def group_local(t) -> bool:
        start = torch.arange(t.columns.shape[1]).view(1, -1, 1) * M
        cols = t.columns.long()
        return bool(((cols >= start) & (cols < start + M)).all() and (cols[..., 1:] > cols[..., :-1]).all())

    plain_t = random_vnm(R, C, pattern, seed=2)
    plain = pack_for_device(plain_t, "cpu")
    assert group_local(plain_t) and plain.window == 8 * M
    # Group-local implies every chunk's kept columns lie in its own 8M columns: what the decode windows read.
    start = torch.arange(plain.cols.shape[1]).view(1, -1, 1) // 8 * 8 * M
    assert bool(((plain.cols >= start) & (plain.cols < start + 8 * M) & (plain.cols < C)).all())
    permuted_t = random_vnm(R, C, pattern, permute=True, seed=2)
    assert pack_for_device(permuted_t, "cpu").window == (8 * M if group_local(permuted_t) else 0)
    # Kept columns out of order within a group (still in it) are not a window: the tensor-core kernel places values
    # by ascending position.
    shuffled = plain_t.columns.clone()
    shuffled[:, 0, [0, 1]] = shuffled[:, 0, [1, 0]]  # group 0: never a padding slot among its first two
    swapped = dataclasses.replace(plain_t, columns=shuffled)
    assert pack_for_device(swapped, "cpu").window == 0
    for t in (plain_t, permuted_t, swapped):  # read from the canonical columns without packing: the same answer
        assert pack_window(t) == pack_for_device(t, "cpu").window

@settings(max_examples=60, deadline=None)
@given(V=st.sampled_from(SUPPORTED_V), M=st.integers(4, 16), R=st.integers(1, 150), C=st.integers(1, 140),
       permute=st.booleans(), seed=st.integers(0, 2**16))
def test_two_four_copy_is_the_same_weight_as_v24_over_its_inputs(V, M, R, C, permute, seed):
    # Every V:2:M weight, permuted or not, is V:2:4 over its columns laid out in whole quads (two_four_slots): the
    # copy is a valid V:2:4 tensor (compress checks every row's quads) and, its columns read from x through `inputs`,
    # exactly the same weight. Its pack is one the window kernel takes (window = 32), gathered x rows 128-byte aligned.
    t = random_vnm(R, C, f"{V}:2:{M}", permute=permute, seed=seed)
    copy, inputs = two_four_tensor(t)
    assert copy.pattern == vs.VNMPattern(V=V, M=4) and copy.shape[0] == R and copy.dtype == t.dtype
    width = copy.shape[1]
    if inputs is None:
        assert width == C  # x's own columns in order: M a multiple of 4, or groups whose slots happen to be theirs
        inputs = torch.arange(C)
    else:
        assert inputs.shape == (width,) and width % 64 == 0 and int(inputs.min()) >= 0 and int(inputs.max()) < C
    back = torch.zeros(R, C, dtype=torch.float64).index_add_(1, inputs, copy.to_dense().to(torch.float64))
    assert torch.equal(back, t.to_dense().to(torch.float64))
    assert (copy.to_dense() != 0).sum() == (t.to_dense() != 0).sum()  # every stored weight once, nothing added
    if not permute:  # all M columns of every group laid out, as dispatch assumes
        assert width == two_four_width(C, M)
    p = pack_for_device(copy, "cpu")
    assert p.window == 32
    assert torch.equal(unpack_dense(p.a_vals, p.a_meta, p.cols, R, width, V), copy.to_dense())


@pytest.mark.parametrize("M,C,width", [(8, 4096, 4096), (8, 4095, 4095), (5, 4096, 4928), (5, 10, 64), (6, 4096, 5504),
                                       (7, 4096, 4736), (4, 100, 100), (16, 4096, 4096), (5, 6, 6), (6, 7, 64)])
def test_two_four_width_of_whole_groups(M, C, width):
    # M = 5: two groups' tails of one column share a quad (12 slots per 10 columns: 4920 at C = 4096, padded to 64);
    # M = 6: a tail of two has a quad of its own (8 per 6); M = 7: 8 per 7; M a multiple of 4: x's own columns. A
    # last group of fewer than 4 columns has no whole quad: at C = 6, M = 5 every column is in its own slot (at C = 7,
    # M = 6 the first group's tail of two takes a quad of its own, which moves the last column).
    assert two_four_width(C, M) == width
    t = vs.compress(torch.randn(3 * 64, C), f"64:2:{M}")
    copy, inputs = two_four_tensor(t)
    assert copy.shape[1] == width and (inputs is None) == (M % 4 == 0 or width == C)


def test_two_four_slots_put_at_most_two_stored_weights_of_a_row_in_a_quad():
    head, tail = two_four_slots([5, 5, 5, 6, 7, 4, 5, 1])
    assert head == [0, 8, 12, 20, 28, 36, 40, 44]
    # tails of one share a quad (groups 0+1, 2+6; 7's is open at the end); of two and three, a quad each; none: unused
    assert tail == [4, 5, 16, 24, 32, 40, 17, 44]


def test_two_four_copy_is_cached_beside_the_pack():
    t = random_vnm(70, 90, "32:2:8", seed=1)
    p, q = packed_layout(t, "cpu"), packed_layout(t, "cpu", two_four=True)
    assert packed_layout(t, "cpu") is p and packed_layout(t, torch.device("cpu"), two_four=True) is q and p is not q
    assert (p.window, q.window) == (64, 32)
