"""CPU cost of one V:N:M linear call, layer by layer of the call path, against dense F.linear (issue 3).

At batch 1 on small layers (SmolLM2's 576 x 576) the GPU work takes a few microseconds, so the host cost per call
decides eager decode speed. Each path is called back to back without synchronising (the CPU runs ahead of the
GPU), and the median over blocks of calls is reported in microseconds per call:

    dense        F.linear(x, W)
    binding      ext.run(...) with the kernel and k-split already chosen (the floor of this design)
    op           torch.ops.vnmsparse.linear.default(...) on the packed parts (dispatcher + Python impl)
    linear       vnmsparse.ops.linear(x, VNMTensor) (what VNMLinear calls)
    module       VNMLinear(x)

    python bench/op_overhead.py [--shape 576x576] [--n 1] [--pattern 64:2:8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import vnmsparse as vs
from vnmsparse import ops
from vnmsparse.ops import dispatch, packed_layout


def per_call_us(fn, calls: int = 200, blocks: int = 7) -> float:
    """Median over `blocks` of the CPU microseconds per call of `calls` back-to-back calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="576x576")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--pattern", default="64:2:8")
    args = p.parse_args()
    R, C = (int(v) for v in args.shape.split("x"))
    dev = torch.device("cuda")
    W = torch.randn(R, C, device=dev).to(torch.bfloat16)
    x = torch.randn(args.n, C, device=dev).to(torch.bfloat16)
    t = vs.compress(W, args.pattern)
    module = vs.VNMLinear(t)
    packed = packed_layout(t, dev)
    props = torch.cuda.get_device_properties(dev)
    kernel = dispatch.choose(args.n, R, t.pattern.V, "bf16", props.multi_processor_count, (props.major, props.minor))
    ksplit = dispatch.ksplit(kernel, args.n, R, packed.a_vals.shape[1], props.multi_processor_count)
    ext = ops.extension(dev)
    V = t.pattern.V
    paths = {
        "dense": lambda: F.linear(x, W),
        "binding": lambda: ext.run(x, packed.a_vals, packed.a_meta, packed.cols, None, R, C, V, kernel.index, ksplit, None,
                                   packed.window),
        "op": lambda: torch.ops.vnmsparse.linear.default(x, packed.a_vals, packed.a_meta, packed.cols, None, R, C, V),
        "linear": lambda: ops.linear(x, t),
        "module": lambda: module(x),
    }
    print(f"{args.shape} N={args.n} {args.pattern} ({kernel.name}, ksplit {ksplit}) on {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}: CPU microseconds per call")
    with torch.no_grad():
        for name, fn in paths.items():
            print(f"  {name:8s} {per_call_us(fn):7.1f}", flush=True)


if __name__ == "__main__":
    main()
