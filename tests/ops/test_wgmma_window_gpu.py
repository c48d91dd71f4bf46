"""The sm_90a window kernel (M = 4 unpermuted: B = x by TMA, the packed records as A) on the GPU, against a
float64 reference, outputs poisoned with NaN first.

Every compiled `WgmmaWindow` variant runs directly (by its table index) over odd shapes: every V (the window
kernel takes any), R not a multiple of the tile nor of 16, C not a multiple of 4, of 8 or of 64 (padding slots,
the zero-filled TMA tail, a last stage with one chunk), N = 1, 3, 17, 100, 257, 4095, one stage to many (ring
wrap-around), bias or not, both dtypes, x as it comes and x that TMA cannot read in place (a column-offset view:
the binding copies it), split-k (3 slices, more than some shapes' stages) and stream-K. Then stream-K's
determinism, also under CUDA-graph replay. Then the public path: unpermuted M = 4 weights take the window kernel,
permuted ones and M = 8 the gathering kernel (or, asked for, their 2:4 copy: per call and per layer, M = 5-8,
permuted or not); leading dims,
CUDA-graph replay, bitwise repeatability, and the refusal of a pack without the window. Skipped unless the GPU is sm_90 (tools/gpu_check.sh runs them, once under compute-sanitizer).
"""

from __future__ import annotations

import pytest
import torch
from opshelp import DTYPES, check, check_graph_replay, check_stream_k, fp64_reference, random_vnm, run_kernel

from vnmsparse import ops
from vnmsparse.ops import dispatch, packed_layout, tuned, variants
from vnmsparse.ops.variants import STREAM_K

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM90, reason="needs an sm_90 (Hopper) GPU")]

WINDOW_KERNELS = [k for k in variants.KERNELS if k.variant.kind == "wgmma_window"]
# Rows of the 2:4 copy tests: no tile's multiple, and enough that a copy which gathers x's columns runs beyond the
# measured table (dispatch.GATHERED_COPY_MIN_R).
ROWS = 4100


def _shapes():
    # (R, C, V, token counts). C = 45 / 77: one stage, C % 8 != 0; 1001: many stages and a partial group;
    # 4096: 64 stages (many trips around both rings); 100 at M = 4 is 25 groups, an odd chunk count.
    return [
        (2 * 64 + 3, 45, 64, (1, 17, 257)),
        (300, 1001, 128, (3, 100, 4095)),
        (77, 77, 16, (130,)),
        (1000, 4096, 64, (256, 1000)),
        (96, 100, 32, (9, 300)),
    ]


@pytest.mark.parametrize("kernel", WINDOW_KERNELS, ids=lambda k: k.name)
def test_window_kernel(ext, kernel):
    dtype, M = DTYPES[kernel.dtype], kernel.variant.M
    for s, (R, C, V, ns) in enumerate(_shapes()):
        for i, N in enumerate(ns):
            t = random_vnm(R, C, f"{V}:2:{M}", dtype=dtype, device="cuda", seed=R + C + N)
            assert packed_layout(t, "cuda").window == 8 * M
            if (s + i) % 2:  # a view TMA cannot read in place: 2-byte offset, odd row stride
                x = torch.randn(N, C + 1, device="cuda").to(dtype)[:, 1:]
            else:
                x = torch.randn(N, C, device="cuda").to(dtype)
            bias = torch.randn(R, device="cuda").to(dtype) if (s + i) % 2 == 0 else None
            # Split-k in 64-column stages (3 slices: uneven, or more than the stages of a short C), and stream-K.
            for ksplit in (1, 3, STREAM_K) if i == 0 else (1, STREAM_K):
                y = run_kernel(ext, kernel, t, x, bias, ksplit)
                check(y, fp64_reference(x, t, bias), dtype, f"{kernel.name} R={R} C={C} V={V} N={N} ksplit={ksplit}")


@pytest.mark.parametrize("R,N", [(6144, 384), (4096, 128), (1000, 4095)])
def test_window_stream_k_is_deterministic_and_matches(ext, R, N):
    # Stream-K over the SMs: tiles split at uneven stages (96 tiles of 128 x 256 or 192 of 128 x 128 at 6144 x 384;
    # 32 tiles at 4096 x 128, up to five CTAs a tile) and many tiles per CTA (N = 4095). The partials meet in k
    # order, so two runs agree bit for bit, also replayed in a CUDA graph.
    check_stream_k(ext, WINDOW_KERNELS, R, N, "64:2:4")


def test_window_kernel_refuses_a_pack_without_the_window(ext):
    kernel = next(k for k in WINDOW_KERNELS if k.dtype == "bf16")
    t = random_vnm(256, 512, "64:2:4", device="cuda", seed=1)
    x = torch.randn(300, 512, device="cuda").to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="window"):
        run_kernel(ext, kernel, t, x, window=0)


def test_window_is_repeatable_and_matches_the_gather(ext):
    M = 4
    kernel = next(k for k in WINDOW_KERNELS if k.dtype == "bf16")
    gather = next(k for k in variants.KERNELS if k.variant.kind == "wgmma" and k.V == 64 and k.dtype == "bf16")
    t = random_vnm(1024, 2048, f"64:2:{M}", device="cuda", seed=3)
    x = torch.randn(1024, 2048, device="cuda").to(torch.bfloat16)
    y1, y2 = run_kernel(ext, kernel, t, x), run_kernel(ext, kernel, t, x)
    assert torch.equal(y1, y2)  # no atomics: bitwise repeatable
    ref = fp64_reference(x, t)
    check(y1, ref, torch.bfloat16, f"window 1024x2048 N=1024 M={M}")
    # Same products, fp32 sums in another order: as close to the gather kernel as to the reference.
    assert (y1.float() - run_kernel(ext, gather, t, x).float()).norm() <= 2 * (y1.double() - ref).norm()


@pytest.mark.parametrize("lead", [(300,), (2, 150), (4095,)])
def test_public_linear_takes_the_window_kernel_when_unpermuted(wgmma_on_small, lead):
    plain = random_vnm(1000, 700, "64:2:4", device="cuda", seed=9)
    permuted = random_vnm(1000, 700, "64:2:4", device="cuda", permute=True, seed=9)
    wider = random_vnm(1000, 700, "64:2:8", device="cuda", seed=9)
    x = torch.randn(*lead, 700, device="cuda").to(torch.bfloat16)
    bias = torch.randn(1000, device="cuda").to(torch.bfloat16)
    N, sms = x.numel() // 700, torch.cuda.get_device_properties(0).multi_processor_count
    for t, kind in ((plain, "wgmma_window"), (permuted, "wgmma"), (wider, "wgmma")):
        assert dispatch.choose(N, 1000, 64, "bf16", sms, (9, 0), packed_layout(t, "cuda").window).variant.kind == kind
        y = ops.linear(x, t, bias)
        assert y.shape == (*lead, 1000)
        check(y.reshape(-1, 1000), fp64_reference(x.reshape(-1, 700), t, bias), torch.bfloat16, f"linear {kind} {lead}")


def test_cuda_graph_replay_with_the_window_kernel(wgmma_on_small):
    t = random_vnm(512, 384, "32:2:4", device="cuda", seed=2)
    check_graph_replay(t, 512, "graph replay")


@pytest.mark.parametrize("pattern, permute", [("64:2:8", False), ("16:2:8", False), ("64:2:5", False), ("32:2:6", False),
                                            ("64:2:7", True), ("64:2:8", True)])
def test_public_linear_on_the_two_four_copy(wgmma_on_small, pattern, permute):
    # ops.linear(..., two_four_copy=True): calls that the dispatch gives the copy (serving N where the GPU's table
    # measured it faster, large N beyond the table) run the window kernel on the weight's 2:4 copy (built on first
    # use, cached beside the V:2:M layout; x's columns gathered into its layout where that is not x's own: M = 5-7,
    # folded permutations); decode calls keep the V:2:M layout.
    t = random_vnm(ROWS, 1001, pattern, device="cuda", permute=permute, seed=4)  # C % 8 != 0: partial group and quad
    bias = torch.randn(ROWS, device="cuda").to(torch.bfloat16)
    props = torch.cuda.get_device_properties(0)
    window = packed_layout(t, "cuda").window
    built = False
    for N in (1, 300, 2048):
        x = torch.randn(N, 1001, device="cuda").to(torch.bfloat16)
        y = ops.linear(x, t, bias, two_four_copy=True)
        check(y, fp64_reference(x, t, bias), torch.bfloat16, f"{pattern} two-four copy N={N}")
        built |= dispatch.uses_two_four_copy(N, ROWS, 1001, t.pattern.V, t.pattern.M, window, "bf16",
                                             props.multi_processor_count, (9, 0), tuned.gpu_slug(props.name))
        assert ((x.device, "2:4") in t.layouts) == built
        assert built == (N > 16) or N == 300  # decode never; beyond the table (2048) the rules' window kernel
    copy = t.layouts[(x.device, "2:4")]
    assert (copy.inputs is None) == (t.pattern.M == 8 and not permute) and copy.window == 32
    plain = random_vnm(ROWS, 1001, pattern, device="cuda", seed=5)
    ops.linear(x, plain)  # without the flag: no copy, whatever the size
    assert (x.device, "2:4") not in plain.layouts
    wide = random_vnm(ROWS, 1001, "64:2:16", device="cuda", seed=4)
    with pytest.raises(ValueError, match="two_four_copy needs a V:2:M pattern with 5 <= M <= 8"):
        ops.linear(x, wide, two_four_copy=True)  # 4x the V:2:16 values: never worth it
    assert (x.device, "2:4") not in wide.layouts


@pytest.mark.parametrize("pattern", ["64:2:8", "64:2:5"])
def test_layer_with_the_two_four_copy(wgmma_on_small, pattern):
    # VNMLinear(two_four_copy=True) on sm_90 holds the copy beside its packed layout (counted in held_nbytes, never
    # saved), runs large calls on it and decode on the V:2:M layout; setting the flag drops and rebuilds it.
    from vnmsparse.nn import VNMLinear

    t = random_vnm(ROWS, 1001, pattern, device="cuda", seed=6)
    bias = torch.randn(ROWS, device="cuda").to(torch.bfloat16)
    layer = VNMLinear(t, bias, two_four_copy=True)
    plain = VNMLinear(t, bias)
    copy = ops.pack_two_four(t, "cuda")
    assert layer.holds_two_four_copy and not plain.holds_two_four_copy
    assert layer.held_nbytes == plain.held_nbytes + copy.nbytes
    assert set(layer.state_dict()) == set(plain.state_dict()) and layer.state_dict()["_extra_state"]["two_four_copy"]
    for N in (1, 300):
        x = torch.randn(N, 1001, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            check(layer(x), fp64_reference(x, t, bias), torch.bfloat16, f"VNMLinear two-four copy N={N}")
    layer.two_four_copy = False
    assert not layer.holds_two_four_copy and layer.copy_vals is None and layer.held_nbytes == plain.held_nbytes
    layer.two_four_copy = True
    assert layer.holds_two_four_copy and layer.held_nbytes == plain.held_nbytes + copy.nbytes
    layer.cpu()  # no copy where it cannot run; the flag stays and the copy comes back with the layer
    assert layer.two_four_copy and not layer.holds_two_four_copy
    layer.cuda()
    assert layer.holds_two_four_copy
    with torch.no_grad():
        check(layer(x), fp64_reference(x, t, bias), torch.bfloat16, "VNMLinear two-four copy after a round trip")


@pytest.mark.parametrize("pattern", ["64:2:8", "64:2:5"])
def test_layer_with_the_two_four_copy_compiles_whole(wgmma_on_small, pattern):
    # torch.compile(fullgraph=True) of a layer holding the copy: the per-call choice of pack is folded while tracing
    # (no graph break), the copy's x gather traced with it, and the compiled layer runs the same pack as eager at
    # decode and serving N.
    from vnmsparse.nn import VNMLinear

    t = random_vnm(ROWS, 1001, pattern, device="cuda", seed=7)
    layer = VNMLinear(t, None, two_four_copy=True)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    for N in (1, 300, 2048):
        x = torch.randn(N, 1001, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(compiled(x), layer(x)), N
