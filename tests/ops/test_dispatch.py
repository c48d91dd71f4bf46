"""The dispatch rules (CPU): decode and gemm tiles by N and rank, the k-split, the pinned kernel; sparse wgmma on sm_90 only (V in {64, 128}, large N); the window kernel; the 2:4 copy."""

from __future__ import annotations

import pytest
from vnmsparse.ops import configure, dispatch, limits, variants

H100 = (9, 0)


@pytest.fixture
def wgmma_on():
    with configure(wgmma=True):
        yield


@pytest.fixture
def wgmma_off():
    with configure(wgmma=False):
        yield


@pytest.mark.parametrize("V", limits.SUPPORTED_V)
def test_turned_off_keeps_the_mma_sp_kernel(wgmma_off, V):
    for N in (1, 256, 4096):
        assert dispatch.choose(N, 4096, V, "bf16", 132, H100).variant.kind in ("decode", "gemm")


@pytest.mark.parametrize("V", (64, 128))
@pytest.mark.parametrize("dtype", limits.DTYPES)
def test_enabled_on_sm90_picks_wgmma_for_large_n(wgmma_on, V, dtype):
    for N, R in ((dispatch.WGMMA_MIN_N, 32768), (4096, 8192), (8192, 8192)):  # each at least one wave of tiles
        k = dispatch.choose(N, R, V, dtype, 132, H100)
        assert k.variant.kind == "wgmma" and k.V == V and k.dtype == dtype
    assert dispatch.choose(16, 8192, V, dtype, 132, H100).variant.kind == "decode"
    assert dispatch.choose(dispatch.WGMMA_MIN_N - 1, 32768, V, dtype, 132, H100).variant.kind == "gemm"


@pytest.mark.parametrize("arch", [None, (8, 0), (8, 6), (8, 9), (10, 0)])
def test_never_on_other_gpus(wgmma_on, arch):
    for V in limits.SUPPORTED_V:
        assert dispatch.choose(4096, 8192, V, "bf16", 132, arch).variant.kind == "gemm"
        assert not any(k.variant.kind == "wgmma" for k in dispatch.candidates(4096, V, "bf16", arch))


def test_small_v_stays_on_mma_sp(wgmma_on):
    for V in (16, 32):
        assert dispatch.choose(4096, 8192, V, "bf16", 132, H100).variant.kind == "gemm"


def test_problems_below_half_a_wave_stay_on_mma_sp(wgmma_on):
    assert dispatch.choose(8192, 8192, 64, "bf16", 132, H100).variant.kind == "wgmma"
    # 4096 x 512 is 32 x 2 = 64 tiles of 128 x 256: under half a wave of 132 SMs; 4096 x 1024 (128 tiles) is not
    assert dispatch.choose(512, 4096, 64, "bf16", 132, H100).variant.kind == "gemm"
    assert dispatch.choose(1024, 4096, 64, "bf16", 132, H100).variant.kind == "wgmma"
    assert dispatch.choose(512, 4096, 64, "bf16", 132, H100, window=32).variant.kind == "gemm"
    assert dispatch.choose(1024, 4096, 64, "bf16", 132, H100, window=32).variant.kind == "wgmma_window"


@pytest.mark.parametrize("V", [16, 32, 64, 128])
def test_unpermuted_m4_takes_the_window_kernel_on_sm90_only(wgmma_on, V):
    assert dispatch.choose(4096, 8192, V, "bf16", 132, H100, window=32).variant.kind == "wgmma_window"
    assert dispatch.choose(4096, 8192, V, "fp16", 132, H100, window=32).dtype == "fp16"
    # No window (permuted), or a window no kernel takes (M = 8): the gathering kernels, as before.
    for window in (0, 64):
        assert dispatch.choose(4096, 8192, V, "bf16", 132, H100, window=window).variant.kind in ("wgmma", "gemm")
    assert dispatch.choose(4096, 8192, V, "bf16", 132, (8, 0), window=32).variant.kind == "gemm"
    assert dispatch.choose(16, 8192, V, "bf16", 132, H100, window=32).variant.kind == "decode"


def test_two_four_copy_only_where_it_pays(wgmma_on):
    # (N, R, C, V, M, window, dtype, SMs, arch): V:2:M with 5 <= M <= 8 and V <= 64, where the window kernel runs.
    use = dispatch.uses_two_four_copy
    assert use(2048, 4096, 4096, 64, 8, 64, "bf16", 132, H100)
    assert use(2048, 4096, 4096, 16, 8, 64, "fp16", 132, H100)
    assert use(2048, 4096, 4096, 64, 5, 40, "bf16", 132, H100)  # M = 5: laid out in quads, 1.2x the columns
    assert use(2048, 4096, 4096, 64, 8, 0, "bf16", 132, H100)  # permuted: its columns gathered into the layout
    assert not use(16, 4096, 4096, 64, 8, 64, "bf16", 132, H100)  # decode: the V:2:8 layout moves half the bytes
    assert not use(2048, 4096, 4096, 128, 8, 64, "bf16", 132, H100)  # V = 128: the gather is as fast on large shapes
    assert not use(2048, 4096, 4096, 64, 16, 128, "bf16", 132, H100)  # M = 16: the gather is faster, the copy 4x
    assert not use(2048, 4096, 4096, 64, 4, 32, "bf16", 132, H100)  # M = 4: the weight is its own copy
    assert not use(2048, 4096, 4096, 64, 8, 64, "bf16", 108, (8, 0))  # no window kernel before sm_90
    assert not use(256, 64, 4096, 64, 8, 64, "bf16", 132, H100)  # below half a wave of window tiles
    # A copy that gathers x's columns (M = 5-7, permuted weights) pays the gather per call: unmeasured, only on
    # GATHERED_COPY_MIN_R rows or more (DeiT-base's 768).
    assert use(8192, 768, 3072, 64, 5, 40, "bf16", 132, H100) and use(8192, 768, 768, 64, 8, 0, "bf16", 132, H100)
    assert not use(8192, 704, 768, 64, 5, 40, "bf16", 132, H100) and not use(8192, 576, 3072, 64, 8, 0, "bf16", 132, H100)
    assert use(8192, 576, 3072, 64, 8, 64, "bf16", 132, H100)  # unpermuted V:2:8: x as it is, no gather
    with configure(wgmma=False):
        assert not use(2048, 4096, 4096, 64, 8, 64, "bf16", 132, H100)  # the window kernel is a sparse-wgmma kernel


@pytest.mark.parametrize("V", limits.SUPPORTED_V)
@pytest.mark.parametrize("M", [4, 5, 6, 7, 8, 9, 16])
@pytest.mark.parametrize("window", [0, 32, 64])
def test_the_two_four_copy_rule_is_the_one_the_dispatch_reads(wgmma_on, V, M, window):
    # A pattern can have a copy exactly when a large call on sm_90 would run on it, permuted (window 0) or not.
    refusal = dispatch.two_four_copy_refusal(V, M)
    assert (refusal is None) == (5 <= M <= 8 and V <= 64)
    assert dispatch.uses_two_four_copy(8192, 8192, 8192, V, M, window, "bf16", 132, H100) == (refusal is None)
    if refusal is not None:
        assert f"a V:2:M pattern with 5 <= M <= 8 and V <= 64 (the ones it pays for), not {V}:2:{M}" == refusal


# ---- the rules on any GPU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("N,expect", [(1, 1), (8, 1), (9, 2), (16, 2), (17, 4), (32, 4)])
@pytest.mark.parametrize("V", limits.SUPPORTED_V)
def test_decode_for_small_n(N, expect, V):
    k = dispatch.choose(N, 4096, V, "bf16", 132)
    assert k.variant.kind == "decode" and k.variant.n_tiles == expect and k.dtype == "bf16"
    rows = {v.rows for v in variants.VARIANTS if v.kind == "decode" and v.n_tiles == expect and 16 * v.rows <= V}
    assert k.variant.rows == max(rows)  # one gather serves all the rows it can


def test_decode_ksplit_fills_the_gpu_and_keeps_warps_busy():
    k = dispatch.choose(16, 4096, 64, "bf16", 132)
    ks = dispatch.decode_ksplit(k, 4096, 64, 132)  # 64 row groups of 64 rows, 64 chunks
    assert 64 * ks >= 132 and 64 // ks >= 2 * k.variant.warps // 2
    assert dispatch.decode_ksplit(k, 28672, 205, 132) == 1  # 448 row groups: enough CTAs already
    gemm = dispatch.choose(4096, 4096, 64, "bf16", 132)
    assert dispatch.decode_ksplit(gemm, 4096, 64, 132) == 1


@pytest.mark.parametrize("V", limits.SUPPORTED_V)
@pytest.mark.parametrize("dtype", limits.DTYPES)
def test_gemm_for_large_n_matches_v(V, dtype):
    for N in (variants.DECODE_MAX_N + 1, 128, 1024, 8192):
        k = dispatch.choose(N, 4096, V, dtype, 132)
        assert k.variant.kind == "gemm" and k.variant.V == V and k.dtype == dtype


def test_large_problems_get_the_large_tile_and_small_ones_the_small():
    big = dispatch.choose(8192, 8192, 64, "bf16", 132)
    small = dispatch.choose(128, 768, 64, "bf16", 132)
    assert big.variant.BM * big.variant.BN > small.variant.BM * small.variant.BN


def test_config_kernel_pins_a_kernel():
    name = next(k.name for k in variants.KERNELS if k.variant.kind == "gemm" and k.V == 64 and k.dtype == "bf16")
    with configure(kernel=name):
        assert dispatch.choose(4096, 4096, 64, "bf16", 132).name == name
        assert dispatch.choose(4096, 4096, 32, "bf16", 132).V == 32  # does not apply: normal choice
        assert variants.KERNELS[dispatch.plan(4096, 4096, 64, 64, "bf16", 132, (9, 0), 0, "h200")[0]].name == name
    with pytest.raises(ValueError, match="compiled kernel name"):
        with configure(kernel="nope"):
            pass


@pytest.mark.parametrize("V", limits.SUPPORTED_V)
@pytest.mark.parametrize("N", [1, 9, 16, 17, 300, 4096])
def test_plan_is_the_chosen_kernel_and_its_ksplit(N, V):
    for wgmma in (True, False):
        with configure(wgmma=wgmma):
            index, ksplit = dispatch.plan(N, 4096, V, 64, "bf16", 132, (9, 0))
            kernel = dispatch.choose(N, 4096, V, "bf16", 132, (9, 0))
        assert variants.KERNELS[index] == kernel and ksplit == dispatch.ksplit(kernel, N, 4096, 64, 132)
