"""Measured dispatch tables: for one GPU model, the fastest (kernel, k-split) of every case a tuning sweep timed.

A table (`vnmsparse/tables/dispatch-<gpu_slug>.json`, written by `bench/serving.py tune` on that GPU) lists, per
measured case (V, M, R, C, N, pack window), the kernel and k-split that ran fastest in CUDA graphs with the
weights rotated beyond L2, and its time. A call is matched to the nearest measured shape of the same V and pack
kind (log distance over rows R and k chunks Kc) and to the smallest measured N at or above its own; calls beyond
the largest measured N, or on GPUs without a table, go to the rules in `dispatch`. Packs that a window kernel
takes (the 2:4 copy: window 32) and the others are never matched to each other's entries: their candidates differ.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from importlib import resources

from .variants import KERNELS, STREAM_K, WgmmaWindow

WINDOW_KERNEL_WINDOWS = frozenset(k.window for k in KERNELS if isinstance(k.variant, WgmmaWindow))


def gpu_slug(name: str) -> str:
    """A GPU model's device name as a file-name stem: "NVIDIA H200" -> "nvidia-h200" (measured tables are named so)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Choice:
    """The measured winner of one case."""

    V: int
    R: int
    Kc: int  # k chunks of 8 groups: ceil(ceil(C / M) / 8)
    window: int  # the pack's window (8M with no folded input permutation, else 0)
    N: int
    kind: str  # variants kind, e.g. "gemm"
    tag: str  # the variant's tag, e.g. "v64_m64n64w2x2s4"
    ksplit: int  # CTAs per output tile, or variants.STREAM_K (0)
    us: float  # its time per call, as tuned (CUDA graphs, weights beyond L2)

    @property
    def windowed(self) -> bool:
        """Whether the measured pack kept its columns in their own groups (no folded input permutation)."""
        return self.window > 0

    def kernel_name(self, dtype: str) -> str:
        return f"{self.kind}_{dtype}_{self.tag}"


def table_name(gpu: str) -> str:
    return f"dispatch-{gpu}.json"


@functools.lru_cache(maxsize=None)
def load(gpu: str) -> tuple[Choice, ...]:
    """The shipped table for GPU slug `gpu` (empty where none ships)."""
    path = resources.files("vnmsparse") / "tables" / table_name(gpu)
    if not gpu or not path.is_file():
        return ()
    return parse(json.loads(path.read_text()))


def parse(record: dict) -> tuple[Choice, ...]:
    """Choices from a table's JSON record ({"entries": [...]}, as bench/tune_dispatch.py writes it)."""
    out = []
    for e in record["entries"]:
        c = Choice(V=int(e["V"]), R=int(e["R"]), Kc=int(e["Kc"]), window=int(e["window"]), N=int(e["N"]),
                   kind=str(e["kind"]), tag=str(e["tag"]), ksplit=int(e["ksplit"]), us=float(e["us"]))
        if c.ksplit < 0 or (c.ksplit == STREAM_K and c.kind not in ("wgmma", "wgmma_window")):
            raise ValueError(f"dispatch table entry {e}: ksplit must be >= 1, or {STREAM_K} (stream-K) for a sparse-wgmma kernel")
        out.append(c)
    return tuple(out)


def lookup(choices: tuple[Choice, ...], N: int, R: int, V: int, Kc: int, window: int) -> Choice | None:
    """The measured choice for a call on a pack of this `window`: nearest shape among the same V's entries of the
    same pack window (else of the same pack kind, windowed or not, else any), then the smallest measured N >= this N
    (None beyond the largest measured N or without such an entry). A pack a window kernel takes matches entries of
    its own window only, and no other pack matches those."""
    takes_window_kernel = window in WINDOW_KERNEL_WINDOWS
    pool = [c for c in choices if c.V == V and (c.window in WINDOW_KERNEL_WINDOWS) == takes_window_kernel]
    same = ([c for c in pool if c.window == window] or [c for c in pool if c.windowed == (window > 0)]
            or (pool if not takes_window_kernel else []))
    if not same:
        return None
    dist = lambda c: (math.log(c.R / R) ** 2 + math.log(c.Kc / max(Kc, 1)) ** 2, c.R, c.Kc)  # noqa: E731
    nearest = min(same, key=dist)
    shape = [c for c in same if (c.R, c.Kc) == (nearest.R, nearest.Kc)]
    covering = [c for c in shape if c.N >= N]
    return min(covering, key=lambda c: c.N) if covering else None
