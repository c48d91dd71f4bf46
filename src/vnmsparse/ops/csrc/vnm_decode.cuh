// Decode kernel (N <= 16 tokens): memory-bound. Streams the packed weight (values + 2:4 metadata + kept
// column indices) exactly once and gathers the activations each sparse MMA needs straight from x by
// column index. No transpose of x anywhere.
//
// Per warp and 8-group chunk (k = 32 kept columns): lane l loads kept column l's index (one coalesced
// 128-byte load), then x[n][col_l] for every token n: one warp instruction reads one token row, and the 32
// kept columns of a chunk of an unpermuted weight lie within 8*M consecutive columns, so it touches one or
// two cache lines. The values go through a small per-warp shared-memory tile [n][k] and come back as the
// B fragments with ldmatrix. Each warp owns ROWS 16-row tiles of one V-row block, so one gather serves
// ROWS MMAs and x is read from L2 ROWS times less often.
//
// Streaming: each warp keeps STAGES chunks of its weight records in flight in a private cp.async ring in
// shared memory, and gathers the activations of chunk i+1 while it multiplies chunk i.
//
// Work split: CTA = ROWS*16 rows x a k range; its warps split the range; blockIdx.y splits k across CTAs
// (so small R still fills the GPU). Partial sums meet in shared memory, then (gridDim.y > 1) in a global
// fp32 workspace; the last CTA of a row group to arrive (atomic counter, reset by it) sums the partials in a
// fixed order, so results do not depend on scheduling.
#pragma once

#include "vnm_common.cuh"

namespace vnm {

// Checks and derived constants for a decode tile traits struct (generated; see instantiations.py):
//   N_TILES: 8-token MMA tiles (1: N <= 8, 2: N <= 16)
//   ROWS:    16-row tiles per warp (all in one V-row block: the host only picks ROWS <= V/16)
//   WARPS:   warps per CTA, splitting the CTA's k chunks
//   STAGES:  per-warp cp.async ring depth: k chunks of weights in flight per warp
template <typename Tile> struct DecodeShape {
  static constexpr int kNTiles = Tile::N_TILES;
  static constexpr int kRows = Tile::ROWS;
  static constexpr int kWarps = Tile::WARPS;
  static constexpr int kStages = Tile::STAGES;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMaxN = 8 * kNTiles;
  static constexpr int kPitch = 40;  // staged token row: 32 kept columns + 8 pad (80 bytes: ldmatrix conflict-free)
  // One ring stage = one chunk of this warp's rows: A records, metadata, the 32 kept-column indices.
  static constexpr int kValBytes = kRows * 512;
  static constexpr int kMetaBytes = kRows * 64;
  static constexpr int kColBytes = 128;
  static constexpr int kStageBytes = kValBytes + kMetaBytes + kColBytes;
  static constexpr int kPiecesPerStage = kStageBytes / 16;
  static constexpr int kXBytes = kMaxN * kPitch * 2;  // gathered activations [n][k]
  static constexpr int kWarpBytes = kStages * kStageBytes + kXBytes;
  static constexpr int kOutputs = 16 * kRows * kMaxN;  // outputs of one CTA
  static constexpr int kPerThread = (kOutputs + kThreads - 1) / kThreads;
  static constexpr int kRedBytes = kWarps * kRows * kNTiles * 4 * 32 * 4;
  static constexpr int kSmemBytes = kWarps * kWarpBytes > kRedBytes ? kWarps * kWarpBytes : kRedBytes;
  static_assert(kNTiles == 1 || kNTiles == 2, "decode N_TILES must be 1 or 2 (N <= 16 tokens)");
  static_assert(kRows == 1 || kRows == 2 || kRows == 4, "decode ROWS must be 1, 2 or 4 (ROWS*16 <= V)");
  static_assert(kWarps >= 1 && kWarps <= 16, "decode WARPS must be in 1..16");
  static_assert(kStages >= 2 && kStages <= 8, "decode STAGES must be in 2..8");
  static_assert(kStageBytes % 16 == 0 && kWarpBytes % 16 == 0, "ring stages must stay 16-byte aligned");
  static_assert(2 * kSmemBytes <= 227 * 1024, "two CTAs per SM must fit in shared memory");
};

template <typename Tile, typename T>
__global__ void __launch_bounds__(DecodeShape<Tile>::kThreads, 2) vnm_decode_kernel(const VnmParams p) {
  using S = DecodeShape<Tile>;
  constexpr int NT = S::kNTiles, MT = S::kRows, ST = S::kStages;
  extern __shared__ __align__(16) unsigned char smem[];
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
  const int kbeg = cbeg + warp * per_warp;
  const int nk = max(0, min(cend, kbeg + per_warp) - kbeg);  // chunks of this warp

  unsigned char* wsm = smem + warp * S::kWarpBytes;
  const uint32_t wbase = smem_addr(wsm);
  uint16_t* xs = reinterpret_cast<uint16_t*>(wsm + ST * S::kStageBytes);
  const uint32_t xs_addr = wbase + ST * S::kStageBytes;
  // Token rows N..8*NT-1 of the gathered tile are never written below: zero them (their MMA columns are
  // discarded, but they must not be uninitialized reads).
  for (int i = lane; i < S::kMaxN * S::kPitch; i += 32) xs[i] = 0;

  // Copy chunk kc of this warp's rows into ring stage s (16-byte pieces spread over the lanes).
  auto issue = [&](int kc, int s) {
    const uint32_t dst0 = wbase + s * S::kStageBytes;
#pragma unroll
    for (int i = 0; i < (S::kPiecesPerStage + 31) / 32; ++i) {
      const int q = lane + 32 * i;
      if (q < MT * 32) {
        const int mt = mt0 + q / 32;
        const bool ok = mt < p.Rt;
        cp_async_cg16(dst0 + q * 16, p.a_vals + (static_cast<size_t>(ok ? mt : 0) * p.Kc + kc) * 32 + (q & 31), ok);
      } else if (q < MT * 36) {
        const int r = q - MT * 32;
        const int mt = mt0 + r / 4;
        const bool ok = mt < p.Rt;
        cp_async_cg16(dst0 + q * 16, p.a_meta + (static_cast<size_t>(ok ? mt : 0) * p.Kc + kc) * 16 + (r & 3) * 4, ok);
      } else if (q < S::kPiecesPerStage) {
        const int r = q - MT * 36;
        cp_async_cg16(dst0 + q * 16, p.cols + (static_cast<size_t>(blk) * p.Gp + 8 * kc) * 4 + r * 4, true);
      }
    }
  };
  // Gather x[n][kept column `lane`] of the chunk in stage s: one token row per warp instruction.
  const uint16_t* x16 = static_cast<const uint16_t*>(p.x);
  auto gather = [&](int s, uint32_t (&v)[S::kMaxN]) {
    const int col = static_cast<int>(lds32(wbase + s * S::kStageBytes + S::kValBytes + S::kMetaBytes + lane * 4));
#pragma unroll
    for (int n = 0; n < S::kMaxN; ++n)
      if (n < p.N) v[n] = ldg_u16(x16 + static_cast<size_t>(n) * p.ldx + col);
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][nt][i] = 0.f;

  // Ring prologue: chunks 0..STAGES-1 in flight, then the first gather.
#pragma unroll
  for (int s = 0; s < ST; ++s) {
    if (s < nk) issue(kbeg + s, s);
    cp_async_commit();
  }
  uint32_t xv[S::kMaxN], xn[S::kMaxN];
#pragma unroll
  for (int n = 0; n < S::kMaxN; ++n) xv[n] = xn[n] = 0;
  cp_async_wait<ST - 1>();
  __syncwarp();
  if (nk > 0) gather(0, xv);

  // ldmatrix (non-transposed): lanes 8j..8j+7 point at token rows 0..7 (of an n-tile), k columns 8j..8j+7.
  const uint32_t ld_addr = xs_addr + ((lane & 7) * S::kPitch + (lane >> 3) * 8) * 2;
  for (int i = 0; i < nk; ++i) {
    const int s = i % ST;
    cp_async_wait<ST - 2>();  // chunk i+1 has landed too
    __syncwarp();
    if (i + 1 < nk) gather((i + 1) % ST, xn);  // its latency overlaps chunk i's MMAs
    // Chunk i: activations (gathered one step ago) -> [n][k] tile -> B fragments.
#pragma unroll
    for (int n = 0; n < S::kMaxN; ++n)
      if (n < p.N) xs[n * S::kPitch + lane] = static_cast<uint16_t>(xv[n]);
    __syncwarp();
    uint32_t b[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) ldmatrix_x4(b[nt], ld_addr + nt * 8 * S::kPitch * 2);
    const uint32_t st = wbase + s * S::kStageBytes;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      const uint4 v = lds128(st + (mi * 32 + lane) * 16);
      const uint32_t e = lds32(st + S::kValBytes + (mi * 16 + gid * 2 + (t & 1)) * 4);
      const uint32_t a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) MmaSp<T>::run(acc[mi][nt], a, b[nt], e);
    }
    __syncwarp();  // every lane is done with stage s and the [n][k] tile
    if (i + ST < nk) issue(kbeg + i + ST, s);
    cp_async_commit();
#pragma unroll
    for (int n = 0; n < S::kMaxN; ++n) xv[n] = xn[n];
  }
  cp_async_wait<0>();

  // Reduce the warps: red[warp][mi][nt][i][lane] (reuses the ring memory).
  __syncthreads();
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
  float part[S::kPerThread];
#pragma unroll
  for (int j = 0; j < S::kPerThread; ++j) {
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
    // Publish this CTA's partial; the last CTA of the row group to arrive finishes, in a fixed order.
    float* ws = p.ws + static_cast<size_t>(mg) * gridDim.y * S::kOutputs;
#pragma unroll
    for (int j = 0; j < S::kPerThread; ++j) {
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
    for (int j = 0; j < S::kPerThread; ++j) {
      const int o = threadIdx.x + j * S::kThreads;
      if (o < S::kOutputs) {
        float sum = 0.f;
        for (int ks = 0; ks < static_cast<int>(gridDim.y); ++ks) sum += __ldcg(ws + static_cast<size_t>(ks) * S::kOutputs + o);
        part[j] = sum;
      }
    }
    if (threadIdx.x == 0) p.counters[mg] = 0;  // ready for the next launch (and CUDA-graph replays)
  }

  uint16_t* y16 = static_cast<uint16_t*>(p.y);
  const uint16_t* b16 = static_cast<const uint16_t*>(p.bias);
#pragma unroll
  for (int j = 0; j < S::kPerThread; ++j) {
    const int o = threadIdx.x + j * S::kThreads;
    const int row = mt0 * 16 + o % kRowsCta, n = o / kRowsCta;
    if (o < S::kOutputs && row < p.R && n < p.N) {
      float sum = part[j];
      if (b16 != nullptr) sum += Elem<T>::to_float(b16[row]);
      y16[static_cast<size_t>(n) * p.ldy + row] = Elem<T>::from_float(sum);
    }
  }
}

// Launch with gridDim.y = p.ksplit k slices; p.ws / p.counters must be set when ksplit > 1.
template <typename Tile, typename T>
cudaError_t launch_decode(const VnmParams& p, cudaStream_t stream) {
  using S = DecodeShape<Tile>;
  if (p.N > S::kMaxN || S::kRows * 16 > p.V) return cudaErrorInvalidValue;
  if (p.Rt == 0 || p.N == 0) return cudaSuccess;
  const int groups = (p.Rt + S::kRows - 1) / S::kRows;
  const int ks = p.ksplit > 1 ? p.ksplit : 1;
  if (ks > 1 && (p.ws == nullptr || p.counters == nullptr)) return cudaErrorInvalidValue;
  auto kernel = vnm_decode_kernel<Tile, T>;
  // Raise the dynamic shared-memory limit once per device (not per call: keeps CUDA-graph capture clean).
  static bool configured[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 64 || !configured[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
    if (err != cudaSuccess) return err;
    if (dev < 64) configured[dev] = true;
  }
  kernel<<<dim3(groups, ks), S::kThreads, S::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vnm
