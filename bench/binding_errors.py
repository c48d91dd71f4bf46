"""Does every input check of the compiled binding raise a clean RuntimeError on this GPU (no crash)?

Each bad call runs in its own subprocess, so a crash (segfault, abort) is reported per case instead of
killing the run (tests/ops/test_binding_gpu.py runs the same cases). Written for the host segfault that
the first H100 run hit in the wgmma tests: every check after the kernel-table lookup crashed.

    python3 bench/binding_errors.py            # all cases, one line each
    python3 bench/binding_errors.py CASE       # one case in this process (what the driver runs)
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

# case -> what its last output line must contain (wgmma_control: on sm_90 only; elsewhere the launcher refuses).
CASES = {
    "control_decode": "returned (4, 256)",
    "x_on_cpu": "x must be a CUDA tensor",
    "wrong_dtype": "differs from x dtype",
    "decode_bad_index": "outside the table",
    "gemm_wrong_v": "is built for V=64, got V=128",
    "wgmma_wrong_v": "is built for V=64, got V=128",
    "wgmma_control": "returned (300, 256)",
}


def run_isolated(case: str) -> tuple[int, str, str]:
    """(return code, last stdout line, first stderr lines) of one case run in a fresh process."""
    proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, case], capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return proc.returncode, last, " | ".join(proc.stderr.strip().splitlines()[:3])


def run_case(case: str) -> None:
    import vnmsparse as vs
    from vnmsparse import ops
    from vnmsparse.ops import instantiations, packed_layout

    ext = ops.extension("cuda")
    kind = "wgmma" if "wgmma" in case else "gemm" if "gemm" in case else "decode"
    kernel = next(k for k in instantiations.KERNELS if k.variant.kind == kind and k.dtype == "bf16" and k.V in (0, 64))
    v = 128 if case.endswith("wrong_v") else 64
    t = vs.compress((torch.randn(256, 256) + 0.1).to(torch.bfloat16), f"{v}:2:8")
    p = packed_layout(t, torch.device("cuda"))
    x = torch.randn(4 if kind == "decode" else 300, 256, device="cuda").to(torch.bfloat16)
    if case == "x_on_cpu":
        x = x.cpu()
    elif case == "wrong_dtype":
        x = x.half()
    index = 10_000 if case == "decode_bad_index" else kernel.index
    y = ext.run(x, p.a_vals, p.a_meta, p.cols, None, 256, 256, v, index, 1, None)
    torch.cuda.synchronize()
    print(f"returned {tuple(y.shape)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", choices=list(CASES), help="run one case in this process (default: all, isolated)")
    case = parser.parse_args().case
    if case is not None:
        try:
            run_case(case)
        except RuntimeError as error:
            print(f"RuntimeError: {str(error).splitlines()[0][:160]}")
        return 0
    bad = 0
    for case, want in CASES.items():
        rc, last, err = run_isolated(case)
        ok = rc == 0 and want in last
        bad += not ok
        print(f"{case:18s} {'ok  ' if ok else 'FAIL'} {last}" + (f" CRASH rc={rc}: {err}" if rc else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
