"""Which compiled kernel runs a given problem, and with how many k slices.

`plan` first asks the measured table of the GPU model (`tuned`: the fastest kernel and k-split a tuning sweep
timed for the nearest measured case); without one, or beyond its largest measured N, the rules below decide.

Decode (N <= DECODE_MAX_N) is the memory-bound kernel with the fewest 8-token tiles that cover N and as many 16-row
tiles per warp as V allows; `decode_ksplit` picks how many CTAs split its k range. For larger N the
tensor-core kernel for the weight's V is the first of `PREFERRED_TILES` (measured order) that is compiled,
or `SMALL_TILE` when that would not fill a wave. Tile sizes themselves come only from
`instantiations.KERNELS`. `override` pins a kernel by name (benchmarks use it to time every variant).

On sm_90 (`arch == (9, 0)`) the sparse-wgmma kernels (`instantiations.Wgmma`, V = 64 or 128) take over for
N >= WGMMA_MIN_N: validated on the H100 (layout probe, GPU tests, compute-sanitizer; bench/NOTES-wgmma.md) and
1.2-1.4x faster than the mma.sp kernel on every measured case. `VNMSPARSE_WGMMA=0` or `enable_wgmma(False)`
turns them off; every other GPU keeps the mma.sp kernel. For weights whose kept columns stay in their own
groups of M = 4 (the pack's `window` = 32: no folded input permutation) the window kernel
(`instantiations.WgmmaWindow`, any V) takes the place of the gathering ones: B is x itself, by TMA. With
`enable_two_four_copy`, unpermuted V:2:8 weights (V <= 64) take it too, through a 2:4 copy (`uses_two_four_copy`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

from . import tuned
from .instantiations import DECODE_MAX_N, KERNELS, Decode, Gemm, Kernel, Wgmma, WgmmaWindow

_BY_NAME = {k.name: k for k in KERNELS}


# Tensor-core tiles in order of preference, from the per-variant timings on the H100 (bench/NOTES-kernels.md,
# bench/results/history/kernel-h100-v3.json): (BM, BN, WARPS_M, WARPS_N). The first compiled for the weight's V is
# the default; SMALL_TILE takes over when the default would not fill one wave of CTAs.
PREFERRED_TILES = ((128, 128, 2, 2), (64, 128, 1, 4), (128, 128, 2, 4), (64, 64, 2, 2))
SMALL_TILE = (64, 64, 2, 2)
SMALL_BELOW_WAVES = 1.0

_override: str | None = os.environ.get("VNMSPARSE_KERNEL") or None

# Sparse wgmma (sm_90a): on by default (VNMSPARSE_WGMMA=0 turns it off). Tiles in order of preference per V as
# (CONSUMERS, WG_M, BN, STAGES), measured on the H100 (bench/results/kernel-h100-wgmma.json, `variants_ms`):
# the BN=256 tiles are fastest on every measured case (1-7% ahead of the BM=256 x BN=128 ones). Below half a wave
# of those tiles the mma.sp kernel keeps the problem: with A through shared memory the wgmma kernels are 10-25%
# (gather) and 1.7x (window) faster than before, when one wave was the measured crossover.
_wgmma: bool = os.environ.get("VNMSPARSE_WGMMA", "1") not in ("", "0")
WGMMA_MIN_N = 256
WGMMA_MIN_WAVES = 0.5
WGMMA_PREFERRED = {64: ((2, 1, 256, 4), (2, 2, 128, 4)), 128: ((2, 1, 256, 8), (2, 2, 128, 6))}
# Window kernels per pack window (8M) as (CONSUMERS, WG_M, BN, STAGES), in order of preference: M = 4 only
# (2.0-2.6x faster than the gather on the H100; at M = 8 the gather stays faster, bench/NOTES-wgmma.md).
WINDOW_PREFERRED = {32: ((2, 1, 256, 4),)}

# A 2:4 copy for the window kernel (`enable_two_four_copy`, off by default: memory). An unpermuted V:2:8 weight is
# also a valid 2:4 weight with twice the values (`pack.two_four_tensor`); multiplied by the window kernel it runs at
# V:2:4 speed. H100, N = 1024-8192, shapes >= 4096^2 (kernel-h100-two-four.md): 64:2:8 1.14-1.69x cuBLAS, 1.23-1.48x
# faster than its gathering kernel in the same run; 32:2:8 1.22-1.66x (mma.sp: 0.38-0.52x). Only M = 8, and not
# V = 128, whose gather is as fast on large shapes (128:2:8 1.11-1.84x); at M = 16 the gather is faster everywhere
# (1.40-2.45x) and the copy would hold 4x the values.
_two_four_copy: bool = os.environ.get("VNMSPARSE_TWO_FOUR_COPY", "0") not in ("", "0")
TWO_FOUR_COPY_M = 8
TWO_FOUR_COPY_MAX_V = 64


def override(name: str | None) -> None:
    """Force kernel `name` (an `instantiations.KERNELS` name) for every later call, or None to undo."""
    global _override
    if name is not None and name not in _BY_NAME:
        raise ValueError(f"unknown kernel {name!r}; known: {sorted(_BY_NAME)}")
    _override = name


def enable_wgmma(flag: bool = True) -> None:
    """Let `choose` pick the sm_90a sparse-wgmma kernels (on sm_90 only), or stop it (flag=False)."""
    global _wgmma
    _wgmma = bool(flag)


def wgmma_enabled() -> bool:
    return _wgmma


def enable_two_four_copy(flag: bool = True) -> None:
    """Let large-N calls on sm_90 multiply a 2:4 copy of unpermuted V:2:8 weights (V <= 64) with the window kernel
    instead of gathering, or stop it. Also VNMSPARSE_TWO_FOUR_COPY=1. The copy is built on a weight's first such
    call and cached beside its V:2:8 layout: twice that layout's bytes (4096^2 64:2:8: 19.9 MB more, the dense
    weight being 33.6 MB), for 1.2-1.5x faster prefill on the H100. Decode calls keep the V:2:8 layout."""
    global _two_four_copy
    _two_four_copy = bool(flag)


def two_four_copy_enabled() -> bool:
    return _two_four_copy


@contextlib.contextmanager
def switches(wgmma: bool | None = None, two_four_copy: bool | None = None) -> Iterator[None]:
    """Inside the block, the given switches (`enable_wgmma`, `enable_two_four_copy`; None leaves one as it is);
    after it, the previous ones."""
    global _wgmma, _two_four_copy
    before = _wgmma, _two_four_copy
    _wgmma = before[0] if wgmma is None else bool(wgmma)
    _two_four_copy = before[1] if two_four_copy is None else bool(two_four_copy)
    try:
        yield
    finally:
        _wgmma, _two_four_copy = before


def uses_two_four_copy(N: int, R: int, V: int, M: int, window: int, dtype: str, sm_count: int, arch) -> bool:
    """Whether a call should run on the weight's 2:4 copy: enabled, a pattern it pays for, an unpermuted pack
    (`window` = 8M) and a problem the window kernel would take (sm_90, N >= WGMMA_MIN_N, half a wave)."""
    if not (_two_four_copy and M == TWO_FOUR_COPY_M and V <= TWO_FOUR_COPY_MAX_V and window == 8 * M):
        return False
    kernel = _choose(N, R, V, dtype, sm_count, None if arch is None else tuple(arch), _override, _wgmma, 32)
    return isinstance(kernel.variant, WgmmaWindow)


def dtype_tag(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def candidates(N: int, V: int, dtype: str, arch: tuple[int, int] | None = None, window: int = 0) -> list[Kernel]:
    """Every compiled kernel that can run this problem on a GPU of compute capability `arch`, for a pack with
    this `window` (`PackedVNM.window`)."""
    out = []
    on_arch = lambda v: arch is not None and tuple(arch) == v.arch  # noqa: E731
    for k in KERNELS:
        if k.dtype != dtype:
            continue
        if isinstance(k.variant, Decode) and N <= k.variant.max_n and 16 * k.variant.rows <= V:
            out.append(k)
        elif isinstance(k.variant, Gemm) and k.variant.V == V:
            out.append(k)
        elif isinstance(k.variant, Wgmma) and k.variant.V == V and on_arch(k.variant):
            out.append(k)
        elif isinstance(k.variant, WgmmaWindow) and window and k.variant.window == window and on_arch(k.variant):
            out.append(k)
    return out


def choose(N: int, R: int, V: int, dtype: str, sm_count: int, arch: tuple[int, int] | None = None, window: int = 0) -> Kernel:
    """The kernel for an (N tokens) x (R rows) problem with block height V, element type dtype and pack window."""
    return _choose(N, R, V, dtype, sm_count, None if arch is None else tuple(arch), _override, _wgmma, window)


def _wgmma_choice(N: int, R: int, V: int, dtype: str, sm_count: int, arch, window: int) -> Kernel | None:
    """The preferred compiled sparse-wgmma tile (a window kernel where the pack allows one), or None (mma.sp)
    when it would not fill WGMMA_MIN_WAVES waves."""
    kind, order = (WgmmaWindow, WINDOW_PREFERRED[window]) if window in WINDOW_PREFERRED else (Wgmma, WGMMA_PREFERRED.get(V, ()))
    tiles = {(k.variant.consumers, k.variant.wg_m, k.variant.BN, k.variant.stages): k
             for k in candidates(N, V, dtype, arch, window) if isinstance(k.variant, kind)}
    preferred = [tiles[t] for t in order if t in tiles]
    if not preferred:
        return None
    best = preferred[0]
    waves = math.ceil(R / best.variant.BM) * math.ceil(N / best.variant.BN) / max(sm_count, 1)
    return best if waves >= WGMMA_MIN_WAVES else None


@functools.lru_cache(maxsize=4096)  # called on every matmul: keep it off the launch path's CPU time
def _choose(N: int, R: int, V: int, dtype: str, sm_count: int, arch, _override: str | None, _wgmma: bool, window: int = 0) -> Kernel:
    if _override is not None:
        k = _BY_NAME[_override]
        if k.dtype == dtype and k in candidates(N, V, dtype, arch, window):
            return k
    if _wgmma and N >= WGMMA_MIN_N:
        k = _wgmma_choice(N, R, V, dtype, sm_count, arch, window)
        if k is not None:
            return k
    if N <= DECODE_MAX_N:
        # Fewest 8-token tiles that cover N; as many 16-row tiles per warp as the block height allows.
        decodes = [k for k in candidates(N, V, dtype, arch) if isinstance(k.variant, Decode) and 16 * k.variant.rows <= V]
        return min(decodes, key=lambda k: (k.variant.n_tiles, -k.variant.rows))
    gemms = [k for k in candidates(N, V, dtype, arch) if isinstance(k.variant, Gemm)]
    if not gemms:
        raise ValueError(f"no tensor-core kernel compiled for V={V}, dtype={dtype}")
    tile = lambda k: (k.variant.BM, k.variant.BN, k.variant.warps_m, k.variant.warps_n)  # noqa: E731
    rank = {t: i for i, t in enumerate(PREFERRED_TILES)}
    large = min(gemms, key=lambda k: rank.get(tile(k), len(rank)))
    waves = math.ceil(R / large.variant.BM) * math.ceil(N / large.variant.BN) / max(sm_count, 1)
    if waves < SMALL_BELOW_WAVES:
        small = [k for k in gemms if tile(k) == SMALL_TILE]
        if small:
            return small[0]
    return large


def plan(N: int, R: int, V: int, Kc: int, dtype: str, sm_count: int, arch: tuple[int, int] | None, window: int = 0,
         gpu: str = "") -> tuple[int, int]:
    """(kernel table index, k-split) for one call: what the op hands the binding, one cache lookup per call.
    `gpu` is the device's `tuned.gpu_slug`, which picks the measured table."""
    return _plan(N, R, V, Kc, dtype, sm_count, None if arch is None else tuple(arch), _override, _wgmma, window, gpu)


@functools.lru_cache(maxsize=4096)
def _plan(N: int, R: int, V: int, Kc: int, dtype: str, sm_count: int, arch, _override: str | None, _wgmma: bool, window: int,
          gpu: str):
    if _override is None:
        measured = _measured(N, R, V, Kc, dtype, arch, _wgmma, window, gpu)
        if measured is not None:
            return measured
    kernel = _choose(N, R, V, dtype, sm_count, arch, _override, _wgmma, window)
    return kernel.index, ksplit(kernel, N, R, Kc, sm_count)


def _measured(N: int, R: int, V: int, Kc: int, dtype: str, arch, wgmma: bool, window: int, gpu: str) -> tuple[int, int] | None:
    """The measured table's (kernel index, k-split) for this call, if it has one that can run here."""
    choice = tuned.lookup(tuned.load(gpu), N, R, V, Kc, window > 0)
    if choice is None:
        return None
    kernel = _BY_NAME.get(choice.kernel_name(dtype))
    if kernel is None or kernel not in candidates(N, V, dtype, arch, window):
        return None
    if isinstance(kernel.variant, (Wgmma, WgmmaWindow)) and not wgmma:
        return None
    return kernel.index, min(choice.ksplit, max(Kc, 1)) if kernel.splits_k else 1


def ksplit(kernel: Kernel, N: int, R: int, Kc: int, sm_count: int) -> int:
    """k slices for a kernel without a measured choice: `decode_ksplit`'s model for decode; for the mma.sp gemm the
    fewest slices that give one wave of CTAs, keeping at least 2 x STAGES chunks per slice."""
    if isinstance(kernel.variant, Decode):
        return decode_ksplit(kernel, R, Kc, sm_count)
    if not isinstance(kernel.variant, Gemm):
        return 1
    v = kernel.variant
    tiles = math.ceil(R / v.BM) * math.ceil(N / v.BN)
    ks = 1
    while tiles * ks < sm_count and Kc // (2 * ks) >= 2 * v.stages:
        ks *= 2
    return ks


@functools.lru_cache(maxsize=4096)
def decode_ksplit(kernel: Kernel, R: int, Kc: int, sm_count: int) -> int:
    """CTAs splitting the k chunks of one decode row group.

    Modeled time = waves x per-CTA time, with per-CTA time ~ (chunks per warp + 3 chunks of fixed cost: ring
    fill, reductions). More splits give more CTAs (small R fills the GPU) but a partial last wave costs a
    whole one; each warp keeps at least 2 chunks.
    """
    if not isinstance(kernel.variant, Decode):
        return 1
    v = kernel.variant
    groups = math.ceil(math.ceil(R / 16) / v.rows)
    slots = v.ctas_per_sm * sm_count
    most = max(1, Kc // (2 * v.warps))

    def cost(ks: int) -> float:
        return math.ceil(groups * ks / slots) * (math.ceil(Kc / (ks * v.warps)) + 3)

    return min(range(1, most + 1), key=lambda ks: (cost(ks), ks))
