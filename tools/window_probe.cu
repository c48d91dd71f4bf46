// Probe for issue 18, "window tiles" at prefill N (2048-8192 tokens): does loading a k-step's whole window of x^T
// rows once per CTA, and letting every V-row block pick its kept rows out of it with per-lane ldmatrix addresses,
// beat today's per-block gather of those rows? Two mma.sp.m16n8k32 kernels on the same packed weights (the
// layout of src/vnmsparse/ops/pack.py, packed here on the host), same tiles, same MMA loop and epilogue:
//   gather: today's approach (vnm_gemm.cuh): per k-step each V = 64 row block of the CTA gathers its own 32 kept
//           rows of x^T (BN tokens) by 16-byte cp.async into a swizzled stage; ldmatrix.x4.trans; mma.sp.
//   window: unpermuted packs only (window = 8M): per k-step the CTA copies x^T rows [kc*8M, (kc+1)*8M) (BN tokens)
//           with coalesced 16-byte cp.async into one padded stage, plus the step's column indices; each warp's
//           ldmatrix.x4.trans takes per-lane row addresses window + (col - kc*8M) * pitch.
// Also cuBLAS bf16 dense on the same shapes. tools/window_probe.md says what it measures and what result counts.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Isrc/vnmsparse/ops/csrc tools/window_probe.cu -lcublas \
//        -o /tmp/window_probe
// (cuBLAS from pip's nvidia-cublas instead of the toolkit: tools/window_probe.md has the one-line build and run;
// -DWINDOW_PROBE_NO_CUBLAS, or a toolkit without cublas_v2.h, builds it without the dense reference.)
//   /tmp/window_probe             # host emulation, GPU checks on odd shapes, then the timed sweep
//   /tmp/window_probe --check     # host emulation and the GPU checks only
//   /tmp/window_probe --emulate   # host emulation of both kernels' data flow only (no GPU needed)
//   options: --iters K (timed launches per measurement, default 20), --n N (one token count), --m M (one M)
// Exit status 0 only if every check passed (emulation, each kernel on every case, cuBLAS).
#if !defined(WINDOW_PROBE_NO_CUBLAS) && !__has_include(<cublas_v2.h>)
#define WINDOW_PROBE_NO_CUBLAS
#endif
#ifndef WINDOW_PROBE_NO_CUBLAS
#include <cublas_v2.h>
#endif
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "vnm_common.cuh"  // -Isrc/vnmsparse/ops/csrc

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define HD __host__ __device__ __forceinline__

// ---- fixed geometry -------------------------------------------------------------------------------------------
constexpr int kV = 64;                  // rows per V:N:M block
constexpr int kBN = 128;                // tokens per CTA
constexpr int kPieces = kBN / 8;        // 16-byte pieces (8 tokens) of one x^T row segment
constexpr int kMaxM = 8;
constexpr int kMaxWindow = 8 * kMaxM;   // x^T rows of one k-step's window at M = 8
// Window row pitch: 256 bytes of tokens + 16 bytes of padding. A 16-byte piece of row r then sits in bank quad
// (r + piece) % 8 (a quad = 4 banks = 16 bytes; 8 quads = the 128 bytes one shared-memory wavefront serves): any 8
// consecutive window rows fall in 8 different quads, and two rows share a quad only if their indices differ by a
// multiple of 8, the widest spacing 8 quads allow. See tools/window_probe.md for what that costs ldmatrix.
constexpr int kPitch = kBN * 2 + 16;

// ---- tiles ------------------------------------------------------------------------------------------------------
// BM rows of W x kBN tokens per CTA; WARPS_M x WARPS_N warps of 64 rows (= one V block) x 64 tokens each.
template <int BM_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_CTAS_, bool WINDOW_>
struct Tile {
  static constexpr int BM = BM_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_, MIN_CTAS = MIN_CTAS_;
  static constexpr bool WINDOW = WINDOW_;
  static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
  static constexpr int kWM = BM / WARPS_M, kWN = kBN / WARPS_N;
  static constexpr int kMT = kWM / 16, kNT = kWN / 8;
  static constexpr int kBlocks = BM / kV;                 // V blocks per CTA
  // Shared memory per stage: A records, metadata, B (gathered rows or the window), the window's column indices.
  static constexpr int kABytes = BM * 32;
  static constexpr int kEBytes = BM * 4;
  static constexpr int kBBytes = WINDOW ? kMaxWindow * kPitch : kBlocks * 32 * kBN * 2;
  static constexpr int kCBytes = WINDOW ? kBlocks * 32 * 4 : 0;
  static constexpr int kStageBytes = kABytes + kEBytes + kBBytes + kCBytes;
  static constexpr int kOutPitch = BM + 8;                // epilogue staging pitch (elements)
  static constexpr int kOutBytes = kBN * kOutPitch * 2;
  static constexpr int kRingOffset = kStageBytes * STAGES > kOutBytes ? kStageBytes * STAGES : kOutBytes;
  static constexpr int kRingBytes = WINDOW ? 0 : STAGES * kBlocks * 32 * 4;  // gather: column-index ring
  static constexpr int kSmemBytes = kRingOffset + kRingBytes;
  static constexpr int kAPerThread = (BM * 2 + kThreads - 1) / kThreads;
  static constexpr int kGatherPerThread = kBlocks * 32 * kPieces / kThreads;
  static constexpr int kWinPerThread = (kMaxWindow * kPieces + kThreads - 1) / kThreads;

  static_assert(kWM == kV, "a warp's rows are exactly one V block");
  static_assert(kWN % 8 == 0 && kBN % kWN == 0, "tokens per warp: a multiple of 8");
  static_assert(kPieces == 16, "the gather swizzle and the window copy assume 16 pieces per row (BN = 128)");
  static_assert((kBlocks * 32 * kPieces) % kThreads == 0, "gathered pieces split evenly over the threads");
  static_assert(BM / 4 <= kThreads && kBlocks * 8 <= kThreads, "metadata / index copies: one piece per thread");
  static_assert(kStageBytes % 128 == 0 && kRingOffset % 16 == 0, "stage alignment");
  static_assert(STAGES >= 2 && STAGES <= 8, "STAGES in 2..8");
};

// Runtime geometry of one case (the packed arrays' dimensions as pack.py defines them).
struct Geo {
  int N, R, C, M;
  int W;    // window rows = 8M
  int G;    // ceil(C/M) groups
  int Rt;   // ceil(R/16) record rows
  int Kc;   // ceil(G/8) chunks (k-steps)
  int Gp;   // 8*Kc
  int Bn;   // ceil(R/V) row blocks
  int Np;   // N rounded up to 8: row pitch of x^T (elements)
};

static Geo make_geo(int R, int C, int N, int M) {
  Geo g;
  g.N = N; g.R = R; g.C = C; g.M = M; g.W = 8 * M;
  g.G = (C + M - 1) / M;
  g.Rt = (R + 15) / 16;
  g.Kc = (g.G + 7) / 8;
  g.Gp = 8 * g.Kc;
  g.Bn = (R + kV - 1) / kV;
  g.Np = (N + 7) / 8 * 8;
  return g;
}

struct Params {
  Geo g;
  const uint16_t* xt;     // (C, Np) x transposed, zero in columns N..Np-1
  const uint4* a_vals;    // (Rt, Kc, 32) x 16 bytes
  const uint32_t* a_meta; // (Rt, Kc, 16)
  const int* cols;        // (Bn, Gp, 4)
  uint16_t* y;            // (N, R) bf16
};

// ---- index math shared by the kernels and the host emulation -------------------------------------------------
// One 16-byte copy: source offset in elements of its array, destination byte offset within its region, and
// whether it is real (false: zero-filled, no global byte read).
struct Copy {
  long long src;
  uint32_t dst;
  bool ok;
};
// A record piece q (BM*2 per stage): record q/32 of the tile, lane q%32. src in uint4.
HD Copy a_copy(const Geo& g, int mt0, int kc, int q) {
  const int mt = mt0 + q / 32;
  const bool ok = mt < g.Rt;
  return {(static_cast<long long>(ok ? mt : 0) * g.Kc + kc) * 32 + (q & 31), static_cast<uint32_t>(q) * 16u, ok};
}
// Metadata piece q (BM/4 per stage): words 4(q%4)..+3 of record q/4. src in uint32.
HD Copy e_copy(const Geo& g, int mt0, int kc, int q) {
  const int mt = mt0 + q / 4;
  const bool ok = mt < g.Rt;
  return {(static_cast<long long>(ok ? mt : 0) * g.Kc + kc) * 16 + (q & 3) * 4, static_cast<uint32_t>(q) * 16u, ok};
}
// Column-index piece q (8 per V block): indices 4(q%8)..+3 of chunk kc of block blk0 + q/8. src in int.
HD Copy col_copy(const Geo& g, int blk0, int kc, int q) {
  const int b = blk0 + q / 8;
  const bool ok = b < g.Bn;
  return {(static_cast<long long>(ok ? b : 0) * g.Gp + 8 * kc) * 4 + (q % 8) * 4, static_cast<uint32_t>(q) * 16u, ok};
}
// Window piece q (W*16 per stage): x^T row kc*W + q/16, tokens n0 + 8(q%16)..+7 -> row q/16 of the window at
// pitch kPitch. Rows >= C (last chunk) and tokens >= Np read as zero. src in elements.
HD Copy window_copy(const Geo& g, int n0, int kc, int q) {
  const int r = q / kPieces, pn = q % kPieces;
  const int row = kc * g.W + r, n = n0 + pn * 8;
  const bool ok = row < g.C && n < g.Np;
  return {ok ? static_cast<long long>(row) * g.Np + n : 0, static_cast<uint32_t>(r * kPitch + pn * 16), ok};
}
// Gathered piece (block blk_l of the CTA, kept row k, piece pn) of x^T row col (-1: none): XOR-swizzled as in
// vnm_gemm.cuh, so an ldmatrix of 8 consecutive k rows hits 8 bank quads. src in elements.
HD Copy gather_copy(const Geo& g, int n0, int blk_l, int k, int pn, int col) {
  const int n = n0 + pn * 8;
  const bool ok = col >= 0 && n < g.Np;
  return {ok ? static_cast<long long>(col) * g.Np + n : 0,
          static_cast<uint32_t>(((blk_l * 32 + k) * kPieces + (pn ^ (k & 7))) * 16), ok};
}
// Byte offset, within the window, of the row holding x^T row col in chunk kc. An index outside the window (only
// the zero-filled indices of blocks past the last, whose A records are zero) is sent to row 0.
HD uint32_t window_row(const Geo& g, int col, int kc) {
  uint32_t loc = static_cast<uint32_t>(col - kc * g.W);
  if (loc >= static_cast<uint32_t>(g.W)) loc = 0;
  return loc * kPitch;
}
// Byte offset, within the gathered stage, of the row lane `lane` addresses for ldmatrix (kept row k = lane).
HD uint32_t gather_row(int blk_l, int lane, int pn) {
  return static_cast<uint32_t>(((blk_l * 32 + lane) * kPieces + (pn ^ (lane & 7))) * 16);
}

// ---- device helpers: the library's own (cp.async, ldmatrix, shared loads, L2 prefetch, mma.sp) ------------------
using vnm::cp_async_ca16;
using vnm::cp_async_cg16;
using vnm::cp_async_commit;
using vnm::cp_async_wait;
using vnm::ldmatrix_x4_trans;
using vnm::lds32;
using vnm::lds_a_fragments;
using vnm::prefetch_l2_range;
using vnm::smem_addr;
// d += A(16x32, 2:4) * B(32x8), bf16 in, fp32 accumulate; fragment layouts in vnm_common.cuh (MmaSp).
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  vnm::MmaSp<__nv_bfloat16>::run(d, a, b, e);
}

// ---- the kernels ----------------------------------------------------------------------------------------------
// grid (ceil(R/BM), ceil(N/BN)); one CTA computes y[n0..n0+BN) x [m0..m0+BM) over every k-step.
template <typename S>
__global__ void __launch_bounds__(S::kThreads, S::MIN_CTAS) probe_kernel(const Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const Geo& g = p.g;
  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, t = lane & 3;
  const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;  // wm: this warp's V block within the CTA
  const int m0 = blockIdx.x * S::BM, n0 = blockIdx.y * kBN;
  const int mt0 = m0 / 16, blk0 = m0 / kV;
  const int Kc = g.Kc;
  const uint32_t base = smem_addr(smem);

  auto stage_a = [&](int s) { return base + s * S::kStageBytes; };
  auto stage_e = [&](int s) { return base + s * S::kStageBytes + S::kABytes; };
  auto stage_b = [&](int s) { return base + s * S::kStageBytes + S::kABytes + S::kEBytes; };
  auto stage_c = [&](int s) { return base + s * S::kStageBytes + S::kABytes + S::kEBytes + S::kBBytes; };

  auto issue_ae = [&](int kc, int s) {
#pragma unroll
    for (int i = 0; i < S::kAPerThread; ++i) {
      const int q = tid + i * S::kThreads;
      if (q < S::BM * 2) {
        const Copy c = a_copy(g, mt0, kc, q);
        cp_async_cg16(stage_a(s) + c.dst, p.a_vals + c.src, c.ok);
      }
    }
    if (tid < S::BM / 4) {
      const Copy c = e_copy(g, mt0, kc, tid);
      cp_async_cg16(stage_e(s) + c.dst, p.a_meta + c.src, c.ok);
    }
  };

  float acc[S::kMT][S::kNT][4];
#pragma unroll
  for (int mi = 0; mi < S::kMT; ++mi)
#pragma unroll
    for (int ni = 0; ni < S::kNT; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  // One k-step's MMAs on stage s, given this lane's ldmatrix row address for n-tile 0 of the warp and the
  // per-n-tile address step (window: +16 bytes; gather: recomputed, it is XOR-swizzled).
  auto compute = [&](int s, auto b_addr) {
    uint32_t a[S::kMT][4], e[S::kMT];
    lds_a_fragments<S::kMT>(a, e, stage_a(s), stage_e(s), wm * S::kMT, lane);
#pragma unroll
    for (int ni = 0; ni < S::kNT; ++ni) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_addr(ni));
#pragma unroll
      for (int mi = 0; mi < S::kMT; ++mi) mma_sp(acc[mi][ni], a[mi], b, e[mi]);
    }
  };

  if constexpr (S::WINDOW) {
    // Stage = A records + metadata + the step's column indices of the CTA's blocks + the x^T window. Nothing here
    // depends on a loaded value, so a stage is one burst of independent 16-byte copies.
    auto issue_stage = [&](int kc, int s) {
      issue_ae(kc, s);
      if (tid < S::kBlocks * 8) {
        const Copy c = col_copy(g, blk0, kc, tid);
        cp_async_cg16(stage_c(s) + c.dst, p.cols + c.src, c.ok);
      }
      const int pieces = g.W * kPieces;
#pragma unroll
      for (int i = 0; i < S::kWinPerThread; ++i) {
        const int q = tid + i * S::kThreads;
        if (q < pieces) {
          const Copy c = window_copy(g, n0, kc, q);
          cp_async_cg16(stage_b(s) + c.dst, p.xt + c.src, c.ok);
        }
      }
    };
#pragma unroll
    for (int s = 0; s < S::STAGES - 1; ++s) {
      if (s < Kc) issue_stage(s, s);
      cp_async_commit();
    }
    for (int kc = 0; kc < Kc; ++kc) {
      cp_async_wait<S::STAGES - 2>();
      __syncthreads();  // stage kc landed for every thread; the slot of kc - 1 is free
      const int nxt = kc + S::STAGES - 1;
      if (nxt < Kc) issue_stage(nxt, nxt % S::STAGES);
      cp_async_commit();
      const int s = kc % S::STAGES;
      // Lane l addresses kept row k = l of this warp's block: x^T row cols[blk][8kc + l/4][l%4].
      const int col = static_cast<int>(lds32(stage_c(s) + (wm * 32 + lane) * 4));
      const uint32_t brow = stage_b(s) + window_row(g, col, kc) + wn * S::kNT * 16;
      compute(s, [&](int ni) { return brow + ni * 16; });
    }
  } else {
    // Today's gather (vnm_gemm.cuh, no split-k, no bias): the indices of chunk kc + STAGES - 1 ride in the copy
    // group of stage kc into a ring, so a stage's gather reads its indices from shared memory.
    auto piece_blk = [&](int i) { return (tid + i * S::kThreads) / (32 * kPieces); };
    auto piece_k = [&](int i) { return ((tid + i * S::kThreads) / kPieces) % 32; };
    auto piece_n = [&](int i) { return (tid + i * S::kThreads) % kPieces; };
    const uint32_t ring = base + S::kRingOffset;
    if (tid < S::kBlocks && blk0 + tid < g.Bn)
      prefetch_l2_range(p.cols + static_cast<size_t>(blk0 + tid) * g.Gp * 4, static_cast<uint32_t>(Kc) * 32 * 4);
    auto load_cols = [&](int kc, int (&c)[S::kGatherPerThread]) {
#pragma unroll
      for (int i = 0; i < S::kGatherPerThread; ++i) {
        const int b = blk0 + piece_blk(i);
        c[i] = b < g.Bn ? __ldg(p.cols + (static_cast<size_t>(b) * g.Gp + 8 * kc) * 4 + piece_k(i)) : -1;
      }
    };
    auto issue_stage = [&](int kc, int s, const int (&c)[S::kGatherPerThread]) {
      issue_ae(kc, s);
#pragma unroll
      for (int i = 0; i < S::kGatherPerThread; ++i) {
        const Copy cp = gather_copy(g, n0, piece_blk(i), piece_k(i), piece_n(i), c[i]);
        cp_async_ca16(stage_b(s) + cp.dst, p.xt + cp.src, cp.ok);
      }
    };
    auto fetch_cols = [&](int kc) {  // chunk kc's indices into ring slot kc % STAGES
      if (tid < S::kBlocks * 8 && kc < Kc) {
        const Copy c = col_copy(g, blk0, kc, tid);
        cp_async_ca16(ring + (kc % S::STAGES) * S::kBlocks * 128 + c.dst, p.cols + c.src, c.ok);
      }
    };
    auto ring_cols = [&](int kc, int (&c)[S::kGatherPerThread]) {
#pragma unroll
      for (int i = 0; i < S::kGatherPerThread; ++i) {
        const uint32_t at = (kc % S::STAGES) * S::kBlocks * 32 + piece_blk(i) * 32 + piece_k(i);
        c[i] = blk0 + piece_blk(i) < g.Bn ? static_cast<int>(lds32(ring + at * 4)) : -1;
      }
    };
    {
      int cfirst[S::STAGES - 1][S::kGatherPerThread];
#pragma unroll
      for (int s = 0; s < S::STAGES - 1; ++s)
        if (s < Kc) load_cols(s, cfirst[s]);
#pragma unroll
      for (int s = 0; s < S::STAGES - 1; ++s) {
        if (s < Kc) issue_stage(s, s, cfirst[s]);
        fetch_cols(s + S::STAGES - 1);
        cp_async_commit();
      }
    }
    for (int kc = 0; kc < Kc; ++kc) {
      cp_async_wait<S::STAGES - 2>();
      __syncthreads();  // stage kc and chunk kc + STAGES - 1's indices landed; slot kc - 1 is free
      const int nxt = kc + S::STAGES - 1;
      if (nxt < Kc) {
        int c[S::kGatherPerThread];
        ring_cols(nxt, c);
        issue_stage(nxt, nxt % S::STAGES, c);
      }
      fetch_cols(nxt + S::STAGES - 1);  // into the slot chunk nxt - 1's indices left (read before the barrier)
      cp_async_commit();
      const int s = kc % S::STAGES;
      const uint32_t bbase = stage_b(s);
      compute(s, [&](int ni) { return bbase + gather_row(wm, lane, wn * S::kNT + ni); });
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: stage the y^T tile as out[n][m], then 16-byte stores of y rows.
  uint16_t* out = reinterpret_cast<uint16_t*>(smem);
#pragma unroll
  for (int mi = 0; mi < S::kMT; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ni = 0; ni < S::kNT; ++ni)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int ml = wm * S::kWM + mi * 16 + gid + 8 * h;
          const int nl = wn * S::kWN + ni * 8 + 2 * t + j;
          out[nl * S::kOutPitch + ml] = __bfloat16_as_ushort(__float2bfloat16_rn(acc[mi][ni][2 * h + j]));
        }
  __syncthreads();
  const bool vec = (g.R % 8) == 0;
  constexpr int kRowPieces = S::BM / 8;
  for (int q = tid; q < kBN * kRowPieces; q += S::kThreads) {
    const int nl = q / kRowPieces, mp = q % kRowPieces;
    const int n = n0 + nl, row = m0 + mp * 8;
    if (n >= g.N || row >= g.R) continue;
    const uint16_t* src = out + nl * S::kOutPitch + mp * 8;
    uint16_t* dst = p.y + static_cast<size_t>(n) * g.R + row;
    if (vec && row + 8 <= g.R) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int j = 0; j < 8 && row + j < g.R; ++j) dst[j] = src[j];
    }
  }
}

// Counts bf16 NaN/Inf in y (every output must have been written over the NaN poison).
__global__ void count_nonfinite(const uint16_t* y, size_t n, unsigned long long* bad) {
  unsigned long long mine = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<size_t>(gridDim.x) * blockDim.x)
    mine += (y[i] & 0x7f80u) == 0x7f80u;
  if (mine) atomicAdd(bad, mine);
}
__global__ void take_samples(const uint16_t* y, const long long* idx, int count, uint16_t* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) out[i] = y[idx[i]];
}

// ---- host: bf16, random numbers ----------------------------------------------------------------------------------
static uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
static float bf2f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
  // Never zero: magnitude in [0.25, 1), random sign.
  float value() {
    const uint64_t r = next();
    const float mag = 0.25f + 0.75f * static_cast<float>((r >> 11) & 0xFFFFFF) / 16777216.f;
    return (r & 1) ? -mag : mag;
  }
};

// ---- host: the canonical V:2:M weight and its pack --------------------------------------------------------------
// As src/vnmsparse/format.py: per block b and group g, 4 kept columns (global, ascending, in [gM, gM+M); those >= C
// are padding and hold zeros); per row r and group g two slots p0 < p1 of those 4 and their two values.
struct Canon {
  int R = 0, C = 0, M = 0, G = 0, Bn = 0;
  std::vector<int> columns;    // (Bn, G, 4)
  std::vector<uint8_t> slots;  // (R, G, 2)
  std::vector<uint16_t> vals;  // (R, G, 2) bf16 bits
};

static Canon make_weight(int R, int C, int M, uint64_t seed) {
  Canon w;
  w.R = R; w.C = C; w.M = M;
  w.G = (C + M - 1) / M;
  w.Bn = (R + kV - 1) / kV;
  Rng rng(seed);
  w.columns.resize(static_cast<size_t>(w.Bn) * w.G * 4);
  for (int b = 0; b < w.Bn; ++b)
    for (int gr = 0; gr < w.G; ++gr) {
      int idx[kMaxM];
      for (int i = 0; i < M; ++i) idx[i] = i;
      for (int i = 0; i < 4; ++i) std::swap(idx[i], idx[i + rng.below(M - i)]);  // 4 distinct of M
      std::sort(idx, idx + 4);
      for (int s = 0; s < 4; ++s) w.columns[(static_cast<size_t>(b) * w.G + gr) * 4 + s] = gr * M + idx[s];
    }
  w.slots.resize(static_cast<size_t>(R) * w.G * 2);
  w.vals.resize(static_cast<size_t>(R) * w.G * 2);
  for (int r = 0; r < R; ++r)
    for (int gr = 0; gr < w.G; ++gr) {
      int p0 = rng.below(4), p1 = rng.below(3);
      if (p1 >= p0) ++p1;
      if (p0 > p1) std::swap(p0, p1);
      const size_t at = (static_cast<size_t>(r) * w.G + gr) * 2;
      w.slots[at] = static_cast<uint8_t>(p0);
      w.slots[at + 1] = static_cast<uint8_t>(p1);
      const int* cols = &w.columns[(static_cast<size_t>(r / kV) * w.G + gr) * 4];
      w.vals[at] = cols[p0] < C ? f2bf(rng.value()) : 0;
      w.vals[at + 1] = cols[p1] < C ? f2bf(rng.value()) : 0;
    }
  return w;
}

// pack.py's layout, written from its docstring. Padding rows and groups: zero values, metadata nibble 0b0100.
struct Packed {
  std::vector<uint16_t> a_vals;  // (Rt, Kc, 32, 8)
  std::vector<uint32_t> a_meta;  // (Rt, Kc, 16)
  std::vector<int> cols;         // (Bn, Gp, 4)
};

static Packed pack(const Canon& w, const Geo& g) {
  Packed pk;
  pk.a_vals.assign(static_cast<size_t>(g.Rt) * g.Kc * 32 * 8, 0);
  pk.a_meta.assign(static_cast<size_t>(g.Rt) * g.Kc * 16, 0);
  pk.cols.assign(static_cast<size_t>(g.Bn) * g.Gp * 4, 0);
  for (int rt = 0; rt < g.Rt; ++rt)
    for (int kc = 0; kc < g.Kc; ++kc) {
      const size_t rec = static_cast<size_t>(rt) * g.Kc + kc;
      for (int lane = 0; lane < 32; ++lane) {
        const int gid = lane / 4, t = lane % 4;
        for (int gh = 0; gh < 2; ++gh)
          for (int hi = 0; hi < 2; ++hi) {
            const int row = 16 * rt + 8 * hi + gid, grp = 8 * kc + 4 * gh + t;
            for (int k = 0; k < 2; ++k) {
              const uint16_t v = (row < g.R && grp < g.G) ? w.vals[(static_cast<size_t>(row) * g.G + grp) * 2 + k] : 0;
              pk.a_vals[(rec * 32 + lane) * 8 + (2 * gh + hi) * 2 + k] = v;
            }
          }
      }
      for (int gid = 0; gid < 8; ++gid)
        for (int h = 0; h < 2; ++h) {
          uint32_t word = 0;
          for (int hi = 0; hi < 2; ++hi)
            for (int j = 0; j < 4; ++j) {
              const int row = 16 * rt + 8 * hi + gid, grp = 8 * kc + 4 * h + j;
              uint32_t nib = 0b0100;
              if (row < g.R && grp < g.G) {
                const size_t at = (static_cast<size_t>(row) * g.G + grp) * 2;
                nib = w.slots[at] | (w.slots[at + 1] << 2);
              }
              word |= nib << (16 * hi + 4 * j);
            }
          pk.a_meta[rec * 16 + 2 * gid + h] = word;
        }
    }
  for (int b = 0; b < g.Bn; ++b)
    for (int grp = 0; grp < g.Gp; ++grp)
      for (int s = 0; s < 4; ++s) {
        int c = (grp / 8) * 8 * g.M;  // padding group: its chunk's first column
        if (grp < g.G) c = std::min(w.columns[(static_cast<size_t>(b) * g.G + grp) * 4 + s], g.C - 1);
        pk.cols[(static_cast<size_t>(b) * g.Gp + grp) * 4 + s] = c;
      }
  return pk;
}

// y[n][r] in float64 from the canonical form.
static double reference(const Canon& w, const std::vector<uint16_t>& x, int n, int r) {
  double sum = 0;
  const int b = r / kV;
  for (int gr = 0; gr < w.G; ++gr) {
    const int* cols = &w.columns[(static_cast<size_t>(b) * w.G + gr) * 4];
    const size_t at = (static_cast<size_t>(r) * w.G + gr) * 2;
    for (int k = 0; k < 2; ++k) {
      const int c = cols[w.slots[at + k]];
      if (c < w.C) sum += static_cast<double>(bf2f(w.vals[at + k])) * bf2f(x[static_cast<size_t>(n) * w.C + c]);
    }
  }
  return sum;
}

static std::vector<uint16_t> dense_weight(const Canon& w) {
  std::vector<uint16_t> d(static_cast<size_t>(w.R) * w.C, 0);
  for (int r = 0; r < w.R; ++r)
    for (int gr = 0; gr < w.G; ++gr) {
      const int* cols = &w.columns[(static_cast<size_t>(r / kV) * w.G + gr) * 4];
      const size_t at = (static_cast<size_t>(r) * w.G + gr) * 2;
      for (int k = 0; k < 2; ++k) {
        const int c = cols[w.slots[at + k]];
        if (c < w.C) d[static_cast<size_t>(r) * w.C + c] = w.vals[at + k];
      }
    }
  return d;
}

static void make_x(int N, int C, uint64_t seed, std::vector<uint16_t>& x, std::vector<uint16_t>& xt, int Np) {
  Rng rng(seed);
  x.resize(static_cast<size_t>(N) * C);
  for (auto& v : x) v = f2bf(rng.value());
  xt.assign(static_cast<size_t>(C) * Np, 0);
  constexpr int kB = 64;
  for (int n0 = 0; n0 < N; n0 += kB)
    for (int c0 = 0; c0 < C; c0 += kB)
      for (int n = n0; n < std::min(N, n0 + kB); ++n)
        for (int c = c0; c < std::min(C, c0 + kB); ++c) xt[static_cast<size_t>(c) * Np + n] = x[static_cast<size_t>(n) * C + c];
}

// ---- host emulation of the kernels' data flow -------------------------------------------------------------------
// Runs every CTA's k-steps on the CPU through the same index functions (a_copy ... gather_row), with ldmatrix.trans
// and mma.sp emulated from the layouts documented above (the ones tools/mma_sp_probe.cu confirmed on the H100).
// Checks the pack and the index math without a GPU (not the pipeline's synchronization), and counts the
// shared-memory wavefronts of every ldmatrix phase (8 row addresses).
struct EmuStats {
  double max_rel = 0;
  long long phases = 0, wavefronts = 0;
  bool ok = true;
};

static void ldsm_x4_trans_emu(const std::vector<uint8_t>& sm, const uint32_t (&addr)[32], uint32_t (&out)[32][4],
                              EmuStats& st, uint32_t lo_bound, uint32_t hi_bound) {
  for (int l = 0; l < 32; ++l)
    if (addr[l] % 16 != 0 || addr[l] < lo_bound || addr[l] + 16 > hi_bound) {
      std::printf("  emulation: ldmatrix row address %u outside [%u, %u) or misaligned\n", addr[l], lo_bound, hi_bound);
      st.ok = false;
      return;
    }
  for (int j = 0; j < 4; ++j) {  // wavefronts of phase j: most distinct rows in one bank quad
    int count[8] = {};
    for (int r = 0; r < 8; ++r) {
      bool dup = false;
      for (int q = 0; q < r; ++q) dup |= addr[8 * j + q] == addr[8 * j + r];
      if (!dup) ++count[(addr[8 * j + r] / 16) % 8];
    }
    st.wavefronts += *std::max_element(count, count + 8);
    ++st.phases;
  }
  auto at = [&](uint32_t a) { uint16_t v; std::memcpy(&v, &sm[a], 2); return static_cast<uint32_t>(v); };
  for (int l = 0; l < 32; ++l) {
    const int gid = l / 4, t = l % 4;
    for (int j = 0; j < 4; ++j) out[l][j] = at(addr[8 * j + 2 * t] + 2 * gid) | at(addr[8 * j + 2 * t + 1] + 2 * gid) << 16;
  }
}

static void mma_sp_emu(float (&d)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][4], const uint32_t (&e)[32],
                       EmuStats& st) {
  float A[16][32] = {}, B[32][8];
  for (int row = 0; row < 16; ++row)
    for (int grp = 0; grp < 8; ++grp) {
      const uint32_t v = a[4 * (row % 8) + grp % 4][(grp / 4) * 2 + row / 8];
      const uint32_t nib = (e[4 * (row % 8) + grp / 4] >> (16 * (row / 8) + 4 * (grp % 4))) & 0xF;
      const int p0 = nib & 3, p1 = nib >> 2;
      // Ordered metadata needs p0 < p1. Zero-filled records (past the last 16-row tile, as in vnm_gemm.cuh) have
      // nibble 0 with zero values: those rows are never stored.
      if (p0 >= p1 && v != 0) st.ok = false;
      A[row][4 * grp + p0] += bf2f(static_cast<uint16_t>(v & 0xFFFF));
      A[row][4 * grp + p1] += bf2f(static_cast<uint16_t>(v >> 16));
    }
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      const int gid = l / 4, t = l % 4;
      B[8 * j + 2 * t][gid] = bf2f(static_cast<uint16_t>(b[l][j] & 0xFFFF));
      B[8 * j + 2 * t + 1][gid] = bf2f(static_cast<uint16_t>(b[l][j] >> 16));
    }
  for (int l = 0; l < 32; ++l) {
    const int gid = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = gid + 8 * (i / 2), n = 2 * t + (i % 2);
      float s = 0;
      for (int k = 0; k < 32; ++k) s += A[row][k] * B[k][n];
      d[l][i] += s;
    }
  }
}

template <typename S>
static EmuStats emulate(const Geo& g, const Packed& pk, const std::vector<uint16_t>& xt, const Canon& w,
                        const std::vector<uint16_t>& x) {
  EmuStats st;
  std::vector<float> y(static_cast<size_t>(g.N) * g.R, NAN);
  std::vector<uint8_t> sm(S::kStageBytes);
  const uint32_t oa = 0, oe = S::kABytes, ob = S::kABytes + S::kEBytes, oc = ob + S::kBBytes;
  // One 16-byte copy from element `at` of `src` (`count` elements of `bytes` each) to byte `rel` of the stage region
  // [lo, hi), with the kernel's rule: not ok -> zero-filled. Flags a real copy that would read past its array, and a
  // copy that would write outside its region.
  auto put16 = [&](uint32_t lo, uint32_t hi, uint32_t rel, const void* src, long long at, size_t count, size_t bytes,
                   bool ok) {
    const uint32_t dst = lo + rel;
    if (dst % 16 != 0 || dst + 16 > hi || (ok && (at < 0 || (static_cast<size_t>(at) * bytes + 16) > count * bytes))) {
      std::printf("  emulation: copy of element %lld (of %zu) to stage byte %u out of bounds\n", at, count, dst);
      st.ok = false;
      return;
    }
    if (ok) std::memcpy(&sm[dst], static_cast<const char*>(src) + at * bytes, 16);
    else std::memset(&sm[dst], 0, 16);
  };
  const int warps = S::kThreads / 32;
  std::vector<float> acc(static_cast<size_t>(warps) * S::kMT * S::kNT * 32 * 4);
  for (int bx = 0; bx * S::BM < g.R; ++bx)
    for (int by = 0; by * kBN < g.N; ++by) {
      const int m0 = bx * S::BM, n0 = by * kBN, mt0 = m0 / 16, blk0 = m0 / kV;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int kc = 0; kc < g.Kc; ++kc) {
        std::fill(sm.begin(), sm.end(), 0xA5);  // garbage where nothing is copied
        for (int q = 0; q < S::BM * 2; ++q) {
          const Copy c = a_copy(g, mt0, kc, q);
          put16(oa, oe, c.dst, pk.a_vals.data(), c.src * 8, pk.a_vals.size(), 2, c.ok);
        }
        for (int q = 0; q < S::BM / 4; ++q) {
          const Copy c = e_copy(g, mt0, kc, q);
          put16(oe, ob, c.dst, pk.a_meta.data(), c.src, pk.a_meta.size(), 4, c.ok);
        }
        if (S::WINDOW) {
          for (int q = 0; q < S::kBlocks * 8; ++q) {
            const Copy c = col_copy(g, blk0, kc, q);
            put16(oc, oc + S::kCBytes, c.dst, pk.cols.data(), c.src, pk.cols.size(), 4, c.ok);
          }
          for (int q = 0; q < g.W * kPieces; ++q) {
            const Copy c = window_copy(g, n0, kc, q);
            put16(ob, ob + S::kBBytes, c.dst, xt.data(), c.src, xt.size(), 2, c.ok);
          }
        } else {
          for (int bl = 0; bl < S::kBlocks; ++bl)
            for (int k = 0; k < 32; ++k)
              for (int pn = 0; pn < kPieces; ++pn) {
                const int b = blk0 + bl;
                const int col = b < g.Bn ? pk.cols[(static_cast<size_t>(b) * g.Gp + 8 * kc) * 4 + k] : -1;
                const Copy c = gather_copy(g, n0, bl, k, pn, col);
                put16(ob, ob + S::kBBytes, c.dst, xt.data(), c.src, xt.size(), 2, c.ok);
              }
        }
        if (!st.ok) return st;
        for (int warp = 0; warp < warps; ++warp) {
          const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;
          for (int mi = 0; mi < S::kMT; ++mi) {
            uint32_t a[32][4], e[32];
            const int rec = wm * S::kMT + mi;
            for (int l = 0; l < 32; ++l) {
              std::memcpy(a[l], &sm[oa + (rec * 32 + l) * 16], 16);
              std::memcpy(&e[l], &sm[oe + (rec * 16 + (l / 4) * 2 + ((l % 4) & 1)) * 4], 4);
            }
            for (int ni = 0; ni < S::kNT; ++ni) {
              uint32_t addr[32], b[32][4];
              for (int l = 0; l < 32; ++l) {
                if (S::WINDOW) {
                  int col;
                  std::memcpy(&col, &sm[oc + (wm * 32 + l) * 4], 4);
                  addr[l] = ob + window_row(g, col, kc) + wn * S::kNT * 16 + ni * 16;
                } else {
                  addr[l] = ob + gather_row(wm, l, wn * S::kNT + ni);
                }
              }
              EmuStats dummy;
              ldsm_x4_trans_emu(sm, addr, b, mi == 0 ? st : dummy, ob, ob + S::kBBytes);
              if (!dummy.ok) st.ok = false;
              if (!st.ok) return st;
              float d[32][4];
              float* ad = &acc[((static_cast<size_t>(warp) * S::kMT + mi) * S::kNT + ni) * 128];
              std::memcpy(d, ad, sizeof d);
              mma_sp_emu(d, a, b, e, st);
              std::memcpy(ad, d, sizeof d);
            }
          }
        }
      }
      for (int warp = 0; warp < warps; ++warp) {
        const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;
        for (int mi = 0; mi < S::kMT; ++mi)
          for (int ni = 0; ni < S::kNT; ++ni)
            for (int l = 0; l < 32; ++l)
              for (int i = 0; i < 4; ++i) {
                const int row = m0 + wm * S::kWM + mi * 16 + l / 4 + 8 * (i / 2);
                const int n = n0 + wn * S::kWN + ni * 8 + 2 * (l % 4) + (i % 2);
                if (row < g.R && n < g.N)
                  y[static_cast<size_t>(n) * g.R + row] =
                      bf2f(f2bf(acc[((static_cast<size_t>(warp) * S::kMT + mi) * S::kNT + ni) * 128 + l * 4 + i]));
              }
      }
    }
  double rms = 0;
  std::vector<double> ref(y.size());
  for (int n = 0; n < g.N; ++n)
    for (int r = 0; r < g.R; ++r) {
      ref[static_cast<size_t>(n) * g.R + r] = reference(w, x, n, r);
      rms += ref[static_cast<size_t>(n) * g.R + r] * ref[static_cast<size_t>(n) * g.R + r];
    }
  rms = std::sqrt(rms / static_cast<double>(ref.size()));
  for (size_t i = 0; i < y.size(); ++i) {
    const double rel = std::fabs(y[i] - ref[i]) / std::max(std::fabs(ref[i]), 0.1 * rms);
    if (!(rel <= st.max_rel)) st.max_rel = std::isnan(rel) ? INFINITY : std::max(st.max_rel, rel);
  }
  if (!(st.max_rel < 1e-2)) st.ok = false;
  return st;
}

// ---- the variants ----------------------------------------------------------------------------------------------
using GatherM128 = Tile<128, 2, 2, 4, 2, false>;  // the library's V = 64 gemm tile (rank 0): 128 x 128, 2x2 warps
using WindowM128 = Tile<128, 2, 2, 4, 2, true>;
using GatherM256 = Tile<256, 4, 2, 4, 1, false>;
using WindowM256 = Tile<256, 4, 2, 4, 1, true>;
using WindowM256s3 = Tile<256, 4, 2, 3, 1, true>;

// Estimated bytes into the SMs (L2 -> shared memory) per launch: every CTA, every k-step; plus y written.
template <typename S> static double sm_bytes(const Geo& g) {
  const double ctas = static_cast<double>((g.R + S::BM - 1) / S::BM) * ((g.N + kBN - 1) / kBN);
  const double step = S::BM * 36.0 + S::kBlocks * 128.0 +
                      (S::WINDOW ? static_cast<double>(g.W) * kBN * 2 : S::kBlocks * 32.0 * kBN * 2);
  return ctas * g.Kc * step + 2.0 * g.N * g.R;
}

template <typename S> static cudaError_t launch(const Params& p, cudaStream_t st) {
  dim3 grid((p.g.R + S::BM - 1) / S::BM, (p.g.N + kBN - 1) / kBN);
  probe_kernel<S><<<grid, S::kThreads, S::kSmemBytes, st>>>(p);
  return cudaGetLastError();
}
template <typename S> static cudaError_t setup() {
  return cudaFuncSetAttribute(probe_kernel<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
}
template <typename S> static cudaError_t occupancy(int* ctas) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, probe_kernel<S>, S::kThreads, S::kSmemBytes);
}

struct Variant {
  const char* name;
  bool window;
  int bm, stages, threads, smem;
  cudaError_t (*launch)(const Params&, cudaStream_t);
  cudaError_t (*setup)();
  cudaError_t (*occupancy)(int*);
  double (*bytes)(const Geo&);
  EmuStats (*emulate)(const Geo&, const Packed&, const std::vector<uint16_t>&, const Canon&, const std::vector<uint16_t>&);
};
template <typename S> static Variant variant(const char* name) {
  return {name, S::WINDOW, S::BM, S::STAGES, S::kThreads, S::kSmemBytes, launch<S>, setup<S>, occupancy<S>, sm_bytes<S>, emulate<S>};
}
static const Variant kVariants[] = {
    variant<GatherM128>("gather BM=128 s4"), variant<WindowM128>("window BM=128 s4"),
    variant<GatherM256>("gather BM=256 s4"), variant<WindowM256>("window BM=256 s4"),
    variant<WindowM256s3>("window BM=256 s3"),
};

// ---- GPU harness ---------------------------------------------------------------------------------------------------
#define CUDA_OK(expr)                                                                                    \
  do {                                                                                                   \
    cudaError_t err_ = (expr);                                                                           \
    if (err_ != cudaSuccess) {                                                                           \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(err_), __FILE__, __LINE__, #expr); \
      std::exit(3);                                                                                      \
    }                                                                                                    \
  } while (0)
#ifndef WINDOW_PROBE_NO_CUBLAS
#define CUBLAS_OK(expr)                                                                             \
  do {                                                                                              \
    cublasStatus_t st_ = (expr);                                                                    \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                                             \
      std::fprintf(stderr, "cuBLAS error %d at %s:%d: %s\n", static_cast<int>(st_), __FILE__, __LINE__, #expr); \
      std::exit(3);                                                                                 \
    }                                                                                               \
  } while (0)
#endif

template <typename T> static T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * sizeof(T)));
  if (!h.empty()) CUDA_OK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct Case {
  Geo g;
  Canon w;
  std::vector<uint16_t> x;
  // device
  Params p{};
  uint16_t* dx = nullptr;
  uint16_t* dw = nullptr;  // dense W for cuBLAS
  // samples
  std::vector<long long> idx;
  std::vector<double> ref;
  double rms = 0;
  long long* didx = nullptr;
  uint16_t* dsamp = nullptr;
};

static void build_case(Case& cs, int R, int C, int N, int M, uint64_t seed, int samples) {
  cs.g = make_geo(R, C, N, M);
  cs.w = make_weight(R, C, M, seed);
  Packed pk = pack(cs.w, cs.g);
  std::vector<uint16_t> xt;
  make_x(N, C, seed + 1000, cs.x, xt, cs.g.Np);
  cs.p.g = cs.g;
  cs.p.xt = to_device(xt);
  cs.p.a_vals = reinterpret_cast<const uint4*>(to_device(pk.a_vals));
  cs.p.a_meta = to_device(pk.a_meta);
  cs.p.cols = to_device(pk.cols);
  CUDA_OK(cudaMalloc(&cs.p.y, static_cast<size_t>(N) * R * 2));
  cs.dx = to_device(cs.x);
  cs.dw = to_device(dense_weight(cs.w));
  // Samples: the four corners, the corners of the tile grid's last tiles, then random outputs.
  Rng rng(seed + 7);
  auto add = [&](int n, int r) {
    if (n >= 0 && n < N && r >= 0 && r < R) cs.idx.push_back(static_cast<long long>(n) * R + r);
  };
  for (int n : {0, N - 1, (N - 1) / kBN * kBN, (N - 1) / kBN * kBN - 1})
    for (int r : {0, R - 1, (R - 1) / 256 * 256, (R - 1) / 128 * 128, (R - 1) / 128 * 128 - 1}) add(n, r);
  for (int i = 0; i < samples; ++i) add(rng.below(N), rng.below(R));
  double ss = 0;
  for (long long i : cs.idx) {
    cs.ref.push_back(reference(cs.w, cs.x, static_cast<int>(i / R), static_cast<int>(i % R)));
    ss += cs.ref.back() * cs.ref.back();
  }
  cs.rms = std::sqrt(ss / static_cast<double>(cs.ref.size()));
  cs.didx = to_device(cs.idx);
  CUDA_OK(cudaMalloc(&cs.dsamp, cs.idx.size() * 2));
}

static void free_case(Case& cs) {
  cudaFree(const_cast<uint16_t*>(cs.p.xt));
  cudaFree(const_cast<uint4*>(cs.p.a_vals));
  cudaFree(const_cast<uint32_t*>(cs.p.a_meta));
  cudaFree(const_cast<int*>(cs.p.cols));
  cudaFree(cs.p.y);
  cudaFree(cs.dx);
  cudaFree(cs.dw);
  cudaFree(cs.didx);
  cudaFree(cs.dsamp);
}

// Checks y (already computed into cs.p.y, which was poisoned before): every output finite, sampled outputs within
// 1e-2 relative of float64 (denominator max(|ref|, 0.1 rms) so near-zero sums do not divide by ~0).
static bool check_y(const Case& cs, const char* what, unsigned long long* dbad) {
  const size_t total = static_cast<size_t>(cs.g.N) * cs.g.R;
  CUDA_OK(cudaMemset(dbad, 0, sizeof(unsigned long long)));
  count_nonfinite<<<1024, 256>>>(cs.p.y, total, dbad);
  const int count = static_cast<int>(cs.idx.size());
  take_samples<<<(count + 255) / 256, 256>>>(cs.p.y, cs.didx, count, cs.dsamp);
  CUDA_OK(cudaGetLastError());
  unsigned long long bad = 0;
  std::vector<uint16_t> got(count);
  CUDA_OK(cudaMemcpy(&bad, dbad, sizeof bad, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(got.data(), cs.dsamp, count * 2, cudaMemcpyDeviceToHost));
  double worst = 0;
  long long worst_i = -1;
  for (int i = 0; i < count; ++i) {
    const double rel = std::fabs(bf2f(got[i]) - cs.ref[i]) / std::max(std::fabs(cs.ref[i]), 0.1 * cs.rms);
    if (!(rel <= worst)) {
      worst = std::isnan(rel) ? INFINITY : rel;
      worst_i = i;
    }
  }
  const bool ok = bad == 0 && worst < 1e-2;
  if (!ok) {
    std::printf("  CHECK FAILED %-18s %dx%d N=%d M=%d: %llu non-finite of %zu, worst sampled rel err %.3e", what,
                cs.g.R, cs.g.C, cs.g.N, cs.g.M, bad, total, worst);
    if (worst_i >= 0)
      std::printf(" at (n=%lld, r=%lld): got %.5f want %.5f", cs.idx[worst_i] / cs.g.R, cs.idx[worst_i] % cs.g.R,
                  bf2f(got[worst_i]), cs.ref[worst_i]);
    std::printf("\n");
  }
  return ok;
}

// cuBLAS bf16 dense on the same shapes (dense W expanded from the same canonical weight). Built without cuBLAS
// (-DWINDOW_PROBE_NO_CUBLAS) it does nothing and returns false.
#ifndef WINDOW_PROBE_NO_CUBLAS
struct Dense {
  cublasHandle_t h = nullptr;
  void* ws = nullptr;
  Dense() {
    CUBLAS_OK(cublasCreate(&h));
    CUDA_OK(cudaMalloc(&ws, 64u << 20));  // explicit workspace: cuBLAS then needs no allocation under graph capture
    CUBLAS_OK(cublasSetWorkspace(h, ws, 64u << 20));
  }
  ~Dense() { cublasDestroy(h); cudaFree(ws); }
  bool run(const Case& cs, cudaStream_t st) {
    const float alpha = 1.f, beta = 0.f;
    CUBLAS_OK(cublasSetStream(h, st));
    // y (N, R) row-major = column-major R x N: y^T = W (R x C row-major = C x R col-major, op T) * x^T (x row-major).
    CUBLAS_OK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, cs.g.R, cs.g.N, cs.g.C, &alpha, cs.dw, CUDA_R_16BF, cs.g.C, cs.dx,
                           CUDA_R_16BF, cs.g.C, &beta, cs.p.y, CUDA_R_16BF, cs.g.R, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return true;
  }
};
#else
struct Dense {
  bool run(const Case&, cudaStream_t) { return false; }
};
#endif

// Mean milliseconds per call of `call` over `iters` back-to-back calls after 3 warm-up calls; graph: one CUDA graph of
// `iters` calls, replayed once to warm up and once timed. Returns -1 if graph capture fails.
template <typename F> static double time_calls(F call, cudaStream_t st, int iters, bool graph) {
  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) call();
  CUDA_OK(cudaStreamSynchronize(st));
  float ms = -1.f;
  if (!graph) {
    CUDA_OK(cudaEventRecord(e0, st));
    for (int i = 0; i < iters; ++i) call();
    CUDA_OK(cudaEventRecord(e1, st));
    CUDA_OK(cudaEventSynchronize(e1));
    CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
  } else {
    cudaGraph_t gr = nullptr;
    cudaGraphExec_t ex = nullptr;
    bool ok = cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
    if (ok) {
      for (int i = 0; i < iters; ++i) call();
      ok = cudaStreamEndCapture(st, &gr) == cudaSuccess && gr != nullptr;
    }
    if (ok) ok = cudaGraphInstantiate(&ex, gr, 0) == cudaSuccess;
    if (ok) {
      CUDA_OK(cudaGraphLaunch(ex, st));
      CUDA_OK(cudaEventRecord(e0, st));
      CUDA_OK(cudaGraphLaunch(ex, st));
      CUDA_OK(cudaEventRecord(e1, st));
      CUDA_OK(cudaEventSynchronize(e1));
      CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
    } else {
      cudaGetLastError();
      ms = -static_cast<float>(iters);
    }
    if (ex) cudaGraphExecDestroy(ex);
    if (gr) cudaGraphDestroy(gr);
  }
  CUDA_OK(cudaEventDestroy(e0));
  CUDA_OK(cudaEventDestroy(e1));
  return ms / iters;
}

int main(int argc, char** argv) {
  bool emulate_only = false, check_only = false;
  int iters = 20, only_n = 0, only_m = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--emulate") emulate_only = true;
    else if (a == "--check") check_only = true;
    else if (a == "--iters" && i + 1 < argc) iters = std::max(1, std::atoi(argv[++i]));
    else if (a == "--n" && i + 1 < argc) only_n = std::atoi(argv[++i]);
    else if (a == "--m" && i + 1 < argc) only_m = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--emulate | --check] [--iters K] [--n N] [--m M]\n", argv[0]);
      return 2;
    }
  }
  bool all_ok = true;

  // 1. Host emulation on odd shapes (R not a multiple of BM or 16, C not a multiple of 8M or M, N not a multiple
  //    of BN or 8, Kc < STAGES - 1).
  {
    struct Shape { int R, C, N; };
    const Shape shapes[] = {{333, 1003, 150}, {200, 40, 5}};
    for (const Shape& sh : shapes)
      for (int M : {8, 5}) {
        const Geo g = make_geo(sh.R, sh.C, sh.N, M);
        const Canon w = make_weight(sh.R, sh.C, M, 11 + M);
        const Packed pk = pack(w, g);
        std::vector<uint16_t> x, xt;
        make_x(sh.N, sh.C, 99, x, xt, g.Np);
        for (const Variant& v : kVariants) {
          const EmuStats st = v.emulate(g, pk, xt, w, x);
          std::printf("emulate %-18s %4dx%-5d N=%-4d M=%d: max rel err %.2e, ldmatrix %.2f wavefronts/phase  %s\n", v.name,
                      sh.R, sh.C, sh.N, M, st.max_rel, st.phases ? static_cast<double>(st.wavefronts) / st.phases : 0.0,
                      st.ok ? "ok" : "FAILED");
          all_ok &= st.ok;
        }
      }
  }
  if (emulate_only) return all_ok ? 0 : 1;

  // 2. GPU.
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: emulation only\n");
    return 2;
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  int clock_khz = 0;
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  std::printf("device %s, %d SMs, sm_%d%d, %.0f MHz, L2 %d MB, smem opt-in %zu KB\n", prop.name, prop.multiProcessorCount,
              prop.major, prop.minor, clock_khz / 1e3, prop.l2CacheSize >> 20, prop.sharedMemPerBlockOptin >> 10);
  for (const Variant& v : kVariants) {
    CUDA_OK(v.setup());
    int per_sm = 0;
    CUDA_OK(v.occupancy(&per_sm));
    const Geo g8 = make_geo(v.bm, 64, kBN, 8), g5 = make_geo(v.bm, 40, kBN, 5);  // one CTA, one k-step
    std::printf("  %-18s %3d threads, %6d B shared memory, %d CTA(s)/SM; bytes into the SM per CTA k-step: M=8 %.0f, "
                "M=5 %.0f\n", v.name, v.threads, v.smem, per_sm, v.bytes(g8) - 2.0 * kBN * v.bm,
                v.bytes(g5) - 2.0 * kBN * v.bm);
  }
  std::fflush(stdout);
  cudaStream_t st;
  CUDA_OK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  Dense blas;
  unsigned long long* dbad = nullptr;
  CUDA_OK(cudaMalloc(&dbad, sizeof(unsigned long long)));

  auto run_checked = [&](Case& cs, const Variant* v) {  // poison, one launch, check
    CUDA_OK(cudaMemsetAsync(cs.p.y, 0xFF, static_cast<size_t>(cs.g.N) * cs.g.R * 2, st));
    if (v) CUDA_OK(v->launch(cs.p, st));
    else if (!blas.run(cs, st)) return true;  // built without cuBLAS: nothing to check
    CUDA_OK(cudaStreamSynchronize(st));
    return check_y(cs, v ? v->name : "cuBLAS", dbad);
  };

  // 2a. Correctness on odd shapes.
  {
    struct Shape { int R, C, N; };
    const Shape shapes[] = {{333, 1003, 777}, {1000, 4099, 130}, {200, 40, 1}, {4096, 4096, 300}};
    int failed = 0, ran = 0;
    for (const Shape& sh : shapes)
      for (int M : {8, 5}) {
        Case cs;
        build_case(cs, sh.R, sh.C, sh.N, M, 5 + sh.R + M, 2048);
        for (const Variant& v : kVariants) failed += !run_checked(cs, &v), ++ran;
        failed += !run_checked(cs, nullptr), ++ran;
        free_case(cs);
      }
    std::printf("odd-shape checks: %d of %d passed\n", ran - failed, ran);
    std::fflush(stdout);
    all_ok &= failed == 0;
  }
  if (check_only) return all_ok ? 0 : 1;

  // 3. Timed sweep.
  struct Shape { int R, C; };
  const Shape shapes[] = {{4096, 4096}, {11008, 4096}, {4096, 11008}, {8192, 8192}};
  std::printf("\ntimes: mean of %d back-to-back launches after warm-up (eager) and in one CUDA graph; TFLOP/s = 2*R*C*N/t\n"
              "(dense-equivalent, eager); 'SM MB' = estimated bytes into the SMs (L2 -> shared) + y; window/gather = time\n"
              "ratio at the same BM (< 1: window faster); x cuBLAS = cuBLAS time / ours\n", iters);
  std::printf("%-13s %5s %2s %-18s %9s %9s %8s %8s %7s %9s %8s\n", "R x C", "N", "M", "kernel", "ms", "graph ms", "TFLOP/s",
              "SM MB", "TB/s", "x cuBLAS", "win/gath");
  for (const Shape& sh : shapes)
    for (int N : {2048, 8192}) {
      if (only_n && N != only_n) continue;
      for (int M : {8, 5}) {
        if (only_m && M != only_m) continue;
        Case cs;
        build_case(cs, sh.R, sh.C, N, M, 17 + sh.R + sh.C + M, 1024);
        const double flop = 2.0 * sh.R * sh.C * N;
        char label[32];
        std::snprintf(label, sizeof label, "%dx%d", sh.R, sh.C);
        all_ok &= run_checked(cs, nullptr);
        const bool have_dense = blas.run(cs, st);
        const double tb = have_dense ? time_calls([&] { blas.run(cs, st); }, st, iters, false) : 0.0;
        const double tbg = have_dense ? time_calls([&] { blas.run(cs, st); }, st, iters, true) : 0.0;
        if (have_dense)
          std::printf("%-13s %5d %2d %-18s %9.4f %9.4f %8.1f %8s %7s %9s %8s\n", label, N, M, "cuBLAS dense", tb, tbg,
                      flop / tb * 1e-9, "-", "-", "1.00", "-");
        double t_gather[2] = {0, 0}, best_g = 1e30, best_w = 1e30;
        for (const Variant& v : kVariants) {
          const bool ok = run_checked(cs, &v);
          all_ok &= ok;
          const double t = time_calls([&] { CUDA_OK(v.launch(cs.p, st)); }, st, iters, false);
          const double tg = time_calls([&] { CUDA_OK(v.launch(cs.p, st)); }, st, iters, true);
          const double bytes = v.bytes(cs.g);
          const int bi = v.bm == 128 ? 0 : 1;
          char ratio[16] = "-";
          if (!v.window) t_gather[bi] = t, best_g = std::min(best_g, t);
          else {
            best_w = std::min(best_w, t);
            if (t_gather[bi] > 0) std::snprintf(ratio, sizeof ratio, "%.3f", t / t_gather[bi]);
          }
          char vs_dense[16] = "-";
          if (have_dense) std::snprintf(vs_dense, sizeof vs_dense, "%.2f", tb / t);
          std::printf("%-13s %5d %2d %-18s %9.4f %9.4f %8.1f %8.1f %7.2f %9s %8s%s\n", label, N, M, v.name, t, tg,
                      flop / t * 1e-9, bytes * 1e-6, bytes / t * 1e-9, vs_dense, ratio, ok ? "" : "  CHECK FAILED");
        }
        std::printf("%-13s %5d %2d best window / best gather: %.3f (speedup %.2fx)\n", label, N, M, best_w / best_g,
                    best_g / best_w);
        std::fflush(stdout);
        free_case(cs);
      }
    }
  std::printf("%s\n", all_ok ? "all checks passed" : "SOME CHECKS FAILED");
  return all_ok ? 0 : 1;
}
