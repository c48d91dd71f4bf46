// Tensor-core kernel (larger N): y^T = W x^T with W V:N:M-compressed, on mma.sp.m16n8k32 (sm_80+).
//
//   A = packed W fragments (16 rows x 8 groups per 512-byte record), copied to shared memory with cp.async.
//   B = for each row block of the CTA, the 32 kept activation columns of the current 8-group chunk:
//       rows of x^T gathered by column index with 16-byte cp.async while they are copied.
//   Per stage one 8-group chunk (k = 32 kept columns); STAGES-deep cp.async pipeline; the column indices
//   of the next stage are prefetched into registers one stage ahead, so gathers never wait on them.
//   Epilogue: accumulators (+ bias) -> shared memory -> coalesced 16-byte stores of y (N, R).
//   Split-k (p.ksplit > 1, blockIdx.z = k slice): when the (rows x tokens) tile grid alone would leave SMs idle
//   (serving batches: N = 17..1024 gives few token tiles), each CTA multiplies one slice of the k chunks and
//   publishes its fp32 accumulators to p.ws; the last CTA of a tile to arrive (arrival counter, reset by it) sums
//   the slices in slice order, so the result does not depend on which CTA finished last, then runs the epilogue.
//
// x^T (C x Np, zero-padded to a multiple of 8 tokens) is written first by launch_transpose (vnm_transpose.cu).
#pragma once

#include "vnm_common.cuh"

namespace vnm {

// Checks and derived constants for a tensor-core tile traits struct (generated from ops/variants.py by ops/codegen.py):
//   V:        rows per V:N:M block the kernel is built for
//   BM, BN:   rows of W and tokens per CTA
//   WARPS_M, WARPS_N: warp grid; each warp owns a (BM/WARPS_M) x (BN/WARPS_N) sub-tile
//   STAGES:   cp.async pipeline depth (k chunks in flight)
//   MIN_CTAS: CTAs per SM the register allocation must allow (__launch_bounds__)
template <typename Tile> struct GemmShape {
  static constexpr int kV = Tile::V;
  static constexpr int kBM = Tile::BM;
  static constexpr int kBN = Tile::BN;
  static constexpr int kWarpsM = Tile::WARPS_M;
  static constexpr int kWarpsN = Tile::WARPS_N;
  static constexpr int kStages = Tile::STAGES;
  static constexpr int kMinCtas = Tile::MIN_CTAS;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWM = kBM / kWarpsM;       // rows per warp
  static constexpr int kWN = kBN / kWarpsN;       // tokens per warp
  static constexpr int kMT = kWM / 16;            // m16 tiles per warp
  static constexpr int kNT = kWN / 8;             // n8 tiles per warp
  static constexpr int kBlocks = kBM >= kV ? kBM / kV : 1;   // row blocks per CTA
  static constexpr int kMTPerBlock = kV >= kWM ? kMT : kV / 16;  // m16 tiles of one warp sharing a block
  static constexpr int kPieces = kBN / 8;         // 16-byte pieces per gathered row
  // Shared memory per stage.
  static constexpr int kABytes = kBM * 32;        // (BM/16) records x 512 bytes
  static constexpr int kEBytes = kBM * 4;         // (BM/16) x 16 metadata words
  static constexpr int kBBytes = kBlocks * 32 * kBN * 2;
  static constexpr int kStageBytes = kABytes + kEBytes + kBBytes;
  static constexpr int kOutPitch = kBM + 8;       // epilogue staging row pitch (elements)
  static constexpr int kOutBytes = kBN * kOutPitch * 2;
  // Column-index ring: chunk j's indices (32 per row block) in slot j % STAGES, after the stages and the epilogue tile.
  static constexpr int kColRingOffset = kStageBytes * kStages > kOutBytes ? kStageBytes * kStages : kOutBytes;
  static constexpr int kColRingBytes = kStages * kBlocks * 32 * 4;
  static constexpr int kSmemBytes = kColRingOffset + kColRingBytes;
  static constexpr int kBPiecesPerThread = kBlocks * 32 * kPieces / kThreads;
  static constexpr int kAPiecesPerThread = (kBM * 2 + kThreads - 1) / kThreads;

  static_assert(kV == 16 || kV == 32 || kV == 64 || kV == 128, "V must be 16, 32, 64 or 128");
  static_assert(kBM % 16 == 0 && kWM % 16 == 0, "rows per warp must be a multiple of the mma M (16)");
  static_assert(kBM % kV == 0 || kV % kBM == 0, "BM and V must divide one another (a CTA holds whole blocks or part of one)");
  static_assert(kV >= kWM ? true : kWM % kV == 0, "a warp's rows must hold whole blocks when V is smaller");
  static_assert(kWN % 8 == 0, "tokens per warp must be a multiple of the mma N (8)");
  static_assert(kPieces >= 8 && (kPieces & (kPieces - 1)) == 0, "BN must be a power of two >= 64 (xor swizzle over 8 pieces)");
  static_assert((kBlocks * 32 * kPieces) % kThreads == 0, "gathered pieces must split evenly over the threads");
  static_assert(kStages >= 2 && kStages <= 8, "STAGES must be in 2..8");
  static_assert((kBM / 16) * 4 <= kThreads, "metadata copy assumes one 16-byte piece per thread at most");
  static_assert(kBlocks * 8 <= kThreads && kColRingOffset % 16 == 0, "column-index copy: one 16-byte piece per thread");
  static_assert(kBM % 8 == 0, "epilogue writes 8-row pieces");
};

template <typename Tile, typename T>
__global__ void __launch_bounds__(GemmShape<Tile>::kThreads, GemmShape<Tile>::kMinCtas)
    vnm_gemm_kernel(const VnmParams p) {
  using S = GemmShape<Tile>;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int gid = lane >> 2, t = lane & 3;
  const int wm = warp / S::kWarpsN, wn = warp % S::kWarpsN;

  const int m0 = blockIdx.x * S::kBM;  // first row of W
  const int n0 = blockIdx.y * S::kBN;  // first token
  // This CTA's k slice: chunks [kbeg, kend) (all of them without split-k).
  const int per_slice = (p.Kc + gridDim.z - 1) / gridDim.z;
  const int kbeg = min(p.Kc, static_cast<int>(blockIdx.z) * per_slice), kend = min(p.Kc, kbeg + per_slice);
  const int mt0 = m0 / 16;
  const int blk0 = m0 / S::kV;          // first row block (the CTA may hold only part of it)

  const uint16_t* xt16 = static_cast<const uint16_t*>(p.xt);
  const uint32_t smem_base = smem_addr(smem);

  // Each k step's gather waits on a load of its column indices: bring the slice's indices of every row block
  // into L2 first, so that wait is an L2 hit rather than a DRAM round trip (at small N it is most of the time).
  if (tid < S::kBlocks && blk0 + tid < p.Bn && kend > kbeg)
    prefetch_l2_range(p.cols + (static_cast<size_t>(blk0 + tid) * p.Gp + 8 * kbeg) * 4,
                      static_cast<uint32_t>(kend - kbeg) * 32 * sizeof(int));

  auto stage_a = [&](int s) { return smem_base + s * S::kStageBytes; };
  auto stage_e = [&](int s) { return smem_base + s * S::kStageBytes + S::kABytes; };
  auto stage_b = [&](int s) { return smem_base + s * S::kStageBytes + S::kABytes + S::kEBytes; };

  // Which gathered piece each thread copies: piece q = tid + i*THREADS -> (block, k row, 16-byte piece).
  auto piece_blk = [&](int i) { return (tid + i * S::kThreads) / (32 * S::kPieces); };
  auto piece_k = [&](int i) { return ((tid + i * S::kThreads) / S::kPieces) % 32; };
  auto piece_n = [&](int i) { return (tid + i * S::kThreads) % S::kPieces; };

  auto load_cols = [&](int kc, int (&c)[S::kBPiecesPerThread]) {
#pragma unroll
    for (int i = 0; i < S::kBPiecesPerThread; ++i) {
      const int b = blk0 + piece_blk(i);
      c[i] = b < p.Bn ? __ldg(p.cols + (static_cast<size_t>(b) * p.Gp + 8 * kc) * 4 + piece_k(i)) : -1;
    }
  };

  auto issue_stage = [&](int kc, int s, const int (&c)[S::kBPiecesPerThread]) {
    // A fragments: BM/16 records of 32 x 16 bytes.
#pragma unroll
    for (int i = 0; i < S::kAPiecesPerThread; ++i) {
      const int q = tid + i * S::kThreads;
      if (q < S::kBM * 2) {
        const int mt = mt0 + q / 32;
        const bool ok = mt < p.Rt;
        const uint4* src = p.a_vals + (static_cast<size_t>(ok ? mt : 0) * p.Kc + kc) * 32 + (q & 31);
        cp_async_cg16(stage_a(s) + q * 16, src, ok);
      }
    }
    // Metadata: BM/16 records of 64 bytes (4 pieces each).
    if (tid < (S::kBM / 16) * 4) {
      const int mt = mt0 + tid / 4;
      const bool ok = mt < p.Rt;
      const uint32_t* src = p.a_meta + (static_cast<size_t>(ok ? mt : 0) * p.Kc + kc) * 16 + (tid & 3) * 4;
      cp_async_cg16(stage_e(s) + tid * 16, src, ok);
    }
    // Gathered activations: row k of block b = x^T row cols[b][kc][k], tokens n0 .. n0+BN-1.
#pragma unroll
    for (int i = 0; i < S::kBPiecesPerThread; ++i) {
      const int k = piece_k(i), pn = piece_n(i);
      const int n = n0 + pn * 8;
      const bool ok = c[i] >= 0 && n < p.Np;
      const uint16_t* src = xt16 + (ok ? static_cast<size_t>(c[i]) * p.Np + n : 0);
      const uint32_t dst = stage_b(s) + ((piece_blk(i) * 32 + k) * S::kPieces + (pn ^ (k & 7))) * 16;
      cp_async_ca16(dst, src, ok);
    }
  };

  float acc[S::kMT][S::kNT][4];
#pragma unroll
  for (int mi = 0; mi < S::kMT; ++mi)
#pragma unroll
    for (int ni = 0; ni < S::kNT; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  // Column indices: chunk kc's sit in ring slot (kc - kbeg) % STAGES. They are copied in the commit group of the
  // stage issued STAGES - 1 chunks before stage kc, so by the time stage kc is issued they have landed and its
  // gather never waits on a dependent global load (at serving N those waits were most of the time).
  const uint32_t col_ring = smem_base + S::kColRingOffset;
  auto fetch_cols = [&](int kc) {  // 16 bytes per thread: 4 of the 32 indices of row block tid / 8
    if (tid < S::kBlocks * 8 && kc < kend) {
      const int b = blk0 + tid / 8;
      const bool ok = b < p.Bn;
      cp_async_ca16(col_ring + (((kc - kbeg) % S::kStages) * S::kBlocks * 32 + tid * 4) * 4,
                    p.cols + (static_cast<size_t>(ok ? b : 0) * p.Gp + 8 * kc) * 4 + (tid % 8) * 4, ok);
    }
  };
  auto ring_cols = [&](int kc, int (&c)[S::kBPiecesPerThread]) {
#pragma unroll
    for (int i = 0; i < S::kBPiecesPerThread; ++i) {
      const uint32_t at = ((kc - kbeg) % S::kStages) * S::kBlocks * 32 + piece_blk(i) * 32 + piece_k(i);
      c[i] = blk0 + piece_blk(i) < p.Bn ? static_cast<int>(lds32(col_ring + at * 4)) : -1;
    }
  };

  // Prologue: stages 0 .. STAGES-2 of the slice (stage slot = chunk index within the slice, mod STAGES), their
  // indices loaded together first; each stage's group also copies the indices of the chunk STAGES - 1 later.
  int cfirst[S::kStages - 1][S::kBPiecesPerThread];
#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s)
    if (kbeg + s < kend) load_cols(kbeg + s, cfirst[s]);
#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    if (kbeg + s < kend) issue_stage(kbeg + s, s, cfirst[s]);
    fetch_cols(kbeg + s + S::kStages - 1);
    cp_async_commit();
  }

  for (int kc = kbeg; kc < kend; ++kc) {
    cp_async_wait<S::kStages - 2>();
    __syncthreads();  // stage kc (and chunk kc + STAGES - 1's indices) landed for everyone; slot kc-1 is free
    const int nxt = kc + S::kStages - 1;
    if (nxt < kend) {
      int c[S::kBPiecesPerThread];
      ring_cols(nxt, c);
      issue_stage(nxt, (nxt - kbeg) % S::kStages, c);
    }
    fetch_cols(nxt + S::kStages - 1);  // into the slot chunk nxt - 1's indices left (read before the barrier)
    cp_async_commit();

    const int s = (kc - kbeg) % S::kStages;
    uint32_t a[S::kMT][4], e[S::kMT];
    lds_a_fragments<S::kMT>(a, e, stage_a(s), stage_e(s), wm * S::kMT, lane);
#pragma unroll
    for (int mb = 0; mb < S::kMT; mb += S::kMTPerBlock) {
      const int blk_l = S::kBlocks == 1 ? 0 : (wm * S::kWM + mb * 16) / S::kV;
      const uint32_t brow = stage_b(s) + (blk_l * 32 + lane) * S::kPieces * 16;
#pragma unroll
      for (int ni = 0; ni < S::kNT; ++ni) {
        const int pn = (wn * S::kWN + ni * 8) / 8;
        uint32_t b[4];
        ldmatrix_x4_trans(b, brow + ((pn ^ (lane & 7)) * 16));
#pragma unroll
        for (int mi = mb; mi < mb + S::kMTPerBlock; ++mi) MmaSp<T>::run(acc[mi][ni], a[mi], b, e[mi]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  if (gridDim.z > 1) {  // split-k: the last slice of this tile to arrive finishes it
    constexpr int kFloats = S::kMT * S::kNT * 4;
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    float* ws = p.ws + static_cast<size_t>(tile) * gridDim.z * kFloats * S::kThreads;
    if (!split_k_meet(reinterpret_cast<float(&)[kFloats]>(acc), ws, blockIdx.z, gridDim.z, tid, S::kThreads,
                      p.counters + tile, [] { __syncthreads(); }))
      return;
  }

  // Epilogue: stage y^T tile as out[n][m] (+bias), then write rows of y with 16-byte stores.
  uint16_t* out = reinterpret_cast<uint16_t*>(smem);
  const uint16_t* b16 = static_cast<const uint16_t*>(p.bias);
#pragma unroll
  for (int mi = 0; mi < S::kMT; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ml = wm * S::kWM + mi * 16 + gid + 8 * h;
      const int row = m0 + ml;
      const float bias = (b16 != nullptr && row < p.R) ? Elem<T>::to_float(b16[row]) : 0.f;
#pragma unroll
      for (int ni = 0; ni < S::kNT; ++ni) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int nl = wn * S::kWN + ni * 8 + 2 * t + j;
          out[nl * S::kOutPitch + ml] = Elem<T>::from_float(acc[mi][ni][2 * h + j] + bias);
        }
      }
    }
  }
  __syncthreads();

  uint16_t* y16 = static_cast<uint16_t*>(p.y);
  const bool vec = (p.ldy % 8) == 0 && (reinterpret_cast<uintptr_t>(p.y) % 16) == 0;
  constexpr int kRowPieces = S::kBM / 8;
  for (int q = tid; q < S::kBN * kRowPieces; q += S::kThreads) {
    const int nl = q / kRowPieces, mp = q % kRowPieces;
    const int n = n0 + nl, row = m0 + mp * 8;
    if (n >= p.N || row >= p.R) continue;
    const uint16_t* src = out + nl * S::kOutPitch + mp * 8;
    uint16_t* dst = y16 + static_cast<size_t>(n) * p.ldy + row;
    if (vec && row + 8 <= p.R) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int j = 0; j < 8 && row + j < p.R; ++j) dst[j] = src[j];
    }
  }
}

template <typename Tile, typename T>
cudaError_t launch_gemm(const VnmParams& p, cudaStream_t stream) {
  using S = GemmShape<Tile>;
  if (p.V != S::kV || p.xt == nullptr) return cudaErrorInvalidValue;
  if (p.N == 0 || p.R == 0) return cudaSuccess;
  cudaError_t err = launch_transpose(p, stream);
  if (err != cudaSuccess) return err;
  auto kernel = vnm_gemm_kernel<Tile, T>;
  // Raise the dynamic shared-memory limit once per device (not per call: keeps CUDA-graph capture clean).
  static bool configured[64] = {};
  int dev = 0;
  err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 64 || !configured[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
    if (err != cudaSuccess) return err;
    if (dev < 64) configured[dev] = true;
  }
  const int ks = p.ksplit > 1 ? p.ksplit : 1;
  if (ks > 1 && (p.ws == nullptr || p.counters == nullptr)) return cudaErrorInvalidValue;
  dim3 grid((p.R + S::kBM - 1) / S::kBM, (p.N + S::kBN - 1) / S::kBN, ks);
  kernel<<<grid, S::kThreads, S::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vnm
