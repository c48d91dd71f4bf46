"""The catalogue of compiled kernel variants: the one list the build, the dispatcher and the benchmarks read.

Each `Decode` / `Gemm` / `Wgmma` / `WgmmaWindow` entry is one tile configuration: its fields become a traits
struct of named `static constexpr`s (checked by the kernel's `*Shape` static_asserts), and `codegen.py` writes
one translation unit per (variant, dtype) and one row of the kernel table per `KERNELS` entry, in this order, so
the dispatcher picks a kernel by index into `KERNELS`. Tile sizes are written nowhere else. `rank` is the measured
order of preference among the variants of one kind and V (lower first): what the dispatch rules use on GPUs
without a measured table (docs/kernels.md says what was measured).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .limits import DTYPES, SUPPORTED_V

CUDA_TYPE = {"bf16": "__nv_bfloat16", "fp16": "__half"}


class _Generated:
    """The C++ names of a variant, from its `kind` and `tag`: written once for every kind."""

    kind: ClassVar[str]

    @property
    def tag(self) -> str:
        """The tile's parameters in short, unique among the variants of its kind."""
        raise NotImplementedError

    def fields(self) -> Sequence[str]:
        """The traits struct's lines, "NAME = value;  // comment"."""
        raise NotImplementedError

    @property
    def struct(self) -> str:
        """The traits struct's name, e.g. GemmTile_v64_m128n128w2x4s4."""
        return f"{self.kind.capitalize()}Tile_{self.tag}"

    def launcher(self, dtype: str) -> str:
        """The launcher template instantiated for this variant and dtype, e.g. launch_gemm<GemmTile_..., __half>."""
        return f"launch_{self.kind}<{self.struct}, {CUDA_TYPE[dtype]}>"


@dataclass(frozen=True)
class Decode(_Generated):
    """Memory-bound kernel for N <= 8 * n_tiles tokens."""

    n_tiles: int  # 8-token MMA tiles
    rows: int  # 16-row tiles per warp, one gather serving all (needs 16 * rows <= V)
    warps: int = 8  # warps per CTA, splitting the CTA's k chunks
    unroll: int = 0  # k chunks per stage; 0: as many as registers allow (see steps)

    kind = "decode"
    ctas_per_sm = 2  # what its registers (<= 128) and static shared memory (<= 40 KB) allow

    @property
    def max_n(self) -> int:
        return 8 * self.n_tiles

    @property
    def stages(self) -> int:
        # Two stages of chunks in flight measured 1-6% faster at N <= 8 and 4-9% slower at N = 16 (one stage of
        # twice the chunks keeps more of the 16-token gathers in flight; H100, docs/kernels.md).
        return 2 if self.n_tiles == 1 else 1

    @property
    def steps(self) -> int:
        # Registers: STAGES x U chunks hold STAGES*U*rows 16-byte weight records and U*8*n_tiles gathered values;
        # at 4 n-tiles (32 tokens) one chunk per stage already holds 32 gathered values and 4*rows accumulators.
        if self.n_tiles == 4:
            return self.unroll or 1
        per_stage = {1: 4, 2: 4 if self.n_tiles == 1 else 2, 4: 2}[self.rows] // self.stages
        return self.unroll or per_stage

    @property
    def tag(self) -> str:
        return f"nt{self.n_tiles}r{self.rows}w{self.warps}u{self.steps}s{self.stages}"

    def fields(self) -> tuple[str, ...]:
        return (
            f"N_TILES = {self.n_tiles};  // 8-token MMA tiles",
            f"ROWS = {self.rows};     // 16-row tiles per warp (one V-row block)",
            f"WARPS = {self.warps};    // warps splitting the CTA's k chunks",
            f"UNROLL = {self.steps};   // k chunks per stage",
            f"STAGES = {self.stages};   // stages of chunks in flight per warp",
        )

    header = "vnm_decode.cuh"


@dataclass(frozen=True)
class Gemm(_Generated):
    """Tensor-core kernel (mma.sp) for one V; any N."""

    V: int
    BM: int
    BN: int
    warps_m: int
    warps_n: int
    stages: int
    min_ctas: int = 1
    rank: int = 0  # measured preference among the gemm tiles of one V, lower first (the dispatch rules)

    kind = "gemm"
    max_n = 1 << 30
    rows = 0

    @property
    def tag(self) -> str:
        return f"v{self.V}_m{self.BM}n{self.BN}w{self.warps_m}x{self.warps_n}s{self.stages}"

    def fields(self) -> tuple[str, ...]:
        return (
            f"V = {self.V};         // rows per V:N:M block",
            f"BM = {self.BM};       // rows of W per CTA",
            f"BN = {self.BN};       // tokens per CTA",
            f"WARPS_M = {self.warps_m};   // warp grid, rows",
            f"WARPS_N = {self.warps_n};   // warp grid, tokens",
            f"STAGES = {self.stages};    // cp.async pipeline depth",
            f"MIN_CTAS = {self.min_ctas};  // CTAs per SM for __launch_bounds__",
        )

    header = "vnm_gemm.cuh"

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n


@dataclass(frozen=True)
class Wgmma(_Generated):
    """Hopper (sm_90a) sparse-wgmma kernel for one V in {64, 128}; any N. Built everywhere, runs only on sm_90."""

    V: int
    consumers: int  # consumer warpgroups (a producer warpgroup comes on top)
    wg_m: int  # m64 tiles per consumer warpgroup
    BN: int  # tokens per CTA = the wgmma N
    stages: int  # ring depth in shared memory (gathered B tiles and A records of one k-step each)
    rank: int = 0  # measured preference among the wgmma tiles of one V, lower first (the dispatch rules)

    kind = "wgmma"
    max_n = 1 << 30
    rows = 0
    arch = (9, 0)  # the only compute capability it runs on

    @property
    def BM(self) -> int:
        return 64 * self.wg_m * self.consumers

    @property
    def tag(self) -> str:
        return f"v{self.V}_c{self.consumers}m{self.wg_m}n{self.BN}s{self.stages}"

    def fields(self) -> tuple[str, ...]:
        return (
            f"V = {self.V};          // rows per V:N:M block",
            f"CONSUMERS = {self.consumers};   // consumer warpgroups",
            f"WG_M = {self.wg_m};        // m64 tiles per consumer warpgroup",
            f"BN = {self.BN};        // tokens per CTA (wgmma N)",
            f"STAGES = {self.stages};      // ring depth (gathered B tiles + A records per k-step)",
        )

    header = "vnm_wgmma.cuh"


@dataclass(frozen=True)
class WgmmaWindow(_Generated):
    """Hopper (sm_90a) sparse-wgmma kernel for M = 4 weights whose kept columns are their groups' own columns
    (pack window 32), any V and N: B is x itself by TMA, the packed records are A as they are. Runs on sm_90."""

    M: int  # group width the weights were pruned with
    consumers: int
    wg_m: int
    BN: int
    stages: int  # ring depth of stages ([BN tokens x 64 columns] of x and the CTA's A records for them)
    rank: int = 0  # measured preference among the window tiles of one M, lower first (the dispatch rules)

    kind = "wgmma_window"
    max_n = 1 << 30
    rows = 0
    V = 0  # any
    arch = (9, 0)

    @property
    def BM(self) -> int:
        return 64 * self.wg_m * self.consumers

    @property
    def window(self) -> int:
        return 8 * self.M

    @property
    def tag(self) -> str:
        return f"m{self.M}_c{self.consumers}m{self.wg_m}n{self.BN}s{self.stages}"

    def fields(self) -> tuple[str, ...]:
        return (
            f"M = {self.M};           // group width of the weights (window = 8M columns per chunk)",
            f"CONSUMERS = {self.consumers};   // consumer warpgroups",
            f"WG_M = {self.wg_m};        // m64 tiles per consumer warpgroup",
            f"BN = {self.BN};        // tokens per CTA (wgmma N)",
            f"STAGES = {self.stages};      // ring depth of stages (x tile + A records)",
        )

    @property
    def struct(self) -> str:
        return f"WgmmaWindowTile_{self.tag}"

    header = "vnm_wgmma_window.cuh"


def _wgmma_window_variants() -> list[WgmmaWindow]:
    # The 128 x 256 tile with 4 stages: as fast or faster than 5 stages or 256 x 128 on every case measured at large
    # N (history/kernel-h100-window-smem.json). Serving batches (N = 48..1024) get narrower tiles with the work split
    # (split-k, stream-K): 256 x 128 reads x once for four m64 tiles (the fewest x bytes per FLOP), 128 x 128 and
    # 128 x 64 give more CTAs; their stages are small, so more of them are in flight. 128 x 192 fits N = 192 and 384
    # in whole tiles (the others leave a third of a tile empty there). 256 x 64 reads each x tile once for four m64
    # tiles: at N <= 64 on large shapes, x read again by every 128-row tile is as many bytes as the weights. The rules
    # rank the last two last (measured only in tables). M = 8 (records expanded in registers), 2-CTA clusters sharing
    # x and two CTAs per SM were slower (docs/kernels.md).
    return [
        WgmmaWindow(M=4, consumers=2, wg_m=1, BN=256, stages=4, rank=0),
        WgmmaWindow(M=4, consumers=2, wg_m=2, BN=128, stages=5, rank=1),
        WgmmaWindow(M=4, consumers=2, wg_m=1, BN=128, stages=6, rank=2),
        WgmmaWindow(M=4, consumers=2, wg_m=1, BN=64, stages=8, rank=3),
        WgmmaWindow(M=4, consumers=2, wg_m=1, BN=192, stages=6, rank=4),
        WgmmaWindow(M=4, consumers=2, wg_m=2, BN=64, stages=6, rank=5),
    ]


def _wgmma_variants() -> list[Wgmma]:
    # Per V: the wide-N tile (least A traffic per FLOP; fastest at large N), the 4-block / 2-block BN=128 tile, and
    # narrow-N tiles of 128 rows (BN = 128, 64) that give serving batches (N = 64..1024) more CTAs than the GPU has
    # SMs. Stages with A in shared memory: 8 beat 6 by 6-12% at V = 128; at V = 64, 6 were 1-9% slower than 4 for
    # the BN=256 tile (docs/kernels.md); the narrow tiles' stages are small, so they keep 8 in flight.
    return [
        Wgmma(V=64, consumers=2, wg_m=1, BN=256, stages=4, rank=0),
        Wgmma(V=64, consumers=2, wg_m=2, BN=128, stages=4, rank=1),
        Wgmma(V=64, consumers=2, wg_m=1, BN=128, stages=8, rank=2),
        Wgmma(V=64, consumers=2, wg_m=1, BN=64, stages=8, rank=3),
        Wgmma(V=128, consumers=2, wg_m=1, BN=256, stages=8, rank=0),
        Wgmma(V=128, consumers=2, wg_m=2, BN=128, stages=6, rank=1),
        Wgmma(V=128, consumers=2, wg_m=1, BN=128, stages=8, rank=2),
        Wgmma(V=128, consumers=2, wg_m=1, BN=64, stages=8, rank=3),
    ]


def _gemm_variants() -> list[Gemm]:
    out: list[Gemm] = []
    for V in SUPPORTED_V:
        if V >= 64:
            # Large tile: the workhorse for N >= ~1024.  Small tile: more CTAs for mid-size N.
            out.append(Gemm(V=V, BM=128, BN=128, warps_m=2, warps_n=4, stages=4, min_ctas=2, rank=2))
            out.append(Gemm(V=V, BM=64, BN=64, warps_m=2, warps_n=2, stages=4, min_ctas=4, rank=3))
            out.append(Gemm(V=V, BM=64, BN=128, warps_m=1, warps_n=4, stages=4, min_ctas=2, rank=1))
            # 64x64 per warp: the most MMAs per shared-memory byte read (ncu: the smaller tiles are L1-bound).
            out.append(Gemm(V=V, BM=128, BN=128, warps_m=2, warps_n=2, stages=4, min_ctas=2, rank=0))
        else:
            # Small V: several row blocks per CTA, each with its own gathered activations.
            out.append(Gemm(V=V, BM=64, BN=128, warps_m=1, warps_n=4, stages=3, min_ctas=2, rank=1))
            out.append(Gemm(V=V, BM=64, BN=64, warps_m=2, warps_n=2, stages=3, min_ctas=4, rank=3))
    return out


VARIANTS: tuple[Decode | Gemm | Wgmma | WgmmaWindow, ...] = (
    *(Decode(n_tiles=nt, rows=rows) for rows in (1, 2, 4) for nt in (1, 2)),
    # 32 tokens: the reduction's shared memory (WARPS x ROWS x 4 n-tiles of fp32 fragments) allows ROWS <= 2 with
    # 8 warps, or one V = 64 block's 4 row tiles with 4 warps.
    *(Decode(n_tiles=4, rows=rows) for rows in (1, 2)),
    Decode(n_tiles=4, rows=4, warps=4),
    *_gemm_variants(),
    *_wgmma_variants(),
    *_wgmma_window_variants(),
)
DECODE_MAX_N = max(v.max_n for v in VARIANTS if isinstance(v, Decode))  # the decode kernels' largest token count
STREAM_K = 0  # the `ksplit` value asking for stream-K (`Kernel.streams_k`; vnm::sm90::kStreamK)
KIND_IDS = {"decode": 0, "gemm": 1, "wgmma": 2, "wgmma_window": 3}  # vnm::KernelKind (vnm_params.h)


@dataclass(frozen=True)
class Kernel:
    """One table entry: a variant built for one dtype."""

    index: int
    variant: Decode | Gemm | Wgmma | WgmmaWindow
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.variant.kind}_{self.dtype}_{self.variant.tag}"

    @property
    def V(self) -> int:
        return getattr(self.variant, "V", 0)

    @property
    def window(self) -> int:
        """The pack window the kernel needs (window kernels), else 0."""
        return getattr(self.variant, "window", 0)

    @property
    def tile(self) -> tuple[int, int]:
        """(rows of y, tokens) one CTA computes: what split-k workspaces are counted in."""
        if isinstance(self.variant, Decode):
            return 16 * self.variant.rows, self.variant.max_n
        return self.variant.BM, self.variant.BN

    @property
    def streams_k(self) -> bool:
        """Whether the kernel takes `ksplit` = STREAM_K: one CTA per SM, each an equal share of all tiles' k steps
        (`sm90::k_schedule`), so the last wave is not left part-empty. The sparse-wgmma kernels (gather, window).
        Every kernel takes `ksplit` > 1 (k slices per output tile)."""
        return isinstance(self.variant, (Wgmma, WgmmaWindow))

    def k_steps(self, Kc: int) -> int:
        """k steps of one output tile over `Kc` packed chunks (what `ksplit` divides): chunks, or for the window
        kernel its stages of 64 columns of x (64 / window chunks each)."""
        if isinstance(self.variant, WgmmaWindow):
            return -(-Kc // (64 // self.window))
        return Kc


KERNELS: tuple[Kernel, ...] = tuple(
    Kernel(i, variant, dtype)
    for i, (variant, dtype) in enumerate((v, d) for v in VARIANTS for d in DTYPES)
)


