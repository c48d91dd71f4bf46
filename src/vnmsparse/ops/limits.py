"""What the compiled kernels support: the one place the catalogue, the code writer, packing, dispatch, pattern
selection and the CLI read (the binding checks V against the list `codegen` writes from here)."""

from __future__ import annotations

import torch

SUPPORTED_V = (16, 32, 64, 128)  # rows per V:N:M block: a tensor-core tile holds whole blocks or part of one
M_RANGE = (4, 32)  # group widths: a k chunk is 8 groups, and a decode window (8 M columns) must fit shared memory
DTYPES = ("bf16", "fp16")  # kernel dtype tags, in table order
TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # activation / weight dtype -> tag


def check_packable(V: int, M: int, dtype: torch.dtype) -> None:
    """Raise ValueError (naming what is supported) if the kernels cannot run this pattern and dtype."""
    if V not in SUPPORTED_V:
        raise ValueError(f"vnmsparse kernels support V in {SUPPORTED_V}, got V={V}")
    if not M_RANGE[0] <= M <= M_RANGE[1]:
        raise ValueError(f"vnmsparse kernels support M in {M_RANGE[0]}..{M_RANGE[1]}, got M={M}")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"vnmsparse kernels support bf16 and fp16 weights, got {dtype}; convert with tensor.to(dtype=torch.bfloat16)")
