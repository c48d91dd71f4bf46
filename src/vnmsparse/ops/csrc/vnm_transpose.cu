// x (N, C) -> x^T (C, Np) for the tensor-core path: the gathered activation rows become contiguous, so the
// gather is a 16-byte cp.async per 8 tokens. Columns N..Np-1 are written as zeros.
#include <cstdint>

#include "vnm_params.h"

namespace vnm {

// x (N, C), row stride ldx -> xt (C, Np), zero in columns N..Np-1. 32x32 tiles through shared memory.
static __global__ void vnm_transpose_kernel(const VnmParams p) {
  __shared__ uint16_t tile[32][33];
  const uint16_t* x16 = static_cast<const uint16_t*>(p.x);
  uint16_t* xt16 = static_cast<uint16_t*>(p.xt);
  const int c0 = blockIdx.x * 32, n0 = blockIdx.y * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8
#pragma unroll
  for (int i = 0; i < 32; i += 8) {
    const int n = n0 + ty + i, c = c0 + tx;
    tile[ty + i][tx] = (n < p.N && c < p.C) ? x16[static_cast<size_t>(n) * p.ldx + c] : uint16_t(0);
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 32; i += 8) {
    const int c = c0 + ty + i, n = n0 + tx;
    if (c < p.C && n < p.Np) xt16[static_cast<size_t>(c) * p.Np + n] = tile[tx][ty + i];
  }
}

cudaError_t launch_transpose(const VnmParams& p, cudaStream_t stream) {
  if (p.C == 0 || p.Np == 0) return cudaSuccess;
  const dim3 grid((p.C + 31) / 32, (p.Np + 31) / 32);
  vnm_transpose_kernel<<<grid, dim3(32, 8), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace vnm
