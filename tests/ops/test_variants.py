"""The kernel catalogue: unique names, every supported V and dtype covered, ranks that order each kind, tile facts
the binding and the split-k workspace rely on."""

from __future__ import annotations

import pytest

from vnmsparse.ops import limits, variants


def test_every_supported_v_has_a_gemm_for_each_dtype():
    for V in limits.SUPPORTED_V:
        for dtype in limits.DTYPES:
            assert any(k.variant.kind == "gemm" and k.V == V and k.dtype == dtype for k in variants.KERNELS)


def test_kernels_are_the_variants_times_the_dtypes_in_table_order():
    assert [k.index for k in variants.KERNELS] == list(range(len(variants.KERNELS)))
    assert [(k.variant, k.dtype) for k in variants.KERNELS] == [(v, d) for v in variants.VARIANTS for d in limits.DTYPES]
    names = [k.name for k in variants.KERNELS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("kind", ["gemm", "wgmma", "wgmma_window"])
def test_ranks_order_the_tiles_of_each_v(kind):
    for V in (*limits.SUPPORTED_V, 0):  # 0: the window tiles (any V)
        ranks = [v.rank for v in variants.VARIANTS if v.kind == kind and v.V == V]
        assert len(set(ranks)) == len(ranks)  # the rules' order of preference is never a tie


def test_tiles_and_split_k():
    for k in variants.KERNELS:
        tile_m, tile_n = k.tile
        assert tile_m % 16 == 0 and tile_n % 8 == 0
        assert k.streams_k == k.variant.kind.startswith("wgmma")
        # The window kernel steps through 64 columns of x: 2 chunks of its window-32 pack; the others a chunk.
        assert k.k_steps(7) == (4 if k.variant.kind == "wgmma_window" else 7)
    assert variants.DECODE_MAX_N == max(v.max_n for v in variants.VARIANTS if v.kind == "decode")
