// Can per-row TMA loads feed the sparse-wgmma kernel's gather faster than its 16-byte cp.async? (issue 4)
//
// The wgmma kernel (src/vnmsparse/ops/csrc/vnm_wgmma.cuh) gathers, per k-step and V-row block, 32 rows of x^T
// (the block's kept columns) x BN tokens into a 128-byte-swizzled shared-memory tile, with 16-byte cp.async; every
// measured speed fits ~20 B/clk/SM of that gather (docs/kernels.md). This probe answers the two questions
// that decide whether one TMA box per gathered row (64 tokens = one 128-byte swizzle line) could replace it:
//
//   swizzle   Does TMA swizzle by the absolute shared-memory address (a 1-row box written at line r of a
//             1024-byte atom lands with its 16-byte chunk c at chunk c ^ r, as wgmma reads it), or by the row
//             within the box (always 0 here, so no swizzle at all)? Prints which; exit 1 if neither.
//   rate      The gather alone (no MMA), as the kernel's producer would do it for a 128 x 256 tile (2 row blocks
//             x 32 kept rows x 256 tokens = 32 KB per k-step, 4-stage ring, 1 CTA per SM, x^T resident in L2),
//             by: cp.async 16-byte pieces from 128 threads (the kernel's way); per-row TMA boxes issued by 1, 32
//             or 128 threads; and, as the ceiling, dense 64-row TMA boxes of the same bytes. Prints TB/s and
//             bytes per clock per SM for each, from the median of several timed launches.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Isrc/vnmsparse/ops/csrc -o /tmp/tma_row_probe \
//        tools/tma_row_probe.cu && /tmp/tma_row_probe swizzle && /tmp/tma_row_probe rate
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "vnm_sm90_layout.h"

#define CHECK(x)                                                                      \
  do {                                                                                \
    cudaError_t e = (x);                                                              \
    if (e != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(2);                                                                   \
    }                                                                                 \
  } while (0)

constexpr int kBN = 256;                 // tokens per CTA tile
constexpr int kRows = 64;                // gathered rows per k-step: 2 row blocks x 32 kept columns
constexpr int kStages = 4;
constexpr int kStageBytes = kRows * kBN * 2;  // 32 KB
constexpr int kThreads = 128;
constexpr int kMaxWindows = 32;               // C / 64 of the probe's x^T

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void bar_init(uint32_t b, uint32_t n) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(b), "r"(n)); }
__device__ __forceinline__ void bar_expect(uint32_t b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t b, uint32_t parity) {
  asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}" ::"r"(b), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int x0, int x1, uint32_t bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
               ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(x0), "r"(x1), "r"(bar) : "memory");
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void arrive_on_copies(uint32_t b) { asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(b) : "memory"); }

// Start of k-row `row` (0..63: block row / 32, k row % 32) of token atom `atom` in a stage: 128-byte line row % 8.
__device__ __forceinline__ uint32_t line_offset(int row, int atom) {
  return (row / 32) * vnm::sm90::b_tile_bytes(kBN) + ((row % 32) / 8) * (kBN * 16) + atom * vnm::sm90::kAtomBytes + (row % 8) * 128;
}

// ---- swizzle: eight 1-row boxes into the eight lines of one atom; the atom copied out as it lies --------------
__global__ void swizzle_probe(const __grid_constant__ CUtensorMap map, const int* rows, uint16_t* out) {
  __shared__ __align__(1024) uint16_t atom[512];
  __shared__ __align__(8) uint64_t bar;
  if (threadIdx.x == 0) {
    bar_init(smem_u32(&bar), 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    bar_expect(smem_u32(&bar), 8 * 128);
    for (int r = 0; r < 8; ++r) tma_2d(smem_u32(atom) + 128 * r, &map, 0, rows[r], smem_u32(&bar));
  }
  __syncthreads();
  bar_wait(smem_u32(&bar), 0);
  for (int i = threadIdx.x; i < 512; i += blockDim.x) out[i] = atom[i];
}

// ---- rate: the gather of `steps` k-steps per CTA into a 4-stage ring -----------------------------------------
enum Mode { kCpAsync = 0, kTmaRows = 1, kTmaDense = 2 };

__global__ void __launch_bounds__(kThreads, 1)
    gather_rate(const __grid_constant__ CUtensorMap rows_map, const __grid_constant__ CUtensorMap dense_map,
                const uint16_t* xt, int np, const int* cols, int windows, int steps, int mode, int issuers, int* sink) {
  extern __shared__ __align__(1024) unsigned char smem[];
  __shared__ __align__(8) uint64_t full[kStages];
  __shared__ int scols[kMaxWindows * kRows];  // every window's column indices, read from shared memory as the
  const int tid = threadIdx.x;                // kernel reads them from registers: no global latency per copy
  for (int i = tid; i < windows * kRows; i += kThreads) scols[i] = cols[i];
  const int n0 = (blockIdx.x % (np / kBN)) * kBN;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) bar_init(smem_u32(&full[s]), mode == kCpAsync ? kThreads : 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const uint32_t base = smem_u32(smem);
  for (int s = 0; s < steps; ++s) {
    const int st = s % kStages;
    const uint32_t bar = smem_u32(&full[st]);
    if (s >= kStages) bar_wait(bar, ((s / kStages) - 1) & 1);  // the stage's previous fill has landed
    const int w = (blockIdx.x / (np / kBN) + s) % windows;     // 64-column window of this k-step
    const int* c = scols + w * kRows;
    const uint32_t stage = base + st * kStageBytes;
    if (mode == kCpAsync) {
#pragma unroll 4
      for (int q = tid; q < kRows * (kBN / 8); q += kThreads) {  // (row, 16-byte piece): the kernel's gather
        const int row = q / (kBN / 8), piece = q % (kBN / 8);
        const uint32_t dst = stage + line_offset(row, piece / 8) + (((piece % 8) ^ (row % 8)) * 16);
        cp_async16(dst, xt + static_cast<size_t>(c[row]) * np + n0 + 8 * piece);
      }
      arrive_on_copies(bar);
    } else if (tid < issuers) {
      if (tid == 0) bar_expect(bar, kStageBytes);
      if (mode == kTmaRows) {
        for (int q = tid; q < kRows * (kBN / 64); q += issuers)  // one 128-byte line per box
          tma_2d(stage + line_offset(q / (kBN / 64), q % (kBN / 64)), &rows_map, n0 + 64 * (q % (kBN / 64)), c[q / (kBN / 64)], bar);
      } else {
        for (int q = tid; q < kStageBytes / 8192; q += issuers)  // 64 rows x 64 tokens per box (8 KB)
          tma_2d(stage + q * 8192, &dense_map, n0 + 64 * (q % (kBN / 64)), w * 64, bar);
      }
    }
  }
  for (int s = max(0, steps - kStages); s < steps; ++s) bar_wait(smem_u32(&full[s % kStages]), (s / kStages) & 1);
  if (tid == 0) sink[blockIdx.x] = smem[blockIdx.x % kStageBytes];
}

// The driver's cuTensorMapEncodeTiled, looked up through the runtime (no -lcuda needed to build).
using EncodeTiled = decltype(&cuTensorMapEncodeTiled);
EncodeTiled encode_tiled() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
  if (fn == nullptr || found != cudaDriverEntryPointSuccess) {
    std::printf("cuTensorMapEncodeTiled not found in the driver\n");
    std::exit(2);
  }
  return reinterpret_cast<EncodeTiled>(fn);
}

CUtensorMap make_map(const uint16_t* xt, int C, int np, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(np), static_cast<cuuint64_t>(C)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(np) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)}, elem[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<uint16_t*>(xt), dims, strides,
                                            box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::printf("cuTensorMapEncodeTiled failed (%d)\n", static_cast<int>(r));
    std::exit(2);
  }
  return map;
}

int swizzle(const uint16_t* d_xt, int C, int np, const std::vector<uint16_t>& xt) {
  const int rows[8] = {5, 900, 17, 3, 2047, 64, 1000, 11};
  int* d_rows;
  uint16_t* d_out;
  CHECK(cudaMalloc(&d_rows, sizeof(rows)));
  CHECK(cudaMalloc(&d_out, 1024));
  CHECK(cudaMemcpy(d_rows, rows, sizeof(rows), cudaMemcpyHostToDevice));
  swizzle_probe<<<1, 128>>>(make_map(d_xt, C, np, 1), d_rows, d_out);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> out(512);
  CHECK(cudaMemcpy(out.data(), d_out, 1024, cudaMemcpyDeviceToHost));
  int absolute = 0, relative = 0;  // chunks found where each hypothesis puts them
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c) {
      const uint16_t* want = &xt[static_cast<size_t>(rows[r]) * np + 8 * c];
      absolute += std::memcmp(&out[64 * r + 8 * (c ^ r)], want, 16) == 0;
      relative += std::memcmp(&out[64 * r + 8 * c], want, 16) == 0;
    }
  std::printf("swizzle: %d/64 chunks at c ^ line (absolute address), %d/64 at c (row within box)\n", absolute, relative);
  std::printf("swizzle: %s\n", absolute == 64 ? "ABSOLUTE: 1-row boxes land as wgmma reads them"
                                    : relative == 64 ? "BOX-RELATIVE: 1-row boxes are not swizzled per line" : "NEITHER");
  return absolute == 64 || relative == 64 ? 0 : 1;
}

int rate(const uint16_t* d_xt, int C, int np) {
  int sms = 0, clock_khz = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  const int windows = C / 64, steps = 512;
  if (windows > kMaxWindows) {
    std::printf("rate: C / 64 = %d windows exceed kMaxWindows = %d\n", windows, kMaxWindows);
    return 2;
  }
  // Kept columns of an unpermuted 64:2:8 weight: per 8-column group, each of the 2 blocks keeps 4 at random.
  std::mt19937 rng(1);
  std::vector<int> cols(static_cast<size_t>(windows) * kRows);
  for (int w = 0; w < windows; ++w)
    for (int b = 0; b < 2; ++b)
      for (int g = 0; g < 8; ++g) {
        int idx[8] = {0, 1, 2, 3, 4, 5, 6, 7};
        std::shuffle(idx, idx + 8, rng);
        std::sort(idx, idx + 4);
        for (int j = 0; j < 4; ++j) cols[static_cast<size_t>(w) * kRows + b * 32 + 4 * g + j] = w * 64 + 8 * g + idx[j];
      }
  int *d_cols, *d_sink;
  CHECK(cudaMalloc(&d_cols, cols.size() * sizeof(int)));
  CHECK(cudaMalloc(&d_sink, sms * sizeof(int)));
  CHECK(cudaMemcpy(d_cols, cols.data(), cols.size() * sizeof(int), cudaMemcpyHostToDevice));
  const CUtensorMap rows_map = make_map(d_xt, C, np, 1), dense_map = make_map(d_xt, C, np, 64);
  const int smem = kStages * kStageBytes;
  CHECK(cudaFuncSetAttribute(gather_rate, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  struct Case { const char* name; int mode, issuers; };
  const Case cases[] = {{"cp.async 16 B x 128 threads (kernel)", kCpAsync, kThreads}, {"TMA 1-row boxes, 1 issuing thread", kTmaRows, 1},
                        {"TMA 1-row boxes, 32 issuing threads", kTmaRows, 32}, {"TMA 1-row boxes, 128 issuing threads", kTmaRows, 128},
                        {"TMA 64-row boxes (dense ceiling)", kTmaDense, 1}};
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::printf("rate: %d SMs at %d MHz, x^T %d x %d bf16 (%.0f MB, L2-resident), %d k-steps of 32 KB per CTA\n", sms, clock_khz / 1000, C,
              np, 2.0 * C * np / 1e6, steps);
  for (const Case& k : cases) {
    std::vector<float> ms;
    for (int rep = 0; rep < 7; ++rep) {
      CHECK(cudaEventRecord(a));
      gather_rate<<<sms, kThreads, smem>>>(rows_map, dense_map, d_xt, np, d_cols, windows, steps, k.mode, k.issuers, d_sink);
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      CHECK(cudaGetLastError());
      float t = 0;
      CHECK(cudaEventElapsedTime(&t, a, b));
      if (rep > 0) ms.push_back(t);  // the first launch warms L2 and the instruction cache
    }
    std::sort(ms.begin(), ms.end());
    const double t = ms[ms.size() / 2] * 1e-3, bytes = static_cast<double>(sms) * steps * kStageBytes;
    std::printf("rate: %-40s %7.3f ms  %6.2f TB/s  %5.1f B/clk/SM\n", k.name, t * 1e3, bytes / t / 1e12,
                bytes / sms / (t * clock_khz * 1e3));
  }
  return 0;
}

int main(int argc, char** argv) {
  const char* what = argc > 1 ? argv[1] : "swizzle";
  const int C = 2048, np = 2048;  // 8 MB: stays in L2, like x^T tiles shared by the CTAs in flight
  std::vector<uint16_t> xt(static_cast<size_t>(C) * np);
  std::mt19937 rng(7);
  for (auto& v : xt) v = static_cast<uint16_t>(rng());
  uint16_t* d_xt;
  CHECK(cudaMalloc(&d_xt, xt.size() * 2));
  CHECK(cudaMemcpy(d_xt, xt.data(), xt.size() * 2, cudaMemcpyHostToDevice));
  if (std::strcmp(what, "swizzle") == 0) return swizzle(d_xt, C, np, xt);
  if (std::strcmp(what, "rate") == 0) return rate(d_xt, C, np);
  std::printf("usage: %s swizzle|rate\n", argv[0]);
  return 2;
}
