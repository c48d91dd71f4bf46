"""The sm_90a sparse-wgmma kernels on the GPU, against a float64 reference, outputs poisoned with NaN first.

Every compiled `Wgmma` variant is run directly (by its table index) over odd shapes: R not a multiple of the
tile (nor of 16), C not a multiple of M (padding slots), N = 1, 3, 17, 100, 257, 4095 (token tails, one and
several token tiles), K from one k-step to many (pipeline wrap-around, phase flips), split-k (uneven slices, more
slices asked for than k steps) and stream-K (tiles shared by CTAs at any k, CTAs running several tiles), folded
input permutations,
bias or not, both dtypes. Then CUDA-graph replay and determinism; the public path with leading dims and bias,
for the gathering and the window kernels alike, is in tests/ops/test_wgmma_window_gpu.py, the wrong-V refusal
in tests/ops/test_binding_gpu.py (one process per case). Skipped unless the GPU is sm_90 (tools/gpu_check.sh runs
them, once under compute-sanitizer).
"""

from __future__ import annotations

import pytest
import torch
from opshelp import DTYPES, check, check_graph_replay, check_stream_k, fp64_reference, random_vnm, rel_err, run_kernel

from vnmsparse.ops import variants
from vnmsparse.ops.variants import STREAM_K

SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not SM90, reason="needs an sm_90 (Hopper) GPU")]

WGMMA_KERNELS = [k for k in variants.KERNELS if k.variant.kind == "wgmma"]


def _shapes(V: int):
    # (R, C, pattern, token counts): tails on every edge; C = 33 gives one k-step (fewer than the producer's lag),
    # C = 4096 at M = 8 gives 64 k-steps (many trips around the stage ring and the A-register ring).
    return [
        (2 * V + 3, 77, f"{V}:2:5", (1, 17, 257)),
        (300, 1001, f"{V}:2:8", (3, 100, 4095)),
        (V * 5 + 7, 2000, f"{V}:2:16", (130,)),
        (1000, 4096, f"{V}:2:8", (256, 1000)),
        (17, 33, f"{V}:2:32", (9,)),
        (3 * V, 512, f"{V}:2:4", (300,)),
    ]


@pytest.mark.parametrize("kernel", WGMMA_KERNELS, ids=lambda k: k.name)
def test_wgmma_kernel(ext, kernel):
    dtype = DTYPES[kernel.dtype]
    for s, (R, C, pattern, ns) in enumerate(_shapes(kernel.V)):
        for i, N in enumerate(ns):
            t = random_vnm(R, C, pattern, dtype=dtype, device="cuda", permute=(s + i) % 2 == 1, seed=R + C + N)
            x = torch.randn(N, C, device="cuda").to(dtype)
            bias = torch.randn(R, device="cuda").to(dtype) if (s + i) % 2 == 0 else None
            # Split-k: whole, 3 slices (uneven; more than the k steps where K has fewer), 8 on the 64-step shape;
            # stream-K everywhere (one CTA per SM: tiles split at any k, or several tiles per CTA).
            for ksplit in (1, 3, 8, STREAM_K) if s == 3 else (1, 3, STREAM_K) if i == 0 else (1, STREAM_K):
                y = run_kernel(ext, kernel, t, x, bias, ksplit)
                check(y, fp64_reference(x, t, bias), dtype, f"{kernel.name} R={R} C={C} N={N} {pattern} ksplit={ksplit}")


def test_wgmma_matches_mma_sp_and_is_deterministic(ext):
    kernel = next(k for k in WGMMA_KERNELS if k.dtype == "bf16" and k.V == 64)
    gemm = next(k for k in variants.KERNELS if k.variant.kind == "gemm" and k.V == 64 and k.dtype == "bf16")
    t = random_vnm(1024, 2048, "64:2:8", device="cuda", seed=3)
    x = torch.randn(1024, 2048, device="cuda").to(torch.bfloat16)
    y1, y2 = run_kernel(ext, kernel, t, x), run_kernel(ext, kernel, t, x)
    assert torch.equal(y1, y2)  # no split-k, no atomics: bitwise repeatable
    ref = fp64_reference(x, t)
    check(y1, ref, torch.bfloat16, "wgmma 1024x2048 N=1024")
    assert rel_err(y1, ref) <= 1.5 * rel_err(run_kernel(ext, gemm, t, x), ref) + 1e-4  # as accurate as the mma.sp path


@pytest.mark.parametrize("R,N", [(6144, 768), (11008, 256), (1000, 4095)])
def test_stream_k_is_deterministic_and_matches(ext, R, N):
    # Stream-K over 132 SMs: 144 tiles of 128 x 256 (each split between two CTAs at uneven k), 86 tiles (fewer
    # than SMs: up to three CTAs per tile), many small tiles (a CTA runs several). The partials meet in k order
    # whichever CTA arrives last, so two runs agree bit for bit; both dtypes' results match float64.
    check_stream_k(ext, [k for k in WGMMA_KERNELS if k.V == 64], R, N, "64:2:8")


def test_cuda_graph_replay_with_wgmma(wgmma_on_small):
    t = random_vnm(512, 384, "128:2:5", device="cuda", seed=2)
    check_graph_replay(t, 512, "graph replay")
