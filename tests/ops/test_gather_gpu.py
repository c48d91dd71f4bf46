"""The binding's gather of a 2:4 copy's input columns (`inputs`, vnm_gather.cu) on the GPU.

A call handed x and the copy's `inputs` must equal, bit for bit, the same kernel run on x gathered outside
(`pack.copy_inputs`), and match float64: for M = 5, 6 and 7 copies and a permuted one, N = 1 to 300, x
contiguous, a 2-byte-offset view with an odd row stride, and 3-D. An index outside x's columns reads zero,
never out of bounds. Decode kernels run on any sm_80+ GPU; the window kernel on sm_90 too.
"""

from __future__ import annotations

import pytest
import torch
from opshelp import DTYPES, check, fp64_reference, random_vnm

from vnmsparse import ops
from vnmsparse.ops import variants
from vnmsparse.ops.pack import copy_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

R = 300  # not a multiple of any tile


def _kernels(dtype: str, N: int, V: int) -> list[variants.Kernel]:
    """A kernel of sm_80 that takes N tokens and V (decode up to its tokens, else the mma.sp GEMM), and on sm_90 the
    first window kernel (a copy's window is 32)."""
    fits = [k for k in variants.KERNELS if k.dtype == dtype and (
        (k.variant.kind == "decode" and k.variant.max_n >= N and 16 * k.variant.rows <= V)
        or (k.variant.kind == "gemm" and k.V == V))]
    found = [min(fits, key=lambda k: k.variant.kind != "decode")]
    if torch.cuda.get_device_capability() == (9, 0):
        found.append(next(k for k in variants.KERNELS if k.variant.kind == "wgmma_window" and k.dtype == dtype))
    return found


def _run(ext, copy, kernel, x, inputs=None):
    out = torch.full((*x.shape[:-1], copy.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    ext.run(x, copy.a_vals, copy.a_meta, copy.cols, None, copy.shape[0], copy.shape[1], copy.V, kernel.index, 1, out,
            copy.window, inputs=inputs)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("pattern, permute, C", [("64:2:5", False, 1001), ("32:2:6", False, 256), ("64:2:7", False, 53),
                                                 ("64:2:8", True, 520)])
@pytest.mark.parametrize("N", [1, 17, 300])
def test_gathered_call_equals_the_kernel_on_x_gathered_outside(ext, dtype, pattern, permute, C, N):
    t = random_vnm(R, C, pattern, dtype=DTYPES[dtype], device="cuda", permute=permute, seed=C + N)
    copy = ops.pack_two_four(t, "cuda")
    assert copy.inputs is not None
    for layout in ("contiguous", "offset", "3d"):
        if layout == "offset":  # 2-byte offset, odd row stride
            x = torch.randn(N, C + 1, device="cuda").to(DTYPES[dtype])[:, 1:]
        elif layout == "3d":
            x = torch.randn(1, N, C, device="cuda").to(DTYPES[dtype])
        else:
            x = torch.randn(N, C, device="cuda").to(DTYPES[dtype])
        for kernel in _kernels(dtype, N, copy.V):
            what = f"{kernel.name} {pattern}{' permuted' if permute else ''} C={C} N={N} {layout}"
            y = _run(ext, copy, kernel, x, copy.inputs)
            outside = _run(ext, copy, kernel, copy_inputs(x, copy.inputs).contiguous())
            assert torch.equal(y, outside), what
            check(y.reshape(N, R), fp64_reference(x.reshape(N, C), t), DTYPES[dtype], what)


def test_an_index_outside_x_reads_zero(ext):
    C, N = 1001, 17
    t = random_vnm(R, C, "64:2:5", device="cuda", seed=1)
    copy = ops.pack_two_four(t, "cuda")
    x = torch.randn(N, C, device="cuda").to(torch.bfloat16)
    bad = copy.inputs.clone()
    bad[::7] = C  # one past the end
    bad[3::7] = -1
    bad[5::7] = 1 << 40
    zeroed = torch.cat([x, torch.zeros(N, 1, device="cuda", dtype=x.dtype)], dim=1)
    inside = torch.where((bad >= 0) & (bad < C), bad, C)
    kernel = _kernels("bf16", N, copy.V)[0]
    assert torch.equal(_run(ext, copy, kernel, x, bad), _run(ext, copy, kernel, copy_inputs(zeroed, inside).contiguous()))
