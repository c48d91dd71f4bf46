// Decode kernel (N <= 16 tokens): memory-bound. Streams the packed weight (values + 2:4 metadata + kept
// column indices) exactly once and gathers the few activation values each sparse MMA needs straight from
// x by column index (x is tiny and stays in L1/L2). No transpose of x anywhere.
//
// Work split: one CTA per 16-row tile of W; its warps split the k chunks (8 groups = 32 kept columns each)
// and meet in shared memory for one fp32 reduction. Each chunk is one mma.sp.m16n8k32 per 8 tokens.
#pragma once

#include "vnm_common.cuh"

namespace vnm {

// Checks and derived constants for a decode tile traits struct (generated; see instantiations.py):
//   N_TILES: 8-token MMA tiles per CTA (1 or 2: N <= 8 or N <= 16)
//   WARPS:   warps per CTA, splitting the k chunks of one 16-row tile
//   UNROLL:  k chunks each warp has in flight per step (loads issued before the first MMA)
template <typename Tile> struct DecodeShape {
  static constexpr int kNTiles = Tile::N_TILES;
  static constexpr int kWarps = Tile::WARPS;
  static constexpr int kUnroll = Tile::UNROLL;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMaxN = 8 * kNTiles;
  static constexpr int kOutputs = 16 * kMaxN;  // outputs of one CTA: 16 rows x 8*N_TILES tokens
  static_assert(kNTiles == 1 || kNTiles == 2, "decode N_TILES must be 1 or 2 (N <= 16 tokens)");
  static_assert(kWarps >= 1 && kWarps <= 16, "decode WARPS must be in 1..16");
  static_assert(kUnroll >= 1 && kUnroll <= 8, "decode UNROLL must be in 1..8");
  static_assert(kOutputs <= kThreads * 4, "decode reduction assumes at most 4 outputs per thread");
};

template <typename Tile, typename T>
__global__ void __launch_bounds__(DecodeShape<Tile>::kThreads)
    vnm_decode_kernel(const VnmParams p) {
  using S = DecodeShape<Tile>;
  constexpr int NT = S::kNTiles;
  constexpr int U = S::kUnroll;

  const int mt = blockIdx.x;  // 16-row tile of W
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2;
  const int t = lane & 3;
  const int blk = (mt * 16) / p.V;  // V is a multiple of 16: the whole tile lies in one row block

  // Contiguous k range per warp.
  const int per_warp = (p.Kc + S::kWarps - 1) / S::kWarps;
  const int kbeg = warp * per_warp;
  const int kend = min(p.Kc, kbeg + per_warp);

  const uint4* a_ptr = p.a_vals + static_cast<size_t>(mt) * p.Kc * 32 + lane;
  const uint32_t* e_ptr = p.a_meta + static_cast<size_t>(mt) * p.Kc * 16 + gid * 2 + (t & 1);
  // Lane t's B fragment needs, per chunk, slots {2(t&1), 2(t&1)+1} of groups 2j + (t>>1), j = 0..3.
  const int* c_ptr = p.cols + static_cast<size_t>(blk) * p.Gp * 4 + (t >> 1) * 4 + (t & 1) * 2;

  const uint16_t* x16 = static_cast<const uint16_t*>(p.x);
  const uint16_t* xrow[NT];
  bool xvalid[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int n = gid + 8 * nt;
    xvalid[nt] = n < p.N;
    xrow[nt] = x16 + static_cast<size_t>(xvalid[nt] ? n : 0) * p.ldx;
  }

  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;

  for (int k0 = kbeg; k0 < kend; k0 += U) {
    uint4 av[U];
    uint32_t ev[U];
    int2 ci[U][4];
    // All weight-stream loads of this step first, so U chunks are in flight at once.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kc = k0 + u;
      if (kc < kend) {
        av[u] = ldg_stream(a_ptr + static_cast<size_t>(kc) * 32);
        ev[u] = ldg_u32(e_ptr + static_cast<size_t>(kc) * 16);
#pragma unroll
        for (int j = 0; j < 4; ++j) ci[u][j] = ldg_int2(c_ptr + static_cast<size_t>(8 * kc + 2 * j) * 4);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k0 + u < kend) {
        const uint32_t a[4] = {av[u].x, av[u].y, av[u].z, av[u].w};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t b[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint32_t lo = xvalid[nt] ? ldg_u16(xrow[nt] + ci[u][j].x) : 0u;
            const uint32_t hi = xvalid[nt] ? ldg_u16(xrow[nt] + ci[u][j].y) : 0u;
            b[j] = lo | (hi << 16);
          }
          MmaSp<T>::run(acc[nt], a, b, ev[u]);
        }
      }
    }
  }

  // Reduce the warps' partial sums: red[warp][nt][i][lane].
  __shared__ float red[S::kWarps][NT][4][32];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][nt][i][lane] = acc[nt][i];
  __syncthreads();

  uint16_t* y16 = static_cast<uint16_t*>(p.y);
  const uint16_t* b16 = static_cast<const uint16_t*>(p.bias);
  for (int o = threadIdx.x; o < S::kOutputs; o += S::kThreads) {
    const int row_l = o & 15;  // consecutive threads write consecutive rows of one token: coalesced
    const int n = o >> 4;
    const int src_lane = (row_l & 7) * 4 + ((n & 7) >> 1);
    const int i = (row_l >> 3) * 2 + (n & 1);
    const int nt = n >> 3;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) s += red[w][nt][i][src_lane];
    const int row = mt * 16 + row_l;
    if (row < p.R && n < p.N) {
      if (b16 != nullptr) s += Elem<T>::to_float(b16[row]);
      y16[static_cast<size_t>(n) * p.ldy + row] = Elem<T>::from_float(s);
    }
  }
}

template <typename Tile, typename T>
cudaError_t launch_decode(const VnmParams& p, cudaStream_t stream) {
  using S = DecodeShape<Tile>;
  if (p.N > S::kMaxN) return cudaErrorInvalidValue;
  if (p.Rt == 0 || p.N == 0) return cudaSuccess;
  vnm_decode_kernel<Tile, T><<<p.Rt, S::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vnm
