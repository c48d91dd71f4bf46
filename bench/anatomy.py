"""Where one linear call's time goes on the GPU: every kernel of the call, timed inside the same CUDA graph replays
the serving sweep times, beside the graph's per-call time.

    python bench/anatomy.py --shape 4096x4096 --pattern 64:2:8 --n 64,256 [--out DIR]

For each N, every candidate kernel x k-split (`serving.ksplits`) and cuBLAS dense: the per-call time of the graph
over weight copies beyond L2 (`serving.graph_us`), then three replays under torch.profiler, whose CUDA kernel
records give each kernel's mean duration per call. The difference between the graph time and the sum of kernel
durations is what no kernel accounts for (launch gaps between graph nodes, dependency waits). Results go to the
terminal and, with --out, to anatomy.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vnmsparse import ops
from vnmsparse.ops import dispatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel import capture  # noqa: E402
from serving import Case, graph_us, ksplits  # noqa: E402


def kernel_times(calls, replays: int = 3) -> dict[str, float]:
    """Mean microseconds per call of each kernel name over `replays` graph replays of `calls`."""
    graph = capture(calls)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time_total
    return {name: round(t / (replays * len(calls)), 2) for name, t in totals.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--pattern", default="64:2:8")
    p.add_argument("--n", type=lambda s: [int(v) for v in s.split(",")], default=[64, 256])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    ext = ops.extension("cuda")
    props = torch.cuda.get_device_properties(0)
    arch, sms = (props.major, props.minor), props.multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    R, C = (int(v) for v in args.shape.split("x"))
    case = Case(R, C, args.pattern, gen)
    Kc = case.packed.a_vals.shape[1]
    dense = [case.W.clone() for _ in range(len(case.copies))]
    rows = []
    for N in args.n:
        x = torch.randn(N, C, device="cuda", generator=gen).to(torch.bfloat16)
        runs = [("cublas", 1, [lambda w=w: F.linear(x, w) for w in dense])]
        for kernel in dispatch.candidates(N, case.pattern.V, "bf16", arch, case.packed.window):
            for ks in ksplits(kernel, N, R, Kc, sms):
                if case.right(ext, x, kernel, ks):
                    runs.append((kernel.name, ks, [lambda q=q, k=kernel.index, s=ks: case.run(ext, q, x, k, s) for q in case.copies]))
        for name, ks, calls in runs:
            us = graph_us(calls)
            kernels = kernel_times(calls)
            row = {"N": N, "variant": name, "ksplit": ks, "graph_us": round(us, 2), "kernels_us": kernels,
                   "unaccounted_us": round(us - sum(kernels.values()), 2)}
            rows.append(row)
            parts = ", ".join(f"{k} {v}" for k, v in kernels.items())
            print(f"N={N:<5} {name:<40} ks={ks:<3} graph {us:7.2f} us | kernels: {parts} | rest {row['unaccounted_us']}",
                  flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": props.name, "torch": torch.__version__, "shape": args.shape, "pattern": args.pattern}
        (args.out / "anatomy.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
