"""The one list of compiled kernel variants, and the generator that turns it into CUDA sources.

Each `Decode` / `Gemm` entry becomes a tile traits struct (named `static constexpr` fields, checked by the
kernel's `*Shape` static_asserts), one translation unit per (variant, dtype), and one row of the kernel
table in `vnm_table.cu`. The table's order is this list's order, so Python dispatch (`dispatch.py`) picks
a kernel by index into `KERNELS` and reads tile sizes from here: they are written nowhere else.

Run as a script to write the sources somewhere for a manual nvcc build:
    python -m vnmsparse.ops.instantiations --out /tmp/vnm_gen
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("bf16", "fp16")
_CUDA_TYPE = {"bf16": "__nv_bfloat16", "fp16": "__half"}
SUPPORTED_V = (16, 32, 64, 128)
DECODE_MAX_N = 16  # the decode kernel's largest token count (2 MMA tiles of 8)


@dataclass(frozen=True)
class Decode:
    """Memory-bound kernel for N <= 8 * n_tiles tokens."""

    n_tiles: int  # 8-token MMA tiles
    rows: int  # 16-row tiles per warp, one gather serving all (needs 16 * rows <= V)
    warps: int = 8  # warps per CTA, splitting the CTA's k chunks
    unroll: int = 0  # k chunks in flight per warp; 0: as many as registers allow (see steps)

    kind = "decode"
    ctas_per_sm = 2  # what its registers (<= 128) and static shared memory (<= 40 KB) allow

    @property
    def max_n(self) -> int:
        return 8 * self.n_tiles

    @property
    def steps(self) -> int:
        # Registers: U chunks hold U*rows 16-byte weight records and U*8*n_tiles gathered values per lane.
        return self.unroll or {1: 4, 2: 4 if self.n_tiles == 1 else 2, 4: 2}[self.rows]

    @property
    def tag(self) -> str:
        return f"nt{self.n_tiles}r{self.rows}w{self.warps}u{self.steps}"

    def traits(self) -> str:
        return (
            f"struct DecodeTile_{self.tag} {{\n"
            f"  static constexpr int N_TILES = {self.n_tiles};  // 8-token MMA tiles\n"
            f"  static constexpr int ROWS = {self.rows};     // 16-row tiles per warp (one V-row block)\n"
            f"  static constexpr int WARPS = {self.warps};    // warps splitting the CTA's k chunks\n"
            f"  static constexpr int UNROLL = {self.steps};   // k chunks in flight per warp\n"
            f"}};\n"
        )

    def launcher(self, dtype: str) -> str:
        return f"launch_decode<DecodeTile_{self.tag}, {_CUDA_TYPE[dtype]}>"

    header = "vnm_decode.cuh"


@dataclass(frozen=True)
class Gemm:
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

    def traits(self) -> str:
        return (
            f"struct GemmTile_{self.tag} {{\n"
            f"  static constexpr int V = {self.V};         // rows per V:N:M block\n"
            f"  static constexpr int BM = {self.BM};       // rows of W per CTA\n"
            f"  static constexpr int BN = {self.BN};       // tokens per CTA\n"
            f"  static constexpr int WARPS_M = {self.warps_m};   // warp grid, rows\n"
            f"  static constexpr int WARPS_N = {self.warps_n};   // warp grid, tokens\n"
            f"  static constexpr int STAGES = {self.stages};    // cp.async pipeline depth\n"
            f"  static constexpr int MIN_CTAS = {self.min_ctas};  // CTAs per SM for __launch_bounds__\n"
            f"}};\n"
        )

    def launcher(self, dtype: str) -> str:
        return f"launch_gemm<GemmTile_{self.tag}, {_CUDA_TYPE[dtype]}>"

    header = "vnm_gemm.cuh"

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n


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


VARIANTS: tuple[Decode | Gemm, ...] = (
    *(Decode(n_tiles=nt, rows=rows) for rows in (1, 2, 4) for nt in (1, 2)),
    *_gemm_variants(),
)


@dataclass(frozen=True)
class Kernel:
    """One table entry: a variant built for one dtype."""

    index: int
    variant: Decode | Gemm
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.variant.kind}_{self.dtype}_{self.variant.tag}"

    @property
    def V(self) -> int:
        return getattr(self.variant, "V", 0)


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


def _table() -> str:
    decls = []
    rows = []
    for k in KERNELS:
        kind = "KernelKind::kDecode" if k.variant.kind == "decode" else "KernelKind::kGemm"
        dtype = "ElemType::kBf16" if k.dtype == "bf16" else "ElemType::kFp16"
        decls.append(f"extern template cudaError_t {k.variant.launcher(k.dtype)}(const VnmParams&, cudaStream_t);")
        rows.append(f'    {{"{k.name}", {kind}, {dtype}, {k.V}, {min(k.variant.max_n, 1 << 30)}, {k.variant.rows}, &{k.variant.launcher(k.dtype)}}},')
    return (
        f"{_BANNER}#include \"vnm_decode.cuh\"\n#include \"vnm_gemm.cuh\"\n#include \"vnm_tiles.h\"\n\n"
        "namespace vnm {\n\n" + "\n".join(decls) + "\n\n"
        "static const KernelEntry kTable[] = {\n" + "\n".join(rows) + "\n};\n\n"
        "const KernelEntry* kernel_table(int* count) {\n"
        "  *count = static_cast<int>(sizeof(kTable) / sizeof(kTable[0]));\n  return kTable;\n}\n\n"
        "}  // namespace vnm\n"
    )


def sources() -> dict[str, str]:
    """File name -> content of every generated source (traits header, one unit per kernel, the table)."""
    files = {"vnm_tiles.h": _traits_header(), "vnm_table.cu": _table()}
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
