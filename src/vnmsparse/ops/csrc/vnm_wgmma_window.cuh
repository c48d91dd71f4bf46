// Tensor-core kernel for Hopper (sm_90a) for M = 4 weights whose kept columns are their groups' own 4 columns
// (pack's `window` = 32: no input permutation folded in; every V). y^T = W x^T on sparse wgmma with no gather and
// no x^T pass: a chunk of 8 groups is 32 contiguous columns of x and its packed record already is the 2:4 A
// operand over them, so B is x itself, [BN tokens x 64 columns] tiles loaded by TMA (K-major, 128-byte swizzle)
// and shared by every row of the CTA, as in a dense GEMM. The gather kernel (vnm_wgmma.cuh) moves a per-row-block
// copy of x instead and is bound by that L2 -> SM traffic (docs/kernels.md); this one is 2.0-2.6x faster.
// Tried and measured slower (docs/kernels.md): the same for M = 8 with each record expanded into
// two 2:4 operands over its 64 columns (in the consumers' registers, or in shared memory by the producer warps),
// and 2-CTA clusters sharing x tiles by multicast.
//
//   producer warpgroup: one thread issues three TMA boxes per 64-column stage into a STAGES-deep ring: the x tile,
//       and the CTA's BM / 16 row tiles' packed records and metadata words of the stage's two chunks (A comes through
//       shared memory: a global load into registers held ahead of the wgmma made every wgmma.fence wait for it,
//       ncu: long-scoreboard stalls 9 of 16 cycles per instruction, whatever the depth of the register ring).
//       The boxes' bytes complete the stage's `full` mbarrier; parts past R or past the last chunk read as zeros.
//   consumer warpgroups: per stage, each lane reads its 16-byte fragment and metadata word of the two chunks
//       from shared memory (double-buffered registers: a wgmma reads them asynchronously), two wgmma.sp per m64
//       tile.
//   epilogue: store_tile (vnm_wgmma.cuh).
//   work split: the gathering kernel's (consume_share, share_segment): a CTA runs its share of all tiles'
//       64-column stages (one tile, a k slice of one, or stream-K) one tile segment at a time through the ring.
#pragma once

#include "vnm_wgmma.cuh"

namespace vnm {

// Checks and derived constants for a window-kernel traits struct (generated from ops/variants.py by ops/codegen.py):
//   M: group width the weights were pruned with (4); CONSUMERS, WG_M, BN as for WgmmaShape;
//   STAGES: depth of the ring of stages (an x tile of BN x 64 columns and the CTA's A records for it).
template <typename Tile> struct WgmmaWindowShape {
  static constexpr int kM = Tile::M;
  static constexpr int kConsumers = Tile::CONSUMERS;
  static constexpr int kWgM = Tile::WG_M;
  static constexpr int kBN = Tile::BN;
  static constexpr int kStages = Tile::STAGES;
  static constexpr int kBM = 64 * kWgM * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kChunksPerStage = sm90::kWindowCols / (8 * kM);  // packed records per stage: 2
  static constexpr int kRingRecs = kChunksPerStage;                      // consume_ring: chunks per stage
  static constexpr bool kBTokensMajor = false;                           // B is x's tile by TMA: k contiguous
  static constexpr bool kBGathered = false;                              // written by TMA (async proxy already)
  static constexpr int kRowTiles = kBM / 16;                             // packed 16-row records per chunk
  static constexpr int kXBytes = kBN * 128;                              // BN tokens x one 128-byte line
  static constexpr int kABytes = kRowTiles * kChunksPerStage * 512;      // records: 32 lanes x 16 bytes
  static constexpr int kEBytes = kRowTiles * kChunksPerStage * 64;       // metadata: 16 words
  static constexpr int kStageBytes = kXBytes + kABytes + kEBytes;
  static constexpr int kOutBytes = kBN * (kBM + 8) * 2;
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kSmemBytes = (kRingBytes > kOutBytes ? kRingBytes : kOutBytes) + sm90::kAtomBytes;  // + align
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = kConsumers == 1 ? 240 : 232;
  static constexpr int kAcc = kBN / 2;
  static constexpr int kGroupM = 16;

  static_assert(kM == 4, "the window kernel takes M = 4 (a packed record is then the 2:4 operand of 32 columns of x)");
  static_assert(kConsumers == 1 || kConsumers == 2, "CONSUMERS must be 1 or 2 (register file: 128 threads each)");
  static_assert(kWgM == 1 || kWgM == 2, "WG_M must be 1 or 2 (accumulators live in registers)");
  static_assert(kBN % 16 == 0 && kBN >= 16 && kBN <= 256, "BN must be a multiple of 16 in 16..256 (wgmma N, TMA box)");
  static_assert(kWgM * kAcc <= 128, "at most 128 fp32 accumulators per consumer thread");
  static_assert(kStages >= 2 && kStages <= 8, "STAGES must be in 2..8");
  static_assert(kStageBytes % sm90::kAtomBytes == 0, "stages must keep x tiles 1024-byte aligned (swizzle atoms)");
  static_assert(kRowTiles <= 256, "one TMA box carries the CTA's row tiles (at most 256 rows per box)");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA exceeds the 227 KB an sm_90 block may use");
};

template <typename Tile, typename T>
__global__ void __launch_bounds__(WgmmaWindowShape<Tile>::kThreads, 1)
    vnm_wgmma_window_kernel(const VnmParams p, const __grid_constant__ CUtensorMap xmap,
                            const __grid_constant__ CUtensorMap amap, const __grid_constant__ CUtensorMap emap) {
#if defined(VNM_SM90A_ENABLED)
  using S = WgmmaWindowShape<Tile>;
  constexpr int kRecs = S::kChunksPerStage;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[S::kStages];
  __shared__ __align__(8) uint64_t empty_bar[S::kStages];
  __shared__ sm90::Segment current;  // the consumers' present segment

  const int tid = threadIdx.x;
  const int wg = tid / 128;  // 0: producer, 1..CONSUMERS: consumers
  const int warp = (tid / 32) % 4, lane = tid % 32;
  const uint32_t full0 = smem_addr(full_bar), empty0 = smem_addr(empty_bar);
  const uint32_t smem = sm90::aligned_smem(smem_raw);
  // This CTA's share of all tiles' 64-column stages (sm90::k_schedule: the whole tile, one k slice of it, or
  // stream-K), one segment at a time, as in the gathering kernel (share_segment).

  // full: the producer's arrival (TMA completes the bytes); empty: one lane per consumer warp.
  init_ring<S::kStages>(full0, empty0, 1, 4 * S::kConsumers);

  if (wg == 0) {
    // ------------------------------------------------------------------ producer: three TMA boxes per stage
    sm90::setmaxnreg_dec<S::kProducerRegs>();
    const bool issues = tid == 0;  // the rest of the warpgroup only meets the consumers between segments
    if (issues) {
      sm90::prefetch_tensormap(&xmap);
      sm90::prefetch_tensormap(&amap);
      sm90::prefetch_tensormap(&emap);
    }
    for (int done = 0;;) {  // done: stages loaded so far = the ring position
      const sm90::Segment seg = share_segment<S>(p, done);
      if (issues) {
        const sm90::CtaTile tile = sm90::cta_tile<S::kBM, S::kBN, S::kGroupM>(smem_raw, p.R, p.N, seg.tile);
        for (int j = 0; j < seg.steps; ++j) {  // stage ks of the tile, ring position pos
          const int ks = seg.kbeg + j, pos = done + j, s = pos % S::kStages;
          if (pos >= S::kStages) sm90::mbar_wait(empty0 + 8 * s, ((pos / S::kStages) - 1) & 1);
          const uint32_t stage = smem + s * S::kStageBytes;
          sm90::mbar_arrive_expect_tx(full0 + 8 * s, S::kStageBytes);  // boxes count whole, zero-filled parts too
          sm90::tma_load_2d(stage, &xmap, ks * sm90::kWindowCols, tile.n0, full0 + 8 * s);
          sm90::tma_load_2d(stage + S::kXBytes, &amap, ks * kRecs * 64, tile.m0 / 16, full0 + 8 * s);
          sm90::tma_load_2d(stage + S::kXBytes + S::kABytes, &emap, ks * kRecs * 16, tile.m0 / 16, full0 + 8 * s);
        }
      }
      if (seg.last) break;
      done += seg.steps;
      next_segment<S>();
    }
  } else {
    // ------------------------------------------------------------------ consumers: sparse wgmma
    sm90::setmaxnreg_inc<S::kConsumerRegs>();
    const int cw = wg - 1;
    // This warp's record of m64 tile mi within a stage: row tile (cw * WG_M + mi) * 4 + warp of the CTA.
    uint32_t a_off[S::kWgM], e_off[S::kWgM];
#pragma unroll
    for (int mi = 0; mi < S::kWgM; ++mi) {
      const int rt = (cw * S::kWgM + mi) * 4 + warp;
      a_off[mi] = S::kXBytes + sm90::a_stage_offset(rt, kRecs, 0, lane);
      e_off[mi] = S::kXBytes + S::kABytes + sm90::e_stage_offset(rt, kRecs, 0, lane);
    }
    // Two chunks per stage; B for chunk j: columns 32j.. of the stage's x tile (64 bytes in), K-major, shared by
    // every m64 tile.
    consume_share<T, S>(p, smem_raw, smem, full0, empty0, current, a_off, e_off,
                        [](uint32_t stage, int j, int) { return sm90::bk_desc(stage, 64u * j); });
  }
#endif  // VNM_SM90A_ENABLED
}

// Tensor map of x (N rows of C elements, row stride ldx) in [box_tokens x 64 columns] boxes, 128-byte swizzle;
// reads past C or N return zeros. Needs x 16-byte aligned and ldx a multiple of 8 (the binding sees to it).
template <typename T> cudaError_t x_tensor_map(const VnmParams& p, int box_tokens, CUtensorMap* map) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  if (reinterpret_cast<uintptr_t>(p.x) % 16 != 0 || p.ldx % 8 != 0) return cudaErrorInvalidValue;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.C), static_cast<cuuint64_t>(p.N)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.ldx) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(sm90::kWindowCols), static_cast<cuuint32_t>(box_tokens)};
  const cuuint32_t unit[2] = {1, 1};
  const CUtensorMapDataType type =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode(map, type, 2, const_cast<void*>(p.x), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename Tile, typename T>
cudaError_t launch_wgmma_window(const VnmParams& p, cudaStream_t stream) {
  using S = WgmmaWindowShape<Tile>;
  if (p.window != 8 * S::kM) return cudaErrorInvalidValue;
  int dev = 0;
  cudaError_t err = sm90_device(&dev);
  if (err != cudaSuccess) return err;
  if (p.N == 0 || p.R == 0) return cudaSuccess;
  constexpr int kRecs = S::kChunksPerStage;
  CUtensorMap map, amap, emap;
  err = x_tensor_map<T>(p, S::kBN, &map);
  if (err == cudaSuccess) err = a_tensor_maps(p, kRecs, S::kRowTiles, &amap, &emap);
  if (err != cudaSuccess) return err;
  const long long tiles = static_cast<long long>((p.R + S::kBM - 1) / S::kBM) * ((p.N + S::kBN - 1) / S::kBN);
  VnmParams q = p;  // the binding's sm90::k_schedule over 64-column stages, or one CTA per tile
  if (q.ctas <= 0) q.ctas = tiles, q.ksplit = 1;
  if (q.ctas != tiles && (q.ws == nullptr || q.counters == nullptr)) return cudaErrorInvalidValue;
  return launch_tiles<vnm_wgmma_window_kernel<Tile, T>>(dev, q.ctas, 1, S::kThreads, S::kSmemBytes, stream, q, map, amap, emap);
}

}  // namespace vnm
