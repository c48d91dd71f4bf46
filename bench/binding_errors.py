"""Does every input check of the compiled binding raise a clean RuntimeError on this GPU (no crash)?

Each bad call runs in its own subprocess, so a crash (segfault, abort) is reported per case instead of
killing the run. Used to diagnose the host segfault of tests/ops/test_wgmma_gpu.py::test_wrong_v_is_refused.

    python3 bench/binding_errors.py            # all cases, one line each
    python3 bench/binding_errors.py CASE       # one case in this process (what the driver runs)
"""

from __future__ import annotations

import subprocess
import sys

import torch

CASES = ("control_decode", "x_on_cpu", "wrong_dtype", "decode_bad_index", "gemm_wrong_v", "wgmma_wrong_v",
         "wgmma_control", "throw_plain")


def run_case(case: str) -> None:
    import vnmsparse as vs
    from vnmsparse import ops
    from vnmsparse.ops import instantiations

    ext = ops.extension("cuda")
    kernels = instantiations.KERNELS
    pick = {kind: next(k for k in kernels if k.variant.kind == kind and k.dtype == "bf16" and k.V in (0, 64))
            for kind in ("decode", "gemm", "wgmma")}
    W = torch.randn(256, 256) + 0.1
    v = 128 if case.endswith("wrong_v") else 64
    t = vs.compress(W.to(torch.bfloat16), f"{v}:2:8")
    p = t.pack(torch.device("cuda"))
    x = torch.randn(300 if "wgmma" in case or "gemm" in case else 4, 256, device="cuda").to(torch.bfloat16)
    kind = "wgmma" if "wgmma" in case else "gemm" if "gemm" in case else "decode"
    index = pick[kind].index
    args = dict(x=x, a_vals=p.a_vals, a_meta=p.a_meta, cols=p.cols)
    if case == "x_on_cpu":
        args["x"] = x.cpu()
    if case == "wrong_dtype":
        args["x"] = x.half()
    if case == "decode_bad_index":
        index = 10_000
    if case == "throw_plain":  # a TORCH_CHECK of torch itself, for comparison
        torch.empty(2, device="cuda").view(3)
    y = ext.run(args["x"], args["a_vals"], args["a_meta"], args["cols"], None, 256, 256, v, index, 1, None)
    torch.cuda.synchronize()
    print(f"returned {tuple(y.shape)}")


def main() -> int:
    if len(sys.argv) > 1:
        try:
            run_case(sys.argv[1])
        except RuntimeError as error:
            print(f"RuntimeError: {str(error).splitlines()[0][:160]}")
        return 0
    for case in CASES:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, case], capture_output=True, text=True)
        last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        crash = "" if proc.returncode == 0 else f" CRASH rc={proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[:3])
        print(f"{case:18s} {last}{crash}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
