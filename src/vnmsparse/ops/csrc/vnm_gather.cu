// x (N, Cx) -> xg (N, Cg) with xg[n, j] = x[n, idx[j]]: the input columns of a 2:4 copy whose layout is not x's own
// order (pack.two_four_tensor), gathered inside the op so that a call reads and writes x once at copy bandwidth.
// An index outside 0..Cx-1 reads zero: a wrong index list gives wrong results, never an out-of-bounds read.
#include <cstdint>

#include "vnm_params.h"

namespace vnm {

constexpr int kGatherThreads = 128;  // each owns 8 consecutive output columns
constexpr int kGatherRows = 4;       // rows of x per CTA: the indices are loaded once for all of them

// Per row, a thread's 8 elements are 2-byte loads through the read-only cache, which the warp's 256 outputs share
// (a quad layout reads nearly contiguous columns of x), and one 16-byte store. xg rows are ldg >= Cg elements,
// ldg a multiple of 8 and xg 16-byte aligned; columns Cg..ldg-1 are written as zeros.
static __global__ void __launch_bounds__(kGatherThreads)
    vnm_gather_columns_kernel(const uint16_t* __restrict__ x, int64_t ldx, int N, int Cx, const int64_t* __restrict__ idx,
                              int Cg, uint16_t* __restrict__ xg, int64_t ldg) {
  const int j0 = (blockIdx.x * kGatherThreads + threadIdx.x) * 8;
  if (j0 >= ldg) return;
  int src[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int64_t c = j0 + e < Cg ? idx[j0 + e] : -1;
    src[e] = c >= 0 && c < Cx ? static_cast<int>(c) : -1;
  }
  for (int n0 = blockIdx.y * kGatherRows; n0 < N; n0 += gridDim.y * kGatherRows) {
#pragma unroll
    for (int r = 0; r < kGatherRows; ++r) {
      const int n = n0 + r;
      if (n >= N) break;
      const uint16_t* row = x + static_cast<int64_t>(n) * ldx;
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t lo = src[2 * e] >= 0 ? __ldg(row + src[2 * e]) : 0u;
        const uint32_t hi = src[2 * e + 1] >= 0 ? __ldg(row + src[2 * e + 1]) : 0u;
        w[e] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(xg + static_cast<int64_t>(n) * ldg + j0) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

cudaError_t launch_gather_columns(const void* x, int64_t ldx, int N, int Cx, const int64_t* idx, int Cg, void* xg,
                                  int64_t ldg, cudaStream_t stream) {
  if (N == 0 || ldg == 0) return cudaSuccess;
  if (ldg % 8 != 0 || ldg < Cg || reinterpret_cast<uintptr_t>(xg) % 16 != 0) return cudaErrorInvalidValue;
  const int64_t row_blocks = (N + kGatherRows - 1) / kGatherRows;
  const dim3 grid(static_cast<unsigned>((ldg / 8 + kGatherThreads - 1) / kGatherThreads),
                  static_cast<unsigned>(row_blocks < 65535 ? row_blocks : 65535));
  vnm_gather_columns_kernel<<<grid, kGatherThreads, 0, stream>>>(static_cast<const uint16_t*>(x), ldx, N, Cx, idx, Cg,
                                                                 static_cast<uint16_t*>(xg), ldg);
  return cudaGetLastError();
}

}  // namespace vnm
