"""Helpers shared by the ops tests: random V:N:M weights in awkward shapes, a float64 reference, running one
kernel of the table on a NaN-poisoned output and checking it, CUDA-graph replay."""

from __future__ import annotations

import torch

import vnmsparse as vs
from vnmsparse.ops import packed_layout
from vnmsparse.ops.variants import STREAM_K
from vnmsparse import ops

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def random_vnm(R: int, C: int, pattern: str, dtype=torch.bfloat16, device="cpu", permute: bool = False, seed: int = 0):
    """A compressed random (never zero) weight; with permute, an input permutation folded into its columns."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(R, C, generator=g) + 0.1).to(dtype)
    t = vs.compress(W, pattern)
    if permute:
        t = vs.fold_input_permutation(t, torch.randperm(C, generator=g))
    return t.to(device=device)


def fp64_reference(x: torch.Tensor, t, bias=None) -> torch.Tensor:
    """y = x @ W^T (+ bias) in float64 from the canonical tensor."""
    W = t.to_dense().to(device=x.device, dtype=torch.float64)
    y = x.to(torch.float64) @ W.T
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.to(torch.float64) - ref).norm() / ref.norm().clamp_min(1e-30))


def run_kernel(ext, kernel, t, x: torch.Tensor, bias=None, ksplit: int = 1, window: int | None = None) -> torch.Tensor:
    """Run one table entry with a NaN-poisoned output; return it. `window`: the pack's (default) or 0 (decode gathers)."""
    p = packed_layout(t, x.device)
    R, C = t.shape
    out = torch.full((x.shape[0], R), float("nan"), dtype=x.dtype, device=x.device)
    window = p.window if window is None else window
    y = ext.run(x, p.a_vals, p.a_meta, p.cols, bias, R, C, t.pattern.V, kernel.index, ksplit, out, window)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    return out


def check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Assert a kernel output is fully written and within TOL of the float64 reference."""
    assert torch.isfinite(y).all(), f"{what}: output not fully written (NaN poison left) or non-finite"
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e}"


def check_kernel_graph_replay(ext, kernel, t, x: torch.Tensor, ksplit: int, expected: torch.Tensor, what: str) -> None:
    """One table entry captured in a CUDA graph on its own stream (split-k counters and workspace as a server's
    graphs use them): each of two replays over a NaN-poisoned output must give `expected` bit for bit."""
    p = packed_layout(t, x.device)
    R, C = t.shape
    args = (x, p.a_vals, p.a_meta, p.cols, None, R, C, t.pattern.V, kernel.index, ksplit, None, p.window)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ext.run(*args)  # warm-up off the graph
        with torch.cuda.graph(graph, stream=stream):
            y = ext.run(*args)
    for _ in range(2):
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, expected), what


def check_stream_k(ext, kernels, R: int, N: int, pattern: str) -> None:
    """Each kernel at stream-K on a fresh R x 4096 `pattern` weight and N tokens: two runs equal bit for bit (the
    partials meet in k order whichever CTA arrives last) and right against float64; the last kernel also replayed
    in a CUDA graph."""
    for kernel in kernels:
        dtype = DTYPES[kernel.dtype]
        t = random_vnm(R, 4096, pattern, dtype=dtype, device="cuda", seed=R + N)
        x = torch.randn(N, 4096, device="cuda").to(dtype)
        y1, y2 = run_kernel(ext, kernel, t, x, ksplit=STREAM_K), run_kernel(ext, kernel, t, x, ksplit=STREAM_K)
        assert torch.equal(y1, y2), kernel.name
        check(y1, fp64_reference(x, t), dtype, f"{kernel.name} stream-K R={R} N={N}")
    check_kernel_graph_replay(ext, kernel, t, x, STREAM_K, y1, f"{kernel.name} stream-K graph replay R={R} N={N}")


def check_graph_replay(t, N: int, what: str) -> None:
    """ops.linear on a static (N, C) bf16 input captured in a CUDA graph: each replay on new data must be right."""
    C = t.shape[1]
    static_x = torch.randn(N, C, device="cuda").to(torch.bfloat16)
    ops.linear(static_x, t)  # build, pack and warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ops.linear(static_x, t)
    for seed in range(3):
        static_x.copy_(torch.randn(N, C, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        check(static_y, fp64_reference(static_x, t), torch.bfloat16, what)

