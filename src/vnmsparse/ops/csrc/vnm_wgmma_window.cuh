// Tensor-core kernel for Hopper (sm_90a) for weights whose kept columns stay inside their own group of M = 4 or 8
// columns (pack's `window` = 8M: no input permutation folded in). y^T = W x^T on sparse wgmma with no gather and
// no x^T pass: a chunk of 8 groups is 8M contiguous columns of x, so B is x itself, [BN tokens x 64 columns]
// tiles loaded by TMA (K-major, 128-byte swizzle) and shared by every row of the CTA, as in a dense GEMM. The
// price is tensor-core work: A is the weight as 2:4 over those columns (a row keeps 2 of every M >= 4 columns, so
// at most 2 in any aligned quad), twice the MMAs of the gathered kernel at M = 8, none extra at M = 4. The gather
// kernel (vnm_wgmma.cuh) is bound by its L2 -> SM traffic (bench/NOTES-wgmma.md); this one moves a dense GEMM's.
//
//   producer warpgroup: one thread issues one TMA box per 64-column stage into a STAGES-deep ring; the box's
//       bytes complete the stage's `full` mbarrier. CLUSTER = 2: two CTAs of adjacent row tiles and the same tokens
//       form a cluster; each loads half of the box and multicasts it to both, halving the L2 -> SM traffic of x
//       (the limit of the one-CTA version: its M = 4 rate fits ~21 B/clk/SM of x tiles). A stage is refilled
//       once the consumers of both CTAs released it: they arrive on both CTAs' `empty` barriers.
//   consumer warpgroups: A records straight from global memory into registers (A_RING stages ahead), as in the
//       gather kernel. M = 4: the record of chunk 2ks + j is the k32 operand j of stage ks as it is. M = 8: the
//       record of chunk ks (8 groups) becomes operands j = 0, 1 (groups 4j..4j+3) in registers: each lane takes
//       its quads' value pairs and metadata from the lanes holding them (shuffles) and places each value in the
//       quad half its kept column falls in (vnm_sm90_layout.h: window_route). Then two wgmma.sp per m64 tile.
//   epilogue: store_tile (vnm_wgmma.cuh).
#pragma once

#include "vnm_wgmma.cuh"

namespace vnm {

// Checks and derived constants for a window-kernel traits struct (generated; see instantiations.py):
//   M: group width the weights were pruned with (4 or 8); CONSUMERS, WG_M, BN, A_RING as for WgmmaShape;
//   STAGES: depth of the ring of x tiles (BN x 64 columns each); CLUSTER: CTAs sharing each x tile (1 or 2).
template <typename Tile> struct WgmmaWindowShape {
  static constexpr int kM = Tile::M;
  static constexpr int kCluster = Tile::CLUSTER;
  static constexpr int kConsumers = Tile::CONSUMERS;
  static constexpr int kWgM = Tile::WG_M;
  static constexpr int kBN = Tile::BN;
  static constexpr int kStages = Tile::STAGES;
  static constexpr int kARing = Tile::A_RING;
  static constexpr int kBM = 64 * kWgM * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kChunksPerStage = sm90::kWindowCols / (8 * kM);  // packed records per stage: 2 at M=4, 1 at M=8
  static constexpr int kStageBytes = kBN * 128;                          // BN tokens x one 128-byte line
  static constexpr int kOutBytes = kBN * (kBM + 8) * 2;
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kSmemBytes = (kRingBytes > kOutBytes ? kRingBytes : kOutBytes) + sm90::kAtomBytes;  // + align
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = kConsumers == 1 ? 240 : 232;
  static constexpr int kAcc = kBN / 2;
  static constexpr int kGroupM = 16;

  static_assert(kM == 4 || kM == 8, "the window kernel takes M = 4 or 8 (groups of 8M columns tile the 64-column stage)");
  static_assert(kConsumers == 1 || kConsumers == 2, "CONSUMERS must be 1 or 2 (register file: 128 threads each)");
  static_assert(kWgM == 1 || kWgM == 2, "WG_M must be 1 or 2 (accumulators live in registers)");
  static_assert(kBN % 16 == 0 && kBN >= 16 && kBN <= 256, "BN must be a multiple of 16 in 16..256 (wgmma N, TMA box)");
  static_assert(kWgM * kAcc <= 128, "at most 128 fp32 accumulators per consumer thread");
  static_assert(kStages >= 2 && kStages <= 8, "STAGES must be in 2..8");
  static_assert(kARing >= 2 && kARing <= 6 && kARing % 2 == 0, "A_RING must be even (expanded operands are double-buffered) in 2..6");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per CTA exceeds the 227 KB an sm_90 block may use");
  static_assert(kCluster == 1 || (kCluster == 2 && kBN % 16 == 0), "CLUSTER must be 1 or 2 (each CTA loads BN / 2 tokens)");
};

#if defined(VNM_SM90A_ENABLED)
// M = 8: the two k32 operands (frag[j], meta[j]) of one m64 tile's warp from its chunk record (a, e) and this
// lane's entry `col` of the row block's 32 kept columns of the chunk (lane l: group l / 4, slot l % 4); `group0`
// is the chunk's first group. Lanes t = 0, 1 of each quad carry the metadata (sparsity selector 0).
__device__ __forceinline__ void expand_window_m8(const uint4& a, uint32_t e, int col, int group0, int lane,
                                                 uint4 (&frag)[2], uint32_t (&meta)[2]) {
  constexpr unsigned kAll = 0xffffffffu;
  const int t = lane & 3, g0 = t >> 1;
  const uint32_t h = static_cast<uint32_t>(t & 1);
  // Kept positions of group lane / 4 (4 bits per slot), in all four lanes of its quad.
  uint32_t kw = sm90::kept_position(col, group0 + lane / 4, 8) << (4 * t);
  kw |= __shfl_xor_sync(kAll, kw, 1);
  kw |= __shfl_xor_sync(kAll, kw, 2);
  const int l0 = sm90::window_value_lane(lane, 0), l1 = sm90::window_value_lane(lane, 1);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint32_t row_lo = j ? a.z : a.x, row_hi = j ? a.w : a.y;  // record registers of rows gid, gid + 8
    const uint32_t src[4] = {__shfl_sync(kAll, row_lo, l0), __shfl_sync(kAll, row_hi, l0),
                             __shfl_sync(kAll, row_lo, l1), __shfl_sync(kAll, row_hi, l1)};
    const uint32_t word = __shfl_sync(kAll, e, sm90::window_meta_lane(lane, j));
    const uint32_t kept[2] = {__shfl_sync(kAll, kw, 4 * (4 * j + g0)), __shfl_sync(kAll, kw, 4 * (4 * j + 2 + g0))};
    uint32_t out[4], nib[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // register q: row gid + 8 (q % 2), group 4j + 2 (q / 2) + g0, half h
      const int g = 2 * (q >> 1) + g0;
      const uint32_t slots = (word >> (16 * (q & 1) + 4 * g)) & 15u;
      const uint32_t c_lo = (kept[q >> 1] >> (4 * (slots & 3u))) & 15u, c_hi = (kept[q >> 1] >> (4 * (slots >> 2))) & 15u;
      const sm90::WindowRoute route = sm90::window_route(c_lo, c_hi, h);
      out[q] = __byte_perm(src[q], 0u, route.sel);
      nib[q] = route.nib;
    }
    frag[j] = make_uint4(out[0], out[1], out[2], out[3]);
    // Quad t of the operand is (group 4j + g0, half h) = this lane's registers 0/1; quad t + 4 its registers 2/3.
    uint32_t first = (nib[0] | (nib[1] << 16)) << (4 * t), second = (nib[2] | (nib[3] << 16)) << (4 * t);
    first |= __shfl_xor_sync(kAll, first, 1);
    first |= __shfl_xor_sync(kAll, first, 2);
    second |= __shfl_xor_sync(kAll, second, 1);
    second |= __shfl_xor_sync(kAll, second, 2);
    meta[j] = h ? second : first;
  }
}
#endif  // VNM_SM90A_ENABLED

template <typename Tile, typename T>
__global__ void __launch_bounds__(WgmmaWindowShape<Tile>::kThreads, 1)
    vnm_wgmma_window_kernel(const VnmParams p, const __grid_constant__ CUtensorMap xmap) {
#if defined(VNM_SM90A_ENABLED)
  using S = WgmmaWindowShape<Tile>;
  constexpr int kRecs = S::kChunksPerStage;
  constexpr uint32_t kPadMeta = 0x44444444u;  // every nibble (0, 1): a valid pair for all-zero values
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[S::kStages];
  __shared__ __align__(8) uint64_t empty_bar[S::kStages];

  const int tid = threadIdx.x;
  const int wg = tid / 128;  // 0: producer, 1..CONSUMERS: consumers
  const int warp = (tid / 32) % 4, lane = tid % 32;
  const uint32_t smem = (smem_addr(smem_raw) + sm90::kAtomBytes - 1) & ~uint32_t(sm90::kAtomBytes - 1);
  const uint32_t full0 = smem_addr(full_bar), empty0 = smem_addr(empty_bar);

  // A cluster's CTAs take adjacent row tiles of one token tile (the last pair may hold a tile past R: it
  // computes on clamped records and stores nothing, but still loads its half of x for its partner).
  const int tiles_m = (p.R + S::kBM - 1) / S::kBM, tiles_n = (p.N + S::kBN - 1) / S::kBN;
  const uint32_t rank = S::kCluster == 2 ? sm90::cluster_rank() : 0;
  const int pairs_m = (tiles_m + S::kCluster - 1) / S::kCluster;
  const sm90::TileCoord tile = sm90::tile_coord(blockIdx.x / S::kCluster, pairs_m, tiles_n, S::kGroupM / S::kCluster);
  const int m0 = (tile.m * S::kCluster + static_cast<int>(rank)) * S::kBM, n0 = tile.n * S::kBN;
  const int steps = (p.Kc + kRecs - 1) / kRecs;  // 64-column stages

  if (tid == 0) {
    for (int s = 0; s < S::kStages; ++s) {
      sm90::mbar_init(full0 + 8 * s, 1);                                // the producer's arrival; TMA the bytes
      sm90::mbar_init(empty0 + 8 * s, 4 * S::kConsumers * S::kCluster);  // one lane per consumer warp per CTA
    }
    sm90::fence_barrier_init();
  }
  if constexpr (S::kCluster == 2)
    sm90::cluster_sync();  // the partner's barriers exist before anything multicasts or arrives on them
  else
    __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer: one TMA box per stage
    sm90::setmaxnreg_dec<S::kProducerRegs>();
    if (warp == 0 && lane == 0) {
      sm90::prefetch_tensormap(&xmap);
      for (int ks = 0; ks < steps; ++ks) {
        const int s = ks % S::kStages;
        if (ks >= S::kStages) sm90::mbar_wait(empty0 + 8 * s, ((ks / S::kStages) - 1) & 1);
        sm90::mbar_arrive_expect_tx(full0 + 8 * s, S::kStageBytes);  // a box counts whole, zero-filled parts too
        if constexpr (S::kCluster == 2) {  // this CTA's half of the tokens, into both CTAs
          constexpr int kHalf = S::kBN / 2;
          sm90::tma_load_2d_multicast(smem + s * S::kStageBytes + rank * kHalf * 128, &xmap, ks * sm90::kWindowCols,
                                      n0 + static_cast<int>(rank) * kHalf, full0 + 8 * s, 0x3);
        } else {
          sm90::tma_load_2d(smem + s * S::kStageBytes, &xmap, ks * sm90::kWindowCols, n0, full0 + 8 * s);
        }
      }
    }
  } else {
    // ------------------------------------------------------------------ consumers: sparse wgmma
    sm90::setmaxnreg_inc<S::kConsumerRegs>();
    const int cw = wg - 1;
    float acc[S::kWgM][S::kAcc];
#pragma unroll
    for (int mi = 0; mi < S::kWgM; ++mi)
#pragma unroll
      for (int i = 0; i < S::kAcc; ++i) acc[mi][i] = 0.f;

    const uint4* a_src[S::kWgM];
    const uint32_t* e_src[S::kWgM];
    const int* c_src[S::kWgM];  // M = 8: this lane's kept-column entry of chunk 0 for the warp's row block
#pragma unroll
    for (int mi = 0; mi < S::kWgM; ++mi) {
      const int local = cw * S::kWgM + mi;
      const int rec = sm90::a_record(m0 / 64 + local, warp, p.Rt);
      a_src[mi] = p.a_vals + static_cast<size_t>(rec) * p.Kc * 32 + lane;
      e_src[mi] = p.a_meta + static_cast<size_t>(rec) * p.Kc * 16 + sm90::meta_word(lane);
      const int blk = min((m0 + 64 * local + 16 * warp) / p.V, p.Bn - 1);  // 16 rows never straddle a block
      c_src[mi] = p.cols + static_cast<size_t>(blk) * p.Gp * 4 + lane;
    }
    uint4 a_reg[S::kARing][kRecs][S::kWgM];
    uint32_t e_reg[S::kARing][kRecs][S::kWgM];
    int c_reg[S::kARing][S::kWgM];
    auto load_a = [&](int ks, uint4 (&a)[kRecs][S::kWgM], uint32_t (&e)[kRecs][S::kWgM], int (&c)[S::kWgM]) {
      if (ks < steps) {
#pragma unroll
        for (int r = 0; r < kRecs; ++r) {
          const int kc = ks * kRecs + r;
#pragma unroll
          for (int mi = 0; mi < S::kWgM; ++mi) {
            const bool real = kc < p.Kc;  // M = 4, odd Kc: the last stage's second chunk is all zeros
            a[r][mi] = real ? ldg_stream(a_src[mi] + static_cast<size_t>(kc) * 32) : make_uint4(0, 0, 0, 0);
            e[r][mi] = real ? __ldg(e_src[mi] + static_cast<size_t>(kc) * 16) : kPadMeta;
          }
        }
        if constexpr (S::kM == 8) {
#pragma unroll
          for (int mi = 0; mi < S::kWgM; ++mi) c[mi] = __ldg(c_src[mi] + static_cast<size_t>(ks) * 32);
        }
      }
    };
#pragma unroll
    for (int j = 0; j + 1 < S::kARing; ++j) load_a(j, a_reg[j], e_reg[j], c_reg[j]);

    uint4 x_frag[2][2][S::kWgM];  // M = 8: expanded operands, double-buffered (a wgmma reads them asynchronously)
    uint32_t x_meta[2][2][S::kWgM];
    for (int k0 = 0; k0 < steps; k0 += S::kARing) {
#pragma unroll
      for (int r = 0; r < S::kARing; ++r) {
        const int ks = k0 + r;
        if (ks < steps) {
          const int s = ks % S::kStages;
          if constexpr (S::kM == 8) {
#pragma unroll
            for (int mi = 0; mi < S::kWgM; ++mi) {
              uint4 f[2];
              uint32_t m[2];
              expand_window_m8(a_reg[r][0][mi], e_reg[r][0][mi], c_reg[r][mi], ks * 8, lane, f, m);
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                x_frag[r & 1][j][mi] = f[j];
                x_meta[r & 1][j][mi] = m[j];
              }
            }
          }
          sm90::mbar_wait(full0 + 8 * s, (ks / S::kStages) & 1);
          const uint32_t stage = smem + s * S::kStageBytes;
#pragma unroll
          for (int mi = 0; mi < S::kWgM; ++mi) sm90::fence_operands(acc[mi]);
          sm90::wgmma_fence();
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int mi = 0; mi < S::kWgM; ++mi) {
              const uint64_t desc = sm90::bk_desc(stage, 64u * j);
              if constexpr (S::kM == 8)
                WgmmaSp<T, S::kBN, 0>::run(acc[mi], x_frag[r & 1][j][mi], desc, x_meta[r & 1][j][mi]);
              else
                WgmmaSp<T, S::kBN, 0>::run(acc[mi], a_reg[r][j][mi], desc, e_reg[r][j][mi]);
            }
          sm90::wgmma_commit();
#pragma unroll
          for (int mi = 0; mi < S::kWgM; ++mi) sm90::fence_operands(acc[mi]);
          sm90::wgmma_wait<1>();  // the previous stage's wgmmas are done: its x tile and operands are free
          if (ks > 0 && lane == 0) {
            const uint32_t bar = empty0 + 8 * ((ks - 1) % S::kStages);
            if constexpr (S::kCluster == 2) {  // both CTAs' producers refill this stage of both
              sm90::mbar_arrive_cluster(sm90::cluster_map(bar, 0));
              sm90::mbar_arrive_cluster(sm90::cluster_map(bar, 1));
            } else {
              sm90::mbar_arrive(bar);
            }
          }
          const int free_slot = (r + S::kARing - 1) % S::kARing;
#pragma unroll
          for (int mi = 0; mi < S::kWgM; ++mi)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              if constexpr (S::kM == 8)
                sm90::fence_fragment(x_frag[(r + 1) & 1][j][mi], x_meta[(r + 1) & 1][j][mi]);
              else
                sm90::fence_fragment(a_reg[free_slot][j][mi], e_reg[free_slot][j][mi]);
            }
          load_a(ks + S::kARing - 1, a_reg[free_slot], e_reg[free_slot], c_reg[free_slot]);
        }
      }
    }
    sm90::wgmma_wait<0>();
#pragma unroll
    for (int mi = 0; mi < S::kWgM; ++mi) sm90::fence_operands(acc[mi]);

    store_tile<S::kWgM, S::kBN, S::kConsumers, T>(acc, p, smem_raw, smem, m0, n0);
  }
  if constexpr (S::kCluster == 2) sm90::cluster_sync();  // no CTA leaves while its partner may still write to it
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
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (compute_capability(dev) != 90) return cudaErrorNotSupported;  // the only architecture it is built for
  if (p.N == 0 || p.R == 0) return cudaSuccess;
  CUtensorMap map;
  err = x_tensor_map<T>(p, S::kBN / S::kCluster, &map);
  if (err != cudaSuccess) return err;
  auto kernel = vnm_wgmma_window_kernel<Tile, T>;
  static bool configured[64] = {};  // raise the dynamic shared-memory limit once per device (graph-capture safe)
  if (dev >= 64 || !configured[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
    if (err != cudaSuccess) return err;
    if (dev < 64) configured[dev] = true;
  }
  const long long pairs_m = ((p.R + S::kBM - 1) / S::kBM + S::kCluster - 1) / S::kCluster;
  const long long ctas = pairs_m * S::kCluster * ((p.N + S::kBN - 1) / S::kBN);
  if (ctas > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(ctas));
  config.blockDim = dim3(S::kThreads);
  config.dynamicSmemBytes = S::kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = S::kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  err = cudaLaunchKernelEx(&config, kernel, p, map);
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace vnm
