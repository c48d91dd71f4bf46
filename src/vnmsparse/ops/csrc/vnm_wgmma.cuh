// Tensor-core kernel for Hopper (sm_90a): y^T = W x^T on sparse wgmma (wgmma.mma_async.sp m64nNk32),
// warp-specialized. Design, budgets and the alternatives not taken: docs/kernels.md.
//
//   producer warpgroup (1): gathers, per k-step and V-row block, the 32 kept rows of x^T (tokens n0..n0+BN-1)
//       with 16-byte cp.async into a STAGES-deep ring of B tiles laid out as wgmma's MN-major 128-byte-swizzled
//       operand (vnm_sm90_layout.h). It never waits for its own copies: `cp.async.mbarrier.arrive.noinc` makes
//       the hardware arrive on the stage's `full` mbarrier when the thread's copies have landed, so up to
//       STAGES - 1 k-steps of gathers are in flight (ncu on the first version, which blocked in
//       cp.async.wait_group: L2 at 32% of peak, warps stalled on L1TEX 62% of the time: latency-bound).
//       Its first thread also loads the k-step's A by TMA into the stage: the CTA's packed 16-row records (pack.py:
//       exactly the per-warp register fragment of wgmma.sp's A operand) and metadata words, announced on `full`
//       with expect_tx. (A used to go from global memory straight into registers, a few k-steps ahead: every
//       wgmma.fence then waited for those loads. Moving A through shared memory made the window kernel 1.7x
//       faster, ncu: long-scoreboard stalls 9.2 -> 2.0 cycles per instruction, tensor pipe 36% -> 69% active.)
//   consumer warpgroups (CONSUMERS): each owns WG_M m64 tiles x BN tokens of accumulators in registers. Per
//       k-step: wait `full`, fence the generic->async proxy (the gathers were generic-proxy writes), read warp
//       w's record 4*tile + w and metadata word from shared memory (registers double-buffered: a wgmma reads
//       them asynchronously), one wgmma.sp per m64 tile (B by descriptor), commit, wait for the previous
//       k-step's group, release its stage (`empty` mbarrier).
//   epilogue: store_tile (shared with the window kernel, vnm_wgmma_window.cuh).
//
// x^T (C x Np, zero-padded to a multiple of 8 tokens) is written first by launch_transpose (vnm_transpose.cu).
// Compiled for every architecture (one kernel table), but the body exists only for sm_90a; elsewhere the
// launcher returns cudaErrorNotSupported and dispatch never picks it.
#pragma once

#include "vnm_common.cuh"
#include "vnm_sm90.cuh"
#include "vnm_sm90_layout.h"
#include "vnm_wgmma_ops.h"

namespace vnm {

#if defined(VNM_SM90A_ENABLED)
// The `full` / `empty` mbarrier ring of both sparse-wgmma kernels, initialised by thread 0 before any use.
template <int kStages>
__device__ __forceinline__ void init_ring(uint32_t full0, uint32_t empty0, uint32_t full_arrivals, uint32_t empty_arrivals) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(full0 + 8 * s, full_arrivals);
      sm90::mbar_init(empty0 + 8 * s, empty_arrivals);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();
}

// Main loop of a consumer warpgroup, both sparse-wgmma kernels. `Ring` is the kernel's shape struct; it names what
// the loop needs: kBN (tokens = the wgmma N), kWgM (m64 tiles per consumer), kStages (ring depth), kRingRecs (chunks
// of k = 32 per stage), kBTokensMajor (B tiles tokens-contiguous: the gathered kernel; else k-contiguous, as TMA
// reads x) and kBGathered (B written by the producers' cp.async, so it is fenced to the async proxy). Per stage:
// wait until it is full, read this warp's fragments and metadata words of every m64 tile mi (record j at
// a_off[mi] + 512 j, e_off[mi] + 64 j; chunks past `chunks` and rows past R get the padding metadata pair) into
// double-buffered registers (a wgmma reads them asynchronously), issue kRingRecs x kWgM sparse wgmmas with B from
// b_desc(stage, j, mi), and release the previous stage once its wgmmas retire. `pos` is the ring position of the
// first stage (the stages the CTA consumed before: a CTA of the stream-K schedule runs several segments through one
// ring). Returns with every wgmma retired, every stage released and acc final.
template <typename T, typename Ring, typename BDesc>
__device__ __forceinline__ void consume_ring(float (&acc)[Ring::kWgM][Ring::kBN / 2], int chunks, int pos, uint32_t smem,
                                             uint32_t stage_bytes, uint32_t full0, uint32_t empty0,
                                             const uint32_t (&a_off)[Ring::kWgM], const uint32_t (&e_off)[Ring::kWgM],
                                             const bool (&rows_real)[Ring::kWgM], BDesc b_desc, int lane) {
  constexpr int kBN = Ring::kBN, kWgM = Ring::kWgM, kStages = Ring::kStages, kRecs = Ring::kRingRecs;
  constexpr int kTransB = Ring::kBTokensMajor ? 1 : 0;
  constexpr bool kGenericB = Ring::kBGathered;
#pragma unroll
  for (int mi = 0; mi < kWgM; ++mi)
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) acc[mi][i] = 0.f;
  uint4 a_reg[2][kRecs][kWgM];  // stage ks's wgmmas read a_reg[ks % 2] until stage ks + 1's wait retires them
  uint32_t e_reg[2][kRecs][kWgM];
  const int steps = (chunks + kRecs - 1) / kRecs;
  // One wgmma per stage: unroll the stage pairs twice more. ptxas then notes these wgmmas serialized (C7515), yet
  // the unrolled loop is the faster one at V = 128 (docs/kernels.md, "Designs measured and dropped").
  constexpr int kUnroll = kRecs * kWgM == 1 ? 2 : 1;

#pragma unroll kUnroll
  for (int k0 = 0; k0 < steps; k0 += 2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int ks = k0 + r;
      if (ks < steps) {
        const int s = (pos + ks) % kStages;
        sm90::mbar_wait(full0 + 8 * s, ((pos + ks) / kStages) & 1);
        if constexpr (kGenericB) sm90::fence_proxy_async();  // cp.async writes, seen through the barrier, to wgmma
        const uint32_t stage = smem + s * stage_bytes;
#pragma unroll
        for (int j = 0; j < kRecs; ++j) {
          const bool real = kRecs == 1 || ks * kRecs + j < chunks;  // else the last stage may end in padding
#pragma unroll
          for (int mi = 0; mi < kWgM; ++mi) {
            a_reg[r][j][mi] = lds128(stage + a_off[mi] + j * 512);
            e_reg[r][j][mi] = real && rows_real[mi] ? lds32(stage + e_off[mi] + j * 64) : sm90::kPadMeta;
          }
        }
#pragma unroll
        for (int mi = 0; mi < kWgM; ++mi) sm90::fence_operands(acc[mi]);
        sm90::wgmma_fence();
#pragma unroll
        for (int j = 0; j < kRecs; ++j)
#pragma unroll
          for (int mi = 0; mi < kWgM; ++mi)
            WgmmaSp<T, kBN, kTransB>::run(acc[mi], a_reg[r][j][mi], b_desc(stage, j, mi), e_reg[r][j][mi]);
        sm90::wgmma_commit();
#pragma unroll
        for (int mi = 0; mi < kWgM; ++mi) sm90::fence_operands(acc[mi]);
        sm90::wgmma_wait<1>();  // the previous stage's wgmmas are done: its stage and registers are free
        if (ks > 0 && lane == 0) sm90::mbar_arrive(empty0 + 8 * ((pos + ks - 1) % kStages));
#pragma unroll
        for (int j = 0; j < kRecs; ++j)
#pragma unroll
          for (int mi = 0; mi < kWgM; ++mi) sm90::fence_fragment(a_reg[r ^ 1][j][mi], e_reg[r ^ 1][j][mi]);
      }
    }
  }
  sm90::wgmma_wait<0>();
#pragma unroll
  for (int mi = 0; mi < kWgM; ++mi) sm90::fence_operands(acc[mi]);
  if (steps > 0 && lane == 0) sm90::mbar_arrive(empty0 + 8 * ((pos + steps - 1) % kStages));
}

// Epilogue of both sparse-wgmma kernels, run by every consumer thread once its accumulators are final:
// accumulators (+ bias) -> bf16/fp16 -> stmatrix.trans into a [token][row] tile in shared memory (the B ring's
// space: every consumer is past its last wgmma first) -> 16-byte stores into y (N, R), row-major like x,
// bounds-checked on both edges. acc[mi] holds m64 tile cw * WG_M + mi of the CTA's BM rows x BN tokens.
template <int kWgM, int kBN, int kConsumers, typename T>
__device__ __forceinline__ void store_tile(float (&acc)[kWgM][kBN / 2], const VnmParams& p, unsigned char* smem_raw,
                                           uint32_t smem, int m0, int n0) {
  constexpr int kBM = 64 * kWgM * kConsumers;
  constexpr int kOutPitch = kBM + 8;  // elements; an odd number of 16-byte units keeps stmatrix conflict-free
  const int tid = threadIdx.x, cw = tid / 128 - 1, warp = (tid / 32) % 4, lane = tid % 32, gid = lane >> 2;
  sm90::named_barrier(1, 128 * kConsumers);  // every consumer is done reading the B ring
  const uint16_t* b16 = static_cast<const uint16_t*>(p.bias);
#pragma unroll
  for (int mi = 0; mi < kWgM; ++mi) {
    const int mrow = (cw * kWgM + mi) * 64 + 16 * warp;  // first row of this warp within the CTA tile
    float bias[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + mrow + gid + 8 * h;
      bias[h] = (b16 != nullptr && row < p.R) ? Elem<T>::to_float(b16[row]) : 0.f;
    }
#pragma unroll
    for (int jj = 0; jj < kBN / 16; ++jj) {
      uint32_t r[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // matrix q: rows +8 (q % 2), tokens +8 (q / 2)
        const int i = sm90::stmatrix_acc(jj, q);
        r[q] = static_cast<uint32_t>(Elem<T>::from_float(acc[mi][i] + bias[q & 1])) |
               (static_cast<uint32_t>(Elem<T>::from_float(acc[mi][i + 1] + bias[q & 1])) << 16);
      }
      const sm90::StRow st = sm90::stmatrix_row(lane, jj);
      sm90::stmatrix_x4_trans(smem + (st.n * kOutPitch + mrow + st.m) * 2, r[0], r[1], r[2], r[3]);
    }
  }
  sm90::named_barrier(1, 128 * kConsumers);

  const uint16_t* out = reinterpret_cast<const uint16_t*>(smem_raw + (smem - smem_addr(smem_raw)));
  uint16_t* y16 = static_cast<uint16_t*>(p.y);
  const bool vec = (p.ldy % 8) == 0 && (reinterpret_cast<uintptr_t>(p.y) % 16) == 0;
  constexpr int kRowPieces = kBM / 8;
  for (int q = tid - 128; q < kBN * kRowPieces; q += 128 * kConsumers) {
    const int nl = q / kRowPieces, mp = q % kRowPieces;
    const int n = n0 + nl, row = m0 + mp * 8;
    if (n >= p.N || row >= p.R) continue;
    const uint16_t* src = out + nl * kOutPitch + mp * 8;
    uint16_t* dst = y16 + static_cast<size_t>(n) * p.ldy + row;
    if (vec && row + 8 <= p.R) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int j = 0; j < 8 && row + j < p.R; ++j) dst[j] = src[j];
    }
  }
}

// Split-k meeting point of the consumer warpgroups for a segment that is part of its tile (seg.slices > 1): see
// split_k_meet (the workspace holds p.ksplit partials per tile); true in the CTA that finishes the tile, with acc
// holding the sum.
template <int kWgM, int kAcc, int kConsumers>
__device__ __forceinline__ bool split_k_finish(float (&acc)[kWgM][kAcc], const VnmParams& p, const sm90::Segment& seg) {
  constexpr int kThreads = 128 * kConsumers, kFloats = kWgM * kAcc;
  float* ws = p.ws + static_cast<size_t>(seg.tile) * p.ksplit * kFloats * kThreads;
  return split_k_meet(reinterpret_cast<float(&)[kFloats]>(acc), ws, seg.slice, seg.slices, threadIdx.x - 128, kThreads,
                      p.counters + seg.tile, [] { sm90::named_barrier(2, kThreads); });
}

// The segment `done` ring steps into this CTA's share (sm90::k_schedule over every output tile's ring steps; a ring
// step is S::kRingRecs chunks), for both sparse-wgmma kernels. Registers are scarce on both sides (the producer has
// 40, the consumers hold accumulators), so a segment is recomputed from the launch when needed, from a fresh read of
// the CTA id that the compiler cannot hoist (else it holds the share's 64-bit bounds through the loop and spills).
template <typename S>
__device__ __forceinline__ sm90::Segment share_segment(const VnmParams& p, int done) {
  const int kc = (p.Kc + S::kRingRecs - 1) / S::kRingRecs;
  const long long tiles = static_cast<long long>((p.R + S::kBM - 1) / S::kBM) * ((p.N + S::kBN - 1) / S::kBN);
  return sm90::segment_at(sm90::cta_id_volatile(), done, kc, tiles * kc, p.ctas);
}

// Between segments the consumers' epilogue borrows the ring's memory: the whole CTA meets here before the
// producer refills it.
template <typename S> __device__ __forceinline__ void next_segment() { sm90::named_barrier(3, S::kThreads); }

// The consumer warpgroups' side of a CTA's share, both sparse-wgmma kernels: per segment, the ring over its ring
// steps (consume_ring, B from b_desc), then the tile's store by whichever CTA sharing it finishes last
// (split_k_finish; the partials summed in k order), then the meeting with the producer (next_segment). The segment
// lives in `current` (shared memory) while the ring runs, so that no register beside the accumulators holds it.
template <typename T, typename S, typename BDesc>
__device__ __forceinline__ void consume_share(const VnmParams& p, unsigned char* smem_raw, uint32_t smem, uint32_t full0,
                                              uint32_t empty0, sm90::Segment& current, const uint32_t (&a_off)[S::kWgM],
                                              const uint32_t (&e_off)[S::kWgM], BDesc b_desc) {
  const int tid = threadIdx.x, cw = tid / 128 - 1, warp = (tid / 32) % 4, lane = tid % 32;
  for (int done = 0;;) {  // done: ring steps consumed so far = the ring position
    if (tid == 128) current = share_segment<S>(p, done);
    sm90::named_barrier(1, 128 * S::kConsumers);
    const int m0 = sm90::cta_tile<S::kBM, S::kBN, S::kGroupM>(smem_raw, p.R, p.N, current.tile).m0;
    bool rows_real[S::kWgM];  // false past R: TMA wrote zeros, metadata must still be a valid pair
#pragma unroll
    for (int mi = 0; mi < S::kWgM; ++mi) rows_real[mi] = m0 / 16 + (cw * S::kWgM + mi) * 4 + warp < p.Rt;
    // The segment's chunks: its last ring step may reach past the last chunk (window kernel: two chunks a step).
    const int chunks = min(current.steps * S::kRingRecs, p.Kc - current.kbeg * S::kRingRecs);
    float acc[S::kWgM][S::kAcc];
    consume_ring<T, S>(acc, chunks, done, smem, S::kStageBytes, full0, empty0, a_off, e_off, rows_real, b_desc, lane);
    const sm90::Segment seg = current;  // read again: the ring's barriers and fences ended the earlier reads
    const sm90::CtaTile tile = sm90::cta_tile<S::kBM, S::kBN, S::kGroupM>(smem_raw, p.R, p.N, seg.tile);
    if (seg.slices == 1 || split_k_finish<S::kWgM, S::kAcc, S::kConsumers>(acc, p, seg))
      store_tile<S::kWgM, S::kBN, S::kConsumers, T>(acc, p, smem_raw, smem, tile.m0, tile.n0);
    if (seg.last) break;
    done += seg.steps;
    sm90::fence_proxy_async();  // the epilogue's shared-memory accesses before the next TMA writes there
    next_segment<S>();
  }
}
#endif  // VNM_SM90A_ENABLED

// Checks and derived constants for a sparse-wgmma tile traits struct (generated from ops/variants.py by ops/codegen.py):
//   V:         rows per V:N:M block (64 or 128: one m64 wgmma tile never straddles two blocks' columns)
//   CONSUMERS: consumer warpgroups (each 128 threads); the producer warpgroup comes on top
//   WG_M:      m64 tiles per consumer warpgroup (BM = 64 * WG_M * CONSUMERS rows of W per CTA)
//   BN:        tokens per CTA = the N of every wgmma instruction
//   STAGES:    depth of the ring of stages in shared memory (gathered B tiles and A records of one k-step)
template <typename Tile> struct WgmmaShape {
  static constexpr int kV = Tile::V;
  static constexpr int kConsumers = Tile::CONSUMERS;
  static constexpr int kWgM = Tile::WG_M;
  static constexpr int kBN = Tile::BN;
  static constexpr int kStages = Tile::STAGES;
  static constexpr int kBM = 64 * kWgM * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kBlocks = kBM >= kV ? kBM / kV : 1;   // V-row blocks (distinct B tiles) per CTA
  static constexpr int kRows = 32 * kBlocks;                  // gathered rows per stage
  static constexpr int kPieces = kBN / 8;                     // 16-byte pieces per gathered row
  static constexpr int kGatherIters = sm90::gather_iters(kRows, kPieces);
  static constexpr int kBTileBytes = sm90::b_tile_bytes(kBN);
  static constexpr int kRowTiles = kBM / 16;                  // packed 16-row records per k-step
  static constexpr int kABytes = kRowTiles * 512;             // records: 32 lanes x 16 bytes
  static constexpr int kEBytes = kRowTiles * 64;              // metadata: 16 words
  static constexpr int kStageBytes =                          // B tiles, A, metadata; 1024-aligned (swizzle atoms)
      (kBlocks * kBTileBytes + kABytes + kEBytes + sm90::kAtomBytes - 1) / sm90::kAtomBytes * sm90::kAtomBytes;
  static constexpr int kOutPitch = kBM + 8;                   // epilogue [token][row] tile, padded (elements)
  static constexpr int kOutBytes = kBN * kOutPitch * 2;
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kSmemBytes = (kRingBytes > kOutBytes ? kRingBytes : kOutBytes) + sm90::kAtomBytes;  // + align
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = kConsumers == 1 ? 240 : 232;
  static constexpr int kAcc = kBN / 2;                        // fp32 accumulators per thread per m64 tile
  static constexpr int kGroupM = 16;                          // row tiles per raster group (L2 reuse)
  static constexpr int kRingRecs = 1;                         // chunks (k = 32) per ring stage
  static constexpr bool kBTokensMajor = true;                 // gathered B tiles: tokens contiguous (N-major)
  static constexpr bool kBGathered = true;                    // B written by the producers' cp.async
  // k steps whose column indices are in flight ahead of the gather that needs them (a shared-memory ring filled
  // by 4-byte cp.async): the gather of step kc then never waits on a load issued at step kc - 1.
  static constexpr int kColAhead = 8;

  static_assert(kV == 64 || kV == 128, "the sparse-wgmma kernel needs V = 64 or 128 (an m64 tile shares one block's columns)");
  static_assert(kConsumers == 1 || kConsumers == 2, "CONSUMERS must be 1 or 2 (register file: 128 threads each)");
  static_assert(kWgM == 1 || kWgM == 2, "WG_M must be 1 or 2 (accumulators live in registers)");
  static_assert(kBN % sm90::kAtomTokens == 0 && kBN <= 256, "BN must be a multiple of 64 (the swizzle atom) and <= 256 (wgmma N)");
  static_assert(kWgM * kAcc <= 128, "at most 128 fp32 accumulators per consumer thread");
  static_assert(kBM % kV == 0 || kV % kBM == 0, "BM and V must divide one another");
  static_assert(kRows <= 128, "at most 4 row blocks per CTA (a producer lane holds one row's column index)");
  static_assert(kGatherIters * (32 / kPieces) * 4 == kRows, "gathered rows must split evenly over the producer warps");
  static_assert(kStages >= 3 && kStages <= 8, "STAGES must be in 3..8 (the producer runs up to STAGES - 1 ahead)");
  static_assert(kStageBytes % sm90::kAtomBytes == 0, "stages must keep B tiles 1024-byte aligned (swizzle atoms)");
  static_assert(kSmemBytes + kColAhead * kRows * 4 <= 227 * 1024,
                "shared memory per CTA (ring, epilogue, column-index ring) exceeds the 227 KB an sm_90 block may use");
  static_assert(kOutPitch % 16 == 8, "epilogue pitch: an odd number of 16-byte units keeps stmatrix conflict-free");
};

template <typename Tile, typename T>
__global__ void __launch_bounds__(WgmmaShape<Tile>::kThreads, 1)
    vnm_wgmma_kernel(const VnmParams p, const __grid_constant__ CUtensorMap amap, const __grid_constant__ CUtensorMap emap) {
#if defined(VNM_SM90A_ENABLED)
  using S = WgmmaShape<Tile>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[S::kStages];
  __shared__ __align__(8) uint64_t empty_bar[S::kStages];
  __shared__ int col_ring[S::kColAhead * S::kRows];  // [step % kColAhead][gathered row]: kept-column indices
  __shared__ sm90::Segment current;                    // the consumers' present segment

  const int tid = threadIdx.x;
  const int wg = tid / 128;  // 0: producer, 1..CONSUMERS: consumers
  const int warp = (tid / 32) % 4, lane = tid % 32;
  const uint32_t full0 = smem_addr(full_bar), empty0 = smem_addr(empty_bar);
  const uint32_t smem = sm90::aligned_smem(smem_raw);
  // This CTA's share of all tiles' k steps (sm90::k_schedule: one slice of one tile, or stream-K), run one
  // segment (one tile's part) at a time (share_segment); producer and consumers walk the same segments through
  // one ring.

  // full: every producer thread, on its copies landing; empty: one lane per consumer warp.
  init_ring<S::kStages>(full0, empty0, 128, 4 * S::kConsumers);

  if (wg == 0) {
    // ------------------------------------------------------------------ producer: gather x^T rows
    sm90::setmaxnreg_dec<S::kProducerRegs>();
    const uint16_t* xt = static_cast<const uint16_t*>(p.xt);
    const bool owns = sm90::owned_row(warp, lane) < S::kRows;  // this lane fetches a gathered row's column indices
    constexpr int kRowsPerInstr = 32 / S::kPieces;
    constexpr uint32_t kDstStep = sm90::gather_dst_step(S::kPieces, S::kBN);
    const sm90::GatherPiece g0 = sm90::gather_piece(warp, lane, 0, S::kPieces);
    const int owner0 = g0.owner;
    const uint32_t row_bytes = 2u * static_cast<uint32_t>(p.Np);
    const uint32_t dst_base[2] = {sm90::gather_dst(warp, lane, 0, S::kPieces, S::kBN),
                                  sm90::gather_dst(warp, lane, S::kGatherIters > 1 ? 1 : 0, S::kPieces, S::kBN)};
    const uint32_t ring = smem_addr(col_ring) + sm90::owned_row(warp, lane) * 4;
    const bool loads_a = tid == 0;
    if (loads_a) {
      sm90::prefetch_tensormap(&amap);
      sm90::prefetch_tensormap(&emap);
    }
    for (int done = 0;;) {  // done: k steps gathered so far = the ring position
      const sm90::Segment seg = share_segment<S>(p, done);
      const sm90::CtaTile tile = sm90::cta_tile<S::kBM, S::kBN, S::kGroupM>(smem_raw, p.R, p.N, seg.tile);
      const int m0 = tile.m0, n0 = tile.n0, kbeg = seg.kbeg, steps = seg.steps;
      const int blk0 = m0 / S::kV;  // first V-row block of the tile (it may hold part of one when V > BM)
      const int tid_now = sm90::tid_volatile(), own_row = sm90::owned_row((tid_now / 32) % 4, tid_now % 32);
      const int own_blk = min(blk0 + own_row / 32, p.Bn - 1);  // rows past R: any valid block
      const int* own_cols = p.cols + static_cast<size_t>(own_blk) * p.Gp * 4 + own_row % 32;
      // Column indices: every block's are requested into L2 up front, then each owning lane copies its row's index
      // of step j + kColAhead into the ring while step j gathers. One commit group per step (empty for lanes that
      // own no row), so `cp_async_wait<kColAhead - 1>` at step j means step j's index has landed.
      if (warp == 0 && lane < S::kBlocks && blk0 + lane < p.Bn)
        prefetch_l2_range(p.cols + (static_cast<size_t>(blk0 + lane) * p.Gp + 8 * kbeg) * 4,
                          static_cast<uint32_t>(steps) * 32 * sizeof(int));
      auto fetch_col = [&](int j) {  // step j of the segment
        if (owns && j < steps) cp_async_ca4(ring + (j % S::kColAhead) * S::kRows * 4, own_cols + 32 * (kbeg + j));
        cp_async_commit();
      };
#pragma unroll
      for (int j = 0; j < S::kColAhead; ++j) fetch_col(j);
      // This thread's pieces: one 16-byte piece (tokens n0 + 8 * piece0 ..) of rows owner0, owner0 + RPI, ...
      const bool piece_ok = n0 + 8 * g0.piece < p.Np;  // past the padded tokens: zero-fill, read nothing
      const char* xt_n = reinterpret_cast<const char*>(xt + (piece_ok ? n0 + 8 * g0.piece : 0));
      for (int j = 0; j < steps; ++j) {  // step j of the segment: k step kc, ring position pos, stage s
        const int kc = kbeg + j, pos = done + j, s = pos % S::kStages;
        if (pos >= S::kStages) sm90::mbar_wait(empty0 + 8 * s, ((pos / S::kStages) - 1) & 1);
        cp_async_wait<S::kColAhead - 1>();
        const int col = owns ? static_cast<int>(lds32(ring + (j % S::kColAhead) * S::kRows * 4)) : 0;
        const uint32_t stage = smem + s * S::kStageBytes;
        if (loads_a) {  // announced before this thread's own copy arrival below, so the phase cannot end without it
          const uint32_t a_stage = stage + S::kBlocks * S::kBTileBytes;
          sm90::mbar_expect_tx(full0 + 8 * s, S::kABytes + S::kEBytes);
          sm90::tma_load_2d(a_stage, &amap, kc * 64, m0 / 16, full0 + 8 * s);
          sm90::tma_load_2d(a_stage + S::kABytes, &emap, kc * 16, m0 / 16, full0 + 8 * s);
        }
#pragma unroll
        for (int it = 0; it < S::kGatherIters; ++it) {
          const int c = __shfl_sync(0xffffffffu, col, owner0 + it * kRowsPerInstr);
          // One IMAD.WIDE.U32 per piece: c < C, so the row start is inside x^T (mapped even when zero-filling).
          const char* src = xt_n + static_cast<uint64_t>(static_cast<uint32_t>(c)) * row_bytes;
          cp_async_ca16(stage + dst_base[it % 2] + (it / 2) * kDstStep, src, piece_ok);
        }
        sm90::mbar_arrive_on_copies(full0 + 8 * s);  // fires when this thread's copies so far have landed
        fetch_col(j + S::kColAhead);  // into the slot just read (`col` is consumed by the shuffles above)
      }
      if (seg.last) break;
      done += steps;
      next_segment<S>();
    }
    sm90::cp_async_wait_all();  // no thread leaves with copies in flight
  } else {
    // ------------------------------------------------------------------ consumers: sparse wgmma
    sm90::setmaxnreg_inc<S::kConsumerRegs>();
    const int cw = wg - 1;
    uint32_t a_off[S::kWgM], e_off[S::kWgM];  // warp's record of m64 tile mi within a stage
    uint32_t b_off[S::kWgM];                  // byte offset of the m64 tile's B tile within a stage
#pragma unroll
    for (int mi = 0; mi < S::kWgM; ++mi) {
      const int local = cw * S::kWgM + mi;  // m64 tile within the CTA
      a_off[mi] = S::kBlocks * S::kBTileBytes + sm90::a_stage_offset(local * 4 + warp, 1, 0, lane);
      e_off[mi] = S::kBlocks * S::kBTileBytes + S::kABytes + sm90::e_stage_offset(local * 4 + warp, 1, 0, lane);
      b_off[mi] = sm90::b_tile_of(local, S::kV, S::kBM) * S::kBTileBytes;
    }
    // One chunk per stage; B: the m64 tile's V-row block's gathered tile, N-major (transposed).
    consume_share<T, S>(p, smem_raw, smem, full0, empty0, current, a_off, e_off,
                        [&](uint32_t stage, int, int mi) { return sm90::b_desc(stage + b_off[mi], S::kBN); });
  }
#endif  // VNM_SM90A_ENABLED
}

// The driver's cuTensorMapEncodeTiled, looked up once through the runtime (no link against libcuda).
inline decltype(&cuTensorMapEncodeTiled) tensor_map_encoder() {
  static const auto fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
    return (err == cudaSuccess && found == cudaDriverEntryPointSuccess) ? reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(f)
                                                                        : nullptr;
  }();
  return fn;
}

// Tensor map of a packed array viewed as Rt rows of `row_units` units of `unit_bytes` (8: records, 4: metadata),
// in boxes of [box_rows row tiles x `box_units`]; reads past Rt return zeros.
inline cudaError_t record_tensor_map(const void* base, int rt, int row_units, int unit_bytes, int box_units, int box_rows,
                                     CUtensorMap* map) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return cudaErrorInvalidValue;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(row_units), static_cast<cuuint64_t>(rt)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_units) * unit_bytes};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_units), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t unit[2] = {1, 1};
  const CUtensorMapDataType type = unit_bytes == 8 ? CU_TENSOR_MAP_DATA_TYPE_UINT64 : CU_TENSOR_MAP_DATA_TYPE_UINT32;
  const CUresult r = encode(map, type, 2, const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The records and metadata words of `chunks` consecutive chunks of `rows` row tiles: the A boxes of one stage.
inline cudaError_t a_tensor_maps(const VnmParams& p, int chunks, int rows, CUtensorMap* amap, CUtensorMap* emap) {
  const cudaError_t err = record_tensor_map(p.a_vals, p.Rt, p.Kc * 64, 8, chunks * 64, rows, amap);
  return err != cudaSuccess ? err : record_tensor_map(p.a_meta, p.Rt, p.Kc * 16, 4, chunks * 16, rows, emap);
}

// The device the sparse-wgmma kernels launch on, or why not: they exist for sm_90 (sm_90a) only.
inline cudaError_t sm90_device(int* dev) {
  const cudaError_t err = cudaGetDevice(dev);
  if (err != cudaSuccess) return err;
  return compute_capability(*dev) == 90 ? cudaSuccess : cudaErrorNotSupported;
}

// Launch `Kernel` on one CTA per tile with `smem` bytes of dynamic shared memory, the limit raised once per
// device (graph-capture safe: no attribute call while capturing after the first launch).
template <auto Kernel, typename... Args>
cudaError_t launch_tiles(int dev, long long tiles, int slices, int threads, int smem, cudaStream_t stream, const Args&... args) {
  static bool configured[64] = {};
  if (dev >= 64 || !configured[dev]) {
    const cudaError_t err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    if (dev < 64) configured[dev] = true;
  }
  if (tiles > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  Kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(slices)), threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

template <typename Tile, typename T>
cudaError_t launch_wgmma(const VnmParams& p, cudaStream_t stream) {
  using S = WgmmaShape<Tile>;
  if (p.V != S::kV || p.xt == nullptr) return cudaErrorInvalidValue;
  int dev = 0;
  cudaError_t err = sm90_device(&dev);
  if (err != cudaSuccess) return err;
  if (p.N == 0 || p.R == 0) return cudaSuccess;
  err = launch_transpose(p, stream);
  if (err != cudaSuccess) return err;
  CUtensorMap amap, emap;
  err = a_tensor_maps(p, 1, S::kRowTiles, &amap, &emap);
  if (err != cudaSuccess) return err;
  const long long tiles = static_cast<long long>((p.R + S::kBM - 1) / S::kBM) * ((p.N + S::kBN - 1) / S::kBN);
  VnmParams q = p;  // the binding's sm90::k_schedule, or one CTA per tile
  if (q.ctas <= 0) q.ctas = tiles, q.ksplit = 1;
  if (q.ctas != tiles && (q.ws == nullptr || q.counters == nullptr)) return cudaErrorInvalidValue;
  return launch_tiles<vnm_wgmma_kernel<Tile, T>>(dev, q.ctas, 1, S::kThreads, S::kSmemBytes, stream, q, amap, emap);
}

}  // namespace vnm
