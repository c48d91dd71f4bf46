"""The CUDA kernels against a float64 reference, on fresh random data, output poisoned with NaN first.

Every compiled kernel variant is run directly (by its table index) over odd shapes: R not a multiple of
any tile, C not a multiple of M (padding slots), N = 1, 3, 9, 16, 17, 100, 4095, folded input permutations.
Then the public path: `vnmsparse.ops.linear` with leading dims and bias, CUDA graphs, torch.compile, and
the logged fallbacks. Skipped without CUDA; tools/gpu_check.sh runs them (and once under compute-sanitizer).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from opshelp import DTYPES, check, check_graph_replay, fp64_reference, random_vnm, run_kernel

import vnmsparse as vs
from vnmsparse import ops
from vnmsparse.ops import op, packed_layout, variants

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DECODE_SHAPES = [(1, 4, "16:2:4"), (17, 37, "16:2:5"), (100, 1001, "32:2:8"), (300, 250, "64:2:16"), (130, 77, "128:2:32"), (64, 4096, "64:2:8"), (260, 2000, "64:2:5")]
DECODE_KERNELS = [k for k in variants.KERNELS if k.variant.kind == "decode"]
GEMM_KERNELS = [k for k in variants.KERNELS if k.variant.kind == "gemm"]


@pytest.mark.parametrize("kernel", DECODE_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("R,C,pattern", DECODE_SHAPES)
def test_decode_kernel(ext, kernel, R, C, pattern):
    dtype = DTYPES[kernel.dtype]
    V = int(pattern.split(":")[0])
    if 16 * kernel.variant.rows > V:
        pytest.skip(f"{kernel.name} needs V >= {16 * kernel.variant.rows}")
    ns = {8: [1, 3, 8], 16: [9, 16], 32: [17, 32]}[kernel.variant.max_n]
    for i, N in enumerate(ns):
        for ksplit in (1, 7) if i == 0 else (3,):  # 7 > chunks of small shapes: CTAs with empty k ranges report too
            t = random_vnm(R, C, pattern, dtype=dtype, device="cuda", permute=i % 2 == 1, seed=R * 7 + N + ksplit)
            x = torch.randn(N, C, device="cuda").to(dtype)
            bias = torch.randn(R, device="cuda").to(dtype) if i == 0 else None
            y = run_kernel(ext, kernel, t, x, bias, ksplit)
            check(y, fp64_reference(x, t, bias), dtype, f"{kernel.name} R={R} C={C} N={N} {pattern} ksplit={ksplit}")


def test_split_k_counters_reset_between_calls(ext):
    # The same split-k launch twice in a row (and again after a different split) gives the same, right answer.
    kernel = next(k for k in DECODE_KERNELS if k.dtype == "bf16" and k.variant.max_n == 16 and k.variant.rows == 4)
    t = random_vnm(1000, 3000, "64:2:8", device="cuda", seed=1)
    x = torch.randn(16, 3000, device="cuda").to(torch.bfloat16)
    ys = [run_kernel(ext, kernel, t, x, None, ks) for ks in (5, 5, 3, 5)]
    for y in ys:
        check(y, fp64_reference(x, t), torch.bfloat16, "split-k repeat")
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[3])  # fixed summation order: deterministic


def _gemm_shapes(V):
    return [(2 * V + 3, 77, f"{V}:2:5"), (300, 1001, f"{V}:2:8"), (17, 40, f"{V}:2:4"), (1, 33, f"{V}:2:32"), (V * 3, 512, f"{V}:2:16")]


@pytest.mark.parametrize("kernel", GEMM_KERNELS, ids=lambda k: k.name)
def test_gemm_kernel(ext, kernel):
    dtype = DTYPES[kernel.dtype]
    V = kernel.V
    for s, (R, C, pattern) in enumerate(_gemm_shapes(V)):
        for i, N in enumerate((17, 100, 4095) if s < 2 else (33,)):
            # Split-k: 1, a split that leaves some slices empty on the small shapes, and an uneven one.
            for ksplit in (1, 5) if i == 1 else (3,) if s == 1 else (1,):
                t = random_vnm(R, C, pattern, dtype=dtype, device="cuda", permute=(s + i) % 2 == 1, seed=R + C + N)
                x = torch.randn(N, C, device="cuda").to(dtype)
                bias = torch.randn(R, device="cuda").to(dtype) if i == 1 else None
                y = run_kernel(ext, kernel, t, x, bias, ksplit)
                check(y, fp64_reference(x, t, bias), dtype, f"{kernel.name} R={R} C={C} N={N} {pattern} ksplit={ksplit}")


SPLIT_K_KERNELS = [next(k for k in variants.KERNELS if k.dtype == "bf16" and k.V == 64 and k.variant.kind == kind
                        and k.variant.BN == 64) for kind in ("gemm", "wgmma")]


@pytest.mark.parametrize("kernel", SPLIT_K_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("N", [17, 257, 1000])
def test_split_k_is_deterministic(ext, kernel, N):
    # The same split-k launch repeated (and interleaved with another split) gives bit-identical, right results:
    # partial sums meet in slice order, whichever CTA finishes last.
    if kernel.variant.kind == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("sparse wgmma runs on sm_90 only")
    t = random_vnm(1000, 3000, "64:2:8", device="cuda", seed=N)
    x = torch.randn(N, 3000, device="cuda").to(torch.bfloat16)
    ys = [run_kernel(ext, kernel, t, x, None, ks) for ks in (4, 4, 2, 4)]
    for y in ys:
        check(y, fp64_reference(x, t), torch.bfloat16, f"{kernel.name} split-k repeat N={N}")
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[3])


def test_strided_rows_of_x(ext):
    t = random_vnm(200, 300, "64:2:8", device="cuda", seed=4)
    wide = torch.randn(40, 320, device="cuda").to(torch.bfloat16)
    for N in (5, 40):
        x = wide[:N, :300]  # row stride 320: taken as it comes, no copy
        y = ops.linear(x, t)
        check(y, fp64_reference(x, t), torch.bfloat16, f"strided x N={N}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 8), (4, 300)])
def test_public_linear(dtype, lead):
    t = random_vnm(1000, 700, "64:2:8", dtype=dtype, device="cuda", permute=True, seed=9)
    x = torch.randn(*lead, 700, device="cuda").to(dtype)
    bias = torch.randn(1000, device="cuda").to(dtype)
    y = ops.linear(x, t, bias)
    assert y.shape == (*lead, 1000) and y.dtype == dtype
    check(y.reshape(-1, 1000), fp64_reference(x.reshape(-1, 700), t, bias), dtype, f"linear {lead}")


@pytest.mark.parametrize("N", [4, 256])
def test_cuda_graph_replay(N):
    t = random_vnm(512, 384, "64:2:5", device="cuda", seed=2)
    check_graph_replay(t, N, f"graph replay N={N}")


def test_torch_compile_on_cuda():
    t = random_vnm(256, 200, "128:2:8", device="cuda", seed=6)
    p = packed_layout(t, "cuda")
    f = torch.compile(lambda x: torch.ops.vnmsparse.linear(x, p.a_vals, p.a_meta, p.cols, None, 256, 200, 128), fullgraph=True)
    for N in (2, 64):
        x = torch.randn(N, 200, device="cuda").to(torch.bfloat16)
        torch.testing.assert_close(f(x), ops.linear(x, t), rtol=0, atol=0)


def test_eager_fast_path_matches_the_op_and_steps_aside_for_tracing(monkeypatch):
    t = random_vnm(300, 256, "64:2:8", device="cuda", seed=9)
    bias = torch.randn(300, device="cuda").to(torch.bfloat16)
    p = packed_layout(t, "cuda")
    direct = []
    real = op._linear_cuda
    monkeypatch.setattr(op, "_linear_cuda", lambda *a: direct.append(1) or real(*a))  # the dispatcher keeps `real`
    for N in (1, 16, 300):
        x = torch.randn(2, N, 256, device="cuda").to(torch.bfloat16)
        y = ops.linear(x, t, bias)
        assert direct, "plain eager call did not take the direct path"
        assert torch.equal(y, torch.ops.vnmsparse.linear(x, p.a_vals, p.a_meta, p.cols, bias, 300, 256, 64))
        direct.clear()
    for x in (torch.randn(256, device="cuda"), torch.randn(40, 512, device="cuda")[:, ::2], torch.randn(2, 0, 256, device="cuda")):
        x = x.to(torch.bfloat16)  # 1-D, rows not contiguous, empty: the binding flattens and shapes like nn.Linear
        y = ops.linear(x, t, bias)
        assert y.shape == (*x.shape[:-1], 300) and direct
        check(y, fp64_reference(x.reshape(-1, 256), t, bias).reshape(y.shape), torch.bfloat16, f"eager {tuple(x.shape)}")
    direct.clear()
    graph = make_fx(lambda x: ops.linear(x, t, bias))(x)
    assert not direct and "vnmsparse.linear" in str(graph.code)  # traced: the op is recorded, not bypassed
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        ops.linear(x, t, bias)
        torch.cuda.synchronize()
    assert not direct and any(e.name == "vnmsparse::linear" for e in prof.events())  # profiled: the op shows
    ops.linear(x.requires_grad_(), t, bias)
    assert not direct  # autograd in play: the op path decides, as before


@pytest.mark.parametrize("kernel", DECODE_KERNELS, ids=lambda k: k.name)
def test_decode_window_and_gather_give_the_same_bits(ext, kernel):
    # Unpermuted weights: x by chunk windows (copied with the weights; the 16-token kernels) or by gather; same B
    # values, same MMAs, so the same bits (kernels that always gather pass trivially).
    dtype = DTYPES[kernel.dtype]
    V = max(64, 16 * kernel.variant.rows)
    for C, M, N in ((4096, 8, kernel.variant.max_n), (1000, 5, 1), (808, 4, 3)):  # 808: last window past C
        t = random_vnm(3 * V + 5, C, f"{V}:2:{M}", dtype=dtype, device="cuda", seed=C + N)
        assert packed_layout(t, "cuda").window == 8 * M
        x = torch.randn(N, C, device="cuda").to(dtype)
        for ksplit in (1, 3):
            windowed = run_kernel(ext, kernel, t, x, ksplit=ksplit)
            check(windowed, fp64_reference(x, t), dtype, f"{kernel.name} window C={C} M={M} N={N}")
            assert torch.equal(windowed, run_kernel(ext, kernel, t, x, ksplit=ksplit, window=0))
    x = torch.randn(5, 4097, device="cuda").to(dtype)[:, 1:]  # rows not 16-byte aligned: the binding gathers
    t = random_vnm(V, 4096, f"{V}:2:8", dtype=dtype, device="cuda", seed=5)
    check(run_kernel(ext, kernel, t, x[: min(5, kernel.variant.max_n)]), fp64_reference(x[: min(5, kernel.variant.max_n)], t), dtype, "unaligned x")


def test_split_k_decode_on_concurrent_streams():
    # Split-k decode CTAs meet through arrival counters; two streams running at once must not share them.
    ext = ops.extension("cuda")
    kernel = next(k for k in DECODE_KERNELS if k.dtype == "bf16" and k.variant.max_n == 16 and k.variant.rows == 4)
    weights = [random_vnm(512, 4096, "64:2:8", device="cuda", seed=s) for s in (1, 2)]
    xs = [torch.randn(16, 4096, device="cuda").to(torch.bfloat16) for _ in weights]
    alone = [run_kernel(ext, kernel, t, x, ksplit=8) for t, x in zip(weights, xs)]
    streams = [torch.cuda.Stream() for _ in weights]
    outs = [[], []]
    torch.cuda.synchronize()
    for _ in range(50):
        for i, (t, x, stream) in enumerate(zip(weights, xs, streams)):
            with torch.cuda.stream(stream):
                p = packed_layout(t, x.device)
                outs[i].append(ext.run(x, p.a_vals, p.a_meta, p.cols, None, 512, 4096, 64, kernel.index, 8))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(torch.equal(y, alone[i]) for y in outs[i]), f"stream {i}: split-k sums differ from the lone run"


@pytest.mark.parametrize("N", [1, 16])
def test_chained_decodes_see_what_the_kernel_before_wrote(N):
    # On sm_90, in a CUDA graph, a decode starts before the kernel ahead of it has finished (programmatic dependent
    # launch, used under capture only; a decode releases its dependents before it writes y) and must still read that
    # kernel's output and not overwrite memory it reads (the allocator hands freed inputs back as outputs). A chain
    # of layers, each fed the previous output directly (decode after decode) or, every third, through two torch
    # kernels, launched back to back, must equal the same chain synchronised after every call, eagerly and in a
    # CUDA graph.
    C = 2048
    ts = [random_vnm(C, C, pat, device="cuda", seed=i) for i, pat in enumerate(["64:2:8", "64:2:5", "128:2:8", "32:2:16"] * 2)]
    x0 = torch.randn(N, C, device="cuda").to(torch.bfloat16)

    def chain(x, sync):
        for i, t in enumerate(ts):
            x = ops.linear(x, t)
            if i % 3 == 2:
                x = torch.nn.functional.silu(x / 512)  # keeps the magnitudes in range
            if sync:
                torch.cuda.synchronize()
        return x

    expected = chain(x0, sync=True)
    assert torch.isfinite(expected).all()
    check(ops.linear(x0, ts[0]), fp64_reference(x0, ts[0]), torch.bfloat16, "first layer")
    for _ in range(5):
        assert torch.equal(chain(x0, sync=False), expected), "back-to-back decodes differ from synchronised ones"
    static_x = x0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = chain(static_x, sync=False)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, expected), "the chain captured in a CUDA graph differs"


def test_unsupported_cases_fall_back_and_log_once(caplog):
    op._logged.clear()
    x = torch.randn(3, 40, device="cuda").to(torch.bfloat16)
    t8 = vs.compress(torch.randn(16, 40, device="cuda").to(torch.bfloat16), "8:2:8")  # V=8: no kernel
    with caplog.at_level(logging.WARNING, logger="vnmsparse.ops"):
        for _ in range(2):
            y = ops.linear(x, t8)
    assert torch.equal(y, vs.vnm_linear(x, t8))
    assert len([r for r in caplog.records if "V in" in r.getMessage()]) == 1
    t16 = random_vnm(32, 40, "16:2:8", device="cuda")
    xh = x.to(torch.float16)  # dtype differs from the weight's: reference, logged
    assert torch.equal(ops.linear(xh, t16), vs.vnm_linear(xh, t16))


def test_disabled_kernels_fall_back_in_a_fresh_process():
    code = (
        "import logging, torch, vnmsparse as vs, vnmsparse.ops as ops\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "t = vs.compress(torch.randn(64, 64, device='cuda').bfloat16(), '16:2:8')\n"
        "x = torch.randn(2, 64, device='cuda').bfloat16()\n"
        "assert torch.equal(ops.linear(x, t), vs.vnm_linear(x, t))\n"
        "assert ops.extension('cuda') is None and 'VNMSPARSE_NO_KERNELS' in ops.unavailable_reason('cuda')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "VNMSPARSE_NO_KERNELS": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("plain-torch reference") == 1
