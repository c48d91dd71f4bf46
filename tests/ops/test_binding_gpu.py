"""The compiled binding refuses bad calls with a RuntimeError naming the problem, and never crashes the process.

Each case runs in its own process (this file run as a script with the case name), so a segfault fails one case
instead of the session. Written for the host segfault of the first H100 wgmma run: every check after the
kernel-table lookup crashed, because an integer formatted through std::ostream inside the extension crashed on
that image; the binding now builds its messages with std::to_string (VNM_CHECK).

    python3 tests/ops/test_binding_gpu.py CASE     # one case in this process (what the test runs)
"""

from __future__ import annotations

import subprocess
import sys

import pytest
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
    "gemm_stream_k": "is for the sparse-wgmma kernels only",
    "negative_ksplit": "ksplit must be in 1..4096, or 0 (stream-K)",
    "inputs_wrong_length": "inputs must be (256,) int64",
    "inputs_int32": "inputs must be (256,) int64",
}

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def run_isolated(case: str) -> tuple[int, str, str]:
    """(return code, last stdout line, first stderr lines) of one case run in a fresh process."""
    proc = subprocess.run([sys.executable, "-X", "faulthandler", __file__, case], capture_output=True, text=True,
                          timeout=300)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return proc.returncode, last, " | ".join(proc.stderr.strip().splitlines()[:3])


def run_case(case: str) -> None:
    """One call of the binding with one thing wrong (or nothing, for the controls); prints what came back."""
    import vnmsparse as vs
    from vnmsparse import ops
    from vnmsparse.ops import packed_layout, variants

    ext = ops.extension("cuda")
    kind = "wgmma" if "wgmma" in case else "gemm" if "gemm" in case else "decode"
    kernel = next(k for k in variants.KERNELS if k.variant.kind == kind and k.dtype == "bf16" and k.V in (0, 64))
    v = 128 if case.endswith("wrong_v") else 64
    t = vs.compress((torch.randn(256, 256) + 0.1).to(torch.bfloat16), f"{v}:2:8")
    p = packed_layout(t, torch.device("cuda"))
    x = torch.randn(4 if kind == "decode" else 300, 256, device="cuda").to(torch.bfloat16)  # (N, C)
    if case == "x_on_cpu":
        x = x.cpu()
    elif case == "wrong_dtype":
        x = x.half()
    index = 10_000 if case == "decode_bad_index" else kernel.index
    ksplit = {"gemm_stream_k": variants.STREAM_K, "negative_ksplit": -1}.get(case, 1)
    inputs = {"inputs_wrong_length": torch.arange(255, device="cuda"),
              "inputs_int32": torch.arange(256, device="cuda", dtype=torch.int32)}.get(case)
    try:
        y = ext.run(x, p.a_vals, p.a_meta, p.cols, None, 256, 256, v, index, ksplit, None, inputs=inputs)
        torch.cuda.synchronize()
        print(f"returned {tuple(y.shape)}")
    except RuntimeError as error:
        print(f"RuntimeError: {str(error).splitlines()[0][:160]}")


@pytest.mark.parametrize("case", list(CASES))
def test_binding_refuses_cleanly(case):
    if case == "wgmma_control" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sparse-wgmma kernel runs on sm_90 only")
    rc, last, err = run_isolated(case)
    assert rc == 0, f"{case}: the process crashed (rc={rc}): {err}"
    assert CASES[case] in last, f"{case}: got {last!r}"


if __name__ == "__main__":
    run_case(sys.argv[1])
