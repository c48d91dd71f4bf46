// Index math of the sm_90a sparse-wgmma kernel (vnm_wgmma.cuh), kept free of CUDA so that a plain C++
// compiler can build it too: tests/ops/test_wgmma_layout.py compiles this header with g++, dumps every
// mapping, and checks it against the PTX ISA's definitions of the operand layouts (CPU only).
//
// Conventions (see docs/kernels.md for the why):
//   B operand of one k-step and one V-row block: 32 kept columns (k) x BN tokens (n), bf16/fp16, stored
//   "MN-major" (tokens contiguous) with the 128-byte swizzle: atoms of 8 k-rows x 64 tokens (1024 bytes),
//   token atoms adjacent (LBO = 1024 bytes), groups of 8 k-rows BN*16 bytes apart (SBO).
//   Within an atom, k-row r is the 128-byte line r and its 16-byte chunk c (tokens 8c..8c+7) sits at
//   chunk c ^ r: exactly the hardware's 128B swizzle (address bits 4-6 ^= bits 7-9) of a 1024-aligned atom.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VNM_HD __host__ __device__ __forceinline__
#else
#define VNM_HD inline
#endif

namespace vnm {
namespace sm90 {

constexpr int kKStep = 32;        // kept columns per k-step (8 groups of 4 slots): the k of m64nNk32
constexpr int kAtomTokens = 64;   // tokens per 128-byte swizzle line
constexpr int kAtomBytes = 1024;  // 8 lines of 128 bytes
constexpr int kSwizzle128B = 1;   // descriptor bits 62-63: 1 = 128-byte swizzle

// Byte offset of token n (n % 8 == 0: the first of a 16-byte piece) of k-row k in one B tile of width bn.
VNM_HD constexpr uint32_t b_tile_offset(int k, int n, int bn) {
  return static_cast<uint32_t>((k / 8) * (bn * 16) + (n / kAtomTokens) * kAtomBytes + (k % 8) * 128 +
                               ((((n / 8) % 8) ^ (k % 8)) * 16) + (n % 8) * 2);
}

// Bytes of one B tile (one k-step of one row block).
VNM_HD constexpr int b_tile_bytes(int bn) { return kKStep * bn * 2; }

// wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address, leading
// dimension byte offset, stride dimension byte offset, each >> 4 in 14 bits; base offset 0 (atoms are
// 1024-aligned); bits 62-63 the swizzle mode.
VNM_HD constexpr uint64_t desc_encode(uint32_t bytes) { return static_cast<uint64_t>((bytes & 0x3FFFFu) >> 4); }

VNM_HD constexpr uint64_t b_desc(uint32_t smem_addr, int bn) {
  return desc_encode(smem_addr) | (desc_encode(kAtomBytes) << 16) | (desc_encode(static_cast<uint32_t>(bn * 16)) << 32) |
         (static_cast<uint64_t>(kSwizzle128B) << 62);
}

// ---- producer: which gathered piece a producer thread copies -------------------------------------------------
// A stage holds `rows` = 32 * blocks gathered k-rows of `pieces` = BN / 8 sixteen-byte pieces. Producer warp w
// (0..3) owns rows w, w + 4, w + 8, ...; its lane u holds the column index of its u-th row (rows <= 128, so
// u < 32). One warp instruction copies 32 / pieces whole rows (pieces <= 32).
struct GatherPiece {
  int row;    // row within the stage: block * 32 + k
  int piece;  // 16-byte piece within the row: tokens 8 * piece .. 8 * piece + 7
  int owner;  // lane of this warp holding the row's column index
};

VNM_HD constexpr int gather_iters(int rows, int pieces) { return (rows / 4) / (32 / pieces); }

VNM_HD constexpr GatherPiece gather_piece(int warp, int lane, int iter, int pieces) {
  return GatherPiece{(iter * (32 / pieces) + lane / pieces) * 4 + warp, lane % pieces, iter * (32 / pieces) + lane / pieces};
}

// The row whose column index lane `lane` of producer warp `warp` loads (valid while < rows).
VNM_HD constexpr int owned_row(int warp, int lane) { return lane * 4 + warp; }

// Shared-memory byte offset (within a stage of B tiles of width bn) of the piece gather_piece(warp, lane, iter)
// copies. Rows advance by 4 * (32 / pieces) per iteration, so two iterations advance a whole number of 8-row
// groups and keep the row's line (row % 8): offset(iter) = offset(iter % 2) + (iter / 2) * gather_dst_step.
// The kernel uses that form (two bases per thread, a compile-time step); the CPU test checks the identity.
VNM_HD constexpr uint32_t gather_dst(int warp, int lane, int iter, int pieces, int bn) {
  return static_cast<uint32_t>((gather_piece(warp, lane, iter, pieces).row / kKStep) * b_tile_bytes(bn)) +
         b_tile_offset(gather_piece(warp, lane, iter, pieces).row % kKStep, 8 * gather_piece(warp, lane, iter, pieces).piece, bn);
}

VNM_HD constexpr uint32_t gather_dst_step(int pieces, int bn) {
  return static_cast<uint32_t>((32 / pieces) * bn * 16);  // 8 * (32 / pieces) rows = (32 / pieces) groups of 8 rows
}

// ---- consumer: A fragments and accumulators ------------------------------------------------------------------
// Metadata word of lane `lane` within its record's 16 words (sparsity selector 0: lanes t = 0, 1 of each quad
// supply groups 0-3 and 4-7; lanes t = 2, 3 read the same words, which the instruction ignores).
VNM_HD constexpr int meta_word(int lane) { return 2 * (lane >> 2) + (lane & 1); }

// Metadata word for all-zero values (rows past R, chunks past the last): every nibble the ordered pair (0, 1).
constexpr uint32_t kPadMeta = 0x44444444u;

// Warp w of a consumer warpgroup computes rows 16w..16w+15 of its m64 tile; its A fragment for one k-step is
// exactly one packed 16-row record (pack.py's a_vals/a_meta), the same register layout as mma.sp m16n8k32. A
// stage holds, by TMA, the records of the CTA's row tiles 0..BM/16-1 for `chunks` consecutive chunks (row tile
// by row tile, zeros past R), then their metadata words the same way. Byte offsets of lane `lane`'s 16 bytes of
// chunk j of row tile `row_tile`, and of its metadata word, from the start of those two regions:
VNM_HD constexpr uint32_t a_stage_offset(int row_tile, int chunks, int j, int lane) {
  return static_cast<uint32_t>((row_tile * chunks + j) * 512 + lane * 16);
}
VNM_HD constexpr uint32_t e_stage_offset(int row_tile, int chunks, int j, int lane) {
  return static_cast<uint32_t>((row_tile * chunks + j) * 64 + meta_word(lane) * 4);
}

// Which of the CTA's B tiles (V-row blocks) m64 tile `local` (0 .. bm/64 - 1) multiplies with.
VNM_HD constexpr int b_tile_of(int local, int v, int bm) { return bm >= v ? (local * 64) / v : 0; }


// ---- epilogue: stmatrix.x4.trans rows ----------------------------------------------------------------------
// For token pair-group jj (tokens 16jj..16jj+15) of one m64 tile, lane l addresses row l % 8 of matrix l / 8:
// matrix q holds rows (m) +8*(q % 2) and tokens (n) +8*(q / 2); after the transpose each stored row is one token
// and 8 consecutive output rows. Returns the token (within the CTA tile) and the row offset within the warp.
struct StRow {
  int n;
  int m;
};

// Register q (0..3) of that stmatrix packs accumulators acc and acc + 1 with acc = stmatrix_acc(jj, q): the
// D fragment's tokens 16jj + 8 (q / 2) + {2t, 2t + 1} of row +8 (q % 2).
VNM_HD constexpr int stmatrix_acc(int jj, int q) { return 8 * jj + 4 * (q >> 1) + 2 * (q & 1); }

VNM_HD constexpr StRow stmatrix_row(int lane, int jj) {
  return StRow{16 * jj + 8 * ((lane >> 3) >> 1) + (lane & 7), 8 * ((lane >> 3) & 1)};
}

// ---- window kernel (vnm_wgmma_window.cuh): B straight from x, A as 2:4 over the window -------------------
// For M = 4 weights whose kept columns are their groups' own 4 columns (unpermuted), a chunk of 8 groups is 32
// contiguous columns of x and its packed record already is the 2:4 A operand over them. The window kernel loads
// x's [tokens x 64 columns] tiles by TMA (K-major, 128-byte swizzle: token n is the 128-byte line n, its 16-byte
// chunk c at c ^ (n % 8)), two chunks per stage.
constexpr int kWindowCols = 64;  // x columns per stage: one 128-byte swizzle line of bf16/fp16

// wgmma descriptor of a K-major B tile (tokens x 64 columns, 128-byte swizzle, 1024-aligned), advanced by
// `k_bytes` (0 or 64: the second k32 half) inside the swizzle line as the hardware allows; LBO unused (1),
// SBO = 1024 bytes between groups of 8 tokens.
VNM_HD constexpr uint64_t bk_desc(uint32_t smem_addr, uint32_t k_bytes) {
  return desc_encode(smem_addr + k_bytes) | (uint64_t{1} << 16) | (desc_encode(kAtomBytes) << 32) |
         (static_cast<uint64_t>(kSwizzle128B) << 62);
}

// ---- grid raster -----------------------------------------------------------------------------------------
// Linear CTA id -> (row tile, token tile): groups of `group_m` row tiles walk all token tiles, so the CTAs in
// flight share a few row tiles' weights and a few token tiles' activations in L2.
struct TileCoord {
  int m;
  int n;
};

VNM_HD constexpr TileCoord tile_coord(int id, int tiles_m, int tiles_n, int group_m) {
  const int per_group = group_m * tiles_n;
  const int first_m = (id / per_group) * group_m;
  const int rows = (tiles_m - first_m) < group_m ? (tiles_m - first_m) : group_m;
  const int in_group = id % per_group;
  return TileCoord{first_m + in_group % rows, in_group / rows};
}

// ---- how the sparse-wgmma kernels' CTAs share the work ----------------------------------------------------
// A k step here is one ring step: one chunk for the gathering kernel, one 64-column stage for the window kernel.
// The k steps of all output tiles laid end to end (tile t owns steps [t*kc, (t+1)*kc)) are split evenly over
// the CTAs: CTA c multiplies steps [share_begin(c), share_begin(c + 1)), one tile's part (a segment) at a time.
// With tiles x ksplit CTAs each CTA gets one k slice of one tile (split-k). With one CTA per SM (stream-K) a CTA
// may finish one tile's k range and go on into the next, so no wave runs part-empty: 144 tiles on 132 SMs take
// 1.09 tiles' time instead of 2. Every CTA gets at least one step (ctas <= steps), so the CTAs that share a tile
// are exactly those holding one of its steps, numbered (slices) in k order.
constexpr int kStreamK = 0;  // the ksplit value that asks for stream-K

struct KSchedule {
  long long ctas;  // grid size
  int slices;      // the most CTAs that share one tile: the split-k workspace holds that many partials per tile
};

VNM_HD KSchedule k_schedule(long long tiles, int kc, int ksplit, int sm_count) {
  const long long steps = tiles * kc;
  if (ksplit != kStreamK) {
    const int ks = ksplit < kc ? ksplit : kc;
    return KSchedule{tiles * ks, ks};
  }
  const long long ctas = sm_count < steps ? sm_count : steps;
  const long long least = steps / ctas;  // every CTA's share is `least` or `least + 1` steps
  const long long most = (kc + least - 1) / least + 1;
  return KSchedule{ctas, static_cast<int>(most < ctas ? most : ctas)};
}

VNM_HD long long share_begin(long long cta, long long steps, long long ctas) { return cta * steps / ctas; }

// The CTA whose share holds step i: the largest c with share_begin(c) <= i.
VNM_HD long long cta_holding(long long i, long long steps, long long ctas) { return ((i + 1) * ctas - 1) / steps; }

struct Segment {
  int tile;    // output tile (raster id, tile_coord)
  int kbeg;    // first k step of the tile in this segment
  int steps;   // k steps in this segment
  int slice;   // this CTA's place among the CTAs sharing the tile, in k order
  int slices;  // CTAs sharing the tile (1: the segment is the whole tile)
  bool last;   // the segment ends the CTA's share
};

// The segment `done` steps into the share of CTA `cta` (of `ctas`, sharing `steps` steps of tiles of kc steps).
VNM_HD Segment segment_at(long long cta, int done, int kc, long long steps, long long ctas) {
  const long long end = share_begin(cta + 1, steps, ctas), i = share_begin(cta, steps, ctas) + done;
  const long long tile = i / kc, first = tile * kc, last = first + kc - 1;
  const long long stop = end < first + kc ? end : first + kc;
  const long long first_cta = cta_holding(first, steps, ctas);
  return Segment{static_cast<int>(tile), static_cast<int>(i - first), static_cast<int>(stop - i),
                 static_cast<int>(cta - first_cta), static_cast<int>(cta_holding(last, steps, ctas) - first_cta + 1),
                 stop == end};
}

}  // namespace sm90
}  // namespace vnm
