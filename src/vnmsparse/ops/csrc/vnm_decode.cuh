// Decode kernel (N <= 32 tokens): memory-bound. Streams the packed weight (values + 2:4 metadata + kept
// column indices) exactly once and gathers the activations each sparse MMA needs straight from x by
// column index. No transpose of x anywhere.
//
// Per warp and 8-group chunk (k = 32 kept columns), two ways to get the B fragments (x at the kept columns):
//   window (16-token kernels, p.window > 0: every kept column of chunk kc lies in x columns [kc*window,
//     (kc+1)*window), i.e. no input permutation, M <= 8): the chunk's window of x (N rows x 8*M columns) is
//     copied into shared memory with coalesced 16-byte cp.async, issued together with the weight loads, so it
//     no longer waits for the column indices; each lane then builds its B registers from the window at the
//     offsets of the kept columns it needs (indices from the owning lanes by shuffle).
//   gather (otherwise): lane l loads kept column l's index (one coalesced 128-byte load), then x[n][col_l] for
//     every token n (one warp instruction per token row), staged through a per-warp [n][k] tile and read back
//     with ldmatrix.
// Each warp owns ROWS 16-row tiles of one V-row block, so one copy of x serves ROWS MMAs.
//
// Work split: CTA = ROWS*16 rows x a k range; its warps split the range; blockIdx.y splits k across CTAs
// (so small R still fills the GPU). Partial sums meet in shared memory, then (gridDim.y > 1) in a global
// fp32 workspace; the last CTA of a row group to arrive (atomic counter, reset by it) sums the partials in a
// fixed order, so results do not depend on scheduling.
#pragma once

#include "vnm_common.cuh"

namespace vnm {

// Checks and derived constants for a decode tile traits struct (generated from ops/variants.py by ops/codegen.py):
//   N_TILES: 8-token MMA tiles (1: N <= 8, 2: N <= 16)
//   ROWS:    16-row tiles per warp (all in one V-row block: the host only picks ROWS <= V/16)
//   WARPS:   warps per CTA, splitting the CTA's k chunks
//   UNROLL:  k chunks per stage
//   STAGES:  1 or 2 stages of UNROLL chunks in flight per warp
template <typename Tile> struct DecodeShape {
  static constexpr int kNTiles = Tile::N_TILES;
  static constexpr int kRows = Tile::ROWS;
  static constexpr int kWarps = Tile::WARPS;
  static constexpr int kUnroll = Tile::UNROLL;
  static constexpr int kStages = Tile::STAGES;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMaxN = 8 * kNTiles;
  static constexpr int kPitch = 40;  // staged row: 32 kept columns + 8 pad (80 bytes: ldmatrix conflict-free)
  static constexpr int kStageElems = kWarps * kUnroll * kMaxN * kPitch;
  static constexpr int kWinPitch = kDecodeMaxWindow + 8;  // window row: 144 bytes (16-byte aligned, banks shift by 4)
  static constexpr int kWinElems = kWarps * kStages * kUnroll * kMaxN * kWinPitch;
  static constexpr int kOutputs = 16 * kRows * kMaxN;  // outputs of one CTA
  static constexpr int kRedFloats = kWarps * kRows * kNTiles * 4 * 32;
  // Windows for the kernels of 16 tokens and more only: at N = 16 they beat the gather by 7-19% on every decode
  // shape on the H100, at N = 1 they lost 1-7% (one gathered element per lane is cheaper there than M 16-byte
  // pieces; docs/kernels.md). And only where the windows fit the static shared memory.
  static constexpr bool kUsesWindow = kNTiles >= 2 && 2 * kWinElems <= 48 * 1024 - 1024;
  // The staging tiles (gather) and the windows are never used by the same launch: one region serves both.
  static constexpr int kLoopBytes = 2 * (kUsesWindow && kWinElems > kStageElems ? kWinElems : kStageElems);
  static constexpr int kSmemBytes = kLoopBytes > kRedFloats * 4 ? kLoopBytes : kRedFloats * 4;
  static_assert(kNTiles == 1 || kNTiles == 2 || kNTiles == 4, "decode N_TILES must be 1, 2 or 4 (N <= 32 tokens)");
  static_assert(kRows == 1 || kRows == 2 || kRows == 4, "decode ROWS must be 1, 2 or 4 (ROWS*16 <= V)");
  static_assert(kWarps >= 1 && kWarps <= 16, "decode WARPS must be in 1..16");
  static_assert(kStages == 1 || kStages == 2, "decode STAGES must be 1 or 2");
  static_assert(kUnroll >= 1 && kStages * kUnroll * kRows <= 8, "decode STAGES*UNROLL*ROWS must be at most 8 (registers)");
  static_assert(kSmemBytes <= 48 * 1024, "decode shared memory must fit the static 48 KB");
};

// How x reaches the MMAs: by chunk windows (p.window > 0) or by gather; one instantiation each, so that neither
// path's registers constrain the other's (both together spilled at 128 registers).
enum class DecodeX { kGather, kWindow };

template <typename Tile, typename T, DecodeX kX>
__global__ void __launch_bounds__(DecodeShape<Tile>::kThreads, 2)  // 2 CTAs per SM: <= 128 registers
    vnm_decode_kernel(const VnmParams p) {
  using S = DecodeShape<Tile>;
  constexpr bool kWindowed = kX == DecodeX::kWindow;
  static_assert(!kWindowed || S::kUsesWindow, "decode: this tile takes x by gather only");
  constexpr int NT = S::kNTiles, MT = S::kRows, U = S::kUnroll;
  __shared__ __align__(16) unsigned char smem[S::kSmemBytes];
  __shared__ int last_flag;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, t = lane & 3;
  const int mg = blockIdx.x;  // row group: ROWS 16-row tiles
  const int mt0 = mg * MT;
  const int blk = (mt0 * 16) / p.V;

  // k range: this CTA's slice of the chunks, then this warp's part of it.
  const int per_cta = (p.Kc + gridDim.y - 1) / gridDim.y;
  const int cbeg = blockIdx.y * per_cta, cend = min(p.Kc, cbeg + per_cta);
  const int per_warp = (max(cend - cbeg, 0) + S::kWarps - 1) / S::kWarps;
  const int kbeg = cbeg + warp * per_warp, kend = min(cend, kbeg + per_warp);

  // Programmatic dependent launch (p.pdl): the weights never depend on the kernel before this one, so the first
  // stage's records, metadata and column indices are requested into L2 while that kernel finishes; the loads below
  // (after the wait) then find them there. Only a hint: nothing is read into registers before the wait.
  if (p.pdl && kbeg < kend) {
    const uint32_t chunks = static_cast<uint32_t>(min(kend, kbeg + S::kStages * U) - kbeg);
    if (lane < MT && mt0 + lane < p.Rt) {
      const size_t rec = static_cast<size_t>(mt0 + lane) * p.Kc + kbeg;
      prefetch_l2(p.a_vals + rec * 32, chunks * 32 * sizeof(uint4));
      prefetch_l2(p.a_meta + rec * 16, chunks * 16 * sizeof(uint32_t));
    } else if (lane == MT) {
      prefetch_l2(p.cols + (static_cast<size_t>(blk) * p.Gp + 8 * kbeg) * 4, chunks * 32 * sizeof(int));
    }
  }
  grid_dependency_wait();

  uint16_t* stage = reinterpret_cast<uint16_t*>(smem) + warp * (U * S::kMaxN * S::kPitch);
  uint16_t* win = reinterpret_cast<uint16_t*>(smem) + warp * (S::kStages * U * S::kMaxN * S::kWinPitch);
  if constexpr (!kWindowed) {
    // Token rows N..8*NT-1 of the staging tile are never written below: zero them once (their MMA columns
    // are discarded, but they must not be uninitialized reads).
    for (int i = lane; i < U * S::kMaxN * S::kPitch; i += 32) stage[i] = 0;
    __syncwarp();
  }

  const uint16_t* x16 = static_cast<const uint16_t*>(p.x);
  const int* col_ptr = p.cols + static_cast<size_t>(blk) * p.Gp * 4 + lane;  // + 32*kc: kept column `lane`
  const uint32_t stage_addr = smem_addr(stage);
  // ldmatrix (non-transposed): lanes 8j..8j+7 point at token rows 0..7 (of an n-tile), k columns 8j..8j+7.
  const uint32_t ld_off = ((lane & 7) * S::kPitch + (lane >> 3) * 8) * 2;

  float acc[MT][NT][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][nt][i] = 0.f;

  // STAGES = 2: the weight records, metadata and column indices of the next U chunks are in flight while this
  // stage gathers x and multiplies (ncu on the single-stage loop at N = 1: 23-29% of DRAM bandwidth, warps
  // alternating between waiting for their weights and for their gather). Measured: 1-6% faster at N <= 8, but
  // 4-9% slower at N = 16, where a single stage of twice the chunks keeps more gathers in flight instead.
  uint4 av[S::kStages][U][MT];
  uint32_t ev[S::kStages][U][MT];
  int col[S::kStages][U];
  auto load = [&](int k0, int b) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kc = k0 + u;
      if (kc < kend) {
        if constexpr (kWindowed) {  // x[n][kc*window ..] for n < N: M 16-byte pieces per row (the host checked alignment)
          const int per_row = p.window / 8, ws = kc * p.window;
          const uint32_t dst = smem_addr(win + (b * U + u) * S::kMaxN * S::kWinPitch);
          for (int i = lane; i < p.N * per_row; i += 32) {
            const int n = i / per_row, c = ws + 8 * (i - n * per_row);
            cp_async_ca16(dst + (n * S::kWinPitch + c - ws) * 2, x16 + static_cast<size_t>(n) * p.ldx + (c < p.C ? c : 0), c < p.C);
          }
        }
        col[b][u] = __ldg(col_ptr + static_cast<size_t>(kc) * 32);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const int mt = min(mt0 + mi, p.Rt - 1);  // rows past R: any valid record (not stored)
          const size_t rec = static_cast<size_t>(mt) * p.Kc + kc;
          av[b][u][mi] = ldg_stream(p.a_vals + rec * 32 + lane);
          ev[b][u][mi] = ldg_u32(p.a_meta + rec * 16 + gid * 2 + (t & 1));
        }
      }
    }
    if constexpr (kWindowed) cp_async_commit();  // one group of window copies per load call
  };
  // Before computing a stage: its window copies have landed (and are visible to the whole warp); `newer`
  // says whether a later load's group was committed since (it may stay in flight).
  auto windows_ready = [&](bool newer) {
    if constexpr (kWindowed) {
      if (newer) cp_async_wait<1>();
      else cp_async_wait<0>();
      __syncwarp();
    }
  };
  auto compute_window = [&](int k0, int b) {
    // B register j of lane (gid, t) is x[n][col(k)] for k = 8j + 2t + {0, 1}, n = 8 nt + gid: the column index
    // of kept column k is held by lane k; its offset in the window is clamped (a no-op for what pack built).
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k0 + u < kend) {
        const int ws = (k0 + u) * p.window;
        const uint16_t* w = win + (b * U + u) * S::kMaxN * S::kWinPitch;
        uint32_t off[8];
#pragma unroll
        for (int q = 0; q < 8; ++q)
          off[q] = min(static_cast<uint32_t>(__shfl_sync(0xffffffffu, col[b][u], 8 * (q >> 1) + 2 * t + (q & 1)) - ws),
                       static_cast<uint32_t>(p.window - 1));
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int n = 8 * nt + gid;
          const uint16_t* row = w + n * S::kWinPitch;
          uint32_t bf[4];
#pragma unroll
          for (int j = 0; j < 4; ++j)
            bf[j] = n < p.N ? static_cast<uint32_t>(row[off[2 * j]]) | (static_cast<uint32_t>(row[off[2 * j + 1]]) << 16) : 0u;
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            const uint32_t a[4] = {av[b][u][mi].x, av[b][u][mi].y, av[b][u][mi].z, av[b][u][mi].w};
            MmaSp<T>::run(acc[mi][nt], a, bf, ev[b][u][mi]);
          }
        }
      }
    }
    __syncwarp();  // every lane is done reading these windows before a later load overwrites them
  };
  auto compute_gather = [&](int k0, int b) {
    // Gather: one token row per instruction, 32 kept columns across the lanes.
    uint32_t xv[U][S::kMaxN];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k0 + u < kend) {
#pragma unroll
        for (int n = 0; n < S::kMaxN; ++n)
          if (n < p.N) xv[u][n] = ldg_u16(x16 + static_cast<size_t>(n) * p.ldx + col[b][u]);
      }
    }
    // Stage [n][k], read back as B fragments, multiply.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k0 + u < kend) {
        uint16_t* st = stage + u * S::kMaxN * S::kPitch;
#pragma unroll
        for (int n = 0; n < S::kMaxN; ++n)
          if (n < p.N) st[n * S::kPitch + lane] = static_cast<uint16_t>(xv[u][n]);
        __syncwarp();
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t bf[4];
          ldmatrix_x4(bf, stage_addr + (u * S::kMaxN * S::kPitch + nt * 8 * S::kPitch) * 2 + ld_off);
#pragma unroll
          for (int mi = 0; mi < MT; ++mi) {
            const uint32_t a[4] = {av[b][u][mi].x, av[b][u][mi].y, av[b][u][mi].z, av[b][u][mi].w};
            MmaSp<T>::run(acc[mi][nt], a, bf, ev[b][u][mi]);
          }
        }
      }
    }
    __syncwarp();  // the next stage overwrites the staging tiles
  };
  auto compute = [&](int k0, int b) {
    if constexpr (kWindowed) compute_window(k0, b);
    else compute_gather(k0, b);
  };

  if constexpr (S::kStages == 2) {
    if (kbeg < kend) load(kbeg, 0);
    for (int k0 = kbeg; k0 < kend; k0 += 2 * U) {  // unrolled by two so that the stage index is a constant
      if (k0 + U < kend) load(k0 + U, 1);
      windows_ready(k0 + U < kend);
      compute(k0, 0);
      if (k0 + U >= kend) break;
      if (k0 + 2 * U < kend) load(k0 + 2 * U, 0);
      windows_ready(k0 + 2 * U < kend);
      compute(k0 + U, 1);
    }
  } else {
    for (int k0 = kbeg; k0 < kend; k0 += U) {
      load(k0, 0);
      windows_ready(false);
      compute(k0, 0);
    }
  }

  grid_launch_dependents();  // the next kernel's prologue may overlap this reduction

  // Reduce the warps: red[warp][mi][nt][i][lane].
  __syncthreads();  // staging memory is reused
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[(((warp * MT + mi) * NT + nt) * 4 + i) * 32 + lane] = acc[mi][nt][i];
  __syncthreads();

  // Output o = n * (16*ROWS) + row_l: consecutive threads write consecutive rows of one token (coalesced).
  constexpr int kRowsCta = 16 * MT;
  float part[(S::kOutputs + S::kThreads - 1) / S::kThreads];
#pragma unroll
  for (int j = 0; j < (S::kOutputs + S::kThreads - 1) / S::kThreads; ++j) {
    const int o = threadIdx.x + j * S::kThreads;
    part[j] = 0.f;
    if (o < S::kOutputs) {
      const int row_l = o % kRowsCta, n = o / kRowsCta;
      const int mi = row_l >> 4, r16 = row_l & 15;
      const int src_lane = (r16 & 7) * 4 + ((n & 7) >> 1);
      const int i = (r16 >> 3) * 2 + (n & 1);
      const int nt = n >> 3;
#pragma unroll
      for (int w = 0; w < S::kWarps; ++w) part[j] += red[(((w * MT + mi) * NT + nt) * 4 + i) * 32 + src_lane];
    }
  }

  if (gridDim.y > 1) {
    // Publish this CTA's partial; the last CTA of the row group finishes.
    float* ws = p.ws + static_cast<size_t>(mg) * gridDim.y * S::kOutputs;
#pragma unroll
    for (int j = 0; j < (S::kOutputs + S::kThreads - 1) / S::kThreads; ++j) {
      const int o = threadIdx.x + j * S::kThreads;
      if (o < S::kOutputs) ws[static_cast<size_t>(blockIdx.y) * S::kOutputs + o] = part[j];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_flag = atomicAdd(p.counters + mg, 1) == static_cast<int>(gridDim.y) - 1;
    __syncthreads();
    if (!last_flag) return;
    __threadfence();
#pragma unroll
    for (int j = 0; j < (S::kOutputs + S::kThreads - 1) / S::kThreads; ++j) {
      const int o = threadIdx.x + j * S::kThreads;
      if (o < S::kOutputs) {
        float s = 0.f;
        for (int ks = 0; ks < static_cast<int>(gridDim.y); ++ks) s += __ldcg(ws + static_cast<size_t>(ks) * S::kOutputs + o);
        part[j] = s;
      }
    }
    if (threadIdx.x == 0) p.counters[mg] = 0;  // ready for the next launch (and CUDA-graph replays)
  }

  uint16_t* y16 = static_cast<uint16_t*>(p.y);
  const uint16_t* b16 = static_cast<const uint16_t*>(p.bias);
#pragma unroll
  for (int j = 0; j < (S::kOutputs + S::kThreads - 1) / S::kThreads; ++j) {
    const int o = threadIdx.x + j * S::kThreads;
    const int row = mt0 * 16 + o % kRowsCta, n = o / kRowsCta;
    if (o < S::kOutputs && row < p.R && n < p.N) {
      float s = part[j];
      if (b16 != nullptr) s += Elem<T>::to_float(b16[row]);
      y16[static_cast<size_t>(n) * p.ldy + row] = Elem<T>::from_float(s);
    }
  }
}

// Launch with gridDim.y = p.ksplit k slices; p.ws / p.counters must be set when ksplit > 1; with p.pdl as a
// programmatic dependent of the previous kernel in the stream.
template <typename Tile, typename T>
cudaError_t launch_decode(const VnmParams& p, cudaStream_t stream) {
  using S = DecodeShape<Tile>;
  if (p.N > S::kMaxN || S::kRows * 16 > p.V) return cudaErrorInvalidValue;
  if (p.Rt == 0 || p.N == 0) return cudaSuccess;
  const int groups = (p.Rt + S::kRows - 1) / S::kRows;
  const int ks = p.ksplit > 1 ? p.ksplit : 1;
  if (ks > 1 && (p.ws == nullptr || p.counters == nullptr)) return cudaErrorInvalidValue;
  const dim3 grid(groups, ks);
  if constexpr (S::kUsesWindow)
    if (p.window > 0) return launch_kernel(vnm_decode_kernel<Tile, T, DecodeX::kWindow>, grid, S::kThreads, p, stream);
  return launch_kernel(vnm_decode_kernel<Tile, T, DecodeX::kGather>, grid, S::kThreads, p, stream);
}

}  // namespace vnm
