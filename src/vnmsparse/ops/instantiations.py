"""The one list of compiled kernel variants, and the generator that turns it into CUDA sources.

Each `Decode` / `Gemm` / `Wgmma` entry becomes a tile traits struct (named `static constexpr` fields, checked
by the kernel's `*Shape` static_asserts), one translation unit per (variant, dtype), and one row of the kernel
table in `vnm_table.cu`. The sparse-wgmma instructions the `Wgmma` entries need (one per N) are generated into
`vnm_wgmma_ops.h`. The table's order is this list's order, so Python dispatch (`dispatch.py`) picks
a kernel by index into `KERNELS` and reads tile sizes from here: they are written nowhere else.

Run as a script to write the sources somewhere for a manual nvcc build:
    python -m vnmsparse.ops.instantiations --out /tmp/vnm_gen
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

DTYPES = ("bf16", "fp16")
_CUDA_TYPE = {"bf16": "__nv_bfloat16", "fp16": "__half"}
SUPPORTED_V = (16, 32, 64, 128)


def _traits_struct(name: str, fields: Sequence[str]) -> str:
    """A tile traits struct, one `static constexpr int` per "NAME = value;  // comment": the shape all kinds share."""
    body = "".join(f"  static constexpr int {field}\n" for field in fields)
    return f"struct {name} {{\n{body}}};\n"


class _Generated:
    """The C++ a variant generates, named from its `kind` and `tag`: written once for all three kinds."""

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

    def traits(self) -> str:
        """The traits struct (for vnm_tiles.h)."""
        return _traits_struct(self.struct, self.fields())

    def launcher(self, dtype: str) -> str:
        """The launcher template instantiated for this variant and dtype, e.g. launch_gemm<GemmTile_..., __half>."""
        return f"launch_{self.kind}<{self.struct}, {_CUDA_TYPE[dtype]}>"


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
        # twice the chunks keeps more of the 16-token gathers in flight): bench/results/decode-sweep-h100.md.
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
    # The 128 x 256 tile with 4 stages: as fast or faster than 5 stages or 256 x 128 on every case measured
    # (history/kernel-h100-window-smem.json); M = 8 (records expanded in registers) and 2-CTA clusters sharing x
    # were slower (bench/NOTES-wgmma.md).
    return [WgmmaWindow(M=4, consumers=2, wg_m=1, BN=256, stages=4)]


def _wgmma_variants() -> list[Wgmma]:
    # Per V: the wide-N tile (least A traffic per FLOP; fastest at large N), the 4-block / 2-block BN=128 tile, and
    # narrow-N tiles of 128 rows (BN = 128, 64) that give serving batches (N = 64..1024) more CTAs than the GPU has
    # SMs. Stages with A in shared memory: 8 beat 6 by 6-12% at V = 128; at V = 64, 6 were 1-9% slower than 4 for
    # the BN=256 tile (bench/NOTES-wgmma.md); the narrow tiles' stages are small, so they keep 8 in flight.
    return [
        Wgmma(V=64, consumers=2, wg_m=1, BN=256, stages=4),
        Wgmma(V=64, consumers=2, wg_m=2, BN=128, stages=4),
        Wgmma(V=64, consumers=2, wg_m=1, BN=128, stages=8),
        Wgmma(V=64, consumers=2, wg_m=1, BN=64, stages=8),
        Wgmma(V=128, consumers=2, wg_m=1, BN=256, stages=8),
        Wgmma(V=128, consumers=2, wg_m=2, BN=128, stages=6),
        Wgmma(V=128, consumers=2, wg_m=1, BN=128, stages=8),
        Wgmma(V=128, consumers=2, wg_m=1, BN=64, stages=8),
    ]


def _gemm_variants() -> list[Gemm]:
    out: list[Gemm] = []
    for V in SUPPORTED_V:
        if V >= 64:
            # Large tile: the workhorse for N >= ~1024.  Small tile: more CTAs for mid-size N.
            out.append(Gemm(V=V, BM=128, BN=128, warps_m=2, warps_n=4, stages=4, min_ctas=2))
            out.append(Gemm(V=V, BM=64, BN=64, warps_m=2, warps_n=2, stages=4, min_ctas=4))
            out.append(Gemm(V=V, BM=64, BN=128, warps_m=1, warps_n=4, stages=4, min_ctas=2))
            # 64x64 per warp: the most MMAs per shared-memory byte read (ncu: the smaller tiles are L1-bound).
            out.append(Gemm(V=V, BM=128, BN=128, warps_m=2, warps_n=2, stages=4, min_ctas=2))
        else:
            # Small V: several row blocks per CTA, each with its own gathered activations.
            out.append(Gemm(V=V, BM=64, BN=128, warps_m=1, warps_n=4, stages=3, min_ctas=2))
            out.append(Gemm(V=V, BM=64, BN=64, warps_m=2, warps_n=2, stages=3, min_ctas=4))
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
    def splits_k(self) -> bool:
        """Whether the kernel can split its k chunks over CTAs (`ksplit` > 1): decode and mma.sp gemm."""
        return isinstance(self.variant, (Decode, Gemm))


KERNELS: tuple[Kernel, ...] = tuple(
    Kernel(i, variant, dtype)
    for i, (variant, dtype) in enumerate((v, d) for v in VARIANTS for d in DTYPES)
)


# ---- generator -------------------------------------------------------------------------------------------
_BANNER = "// Generated by vnmsparse/ops/instantiations.py from its KERNELS list. Do not edit.\n"


def _traits_header() -> str:
    body = "".join(v.traits() for v in VARIANTS)
    return f"{_BANNER}#pragma once\n\nnamespace vnm {{\n\n{body}\n}}  // namespace vnm\n"


def _unit(kernel: Kernel) -> str:
    return (
        f"{_BANNER}#include \"{kernel.variant.header}\"\n#include \"vnm_tiles.h\"\n\n"
        f"namespace vnm {{\ntemplate cudaError_t {kernel.variant.launcher(kernel.dtype)}(const VnmParams&, cudaStream_t);\n}}\n"
    )


_WGMMA_ELEM = {"bf16": "bf16", "fp16": "f16"}  # PTX type names


def _wgmma_op(n: int, dtype: str, trans_b: int) -> str:
    """One `WgmmaSp<T, N, TRANS_B>` specialization: wgmma.mma_async.sp m64nNk32, A from registers, B by
    descriptor (TRANS_B = 1: N-major, tokens contiguous; 0: K-major), fp32 accumulators, sparsity selector 0,
    always accumulating."""
    regs = n // 2
    d_list = ", ".join(f"%{i}" for i in range(regs))
    d_ops = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    t = _WGMMA_ELEM[dtype]
    return (
        f"template <> struct WgmmaSp<{_CUDA_TYPE[dtype]}, {n}, {trans_b}> {{\n"
        f"  static __device__ __forceinline__ void run(float (&d)[{regs}], const uint4& a, uint64_t desc, uint32_t e) {{\n"
        f"    asm volatile(\n"
        f'        "{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 6}, 0;\\n"\n'
        f'        "wgmma.mma_async.sp.sync.aligned.m64n{n}k32.f32.{t}.{t} "\n'
        f'        "{{{d_list}}}, "\n'
        f'        "{{%{regs}, %{regs + 1}, %{regs + 2}, %{regs + 3}}}, %{regs + 4}, %{regs + 5}, 0, p, 1, 1, {trans_b};\\n}}\\n"\n'
        f"        : {d_ops}\n"
        f'        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "l"(desc), "r"(e), "n"(1));\n'
        f"  }}\n}};\n"
    )


def _wgmma_ops_header() -> str:
    shapes = sorted({(v.BN, 1) for v in VARIANTS if isinstance(v, Wgmma)} | {(v.BN, 0) for v in VARIANTS if isinstance(v, WgmmaWindow)})
    body = "".join(_wgmma_op(n, d, tb) for n, tb in shapes for d in DTYPES)
    return (
        f"{_BANNER}#pragma once\n\n#include <cstdint>\n#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n\n"
        "#include \"vnm_sm90.cuh\"\n\nnamespace vnm {\n\n"
        "// D(64 x N, fp32) += A(64 x 32, 2:4 sparse, registers) * B(32 x N, shared memory; TRANS_B = 1: tokens\n"
        "// contiguous, 0: k contiguous).\n"
        "template <typename T, int N, int TRANS_B> struct WgmmaSp;\n\n"
        f"#if defined(VNM_SM90A_ENABLED)\n{body}#endif  // VNM_SM90A_ENABLED\n\n}}  // namespace vnm\n"
    )


def _table() -> str:
    decls = []
    rows = []
    for k in KERNELS:
        kind = {"decode": "KernelKind::kDecode", "gemm": "KernelKind::kGemm", "wgmma": "KernelKind::kWgmma",
                "wgmma_window": "KernelKind::kWgmmaWindow"}[k.variant.kind]
        dtype = "ElemType::kBf16" if k.dtype == "bf16" else "ElemType::kFp16"
        decls.append(f"extern template cudaError_t {k.variant.launcher(k.dtype)}(const VnmParams&, cudaStream_t);")
        tile_m, tile_n = k.tile
        rows.append(f'    {{"{k.name}", {kind}, {dtype}, {k.V}, {min(k.variant.max_n, 1 << 30)}, {k.variant.rows}, {k.window}, '
                    f'{tile_m}, {tile_n}, &{k.variant.launcher(k.dtype)}}},')
    return (
        f"{_BANNER}#include \"vnm_decode.cuh\"\n#include \"vnm_gemm.cuh\"\n#include \"vnm_wgmma_window.cuh\"\n#include \"vnm_tiles.h\"\n\n"
        "namespace vnm {\n\n" + "\n".join(decls) + "\n\n"
        "static const KernelEntry kTable[] = {\n" + "\n".join(rows) + "\n};\n\n"
        "const KernelEntry* kernel_table(int* count) {\n"
        "  *count = static_cast<int>(sizeof(kTable) / sizeof(kTable[0]));\n  return kTable;\n}\n\n"
        "}  // namespace vnm\n"
    )


def sources() -> dict[str, str]:
    """File name -> content of every generated source (traits header, one unit per kernel, the table)."""
    files = {"vnm_tiles.h": _traits_header(), "vnm_wgmma_ops.h": _wgmma_ops_header(), "vnm_table.cu": _table()}
    for k in KERNELS:
        files[f"gen_{k.name}.cu"] = _unit(k)
    return files


def fingerprint() -> str:
    """Short hash of the generated sources: part of the extension's cache key."""
    h = hashlib.sha256()
    for name, text in sorted(sources().items()):
        h.update(name.encode())
        h.update(text.encode())
    return h.hexdigest()[:12]


def write(out_dir: str | Path) -> list[Path]:
    """Write the generated sources into out_dir (only files whose content changed, so builds stay incremental).

    Returns the .cu files to compile, in table order, table last.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    compiled: list[Path] = []
    for name, text in sources().items():
        path = out / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        if name.endswith(".cu"):
            compiled.append(path)
    compiled.sort(key=lambda p: (p.name == "vnm_table.cu", p.name))
    return compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the generated sources")
    args = parser.parse_args()
    for path in write(args.out):
        print(path)


if __name__ == "__main__":
    main()
