"""Which compiled kernel runs a given problem, and with how many k slices.

`plan` first asks the measured table of the GPU model (`tuned`: the fastest kernel and k-split a tuning sweep
timed for the nearest measured case); without one, or beyond its largest measured N, the rules below decide.
`config().kernel` pins a kernel by name instead (benchmarks time every variant that way).

Rules. Decode (N <= DECODE_MAX_N): the memory-bound kernel with the fewest 8-token tiles that cover N and as many
16-row tiles per warp as V allows; `decode_ksplit` picks how many CTAs split its k range. Larger N: on sm_90 (and
`config().wgmma`) the sparse-wgmma tile of best `rank` for the weight's V from N >= WGMMA_MIN_N, where it fills
half a wave; for weights whose kept columns stay in their own groups of M = 4 (pack `window` = 32) the window
kernel, which reads x's tiles by TMA. Otherwise the mma.sp gemm tile of best `rank`, or the smallest tile when
that would not fill one wave. `rank`, tile sizes and everything else about a kernel come from `variants`.
V:2:M weights (5 <= M <= 8, V <= 64) that hold a 2:4 copy run on it where the window kernel on the copy was
measured faster than the weight's own pack, or without a measurement where the rules run the window kernel
(`uses_two_four_copy`) and, for a copy that gathers x's columns (M = 5-7, permuted weights), on GATHERED_COPY_MIN_R
rows or more. The rules never split the window kernel's k range (unmeasured on GPUs without a table).
"""

from __future__ import annotations

import functools
import math

from . import tuned
from .config import OpsConfig, config
from .pack import packed_chunks, two_four_gathers, two_four_width
from .variants import DECODE_MAX_N, KERNELS, STREAM_K, Decode, Gemm, Kernel, Wgmma, WgmmaWindow

_BY_NAME = {k.name: k for k in KERNELS}

WGMMA_MIN_N = 256  # below it the mma.sp gemm kept every H100 case the rules see (the H200 has a measured table)
WGMMA_MIN_WAVES = 0.5  # sparse wgmma only where its tiles fill half a wave
SMALL_BELOW_WAVES = 1.0  # the smallest gemm tile where the preferred one would not fill a wave
TWO_FOUR_COPY_M = (5, 8)  # M range of the 2:4 copy: 0.5-0.67 values per input column; at M = 16 it holds 4x V:2:16's
TWO_FOUR_COPY_MAX_V = 64  # V = 128's gather is as fast on large shapes
TWO_FOUR_WINDOW = 32  # the copy's pack window: V:2:4, every kept column in its own group of 4
GATHERED_COPY_MIN_R = 768  # unmeasured, a copy that gathers x's columns runs only on this many rows or more


def two_four_copy_refusal(V: int, M: int) -> str | None:
    """What a V:2:M pattern lacks for a 2:4 copy, as the end of "two_four_copy needs ..."; None when its weights can
    have one (`pack.two_four_tensor`: any such weight, permuted or not). The one statement of the rule."""
    low, high = TWO_FOUR_COPY_M
    if not low <= M <= high or V > TWO_FOUR_COPY_MAX_V:
        return (f"a V:2:M pattern with {low} <= M <= {high} and V <= {TWO_FOUR_COPY_MAX_V} (the ones it pays for), "
                f"not {V}:2:{M}")
    return None


def uses_two_four_copy(N: int, R: int, C: int, V: int, M: int, window: int, dtype: str, sm_count: int, arch,
                       gpu: str = "") -> bool:
    """Whether a call on a weight with a 2:4 copy should run on it: a weight that can have one
    (`two_four_copy_refusal`), and where the GPU's measured table (`gpu`: its `tuned.gpu_slug`) timed both packs
    at the measured N this call is matched to, the copy's (window kernel) measured faster than the weight's own;
    elsewhere where the rules would run the window kernel on it (sm_90, N >= WGMMA_MIN_N, half a wave), and for a
    copy that gathers x's columns first only on GATHERED_COPY_MIN_R rows or more (H200: DeiT-base, whose layers have
    768-3072 rows, ran 1.10-1.20x faster with the gathered 64:2:5 copy than without; smaller layers are unmeasured)."""
    return _uses_two_four_copy(N, R, C, V, M, window, dtype, sm_count, None if arch is None else tuple(arch), config(), gpu)


def two_four_copy_runs(R: int, C: int, V: int, M: int, window: int) -> bool:
    """Whether an sm_90 GPU would ever run this weight's 2:4 copy: the largest calls (beyond any measured table)
    take it. What decides whether a layer that asks for the copy holds one there."""
    return _uses_two_four_copy(1 << 16, R, C, V, M, window, "bf16", 132, (9, 0), config(), "")


@functools.lru_cache(maxsize=4096)  # asked on every call of a layer that holds a copy
def _uses_two_four_copy(N: int, R: int, C: int, V: int, M: int, window: int, dtype: str, sm_count: int, arch,
                        cfg: OpsConfig, gpu: str) -> bool:
    if two_four_copy_refusal(V, M) is not None:
        return False
    if cfg.wgmma and arch == (9, 0):
        table = tuned.load(gpu)
        copy = tuned.lookup(table, N, R, V, packed_chunks(two_four_width(C, M, permuted=not window), 4), TWO_FOUR_WINDOW)
        own = tuned.lookup(table, N, R, V, packed_chunks(C, M), window)
        if copy is not None and own is not None and copy.N == own.N:  # both timed at the token count this call is given
            return copy.us < own.us
    if R < GATHERED_COPY_MIN_R and two_four_gathers(C, M, permuted=not window):  # gather: N x C; saving: N x R x C
        return False
    kernel = _choose(N, R, V, dtype, sm_count, arch, cfg, TWO_FOUR_WINDOW)
    return isinstance(kernel.variant, WgmmaWindow)


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
    """The rules' kernel for an (N tokens) x (R rows) problem with block height V, element type dtype and pack
    window, under the configuration in force."""
    return _choose(N, R, V, dtype, sm_count, None if arch is None else tuple(arch), config(), window)


def _waves(kernel: Kernel, N: int, R: int, sm_count: int) -> float:
    return math.ceil(R / kernel.variant.BM) * math.ceil(N / kernel.variant.BN) / max(sm_count, 1)


def _wgmma_choice(N: int, R: int, V: int, dtype: str, sm_count: int, arch, window: int) -> Kernel | None:
    """The best-ranked sparse-wgmma tile (the window kernel where the pack allows one), or None (mma.sp) when it
    would not fill WGMMA_MIN_WAVES waves."""
    found = candidates(N, V, dtype, arch, window)
    tiles = [k for k in found if isinstance(k.variant, WgmmaWindow)] or [k for k in found if isinstance(k.variant, Wgmma)]
    if not tiles:
        return None
    best = min(tiles, key=lambda k: k.variant.rank)
    return best if _waves(best, N, R, sm_count) >= WGMMA_MIN_WAVES else None


@functools.lru_cache(maxsize=4096)  # called on every matmul: keep it off the launch path's CPU time
def _choose(N: int, R: int, V: int, dtype: str, sm_count: int, arch, cfg: OpsConfig, window: int = 0) -> Kernel:
    if cfg.kernel is not None:
        k = _BY_NAME[cfg.kernel]
        if k.dtype == dtype and k in candidates(N, V, dtype, arch, window):
            return k
    if cfg.wgmma and N >= WGMMA_MIN_N:
        k = _wgmma_choice(N, R, V, dtype, sm_count, arch, window)
        if k is not None:
            return k
    if N <= DECODE_MAX_N:
        # Fewest 8-token tiles that cover N; as many 16-row tiles per warp as the block height allows.
        decodes = [k for k in candidates(N, V, dtype, arch) if isinstance(k.variant, Decode)]
        return min(decodes, key=lambda k: (k.variant.n_tiles, -k.variant.rows))
    gemms = [k for k in candidates(N, V, dtype, arch) if isinstance(k.variant, Gemm)]
    if not gemms:
        raise ValueError(f"no tensor-core kernel compiled for V={V}, dtype={dtype}")
    preferred = min(gemms, key=lambda k: k.variant.rank)
    if _waves(preferred, N, R, sm_count) < SMALL_BELOW_WAVES:
        return min(gemms, key=lambda k: (k.variant.BM * k.variant.BN, k.variant.rank))
    return preferred


def plan(N: int, R: int, V: int, Kc: int, dtype: str, sm_count: int, arch: tuple[int, int] | None, window: int = 0,
         gpu: str = "") -> tuple[int, int]:
    """(kernel table index, k-split) for one call: what the op hands the binding, one cache lookup per call.
    The k-split is the number of CTAs per output tile, or STREAM_K (sparse wgmma: one CTA per SM sharing all
    tiles' k steps). `gpu` is the device's `tuned.gpu_slug`, which picks the measured table."""
    return _plan(N, R, V, Kc, dtype, sm_count, None if arch is None else tuple(arch), config(), window, gpu)


@functools.lru_cache(maxsize=4096)
def _plan(N: int, R: int, V: int, Kc: int, dtype: str, sm_count: int, arch, cfg: OpsConfig, window: int, gpu: str):
    if cfg.kernel is None:
        measured = _measured(N, R, V, Kc, dtype, arch, cfg.wgmma, window, gpu)
        if measured is not None:
            return measured
    kernel = _choose(N, R, V, dtype, sm_count, arch, cfg, window)
    return kernel.index, ksplit(kernel, N, R, Kc, sm_count)


def _measured(N: int, R: int, V: int, Kc: int, dtype: str, arch, wgmma: bool, window: int, gpu: str) -> tuple[int, int] | None:
    """The measured table's (kernel index, k-split) for this call, if it has one that can run here."""
    choice = tuned.lookup(tuned.load(gpu), N, R, V, Kc, window)
    if choice is None:
        return None
    kernel = _BY_NAME.get(choice.kernel_name(dtype))
    if kernel is None or kernel not in candidates(N, V, dtype, arch, window):
        return None
    if isinstance(kernel.variant, (Wgmma, WgmmaWindow)) and not wgmma:
        return None
    if choice.ksplit == STREAM_K:
        return (kernel.index, STREAM_K) if kernel.streams_k else None
    return kernel.index, min(choice.ksplit, max(kernel.k_steps(Kc), 1))


def ksplit(kernel: Kernel, N: int, R: int, Kc: int, sm_count: int) -> int:
    """k slices for a kernel without a measured choice: `decode_ksplit`'s model for decode; none for the window
    kernel; for the other tensor-core kernels the fewest slices that give one wave of CTAs, keeping at least
    2 x STAGES chunks per slice."""
    if isinstance(kernel.variant, Decode):
        return decode_ksplit(kernel, R, Kc, sm_count)
    if isinstance(kernel.variant, WgmmaWindow):
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
