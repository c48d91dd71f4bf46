"""`VNMPattern`: the single definition of a V:N:M sparsity pattern.

A V:N:M weight keeps 4 of every M columns in each block of V rows, and 2 of those 4 in every row
(the inner pattern is 2:4, which is what Sparse Tensor Cores execute). Sparsity is 1 - 2/M.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

KEPT_COLUMNS = 4  # columns kept per V x M block: the width of the inner 2:4 group
KEPT_PER_ROW = 2  # nonzeros per row among the kept columns: N, fixed by the 2:4 hardware

TWO_FOUR_V = 64  # the V that "2:4" stands for: any V gives the plain 2:4 mask at M = 4; the kernels take 64
_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*:\s*(\d+)\s*$")
_TWO_FOUR_RE = re.compile(r"^\s*2\s*:\s*4\s*$")


@dataclass(frozen=True)
class VNMPattern:
    """V rows per block, N (=2) nonzeros per row of the 4 kept columns, M columns per block."""

    V: int
    M: int
    N: int = KEPT_PER_ROW

    def __post_init__(self) -> None:
        for name in ("V", "N", "M"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"VNMPattern.{name} must be an int, got {type(value).__name__}")
        if self.N != KEPT_PER_ROW:
            raise ValueError(f"VNMPattern.N must be {KEPT_PER_ROW} (the inner pattern is 2:4), got N={self.N}")
        if self.M < KEPT_COLUMNS:
            raise ValueError(f"VNMPattern.M must be >= {KEPT_COLUMNS} (4 columns are kept per block), got M={self.M}")
        if self.V < 1:
            raise ValueError(f"VNMPattern.V must be >= 1, got V={self.V}")

    @classmethod
    def parse(cls, text: str | VNMPattern) -> VNMPattern:
        """Parse "V:N:M" (e.g. "64:2:8"), or "2:4"; a `VNMPattern` passes through unchanged.

        "2:4" is `TWO_FOUR_V`:2:4. With M = 4 a block keeps all 4 of its columns, so the mask is plain 2:4 whatever
        V is; V only sets how the weight is stored and which kernels run it, and every kernel takes V = 64.
        """
        if isinstance(text, VNMPattern):
            return text
        if not isinstance(text, str):
            raise TypeError(f"pattern must be a 'V:N:M' string or VNMPattern, got {type(text).__name__}")
        if _TWO_FOUR_RE.match(text):
            return cls(V=TWO_FOUR_V, M=KEPT_COLUMNS)
        match = _PATTERN_RE.match(text)
        if match is None:
            raise ValueError(f"pattern must look like 'V:N:M' with positive integers (e.g. '64:2:8'), or '2:4'; got {text!r}")
        V, N, M = (int(g) for g in match.groups())
        return cls(V=V, M=M, N=N)

    def __str__(self) -> str:
        return f"{self.V}:{self.N}:{self.M}"

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned: 1 - N/M."""
        return 1.0 - self.N / self.M

    @property
    def density(self) -> float:
        return self.N / self.M

    def blocks(self, rows: int, cols: int) -> tuple[int, int]:
        """(row blocks, column groups) covering a rows x cols weight, the last ones possibly short."""
        _check_shape(rows, cols)
        return math.ceil(rows / self.V), math.ceil(cols / self.M)

    def padded_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """The shape after zero-padding rows to a multiple of V and columns to a multiple of M."""
        row_blocks, groups = self.blocks(rows, cols)
        return row_blocks * self.V, groups * self.M

    def bytes_per_weight(self, value_bytes: float = 2.0) -> float:
        """Compressed bytes per dense weight: values, 2-bit positions, and int32 kept-column indices."""
        values = self.N / self.M * value_bytes
        positions = 0.5 / self.M  # one 4-bit nibble per row per group
        columns = KEPT_COLUMNS * 4 / (self.V * self.M)  # 4 int32 indices per V x M block
        return values + positions + columns


def _check_shape(rows: int, cols: int) -> None:
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
