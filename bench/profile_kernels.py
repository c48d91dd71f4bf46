"""Profile a few kernel launches under Nsight Compute, and measure the op's CPU cost per call.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... python3 bench/profile_kernels.py

Only the launches between cudaProfilerStart/Stop (one per case, after warm-up) are profiled. Without ncu it
still prints the CPU microseconds per `vnmsparse.ops.linear` call (no sync), the number to compare with the
kernel time when launch overhead could matter.
"""

from __future__ import annotations

import argparse
import time

import torch

import vnmsparse as vs
from vnmsparse import ops
from vnmsparse.ops import dispatch, packed_layout, tuned, variants

CASES = [  # (R, C, N, pattern, kernel name or None for the dispatcher's choice)
    (4096, 4096, 1, "64:2:8", None),
    (4096, 4096, 16, "64:2:8", None),
    (8192, 8192, 16, "64:2:8", None),
    (4096, 4096, 4096, "64:2:8", "gemm_bf16_v64_m64n64w2x2s4"),
    (4096, 4096, 4096, "64:2:8", "gemm_bf16_v64_m128n128w2x4s4"),
    (4096, 4096, 4096, "64:2:8", "gemm_bf16_v64_m128n128w2x2s4"),
    # sm_90a sparse wgmma (pinned by name: applies on sm_90 only; elsewhere the dispatcher's choice is profiled)
    (4096, 4096, 4096, "64:2:8", "wgmma_bf16_v64_c2m2n128s4"),
    (8192, 8192, 8192, "64:2:8", "wgmma_bf16_v64_c2m2n128s4"),
    (8192, 8192, 8192, "128:2:8", "wgmma_bf16_v128_c2m1n256s8"),
    # the sm_90a window kernel (unpermuted M = 4: x tiles and A records by TMA, no gather)
    (8192, 8192, 4096, "64:2:4", "wgmma_window_bf16_m4_c2m1n256s4"),
]


def parse_case(text: str) -> tuple[int, int, int, str, str | None]:
    """'R,C,N,pattern[,kernel]' -> a CASES entry."""
    parts = text.split(",")
    if len(parts) not in (4, 5):
        raise argparse.ArgumentTypeError(f"--case must be R,C,N,pattern[,kernel], got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2]), parts[3], parts[4] if len(parts) == 5 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=lambda s: [int(v) for v in s.split(",")], default=None, help="indices into CASES")
    p.add_argument("--case", action="append", type=parse_case, default=[],
                   help="R,C,N,pattern[,kernel name]: profile this case instead of CASES (repeatable)")
    args = p.parse_args()
    cases = args.case or CASES
    cudart = torch.cuda.cudart()
    dev = torch.device("cuda")
    for i, (R, C, N, pattern, name) in enumerate(cases):
        if args.cases is not None and not args.case and i not in args.cases:
            continue
        W = torch.randn(R, C, device=dev).to(torch.bfloat16)
        t = vs.compress(W, pattern)
        x = torch.randn(N, C, device=dev).to(torch.bfloat16)
        with ops.configure(kernel=name):
            for _ in range(3):
                ops.linear(x, t)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                ops.linear(x, t)
            cpu_us = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            props = torch.cuda.get_device_properties(dev)
            packed = packed_layout(t, dev)
            index, ks = dispatch.plan(N, R, t.pattern.V, packed.a_vals.shape[1], "bf16", sms, (props.major, props.minor),
                                      packed.window, tuned.gpu_slug(props.name))
            chosen = variants.KERNELS[index]
            print(f"case {i}: R={R} C={C} N={N} {pattern} kernel={chosen.name} ksplit={ks}: {cpu_us:.1f} us CPU per call", flush=True)
            cudart.cudaProfilerStart()
            ops.linear(x, t)
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()


if __name__ == "__main__":
    main()
